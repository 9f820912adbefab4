"""`python -m saev_jax.train` end to end on a tiny synthetic shard set, and its bad-input errors."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from saev_jax import config, data, evaluate, step, synthetic, train, training
from saev_jax import sae as sae_lib

D = 16


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("shards")
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=48, k=3, n_imgs=96, n_patches_per_img=8, n_patches_per_shard=640)
    )
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
    assert {p.name for p in ckpt.iterdir()} == set(ids) | {
        f"group-{ids[0]}.png",
        "summary.csv",
        "frontier.png",
        "snapshots",
        ".saev_jax.lock",
    }
    # The finished group, named by its configs, left its record and no snapshot.
    cfgs = [sae_lib.load_cfg(ckpt / run_id) for run_id in ids]
    assert [p.name for p in (ckpt / "snapshots" / config.group_name(cfgs)).iterdir()] == ["done.json"]
    rows = (ckpt / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(run_id in "".join(rows) for run_id in ids)
    # The evaluate CLI takes the shard root (and layer, patches) from cfg.json.
    assert evaluate.main([str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    for run_id in ids:
        again = json.loads((tmp_path / "ev" / run_id / "metrics.json").read_text())
        assert again["l0"] == json.loads((ckpt / run_id / "metrics.json").read_text())["l0"]
    assert (tmp_path / "ev" / "frontier.png").is_file()


def test_b_dec_is_the_mean_of_a_seeded_permutation(shard_root):
    cfg = config.Train(
        data=config.DataLoad(shard_root=str(shard_root), layer=-1, n_random_samples=256),
        sae=config.SparseAutoencoder(d_vit=D, exp_factor=2),
    )
    cfgs = [config.grid(cfg, {"sae": {"n_reinit_samples": n, "seed": 5}})[0] for n in (100, 0, 37)]
    acts = data.Activations(cfg.data)
    pre = data.make_preprocess(acts, cfg.data)
    # Two stacks (one SAE of another width in the second): one permutation serves both.
    cfgs[1] = dataclasses.replace(cfgs[1], sae=dataclasses.replace(cfgs[1].sae, exp_factor=4))
    stack_cfgs = [[cfgs[0], cfgs[2]], [cfgs[1]]]
    stacks = [step.make_stack(sae_lib.make_saes([c.sae for c in s]), step.Hparams.from_cfgs(s)) for s in stack_cfgs]
    stacks = training.init_b_dec(stacks, stack_cfgs, acts, pre)
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
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: {sweep}: unknown key 'learning_rate' (no such config field; --help lists them)"
    )
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
        training.open_group([a, b])


def test_cli_help_documents_fields():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in (
        "--data.shard-root",
        "--sae.sparsity-coeff",
        "Adam learning rate",
        "--n-patches",
        "--dry-run",
        "--sweep FILE",
        "--coordinator-address HOST:PORT",
        "--num-processes",
        "--dist-timeout",
        "--data.no-scale-mean",
        "Submit each group as a Slurm job",
    ):
        assert text in " ".join(result.stdout.replace("│", " ").split()), text  # tyro wraps lines in a box.


@pytest.mark.parametrize(
    "extra, message",
    [
        ("seed = -1", "seed = -1: must not be negative (NumPy's generators take no negative seed)"),
        ("n_workers = -2", "n_workers = -2: must not be negative (0 means one reader thread)"),
        ("[sae]\nseed = -100", "sae.seed = -58: must not be negative"),
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
    monkeypatch.setattr(training, "init_b_dec", too_late)
    monkeypatch.setattr(training.wandb_queue, "ParallelWandbRun", too_late)
    with pytest.raises(config.InputError) as info:
        train.cli([str(tmp_path / "sweep.toml")])
    assert str(info.value) == message
    assert not (tmp_path / "ckpt").exists()


def test_cli_negative_seed_is_one_error_line(tmp_path, shard_root):
    result = run_cli(str(write_sweep(tmp_path, shard_root)), "--seed", "-3")
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: seed = -3: must not be negative (NumPy's generators take no negative seed)"
    )
    assert not (tmp_path / "ckpt").exists()


def test_n_workers_zero_means_one_reader_thread(shard_root):
    # saev's n_workers = 0 loads in the main process; here it is valid and reads with one thread.
    cfg = config.Train(
        n_workers=0, data=config.DataLoad(shard_root=str(shard_root), layer=-1), sae=config.SparseAutoencoder(d_vit=D)
    )
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
    env |= {
        "HOME": str(tmp_path),
        "NETRC": str(tmp_path / "no-netrc"),
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
    }
    if wandb_mode:
        env["WANDB_MODE"] = wandb_mode
    result = subprocess.run(
        [sys.executable, "-m", "saev_jax.train", str(tmp_path / "sweep.toml")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split()[-1]  # The ids come last, after the summary table.
    assert (tmp_path / "ckpt" / run_id / "sae.safetensors").is_file()
    assert list(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    fallback = "logging to offline files instead"
    assert result.stderr.count(fallback) == (0 if wandb_mode else 1)
    assert "Traceback" not in result.stderr


def test_flag_overridden_by_the_sweep_file_warns_once(tmp_path, shard_root, capsys):
    sweep = write_sweep(tmp_path, shard_root)
    cfgs, sources, dry = train.parse_cli(
        [str(sweep), "--data.layer", "3", "--sae.sparsity-coeff", "0.5", "--lr", "0.01", "--n-patches", "3000"]
    )
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: {sweep} sets data.layer = -1, overriding --data.layer 3",
        f"warning: {sweep} sets sae.sparsity_coeff = [0.001, 0.01], overriding --sae.sparsity-coeff 0.5",
    ]  # --lr is not in the file; --n-patches gives the file's own value.
    assert [c.data.layer for c in cfgs] == [-1, -1] and cfgs[0].lr == 0.01 and sources == [str(sweep)] * 2 and not dry


def test_sweep_flag_negations_and_all_unknown_keys_at_once(tmp_path, shard_root, capsys):
    sweep = write_sweep(tmp_path, shard_root)
    by_flag, _, _ = train.parse_cli(["--sweep", str(sweep), "--data.no-scale-mean", "--data.scale-norm"])
    assert by_flag == train.parse_cli([str(sweep), "--data.scale-mean", "False"])[0]
    assert [c.data.scale_mean for c in by_flag] == [False, False] and by_flag[0].data.scale_norm is True
    assert train.parse_cli([f"--sweep={sweep}"])[0][0].data.scale_mean is True
    # saev's outdated keys: every one in one message.
    old = tmp_path / "dumbest.toml"
    old.write_text(
        'ckpt_dir = "x"\nlearning_rate = 1.0\nlr = 1e-3\n[sae]\nl1_coeff = 1.0\nd_vit = 16\n[data]\nlayer_idx = 1\n[wandb]\nproject = "p"\n'
    )
    with pytest.raises(config.InputError) as info:
        train.parse_cli([str(old)])
    assert str(info.value) == (
        f"{old}: unknown 5 keys 'ckpt_dir', 'learning_rate', 'sae.l1_coeff', 'data.layer_idx', 'wandb' (no such config field; --help lists them)"
    )


def test_d_vit_defaults_to_the_shards(tmp_path, shard_root):
    sweep = write_sweep(tmp_path, shard_root).read_text().replace(f"d_vit = {D}\n", "")
    (tmp_path / "sweep.toml").write_text(sweep)
    cfgs, _, _ = train.parse_cli([str(tmp_path / "sweep.toml")])
    assert [c.sae.d_vit for c in cfgs] == [D, D]
    alone, _, _ = train.parse_cli(["--data.shard-root", str(shard_root)])
    assert alone[0].sae.d_vit == D
    # Given, it is kept (and open_group says it disagrees with the shards).
    given, _, _ = train.parse_cli([str(tmp_path / "sweep.toml"), "--sae.d-vit", str(2 * D)])
    assert given[0].sae.d_vit == 2 * D
    with pytest.raises(config.InputError, match=f"sae.d_vit = {2 * D} but the shards .* have d_vit = {D}"):
        training.open_group(given)


def two_files(tmp_path, shard_root):
    (tmp_path / "a").mkdir()
    a = write_sweep(tmp_path / "a", shard_root)
    b_text = write_sweep(tmp_path, shard_root).read_text().replace("n_patches = 3000", "n_patches = 1500")
    b = tmp_path / "b.toml"
    b.write_text(b_text.replace("sparsity_coeff = [1e-3, 1e-2]", "sparsity_coeff = [3e-3, 1e-2, 3e-2]"))
    return a, b


def test_group_names_and_seeds_do_not_depend_on_other_files(tmp_path, shard_root):
    a, b = two_files(tmp_path, shard_root)
    alone, _, _ = train.parse_cli([str(b)])
    both, sources, _ = train.parse_cli([str(a), str(b)])
    assert both[2:] == alone and sources == [str(a)] * 2 + [str(b)] * 3
    # A single file's seeds are grid()'s.
    assert alone == config.grid(config.Train(), config.load_sweep(b))
    assert [c.seed for c in alone] == [42, 43, 44] and [c.sae.seed for c in alone] == [42, 43, 44]
    groups = config.split_cfgs(both)
    assert len(groups) == 2 and config.group_name(groups[1]) == config.group_name(config.split_cfgs(alone)[0])
    assert config.group_name(groups[0]) != config.group_name(groups[1])
    # Named by what its configs share: changed SAEs find the old snapshots (and are refused unless --fresh).
    assert config.group_name([dataclasses.replace(c, fresh=True, lr=1.0) for c in alone]) == config.group_name(alone)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, shard_root, capsys):
    a, b = two_files(tmp_path, shard_root)
    assert train.cli([str(a), str(b), "--dry-run"]) == []
    out = capsys.readouterr().out
    cfgs = train.parse_cli([str(a), str(b)])[0]
    for group in config.split_cfgs(cfgs):
        name = config.group_name(group)
        assert f"{name} (" in out and f"snapshots/{name}/ (new)" in out
    assert "5 configs in 2 group(s)" in out and out.count("stack 1/1: ") == 2 and "planned " in out
    # Config 2 of b's group: stack, kind, width, its own sparsity setting, lr, seeds, file.
    assert re.search(rf"^ +2 +1 +relu +32 +sparsity_coeff 0.03 +0.0004 +44 +44  {b}$", out, re.M)
    assert f"checkpoints: {tmp_path / 'ckpt' / '<run id>'}/" in out
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "a" / "ckpt").exists()


@pytest.mark.slow
def test_adding_a_sweep_file_skips_the_finished_group(tmp_path, shard_root, caplog, capsys):
    a, b = two_files(tmp_path, shard_root)
    first = train.cli([str(b)])
    name = config.group_name(train.parse_cli([str(b)])[0])
    capsys.readouterr()
    train.cli([str(a), str(b), "--dry-run"])
    assert f"snapshots/{name}/ (finished: skipped)" in capsys.readouterr().out
    caplog.clear()
    with caplog.at_level("INFO", logger="saev_jax.train"):
        both = train.cli([str(a), str(b)])
    assert f"{name} is complete (3 SAEs" in caplog.text and both[2:] == first
