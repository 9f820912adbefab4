"""`python -m saev_jax.train` end to end on a tiny synthetic shard set, and its bad-input errors."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from saev_jax import config, data, step, synthetic, train
from saev_jax import sae as sae_lib

D = 16


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("shards")
    synthetic.write_shards(root, synthetic.Synthetic(d_vit=D, n_features=48, k=3, n_imgs=96, n_patches_per_img=8, n_patches_per_shard=640))
    return root


def write_sweep(tmp_path: pathlib.Path, shard_root: pathlib.Path, extra: str = "") -> pathlib.Path:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        f"""
n_patches = 3000
sae_batch_size = 256
log_every = 4
track = false
n_lr_warmup = 3
ckpt_path = "{tmp_path / "ckpt"}"
n_workers = 1
{extra}

[data]
shard_root = "{shard_root}"
layer = -1
n_random_samples = 512

[sae]
d_vit = {D}
exp_factor = 2
sparsity_coeff = [1e-3, 1e-2]
n_reinit_samples = 300
"""
    )
    return sweep


def test_cli_end_to_end(tmp_path, shard_root):
    ids = train.cli([str(write_sweep(tmp_path, shard_root)), "--lr", "3e-3"])
    assert len(ids) == len(set(ids)) == 2
    ckpt = tmp_path / "ckpt"
    for run_id, coeff in zip(ids, [1e-3, 1e-2]):
        dpath = ckpt / run_id
        cfg = sae_lib.load_cfg(dpath)
        # The flag sets the base; the sweep's lists make the grid.
        assert cfg.lr == 3e-3 and cfg.sae.sparsity_coeff == coeff and cfg.data.shard_root == str(shard_root)
        loaded = sae_lib.load(dpath)
        sae = loaded.sae
        assert sae.W_enc.shape == (D, 2 * D) and sae.W_dec.shape == (2 * D, D)
        metrics = json.loads((dpath / "metrics.json").read_text())
        # Self-contained: the statistics it trained with, and the evaluation's frequencies.
        assert loaded.missing == ()
        expected = data.make_preprocess(data.Activations(cfg.data), cfg.data)
        for name in ("clamp", "act_mean", "scalar"):
            np.testing.assert_array_equal(getattr(loaded.preprocess, name), getattr(expected, name))
        np.testing.assert_allclose(np.sum(loaded.freqs), metrics["l0"], rtol=1e-5)
        for key in ("l0", "l1", "mse", "n_dead", "n_almost_dead", "n_dense"):
            assert np.isfinite(metrics[key]), key
        assert 0 < metrics["l0"] <= 2 * D and metrics["mse"] > 0
        assert (dpath / "hists.png").stat().st_size > 0
    # The checkpoints, the group's overlay figure and the sweep summary; nothing half-written.
    assert {p.name for p in ckpt.iterdir()} == set(ids) | {f"group-{ids[0]}.png", "summary.csv", "snapshots", ".saev_jax.lock"}
    # The finished group left its record and no snapshot.
    assert [p.name for p in (ckpt / "snapshots" / "group-1").iterdir()] == ["done.json"]
    rows = (ckpt / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(run_id in "".join(rows) for run_id in ids)


def test_b_dec_is_the_mean_of_a_seeded_permutation(shard_root):
    cfg = config.Train(data=config.DataLoad(shard_root=str(shard_root), layer=-1, n_random_samples=256), sae=config.SparseAutoencoder(d_vit=D, exp_factor=2))
    cfgs = [
        config.grid(cfg, {"sae": {"n_reinit_samples": n, "seed": 5}})[0] for n in (100, 0, 37)
    ]
    acts = data.Activations(cfg.data)
    pre = data.make_preprocess(acts, cfg.data)
    # Two stacks (one SAE of another width in the second): one permutation serves both.
    cfgs[1] = dataclasses.replace(cfgs[1], sae=dataclasses.replace(cfgs[1].sae, exp_factor=4))
    stack_cfgs = [[cfgs[0], cfgs[2]], [cfgs[1]]]
    stacks = [step.make_stack(sae_lib.make_saes([c.sae for c in s]), step.Hparams.from_cfgs(s)) for s in stack_cfgs]
    stacks = train.init_b_dec(stacks, stack_cfgs, acts, pre)
    perm = data.sample_indices(len(acts), 100, cfgs[0].sae.seed)
    x = np.asarray(pre(acts.read(perm[:100])), np.float64)
    np.testing.assert_allclose(stacks[0].saes.b_dec[0], x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stacks[0].saes.b_dec[1], x[:37].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stacks[1].saes.b_dec[0], 0.0)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saev_jax.train", *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_input_exits_with_one_line(tmp_path, shard_root):
    sweep = write_sweep(tmp_path, shard_root, extra="learning_rate = 1.0")
    result = run_cli(str(sweep))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: sweep: unknown key 'learning_rate' (not a field of Train)"
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_dir", "does-not-exist"),
        ("bad_layer", "layer"),
        ("bad_d_vit", "d_vit"),
        ("no_metadata", "metadata.json"),
        ("bad_metadata", "metadata.json"),
    ],
)
def test_bad_data_is_caught_before_anything_is_written(tmp_path, shard_root, case, match):
    root = str(shard_root)
    sweep_extra, sae_d_vit, layer = "", D, -1
    if case == "missing_dir":
        root = str(tmp_path / "does-not-exist")
    elif case == "bad_layer":
        layer = 7
    elif case == "bad_d_vit":
        sae_d_vit = D * 2
    elif case in ("no_metadata", "bad_metadata"):
        fake = tmp_path / "fake"
        fake.mkdir()
        if case == "bad_metadata":
            (fake / "metadata.json").write_text("{not json")
        root = str(fake)
    sweep = write_sweep(tmp_path, pathlib.Path(root), sweep_extra).read_text()
    sweep = sweep.replace(f"d_vit = {D}", f"d_vit = {sae_d_vit}").replace("layer = -1", f"layer = {layer}")
    (tmp_path / "sweep.toml").write_text(sweep)
    with pytest.raises(config.InputError, match=match):
        train.cli([str(tmp_path / "sweep.toml")])
    assert not (tmp_path / "ckpt").exists()


def test_second_group_bad_data_fails_before_first_group_trains(tmp_path, shard_root):
    sweep = write_sweep(tmp_path, shard_root).read_text().replace("layer = -1", "layer = [-1, 9]")
    (tmp_path / "sweep.toml").write_text(sweep)
    with pytest.raises(config.InputError, match="9"):
        train.cli([str(tmp_path / "sweep.toml")])
    assert not (tmp_path / "ckpt").exists()


def test_ungroupable_configs_name_the_keys(shard_root):
    a = config.Train(data=config.DataLoad(shard_root=str(shard_root), layer=-1), sae=config.SparseAutoencoder(d_vit=D))
    b = config.grid(a, {"sae_batch_size": 8, "log_every": 3})[0]
    with pytest.raises(config.InputError, match="log_every, sae_batch_size"):
        train.open_group([a, b])


def test_cli_help_documents_fields():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("--data.shard-root", "--sae.sparsity-coeff", "Adam learning rate", "--n-patches"):
        assert text in result.stdout, text


@pytest.mark.parametrize(
    "extra, message",
    [
        ("seed = -1", "seed = -1: must not be negative (NumPy's generators take no negative seed)"),
        ("n_workers = -2", "n_workers = -2: must not be negative (0 means one reader thread)"),
        ('[sae]\nseed = -100', "sae.seed = -58: must not be negative"),
    ],
)
def test_bad_values_are_caught_before_statistics_wandb_and_b_dec(tmp_path, shard_root, monkeypatch, extra, message):
    sweep = write_sweep(tmp_path, shard_root).read_text()
    if extra.startswith("[sae]"):
        sweep = sweep.replace("[sae]\n", extra + "\n")
    else:
        sweep = sweep.replace("n_workers = 1\n", "") + "\n"
        sweep = extra + "\n" + sweep
    (tmp_path / "sweep.toml").write_text(sweep)

    def too_late(*args, **kwargs):
        raise AssertionError("reached before the configs were validated")

    monkeypatch.setattr(data, "make_preprocess", too_late)
    monkeypatch.setattr(data, "estimate_stats", too_late, raising=False)
    monkeypatch.setattr(train, "init_b_dec", too_late)
    monkeypatch.setattr(train.wandb_queue, "ParallelWandbRun", too_late)
    with pytest.raises(config.InputError) as info:
        train.cli([str(tmp_path / "sweep.toml")])
    assert str(info.value) == message
    assert not (tmp_path / "ckpt").exists()


def test_cli_negative_seed_is_one_error_line(tmp_path, shard_root):
    result = run_cli(str(write_sweep(tmp_path, shard_root)), "--seed", "-3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: seed = -3: must not be negative (NumPy's generators take no negative seed)"
    assert not (tmp_path / "ckpt").exists()


def test_n_workers_zero_means_one_reader_thread(shard_root):
    # saev's n_workers = 0 loads in the main process; here it is valid and reads with one thread.
    cfg = config.Train(n_workers=0, data=config.DataLoad(shard_root=str(shard_root), layer=-1), sae=config.SparseAutoencoder(d_vit=D))
    config.validate(cfg)
    acts = data.Activations(cfg.data)
    streams = []
    for n_threads in (0, 1):
        loader = data.Loader(acts, batch_size=64, shuffle=True, seed=3, n_threads=n_threads)
        assert loader.n_threads == 1
        batches = iter(loader)
        streams.append([np.asarray(next(batches)[0]) for _ in range(5)])
        batches.close()
    for a, b in zip(*streams):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "wandb_mode",
    [None, pytest.param("offline", marks=pytest.mark.slow)],  # resolve_mode's own test covers WANDB_MODE fast.
    ids=["no-login", "WANDB_MODE=offline"],
)
def test_track_true_without_login_or_offline_trains_to_offline_files(tmp_path, shard_root, wandb_mode):
    sweep = write_sweep(tmp_path, shard_root).read_text().replace("track = false", "track = true")
    sweep = sweep.replace("sparsity_coeff = [1e-3, 1e-2]", "sparsity_coeff = 1e-3")
    (tmp_path / "sweep.toml").write_text(sweep)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # No API key anywhere wandb looks, its files under tmp_path.
    env |= {"HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc"), "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    if wandb_mode:
        env["WANDB_MODE"] = wandb_mode
    result = subprocess.run(
        [sys.executable, "-m", "saev_jax.train", str(tmp_path / "sweep.toml")], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split()[-1]  # The ids come last, after the summary table.
    assert (tmp_path / "ckpt" / run_id / "sae.safetensors").is_file()
    assert list(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    fallback = "logging to offline files instead"
    assert result.stderr.count(fallback) == (0 if wandb_mode else 1)
    assert "Traceback" not in result.stderr
