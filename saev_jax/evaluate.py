"""`python -m saev_jax.evaluate CKPT... [--data.shard-root DIR] [--out DIR]`: evaluates checkpoints.

The command over `evaluation.py`: it loads saev_jax run directories or saev `sae.pt` files, groups
them into one pass per shard set, statistics, kind and shape, and writes per checkpoint
`metrics.json`, `cfg.json` and `freqs.safetensors`, then the group figures and `summary.csv`.
"""

import collections
import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tyro

from . import config, data
from .evaluation import evaluate
from .metrics import EvalMetrics


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Which shards to evaluate on. Unset fields take the checkpoint's training values (saev's defaults for a bare sae.pt)."""

    shard_root: str | None = None
    """Directory with `metadata.json` and `acts*.bin` shards (default: the checkpoint's, from its cfg.json)."""
    patches: Literal["cls", "patches", "meanpool"] | None = None
    """Which tokens an example is made of."""
    layer: int | Literal["all", "meanpool"] | None = None
    """Which recorded layer."""
    clamp: float | None = None
    """Clamp for statistics computed here (checkpoints without saved statistics, or --recompute-stats)."""
    n_random_samples: int | None = None
    """Sample size for statistics computed here."""
    scale_mean: bool | str | None = None
    """Mean for statistics computed here: estimate (True), none (False), or a file."""
    scale_norm: bool | str | None = None
    """Scalar for statistics computed here: estimate (True), none (False), or a file."""


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Evaluates checkpoints (saev_jax's, or saev's sae.pt) on a shard set, with training's metrics,
    histograms, quality and summary table. Each checkpoint's saved preprocessing is used; one without
    it (sae.pt, or written before it was saved) gets statistics computed from these shards, as saev does."""

    ckpts: tyro.conf.Positional[tuple[str, ...]]
    """Checkpoints: run directories, sae.pt files or directories holding them, or sweep directories."""
    data: EvalData
    """The shard set."""
    out: str = os.path.join(".", "evaluations")
    """Where `<name>/{metrics.json, cfg.json, freqs.safetensors, hists.png}`, the group figures and summary.csv go."""
    recompute_stats: bool = False
    """Compute the statistics from these shards (with the --data flags) even for checkpoints that saved theirs."""
    sae_batch_size: int | None = None
    """Examples per evaluation batch (default: each checkpoint's training batch size, which BatchTopK's
    batch-mode `l0_batch` depends on; saev's 16384 for a bare sae.pt)."""
    n_workers: int = 8
    """Reader threads of the data loader."""
    device: str = "auto"
    """JAX platform: auto, cpu, gpu (or cuda) or tpu."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Matmul precision of the SAEs."""


def _eval_data(base: config.DataLoad, given: EvalData) -> config.DataLoad:
    overrides = {
        f.name: getattr(given, f.name) for f in dataclasses.fields(given) if getattr(given, f.name) is not None
    }
    return dataclasses.replace(base, **overrides)


def _unique_names(paths: list[pathlib.Path]) -> list[str]:
    names, seen = [], collections.Counter()
    for path in paths:
        name = (
            path.parent.name
            if path.name == "sae.pt" or path.suffix == ".safetensors"
            else (path.name if path.is_dir() else path.stem)
        )
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def evaluate_checkpoints(args: EvalArgs) -> list[tuple[str, config.Train, EvalMetrics]]:
    """Loads, groups (same shards, batch size, statistics, kind and shape: one pass each), evaluates each
    SAE in its kind's inference form and writes; returns (name, cfg, metrics)."""
    from . import checkpoint, export, plan, plots, summary

    if not args.ckpts:
        raise config.InputError("no checkpoints given")
    paths = [p for arg in args.ckpts for p in export.find_checkpoints(arg)[0]]
    ckpts = [checkpoint.load(p, args.precision) for p in paths]  # all checked before any pass
    names = _unique_names(paths)
    cfgs = []
    for ckpt in ckpts:
        d_vit, d_sae = ckpt.sae.W_enc.shape
        base = ckpt.cfg or config.Train(sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=max(1, d_sae // d_vit)))
        cfgs.append(dataclasses.replace(
            base, data=_eval_data(base.data, args.data), sae_batch_size=args.sae_batch_size or base.sae_batch_size,
            n_workers=args.n_workers, device=args.device, precision=args.precision, ckpt_path=args.out,
        ))  # fmt: skip
    if args.sae_batch_size is not None and args.sae_batch_size <= 0:
        raise config.InputError(f"sae_batch_size = {args.sae_batch_size}: must be positive")
    device = plan.get_devices(dataclasses.replace(cfgs[0], n_devices=1))[0]  # One device evaluates.

    opened: dict[str, data.Activations] = {}
    stats: dict[str, data.Preprocess] = {}
    groups: dict[tuple, list[int]] = {}
    for i, (ckpt, cfg) in enumerate(zip(ckpts, cfgs)):
        acts_key = json.dumps([cfg.data.shard_root, cfg.data.patches, cfg.data.layer])
        if acts_key not in opened:
            opened[acts_key] = data.Activations(cfg.data)
        acts = opened[acts_key]
        if acts.d_vit != ckpt.sae.W_enc.shape[0]:
            raise config.InputError(
                f"{ckpt.source}: d_vit = {ckpt.sae.W_enc.shape[0]} but the shards in {cfg.data.shard_root} have d_vit = {acts.d_vit}"
            )
        if ckpt.preprocess is not None and not args.recompute_stats:
            preprocess, stats_key = ckpt.preprocess, ("saved", i)
        else:
            stats_key = ("computed", json.dumps(config.to_dict(cfg.data)))
            if stats_key[1] not in stats:
                stats[stats_key[1]] = data.make_preprocess(acts, cfg.data)
            preprocess = stats[stats_key[1]]
        if stats_key[0] == "saved":
            # Checkpoints of one training group saved the same statistics: one pass serves them all.
            arrays = [np.asarray(getattr(preprocess, n)) for n in ("clamp", "act_mean", "scalar")]
            stats_key = ("saved", b"".join(a.tobytes() for a in arrays))
            stats.setdefault(stats_key[1], preprocess)
        # One stack per kind and shape (and static structure, e.g. Matryoshka's block ends).
        stack_key = (ckpt.kind, ckpt.sae.W_enc.shape, jax.tree.structure(ckpt.sae), cfg.sae_batch_size)
        groups.setdefault((acts_key, stack_key, stats_key), []).append(i)

    out = pathlib.Path(args.out)
    results: list[EvalMetrics | None] = [None] * len(ckpts)
    for (acts_key, _, stats_key), indices in groups.items():
        saes = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[ckpts[i].sae for i in indices])
        group_cfgs = [cfgs[i] for i in indices]
        for i, r in zip(indices, evaluate(group_cfgs, saes, opened[acts_key], stats[stats_key[1]], device)):
            results[i] = r
        for i in indices:
            dpath = out / names[i]
            dpath.mkdir(parents=True, exist_ok=True)
            note = {"checkpoint": ckpts[i].source, "stats": stats_key[0]}
            (dpath / "metrics.json").write_text(json.dumps(results[i].to_json() | note, indent=2) + "\n")
            (dpath / "cfg.json").write_text(json.dumps(config.to_dict(cfgs[i]), indent=2) + "\n")
            arrays = {"freqs": results[i].freqs, "mean_values": results[i].mean_values}
            safetensors.numpy.save_file(
                {k: np.asarray(v, np.float32) for k, v in arrays.items()}, dpath / "freqs.safetensors"
            )
        plots.save_plots(out, [names[i] for i in indices], group_cfgs, [results[i] for i in indices])
    entries = [(name, cfg, r) for name, cfg, r in zip(names, cfgs, results)]
    summary.write_summary(out, entries)
    return entries


def main(argv: list[str] | None = None) -> int:
    """`python -m saev_jax.evaluate CKPT... --data.shard-root DIR [...]`; returns the exit status."""
    args = tyro.cli(EvalArgs, args=sys.argv[1:] if argv is None else argv, prog="python -m saev_jax.evaluate")
    try:
        evaluate_checkpoints(args)
    except config.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    sys.exit(main())
