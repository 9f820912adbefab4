"""A folded export loads as folded: no statistics needed, none asked for, the same features of raw x."""

import json
import logging

import numpy as np
import pytest

from saev_jax import checkpoint, config, evaluate, export, synthetic
from tests.test_checkpoint import D, make_kind_run, raw_batch, reference_kind_encode

CASES = [
    ("saev", "relu", "out"),
    ("saev", "relu", "out.pt"),  # one file alone: no cfg.json beside it
    *[("saelens", kind, "out") for kind in ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")],
    ("sparsify", "relu", "out"),
    ("sparsify", "topk", "out"),
]


@pytest.mark.parametrize("fmt, kind, out", CASES)
def test_folded_export_encodes_raw_x_as_the_checkpoint_does(tmp_path, capsys, caplog, fmt, kind, out):
    caplog.set_level(logging.INFO)
    dpath = make_kind_run(tmp_path, kind)
    ckpt = checkpoint.load(dpath)
    export.export(dpath, fmt, tmp_path / out)
    back = checkpoint.load(tmp_path / out)
    assert back.kind in (kind, "batchtopk")  # Matryoshka is BatchTopK at inference
    assert "preprocess" not in back.missing
    np.testing.assert_array_equal(back.preprocess.act_mean, np.zeros(D, np.float32))
    assert float(back.preprocess.scalar) == 1.0
    x = raw_batch(64) * 3  # entries up to ~40: inside the clamp (50), which folding cannot move
    f = np.asarray(back.encode_raw(x))
    np.testing.assert_allclose(f, np.asarray(ckpt.encode_raw(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f, reference_kind_encode(dpath, x), rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(f) > 0
    np.testing.assert_allclose(back(x)[0], ckpt(x)[0], rtol=1e-5, atol=1e-4)
    said = capsys.readouterr()
    assert "statistic" not in (said.out + said.err + caplog.text).lower()


def test_folded_sae_pt_is_marked_where_saevs_loader_does_not_look(tmp_path):
    import torch

    dpath = make_kind_run(tmp_path, "relu")
    export.export(dpath, "saev", tmp_path / "one.pt")
    with open(tmp_path / "one.pt", "rb") as fd:
        header = json.loads(fd.readline())
        state = torch.load(fd, weights_only=True)
    assert set(header) == set(checkpoint.SAEV_FIELDS)  # saev's strict header: nothing added
    assert set(state) == set(checkpoint.TENSOR_NAMES)  # saev's strict load_state_dict: nothing added
    assert state._metadata[""] == {"version": 1, checkpoint.FOLDED_KEY: {"folded": True, "clamp": 50.0}}
    # An unfolded sae.pt (no statistics to fold) stays saev's bytes and loads without statistics.
    src = tmp_path / "raw.pt"
    with open(src, "wb") as fd:
        checkpoint.write_saev(
            fd, config.SparseAutoencoder(d_vit=D, exp_factor=3), checkpoint.fold(checkpoint.load(dpath).sae, None)
        )
    assert checkpoint.load(src).missing == ("preprocess", "freqs", "cfg")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["saev", "saelens", "sparsify"])
def test_evaluating_a_folded_export_normalises_once(tmp_path, fmt):
    """On the same shards, the export's features are the checkpoint's: the same L0, L1 and FVU
    (its MSE is in raw units, scalar^2 times ours). Normalising twice would change them all."""
    root = tmp_path / "shards"
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=12, k=2, n_imgs=24, n_patches_per_img=8, n_patches_per_shard=96)
    )
    dpath = make_kind_run(tmp_path, "relu")
    cfg = checkpoint.load_cfg(dpath)
    cfg_dct = config.to_dict(cfg) | {"data": config.to_dict(cfg.data) | {"shard_root": str(root), "layer": -2}}
    (dpath / "cfg.json").write_text(json.dumps(cfg_dct))
    export.export(dpath, fmt, tmp_path / "exp")
    flags = ["--data.shard-root", str(root), "--data.layer", "-2", "--sae-batch-size", "64", "--n-workers", "1"]
    assert evaluate.main([str(dpath), "--out", str(tmp_path / "a"), *flags]) == 0
    assert evaluate.main([str(tmp_path / "exp"), "--out", str(tmp_path / "b"), *flags]) == 0
    a = json.loads((tmp_path / "a" / "relu" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "exp" / "metrics.json").read_text())
    assert b["stats"] == "saved"  # the identity it loaded with, nothing computed from the shards
    n = a["n_examples"]
    assert b["n_examples"] == n == 24 * 8
    # A feature within float32 rounding of 0 may fire in one and not the other: at most one such flip.
    assert abs(a["l0"] - b["l0"]) <= 1 / n
    np.testing.assert_allclose([b["l1"], b["fvu"]], [a["l1"], a["fvu"]], rtol=1e-4)
    scalar = float(checkpoint.load(dpath).preprocess.scalar)
    np.testing.assert_allclose(b["mse"], scalar**2 * a["mse"], rtol=1e-4)
