"""The parallel wandb queue: what reaches wandb's offline files, and what survives a crash.

wandb only ever runs offline (or disabled) here, under a temporary WANDB_DIR, and the
tests read back the offline transaction logs (`run-<id>.wandb`) that wandb writes.
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from saev_jax import config, replay, wandb_queue

PROJECT = "saev-jax-test"


# --- Reading wandb's offline transaction log ----------------------------------------
#
# wandb 0.31 writes `run-<id>.wandb` from its Go core and no longer ships a Python reader
# (the old `wandb.sdk.internal.datastore`). The format is LevelDB's log format: a 7-byte
# file header (b":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with
# a 7-byte header (CRC-32 of the type byte and the data, length, type: 1 full, 2 first,
# 3 middle, 4 last); fewer than 7 bytes left in a block are zero padding. Each record is
# a `wandb_internal_pb2.Record`.

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(fpath: pathlib.Path) -> list[wandb_internal_pb2.Record]:
    """Every complete record of a `.wandb` file, checksums verified."""
    raw = fpath.read_bytes()
    assert struct.unpack("<4sHB", raw[:7]) == (b":W&B", 0xBEE1, 0), f"{fpath}: not a wandb transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        if _BLOCK - pos % _BLOCK < 7:
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:  # zeros to the end of the block
            pos += _BLOCK - pos % _BLOCK
            continue
        data = raw[pos + 7 : pos + 7 + length]
        if len(data) < length:
            break  # a chunk cut short by a killed writer
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"{fpath}: bad checksum at byte {pos}"
        pos += 7 + length
        pending = data if kind in (_FULL, _FIRST) else pending + data
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@dataclasses.dataclass
class OfflineRun:
    """What one offline `.wandb` file says about its run."""

    fpath: pathlib.Path
    run_id: str | None
    project: str | None
    config: dict[str, object]
    tags: list[str]
    history: dict[int, dict[str, object]]
    """User keys (not `_step`, `_runtime`, ...) by step; nested keys as nested dicts."""
    exit_code: int | None

    @property
    def files_dpath(self) -> pathlib.Path:
        return self.fpath.parent / "files"


def read_offline_run(fpath: pathlib.Path) -> OfflineRun:
    run = OfflineRun(fpath, None, None, {}, [], {}, None)
    for record in read_records(fpath):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.tags = record.run.run_id, record.run.project, list(record.run.tags)
            run.config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            row = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                node = row
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = json.loads(item.value_json)
            step = row["_step"]
            run.history.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(wandb_root: pathlib.Path, run_id: str) -> list[OfflineRun]:
    """Every offline run directory wandb made for `run_id`, oldest first."""
    fpaths = sorted(wandb_root.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"), key=os.path.getmtime)
    return [read_offline_run(fpath) for fpath in fpaths]


def flush_wandb() -> None:
    """Waits until wandb has written every finished run's offline file.

    `run.finish()` returns before wandb-core closes the run's stream, and in offline mode
    it writes the `.wandb` file only then (a millisecond or so later); `wandb.teardown()`
    waits for every stream. The next `wandb.init` starts wandb again with the same environment.
    """
    wandb.teardown()


def only_offline_run(wandb_root: pathlib.Path, run_id: str) -> OfflineRun:
    (run,) = offline_runs(wandb_root, run_id)
    return run


# --- Fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory):
    """An offline, silent wandb under a temporary directory, for this module only."""
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        wandb.teardown()  # wandb reads its environment once per setup: forget any earlier one.
        for key in [k for k in os.environ if k.startswith("WANDB_")]:
            mp.delenv(key)
        env = {
            "WANDB_MODE": "offline", "WANDB_DIR": root, "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
            "WANDB_CONFIG_DIR": root / "config", "WANDB_CACHE_DIR": root / "cache", "WANDB_DATA_DIR": root / "data",
        }  # fmt: skip
        for key, value in env.items():
            mp.setenv(key, str(value))
        yield root
        wandb.teardown()


def subprocess_env() -> dict[str, str]:
    """This process's environment without its wandb service, so a child starts its own."""
    env = dict(os.environ)
    env.pop("WANDB_SERVICE", None)
    return env


def make_cfgs(n: int) -> list[config.Train]:
    return [config.Train(lr=1e-4 * (i + 1), sae=config.SparseAutoencoder(seed=i)) for i in range(n)]


def scalars(m: int, step: int) -> dict[str, object]:
    """Config m's metrics at a step: a NumPy float, a Python float and int, a string."""
    return {
        "losses/loss": np.float32(step + m / 4),
        "metrics/l0": step * 10.0 + m,
        "progress/n_patches_seen": (step + 1) * 1024,
        "note": f"sae {m}",
    }


def expected_row(m: int, step: int) -> dict[str, object]:
    return {key: (value.item() if isinstance(value, np.generic) else value) for key, value in scalars(m, step).items()}


def journal_lines(fpath: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in fpath.read_text().splitlines()]


# --- A run that finishes normally -------------------------------------------------------

N_STEPS = 3


@pytest.fixture(scope="module")
def finished(wandb_root, tmp_path_factory):
    """Three configs, three steps of scalars and one of a table, an image and a histogram."""
    tmp = tmp_path_factory.mktemp("finished")
    png_fpath = tmp / "hist.png"
    from PIL import Image

    Image.new("RGB", (6, 4), (200, 30, 30)).save(png_fpath)
    cfgs = make_cfgs(3)
    queue_dpath = tmp / "queue"
    tables = [[[0.5 * m], [0.25 + m]] for m in range(3)]
    hists = [([1, 2, 3 + m], [0.0, 1.0, 2.0, 3.0]) for m in range(3)]
    with wandb_queue.ParallelWandbRun(PROJECT, cfgs, "offline", ["tag-a", ""], queue_dpath) as run:
        ids_before = run.ids
        for step in range(N_STEPS):
            run.log([scalars(m, step) for m in range(3)], step=step)
        journals_during = sorted(p.name for p in queue_dpath.iterdir())
        run.log(
            [
                {
                    "eval/freqs": wandb.Table(columns=["freq"], data=tables[m]),
                    "eval/hist": wandb.Image(str(png_fpath), caption=f"sae {m}"),
                    "eval/h": wandb.Histogram(np_histogram=hists[m]),
                }
                for m in range(3)
            ],
            step=N_STEPS,
        )
        media_during = sorted(p.relative_to(queue_dpath).as_posix() for p in queue_dpath.glob("*.media/*"))
        png = png_fpath.read_bytes()
        png_fpath.unlink()  # The queue holds its own copy: plots in temporary files are safe.
    ids = run.finish()  # The with-block finished already: this must change nothing.
    flush_wandb()
    return dict(
        cfgs=cfgs, ids=ids, ids_before=ids_before, run=run, queue_dpath=queue_dpath, tables=tables,
        hists=hists, png=png, journals_during=journals_during, media_during=media_during,
    )  # fmt: skip


def test_ids_live_first_unique_and_fixed_at_construction(finished):
    ids = finished["ids"]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert ids == list(finished["ids_before"]) == list(finished["run"].ids)
    assert all(re.fullmatch("[a-z0-9]{8}", i) for i in ids)
    assert finished["run"].finish() == ids


def test_every_run_was_journaled_while_logging_and_the_queue_removed_after(finished):
    assert finished["journals_during"] == sorted(f"{i}.queue.jsonl" for i in finished["ids"])
    assert finished["media_during"] == sorted(f"{i}.media/000000.png" for i in finished["ids"])
    assert not finished["queue_dpath"].exists()


def test_every_run_holds_every_step_config_and_tags(finished, wandb_root):
    for m, (run_id, cfg) in enumerate(zip(finished["ids"], finished["cfgs"])):
        run = only_offline_run(wandb_root, run_id)
        assert run.run_id == run_id and run.project == PROJECT
        assert {k: v for k, v in run.config.items() if not k.startswith("_")} == config.to_dict(cfg)
        # The empty tag is dropped (wandb rejects it); queued runs are tagged "queued".
        assert run.tags == (["tag-a"] if m == 0 else ["tag-a", "queued"])
        assert sorted(run.history) == list(range(N_STEPS + 1))
        for step in range(N_STEPS):
            assert run.history[step] == expected_row(m, step), (m, step)
        assert run.exit_code == 0


def test_tables_images_and_histograms_reach_every_run(finished, wandb_root):
    for m, run_id in enumerate(finished["ids"]):
        run = only_offline_run(wandb_root, run_id)
        row = run.history[N_STEPS]
        assert set(row) == {"eval/freqs", "eval/hist", "eval/h"}
        table = json.loads((run.files_dpath / row["eval/freqs"]["path"]).read_text())
        assert table["columns"] == ["freq"] and table["data"] == finished["tables"][m]
        assert row["eval/hist"]["_type"] == "image-file"
        assert (run.files_dpath / row["eval/hist"]["path"]).read_bytes() == finished["png"]
        assert row["eval/h"]["_type"] == "histogram"
        values, bins = finished["hists"][m]
        assert row["eval/h"]["values"] == values and row["eval/h"]["bins"] == bins


# --- A run whose body raises --------------------------------------------------------------


def test_exception_in_with_block_finishes_every_run_as_failed(wandb_root, tmp_path):
    queue_dpath = tmp_path / "queue"
    with pytest.raises(RuntimeError, match="boom"):
        with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(3), "offline", [], queue_dpath) as run:
            for step in range(N_STEPS):
                run.log([scalars(m, step) for m in range(3)], step=step)
            raise RuntimeError("boom")
    flush_wandb()
    assert not queue_dpath.exists()
    assert run.finish() == list(run.ids)
    for m, run_id in enumerate(run.ids):
        offline = only_offline_run(wandb_root, run_id)
        assert offline.history == {step: expected_row(m, step) for step in range(N_STEPS)}
        assert offline.exit_code == 1
        assert ("queued" in offline.tags) == (m > 0)


def test_bad_value_logs_nothing_of_that_call(wandb_root, tmp_path):
    queue_dpath = tmp_path / "queue"
    run = wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(2), "offline", [], queue_dpath)
    run.log([scalars(0, 0), scalars(1, 0)], step=0)
    with pytest.raises(TypeError, match=r"config 1, metric 'bad'.*list"):
        run.log([scalars(0, 1), {"bad": [1.0, 2.0]}], step=1)
    for run_id in run.ids:
        assert [line.get("step") for line in journal_lines(queue_dpath / f"{run_id}.queue.jsonl")] == [None, 0]
    assert run.finish() == list(run.ids)
    flush_wandb()
    for run_id in run.ids:
        assert sorted(only_offline_run(wandb_root, run_id).history) == [0]


# --- A killed process, replayed afterwards --------------------------------------------------

CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    import numpy as np
    from saev_jax import config, wandb_queue

    cfgs = [config.Train(lr=1e-4 * (i + 1), sae=config.SparseAutoencoder(seed=i)) for i in range(3)]
    run = wandb_queue.ParallelWandbRun({project!r}, cfgs, "offline", ["crash"], pathlib.Path(sys.argv[1]))
    for step in range({n_steps}):
        run.log([{{"losses/loss": np.float32(step + m / 4), "metrics/l0": step * 10.0 + m}} for m in range(3)], step=step)
    print(" ".join(run.ids), flush=True)
    time.sleep(600)  # Killed by the test before it ever finishes.
    """
)


def test_killed_process_loses_nothing_and_replay_restores_every_step(wandb_root, tmp_path):
    n_steps = 4
    queue_dpath = tmp_path / "queue"
    script = CHILD.format(project=PROJECT, n_steps=n_steps)
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(queue_dpath)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        ids = child.stdout.readline().split()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and len(ids) == 3

    def expected(m, step):
        return {"losses/loss": step + m / 4, "metrics/l0": step * 10.0 + m}

    # On disk: every run's journal, every step, and no exit line (finish never ran).
    for m, run_id in enumerate(ids):
        header, *lines = journal_lines(queue_dpath / f"{run_id}.queue.jsonl")
        assert header["id"] == run_id and header["live"] == (m == 0) and header["tags"] == ["crash"]
        assert lines == [{"step": step, "metrics": expected(m, step)} for step in range(n_steps)]

    # The process may die while writing a line: replay ignores the torn end.
    with open(queue_dpath / f"{ids[2]}.queue.jsonl", "a") as fd:
        fd.write('{"step": 99, "metrics": {"losses/loss": 1')

    proc = subprocess.run(
        [sys.executable, "-m", "saev_jax.replay", str(queue_dpath)],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ids  # the live run first, then the queued ones in config order
    assert "torn last line" in proc.stderr
    assert not list(queue_dpath.iterdir())

    for m, run_id in enumerate(ids):
        # The killed live run's own offline log lost what wandb had buffered; the replay,
        # written last, holds every step.
        offline = offline_runs(wandb_root, run_id)[-1]
        assert offline.run_id == run_id
        assert offline.history == {step: expected(m, step) for step in range(n_steps)}
        assert offline.tags == (["crash"] if m == 0 else ["crash", "queued"])
        assert offline.config["lr"] == pytest.approx(1e-4 * (m + 1))
        assert offline.exit_code == 1  # the process died: the runs did not succeed


# --- Journals by hand ----------------------------------------------------------------------


def write_journal(dpath: pathlib.Path, run_id: str, lines: list[str]) -> pathlib.Path:
    dpath.mkdir(exist_ok=True)
    fpath = dpath / f"{run_id}{wandb_queue.SUFFIX}"
    fpath.write_text("".join(lines))
    return fpath


def header_line(run_id: str, *, live: bool = False, index: int = 1) -> str:
    header = {
        "format": wandb_queue.FORMAT, "id": run_id, "project": PROJECT, "config": {"lr": 0.5},
        "tags": ["t"], "mode": "offline", "live": live, "group": "g", "index": index, "created": 1.0,
    }  # fmt: skip
    return json.dumps(header) + "\n"


def test_read_journal_ignores_only_a_torn_last_line(tmp_path):
    good = [header_line("aaaaaaaa"), '{"step": 0, "metrics": {"x": NaN}}\n', '{"exit_code": 0}\n']
    journal = wandb_queue.read_journal(write_journal(tmp_path, "a", good + ['{"step": 1, "met']))
    assert [step for step, _ in journal.steps] == [0] and math.isnan(journal.steps[0][1]["x"])
    assert journal.exit_code == 0
    with pytest.raises(config.InputError, match=r"b\.queue\.jsonl:2"):
        wandb_queue.read_journal(write_journal(tmp_path, "b", [good[0], "{torn\n", good[1]]))
    assert wandb_queue.read_journal(write_journal(tmp_path, "c", [header_line("c")[:20]])) is None
    with pytest.raises(config.InputError, match="not a saev_jax wandb queue"):
        wandb_queue.read_journal(write_journal(tmp_path, "d", ['{"id": "x"}\n']))


def test_replay_function_orders_live_first_and_skips_torn_header(wandb_root, tmp_path):
    dpath = tmp_path / "queue"
    write_journal(dpath, "zzzz0001", [header_line("zzzz0001", index=1), '{"step": 5, "metrics": {"x": 1.5}}\n'])
    write_journal(dpath, "zzzz0002", [header_line("zzzz0002", live=True, index=0), '{"exit_code": 0}\n'])
    torn = write_journal(dpath, "zzzz0003", [header_line("zzzz0003")[:30]])
    assert replay.replay(dpath) == ["zzzz0002", "zzzz0001"]
    flush_wandb()
    assert not torn.exists() and not list(dpath.iterdir())
    queued = only_offline_run(wandb_root, "zzzz0001")
    assert queued.history == {5: {"x": 1.5}} and queued.tags == ["t", "queued"] and queued.exit_code == 1
    live = only_offline_run(wandb_root, "zzzz0002")
    assert live.history == {} and live.tags == ["t"] and live.exit_code == 0


@pytest.mark.parametrize("make_dpath", [lambda tmp: tmp / "missing", lambda tmp: tmp], ids=["missing", "empty"])
def test_replay_cli_rejects_missing_or_empty_dir(tmp_path, make_dpath):
    dpath = make_dpath(tmp_path)
    with pytest.raises(config.InputError):
        replay.replay(dpath)
    proc = subprocess.run(
        [sys.executable, "-m", "saev_jax.replay", str(dpath)], capture_output=True, text=True, timeout=60,
        env=subprocess_env() | {"WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and str(dpath) in proc.stderr
    assert proc.stdout == ""


# --- Disabled mode and bad values ---------------------------------------------------------------


def all_paths(root: pathlib.Path) -> set[pathlib.Path]:
    return set(root.rglob("*"))


def test_disabled_mode_writes_nothing_and_still_gives_ids(wandb_root, tmp_path):
    before = all_paths(wandb_root)
    queue_dpath = tmp_path / "queue"
    with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(3), "disabled", ["t"], queue_dpath) as run:
        for step in range(N_STEPS):
            run.log([scalars(m, step) for m in range(3)], step=step)
    ids = run.finish()
    other = wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(3), "disabled", [], queue_dpath)
    assert ids == list(run.ids) and len(set(ids) | set(other.ids)) == 6
    assert all_paths(wandb_root) == before
    assert not queue_dpath.exists()


@pytest.mark.parametrize(
    "value, match",
    [
        (object(), "builtins.object"),
        ([1.0, 2.0], "builtins.list"),
        ({"a": 1}, "builtins.dict"),
        (np.zeros(3), "numpy.ndarray"),
        (1 + 2j, "builtins.complex"),
        (wandb.Table(columns=["a"], data=[[object()]]), "builtins.object"),
    ],
)
def test_unsupported_values_raise_type_error_naming_the_metric(value, match, tmp_path):
    run = wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(2), "disabled", [], tmp_path)
    with pytest.raises(TypeError, match=rf"config 1, metric 'm'.*{match}"):
        run.log([{"x": 1.0}, {"m": value}], step=0)
    with pytest.raises(ValueError, match="1 metric dicts for 2 configs"):
        run.log([{"x": 1.0}], step=0)
    run.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        run.log([{}, {}], step=1)


def test_encode_gives_plain_json_that_decodes_back():
    values = {
        "f32": np.float32(0.25), "i64": np.int64(3), "bool": np.bool_(True), "zero_d": np.array(1.5),
        "nan": float("nan"), "py": 7, "s": "x",
    }  # fmt: skip
    encoded = {k: wandb_queue.encode(v, None, where=k) for k, v in values.items()}
    assert all(type(v) in (float, int, bool, str) for v in encoded.values())
    assert encoded["bool"] is True and encoded["i64"] == 3 and encoded["zero_d"] == 1.5
    decoded = json.loads(json.dumps(encoded))
    assert math.isnan(decoded.pop("nan")) and decoded == {k: v for k, v in encoded.items() if k != "nan"}
    table = wandb_queue.encode(wandb.Table(columns=["a", "b"], data=np.array([[1.0, 2.0]])), None, where="t")
    assert table == {"_type": "table", "columns": ["a", "b"], "data": [[1.0, 2.0]]}
    back = wandb_queue.decode(table, pathlib.Path("."))
    assert isinstance(back, wandb.Table) and back.data == [[1.0, 2.0]]


# --- Faults: a journal still being written, wandb's environment, no login, resuming --------------


def test_replay_refuses_journals_that_a_running_process_writes(wandb_root, tmp_path):
    queue_dpath = tmp_path / "queue"
    with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(2), "offline", [], queue_dpath) as run:
        run.log([scalars(m, 0) for m in range(2)], step=0)
        journals = sorted(queue_dpath.glob(f"*{wandb_queue.SUFFIX}"))
        assert json.loads(journals[0].read_text().splitlines()[0])["pid"] == os.getpid()
        who = f"still being written by pid {os.getpid()} on "
        with pytest.raises(config.InputError, match=who):
            replay.replay(queue_dpath)
        with pytest.raises(config.InputError, match=who):
            wandb_queue.replay_file(journals[1])
        proc = subprocess.run(
            [sys.executable, "-m", "saev_jax.replay", str(queue_dpath)],
            capture_output=True, text=True, env=subprocess_env(), timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and who in proc.stderr
        # Nothing was replayed or removed under the writer.
        assert sorted(queue_dpath.glob(f"*{wandb_queue.SUFFIX}")) == journals
        assert all(len(p.read_text().splitlines()) == 2 for p in journals)
    ids = run.finish()
    flush_wandb()
    assert not queue_dpath.exists()
    assert only_offline_run(wandb_root, ids[1]).history == {0: expected_row(1, 0)}


@pytest.mark.parametrize(
    "track, env, mode",
    [
        (False, {"WANDB_MODE": "online"}, "disabled"),
        (True, {}, "online"),
        (True, {"WANDB_MODE": "offline"}, "offline"),
        (True, {"WANDB_MODE": "dryrun"}, "offline"),
        (True, {"WANDB_MODE": "Disabled"}, "disabled"),
        (True, {"WANDB_DISABLED": "true"}, "disabled"),
    ],
)
def test_resolve_mode_respects_wandbs_environment(monkeypatch, track, env, mode):
    for key in ("WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_queue.resolve_mode(track) == mode


def test_resolve_mode_rejects_an_unknown_mode(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(config.InputError, match="WANDB_MODE = 'sometimes': must be online, offline or disabled"):
        wandb_queue.resolve_mode(True)


def no_login(monkeypatch, tmp_path):
    """Online mode as the environment's default, and no API key anywhere wandb looks."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    wandb.teardown()


def test_online_without_a_login_falls_back_to_offline_with_one_warning(wandb_root, tmp_path, monkeypatch, caplog):
    no_login(monkeypatch, tmp_path)
    queue_dpath = tmp_path / "queue"
    mode = wandb_queue.resolve_mode(True)
    assert mode == "online"
    with caplog.at_level(logging.WARNING, logger="saev_jax.wandb_queue"):
        with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(2), mode, [], queue_dpath) as run:
            assert run.mode == "offline"
            run.log([scalars(m, 0) for m in range(2)], step=0)
            headers = [json.loads(p.read_text().splitlines()[0]) for p in sorted(queue_dpath.iterdir())]
            assert {h["mode"] for h in headers} == {"offline"}  # So the queued runs replay offline too.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "logging to offline files instead" in warnings[0]
    assert "No API key" in warnings[0] and "\n" not in warnings[0]
    ids = run.finish()
    flush_wandb()
    for m, run_id in enumerate(ids):
        assert only_offline_run(wandb_root, run_id).history == {0: expected_row(m, 0)}


@pytest.mark.slow  # wandb-core retries until its init timeout (INIT_TIMEOUT_S) and takes a while to stop.
def test_online_without_a_network_falls_back_to_offline(wandb_root, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)  # A well-formed key that no server will ever see.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # Nothing listens on the discard port.
    monkeypatch.setattr(wandb_queue, "INIT_TIMEOUT_S", 3.0)
    wandb.teardown()
    with caplog.at_level(logging.WARNING, logger="saev_jax.wandb_queue"):
        run = wandb_queue.init_run(project=PROJECT, id="nonet001", mode="online")
    assert run.settings.mode == "offline" and run.id == "nonet001"
    assert "logging to offline files instead" in caplog.text
    run.finish()


RESUMED_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from saev_jax import config, wandb_queue
    cfgs = [config.Train(lr=1e-4 * (i + 1)) for i in range(3)]
    run = wandb_queue.ParallelWandbRun("{project}", cfgs, "offline", [], sys.argv[1])
    for step in range(4):
        run.log([{{"x": step + m / 4}} for m in range(3)], step=step)
        if step == 1:
            info = run.positions()  # What a snapshot taken after step 1 records.
    print(json.dumps(info), flush=True)
    time.sleep(600)  # Killed by the test.
    """
)


def test_resumed_runs_keep_their_ids_and_journals_without_doubled_steps(wandb_root, tmp_path):
    queue_dpath = tmp_path / "queue"
    child = subprocess.Popen(
        [sys.executable, "-c", RESUMED_CHILD.format(project=PROJECT), str(queue_dpath)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    try:
        info = json.loads(child.stdout.readline())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    ids = list(info)
    assert len(ids) == 3 and all(n > 0 for n in info.values())
    # The child logged steps 2 and 3 after its snapshot; the resumed process logs them again.
    with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(3), "offline", [], queue_dpath, resume=info) as run:
        assert list(run.ids) == ids
        for step in (2, 3):
            run.log([{"x": 10 * step + m} for m in range(3)], step=step)
        for m, run_id in enumerate(ids):
            header, *lines = journal_lines(queue_dpath / f"{run_id}{wandb_queue.SUFFIX}")
            assert header["id"] == run_id and header["index"] == m
            assert lines == [{"step": s, "metrics": {"x": s + m / 4}} for s in (0, 1)] + [
                {"step": s, "metrics": {"x": 10 * s + m}} for s in (2, 3)
            ]
    run.finish()
    flush_wandb()
    for m, run_id in enumerate(ids[1:], start=1):
        history = only_offline_run(wandb_root, run_id).history
        assert history == {0: {"x": m / 4}, 1: {"x": 1 + m / 4}, 2: {"x": 20 + m}, 3: {"x": 30 + m}}


def test_suspend_keeps_the_journals_unlocked_for_a_resume(wandb_root, tmp_path):
    queue_dpath = tmp_path / "queue"
    with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(2), "offline", [], queue_dpath) as run:
        run.log([scalars(m, 0) for m in range(2)], step=0)
        info = run.positions()
        assert run.suspend() == list(run.ids)
    assert run.finish() == list(run.ids)  # Does nothing more: nothing replayed, nothing removed.
    journals = {p.name: journal_lines(p) for p in queue_dpath.glob(f"*{wandb_queue.SUFFIX}")}
    assert set(journals) == {f"{i}{wandb_queue.SUFFIX}" for i in run.ids}
    assert all(len(lines) == 2 and "exit_code" not in lines[-1] for lines in journals.values())
    with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(2), "offline", [], queue_dpath, resume=info) as resumed:
        resumed.log([scalars(m, 1) for m in range(2)], step=1)
    flush_wandb()
    assert not queue_dpath.exists()
    assert only_offline_run(wandb_root, run.ids[1]).history == {s: expected_row(1, s) for s in (0, 1)}


@pytest.mark.parametrize("stop", [SystemExit(143), KeyboardInterrupt()])
def test_a_stopped_block_suspends_instead_of_failing_the_runs(wandb_root, tmp_path, stop):
    """SIGTERM (SystemExit from the training loop) or SIGINT leaving the with-block keeps every journal for the resume."""
    queue_dpath = tmp_path / "queue"
    with pytest.raises(type(stop)):
        with wandb_queue.ParallelWandbRun(PROJECT, make_cfgs(3), "offline", [], queue_dpath) as run:
            run.log([scalars(m, 0) for m in range(3)], step=0)
            raise stop
    journals = {p.name: journal_lines(p) for p in queue_dpath.glob(f"*{wandb_queue.SUFFIX}")}
    assert set(journals) == {f"{i}{wandb_queue.SUFFIX}" for i in run.ids}
    assert all(len(lines) == 2 and "exit_code" not in lines[-1] for lines in journals.values())
