"""wandb says one line per run, and training says it after the summary table.

wandb runs offline under a temporary WANDB_DIR, with its console output left on (no
WANDB_SILENT): whatever it would print reaches the captured stdout and stderr.
"""

import os
import pathlib
import re

import pytest
import wandb

from saev_jax import replay, synthetic, train, wandb_queue
from tests.test_wandb_queue import flush_wandb, make_cfgs, offline_runs

PROJECT = "saev-jax-quiet"


@pytest.fixture
def loud_wandb(tmp_path):
    """Offline wandb in `tmp_path`, not silenced by the environment."""
    with pytest.MonkeyPatch.context() as mp:
        wandb.teardown()  # wandb reads its environment once per setup: forget any earlier one.
        for key in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(key)
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_CONFIG_DIR": tmp_path / "config",
                           "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():  # fmt: skip
            mp.setenv(key, str(value))
        yield tmp_path
        wandb.teardown()


def wandb_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("wandb:")]


@pytest.mark.parametrize("defer", [False, True])
def test_finish_prints_nothing_and_reports_one_line_per_run(loud_wandb, capfd, defer):
    queue = loud_wandb / "queue"
    with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(3), "offline", [], queue, defer_replay=defer) as run:
        for step in range(4):
            run.log([{"loss": float(step + m)} for m in range(3)], step=step)
    synced = list(run.synced)
    if defer:
        # Only the live run finished; the journals wait, closed, for replay_finished.
        assert [s.id for s in synced] == [run.ids[0]]
        assert sorted(p.name for p in queue.glob("*.jsonl")) == sorted(f"{i}.queue.jsonl" for i in run.ids)
        synced += wandb_queue.replay_finished(queue, list(run.ids))[1:]
        assert not queue.exists()
    flush_wandb()
    captured = capfd.readouterr()
    assert wandb_lines(captured.out + captured.err) == []  # wandb itself said nothing
    assert [s.id for s in synced] == list(run.ids)
    for s in synced:
        assert (s.mode, s.n_steps) == ("offline", 4)
        assert s.line() == f"wandb: {s.id} (4 steps) saved offline; to sync: wandb sync {s.sync_dir}"
        assert pathlib.Path(s.sync_dir).is_dir()
        (offline,) = offline_runs(loud_wandb, s.id)
        assert sorted(offline.history) == [0, 1, 2, 3]  # every step reached wandb's files


def test_replay_of_a_finished_live_journal_reports_it_without_logging_again(loud_wandb):
    queue = loud_wandb / "queue"
    with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(2), "offline", [], queue, defer_replay=True) as run:
        run.log([{"loss": 1.0}, {"loss": 2.0}], step=0)
    assert replay.replay(queue) == list(run.ids)
    flush_wandb()
    assert len(offline_runs(loud_wandb, run.ids[0])) == 1  # the live run's own, no second one
    assert len(offline_runs(loud_wandb, run.ids[1])) == 1


@pytest.mark.slow
def test_training_prints_the_table_then_one_wandb_line_per_run(loud_wandb, capfd):
    root = loud_wandb / "shards"
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=8, n_features=16, k=2, n_imgs=32, n_patches_per_img=8, n_patches_per_shard=128)
    )
    sweep = loud_wandb / "sweep.toml"
    sweep.write_text(f"""
n_patches = 600
sae_batch_size = 64
log_every = 2
n_workers = 1
wandb_project = "{PROJECT}"
ckpt_path = "{loud_wandb / "ckpt"}"
[data]
shard_root = "{root}"
n_random_samples = 256
[sae]
exp_factor = 2
sparsity_coeff = [1e-3, 1e-2, 1e-1]
n_reinit_samples = 128
""")
    ids = train.cli([str(sweep)])
    flush_wandb()
    captured = capfd.readouterr()
    out = captured.out
    assert wandb_lines(captured.err) == []
    lines = wandb_lines(out)
    assert len(lines) == len(ids) == 3
    for run_id, line in zip(ids, lines):
        assert re.fullmatch(rf"wandb: {run_id} \(\d+ steps\) saved offline; to sync: wandb sync \S+", line)
    table_at = out.index("run_id")  # the summary table's header
    assert table_at < out.index(lines[0])
    assert not (loud_wandb / "ckpt" / "wandb-queue").exists()
