"""Synthetic shards: saev's on-disk format, determinism, padding and the dictionary."""

import json
import subprocess
import sys

import numpy as np
import pytest

from saev_jax import data, synthetic

SMALL = synthetic.Synthetic(
    d_vit=8, n_features=32, k=3, n_imgs=10, n_patches_per_img=4, layers=(-2, -1), n_patches_per_shard=40
)


def read_raw(dpath, md):
    """Every shard, read plainly: [n_shards * n_imgs_per_shard, n_layers, n_tokens, d_vit]."""
    shape = (md.n_imgs_per_shard, len(md.layers), md.n_patches_per_img + int(md.cls_token), md.d_vit)
    shards = [np.fromfile(dpath / f"acts{i:06d}.bin", dtype=np.float32).reshape(shape) for i in range(md.n_shards)]
    return np.concatenate(shards)


@pytest.mark.parametrize("cls_token", [True, False])
def test_metadata_and_sizes(tmp_path, cls_token):
    cfg = synthetic.Synthetic(**{**SMALL.__dict__, "cls_token": cls_token})
    md = synthetic.write_shards(tmp_path, cfg)

    dct = json.loads((tmp_path / "metadata.json").read_text())
    keys = {"model_family", "model_ckpt", "layers", "n_patches_per_img", "cls_token", "d_vit", "seed",
            "n_imgs", "n_patches_per_shard", "data"}  # fmt: skip
    assert set(dct) == keys
    assert dct["layers"] == [-2, -1] and dct["cls_token"] is cls_token and dct["n_imgs"] == 10
    assert data.Metadata.load(tmp_path) == md

    n_tokens = 4 + int(cls_token)
    n_imgs_per_shard = 40 // 2 // n_tokens
    n_shards = -(-10 // n_imgs_per_shard)
    assert sorted(p.name for p in tmp_path.glob("acts*.bin")) == [f"acts{i:06d}.bin" for i in range(n_shards)]
    for i in range(n_shards):
        assert (tmp_path / f"acts{i:06d}.bin").stat().st_size == n_imgs_per_shard * 2 * n_tokens * 8 * 4


def test_zero_padding_and_content(tmp_path):
    md = synthetic.write_shards(tmp_path, SMALL)
    acts = read_raw(tmp_path, md)
    assert md.n_imgs_per_shard * md.n_shards > md.n_imgs, "the test needs a padded last shard"
    assert np.all(acts[md.n_imgs :] == 0)
    real = acts[: md.n_imgs]
    assert np.all(np.isfinite(real)) and np.abs(real).max() < 1e3
    assert np.all(np.abs(real).max(axis=-1) > 0), "every real token is nonzero"


def test_truth_unit_rows(tmp_path):
    synthetic.write_shards(tmp_path, SMALL)
    truth = np.load(tmp_path / "truth.npy")
    assert truth.shape == (32, 8) and truth.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(truth, axis=1), 1.0, rtol=1e-6)


def test_deterministic_in_seed(tmp_path):
    md = synthetic.write_shards(tmp_path / "a", SMALL)
    synthetic.write_shards(tmp_path / "b", SMALL)
    synthetic.write_shards(tmp_path / "c", synthetic.Synthetic(**{**SMALL.__dict__, "seed": 1}))
    a, b, c = (read_raw(tmp_path / name, md) for name in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(np.load(tmp_path / "a" / "truth.npy"), np.load(tmp_path / "b" / "truth.npy"))


def test_generative_model():
    """About k features per token, heavy-tailed frequencies, shared image features, a per-layer offset."""
    cfg = synthetic.Synthetic(d_vit=16, n_features=256, k=8, n_imgs=400, n_patches_per_img=8, noise=0.0)
    dictionary = synthetic.make_dictionary(cfg)
    codes = synthetic.make_codes(np.random.default_rng(0), dictionary, cfg.n_imgs, cfg)
    assert codes.shape == (400, 9, 256) and codes.min() >= 0
    active = codes > 0
    assert 6.5 < active[:, 1:].sum(-1).mean() < 9.5
    freqs = active.mean(axis=(0, 1))
    assert freqs.max() > 20 * np.median(freqs)
    # Two patches of one image share more features than patches of two different images.
    same = (active[:, 1] & active[:, 2]).sum(-1).mean()
    other = (active[:-1, 1] & active[1:, 2]).sum(-1).mean()
    assert same > 2 * other

    acts = synthetic.make_images(np.random.default_rng(0), dictionary, cfg.n_imgs, cfg)
    signal = codes.astype(np.float64) @ dictionary.truth.astype(np.float64)
    expected = dictionary.gains[:, None, None] * signal[:, None] + dictionary.offsets[:, None]
    # make_images sums each token's few dictionary rows in float32, in its own order.
    np.testing.assert_allclose(acts, expected, rtol=0, atol=1e-5)
    assert 1 < np.abs(acts).mean() < 10


def test_cli(tmp_path):
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "saev_jax.synthetic", "--out", str(out), "--d-vit", "8", "--n-features", "16",
           "--n-imgs", "5", "--layers", "-3", "--no-cls-token", "--seed", "3"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    md = data.Metadata.load(out)
    assert md.layers == (-3,) and md.cls_token is False and md.d_vit == 8 and md.seed == 3
