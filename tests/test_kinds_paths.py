"""Every SAE kind walks its user's paths and stays itself: train through the CLI, then load,
evaluate and export it (issue 16). One tiny sweep of all five kinds is trained once per module."""

import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy

from saev_jax import checkpoint, config, data, evaluate, export, kinds, synthetic, train
from saev_jax import sae as sae_lib

D = 16
KINDS = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, dict[str, str]]:
    """(shard root, ckpt_path, kind -> run id) of one trained sweep with one SAE of each kind."""
    tmp = tmp_path_factory.mktemp("kinds_paths")
    root = tmp / "shards"
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=48, k=3, n_imgs=64, n_patches_per_img=8, n_patches_per_shard=512)
    )
    common = f"""
n_patches = 1500
sae_batch_size = 128
log_every = 4
track = false
n_workers = 1
ckpt_path = "{tmp / "ckpt"}"
[data]
shard_root = "{root}"
layer = -1
n_random_samples = 256
"""
    files = {
        "relu": "[sae]\nd_vit = 16\nexp_factor = 2\nsparsity_coeff = 1e-3\n",
        "topk": '[sae]\nd_vit = 16\nexp_factor = 4\nkind = ["topk", "batchtopk", "matryoshka"]\nk = 3\n',
        "jumprelu": '[sae]\nd_vit = 16\nexp_factor = 2\nkind = "jumprelu"\nl0_coefficient = 1e-2\n',
    }
    for name, text in files.items():
        (tmp / f"{name}.toml").write_text(common + text)
    ids = train.cli([str(tmp / f"{name}.toml") for name in files])
    by_kind = {checkpoint.load_cfg(tmp / "ckpt" / i).sae.kind: i for i in ids}
    assert sorted(by_kind) == sorted(KINDS)
    return root, tmp / "ckpt", by_kind


def raw_examples(root: pathlib.Path, n: int = 64) -> np.ndarray:
    acts = data.Activations(config.DataLoad(shard_root=str(root), layer=-1))
    return acts.read(np.arange(n)).astype(np.float32)


def reference_encode(ckpt_dpath: pathlib.Path, x_raw: np.ndarray) -> np.ndarray:
    """The kind's inference activation in float64 NumPy, from the files on disk alone."""
    cfg = checkpoint.load_cfg(ckpt_dpath)
    w = {k: np.float64(v) for k, v in safetensors.numpy.load_file(ckpt_dpath / "sae.safetensors").items()}
    p = {k: np.float64(v) for k, v in safetensors.numpy.load_file(ckpt_dpath / "preprocess.safetensors").items()}
    x = (np.clip(np.float64(x_raw), -p["clamp"], p["clamp"]) - p["act_mean"]) / p["scalar"]
    h = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    a = np.maximum(h, 0)
    kind = cfg.sae.kind
    if kind == "relu":
        return a
    if kind == "topk":
        kth = -np.sort(-a, axis=1)[:, cfg.sae.k - 1 : cfg.sae.k]
        return np.where(a >= kth, a, 0)
    theta = np.float64(safetensors.numpy.load_file(ckpt_dpath / "kind.safetensors")["threshold"])
    if kind == "jumprelu":
        return np.where(h > theta, h, 0)
    return np.where(a > theta, a, 0)  # BatchTopK, Matryoshka: one threshold, repeated per latent


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_load_gives_the_kind_and_its_inference_activation(sweep, kind):
    root, ckpt_path, ids = sweep
    dpath = ckpt_path / ids[kind]
    ckpt = sae_lib.load(dpath)
    assert ckpt.kind == kind and type(ckpt.sae.sae) is kinds.KINDS[kind]
    x = raw_examples(root)
    f = np.asarray(ckpt.encode_raw(x))
    ref = reference_encode(dpath, x)
    np.testing.assert_allclose(f, ref, rtol=1e-4, atol=1e-5)
    assert np.any(f > 0)
    if kind != "relu":  # The kind's selection did something ReLU would not.
        assert np.sum(f > 0) < np.sum(reference_encode_relu(dpath, x) > 0)
    x_hat, f2 = ckpt(x)
    np.testing.assert_array_equal(f2, f)
    np.testing.assert_allclose(x_hat, ckpt.decode_raw(f), rtol=1e-6, atol=1e-6)


def reference_encode_relu(dpath, x_raw):
    w = {k: np.float64(v) for k, v in safetensors.numpy.load_file(dpath / "sae.safetensors").items()}
    p = {k: np.float64(v) for k, v in safetensors.numpy.load_file(dpath / "preprocess.safetensors").items()}
    x = (np.clip(x_raw, -p["clamp"], p["clamp"]) - p["act_mean"]) / p["scalar"]
    return np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)


@pytest.mark.slow
def test_evaluate_cli_gives_trainings_metrics_for_every_kind(sweep, tmp_path):
    root, ckpt_path, ids = sweep
    out = tmp_path / "eval"
    assert evaluate.main([str(ckpt_path), "--data.shard-root", str(root), "--out", str(out), "--n-workers", "1"]) == 0
    for kind, run_id in ids.items():
        trained = json.loads((ckpt_path / run_id / "metrics.json").read_text())
        got = json.loads((out / run_id / "metrics.json").read_text())
        for key in ("l0", "mse", "l1", "l0_batch", "fvu", "rel_bias", "cos_sim", "dec_redundancy"):
            assert got[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-7), (kind, key)
        assert got["n_dead"] == trained["n_dead"], kind
    # The batch-coupled kinds: batch-mode L0 is k on full batches, the threshold's L0 is its own.
    for kind in ("batchtopk", "matryoshka"):
        got = json.loads((out / ids[kind] / "metrics.json").read_text())
        assert got["l0_batch"] == pytest.approx(3.0)


@pytest.mark.slow
def test_checkpoint_kind_errors(tmp_path, capsys):
    """Missing, wrong-shape or unexplained kind tensors and an unknown kind: one line naming file and kind."""
    cfg = config.Train(sae=config.SparseAutoencoder(d_vit=8, exp_factor=4, kind="jumprelu"))
    stack = kinds.make_stack([cfg])
    sae, state = jax.tree.map(lambda a: a[0], (stack, kinds.init_kind_state(stack)))
    checkpoint.save(sae, tmp_path / "ok", cfg, {}, None, None, jax.device_get(sae.inference_tensors(state)))
    loaded = checkpoint.load(tmp_path / "ok")
    assert loaded.kind == "jumprelu"
    np.testing.assert_allclose(np.exp(loaded.sae.sae.log_threshold), np.exp(sae.log_threshold), rtol=1e-6)

    checkpoint.save(sae, tmp_path / "missing", cfg, {})
    with pytest.raises(config.InputError, match=r"missing/kind.safetensors: kind jumprelu: missing threshold"):
        checkpoint.load(tmp_path / "missing")
    checkpoint.save(sae, tmp_path / "shape", cfg, {}, None, None, {"threshold": np.ones(5, np.float32)})
    with pytest.raises(config.InputError, match=r"kind jumprelu: threshold has shape \[5\], expected \[32\]"):
        checkpoint.load(tmp_path / "shape")
    relu_cfg = config.Train(sae=config.SparseAutoencoder(d_vit=8, exp_factor=4))
    checkpoint.save(
        sae_lib.SAE(8, 32, key=jax.random.key(0)),
        tmp_path / "extra",
        relu_cfg,
        {},
        None,
        None,
        {"threshold": np.ones(32, np.float32)},
    )
    with pytest.raises(config.InputError, match=r"kind relu: unknown threshold"):
        checkpoint.load(tmp_path / "extra")
    # BatchTopK keeps one threshold: varying ones are not its.
    btk = config.Train(sae=config.SparseAutoencoder(d_vit=8, exp_factor=4, kind="batchtopk", k=2))
    btk_sae = jax.tree.map(lambda a: a[0], kinds.make_stack([btk]))
    checkpoint.save(btk_sae, tmp_path / "btk", btk, {}, None, None, {"threshold": np.arange(32, dtype=np.float32)})
    with pytest.raises(config.InputError, match=r"btk/kind.safetensors: kind batchtopk: threshold must be one value"):
        checkpoint.load(tmp_path / "btk")
    cfg_json = tmp_path / "ok" / "cfg.json"
    cfg_json.write_text(cfg_json.read_text().replace('"jumprelu"', '"gated"'))
    with pytest.raises(config.InputError, match=r"ok/cfg.json: sae.kind = 'gated': not a kind this version knows"):
        checkpoint.load(tmp_path / "ok")
    # The commands: one line and status 2, nothing written.
    for main, args in ((export.main, ["--format", "saelens", "--out", str(tmp_path / "out")]),
                       (evaluate.main, ["--data.shard-root", str(tmp_path), "--out", str(tmp_path / "out")])):  # fmt: skip
        assert main([str(tmp_path / "ok"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "gated" in err and "cfg.json" in err
        assert not (tmp_path / "out").exists()


def test_saving_a_kind_under_another_kinds_config_is_refused(tmp_path):
    cfg = config.Train(sae=config.SparseAutoencoder(d_vit=8, exp_factor=4, kind="topk", k=2))
    with pytest.raises(ValueError, match="a relu SAE but cfg.sae.kind = topk"):
        checkpoint.save(sae_lib.SAE(8, 32, key=jax.random.key(0)), tmp_path / "r", cfg, {})


def test_sae_is_the_relu_kind():
    assert sae_lib.SAE is kinds.ReLU
    assert not hasattr(kinds, "as_kind")


@pytest.mark.slow
def test_saelens_export_of_the_trained_sweep_encodes_as_loaded(sweep, tmp_path):
    from .test_checkpoint import saelens_reference_encode

    root, ckpt_path, ids = sweep
    assert export.main([str(ckpt_path), "--format", "saelens", "--out", str(tmp_path / "lens")]) == 0
    x = raw_examples(root)
    for kind, run_id in ids.items():
        cfg = json.loads((tmp_path / "lens" / run_id / "cfg.json").read_text())
        assert cfg["architecture"] == export.SAELENS_ARCHITECTURES[kind]
        f = np.asarray(sae_lib.load(ckpt_path / run_id).encode_raw(x))
        np.testing.assert_allclose(
            saelens_reference_encode(tmp_path / "lens" / run_id, x), f, rtol=1e-4, atol=1e-5, err_msg=kind
        )


@pytest.mark.slow
def test_the_cli_gives_each_kind_its_optimiser_defaults(sweep):
    """Sweep files that set no lr: ReLU trains with saev's, the other kinds with SPEC 11's (recorded in cfg.json)."""
    _, ckpt_path, ids = sweep
    for kind, run_id in ids.items():
        cfg = checkpoint.load_cfg(ckpt_path / run_id)
        expected = (4e-4, "constant", 0.0) if kind == "relu" else (2e-4 * (2**14 / cfg.sae.d_sae) ** 0.5, "linear", 1.0)
        assert cfg.lr == pytest.approx(expected[0]) and (cfg.lr_schedule, cfg.max_grad_norm) == expected[1:], kind
