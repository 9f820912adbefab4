"""Our exports in the peers' own code: PyPI saev 0.1.0, sae-lens and eai-sparsify (`pip install -e '.[interop]'`).

Each peer loads what `saev_jax.export` wrote, with its own loader, and its forward pass on raw
activations must give our features and reconstructions (float32 tolerance). Skipped, with the
reason, when the peer is not installed. sae-lens and sparsify import transformers and friends,
so their tests, and the one running saev's own evaluation, are marked slow (`make test-all`).
"""

import json
import sys

import jax
import numpy as np
import pytest

from saev_jax import checkpoint, export
from saev_jax import sae as sae_lib

from .test_checkpoint import FULL_HEADER, D, S, make_kind_run, make_run, raw_batch

INSTALL = "not installed: pip install -e '.[interop]'"
SAEV = "saev 0.1.0 not installed: pip install saev==0.1.0 --no-deps (and the interop extra for beartype, einops)"


def ours(tmp_path):
    dpath = make_run(tmp_path)
    ckpt = sae_lib.load(dpath)
    x = raw_batch(64)
    f = np.asarray(ckpt.encode_raw(x))
    assert (f > 0).mean() > 0.1 and (f == 0).mean() > 0.1  # a real test of the ReLU, not all-on or all-off
    return dpath, ckpt, x, f, np.asarray(ckpt.decode_raw(f))


def test_saev_loads_our_sae_pt(tmp_path):
    pytest.importorskip("saev.nn", reason=SAEV)
    import saev.nn
    import torch

    dpath, ckpt, x, f, x_hat = ours(tmp_path)
    export.export(dpath, "saev", tmp_path / "out")
    model = saev.nn.load(str(tmp_path / "out" / "sae.pt"))  # saev's own loader: strict, weights_only
    with torch.no_grad():
        x_hat_t, f_t, _ = model(torch.from_numpy(x))
    np.testing.assert_allclose(f_t.numpy(), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat_t.numpy(), x_hat, rtol=1e-5, atol=1e-4)
    assert model.cfg.seed == ckpt.cfg.sae.seed and model.cfg.sparsity_coeff == ckpt.cfg.sae.sparsity_coeff
    # saev's own dump of what it loaded is byte for byte our file.
    saev.nn.dump(str(tmp_path / "again" / "sae.pt"), model)
    assert (tmp_path / "again" / "sae.pt").read_bytes() == (tmp_path / "out" / "sae.pt").read_bytes()


def test_saev_sae_pt_round_trips_through_saev_jax(tmp_path):
    pytest.importorskip("saev.nn", reason=SAEV)
    import saev.config
    import saev.nn
    import torch

    torch.manual_seed(0)
    model = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(**FULL_HEADER))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.5)
    saev.nn.dump(str(tmp_path / "run" / "sae.pt"), model)
    ckpt = sae_lib.load(tmp_path / "run")
    assert ckpt.cfg.sae == checkpoint.saev_header_to_cfg(FULL_HEADER, "test") and "preprocess" in ckpt.missing
    x = np.random.default_rng(0).normal(size=(32, D)).astype(np.float32)  # saev's normalised space
    with torch.no_grad():
        x_hat_t, f_t, _ = model(torch.from_numpy(x))
    f = np.asarray(jax.vmap(ckpt.sae.encode)(x))
    np.testing.assert_allclose(f, f_t.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(ckpt.sae.decode)(f), x_hat_t.numpy(), rtol=1e-5, atol=1e-5)
    export.export(tmp_path / "run", "saev", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == (tmp_path / "run" / "sae.pt").read_bytes()


@pytest.mark.slow
def test_saelens_loads_our_folder(tmp_path):
    pytest.importorskip("sae_lens", reason=f"sae-lens {INSTALL}")
    import sae_lens
    import torch

    dpath, ckpt, x, f, x_hat = ours(tmp_path)
    export.export(dpath, "saelens", tmp_path / "out")
    model = sae_lens.SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    assert (model.cfg.d_in, model.cfg.d_sae) == (D, S)
    with torch.no_grad():
        f_t = model.encode(torch.from_numpy(x))
        x_hat_t = model.decode(f_t)
    np.testing.assert_allclose(f_t.numpy(), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat_t.numpy(), x_hat, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_sparsify_loads_our_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # CPU: its eager decoder
    pytest.importorskip("sparsify", reason=f"eai-sparsify {INSTALL}")
    import sparsify
    import torch

    dpath, ckpt, x, f, x_hat = ours(tmp_path)
    export.export(dpath, "sparsify", tmp_path / "out")
    model = sparsify.Sae.load_from_disk(tmp_path / "out", device="cpu")
    with torch.no_grad():
        out = model.encode(torch.from_numpy(x))
        x_hat_t = model.decode(out.top_acts, out.top_indices)
    np.testing.assert_allclose(out.pre_acts.numpy(), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat_t.numpy(), x_hat, rtol=1e-5, atol=1e-4)


def import_saev_training(monkeypatch):
    """saev.training and saev.activations, with torchvision stubbed out.

    saev.activations imports torchvision for its image datasets only; the shard `Dataset` and
    `training.evaluate` never touch it. PyPI torchvision wheels do not load against the CPU
    build of torch this project pins, so a stand-in module takes its place for this import.
    """
    import types

    pytest.importorskip("saev.nn", reason=SAEV)
    pytest.importorskip("PIL", reason="saev.activations needs Pillow")
    if "saev.activations" not in sys.modules:
        tv, datasets, folder = (
            types.ModuleType(n) for n in ("torchvision", "torchvision.datasets", "torchvision.datasets.folder")
        )
        datasets.ImageFolder, datasets.folder, tv.datasets = type("ImageFolder", (), {}), folder, datasets
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
        monkeypatch.setitem(sys.modules, "torchvision.datasets.folder", folder)
    import saev.activations
    import saev.training

    return saev.training


@pytest.mark.slow
def test_saev_sae_pt_evaluates_here_as_saev_reports(tmp_path, monkeypatch, capsys):
    """An original sae.pt, evaluated by saev's own `training.evaluate` and by `python -m saev_jax.evaluate`."""
    training = import_saev_training(monkeypatch)
    import saev.config
    import saev.nn
    import torch

    from saev_jax import evaluate, synthetic

    root = tmp_path / "shards"
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=32, k=3, n_imgs=40, n_patches_per_img=8, n_patches_per_shard=640)
    )
    # PyPI saev 0.1.0 names two metadata keys vit_family / vit_ckpt (later saev and saev_jax:
    # model_family / model_ckpt) and rejects unknown keys: its own view of the same shards.
    old_root = tmp_path / "shards-saev-0.1.0"
    old_root.mkdir()
    for shard in root.glob("acts*.bin"):
        (old_root / shard.name).symlink_to(shard)
    md = json.loads((root / "metadata.json").read_text())
    md["vit_family"], md["vit_ckpt"] = md.pop("model_family"), md.pop("model_ckpt")
    (old_root / "metadata.json").write_text(json.dumps(md))
    torch.manual_seed(0)
    model = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(**FULL_HEADER))
    with torch.no_grad():
        model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
        model.b_enc.normal_(0, 0.3)
    saev.nn.dump(str(tmp_path / "run" / "sae.pt"), model)
    # 320 examples in batches of 80: saev's mean of per-batch means is then the mean over examples.
    cfg = saev.config.Train(
        data=saev.config.DataLoad(shard_root=str(old_root), layer=-1),
        sae=model.cfg,
        device="cpu",
        n_workers=0,
        sae_batch_size=80,
    )
    theirs = training.evaluate([cfg], torch.nn.ModuleList([model]))[0]
    status = evaluate.main([str(tmp_path / "run"), "--data.shard-root", str(root), "--data.layer", "-1",
                            "--out", str(tmp_path / "eval"), "--sae-batch-size", "80", "--n-workers", "2"])  # fmt: skip
    assert status == 0
    capsys.readouterr()
    mine = json.loads((tmp_path / "eval" / "run" / "metrics.json").read_text())
    assert 0 < theirs.l0 < S and theirs.n_dead < S
    for key in ("l0", "l1", "mse"):
        np.testing.assert_allclose(mine[key], float(getattr(theirs, key)), rtol=1e-5, err_msg=key)
    for key in ("n_dead", "n_almost_dead", "n_dense"):
        assert mine[key] == int(getattr(theirs, key)), key
    freqs = checkpoint._read_safetensors(
        tmp_path / "eval" / "run" / "freqs.safetensors", {"freqs": 1, "mean_values": 1}
    )["freqs"]
    np.testing.assert_allclose(freqs, theirs.freqs.numpy(), rtol=1e-6)


KINDS = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_saelens_loads_every_kind(tmp_path, kind):
    """SAELens' own loader on our export of each kind encodes raw activations as `sae.load(RUN).encode_raw`."""
    pytest.importorskip("sae_lens", reason=f"sae-lens {INSTALL}")
    import sae_lens
    import torch

    dpath = make_kind_run(tmp_path, kind)
    ckpt = sae_lib.load(dpath)
    x = raw_batch(64)
    f = np.asarray(ckpt.encode_raw(x))
    export.export(dpath, "saelens", tmp_path / "out")
    model = sae_lens.SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    assert model.cfg.architecture() == export.SAELENS_ARCHITECTURES[kind]
    with torch.no_grad():
        f_t = model.encode(torch.from_numpy(x))
        x_hat_t = model.decode(f_t)
    np.testing.assert_allclose(f_t.numpy(), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat_t.numpy(), np.asarray(ckpt.decode_raw(f)), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_sparsify_loads_topk_with_its_k(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # CPU: its eager decoder
    pytest.importorskip("sparsify", reason=f"eai-sparsify {INSTALL}")
    import sparsify
    import torch

    dpath = make_kind_run(tmp_path, "topk")
    ckpt = sae_lib.load(dpath)
    x = raw_batch(64)
    f = np.asarray(ckpt.encode_raw(x))
    export.export(dpath, "sparsify", tmp_path / "out")
    model = sparsify.Sae.load_from_disk(tmp_path / "out", device="cpu")
    assert model.cfg.k == ckpt.cfg.sae.k
    with torch.no_grad():
        out = model.encode(torch.from_numpy(x))
        x_hat_t = model.decode(out.top_acts, out.top_indices)
    dense = np.zeros_like(f)
    np.put_along_axis(dense, out.top_indices.numpy(), out.top_acts.numpy(), axis=1)
    np.testing.assert_allclose(dense, f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat_t.numpy(), np.asarray(ckpt.decode_raw(f)), rtol=1e-5, atol=1e-4)
