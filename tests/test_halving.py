"""prune = "halving" in training (issue 19): the worst SAEs of each tier stop at the rungs, are written and
evaluated like the others with `stopped_at_step`, the rest train on in a repacked layout, and a resume
across a rung is bit-identical to a run that was never stopped."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from saev_jax import config, rows, summary, synthetic, train, training

D = 8
LRS = (0.0, 3e-4, 1e-2)
"""Per tier, an order the rungs cannot miss: lr 0 never learns, 3e-4 barely, 1e-2 fast."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("shards")
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=24, k=2, n_imgs=64, n_patches_per_img=8, n_patches_per_shard=256)
    )
    return root


def sweep_text(shards: pathlib.Path, ckpt: pathlib.Path, extra: str = "", sae_extra: str = "target_l0 = [2, 4]") -> str:
    return f"""
n_patches = 3200
sae_batch_size = 64
log_every = 5
save_every = 5
track = false
n_lr_warmup = 3
lr = {list(LRS)}
ckpt_path = "{ckpt}"
n_workers = 1
prune = "halving"
{extra}

[data]
shard_root = "{shards}"
layer = -1
n_random_samples = 256

[sae]
d_vit = {D}
exp_factor = 4
n_reinit_samples = 100
{sae_extra}
"""


def checkpoints(ckpt: pathlib.Path) -> dict[tuple, tuple[bytes, dict]]:
    """(kind, lr, target_l0 or k) -> (sae.safetensors bytes, metrics.json) of every finished checkpoint."""
    out = {}
    for dpath in ckpt.iterdir():
        if (dpath / "metrics.json").is_file():
            cfg = json.loads((dpath / "cfg.json").read_text())
            sae = cfg["sae"]
            key = (sae["kind"], cfg["lr"], sae["target_l0"] if sae["kind"] == "relu" else sae["k"])
            out[key] = ((dpath / "sae.safetensors").read_bytes(), json.loads((dpath / "metrics.json").read_text()))
    return out


def run_sweep(tmp: pathlib.Path, shards: pathlib.Path) -> list[str]:
    sweep = tmp / "sweep.toml"
    sweep.write_text(sweep_text(shards, tmp / "ckpt"))
    return train.cli([str(sweep)])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards):
    tmp = tmp_path_factory.mktemp("whole")
    handler = _Lines()
    logging.getLogger("saev_jax.training").addHandler(handler)
    logging.getLogger("saev_jax.training").setLevel(logging.INFO)
    try:
        ids = run_sweep(tmp, shards)
    finally:
        logging.getLogger("saev_jax.training").removeHandler(handler)
    return ids, checkpoints(tmp / "ckpt"), handler.lines


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_halving_stops_exactly_the_worst_of_each_tier_and_writes_every_checkpoint(uninterrupted):
    ids, got, lines = uninterrupted
    assert len(ids) == len(got) == 6  # 3 learning rates x 2 targets: every checkpoint finished.
    # 51 steps, rungs at 0.25 and 0.5: after steps 12 and 25. Each tier (target) has 3 SAEs: the first rung
    # keeps ceil(1.5) = 2 and stops lr 0; the second keeps 1 of 2 and stops lr 3e-4.
    expected = {0.0: 12, 3e-4: 25, 1e-2: None}
    for (kind, lr, target), (_params, metrics) in got.items():
        assert kind == "relu" and target in (2.0, 4.0)
        assert metrics.get("stopped_at_step") == expected[lr], (lr, target, metrics.get("stopped_at_step"))
        assert np.isfinite(metrics["mse"]) and metrics["diverged"] is False
    rung_lines = [line for line in lines if line.startswith("rung ")]
    assert len(rung_lines) == 2, lines
    assert rung_lines[0].startswith("rung 1/2 at step 12: stopping 2 of 6 SAEs: ")
    assert rung_lines[1].startswith("rung 2/2 at step 25: stopping 2 of 4 SAEs: ")
    assert all("ranks 3 of 3 in tier relu 32 " in part for part in rung_lines[0].split(": ", 1)[1].split("; "))
    assert all("ranks 2 of 2 in tier relu 32 " in part for part in rung_lines[1].split(": ", 1)[1].split("; "))


KILLED_AT = """
import os, sys
from saev_jax import train, training
save = training.Snapshots.save

def save_then_die(self, state, run, progress):
    save(self, state, run, progress)
    if int(training.to_host(state.step)) == int(os.environ["KILL_AT"]):
        os._exit(9)  # As SIGKILL: nothing after the snapshot runs.

training.Snapshots.save = save_then_die
train.cli(sys.argv[1:])
"""


MAIN = "import runpy, sys; sys.argv[0] = 'train'; runpy.run_module('saev_jax.train', run_name='__main__')"
"""`python -m saev_jax.train ARGS` (with its logging)."""


def run_process(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled",
               PYTHONPATH=str(pathlib.Path(__file__).parent.parent), **env)  # fmt: skip
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_resume_across_a_rung_is_bit_identical(tmp_path, shards, uninterrupted):
    """Killed right after the snapshot of step 15 (after rung 1, in the repacked layout), then the same command again."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(sweep_text(shards, tmp_path / "ckpt"))
    killed = run_process(KILLED_AT, str(sweep), KILL_AT="15", JAX_NUM_CPU_DEVICES="4")
    assert killed.returncode == 9, killed.stderr[-3000:]
    meta = json.loads(next((tmp_path / "ckpt" / "snapshots").glob("*/snapshot-*15/meta.json")).read_text())
    assert len(meta["progress"]["alive"]) == 4 and meta["progress"]["round"] is not None
    resumed = run_process(MAIN, str(sweep), JAX_NUM_CPU_DEVICES="4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming group-1 from step 15" in resumed.stderr
    got, ref = checkpoints(tmp_path / "ckpt"), uninterrupted[1]
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key][0] == ref[key][0], f"{key}: parameters differ"
        assert got[key][1] == ref[key][1], f"{key}: metrics.json differs"


def test_running_metrics_are_a_debiased_ema_that_skips_stopped_and_diverged_saes():
    progress = training.Progress.fresh(3)
    steps = [
        [{"mse": 1.0, "l0": 4.0, "diverged": False}, {"mse": 2.0, "l0": 8.0, "diverged": False}, None],
        [{"mse": 3.0, "l0": 6.0, "diverged": False}, {"mse": 9.0, "l0": 9.0, "diverged": True}, None],
    ]
    for metrics in steps:
        progress.observe(metrics)
    d = training.RUNNING_DECAY
    # SAE 0: two observations, EMA debiased by its weight.
    want0 = (d * (1 - d) * 1.0 + (1 - d) * 3.0) / (d * (1 - d) + (1 - d))
    np.testing.assert_allclose(progress.mean("mse")[0], want0, rtol=1e-12)
    np.testing.assert_allclose(progress.mean("l0")[0], (d * (1 - d) * 4.0 + (1 - d) * 6.0) / (d * (1 - d) + (1 - d)))
    # SAE 1: its diverged step does not count; SAE 2 was never seen.
    assert progress.mean("mse")[1] == 2.0 and progress.mean("l0")[1] == 8.0
    assert np.isnan(progress.mean("mse")[2])
    # JSON round trip (the snapshot meta) is exact.
    back = training.Progress.from_json(json.loads(json.dumps(progress.to_json())))
    assert back.to_json()["running"]["mse"][:2] == progress.running["mse"][:2]


def test_rung_steps():
    cfg = config.Train(prune="halving", n_patches=6400, sae_batch_size=64, prune_rungs=(0.25, 0.5))
    assert training.rung_steps(cfg) == [25, 50]
    assert training.rung_steps(config.Train(n_patches=6400, sae_batch_size=64)) == []
    tiny = config.Train(prune="halving", n_patches=256, sae_batch_size=64, prune_rungs=(0.1, 0.2, 0.6))
    assert training.rung_steps(tiny) == [1, 3]  # 5 steps: 0.1 and 0.2 both give step 1 (0 and 1; at least 1).


def test_a_stopped_sae_is_never_best():
    cfg = config.Train()
    good = {"mse": 0.1, "l0": 5.0, "quality": 3.0, "quality_stderr": 0.0, "fvu": 0.1}
    table = [rows.make_row("a", cfg, good | {"stopped_at_step": 10}), rows.make_row("b", cfg, good | {"quality": 1.0})]
    assert table[0]["stopped_at_step"] == 10 and table[1]["stopped_at_step"] == ""
    assert rows.best(table) == [1]
    text = summary.format_table(table) + "\n" + summary.legend(table)
    header = text.splitlines()[0].split()
    assert header[-2:] == ["stopped", "note"]
    assert text.splitlines()[2].split()[-1] == "10"  # Row "a": stopped at step 10, no note.
    assert "stopped: the step at which prune = halving stopped" in text
    # Without a stopped SAE the table is as before.
    assert "stopped" not in summary.format_table(table[1:]).splitlines()[0]


SLOW_DEVICES = """
import json, pathlib, sys
from saev_jax import train
ids = train.cli(sys.argv[1:])
print(json.dumps(ids))
"""


@pytest.mark.slow
@pytest.mark.parametrize("n_devices", [2, 4])
def test_several_devices_chunks_mixed_kinds_and_divergence(tmp_path, shards, n_devices):
    """One group of ReLU (with targets, one diverging) and TopK SAEs on several CPU devices, one SAE at a time:
    every checkpoint finished; one SAE per tier stops at each rung; the diverged SAE is marked, not stopped."""
    relu = tmp_path / "relu.toml"
    relu.write_text(sweep_text(shards, tmp_path / "ckpt", extra="sae_chunk = 1").replace(
        f"lr = {list(LRS)}", f"lr = {list(LRS) + [1e30]}"))  # fmt: skip
    topk = tmp_path / "topk.toml"
    topk.write_text(sweep_text(shards, tmp_path / "ckpt", extra="sae_chunk = 1", sae_extra='kind = "topk"\nk = 4'))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n_devices), WANDB_MODE="disabled",
               PYTHONPATH=str(pathlib.Path(__file__).parent.parent))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SLOW_DEVICES, str(relu), str(topk)], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = checkpoints(tmp_path / "ckpt")
    assert len(got) == 4 * 2 + 3  # ReLU: 4 learning rates x 2 targets; TopK: 3 learning rates.
    tiers: dict[tuple, list] = {}
    for (kind, lr, target), (_params, metrics) in got.items():
        if lr == 1e30:
            assert metrics["diverged"] is True and "stopped_at_step" not in metrics
            continue
        assert metrics["diverged"] is False and np.isfinite(metrics["mse"])
        tiers.setdefault((kind, target), []).append((metrics.get("stopped_at_step"), lr))
    assert len(tiers) == 3
    for tier, stops in tiers.items():
        # Each tier of 3: one stops at each rung; the fastest learner goes on to the end.
        assert sorted(stops, key=lambda s: (s[0] is None, s[0]))[2] == (None, 1e-2), (tier, stops)
        assert sorted(s for s, _ in stops if s is not None) == [12, 25], (tier, stops)
