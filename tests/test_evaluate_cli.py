"""`python -m saev_jax.evaluate CKPT... --data.shard-root DIR` on our checkpoints and saev's sae.pt."""

import csv
import json
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import checkpoint, config, data, evaluate, export, synthetic
from saev_jax import sae as sae_lib

D, S = 16, 32


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("shards")
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=48, k=3, n_imgs=40, n_patches_per_img=8, n_patches_per_shard=640)
    )
    return root


def random_sae(seed: int, b_dec: np.ndarray) -> sae_lib.SAE:
    """A random SAE with unit decoder rows, a random b_enc and the given b_dec."""
    sae = sae_lib.SAE(D, S, key=jax.random.key(seed)).normalize_w_dec()
    b_enc = np.random.default_rng(seed).normal(0, 0.2, S).astype(np.float32)
    return eqx.tree_at(lambda s: (s.b_enc, s.b_dec), sae, (jnp.asarray(b_enc), jnp.asarray(b_dec)))


def reference(
    sae_params: dict[str, np.ndarray], x_raw: np.ndarray, mean: np.ndarray, scalar: float, clamp: float
) -> dict[str, object]:
    """SPEC 4's metrics in float64 NumPy over every example."""
    x = (np.clip(np.float64(x_raw), -clamp, clamp) - mean) / scalar
    W_enc, b_enc, W_dec, b_dec = (np.float64(sae_params[k]) for k in sae_lib.TENSOR_NAMES)
    f = np.maximum((x - b_dec) @ W_enc + b_enc, 0)
    x_hat = f @ W_dec + b_dec
    freqs = (f > 0).mean(axis=0)
    return {
        "l0": (f > 0).sum(1).mean(),
        "l1": f.sum(1).mean(),
        "mse": ((x_hat - x) ** 2).mean(),
        "freqs": freqs,
        "n_dead": int((freqs == 0).sum()),
    }


def test_evaluates_ours_and_saev_sae_pt(tmp_path, shard_root):
    data_cfg = config.DataLoad(shard_root=str(shard_root), layer=-1)
    acts = data.Activations(data_cfg)
    x_raw = acts.read(np.arange(len(acts)))
    mean, scalar = data.get_stats(acts, data_cfg)
    # Saved statistics unlike what the shards give, to see that the saved ones are used.
    preprocess = data.Preprocess(data_cfg.clamp, mean + 0.3, 1.5 * scalar)
    # Two runs of one training group (same statistics: one pass), trained on layer -1.
    sweep = tmp_path / "sweep"
    for i in range(2):
        cfg = config.Train(data=data_cfg, sae=config.SparseAutoencoder(d_vit=D, exp_factor=S // D, seed=i))
        sae = random_sae(i, np.zeros(D, np.float32))
        sae_lib.save(sae, sweep / f"run{i}", cfg, {}, preprocess, np.zeros(S))
    # saev's sae.pt, no cfg.json: statistics from the shards with saev's default flags.
    saev_dpath = tmp_path / "saev" / "abc"
    saev_dpath.mkdir(parents=True)
    header = dict(
        d_vit=D,
        exp_factor=S // D,
        sparsity_coeff=4e-4,
        n_reinit_samples=0,
        ghost_grads=False,
        remove_parallel_grads=True,
        normalize_w_dec=True,
        seed=3,
    )
    saev_sae = random_sae(3, np.full(D, 0.1, np.float32))
    with open(saev_dpath / "sae.pt", "wb") as fd:
        checkpoint.write_saev(
            fd,
            checkpoint.saev_header_to_cfg(header, "t"),
            {k: np.asarray(getattr(saev_sae, k)) for k in sae_lib.TENSOR_NAMES},
        )
    # Our run0 exported to saev, folded: raw in.
    export.export(sweep / "run0", "saev", tmp_path / "exported" / "run0-saev")

    out = tmp_path / "eval"
    proc = subprocess.run([
        sys.executable, "-m", "saev_jax.evaluate", str(sweep), str(saev_dpath / "sae.pt"), str(tmp_path / "exported" / "run0-saev"),
        "--data.shard-root", str(shard_root), "--data.layer", "-1", "--out", str(out), "--sae-batch-size", "100", "--n-workers", "2",
    ], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout
    names = ["run0", "run1", "abc", "run0-saev"]
    assert all(name in printed for name in names) and "quality" in printed
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["run_id"] for r in rows] == names

    saev_mean, saev_scalar = mean, scalar  # saev's default flags: both estimated from the shards
    expected = {
        "run0": (sweep / "run0", np.asarray(preprocess.act_mean), float(preprocess.scalar)),
        "run1": (sweep / "run1", np.asarray(preprocess.act_mean), float(preprocess.scalar)),
        "abc": (saev_dpath / "sae.pt", saev_mean, saev_scalar),
        "run0-saev": (tmp_path / "exported" / "run0-saev", np.zeros(D), 1.0),
    }
    for name, (src, mean, scalar) in expected.items():
        params = {k: np.asarray(getattr(sae_lib.load(src).sae, k)) for k in sae_lib.TENSOR_NAMES}
        ref = reference(params, x_raw, mean, scalar, data_cfg.clamp)
        metrics = json.loads((out / name / "metrics.json").read_text())
        for key in ("l0", "l1", "mse"):
            np.testing.assert_allclose(metrics[key], ref[key], rtol=2e-5, err_msg=f"{name} {key}")
        assert metrics["n_dead"] == ref["n_dead"] and np.isfinite(metrics["quality"])
        freqs = checkpoint._read_safetensors(out / name / "freqs.safetensors", {"freqs": 1, "mean_values": 1})["freqs"]
        np.testing.assert_allclose(freqs, ref["freqs"], rtol=1e-6)
        assert (out / name / "hists.png").stat().st_size > 0
        assert sae_lib.load_cfg(out / name).data.layer == -1
    assert metrics["stats"] == "saved" and json.loads((out / "abc" / "metrics.json").read_text())["stats"] == "computed"
    # The folded export gives the same features, so the same L0 and frequencies; its MSE is in raw units.
    m0, mx = (json.loads((out / n / "metrics.json").read_text()) for n in ("run0", "run0-saev"))
    np.testing.assert_allclose(mx["l0"], m0["l0"], rtol=1e-6)
    np.testing.assert_allclose(mx["mse"], m0["mse"] * float(preprocess.scalar) ** 2, rtol=1e-4)
    # One figure per pass: the two runs of the sweep shared one.
    assert sorted(p.name for p in out.glob("group-*.png")) == ["group-abc.png", "group-run0-saev.png", "group-run0.png"]


def test_bad_input_exits_2_with_one_line(tmp_path, shard_root, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint\n")
    wide = tmp_path / "wide"
    cfg = config.Train(sae=config.SparseAutoencoder(d_vit=8, exp_factor=2))
    sae_lib.save(sae_lib.SAE(8, 16, key=jax.random.key(0)), wide, cfg, {})
    cases = [
        (bad, "bad.pt: not a saev sae.pt"),
        (tmp_path / "nope", "no such checkpoint"),
        (wide, "d_vit = 8 but the shards"),
    ]
    for path, match in cases:
        assert evaluate.main([str(path), "--data.shard-root", str(shard_root), "--out", str(tmp_path / "o")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert not (tmp_path / "o").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "saev_jax.evaluate", str(bad), "--data.shard-root", str(shard_root)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {bad}: not a saev sae.pt (its first line is not a JSON header)"
    ], proc.stderr
