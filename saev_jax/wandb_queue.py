"""One live wandb run per group of SAEs, the others journaled to disk and replayed.

wandb keeps one run live per process, so (as in saev) the first config of a group logs
to a live run and the others' metrics are replayed into their own runs at `finish()`.
saev held that queue in memory and lost it when the process died. Here every run's
metrics are appended to a journal file under `queue_dpath` as they are logged — the
live run's too, because wandb's offline writer loses what it buffered when the process
is killed — so `python -m saev_jax.replay DIR` can replay what a killed run left.

Journal format: one file per run, `<queue_dpath>/<run id>.queue.jsonl`, UTF-8 JSON Lines,
each line flushed as it is written:

    {"format": "saev_jax.wandb_queue/1", "id": "...", "project": "...", "config": {...},
     "tags": [...], "mode": "online", "live": false, "group": "<live id>", "index": 1,
     "created": 1795705575.9, "pid": 4242, "host": "node7"}
    {"step": 0, "metrics": {"losses/mse": 0.5, "eval/freqs": {"_type": "table", ...}}}
    ...
    {"exit_code": 0}

The last line is written by `finish()`; a journal without it was left by a process that
died, and its run is replayed as failed (exit code 1). The live run's last line also says
where wandb put it (`{"exit_code": 0, "synced": {...}}`, `Synced`'s fields): replaying a
live journal with that line only reports the run, which logged every step itself. A torn last line (the process
died while writing it) is ignored. Metric values are JSON numbers (NaN and Infinity
written as Python's `json` writes them), strings, booleans, or tagged objects:
`{"_type": "table", "columns": [...], "data": [[...], ...]}`,
`{"_type": "histogram", "values": [...], "bins": [...]}`, and
`{"_type": "image", "path": "<run id>.media/000000.png", "caption": ...}`, the path
(relative to the journal's directory) of a copy of the image file made when it was logged.

The writing process holds an exclusive `flock` on each journal until `finish()`, and a
replay takes it first, so journals of a process that still runs are never replayed (and
deleted) under it: the replay refuses, naming the writer's pid and host.

wandb's own console output (its banner, the run history and summary, the sync advice: some
fifteen lines per run) is silenced; what a run ends as is one line, `Synced.line()`, which the
caller prints (`saev_jax.train`: after the summary table).

The mode: `resolve_mode` gives what the environment asks for (`WANDB_MODE`; wandb reads
its other variables, `WANDB_DIR` and so on, itself). When an online `wandb.init` fails
(no login, no network), the run falls back to offline files with one warning.
"""

import dataclasses
import fcntl
import json
import logging
import operator
import os
import pathlib
import secrets
import shutil
import socket
import string
import time

import numpy as np
import wandb

from . import config

logger = logging.getLogger(__name__)

FORMAT = "saev_jax.wandb_queue/1"
"""The `format` field of a journal's header line."""
SUFFIX = ".queue.jsonl"
"""A journal's file name is its run id followed by this."""

_ID_CHARS = string.ascii_lowercase + string.digits
INIT_TIMEOUT_S = 30.0
"""How long an online `wandb.init` may try to reach the server before falling back to offline."""


def make_id() -> str:
    """A fresh wandb run id: 8 random base-36 characters, as wandb makes them."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(8))


def resolve_mode(track: bool) -> str:
    """The wandb mode a run with `track` gets: "disabled" if not tracking, else what the environment says.

    `WANDB_MODE` (online, offline, disabled, or wandb's older names run and dryrun) and
    `WANDB_DISABLED` are respected; otherwise "online" (which falls back to offline at
    `wandb.init` if there is no login or no network). Raises config.InputError for an
    unknown `WANDB_MODE`.
    """
    if not track:
        return "disabled"
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    modes = {
        "": "online",
        "online": "online",
        "run": "online",
        "offline": "offline",
        "dryrun": "offline",
        "disabled": "disabled",
    }
    if env not in modes:
        raise config.InputError(f"WANDB_MODE = {env!r}: must be online, offline or disabled")
    return modes[env]


def init_run(*, mode: str, **kwargs) -> "wandb.sdk.wandb_run.Run":
    """`wandb.init(mode=mode, **kwargs)`; an online init that fails falls back to offline with one warning.

    An online init is given `INIT_TIMEOUT_S` to reach the server. wandb prints nothing
    (`silent`). Returns the run; its `settings.mode` says which mode it got.
    """
    settings = kwargs.pop("settings", None) or wandb.Settings()
    settings.silent = True  # Its banner, history and sync advice: `Synced.line()` says what matters.
    if mode != "online":
        return wandb.init(mode=mode, settings=settings, **kwargs)
    settings.init_timeout = INIT_TIMEOUT_S
    try:
        return wandb.init(mode="online", settings=settings, **kwargs)
    except Exception as err:  # UsageError (no login), CommError (no network), and what else init raises.
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        logger.warning(
            "wandb cannot log online (%s); logging to offline files instead (`wandb sync` them later).", first
        )
        wandb.teardown()  # A half-started online service must not serve the offline run.
        return wandb.init(mode="offline", settings=settings, **kwargs)


@dataclasses.dataclass(frozen=True)
class Synced:
    """Where one finished wandb run went."""

    id: str
    n_steps: int
    """How many logged steps the run holds."""
    mode: str
    """online or offline."""
    sync_dir: str | None
    """wandb's local directory of the run (for an offline run, what `wandb sync` takes)."""
    url: str | None
    """The run's page (online runs)."""

    def line(self) -> str:
        """One line: `wandb: synced <id> (<n> steps) <url>`, or for an offline run the command that syncs it."""
        if self.mode == "online":
            return f"wandb: synced {self.id} ({self.n_steps} steps){' ' + self.url if self.url else ''}"
        return f"wandb: {self.id} ({self.n_steps} steps) saved offline; to sync: wandb sync {self.sync_dir}"


def _synced(run, run_id: str, n_steps: int) -> dict[str, object]:
    """`Synced`'s fields for a wandb run (not finished yet)."""
    mode = "online" if run.settings.mode in ("online", "run") else "offline"
    url = run.url if mode == "online" else None  # An offline run's url warns.
    return {"id": run_id, "n_steps": n_steps, "mode": mode, "sync_dir": str(run.settings.sync_dir), "url": url}


class ParallelWandbRun:
    """Logs one group of configs to wandb: the first live, the rest journaled and replayed.

    `ids` holds one run id per config, fixed here, so checkpoint directories named by id
    are known before training starts. Unless `mode` is "disabled", every run's metrics
    are journaled under `queue_dpath` as they are logged (see the module docstring), so
    nothing is lost if the process dies before `finish()`. As a context manager, leaving
    the block calls `finish()` — with exit code 1 if the block raised, whose exception
    then propagates — or `suspend()` if it raised SystemExit or KeyboardInterrupt (a
    stopped job, to be resumed).

    Args:
        project: The wandb project of every run.
        cfgs: One config per run, attached to it; the first one's run is live.
        mode: wandb's mode ("online", "offline" or "disabled", see `resolve_mode`); online
            falls back to offline if wandb cannot log online; disabled writes no journal.
        tags: Tags of every run (empty strings dropped); queued runs also get "queued".
        queue_dpath: Where the journals go; created when needed, removed by `finish()` if left empty.
        resume: To continue runs a killed process left: their ids, in config order, each with
            its journal's byte position at the snapshot resumed from (`positions()` then).
            The live run resumes in wandb; the journals are cut back to those positions.
        defer_replay: `finish()` closes the journals but replays nothing: `replay_finished` does,
            later (training replays every group's runs after its summary table).

    After `finish()`, `synced` holds one `Synced` per run it finished (the live one first; with
    `defer_replay`, only the live one).
    """

    def __init__(
        self,
        project: str,
        cfgs: list[config.Train],
        mode: str,
        tags: list[str],
        queue_dpath: pathlib.Path,
        *,
        resume: dict[str, int] | None = None,
        defer_replay: bool = False,
    ):
        if not cfgs:
            raise ValueError("ParallelWandbRun needs at least one config")
        if resume is not None and len(resume) != len(cfgs):
            raise ValueError(f"resume has {len(resume)} run ids for {len(cfgs)} configs")
        self.project = project
        # wandb rejects empty tags, and `Train.tag` is "" by default.
        self.tags = [tag for tag in tags if tag]
        self.queue_dpath = pathlib.Path(queue_dpath)
        self.ids: tuple[str, ...] = tuple(resume) if resume else tuple(make_id() for _ in cfgs)
        self._finished = False
        self.defer_replay = defer_replay
        self.synced: list[Synced] = []
        self._live_run = init_run(
            project=project, id=self.ids[0], config=config.to_dict(cfgs[0]), mode=mode, tags=self.tags,
            resume="allow" if resume else None,
        )  # fmt: skip
        got = self._live_run.settings.mode
        self.mode = "disabled" if mode == "disabled" else {"dryrun": "offline", "run": "online"}.get(got, got)
        self._journals: list[_Journal] = []
        if self.mode == "disabled":
            return
        created = time.time()
        try:
            for index, (run_id, cfg) in enumerate(zip(self.ids, cfgs)):
                header = {
                    "format": FORMAT, "id": run_id, "project": project, "config": config.to_dict(cfg),
                    "tags": self.tags, "mode": self.mode, "live": index == 0, "group": self.ids[0],
                    "index": index, "created": created, "pid": os.getpid(), "host": socket.gethostname(),
                }  # fmt: skip
                position = resume.get(run_id) if resume else None
                self._journals.append(_Journal(self.queue_dpath / f"{run_id}{SUFFIX}", header, position))
        except BaseException:
            for journal in self._journals:
                journal.release()
            self._live_run.finish(exit_code=1)
            raise

    def positions(self) -> dict[str, int]:
        """Run id -> bytes of its journal written so far (0 without journals): what `resume` takes back."""
        if not self._journals:
            return {run_id: 0 for run_id in self.ids}
        return {run_id: j.position() for run_id, j in zip(self.ids, self._journals)}

    def log(self, metrics: list[dict[str, object]], *, step: int) -> None:
        """Logs `metrics[i]` for config i at `step`: live for the first, journaled for all.

        Values may be Python or NumPy scalars (numbers, booleans, strings), `wandb.Table`,
        `wandb.Histogram`, or `wandb.Image` backed by a local file (the file is copied
        into the queue directory). Anything else raises TypeError before anything of
        this call is logged.
        """
        if self._finished:
            raise RuntimeError("ParallelWandbRun.log() called after finish()")
        if len(metrics) != len(self.ids):
            raise ValueError(f"log() got {len(metrics)} metric dicts for {len(self.ids)} configs")
        step = operator.index(step)
        if self._journals:
            entries = [_encode_metrics(m, j.copy_media, i) for i, (j, m) in enumerate(zip(self._journals, metrics))]
            for journal, entry in zip(self._journals, entries):
                journal.write({"step": step, "metrics": entry})
        else:
            # Disabled: nothing is written, but bad values fail just the same.
            for i, m in enumerate(metrics):
                _encode_metrics(m, None, i)
        self._live_run.log(dict(metrics[0]), step=step)

    def suspend(self) -> list[str]:
        """Stops logging to be resumed later (after SIGTERM, say); returns every id.

        The live run finishes with exit code 1 (a later `resume` continues it); the
        journals stay on disk, unfinished and unlocked, for a process given `positions()` as `resume`
        (or for `python -m saev_jax.replay`). Nothing is replayed. Afterwards `finish()`
        and leaving the with-block do nothing.
        """
        if not self._finished:
            self._finished = True
            for journal in self._journals:
                journal.release()
            self._live_run.finish(exit_code=1)
        return list(self.ids)

    def finish(self, exit_code: int = 0) -> list[str]:
        """Finishes the live run, replays the others into their own runs; returns every id.

        Ids come in config order, the live run's first. The queued runs get their own
        config, the tags plus "queued", and `exit_code`. Each journal is removed once
        its run has finished (with `defer_replay`, all stay, closed, for `replay_finished`).
        Calling `finish()` again does nothing and returns the ids.
        """
        if self._finished:
            return list(self.ids)
        self._finished = True
        if self._journals:
            live, *queued = self._journals
            synced = _synced(self._live_run, self.ids[0], live.n_steps)
            live.close(exit_code, synced)
            for journal in queued:
                journal.close(exit_code)
        self._live_run.finish(exit_code=exit_code)
        if self._journals:
            self.synced.append(Synced(**synced))
            if self.defer_replay:
                return list(self.ids)
            remove_journal(live.fpath)
            try:
                for journal in queued:
                    self.synced.append(replay_file(journal.fpath))
            except BaseException:
                logger.error(
                    "Replaying the queued wandb runs failed; replay what is left with `python -m saev_jax.replay %s`.",
                    self.queue_dpath,
                )
                raise
            try:
                self.queue_dpath.rmdir()  # Only when empty: a killed run may have left journals.
            except OSError:
                pass
        return list(self.ids)

    def __enter__(self) -> "ParallelWandbRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish()
            return False
        if issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.suspend()  # Stopped (SIGINT, SIGTERM), not failed: the resume continues these runs.
            return False
        try:
            self.finish(exit_code=1)
        except Exception:
            # The body's exception matters more; what was not replayed stays on disk.
            logger.exception("Could not finish the wandb runs of a failed training.")
        return False


class _Journal:
    """Appends one run's lines to its journal file, flushing each; holds its lock until closed."""

    def __init__(self, fpath: pathlib.Path, header: dict[str, object], position: int | None = None):
        """A new journal starting with `header`; or, given `position`, the existing one cut back to it.

        Cutting back drops what was logged after a snapshot that a resumed run starts from
        again. A journal that is gone (replayed meanwhile) starts anew.
        """
        fpath.parent.mkdir(parents=True, exist_ok=True)
        self.fpath = fpath
        self.n_steps = 0  # Step lines in the file (those of a resumed run's earlier process too).
        media_dpath = get_media_dpath(fpath)
        self._n_media = len(list(media_dpath.iterdir())) if media_dpath.is_dir() else 0
        if position is not None and fpath.is_file() and fpath.stat().st_size >= position > 0:
            self._fd = open(fpath, "r+", encoding="utf-8")
            self._lock()
            self._fd.truncate(position)
            self._fd.seek(position)
            kept = read_journal(fpath)
            self.n_steps = len(kept.steps) if kept is not None else 0
            return
        self._fd = open(fpath, "x", encoding="utf-8")
        self._lock()
        self.write(header)

    def _lock(self) -> None:
        try:
            lock(self._fd, self.fpath)
        except BaseException:
            self._fd.close()
            raise

    def position(self) -> int:
        """Bytes written so far (all flushed)."""
        return self._fd.tell()

    def write(self, obj: dict[str, object]) -> None:
        self.n_steps += "step" in obj
        self._fd.write(json.dumps(obj, separators=(",", ":")) + "\n")
        # Flushed to the OS: survives the process dying (not the machine losing power).
        self._fd.flush()

    def copy_media(self, src: str) -> str:
        """Copies a media file beside the journal; returns its path relative to the journal's directory."""
        media_dpath = get_media_dpath(self.fpath)
        media_dpath.mkdir(exist_ok=True)
        dst = media_dpath / f"{self._n_media:06d}{pathlib.Path(src).suffix}"
        self._n_media += 1
        shutil.copyfile(src, dst)
        return dst.relative_to(self.fpath.parent).as_posix()

    def close(self, exit_code: int, synced: dict[str, object] | None = None) -> None:
        """Writes the exit line (the live run's with `_synced`'s fields) and closes the file."""
        self.write({"exit_code": exit_code} | ({"synced": synced} if synced else {}))
        self._fd.close()

    def release(self) -> None:
        """Closes the file (and so its lock) without an exit line."""
        self._fd.close()


def lock(fd, fpath: pathlib.Path) -> None:
    """Takes the exclusive lock on an open journal; config.InputError naming its writer if another process holds it."""
    try:
        fcntl.flock(fd.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fd.seek(0)
        try:
            header = json.loads(fd.readline())
            who = f"pid {header['pid']} on {header['host']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise config.InputError(
            f"{fpath}: still being written by {who}; replay it after that process has ended"
        ) from None


def get_media_dpath(fpath: pathlib.Path) -> pathlib.Path:
    """The directory holding copies of the media files a journal refers to."""
    return fpath.with_name(fpath.name.removesuffix(SUFFIX) + ".media")


def remove_journal(fpath: pathlib.Path) -> None:
    """Deletes a journal and its media directory."""
    shutil.rmtree(get_media_dpath(fpath), ignore_errors=True)
    fpath.unlink(missing_ok=True)


def _encode_metrics(metrics: dict[str, object], copy_media, i: int) -> dict[str, object]:
    encoded = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"config {i}: metric names must be strings, got {key!r}")
        encoded[key] = encode(value, copy_media, where=f"config {i}, metric {key!r}")
    return encoded


_SUPPORTED = "numbers, booleans, strings, wandb.Table, wandb.Histogram or wandb.Image of a local file"


def encode(value: object, copy_media, *, where: str) -> object:
    """A metric value as JSON data that `decode` turns back into an equal value.

    `copy_media(path) -> str` copies an image file and returns the path to record;
    None records the source path as it is. Raises TypeError naming `where` for any
    value that is not one of the supported kinds.
    """
    if isinstance(value, wandb.Table):
        data = [[_encode_scalar(cell, where, allow_none=True) for cell in row] for row in value.data]
        return {"_type": "table", "columns": list(value.columns), "data": data}
    if isinstance(value, wandb.Histogram):
        return {"_type": "histogram", "values": list(value.histogram), "bins": list(value.bins)}
    if isinstance(value, wandb.Image):
        path = getattr(value, "_path", None)
        if not path or wandb.Image.path_is_reference(path) or not pathlib.Path(path).is_file():
            raise TypeError(f"{where}: a wandb.Image must be backed by a local file to be queued")
        if value._boxes or value._masks or value._classes:
            raise TypeError(f"{where}: a wandb.Image with boxes, masks or classes cannot be queued")
        return {"_type": "image", "path": copy_media(path) if copy_media else path, "caption": value._caption}
    return _encode_scalar(value, where)


def _encode_scalar(value: object, where: str, *, allow_none: bool = False) -> object:
    if isinstance(value, (bool, int, float, str)) or (allow_none and value is None):
        return value
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0 and value.dtype.kind in "biufU":
        return value.item()
    raise TypeError(
        f"{where}: cannot log a {type(value).__module__}.{type(value).__qualname__}; log {_SUPPORTED}"
        " (move arrays to the host with jax.device_get and log one scalar per metric)"
    )


def decode(value: object, dpath: pathlib.Path) -> object:
    """The wandb value that `encode` recorded; media paths are relative to `dpath`."""
    if not isinstance(value, dict):
        return value
    kind = value.get("_type")
    if kind == "table":
        return wandb.Table(columns=value["columns"], data=value["data"])
    if kind == "histogram":
        return wandb.Histogram(np_histogram=(value["values"], value["bins"]))
    if kind == "image":
        return wandb.Image(str(dpath / value["path"]), caption=value["caption"])
    raise ValueError(f"unknown queued value type {kind!r}")


@dataclasses.dataclass(frozen=True)
class Journal:
    """What one journal file holds."""

    fpath: pathlib.Path
    header: dict[str, object]
    """The header line: id, project, config, tags, mode, live, group, index, created."""
    steps: list[tuple[int, dict[str, object]]]
    """(step, encoded metrics) of every complete log line, in the order logged."""
    exit_code: int | None
    """What `finish()` recorded; None if the process died first."""
    synced: dict[str, object] | None = None
    """For a live run that finished: `Synced`'s fields, written by `finish()` (it logged every step itself)."""


def read_journal(fpath: pathlib.Path) -> Journal | None:
    """Parses a journal; None if it has no complete header (its process died while creating it).

    A torn last line is ignored with a warning; any other unreadable line raises
    config.InputError naming the file and line.
    """
    lines = pathlib.Path(fpath).read_text(encoding="utf-8").split("\n")
    objs = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            objs.append(json.loads(line))
        except json.JSONDecodeError:
            if any(lines[i + 1 :]):
                raise config.InputError(f"{fpath}:{i + 1}: corrupt line in a wandb queue") from None
            logger.warning("%s:%d: ignoring a torn last line (the process died while writing it).", fpath, i + 1)
    if not objs:
        return None
    header, *rest = objs
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise config.InputError(f"{fpath}: not a saev_jax wandb queue (no '{FORMAT}' header)")
    steps, exit_code, synced = [], None, None
    for obj in rest:
        try:
            if "exit_code" in obj:
                exit_code = int(obj["exit_code"])
                synced = dict(obj["synced"]) if "synced" in obj else None
            else:
                steps.append((int(obj["step"]), dict(obj["metrics"])))
        except (KeyError, TypeError, ValueError):
            raise config.InputError(f"{fpath}: corrupt line in a wandb queue: {json.dumps(obj)[:80]}") from None
    return Journal(pathlib.Path(fpath), header, steps, exit_code, synced)


def replay_file(fpath: pathlib.Path) -> "Synced | None":
    """Replays one journal into its wandb run, then deletes the journal; returns where the run went.

    The run gets the recorded id, project, config, mode and tags (plus "queued" unless
    it was the live run), every recorded step in order, and the recorded exit code (1
    if the process died before `finish()`). It is resumed if it exists already (a live
    run, or a replay cut short), so steps wandb already has are not logged twice. A live
    run that finished (its exit line says where it went) logged every step itself: its
    journal is deleted and the run reported, not replayed. A journal with no complete
    header holds no metrics: it is deleted and None returned. If replaying fails, the
    journal stays on disk. wandb prints nothing.
    """
    with open(fpath, encoding="utf-8") as fd:
        lock(fd, pathlib.Path(fpath))  # Held until the journal is removed: no writer, no second replay.
        journal = read_journal(fpath)
        if journal is None:
            logger.warning("%s: no complete header, so no metrics; removing it.", fpath)
            remove_journal(pathlib.Path(fpath))
            return None
        h = journal.header
        if h["live"] and journal.synced is not None:
            remove_journal(journal.fpath)
            return Synced(**journal.synced)
        run = init_run(
            project=h["project"], id=h["id"], config=h["config"], mode=h["mode"],
            tags=list(h["tags"]) + ([] if h["live"] else ["queued"]), resume="allow",
            # System metrics and console output of the replaying process would describe nothing of the run.
            settings=wandb.Settings(x_disable_stats=True, console="off"),
        )  # fmt: skip
        try:
            for step, metrics in journal.steps:
                run.log({key: decode(value, journal.fpath.parent) for key, value in metrics.items()}, step=step)
        except BaseException:
            run.finish(exit_code=1)
            raise
        synced = Synced(**_synced(run, h["id"], len(journal.steps)))
        run.finish(exit_code=1 if journal.exit_code is None else journal.exit_code)
        remove_journal(journal.fpath)
    return synced


def replay_finished(queue_dpath: pathlib.Path, ids: list[str]) -> list[Synced]:
    """Replays the journals of the runs `ids` that are in `queue_dpath` (left there by `defer_replay`);
    returns one `Synced` per run replayed or reported, in the order of `ids`.

    Runs whose journal is gone (replayed already) are skipped; other journals are not touched.
    The directory is removed if that leaves it empty.
    """
    queue_dpath = pathlib.Path(queue_dpath)
    out = []
    for run_id in ids:
        fpath = queue_dpath / f"{run_id}{SUFFIX}"
        if fpath.is_file() and (synced := replay_file(fpath)) is not None:
            out.append(synced)
    try:
        queue_dpath.rmdir()  # Only when empty.
    except OSError:
        pass
    return out
