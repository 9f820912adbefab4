"""Exports checkpoints to the formats other tools read, folded so raw activations go in (SPEC 10).

    python -m saev_jax.export RUN_DIR --format saev|saelens|sparsify --out PATH

RUN_DIR is one checkpoint (a saev_jax run directory, or a saev `sae.pt` or a directory holding
one) or a sweep directory (a `ckpt_path`): then every checkpoint in it is exported to
`PATH/<run id>/`. Formats:

- `saev`: `sae.pt` exactly as saev's `nn.load` (PyPI `saev==0.1.0`) reads it, plus saev's
  `cfg.json` saying `data.scale_mean = data.scale_norm = false` (the weights are folded, so its
  tools must not normalise again). `--out x.pt` writes one run's file alone. ReLU SAEs only.
- `saelens`: `cfg.json`, `sae_weights.safetensors` and, when the checkpoint has feature
  frequencies, `sparsity.safetensors` (log10 frequency), for SAELens v6 `SAE.load_from_disk`.
  ReLU as architecture `standard`, TopK as `topk` with its `k`; BatchTopK and Matryoshka as
  `jumprelu` with their inference threshold for every latent (as SAELens saves its own); JumpReLU
  as `jumprelu` with its thresholds.
- `sparsify`: `cfg.json` and `sae.safetensors` for EleutherAI sparsify's `Sae.load_from_disk`:
  TopK with its `k`; ReLU as top-k with k = d_sae (its `pre_acts` are then our features). The
  other kinds have no sparsify form and are refused.

Folding keeps the pre-activations: with the encoder subtracting `b_dec`, `(x - b_dec') @ W_enc' +
b_enc` on raw x equals ours on normalised x, so thresholds and the top-k need no change.

Everything is written under a temporary name and renamed into place: PATH holds the whole
export or nothing. PATH must not exist. Bad input prints one line and exits with status 2.
"""

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys

import numpy as np
import safetensors.numpy

from . import checkpoint, config, data

logger = logging.getLogger(__name__)

FORMATS = ("saev", "saelens", "sparsify")
KINDS_BY_FORMAT = {
    "saev": ("relu",),
    "saelens": ("relu", "topk", "batchtopk", "matryoshka", "jumprelu"),
    "sparsify": ("relu", "topk"),
}
"""The SAE kinds each format can hold."""
SAELENS_ARCHITECTURES = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "jumprelu": "jumprelu",
}
"""The SAELens v6 architecture each kind is exported as."""
SAELENS_VERSION = "6.0.0"
"""Written as `metadata.sae_lens_version`: SAELens reads the config as v6 only from 6.0.0 on."""


def find_checkpoints(path: str | os.PathLike) -> tuple[list[pathlib.Path], bool]:
    """The checkpoints at `path` and whether it is a sweep directory.

    A checkpoint (see `checkpoint.is_checkpoint`) gives itself; a directory that is not one gives
    its checkpoint subdirectories, in name order. InputError if there is none.
    """
    path = pathlib.Path(path)
    if checkpoint.is_checkpoint(path):
        return [path], False
    if not path.is_dir():
        raise config.InputError(f"{path}: no such checkpoint file or directory")
    runs = sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and checkpoint.is_checkpoint(p)
    )
    if not runs:
        raise config.InputError(
            f"{path}: not a checkpoint, and no subdirectory is one (no {checkpoint.SAE_FNAME} or {checkpoint.SAEV_FNAME})"
        )
    return runs, True


def run_name(path: pathlib.Path) -> str:
    """The name of a checkpoint in a sweep export: its directory's (the run id), or a file's stem."""
    return path.name if path.is_dir() else path.stem


def write_saev(ckpt: checkpoint.Checkpoint, out: pathlib.Path) -> None:
    """saev's `sae.pt` (at `out`, a `.pt` path, or `out/sae.pt` with saev's `cfg.json` beside it).

    Folded into raw space when the checkpoint has its statistics; else the weights are written
    as they are and saev's tools must recompute the statistics from the shards, as saev does.
    """
    _check_kind(ckpt, "saev")
    weights = checkpoint.fold(ckpt.sae, ckpt.preprocess)
    cfg = ckpt.cfg or config.Train(
        sae=config.SparseAutoencoder(
            d_vit=ckpt.sae.W_enc.shape[0], exp_factor=ckpt.sae.W_enc.shape[1] // ckpt.sae.W_enc.shape[0]
        )
    )
    if ckpt.preprocess is None:
        logger.warning(
            "%s: no statistics to fold; sae.pt holds the normalised-space weights (pass saev the data flags it trained with)",
            ckpt.source,
        )
    else:
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, scale_mean=False, scale_norm=False, clamp=float(ckpt.preprocess.clamp)),
        )
    if cfg.sae.d_sae != weights["W_enc"].shape[1]:
        raise config.InputError(
            f"{ckpt.source}: d_sae = {weights['W_enc'].shape[1]} is not d_vit * exp_factor, saev's header cannot say it"
        )
    fpath = out if out.suffix == ".pt" else out / checkpoint.SAEV_FNAME
    fpath.parent.mkdir(parents=True, exist_ok=True)
    with open(fpath, "wb") as fd:
        checkpoint.write_saev(fd, cfg.sae, weights)
    if out.suffix != ".pt":
        (out / checkpoint.CFG_FNAME).write_text(json.dumps(config.to_dict(cfg), indent=4) + "\n")


def _require_stats(ckpt: checkpoint.Checkpoint, fmt: str) -> data.Preprocess:
    if ckpt.preprocess is None:
        raise config.InputError(
            f"{ckpt.source}: no preprocessing statistics to fold into the {fmt} weights (only --format saev can export it unfolded)"
        )
    return ckpt.preprocess


def _check_kind(ckpt: checkpoint.Checkpoint, fmt: str) -> None:
    if ckpt.kind not in KINDS_BY_FORMAT[fmt]:
        raise config.InputError(
            f"{ckpt.source}: a {ckpt.kind} SAE cannot be exported as {fmt} (it holds {', '.join(KINDS_BY_FORMAT[fmt])} SAEs)"
        )


def _threshold(ckpt: checkpoint.Checkpoint) -> np.ndarray:
    """The per-latent inference threshold on the pre-activations `h`, for SAELens' `jumprelu`.

    SAELens computes `relu(h) * 1[h > threshold]`. For JumpReLU that is ours (`h * 1[h > theta]`, theta > 0).
    BatchTopK's `relu(h) * 1[relu(h) > theta]` is the same for theta >= 0; a threshold not yet set
    (negative: no training batch) is plain ReLU, which threshold 0 gives.
    """
    (threshold,) = ckpt.sae.sae.inference_tensors(ckpt.sae.kind_state).values()
    return np.maximum(np.asarray(threshold, np.float32), 0.0)


def _provenance(ckpt: checkpoint.Checkpoint) -> dict[str, object]:
    """What the export came from, for the free-form metadata of the peer formats."""
    p = ckpt.preprocess
    out: dict[str, object] = {"source": ckpt.source, "folded": p is not None}
    if p is not None:
        out |= {"clamp": float(p.clamp), "scalar": float(p.scalar)}
    if ckpt.cfg is not None:
        name, value = ckpt.cfg.sae.setting
        out |= {"data": config.to_dict(ckpt.cfg.data), "kind": ckpt.kind, name: value, "lr": ckpt.cfg.lr}
    return out


def write_saelens(ckpt: checkpoint.Checkpoint, out: pathlib.Path) -> None:
    """SAELens v6's folder: `cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors` (if frequencies)."""
    weights = checkpoint.fold(ckpt.sae, _require_stats(ckpt, "saelens"))
    d_in, d_sae = weights["W_enc"].shape
    cfg = ckpt.cfg or config.Train()
    metadata = None
    try:
        metadata = data.Metadata.load(cfg.data.shard_root)
    except config.InputError:
        pass  # The shards need not be at hand; the names fall back to the config's.
    layer = cfg.data.layer
    architecture = SAELENS_ARCHITECTURES[ckpt.kind]
    if architecture == "jumprelu":
        # Folding leaves the pre-activations as they were (see the module docstring): the threshold too.
        weights["threshold"] = _threshold(ckpt)
    saelens_cfg = {
        "architecture": architecture,
        **({"k": int(cfg.sae.k)} if architecture == "topk" else {}),
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": metadata.model_ckpt if metadata else "unknown",
            # saev records each block's output: the residual stream after the block.
            "hook_name": f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else f"blocks.{layer}",
            "hook_head_index": None,
            "context_size": (metadata.n_patches_per_img + int(metadata.cls_token)) if metadata else None,
            "prepend_bos": False,
            "dataset_path": metadata.data if metadata else cfg.data.shard_root,
            "neuronpedia_id": None,
            "saev_jax": _provenance(ckpt),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.json").write_text(json.dumps(saelens_cfg, indent=2) + "\n")
    safetensors.numpy.save_file(weights, out / "sae_weights.safetensors", metadata={"format": "pt"})
    if ckpt.freqs is None:
        logger.warning("%s: no feature frequencies; no sparsity.safetensors written", ckpt.source)
    else:
        sparsity = np.log10(np.asarray(ckpt.freqs, np.float64) + 1e-10).astype(np.float32)
        safetensors.numpy.save_file({"sparsity": sparsity}, out / "sparsity.safetensors", metadata={"format": "pt"})


def write_sparsify(ckpt: checkpoint.Checkpoint, out: pathlib.Path) -> None:
    """sparsify's folder: `cfg.json` and `sae.safetensors`; TopK with its k, ReLU as top-k with k = d_sae."""
    _check_kind(ckpt, "sparsify")
    weights = checkpoint.fold(ckpt.sae, _require_stats(ckpt, "sparsify"))
    d_in, d_sae = weights["W_enc"].shape
    k = ckpt.cfg.sae.k if ckpt.kind == "topk" else d_sae
    sparsify_cfg = {
        "activation": "topk", "expansion_factor": max(1, d_sae // d_in), "normalize_decoder": False,
        "num_latents": int(d_sae), "k": int(k), "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": int(d_in),
    }  # fmt: skip
    tensors = {
        "encoder.weight": np.ascontiguousarray(weights["W_enc"].T),
        "encoder.bias": weights["b_enc"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.json").write_text(json.dumps(sparsify_cfg, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, out / "sae.safetensors", metadata={"format": "pt"})


WRITERS = {"saev": write_saev, "saelens": write_saelens, "sparsify": write_sparsify}


def export(run_dpath: str | os.PathLike, fmt: str, out: str | os.PathLike) -> list[pathlib.Path]:
    """Exports the checkpoint(s) at `run_dpath` to `out` in format `fmt`; returns what was written.

    Every checkpoint is read and checked before anything is written; the export is built under a
    temporary sibling name and renamed to `out` at the end, so `out` is complete or absent.
    """
    if fmt not in WRITERS:
        raise config.InputError(f"--format {fmt!r}: unknown format (one of {', '.join(FORMATS)})")
    out = pathlib.Path(out)
    if out.exists():
        raise config.InputError(f"{out}: exists already (not overwritten)")
    paths, is_sweep = find_checkpoints(run_dpath)
    ckpts = [checkpoint.load(p) for p in paths]
    for ckpt in ckpts:
        _check_kind(ckpt, fmt)
    if fmt != "saev":
        for ckpt in ckpts:
            _require_stats(ckpt, fmt)
    if is_sweep and out.suffix == ".pt":
        raise config.InputError(f"{out}: a sweep exports to a directory, not one .pt file")
    if out.suffix == ".pt" and fmt != "saev":
        raise config.InputError(f"{out}: only --format saev writes a .pt file; give a directory")
    names = [run_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise config.InputError(f"{run_dpath}: two checkpoints share a name")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")  # Same suffix: `x.pt` stays a file.
    try:
        if is_sweep:
            targets = [tmp / name for name in names]
        else:
            targets = [tmp]
        for ckpt, target in zip(ckpts, targets):
            WRITERS[fmt](ckpt, target)
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
    return [out / name for name in names] if is_sweep else [out]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # One line and status 2, like every other bad input.
        raise config.InputError(message)


def main(argv: list[str] | None = None) -> int:
    """`python -m saev_jax.export RUN_DIR --format FMT --out PATH`; returns the exit status."""
    parser = _Parser(
        prog="python -m saev_jax.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a checkpoint (directory or sae.pt) or a sweep directory of them")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument(
        "--out", required=True, help="where to write (must not exist); a directory, or x.pt for one saev file"
    )
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        written = export(args.run_dir, args.format, args.out)
    except config.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    sys.exit(main())
