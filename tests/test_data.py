"""data.py against a plain NumPy reading of the raw shard files (np.fromfile + reshape + loops)."""

import gc
import json
import os
import pickle
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import torch

from saev_jax import config, data, synthetic

LAYERS = (-2, 7, 3)  # a value is never its own position, nor its Python negative index
MODES = [(p, l) for p in ("patches", "cls", "meanpool") for l in (-2, 3, "all", "meanpool")]


def make_shards(dpath, *, cls_token=True, n_imgs=7, layers=LAYERS, seed=0):
    """A tiny synthetic shard set whose last shard is zero-padded."""
    cfg = synthetic.Synthetic(
        d_vit=4, n_features=16, k=3, n_imgs=n_imgs, n_patches_per_img=3, layers=layers,
        cls_token=cls_token, n_patches_per_shard=30, seed=seed,
    )  # fmt: skip
    md = synthetic.write_shards(dpath, cfg)
    assert md.n_shards * md.n_imgs_per_shard > n_imgs
    return md


def raw_images(dpath):
    """Every real image, read plainly: [n_imgs, n_layers, n_tokens, d_vit]."""
    md = json.loads((dpath / "metadata.json").read_text())
    n_layers, n_tokens = len(md["layers"]), md["n_patches_per_img"] + int(md["cls_token"])
    per_shard = md["n_patches_per_shard"] // n_layers // n_tokens
    shards = []
    for i in range(-(-md["n_imgs"] // per_shard)):
        raw = np.fromfile(dpath / f"acts{i:06d}.bin", dtype=np.float32)
        shards.append(raw.reshape(per_shard, n_layers, n_tokens, md["d_vit"]))
    return np.concatenate(shards)[: md["n_imgs"]], md


def reference(dpath, patches, layer):
    """(examples, image_i, patch_i) of a mode, by explicit loops in SPEC 1's order (image, layer, patch)."""
    raw, md = raw_images(dpath)
    first = int(md["cls_token"])
    n_layers, n_patches = len(md["layers"]), md["n_patches_per_img"]
    layer_positions = range(n_layers) if layer in ("all", "meanpool") else [md["layers"].index(layer)]
    examples, image_i, patch_i = [], [], []
    for img in range(md["n_imgs"]):
        if layer == "meanpool":
            groups = [list(range(n_layers))]
        else:
            groups = [[l] for l in layer_positions]
        for ls in groups:
            if patches == "patches":
                for p in range(n_patches):
                    examples.append(np.mean([raw[img, l, first + p] for l in ls], axis=0, dtype=np.float64))
                    image_i.append(img)
                    patch_i.append(p)
            elif patches == "cls":
                examples.append(np.mean([raw[img, l, 0] for l in ls], axis=0, dtype=np.float64))
                image_i.append(img)
                patch_i.append(-1)
            else:
                rows = [raw[img, l, first + p] for l in ls for p in range(n_patches)]
                examples.append(np.mean(rows, axis=0, dtype=np.float64))
                image_i.append(img)
                patch_i.append(-1)
    return np.array(examples).astype(np.float32), np.array(image_i), np.array(patch_i)


def assert_examples_equal(actual, expected, patches, layer):
    if patches != "meanpool" and layer != "meanpool":
        np.testing.assert_array_equal(actual, expected)  # copied rows: bit-exact
    else:
        # Means of float32 rows accumulated in float64: equal up to the final rounding to float32.
        np.testing.assert_allclose(actual, expected, rtol=2**-23, atol=0)


def load(dpath, patches="patches", layer=-2, **kwargs):
    return data.Activations(config.DataLoad(shard_root=str(dpath), patches=patches, layer=layer, **kwargs))


# Activations: every mode, contents against the plain reading.


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("patches,layer", MODES)
def test_every_mode_matches_plain_numpy(tmp_path, cls_token, patches, layer):
    md = make_shards(tmp_path, cls_token=cls_token)
    if patches == "cls" and not cls_token:
        with pytest.raises(config.InputError, match="cls_token = false"):
            load(tmp_path, patches, layer)
        return
    acts = load(tmp_path, patches, layer)
    expected, image_i, patch_i = reference(tmp_path, patches, layer)
    n_layers = 3 if layer == "all" else 1
    per_img = {"patches": md.n_patches_per_img, "cls": 1, "meanpool": 1}[patches]
    assert len(acts) == md.n_imgs * n_layers * per_img == len(expected)

    everything = np.arange(len(acts))
    assert_examples_equal(acts.read(everything), expected, patches, layer)
    order = np.random.default_rng(0).permutation(len(acts))
    assert_examples_equal(acts.read(order), expected[order], patches, layer)
    some = np.array([len(acts) - 1, 0, 3, 3])
    assert_examples_equal(acts.read(some), expected[some], patches, layer)
    np.testing.assert_array_equal(acts.image_i(everything), image_i)
    np.testing.assert_array_equal(acts.patch_i(everything), patch_i)
    assert acts.read(np.array([], dtype=np.int64)).shape == (0, 4)


def test_pickles_without_the_data(tmp_path):
    """DataLoader workers started by spawn or forkserver receive the dataset pickled."""
    make_shards(tmp_path)
    acts = load(tmp_path, "patches", "all")
    blob = pickle.dumps(data.Dataset(acts.cfg))
    assert len(blob) < 4096
    np.testing.assert_array_equal(pickle.loads(blob).acts.read(np.arange(len(acts))), acts.read(np.arange(len(acts))))


def test_read_bounds(tmp_path):
    make_shards(tmp_path)
    acts = load(tmp_path)
    with pytest.raises(IndexError):
        acts.read(np.array([len(acts)]))
    with pytest.raises(IndexError):
        acts.read(np.array([-1]))


def test_never_reads_padding(tmp_path):
    """The padded rows of the last shard are not examples: poison them and read everything."""
    md = make_shards(tmp_path)
    last = tmp_path / f"acts{md.n_shards - 1:06d}.bin"
    raw = np.fromfile(last, dtype=np.float32).reshape(md.shard_shape)
    raw[md.n_imgs - (md.n_shards - 1) * md.n_imgs_per_shard :] = np.nan
    raw.tofile(last)
    for patches, layer in MODES:
        acts = load(tmp_path, patches, layer)
        assert np.all(np.isfinite(acts.read(np.arange(len(acts)))))


# Bad input: InputError with a one-line message naming the culprit.


def assert_input_error(match, fn):
    with pytest.raises(config.InputError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_missing_dir_and_metadata(tmp_path):
    assert_input_error("shard directory not found", lambda: load(tmp_path / "nope"))
    assert_input_error("metadata.json not found", lambda: load(tmp_path))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda md: md.pop("d_vit"), "missing key 'd_vit'"),
        (lambda md: md.update(d_vit="4"), "'d_vit' = '4' must be an int"),
        (lambda md: md.update(n_imgs=True), "'n_imgs' = True must be an int"),
        (lambda md: md.update(cls_token=1), "'cls_token' = 1 must be bool"),
        (lambda md: md.update(layers=[1.5]), "'layers'"),
        (lambda md: md.update(layers=[]), "'layers'"),
        (lambda md: md.update(model_ckpt=3), "'model_ckpt' = 3 must be str"),
        (lambda md: md.update(n_imgs=0), "'n_imgs' = 0 must be positive"),
        (lambda md: md.update(n_patches_per_shard=5), "'n_patches_per_shard' = 5"),
    ],
)
def test_bad_metadata(tmp_path, edit, match):
    make_shards(tmp_path)
    fpath = tmp_path / "metadata.json"
    md = json.loads(fpath.read_text())
    edit(md)
    fpath.write_text(json.dumps(md))
    assert_input_error(f"metadata.json.*{match}", lambda: load(tmp_path))


def test_malformed_metadata(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    assert_input_error("metadata.json: invalid JSON", lambda: load(tmp_path))
    (tmp_path / "metadata.json").write_text("[1, 2]")
    assert_input_error("metadata.json: expected a JSON object", lambda: load(tmp_path))


def test_bad_layer_and_mode(tmp_path):
    make_shards(tmp_path, cls_token=False)
    assert_input_error(r"data.layer = 1 is not a recorded layer.*\[-2, 7, 3\]", lambda: load(tmp_path, layer=1))
    assert_input_error("data.layer = 'last'", lambda: load(tmp_path, layer="last"))
    assert_input_error("data.patches = 'tokens'", lambda: load(tmp_path, patches="tokens"))
    assert_input_error("data.patches = 'cls' needs a \\[CLS\\] token", lambda: load(tmp_path, patches="cls"))


def test_bad_shard_files(tmp_path):
    md = make_shards(tmp_path)
    shard = tmp_path / "acts000001.bin"
    full = shard.read_bytes()

    shard.write_bytes(full[:-4])
    assert_input_error(
        f"acts000001.bin: {len(full) - 4} bytes, but metadata.json implies {len(full)}", lambda: load(tmp_path)
    )
    shard.write_bytes(full + b"\0" * 4)
    assert_input_error("acts000001.bin: .* bytes, but metadata.json implies", lambda: load(tmp_path))
    shard.unlink()
    assert_input_error(f"acts000001.bin: shard file missing .*{md.n_shards} shards", lambda: load(tmp_path))
    shard.mkdir()
    assert_input_error("acts000001.bin: not a regular file", lambda: load(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_shard(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "acts000002.bin").chmod(0)
    assert_input_error("acts000002.bin: cannot read", lambda: load(tmp_path))


def test_non_finite_activation(tmp_path):
    md = make_shards(tmp_path)
    fpath = tmp_path / "acts000001.bin"
    raw = np.fromfile(fpath, dtype=np.float32).reshape(md.shard_shape)
    raw[1, 0, 2, 3] = np.inf  # image 1 of shard 1, layer position 0 (value -2), patch 1
    raw.tofile(fpath)
    img = md.n_imgs_per_shard + 1
    acts = load(tmp_path)
    good = np.array([0, 1, 2, (img + 1) * 3])
    assert np.all(np.isfinite(acts.read(good)))
    assert_input_error(f"acts000001.bin: non-finite activation in image 1 of this shard \\(image {img}, example {img * 3 + 1}",
                       lambda: acts.read(np.arange(len(acts))))  # fmt: skip
    loader = data.Loader(acts, batch_size=4, shuffle=False)
    assert_input_error("acts000001.bin: non-finite", lambda: list(loader))
    other_layer = load(tmp_path, layer=7)
    assert np.all(np.isfinite(other_layer.read(np.arange(len(other_layer)))))


# Statistics and preprocessing.


def reference_stats(examples, n, clamp):
    sample = np.clip(examples[data.sample_indices(len(examples), n, seed=42)], -clamp, clamp)
    mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
    norms = np.linalg.norm((sample - mean).astype(np.float64), axis=1)
    return mean, norms.mean() / np.sqrt(sample.shape[1])


@pytest.mark.parametrize("patches,layer", [("patches", -2), ("meanpool", "all")])
@pytest.mark.parametrize("n", [5, 10_000])
def test_stats_match_numpy(tmp_path, patches, layer, n):
    make_shards(tmp_path)
    expected, _, _ = reference(tmp_path, patches, layer)
    clamp = float(np.quantile(np.abs(expected), 0.9))  # so the clamp changes the answer
    cfg = config.DataLoad(shard_root=str(tmp_path), patches=patches, layer=layer, n_random_samples=n, clamp=clamp)
    act_mean, scalar = data.get_stats(data.Activations(cfg), cfg)
    ref_mean, ref_scalar = reference_stats(expected, n, clamp)
    assert act_mean.dtype == np.float32 and act_mean.shape == (4,)
    np.testing.assert_allclose(act_mean, ref_mean, rtol=2**-23)
    np.testing.assert_allclose(scalar, ref_scalar, rtol=1e-12)


def test_sample_indices():
    """A sample without replacement, nested in n, from memory that does not grow with n_total."""
    for n_total, n in [(1, 1), (10, 3), (1000, 1000), (1000, 5000), (2**40, 100)]:
        sample = data.sample_indices(n_total, n, seed=7)
        assert sample.dtype == np.int64 and sample.shape == (min(n, n_total),)
        assert np.unique(sample).size == sample.size and sample.min() >= 0 and sample.max() < n_total
    np.testing.assert_array_equal(np.sort(data.sample_indices(1000, 1000, 7)), np.arange(1000))
    np.testing.assert_array_equal(data.sample_indices(1000, 40, 7), data.sample_indices(1000, 100, 7)[:40])
    assert not np.array_equal(data.sample_indices(1000, 40, 7), data.sample_indices(1000, 40, 8))
    # Uniform: over 2000 seeds each of 50 items is drawn about 10/50 of the time.
    counts = np.bincount(np.concatenate([data.sample_indices(50, 10, seed) for seed in range(2000)]), minlength=50)
    expected = 2000 * 10 / 50
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_stats_off_and_from_files(tmp_path):
    make_shards(tmp_path)
    off = config.DataLoad(shard_root=str(tmp_path), scale_mean=False, scale_norm=False)
    act_mean, scalar = data.get_stats(data.Activations(off), off)
    assert np.array_equal(act_mean, np.zeros(4, np.float32)) and scalar == 1.0

    mean = np.array([1.0, -2.0, 3.0, 0.5], dtype=np.float32)
    np.save(tmp_path / "mean.npy", mean)
    torch.save(torch.tensor(2.5), tmp_path / "scalar.pt")
    torch.save(torch.from_numpy(mean), tmp_path / "mean.pt")
    np.save(tmp_path / "scalar.npy", np.array([4.0]))
    for mean_f, scalar_f, want in [("mean.npy", "scalar.pt", 2.5), ("mean.pt", "scalar.npy", 4.0)]:
        cfg = config.DataLoad(
            shard_root=str(tmp_path), scale_mean=str(tmp_path / mean_f), scale_norm=str(tmp_path / scalar_f)
        )
        act_mean, scalar = data.get_stats(data.Activations(cfg), cfg)
        np.testing.assert_array_equal(act_mean, mean)
        assert scalar == want

    # A loaded mean with an estimated norm: the norm is taken around the loaded mean.
    cfg = config.DataLoad(shard_root=str(tmp_path), scale_mean=str(tmp_path / "mean.npy"), n_random_samples=50)
    _, scalar = data.get_stats(data.Activations(cfg), cfg)
    examples, _, _ = reference(tmp_path, "patches", -2)
    sample = examples[data.sample_indices(len(examples), 50, seed=42)]
    np.testing.assert_allclose(
        scalar, np.linalg.norm((sample - mean).astype(np.float64), axis=1).mean() / 2, rtol=1e-12
    )


def test_bad_stat_files(tmp_path):
    make_shards(tmp_path)
    acts = load(tmp_path)

    def stats(**kwargs):
        return lambda: data.get_stats(acts, config.DataLoad(shard_root=str(tmp_path), **kwargs))

    assert_input_error("nope.npy: data.scale_mean file not found", stats(scale_mean=str(tmp_path / "nope.npy")))
    np.save(tmp_path / "wrong.npy", np.zeros(5, np.float32))
    assert_input_error(
        r"wrong.npy: data.scale_mean must hold 4 numbers, got float32 \[5\]",
        stats(scale_mean=str(tmp_path / "wrong.npy")),
    )
    (tmp_path / "mean.txt").write_text("1 2 3 4")
    assert_input_error(
        "mean.txt: data.scale_mean must be a .npy or torch .pt file", stats(scale_mean=str(tmp_path / "mean.txt"))
    )
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    assert_input_error("broken.pt: cannot load data.scale_norm", stats(scale_norm=str(tmp_path / "broken.pt")))
    np.save(tmp_path / "neg.npy", np.array(-1.0))
    assert_input_error("neg.npy: data.scale_norm must be positive", stats(scale_norm=str(tmp_path / "neg.npy")))
    np.save(tmp_path / "huge.npy", np.full(4, 2e3, np.float32))
    assert_input_error(
        "huge.npy: mean activation of size 2000 > 1e3", stats(scale_mean=str(tmp_path / "huge.npy"), scale_norm=False)
    )


def test_absurd_activations(tmp_path):
    md = make_shards(tmp_path)
    fpath = tmp_path / "acts000000.bin"
    raw = np.fromfile(fpath, dtype=np.float32).reshape(md.shard_shape)
    raw[0, 0, 1, 0] = 5e3
    raw.tofile(fpath)
    acts = load(tmp_path)
    cfg = config.DataLoad(shard_root=str(tmp_path))
    assert_input_error(f"{tmp_path}: activation of size 5000 > 1e3", lambda: data.get_stats(acts, cfg))
    assert_input_error(
        "activation of size", lambda: data.get_stats(acts, config.DataLoad(shard_root=str(tmp_path), scale_mean=False))
    )
    # Clamping comes first, so a clamp below 1e3 makes the same shards fine.
    data.get_stats(acts, config.DataLoad(shard_root=str(tmp_path), clamp=100.0))


def test_preprocess(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 10, (5, 4)).astype(np.float32)
    act_mean = rng.normal(0, 1, 4).astype(np.float32)
    pre = data.Preprocess(8.0, act_mean, 2.5)
    expected = (np.clip(x, -8.0, 8.0) - act_mean) / np.float32(2.5)
    got = jax.jit(lambda p, x: p(x))(pre, x)
    assert got.dtype == np.float32 and got.shape == (5, 4)
    # XLA's algebraic simplifier turns `y / broadcast(s)` into `y * broadcast(1 / s)` (visible in
    # the compiled HLO), which is within one ulp of the correctly rounded division.
    np.testing.assert_array_max_ulp(np.asarray(got), expected, maxulp=1)
    np.testing.assert_array_max_ulp(np.asarray(jax.vmap(pre)(x)), expected, maxulp=1)

    make_shards(tmp_path)
    cfg = config.DataLoad(shard_root=str(tmp_path), n_random_samples=30)
    acts = data.Activations(cfg)
    pre = data.make_preprocess(acts, cfg)
    act_mean, scalar = data.get_stats(acts, cfg)
    np.testing.assert_array_equal(np.asarray(pre.act_mean), act_mean)
    assert float(pre.scalar) == np.float32(scalar) and float(pre.clamp) == 1e5
    processed = np.asarray(pre(acts.read(np.arange(len(acts)))))
    np.testing.assert_allclose(np.linalg.norm(processed, axis=1).mean(), 2.0, rtol=0.2)


def test_torch_dataset(tmp_path):
    make_shards(tmp_path)
    for patches, layer in [("patches", 3), ("cls", -2), ("meanpool", "meanpool")]:
        cfg = config.DataLoad(shard_root=str(tmp_path), patches=patches, layer=layer, n_random_samples=20)
        dataset = data.Dataset(cfg)
        assert isinstance(dataset, torch.utils.data.Dataset) and dataset.d_vit == 4
        expected, image_i, patch_i = reference(tmp_path, patches, layer)
        assert len(dataset) == len(expected)
        act_mean, scalar = data.get_stats(dataset.acts, cfg)
        for i in [0, 1, len(dataset) - 1]:
            item = dataset[i]
            assert set(item) == {"act", "image_i", "patch_i"}
            assert item["act"].dtype == torch.float32 and item["act"].shape == (4,)
            want = (torch.from_numpy(expected[i]) - torch.from_numpy(act_mean)) / scalar
            torch.testing.assert_close(item["act"], want, rtol=2**-22, atol=0)
            assert (item["image_i"], item["patch_i"]) == (image_i[i], patch_i[i])
        batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
        assert batch["act"].shape == (len(dataset), 4)
        with pytest.raises(IndexError):
            dataset[len(dataset)]


# Loader.


def coded_shards(dpath, n_imgs=37, n_patches=5, d_vit=2):
    """Shards whose row for (image, layer, token) holds the number 1000 * image + 100 * layer + token."""
    md = data.Metadata("test", "test", (0, 1), n_patches, True, d_vit, 0, n_imgs, 2 * (n_patches + 1) * 8, "coded")
    dpath.mkdir(exist_ok=True)
    md.dump(dpath)
    for shard_i in range(md.n_shards):
        img = shard_i * md.n_imgs_per_shard + np.arange(md.n_imgs_per_shard)[:, None, None, None]
        code = 1000 * img + 100 * np.arange(2)[None, :, None, None] + np.arange(n_patches + 1)[None, None, :, None]
        code = np.broadcast_to(code, md.shard_shape).astype(np.float32)
        code.tofile(dpath / data.shard_fname(shard_i))
    return md


def decode(x_BD, md):
    """Dataset indices (patches mode, layer 1) of coded rows."""
    code = np.asarray(x_BD)[:, 0].astype(np.int64)
    assert np.all(code % 1000 // 100 == 1)
    return code // 1000 * md.n_patches_per_img + code % 100 - 1


def take(loader, n_batches):
    it = iter(loader)
    batches = [next(it) for _ in range(n_batches)]
    it.close()
    return batches


def test_permute_is_a_bijection():
    for n in [1, 2, 3, 5, 64, 100, 1000, 4099]:
        keys = np.random.default_rng(n).integers(0, 2**64, size=4, dtype=np.uint64)
        y = data.permute(np.arange(n, dtype=np.uint64), n, keys)
        np.testing.assert_array_equal(np.sort(y), np.arange(n))
    other = data.permute(np.arange(1000, dtype=np.uint64), 1000, keys[::-1].copy())
    assert not np.array_equal(other, data.permute(np.arange(1000, dtype=np.uint64), 1000, keys))


def test_shuffled_exactly_once_per_epoch(tmp_path):
    md = coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)
    n = len(acts)
    assert n == 37 * 5
    loader = data.Loader(acts, batch_size=16, shuffle=True, seed=3, n_threads=3, buffer_bytes=0)
    n_batches = 3 * n // 16 + 1  # three epochs and a bit; batches straddle every boundary
    batches = take(loader, n_batches)
    for x_BD, n_valid in batches:
        assert isinstance(x_BD, jax.Array) and x_BD.dtype == np.float32 and x_BD.shape == (16, 2)
        assert n_valid == 16
    served = np.concatenate([decode(x, md) for x, _ in batches])
    np.testing.assert_array_equal(served, np.concatenate([loader.batch_indices(b) for b in range(n_batches)]))
    epochs = [served[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))


def test_shuffled_deterministic_in_seed(tmp_path):
    md = coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)
    runs = [
        [decode(x, md) for x, _ in take(data.Loader(acts, batch_size=32, shuffle=True, seed=seed, n_threads=k), 12)]
        for seed, k in [(0, 1), (0, 4), (1, 2)]
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_batch_larger_than_dataset(tmp_path):
    md = coded_shards(tmp_path, n_imgs=3)
    acts = load(tmp_path, layer=1)
    (x, n_valid), (y, _) = take(data.Loader(acts, batch_size=40, shuffle=True), 2)
    served = np.concatenate([decode(x, md), decode(y, md)])
    assert n_valid == 40 and len(acts) == 15
    for e in range(5):
        np.testing.assert_array_equal(np.sort(served[e * 15 : (e + 1) * 15]), np.arange(15))


def test_ordered_pass_with_padding(tmp_path):
    make_shards(tmp_path)
    acts = load(tmp_path, "patches", "all")
    loader = data.Loader(acts, batch_size=10, shuffle=False, n_threads=2)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(acts) // 10)
    assert [n for _, n in batches] == [10] * (len(batches) - 1) + [len(acts) % 10 or 10]
    x_last, n_last = batches[-1]
    assert np.all(np.asarray(x_last)[n_last:] == 0)
    rows = np.concatenate([np.asarray(x)[:n] for x, n in batches])
    np.testing.assert_array_equal(rows, reference(tmp_path, "patches", "all")[0])
    assert list(loader)[-1][1] == n_last, "a Loader can be iterated again"
    with pytest.raises(TypeError):
        len(data.Loader(acts, batch_size=10, shuffle=True))


def test_shuffle_quality(tmp_path):
    """Batches draw from as many distinct images as uniform sampling would."""
    synthetic.write_shards(tmp_path, synthetic.Synthetic(n_imgs=512, n_patches_per_img=16, n_patches_per_shard=2**12))
    acts = load(tmp_path)
    loader = data.Loader(acts, batch_size=256, shuffle=True, seed=0)
    distinct = [np.unique(acts.image_i(loader.batch_indices(b))).size for b in range(64)]
    ideal = 512 * (1 - (1 - 256 / len(acts)) ** 16)
    assert abs(np.mean(distinct) / ideal - 1) < 0.02


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("saev-")]


def test_threads_stop(tmp_path):
    make_shards(tmp_path)
    acts = load(tmp_path)
    loader = data.Loader(acts, batch_size=4, shuffle=True, n_threads=3)
    assert loader.n_threads == min(3, os.cpu_count())  # No more readers than cores.

    it = iter(loader)
    next(it)
    assert len(reader_threads()) == loader.n_threads + 1  # Readers and the transfer thread.
    it.close()
    it.close()
    assert reader_threads() == []

    it = iter(loader)
    next(it)
    del it
    gc.collect()
    assert reader_threads() == []

    for i, _ in enumerate(loader):
        if i == 5:
            break
    gc.collect()
    assert reader_threads() == []

    list(data.Loader(acts, batch_size=4, shuffle=False))
    assert reader_threads() == []

    it = iter(data.Loader(acts, batch_size=4, shuffle=True, read_mode="blocks", io_threads=3))
    next(it)
    names = {t.name.split("_")[0] for t in reader_threads()}
    assert names == {"saev-windows", "saev-assembler", "saev-transfer", "saev-io"}
    it.close()
    assert reader_threads() == []


def test_no_hang_at_exit(tmp_path):
    make_shards(tmp_path)
    script = f"""
from saev_jax import config, data
acts = data.Activations(config.DataLoad(shard_root={str(tmp_path)!r}))
it = iter(data.Loader(acts, batch_size=4, shuffle=True, n_threads=2))
next(it)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# Reading larger-than-memory shard sets: `blocks` mode, resuming, per-process rows, bounded files.


def blocks_loader(acts, **kwargs):
    """A blocks-mode Loader with tiny blocks (2 images) and windows (3 blocks), so every boundary is crossed."""
    block_bytes = 2 * acts.image_read_nbytes
    window_bytes = 3 * 2 * acts.examples_per_image * acts.d_vit * 4
    return data.Loader(
        acts, read_mode="blocks", block_bytes=block_bytes, shuffle_buffer_bytes=2 * window_bytes, **kwargs
    )


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("patches,layer", MODES)
def test_read_images_matches_plain_numpy(tmp_path, cls_token, patches, layer):
    """pread-based reads of whole images (one read per shard, or per image) against the plain reading."""
    if patches == "cls" and not cls_token:
        return
    md = make_shards(tmp_path, cls_token=cls_token)
    acts = load(tmp_path, patches, layer)
    expected, _, _ = reference(tmp_path, patches, layer)
    per_img = acts.examples_per_image
    scratch = [None]
    for img_a, img_b in [(0, md.n_imgs), (1, 2), (2, 6), (md.n_imgs - 1, md.n_imgs)]:
        out = np.empty(((img_b - img_a) * per_img, 4), np.float32)
        got = acts.read_images(img_a, img_b, out=out, scratch=scratch)
        assert_examples_equal(got, expected[img_a * per_img : img_b * per_img], patches, layer)
    out = np.empty((5, 4), np.float32)
    assert_examples_equal(acts.read_range(1, 6, out=out), expected[1:6], patches, layer)


def test_blocks_exactly_once_per_epoch(tmp_path):
    md = coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)
    n = len(acts)
    for batch_size in [16, 64]:  # 64 > a window (30 examples): a batch spans several windows
        loader = blocks_loader(acts, batch_size=batch_size, shuffle=True, seed=3, n_threads=2, io_threads=3)
        assert loader.read_mode == "blocks" and loader.order.window_n == 30 and loader.order.block_n == 10
        n_batches = 3 * n // batch_size + 1
        batches = take(loader, n_batches)
        assert all(x.shape == (batch_size, 2) and n_valid == batch_size for x, n_valid in batches)
        served = np.concatenate([decode(x, md) for x, _ in batches])
        np.testing.assert_array_equal(served, np.concatenate([loader.batch_indices(b) for b in range(n_batches)]))
        epochs = [served[e * n : (e + 1) * n] for e in range(3)]
        for epoch in epochs:
            np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
        assert not np.array_equal(epochs[0], epochs[1])
    # The order follows BlockOrder: a window's examples are exactly its blocks' images.
    order = loader.order
    first = np.sort(served[: order.window_n])
    blocks = order.blocks(0)
    want = np.concatenate([np.arange(*order.block_images(b)) for b in blocks])
    np.testing.assert_array_equal(np.unique(first // md.n_patches_per_img), np.sort(want))


def test_blocks_deterministic_in_seed(tmp_path):
    md = coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)
    runs = [
        [decode(x, md) for x, _ in take(blocks_loader(acts, batch_size=32, shuffle=True, seed=seed, io_threads=k), 12)]
        for seed, k in [(0, 1), (0, 5), (1, 2)]
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("mode", ["random", "blocks"])
def test_start_batch_resumes_the_stream(tmp_path, mode):
    md = coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)

    def stream(**kwargs):
        return blocks_loader(acts, **kwargs) if mode == "blocks" else data.Loader(acts, read_mode="random", **kwargs)

    whole = [decode(x, md) for x, _ in take(stream(batch_size=16, shuffle=True, seed=5), 30)]
    for start in [1, 7, 13, 25]:
        resumed = [decode(x, md) for x, _ in take(stream(batch_size=16, shuffle=True, seed=5, start_batch=start), 5)]
        np.testing.assert_array_equal(resumed, whole[start : start + 5])
    ordered = list(stream(batch_size=16, shuffle=False, start_batch=10))
    assert len(ordered) == -(-len(acts) // 16) - 10
    np.testing.assert_array_equal(decode(ordered[0][0], md), np.arange(160, 176))


@pytest.mark.parametrize("mode", ["random", "blocks"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_rows_split_the_global_batch(tmp_path, mode, shuffle):
    """Each process's rows are its contiguous share of the one global batch every process agrees on."""
    coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)

    def batches(rows):
        kwargs = dict(batch_size=24, shuffle=shuffle, seed=2, rows=rows)
        loader = blocks_loader(acts, **kwargs) if mode == "blocks" else data.Loader(acts, read_mode="random", **kwargs)
        return take(loader, 10) if shuffle else list(loader)

    whole = batches((0, 1))
    parts = [batches((p, 3)) for p in range(3)]
    assert len(whole) == len(parts[0])
    for b, (x, n_valid) in enumerate(whole):
        assert [part[b][0].shape for part in parts] == [(8, 2)] * 3
        np.testing.assert_array_equal(np.concatenate([np.asarray(part[b][0]) for part in parts]), np.asarray(x))
        assert sum(part[b][1] for part in parts) == n_valid
    with pytest.raises(ValueError, match="divisible"):
        data.Loader(acts, batch_size=10, shuffle=True, rows=(0, 3))


def test_auto_mode_follows_available_memory(tmp_path, monkeypatch):
    make_shards(tmp_path)
    acts = load(tmp_path)
    total = acts.metadata.n_shards * acts.shard_nbytes
    monkeypatch.setattr(data.loader, "available_memory", lambda: total - 1)
    assert data.Loader(acts, batch_size=4, shuffle=True).read_mode == "blocks"
    monkeypatch.setattr(data.loader, "available_memory", lambda: total)
    assert data.Loader(acts, batch_size=4, shuffle=True).read_mode == "random"
    assert data.Loader(acts, batch_size=4, shuffle=True, read_mode="blocks").read_mode == "blocks"
    assert data.available_memory() > 0


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", ["random", "blocks"])
def test_bounded_open_files(tmp_path, mode):
    md = coded_shards(tmp_path)
    assert md.n_shards == 5
    cfg = config.DataLoad(shard_root=str(tmp_path), layer=1, max_open_shards=2)
    before = open_fds()
    acts = data.Activations(cfg)
    assert open_fds() == before, "construction opens nothing for good"
    kwargs = dict(batch_size=16, shuffle=True, seed=0, n_threads=1, io_threads=1)
    loader = blocks_loader(acts, **kwargs) if mode == "blocks" else data.Loader(acts, read_mode=mode, **kwargs)
    served = np.concatenate([decode(x, md) for x, _ in take(loader, len(acts) // 16)])
    np.testing.assert_array_equal(served, np.concatenate([loader.batch_indices(b) for b in range(len(acts) // 16)]))
    assert len(acts._files.open) <= 2
    assert open_fds() <= before + 2 * 2  # a descriptor per open file, and one more per memory map
    np.testing.assert_array_equal(acts.read(np.arange(len(acts))), load(tmp_path, layer=1).read(np.arange(len(acts))))


def shrink(fpath, nbytes):
    with open(fpath, "r+b") as fd:
        fd.truncate(nbytes)


def test_shard_shrinks_mid_epoch(tmp_path):
    coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)
    mapped = load(tmp_path, layer=1)
    mapped.read(np.arange(len(acts)))  # its memory maps exist before the file shrinks
    it = iter(blocks_loader(acts, batch_size=16, shuffle=True, n_threads=1))
    next(it)
    shrink(tmp_path / "acts000003.bin", 100)
    with pytest.raises(config.InputError, match=r"acts000003.bin: short read at byte \d+ \(file is 100 bytes"):
        for _ in range(len(acts)):
            next(it)
    it.close()
    # The memory-mapped path checks the size before touching the map (a shrunk map is SIGBUS).
    assert_input_error(
        "acts000003.bin: changed size while reading: now 100 bytes", lambda: mapped.read(np.arange(len(acts)))
    )
    out = np.empty((acts.examples_per_image * 4, 2), np.float32)
    assert_input_error(r"acts000003.bin: short read at byte \d+", lambda: acts.read_images(24, 28, out=out))


def test_shard_disappears_mid_epoch(tmp_path):
    coded_shards(tmp_path)
    acts = data.Activations(config.DataLoad(shard_root=str(tmp_path), layer=1, max_open_shards=1))
    it = iter(blocks_loader(acts, batch_size=16, shuffle=True, n_threads=1))
    next(it)
    (tmp_path / "acts000004.bin").unlink()
    with pytest.raises(config.InputError, match="acts000004.bin: shard file disappeared"):
        for _ in range(len(acts)):
            next(it)
    it.close()


def test_read_error_names_file_and_offset(tmp_path, monkeypatch):
    coded_shards(tmp_path)
    acts = load(tmp_path, layer=1)

    def failing(fd, buffers, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing)
    out = np.empty((acts.examples_per_image * 2, 2), np.float32)
    offset = (6 + 1) * 2 * 4  # image 8 = image 0 of acts000001.bin: layer 1, first patch
    assert_input_error(
        f"acts000001.bin: read error at byte {offset}: .*Input/output error", lambda: acts.read_images(8, 10, out=out)
    )
    with pytest.raises(config.InputError, match="read error at byte"):
        take(blocks_loader(acts, batch_size=16, shuffle=True), 2)


def test_direct_reads_match(tmp_path):
    """Rows of 4 KiB (d_vit 1024) are aligned: read_images can bypass the page cache, same values."""
    cfg = synthetic.Synthetic(d_vit=1024, n_features=16, k=3, n_imgs=5, n_patches_per_img=3, layers=(0,),
                              n_patches_per_shard=8)  # fmt: skip
    md = synthetic.write_shards(tmp_path, cfg)
    acts = load(tmp_path, "patches", 0)
    expected, _, _ = reference(tmp_path, "patches", 0)
    out = np.empty((len(acts), 1024), np.float32)
    np.testing.assert_array_equal(acts.read_images(0, md.n_imgs, out=out, direct=True), expected)
    opened = [f._direct_fd for f in acts._files.open.values()]
    assert opened and all(fd is not None for fd in opened)  # tried; -1 where the file system refuses O_DIRECT


def test_torch_loads_only_with_the_torch_dataset():
    # In a fresh interpreter: this one has torch already. The step and the loop must import without it.
    code = (
        "import sys\n"
        "from saev_jax import data, step\n"
        "assert 'torch' not in sys.modules, 'importing saev_jax.data imported torch'\n"
        "assert data.Dataset.__module__ == 'saev_jax.data.torch_dataset' and 'torch' in sys.modules\n"
        "from saev_jax.data import Example\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
