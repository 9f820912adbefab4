"""Snapshots of a whole training state, so a killed run continues where it was.

A snapshot is a directory `<dpath>/snapshot-<step>/` (the step zero-padded to 12 digits):

- `state.safetensors`: every array leaf of the state pytree (stacked SAEs, Optax state,
  step, ...), keyed by its tree path (`jax.tree_util.keystr`), bit for bit; any
  safetensors reader opens it.
- `meta.json`: a JSON dict the caller chooses (group, step, run ids, configs, wandb
  journal positions).
- `manifest.json`: the format, the step, and the size and sha256 of the two files above.

`save` writes all three into a temporary directory, fsyncs them and the directory, and
renames it into place, so a crash leaves a whole snapshot or a temporary directory that
nothing reads. It keeps the snapshot it wrote and the one before it. `latest` checks
sizes and checksums and skips a truncated or corrupt snapshot with one logged line, so
the previous one is used.

`lock_ckpt_dir` keeps a second training off a checkpoint directory while one runs.
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import struct
from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import config

logger = logging.getLogger(__name__)

FORMAT = "saev_jax.snapshot/1"
"""The `format` field of a snapshot's manifest."""
LOCK_NAME = ".saev_jax.lock"
"""The lock file `lock_ckpt_dir` holds in a checkpoint directory."""

_NAME_RE = re.compile(r"snapshot-(\d{12})")
_TMP_RE = re.compile(r"\.snapshot-\d{12}\.(tmp|old)-(\d+)")
_TENSORS, _META, _MANIFEST = "state.safetensors", "meta.json", "manifest.json"
# numpy dtype name -> safetensors dtype name.
_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def get_dpath(dpath: str | os.PathLike, step: int) -> pathlib.Path:
    """Where the snapshot of `step` lives in `dpath`."""
    return pathlib.Path(dpath) / f"snapshot-{step:012d}"


def save(dpath: str | os.PathLike, step: int, state, meta: dict[str, object]) -> pathlib.Path:
    """Writes `state`'s arrays and `meta` as the snapshot of `step` in `dpath`, atomically.

    `state` is any pytree; its array leaves (JAX or NumPy) are saved, other leaves are
    not (`restore` takes them from its `like`). `meta` must be JSON-ready. A snapshot of
    the same step is replaced. Afterwards `dpath` holds this snapshot and the newest one
    of a smaller step; every other snapshot (older ones, and newer ones from a timeline
    that was abandoned by resuming from an earlier step) is deleted.

    Raises config.InputError naming `dpath` and the OS error if the snapshot cannot be
    written (a full or read-only disk); then no partial snapshot is left behind.
    """
    dpath = pathlib.Path(dpath)
    final = get_dpath(dpath, step)
    tmp = dpath / f".{final.name}.tmp-{os.getpid()}"
    old = dpath / f".{final.name}.old-{os.getpid()}"
    meta_bytes = json.dumps(meta, indent=1).encode()  # A TypeError here is a bug, not a disk problem.
    try:
        dpath.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(dpath)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {_TENSORS: _write_tensors(tmp / _TENSORS, state), _META: _write_bytes(tmp / _META, meta_bytes)}
        manifest = {"format": FORMAT, "step": step, "files": files}
        _write_bytes(tmp / _MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync(dpath)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise config.InputError(
            f"{dpath}: could not write the snapshot of step {step}: {err.strerror or err}; earlier snapshots are kept"
        ) from err
    shutil.rmtree(old, ignore_errors=True)
    _prune(dpath, step)
    return final


def latest(dpath: str | os.PathLike) -> tuple[int, pathlib.Path] | None:
    """(step, path) of the newest intact snapshot in `dpath`; None if there is none.

    Each candidate's manifest, sizes and sha256 checksums are checked, newest first; a
    truncated or corrupt snapshot is skipped with one warning saying which one is used.
    """
    found = list_snapshots(dpath)
    for i, (step, fpath) in enumerate(reversed(found)):
        problem = check(fpath)
        if problem is None:
            return step, fpath
        older = found[-i - 2] if i + 1 < len(found) else None
        instead = f"using {older[1].name}" if older else "no earlier snapshot"
        logger.warning("Snapshot %s is damaged (%s); %s.", fpath, problem, instead)
    return None


def list_snapshots(dpath: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """(step, path) of every snapshot directory in `dpath`, oldest first, intact or not."""
    dpath = pathlib.Path(dpath)
    if not dpath.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in dpath.iterdir() if (m := _NAME_RE.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def check(fpath: str | os.PathLike) -> str | None:
    """Why the snapshot directory `fpath` cannot be trusted, or None if it is intact."""
    fpath = pathlib.Path(fpath)
    try:
        manifest = json.loads((fpath / _MANIFEST).read_bytes())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return f"{_MANIFEST} is not a {FORMAT} manifest"
        m = _NAME_RE.fullmatch(fpath.name)
        if m and manifest.get("step") != int(m.group(1)):
            return f"{_MANIFEST} says step {manifest.get('step')!r}"
        for name in (_TENSORS, _META):
            want = manifest["files"][name]
            size = (fpath / name).stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, {want['bytes']} were written"
            if _sha256(fpath / name) != want["sha256"]:
                return f"{name} fails its sha256 checksum"
    except FileNotFoundError as err:
        return f"{pathlib.Path(err.filename).name} is missing"
    except (ValueError, KeyError, TypeError) as err:
        return f"{_MANIFEST} is unreadable ({type(err).__name__})"
    return None


def restore(fpath: str | os.PathLike, like):
    """(state, meta) from the snapshot directory `fpath`; state has `like`'s structure.

    `like` is a pytree of the same structure as the saved state, e.g. a freshly built
    one or `eqx.filter_eval_shape` of its builder: its arrays (or `jax.ShapeDtypeStruct`s)
    give each saved array's key, shape, dtype and placement (a JAX array's sharding);
    its other leaves are returned as they are. The values are bit-identical to the
    saved ones. Raises config.InputError naming the key if the saved arrays do not
    match `like`'s (another structure, shape or dtype), or if the snapshot is damaged.
    """
    fpath = pathlib.Path(fpath)
    problem = check(fpath)
    if problem is not None:
        raise config.InputError(f"{fpath}: damaged snapshot: {problem}")
    meta = json.loads((fpath / _META).read_bytes())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    with open(fpath / _TENSORS, "rb") as fd:
        (n,) = struct.unpack("<Q", fd.read(8))
        header = json.loads(fd.read(n))
        header.pop("__metadata__", None)
        start = 8 + n
        wanted = {jax.tree_util.keystr(path) for path, leaf in leaves if _is_array(leaf)}
        if extra := sorted(set(header) - wanted):
            raise config.InputError(f"{fpath}: the snapshot holds {extra[0]}, which the state now lacks")
        out = []
        for path, leaf in leaves:
            if not _is_array(leaf):
                out.append(leaf)
                continue
            key = jax.tree_util.keystr(path)
            if key not in header:
                raise config.InputError(f"{fpath}: the snapshot lacks {key}")
            info = header[key]
            dtype, shape = jnp.dtype(_DTYPE_NAMES[info["dtype"]]), tuple(info["shape"])
            if (dtype, shape) != (jnp.dtype(leaf.dtype), tuple(leaf.shape)):
                raise config.InputError(
                    f"{fpath}: {key} is {dtype.name}{list(shape)} in the snapshot, "
                    f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)} now"
                )
            begin, end = info["data_offsets"]
            fd.seek(start + begin)
            arr = np.empty(shape, dtype)
            fd.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
            out.append(_place(arr, leaf))
    return jax.tree_util.tree_unflatten(treedef, out), meta


def read_meta(fpath: str | os.PathLike) -> dict:
    """The meta dict of the snapshot directory `fpath`, without reading its tensors."""
    return json.loads((pathlib.Path(fpath) / _META).read_bytes())


def clear(dpath: str | os.PathLike) -> None:
    """Deletes every snapshot in `dpath` (to start afresh); the directory stays."""
    for _, fpath in list_snapshots(dpath):
        shutil.rmtree(fpath)


LAYOUT_KEYS = config.LAYOUT_KEYS
"""Config keys that change how a run is laid out or started, not what it computes: a resume may change them."""


def diff_configs(saved: list[dict[str, object]], now: list[dict[str, object]]) -> str | None:
    """The first difference between two lists of configs (as `config.to_dict` gives), or None.

    Says where, e.g. "config 2: sae.sparsity_coeff = 0.001 in the snapshot, 0.003 now", or
    how the number of configs differs. `LAYOUT_KEYS` are not compared.
    """
    if len(saved) != len(now):
        return f"the snapshot holds {len(saved)} configs, the command gives {len(now)}"
    strip = lambda d: {k: v for k, v in d.items() if k not in LAYOUT_KEYS}  # noqa: E731
    for i, (a, b) in enumerate(zip(map(strip, saved), map(strip, now))):
        if (where := _first_difference(a, b)) is not None:
            key, va, vb = where
            return f"config {i}: {key} = {json.dumps(va)} in the snapshot, {json.dumps(vb)} now"
    return None


def _first_difference(a: object, b: object, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return name, a.get(key, "<absent>"), b.get(key, "<absent>")
            if (where := _first_difference(a[key], b[key], name)) is not None:
                return where
        return None
    # JSON turns tuples into lists: compare as JSON would write them.
    return None if json.dumps(a) == json.dumps(b) else (prefix or "<config>", a, b)


@contextlib.contextmanager
def lock_ckpt_dir(dpath: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Holds an exclusive lock on checkpoint directory `dpath` while the block runs.

    Creates `dpath` if needed. A second holder, in this process or another (on this host,
    or another host where the file system supports `flock`), gets config.InputError naming
    the holder's pid and host. So does a directory that cannot be written (read-only,
    full): the lock file is written, so this fails before any training.
    """
    dpath = pathlib.Path(dpath)
    fpath = dpath / LOCK_NAME
    try:
        dpath.mkdir(parents=True, exist_ok=True)
        fd = os.open(fpath, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise config.InputError(f"ckpt_path {dpath}: cannot write there: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "another process"
            raise config.InputError(
                f"ckpt_path {dpath} is in use by {holder}; wait for it to end or choose another ckpt_path"
            ) from None
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"saev_jax pid {os.getpid()} on {socket.gethostname()} since {now}\n".encode(), 0)
            os.fsync(fd)
        except OSError as err:
            raise config.InputError(f"ckpt_path {dpath}: cannot write there: {err.strerror or err}") from None
        yield dpath
    finally:
        os.close(fd)  # Releases the lock. The file stays: deleting it would race a new holder.


def _is_array(leaf) -> bool:
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def _place(arr: np.ndarray, like):
    if isinstance(like, np.ndarray):
        return arr
    sharding = getattr(like, "sharding", None)
    return jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)


def _write_tensors(fpath: pathlib.Path, state) -> dict[str, object]:
    """Writes `state`'s arrays in the safetensors format, one leaf in host memory at a time."""
    leaves = [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]
    leaves = [(key, leaf) for key, leaf in leaves if eqx.is_array(leaf)]
    header, offset = {"__metadata__": {"format": FORMAT}}, 0
    for key, leaf in leaves:
        name = jnp.dtype(leaf.dtype).name
        if name not in _DTYPES:
            raise TypeError(f"snapshot: cannot save {key} of dtype {name}")
        size = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        header[key] = {"dtype": _DTYPES[name], "shape": list(leaf.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data to 8 bytes.
    digest = hashlib.sha256()
    n_bytes = 0
    with open(fpath, "wb") as fd:
        for chunk in [struct.pack("<Q", len(header_bytes)), header_bytes]:
            fd.write(chunk)
            digest.update(chunk)
            n_bytes += len(chunk)
        for _key, leaf in leaves:
            arr = np.ascontiguousarray(jax.device_get(leaf))
            buf = memoryview(arr.reshape(-1).view(np.uint8))
            fd.write(buf)
            digest.update(buf)
            n_bytes += len(buf)
        fd.flush()
        os.fsync(fd.fileno())
    return {"bytes": n_bytes, "sha256": digest.hexdigest()}


def _write_bytes(fpath: pathlib.Path, payload: bytes) -> dict[str, object]:
    with open(fpath, "wb") as fd:
        fd.write(payload)
        fd.flush()
        os.fsync(fd.fileno())
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def fsync(path: str | os.PathLike) -> None:
    """Flushes a file's or a directory's entries to the disk (a directory: so renames in it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(fpath: pathlib.Path) -> str:
    with open(fpath, "rb") as fd:
        return hashlib.file_digest(fd, "sha256").hexdigest()


def _prune(dpath: pathlib.Path, step: int) -> None:
    """Keeps the snapshot of `step` and the newest one before it; deletes the rest."""
    found = list_snapshots(dpath)
    earlier = [s for s, _ in found if s < step]
    keep = {step} | ({max(earlier)} if earlier else set())
    for s, fpath in found:
        if s not in keep:
            shutil.rmtree(fpath, ignore_errors=True)


def _remove_stale_tmp(dpath: pathlib.Path) -> None:
    """Removes what killed saves left (temporary directories of processes that are gone)."""
    for p in dpath.iterdir():
        m = _TMP_RE.fullmatch(p.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
