"""Replays the wandb queues a killed training run left behind.

    python -m saev_jax.replay DIR

DIR is a ParallelWandbRun's `queue_dpath` (`saev_jax.train` uses `<ckpt_path>/wandb-queue`).
Every journal in it is replayed into a wandb run with its recorded id, config, mode and
tags (plus "queued" for the runs that were not live), then deleted; a live run that finished
logged its steps itself and is not replayed again. The ids are printed, one a line; wandb
prints nothing. Replaying is what `ParallelWandbRun.finish()` does too, and what training does
after its summary table (`wandb_queue.replay_file`, `replay_finished`).

Journals that a running process is still writing (it holds their lock) are not touched:
the replay refuses before replaying anything, naming that process.
"""

import json
import logging
import math
import pathlib
import sys
from typing import Annotated

import tyro

from . import config, wandb_queue


def find_journals(dpath: pathlib.Path) -> list[pathlib.Path]:
    """The journals in `dpath`, oldest group first, each group's live run first."""

    def order(fpath: pathlib.Path) -> tuple[float, str, int]:
        with open(fpath, encoding="utf-8") as fd:
            line = fd.readline()
        try:
            header = json.loads(line)
            return float(header["created"]), str(header["group"]), int(header["index"])
        except (ValueError, KeyError, TypeError):
            return math.inf, fpath.name, 0  # A torn or foreign header: replay_file reports it.

    return sorted(pathlib.Path(dpath).glob(f"*{wandb_queue.SUFFIX}"), key=order)


def replay(dpath: pathlib.Path) -> list[str]:
    """Replays every journal in `dpath` (see `wandb_queue.replay_file`); returns the run ids.

    Raises config.InputError if `dpath` is not a directory, holds no journal, or holds a
    journal that a running process is still writing (then nothing is replayed).
    """
    dpath = pathlib.Path(dpath)
    if not dpath.is_dir():
        raise config.InputError(f"{dpath}: no such directory")
    fpaths = find_journals(dpath)
    if not fpaths:
        raise config.InputError(f"{dpath}: no wandb queue files (*{wandb_queue.SUFFIX}) to replay")
    for fpath in fpaths:
        with open(fpath, encoding="utf-8") as fd:
            wandb_queue.lock(fd, fpath)  # Released at once; replay_file takes it again.
    synced = [wandb_queue.replay_file(fpath) for fpath in fpaths]
    return [s.id for s in synced if s is not None]


def main(dpath: Annotated[pathlib.Path, tyro.conf.Positional]) -> list[str]:
    """Replays the wandb queues a killed `saev_jax.train` left in a directory (its `<ckpt_path>/wandb-queue`).

    Args:
        dpath: The queue directory.
    """
    return replay(dpath)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        run_ids = tyro.cli(main, prog="python -m saev_jax.replay")
    except config.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(run_ids))
