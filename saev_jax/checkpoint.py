"""Checkpoints on disk: saev_jax's own directory and saev's `sae.pt`, read and written.

A checkpoint directory `<ckpt_path>/<run id>/` holds

    sae.safetensors         W_enc [d_vit, d_sae], b_enc [d_sae], W_dec [d_sae, d_vit], b_dec [d_vit] (float32)
    kind.safetensors        what the SAE's kind needs at inference besides those (`Kind.inference_tensors`:
                            BatchTopK's and Matryoshka's threshold, JumpReLU's thresholds, each [d_sae])
    preprocess.safetensors  clamp [], act_mean [d_vit], scalar []: SPEC 1's preprocessing of this run
    freqs.safetensors       freqs [d_sae]: how often each feature fired in the final evaluation
    cfg.json, metrics.json  the whole `Train` config (its `sae.kind` says the kind; none: ReLU); the scalar evaluation metrics

`load(path)` reads such a directory (older ones without the newer files too) or saev's `sae.pt`
(always ReLU) and gives a `Checkpoint`: the SAE as its own kind, in its inference form, with
the preprocessing it was trained with, which encodes and decodes raw activations. A checkpoint
is untrusted input: nothing here unpickles anything but tensors (`torch.load(weights_only=True)`),
and bad files raise one-line InputErrors.
"""

import collections
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import pickle
import shutil

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jaxtyping import Array, Float

from . import config, data, kinds, snapshot
from .kinds import TENSOR_NAMES

logger = logging.getLogger(__name__)

SAE_FNAME = "sae.safetensors"
PREPROCESS_FNAME = "preprocess.safetensors"
FREQS_FNAME = "freqs.safetensors"
KIND_FNAME = "kind.safetensors"
"""What a kind other than ReLU needs at inference beyond the four tensors (e.g. `threshold [d_sae]`)."""
CFG_FNAME = "cfg.json"
METRICS_FNAME = "metrics.json"
SAEV_FNAME = "sae.pt"
"""saev's checkpoint file: one JSON header line, then `torch.save` of the state dict."""

SAEV_RENAMED = {"l1_coeff": "sparsity_coeff", "use_ghost_grads": "ghost_grads"}
"""Header keys of saev's first `sae.pt` version (Oct-Nov 2024) and their later names."""
_HEADER_LIMIT = 1 << 16
SAEV_FIELDS = (
    "d_vit",
    "exp_factor",
    "sparsity_coeff",
    "n_reinit_samples",
    "ghost_grads",
    "remove_parallel_grads",
    "normalize_w_dec",
    "seed",
)
"""The `SparseAutoencoder` fields saev's own config has, in its order: what a `sae.pt` header holds."""


class Checkpoint(eqx.Module):
    """A trained SAE and the preprocessing it was trained with; encodes and decodes raw activations.

        ckpt = saev_jax.sae.load("checkpoints/abc123")   # or a saev sae.pt
        f_BS = ckpt.encode_raw(x_BD)                     # raw ViT activations in, features out
        x_hat_BD = ckpt.decode_raw(f_BS)                 # back to raw units

    `sae` is the SAE as its kind's inference form (`kinds.Inference`: TopK keeps each example's
    k largest, BatchTopK and Matryoshka apply their threshold, JumpReLU its thresholds; `kind`
    names it). It works in the normalised space `(clip(x, -clamp, clamp) - act_mean) / scalar`;
    `encode_raw`/`decode_raw` add that step and its inverse (the clamp is not undone). Wrap
    them in `eqx.filter_jit` for speed. `preprocess` is None for checkpoints that do not carry
    their statistics (saev_jax's before they were saved, saev's `sae.pt` trained with
    estimated statistics): `missing` names what is absent, and `with_preprocess` adds them.
    """

    sae: kinds.Inference
    preprocess: data.Preprocess | None
    freqs: Float[Array, " d_sae"] | None
    """Per-feature firing frequency of the final evaluation, or None."""
    cfg: config.Train | None = eqx.field(static=True)
    """The training config (for a `sae.pt`: its header, plus saev's `cfg.json` beside it if any)."""
    source: str = eqx.field(static=True)
    """The file or directory it was read from, and its format."""
    missing: tuple[str, ...] = eqx.field(static=True, default=())
    """What this checkpoint lacks: any of "preprocess", "freqs", "cfg"."""

    @property
    def kind(self) -> str:
        """The SAE's kind (`sae.kind`): relu, topk, batchtopk, matryoshka or jumprelu."""
        return type(self.sae.sae).name

    def _require_preprocess(self) -> data.Preprocess:
        if self.preprocess is None:
            raise config.InputError(
                f"{self.source}: no preprocessing statistics (clamp, act_mean, scalar) in this checkpoint; "
                "compute them from its shards with data.make_preprocess and pass them to with_preprocess"
            )
        return self.preprocess

    def encode_raw(self, x_BD: Float[Array, "B d_vit"]) -> Float[Array, "B d_sae"]:
        """Feature activations of raw activations: preprocess, then the SAE's encoder."""
        x_BD = self._require_preprocess()(x_BD)
        return self.sae.sae.encode(self.sae.kind_state, x_BD, self.sae.hp)

    def decode_raw(self, f_BS: Float[Array, "B d_sae"]) -> Float[Array, "B d_vit"]:
        """Reconstructions in raw units: the SAE's decoder, then `* scalar + act_mean`."""
        p = self._require_preprocess()
        return self.sae.decode(f_BS) * p.scalar + p.act_mean

    def __call__(self, x_BD: Float[Array, "B d_vit"]) -> tuple[Float[Array, "B d_vit"], Float[Array, "B d_sae"]]:
        """(raw reconstruction, features) of raw activations."""
        f_BS = self.encode_raw(x_BD)
        return self.decode_raw(f_BS), f_BS

    def with_preprocess(self, preprocess: data.Preprocess) -> "Checkpoint":
        """The same checkpoint with these statistics (for one that has none, or to override them)."""
        if preprocess.act_mean.shape != self.sae.b_dec.shape:
            raise ValueError(f"with_preprocess: act_mean {preprocess.act_mean.shape}, SAE d_vit {self.sae.b_dec.shape}")
        return dataclasses.replace(
            self, preprocess=preprocess, missing=tuple(m for m in self.missing if m != "preprocess")
        )


# --------------------------------------------------------------------------- saev_jax's own directory


def save(
    sae: "kinds.Kind | kinds.Inference",
    dpath: str | os.PathLike,
    cfg: config.Train,
    metrics: dict[str, object] | None = None,
    preprocess: data.Preprocess | None = None,
    freqs: Float[np.ndarray, " d_sae"] | None = None,
    kind_tensors: dict[str, np.ndarray] | None = None,
    *,
    replace: bool = False,
) -> None:
    """Writes a checkpoint directory (see the module docstring) into `dpath`, atomically.

    `sae` is one SAE of any kind (its kind is `cfg.sae.kind`); `kind_tensors`
    (`Kind.inference_tensors`), if any, go to `kind.safetensors`. An `Inference` brings its own.

    Everything is written into a temporary sibling directory that is renamed into place
    last, so a crash leaves either the whole checkpoint or none of it. `preprocess` and
    `freqs` are optional only for callers that do not have them; training always passes them.
    Without `metrics` the checkpoint is unfinished (no metrics.json): training writes the
    parameters first and adds the evaluation with `add_metrics`. An unfinished checkpoint at
    `dpath` (a run resumed after a crash) is replaced; a finished one is an error unless
    `replace` (a resumed round rewriting what a killed attempt of it had written).
    """
    dpath = pathlib.Path(dpath)
    if (dpath / METRICS_FNAME).exists() and not replace:
        raise FileExistsError(f"{dpath}: checkpoint exists already")
    tmp = dpath.with_name(f".{dpath.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(sae, kinds.Inference):
        kind_tensors = sae.sae.inference_tensors(sae.kind_state) if kind_tensors is None else kind_tensors
        sae = sae.sae
    if type(sae).name != cfg.sae.kind:
        raise ValueError(f"save: a {type(sae).name} SAE but cfg.sae.kind = {cfg.sae.kind}")
    tensors = {name: np.asarray(getattr(sae, name), dtype=np.float32) for name in TENSOR_NAMES}
    safetensors.numpy.save_file(tensors, tmp / SAE_FNAME)
    if preprocess is not None:
        stats = {
            name: np.asarray(getattr(preprocess, name), dtype=np.float32) for name in ("clamp", "act_mean", "scalar")
        }
        safetensors.numpy.save_file(stats, tmp / PREPROCESS_FNAME)
    if freqs is not None:
        safetensors.numpy.save_file({"freqs": np.asarray(freqs, dtype=np.float32)}, tmp / FREQS_FNAME)
    if kind_tensors:
        safetensors.numpy.save_file({k: np.asarray(v, np.float32) for k, v in kind_tensors.items()}, tmp / KIND_FNAME)
    (tmp / CFG_FNAME).write_text(json.dumps(config.to_dict(cfg), indent=2) + "\n")
    if metrics is not None:
        (tmp / METRICS_FNAME).write_text(json.dumps(metrics, indent=2) + "\n")
    _fsync_tree(tmp)
    if dpath.exists():
        shutil.rmtree(dpath)
    os.replace(tmp, dpath)
    snapshot.fsync(dpath.parent)


def add_metrics(
    dpath: str | os.PathLike, metrics: dict[str, object], freqs: Float[np.ndarray, " d_sae"] | None = None
) -> None:
    """Finishes the checkpoint at `dpath`: the evaluation's frequencies, then `metrics.json` (each atomically).

    `metrics.json` comes last: a checkpoint is finished exactly when it has one.
    """
    dpath = pathlib.Path(dpath)
    if freqs is not None:
        tmp = dpath / f".{FREQS_FNAME}.tmp"
        safetensors.numpy.save_file({"freqs": np.asarray(freqs, dtype=np.float32)}, tmp)
        snapshot.fsync(tmp)
        os.replace(tmp, dpath / FREQS_FNAME)
    tmp = dpath / f".{METRICS_FNAME}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    snapshot.fsync(tmp)
    os.replace(tmp, dpath / METRICS_FNAME)
    snapshot.fsync(dpath)


def _fsync_tree(dpath: pathlib.Path) -> None:
    for p in dpath.iterdir():
        snapshot.fsync(p)
    snapshot.fsync(dpath)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is something `load` reads: a directory with sae.safetensors or sae.pt, or such a file."""
    path = pathlib.Path(path)
    if path.is_dir():
        return (path / SAE_FNAME).is_file() or (path / SAEV_FNAME).is_file()
    return path.is_file()


def load(path: str | os.PathLike, precision: str = "float32") -> Checkpoint:
    """The checkpoint at `path`: a saev_jax checkpoint directory or its `sae.safetensors`, or saev's `sae.pt`
    (a directory holding one, or the file; any file name but `*.safetensors` is read as a `sae.pt`).

    Raises InputError, naming the file and the problem, for anything that is not a valid checkpoint.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / SAE_FNAME).is_file():
            return _load_dir(path / SAE_FNAME, precision)
        if (path / SAEV_FNAME).is_file():
            return load_saev(path / SAEV_FNAME, precision)
        raise config.InputError(f"{path}: not a checkpoint (no {SAE_FNAME} or {SAEV_FNAME} in it)")
    if not path.is_file():
        raise config.InputError(f"{path}: no such checkpoint file or directory")
    if path.suffix == ".safetensors":
        return _load_dir(path, precision)
    return load_saev(path, precision)


def load_cfg(dpath: str | os.PathLike) -> config.Train:
    """The `Train` config saved beside a checkpoint (`<dpath>/cfg.json`)."""
    fpath = pathlib.Path(dpath) / CFG_FNAME
    return _read_cfg(fpath)


def _read_cfg(fpath: pathlib.Path) -> config.Train:
    try:
        dct = json.loads(fpath.read_text())
    except FileNotFoundError:
        raise config.InputError(f"{fpath}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise config.InputError(f"{fpath}: not a JSON config: {_first_line(err)}") from None
    if not isinstance(dct, dict):
        raise config.InputError(f"{fpath}: not a JSON config (top level is not an object)")
    cfg = config.from_dict(config.Train, dct, where=str(fpath))
    if cfg.sae.kind not in kinds.KINDS:
        raise config.InputError(
            f"{fpath}: sae.kind = {cfg.sae.kind!r}: not a kind this version knows ({', '.join(kinds.KINDS)})"
        )
    return cfg


def _load_dir(fpath: pathlib.Path, precision: str) -> Checkpoint:
    # Sibling files belong to the checkpoint only when the file has the checkpoint's name.
    dpath = fpath.parent if fpath.name == SAE_FNAME else None
    cfg = _read_cfg(dpath / CFG_FNAME) if dpath and (dpath / CFG_FNAME).is_file() else None
    tensors = _read_safetensors(fpath, {"W_enc": 2, "b_enc": 1, "W_dec": 2, "b_dec": 1})
    d_vit, d_sae = tensors["W_enc"].shape
    if cfg is not None and (cfg.sae.d_vit, cfg.sae.d_sae) != (d_vit, d_sae):
        raise config.InputError(
            f"{fpath}: W_enc is {d_vit} x {d_sae} but {CFG_FNAME} says d_vit = {cfg.sae.d_vit}, d_sae = {cfg.sae.d_sae}"
        )
    _check_sae_shapes(tensors, d_vit, d_sae, fpath)
    kind_tensors = {}
    if dpath and (dpath / KIND_FNAME).is_file():
        try:
            kind_tensors = safetensors.numpy.load_file(dpath / KIND_FNAME)
        except Exception as err:  # safetensors raises its own error types, and OSError, for bad files
            raise config.InputError(
                f"{dpath / KIND_FNAME}: not a valid safetensors file ({_first_line(err)})"
            ) from None
    kind_cfg = cfg or config.Train(sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=max(1, d_sae // d_vit)))
    if cfg is None and kind_tensors:
        raise config.InputError(f"{dpath / KIND_FNAME}: no {CFG_FNAME} beside it to say the SAE's kind")
    try:
        sae = kinds.make_inference(kind_cfg, tensors, kind_tensors, precision)
    except ValueError as err:
        raise config.InputError(f"{dpath / KIND_FNAME if dpath else fpath}: {err}") from None

    preprocess = freqs = None
    if dpath and (dpath / PREPROCESS_FNAME).is_file():
        stats = _read_safetensors(dpath / PREPROCESS_FNAME, {"clamp": 0, "act_mean": 1, "scalar": 0})
        preprocess = _make_preprocess(stats, d_vit, dpath / PREPROCESS_FNAME)
    if dpath and (dpath / FREQS_FNAME).is_file():
        freqs = _read_safetensors(dpath / FREQS_FNAME, {"freqs": 1})["freqs"]
        if freqs.shape != (d_sae,):
            raise config.InputError(f"{dpath / FREQS_FNAME}: freqs has shape {list(freqs.shape)}, expected [{d_sae}]")
        freqs = jnp.asarray(freqs)
    missing = tuple(
        name for name, value in (("preprocess", preprocess), ("freqs", freqs), ("cfg", cfg)) if value is None
    )
    return Checkpoint(sae, preprocess, freqs, cfg, f"{dpath or fpath} (saev_jax)", missing)


def _read_safetensors(fpath: pathlib.Path, ndims: dict[str, int]) -> dict[str, np.ndarray]:
    """Exactly the tensors named in `ndims`, floating point, with those numbers of dimensions, as float32."""
    try:
        tensors = safetensors.numpy.load_file(fpath)
    except Exception as err:  # safetensors raises its own error types, and OSError, for bad files
        raise config.InputError(f"{fpath}: not a valid safetensors file ({_first_line(err)})") from None
    missing, extra = sorted(set(ndims) - set(tensors)), sorted(set(tensors) - set(ndims))
    if missing or extra:
        raise config.InputError(
            f"{fpath}: expected tensors {', '.join(ndims)}; "
            + "; ".join(
                f"{what} {', '.join(names)}" for what, names in (("missing", missing), ("unknown", extra)) if names
            )
        )
    for name, ndim in ndims.items():
        t = tensors[name]
        if t.ndim != ndim or t.dtype.kind != "f":
            raise config.InputError(f"{fpath}: {name} must be a {ndim}-d float tensor, got {t.dtype} {list(t.shape)}")
    return {name: np.asarray(tensors[name], np.float32) for name in ndims}


def _check_sae_shapes(tensors: dict[str, np.ndarray], d_vit: int, d_sae: int, fpath: object) -> None:
    expected = {"W_enc": (d_vit, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_vit), "b_dec": (d_vit,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise config.InputError(f"{fpath}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")


def _make_preprocess(stats: dict[str, np.ndarray], d_vit: int, fpath: pathlib.Path) -> data.Preprocess:
    if stats["act_mean"].shape != (d_vit,):
        raise config.InputError(f"{fpath}: act_mean has shape {list(stats['act_mean'].shape)}, expected [{d_vit}]")
    clamp, scalar = float(stats["clamp"]), float(stats["scalar"])
    if not (np.all(np.isfinite(stats["act_mean"])) and clamp > 0 and math.isfinite(scalar) and scalar > 0):
        raise config.InputError(f"{fpath}: clamp and scalar must be positive and act_mean finite")
    return data.Preprocess(clamp, stats["act_mean"], scalar)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0]


# --------------------------------------------------------------------------- saev's sae.pt


def read_saev(fpath: str | os.PathLike) -> tuple[config.SparseAutoencoder, dict[str, np.ndarray]]:
    """The header (as our `SparseAutoencoder` config) and float32 tensors of a saev `sae.pt`.

    Reads the three header versions of samuelstevens/saev (PyPI `saev==0.1.0`): `{d_vit,
    exp_factor, l1_coeff, use_ghost_grads}`, `{d_vit, exp_factor, sparsity_coeff, ghost_grads}`
    and the `SparseAutoencoder` fields; absent keys take our defaults (saev's). The tensors are
    read with `torch.load(weights_only=True)`, which refuses to build anything but tensors and
    plain containers, so a malicious file cannot run code. InputError for anything else.
    """
    import torch  # Only here: loading sae.pt files.

    fpath = pathlib.Path(fpath)
    try:
        with open(fpath, "rb") as fd:
            line = fd.readline(_HEADER_LIMIT)
            rest = fd.read()
    except OSError as err:
        raise config.InputError(f"{fpath}: cannot read: {_first_line(err)}") from None
    try:
        if not line.endswith(b"\n"):
            raise ValueError("no header line")
        header = json.loads(line.decode())
    except (ValueError, UnicodeDecodeError):
        raise config.InputError(f"{fpath}: not a saev sae.pt (its first line is not a JSON header)") from None
    if not isinstance(header, dict):
        raise config.InputError(f"{fpath}: not a saev sae.pt (its JSON header is not an object)")
    if "schema" in header:
        raise config.InputError(
            f"{fpath}: a sae.pt of OSU-NLP-Group/saev, schema {header['schema']}: not supported "
            "(saev_jax reads samuelstevens/saev, PyPI saev 0.1.0, headers)"
        )
    sae_cfg = saev_header_to_cfg(header, f"{fpath} header")

    try:
        state = torch.load(io.BytesIO(rest), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise config.InputError(
            f"{fpath}: refused to unpickle anything but tensors: {_first_line(err)[:300]}"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, zipfile errors, ... for bad bytes
        raise config.InputError(
            f"{fpath}: cannot read the tensors after the header, truncated or not a sae.pt ({_first_line(err)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise config.InputError(f"{fpath}: the data after the header is not a state dict of tensors")
    names = set(TENSOR_NAMES)
    if set(state) != names:
        missing, extra = sorted(names - set(state)), sorted(set(state) - names)
        raise config.InputError(
            f"{fpath}: state dict must hold exactly {', '.join(TENSOR_NAMES)}; missing {missing}, unknown {extra}"
        )
    for name, t in state.items():
        if not t.is_floating_point():
            raise config.InputError(f"{fpath}: {name} must be a float tensor, got {t.dtype}")
    tensors = {name: state[name].detach().to(torch.float32).numpy().copy() for name in TENSOR_NAMES}
    _check_sae_shapes(
        tensors,
        sae_cfg.d_vit,
        sae_cfg.d_sae,
        f"{fpath} (header: d_vit = {sae_cfg.d_vit}, exp_factor = {sae_cfg.exp_factor})",
    )
    return sae_cfg, tensors


def saev_header_to_cfg(header: dict[str, object], where: str) -> config.SparseAutoencoder:
    """Our `SparseAutoencoder` config from a saev `sae.pt` header of any version; InputError naming `where`."""
    dct = {}
    for key, value in header.items():
        new = SAEV_RENAMED.get(key, key)
        if new in dct:
            raise config.InputError(f"{where}: both '{key}' and '{new}'")
        dct[new] = value
    for key in ("d_vit", "exp_factor"):
        if key not in dct:
            raise config.InputError(f"{where}: no '{key}'")
    sae_cfg = config.from_dict(config.SparseAutoencoder, dct, where=where)
    if sae_cfg.d_vit <= 0 or sae_cfg.exp_factor <= 0:
        raise config.InputError(f"{where}: d_vit and exp_factor must be positive")
    return sae_cfg


def load_saev(fpath: str | os.PathLike, precision: str = "float32") -> Checkpoint:
    """A saev `sae.pt` as a Checkpoint (see `read_saev`).

    saev does not store the preprocessing statistics: its tools recompute them from the shards.
    If saev's `cfg.json` lies beside the file and says `scale_mean = scale_norm = false` (as our
    `export --format saev` writes), the statistics are known (zeros and 1, with its clamp);
    otherwise `preprocess` is None and `missing` says so.
    """
    fpath = pathlib.Path(fpath)
    sae_cfg, tensors = read_saev(fpath)
    cfg = None
    cfg_fpath = fpath.parent / CFG_FNAME
    if fpath.name == SAEV_FNAME and cfg_fpath.is_file():
        cfg = _read_cfg(cfg_fpath)
        if cfg.sae != sae_cfg:
            logger.warning("%s: its [sae] table differs from %s's header; using the header", cfg_fpath, fpath)
        cfg = dataclasses.replace(cfg, sae=sae_cfg)
    preprocess = None
    if cfg is not None and cfg.data.scale_mean is False and cfg.data.scale_norm is False:
        preprocess = data.Preprocess(cfg.data.clamp, np.zeros(sae_cfg.d_vit, np.float32), 1.0)
    if cfg is None:
        cfg = config.Train(sae=sae_cfg)
        missing = ("preprocess", "freqs", "cfg")
    else:
        missing = ("freqs",) if preprocess is not None else ("preprocess", "freqs")
    if cfg.sae.kind != "relu":  # saev's SparseAutoencoder has no kind: a header naming one is not saev's.
        raise config.InputError(f"{fpath}: sae.kind = {cfg.sae.kind}, but a saev sae.pt holds a ReLU SAE")
    return Checkpoint(
        kinds.make_inference(cfg, tensors, {}, precision), preprocess, None, cfg, f"{fpath} (saev sae.pt)", missing
    )


def write_saev(fd, sae_cfg: config.SparseAutoencoder, tensors: dict[str, np.ndarray]) -> None:
    """Writes a `sae.pt` exactly as saev's `nn.dump`: `json.dumps(vars(cfg))`, a newline, `torch.save(state_dict)`."""
    import torch  # Only here: writing sae.pt files.

    expected = {
        "W_enc": (sae_cfg.d_vit, sae_cfg.d_sae),
        "b_enc": (sae_cfg.d_sae,),
        "W_dec": (sae_cfg.d_sae, sae_cfg.d_vit),
        "b_dec": (sae_cfg.d_vit,),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"write_saev: {name} has shape {tensors[name].shape}, header says {shape}")
    if sae_cfg.kind != "relu":
        raise config.InputError(f"sae.kind = {sae_cfg.kind}: saev's sae.pt holds ReLU SAEs only")
    header = {name: getattr(sae_cfg, name) for name in SAEV_FIELDS}
    fd.write((json.dumps(header) + "\n").encode("utf-8"))
    # The same object torch.nn.Module.state_dict() returns, so the bytes match saev's own dump.
    state = collections.OrderedDict(
        (name, torch.from_numpy(np.array(tensors[name], dtype=np.float32, order="C", copy=True)))
        for name in TENSOR_NAMES
    )
    state._metadata = collections.OrderedDict([("", {"version": 1})])
    torch.save(state, fd)


# --------------------------------------------------------------------------- folding


def fold(
    sae: "kinds.Kind | kinds.Inference", preprocess: data.Preprocess | None
) -> dict[str, Float[np.ndarray, "..."]]:
    """Raw-space weights (SPEC 10): the SAE and its mean and scalar as one SAE on raw activations.

    With m = act_mean, s = scalar: `W_enc / s`, `b_enc`, `s * W_dec`, `s * b_dec + m`, computed in
    float64 and returned as float32. An encoder `relu((x - b_dec) @ W_enc + b_enc)` then gives our
    features on raw x and the decoder gives reconstructions in raw units. The clamp cannot be
    folded; it only matters for entries beyond it. `preprocess=None` returns the weights unchanged.
    """
    W_enc, b_enc, W_dec, b_dec = (np.asarray(getattr(sae, name), np.float64) for name in TENSOR_NAMES)
    if preprocess is not None:
        m, s = np.asarray(preprocess.act_mean, np.float64), float(preprocess.scalar)
        W_enc, W_dec, b_dec = W_enc / s, s * W_dec, s * b_dec + m
    return {name: t.astype(np.float32) for name, t in zip(TENSOR_NAMES, (W_enc, b_enc, W_dec, b_dec))}
