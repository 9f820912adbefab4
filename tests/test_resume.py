"""Never lose a sweep: a run killed (SIGKILL or SIGTERM) and started again ends with checkpoints
bit-identical to a run that was never stopped; finished groups are skipped; changed configs are
refused; a diverging SAE is marked and sinks nobody."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from .test_cli import D, shard_root  # noqa: F401 (fixture)


def sweep_text(shard_root: pathlib.Path, ckpt: pathlib.Path, lrs: str = "[3e-3, 1e-2]") -> str:
    return f"""
n_patches = 12000
sae_batch_size = 128
log_every = 10
save_every = 7
track = false
n_lr_warmup = 5
lr = {lrs}
ckpt_path = "{ckpt}"
n_workers = 1

[data]
shard_root = "{shard_root}"
layer = -1
n_random_samples = 512

[sae]
d_vit = {D}
exp_factor = [2, 4]
sparsity_coeff = 3e-3
n_reinit_samples = 300
"""


def start(sweep: pathlib.Path, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    return subprocess.Popen([sys.executable, "-m", "saev_jax.train", str(sweep), *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def checkpoints(ckpt: pathlib.Path) -> dict[tuple, tuple[bytes, dict]]:
    """(lr, exp_factor) -> (sae.safetensors bytes, metrics.json) of every finished checkpoint."""
    out = {}
    for dpath in ckpt.iterdir():
        if (dpath / "metrics.json").is_file():
            cfg = json.loads((dpath / "cfg.json").read_text())
            key = (cfg["lr"], cfg["sae"]["exp_factor"])
            out[key] = ((dpath / "sae.safetensors").read_bytes(), json.loads((dpath / "metrics.json").read_text()))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shard_root):
    tmp = tmp_path_factory.mktemp("whole")
    sweep = tmp / "sweep.toml"
    sweep.write_text(sweep_text(shard_root, tmp / "ckpt"))
    finish(start(sweep))
    return checkpoints(tmp / "ckpt")


def wait_for_snapshot(ckpt: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not list((ckpt / "snapshots").glob("*/snapshot-*")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def test_sigkill_then_the_same_command_gives_identical_checkpoints(tmp_path, shard_root, uninterrupted):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(sweep_text(shard_root, tmp_path / "ckpt"))
    proc = start(sweep)
    wait_for_snapshot(tmp_path / "ckpt", proc)
    time.sleep(np.random.default_rng().uniform(0, 0.3))  # Somewhere after the first snapshot.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, err = finish(start(sweep))
    if "is complete" not in err:  # The kill may land after the end; then there is nothing to resume.
        assert re.search(r"resuming group-1 from step \d+ \(snapshots/group-[0-9a-f]{8}\)", err)
    assert checkpoints(tmp_path / "ckpt") == uninterrupted


@pytest.mark.slow
def test_sigterm_snapshots_and_exits_nonzero_then_resumes(tmp_path, shard_root, uninterrupted):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(sweep_text(shard_root, tmp_path / "ckpt").replace("n_patches = 12000", "n_patches = 60000"))
    proc = start(sweep)
    wait_for_snapshot(tmp_path / "ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM at step" in err
    snaps = sorted((tmp_path / "ckpt" / "snapshots").glob("group-*/snapshot-*"))
    name = snaps[-1].parent.name  # config.group_name of the sweep's configs.
    assert 1 <= len(snaps) <= 2  # The last two are kept.
    step = int(snaps[-1].name.split("-")[1])
    _, err = finish(start(sweep))
    assert f"resuming group-1 from step {step} (snapshots/{name})" in err
    # Run again: the finished group is skipped with one line.
    _, err = finish(start(sweep))
    assert "group-1 is complete (4 SAEs" in err and "resuming" not in err


@pytest.mark.slow
def test_changed_configs_are_refused_unless_fresh(tmp_path, shard_root):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(sweep_text(shard_root, tmp_path / "ckpt"))
    finish(start(sweep))
    sweep.write_text(sweep_text(shard_root, tmp_path / "ckpt", lrs="[3e-3, 2e-2]"))
    proc = start(sweep)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "lr = 0.01 in the snapshot, 0.02 now" in last and "--fresh" in last
    _, err = finish(start(sweep, "--fresh"))
    assert len([d for d in (tmp_path / "ckpt").iterdir() if (d / "metrics.json").is_file()]) == 8


@pytest.mark.slow
def test_a_diverging_sae_is_marked_and_the_others_are_unchanged(tmp_path, shard_root, uninterrupted):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(sweep_text(shard_root, tmp_path / "ckpt", lrs="[3e-3, 1e-2, 1e30]"))
    proc = start(sweep)
    out, err = finish(proc)
    got = checkpoints(tmp_path / "ckpt")
    for key in ((1e30, 2), (1e30, 4)):
        metrics = got.pop(key)[1]
        assert metrics["diverged"] is True and metrics["diverged_step"] >= 0
    for key, (_params, metrics) in got.items():
        assert metrics["diverged"] is False and metrics["diverged_step"] is None
        # The same SAE as without the diverging config, to float32 rounding (its stack is wider).
        ref_params, ref_metrics = uninterrupted[key]
        for name in ("mse", "l0", "l1"):
            np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-4, err_msg=f"{key} {name}")
    assert "diverged" in out  # The summary table marks it.


@pytest.mark.slow
def test_killed_under_one_budget_resumes_under_another_with_the_stored_plan(tmp_path, shard_root, uninterrupted):
    """The plan is part of the snapshot: a resume where less memory is free reuses it (one round,
    `group-1`), whatever a new plan would be, and ends with the uninterrupted run's checkpoints."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(sweep_text(shard_root, tmp_path / "ckpt"))
    proc = start(sweep)
    wait_for_snapshot(tmp_path / "ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    small = ["--memory-budget-gib", "7e-4"]  # A new plan would split these 4 SAEs into 2 rounds.
    if proc.returncode == 0:  # The signal landed after the end: nothing to resume.
        pytest.skip("the run ended before SIGTERM")
    step = int(sorted((tmp_path / "ckpt" / "snapshots").glob("group-*/snapshot-*"))[-1].name.split("-")[1])
    _, err = finish(start(sweep, *small))
    assert f"resuming group-1 from step {step}" in err and "the plan of the run being resumed" in err
    assert "group-1-round" not in err and "round 1/" not in err
    got = checkpoints(tmp_path / "ckpt")
    assert got.keys() == uninterrupted.keys()
    for key, (_params, metrics) in got.items():
        for name in ("mse", "l0", "l1"):
            np.testing.assert_allclose(metrics[name], uninterrupted[key][1][name], rtol=1e-4, err_msg=f"{key} {name}")


@pytest.mark.slow
def test_a_resume_that_cannot_fit_the_stored_plan_says_what_to_do(tmp_path, shard_root, monkeypatch):
    """Killed under one plan, resumed where XLA says even chunk 1 of the stored round is over: one line, `--fresh`."""
    from saev_jax import config, train, training

    sweep = tmp_path / "sweep.toml"
    sweep.write_text(sweep_text(shard_root, tmp_path / "ckpt").replace("n_patches = 12000", "n_patches = 60000"))
    proc = start(sweep)
    wait_for_snapshot(tmp_path / "ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    compile_ = training.Layout.compile

    def no_room(self, preprocess=None):  # Less memory now: every chunk is over the limit.
        return dataclasses.replace(compile_(self, preprocess), peak_bytes=self.limit)

    monkeypatch.setattr(training.Layout, "compile", no_room)
    with pytest.raises(config.InputError, match=r"resuming group-1 needs .* usable now; .*--fresh"):
        train.cli([str(sweep), "--n-devices", "1"])
