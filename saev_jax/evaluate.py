"""Evaluates a stack of SAEs in one pass over the data: feature frequencies, L0, L1, MSE, quality.

One jitted reduction per batch updates running sums for every SAE of the stack at once;
`quality` (bits per example saved by coding the data through the SAE, see `quality.py` and
`docs/quality.md`) is computed on the host from those sums.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
import wandb
from jaxtyping import Array, Float, Int

from . import config, data, kinds
from . import quality as quality_lib
from . import sae as sae_lib


QUALITY_EXAMPLES = 2**18
"""evaluate() measures `quality` on evenly spaced batches of at least this many examples in all."""


@dataclasses.dataclass(frozen=True)
class EvalMetrics:
    """Results of evaluating a trained SAE on a dataset."""

    l0: float
    """Mean L0 across all examples."""
    l1: float
    """Mean L1 across all examples."""
    mse: float
    """Mean MSE across all examples."""
    n_dead: int
    """Number of features that never fired on any example."""
    n_almost_dead: int
    """Number of features that fired on fewer than `almost_dead_threshold` of examples."""
    n_dense: int
    """Number of features that fired on more than `dense_threshold` of examples."""
    freqs: Float[np.ndarray, " d_sae"]
    """How often each feature fired."""
    mean_values: Float[np.ndarray, " d_sae"]
    """The mean value of each feature when it fired (NaN for a feature that never fired)."""
    almost_dead_threshold: float
    """Threshold for an "almost dead" feature."""
    dense_threshold: float
    """Threshold for a dense feature."""
    l0_batch: float | None = None
    """Mean L0 of the training form (BatchTopK, Matryoshka: the k * B largest of each full batch; None
    without a full batch); for the other kinds the same as l0."""
    quality: float = math.nan
    """Bits per example saved by sending the data through this SAE instead of raw (higher is better; docs/quality.md)."""

    def to_json(self) -> dict[str, float | int]:
        """The scalar fields, for `metrics.json`."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("freqs", "mean_values")
        }

    def for_wandb(self) -> dict[str, object]:
        """`eval/<field>` keys; the two per-feature arrays as wandb tables."""
        dct = self.to_json() | {
            "freqs": wandb.Table(columns=["freq"], data=self.freqs[:, None].tolist()),
            "mean_values": wandb.Table(columns=["mean_value"], data=self.mean_values[:, None].tolist()),
        }
        return {f"eval/{key}": value for key, value in dct.items()}


class _Sums(eqx.Module):
    """Running sums of one evaluation pass on the device: per SAE (leading M axis) and of the data.

    The `code_*` sums feed `quality` and are taken on every `quality_stride`-th batch only. For
    each pruning level t (`quality.PRUNE_LEVELS`) a feature counts as sent when
    f * |W_dec row| > level_t * rms(x); with f_t the sent values, z = f_t @ W_dec,
    u = 1[sent] @ W_dec and e = x - b_dec - z, they hold per level the sent counts and values,
    e.e, (z.z, z.u, u.u) and (e.z, e.u): what `quality.debias` needs.
    """

    n_fired: Int[Array, "M d_sae"]
    values: Float[Array, "M d_sae"]
    sq_err: Float[Array, " M"]
    x_sum: Float[Array, " d_vit"]
    x_sq_sum: Float[Array, " d_vit"]
    code_n: Int[Array, ""]
    code_n_fired: Int[Array, "M T d_sae"]
    code_values: Float[Array, "M T d_sae"]
    code_sq_err: Float[Array, "M T"]
    code_gram: Float[Array, "M T 3"]
    code_cross: Float[Array, "M T 2"]
    batch_n: Int[Array, ""]
    batch_fired: Int[Array, " M"]


@dataclasses.dataclass(frozen=True)
class PassStats:
    """The sums of one evaluation pass, on the host in float64; everything EvalMetrics derives from."""

    n: int
    """Number of examples."""
    n_fired: Float[np.ndarray, "M d_sae"]
    values: Float[np.ndarray, "M d_sae"]
    sq_err: Float[np.ndarray, " M"]
    x_sum: Float[np.ndarray, " d_vit"]
    x_sq_sum: Float[np.ndarray, " d_vit"]
    code_n: int
    """Number of examples the `code_*` sums are over."""
    code_n_fired: Float[np.ndarray, "M T d_sae"]
    code_values: Float[np.ndarray, "M T d_sae"]
    code_sq_err: Float[np.ndarray, "M T"]
    code_gram: Float[np.ndarray, "M T 3"]
    code_cross: Float[np.ndarray, "M T 2"]
    batch_n: int
    """Number of examples (in full batches) the `batch_fired` counts are over."""
    batch_fired: Float[np.ndarray, " M"]
    """Activations that fired in the training form (batch-coupled kinds only; else 0)."""
    w_dec_norms: Float[np.ndarray, "M d_sae"]
    """L2 norm of every decoder row, from the parameters as evaluated."""

    @property
    def d_vit(self) -> int:
        return self.x_sum.shape[0]

    @property
    def data_var(self) -> float:
        """Mean over dimensions of the variance of the preprocessed data."""
        mean = self.x_sum / self.n
        return float(np.mean(self.x_sq_sum / self.n - mean**2))


def _zero_sums(n_saes: int, d_sae: int, d_vit: int) -> _Sums:
    T = len(quality_lib.PRUNE_LEVELS)
    return _Sums(
        n_fired=jnp.zeros((n_saes, d_sae), jnp.int32),
        values=jnp.zeros((n_saes, d_sae), jnp.float32),
        sq_err=jnp.zeros(n_saes, jnp.float32),
        x_sum=jnp.zeros(d_vit, jnp.float32),
        x_sq_sum=jnp.zeros(d_vit, jnp.float32),
        code_n=jnp.zeros((), jnp.int32),
        code_n_fired=jnp.zeros((n_saes, T, d_sae), jnp.int32),
        code_values=jnp.zeros((n_saes, T, d_sae), jnp.float32),
        code_sq_err=jnp.zeros((n_saes, T), jnp.float32),
        code_gram=jnp.zeros((n_saes, T, 3), jnp.float32),
        code_cross=jnp.zeros((n_saes, T, 2), jnp.float32),
        batch_n=jnp.zeros((), jnp.int32),
        batch_fired=jnp.zeros(n_saes, jnp.int32),
    )


def _code_sums(sae: sae_lib.SAE, x_BD, f_BS, rms_B1, valid_B1):
    """Per pruning level: sent counts and values, e.e, (z.z, z.u, u.u), (e.z, e.u) (see _Sums)."""
    norms_S = jnp.linalg.norm(sae.W_dec, axis=1)
    out = []
    for level in quality_lib.PRUNE_LEVELS:
        sent_BS = (f_BS * norms_S) > level * rms_B1
        f_t_BS = jnp.where(sent_BS, f_BS, 0.0)
        z_BD = sae.decode(f_t_BS) - sae.b_dec
        u_BD = sae.decode(sent_BS.astype(jnp.float32)) - sae.b_dec
        e_BD = jnp.where(valid_B1, x_BD - sae.b_dec - z_BD, 0.0)  # z and u are 0 on padding rows (f is)
        out.append((
            jnp.sum(sent_BS, axis=0, dtype=jnp.int32), jnp.sum(f_t_BS, axis=0), jnp.sum(e_BD * e_BD),
            jnp.stack([jnp.sum(z_BD * z_BD), jnp.sum(z_BD * u_BD), jnp.sum(u_BD * u_BD)]),
            jnp.stack([jnp.sum(e_BD * z_BD), jnp.sum(e_BD * u_BD)]),
        ))  # fmt: skip
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


@functools.partial(jax.jit, donate_argnums=0, static_argnames="with_code")
def _accumulate(
    sums: _Sums,
    saes: kinds.Inference,
    preprocess: data.Preprocess,
    x_BD: Float[Array, "B d_vit"],
    n_valid: Int[Array, ""],
    *,
    with_code: bool,
) -> _Sums:
    """Adds one raw batch (of which the first `n_valid` rows are real) to the sums of every SAE."""
    x_BD = preprocess(x_BD)
    valid_B1 = (jnp.arange(x_BD.shape[0]) < n_valid)[:, None]
    x_BD = jnp.where(valid_B1, x_BD, 0.0)
    rms_B1 = jnp.sqrt(jnp.mean(x_BD**2, axis=1, keepdims=True))

    def one(sae):
        x_hat_BD, f_BS = jax.vmap(sae)(x_BD)
        f_BS = jnp.where(valid_B1, f_BS, 0.0)
        sq_err = jnp.sum(jnp.where(valid_B1, (x_hat_BD - x_BD) ** 2, 0.0))
        basic = (jnp.sum(f_BS > 0, axis=0, dtype=jnp.int32), jnp.sum(f_BS, axis=0), sq_err)
        if type(sae.sae).batch_coupled:
            # The training form couples the examples of a batch: count full batches only.
            full = n_valid == x_BD.shape[0]
            basic += (jnp.where(full, jnp.sum(sae.encode_batch(x_BD) > 0, dtype=jnp.int32), 0),)
        else:
            basic += (jnp.zeros((), jnp.int32),)
        if not with_code:
            return basic, None
        return basic, _code_sums(sae, x_BD, f_BS, rms_B1, valid_B1)

    (n_fired, values, sq_err, batch_fired), code = jax.vmap(one)(saes)
    sums = eqx.tree_at(
        lambda s: (s.n_fired, s.values, s.sq_err, s.x_sum, s.x_sq_sum, s.batch_n, s.batch_fired),
        sums,
        (sums.n_fired + n_fired, sums.values + values, sums.sq_err + sq_err,
         sums.x_sum + jnp.sum(x_BD, axis=0), sums.x_sq_sum + jnp.sum(x_BD**2, axis=0),
         sums.batch_n + jnp.where(n_valid == x_BD.shape[0], n_valid, 0), sums.batch_fired + batch_fired),
    )  # fmt: skip
    if not with_code:
        return sums
    n_f, vals, se, gram, cross = code
    return eqx.tree_at(
        lambda s: (s.code_n, s.code_n_fired, s.code_values, s.code_sq_err, s.code_gram, s.code_cross),
        sums,
        (sums.code_n + n_valid, sums.code_n_fired + n_f, sums.code_values + vals, sums.code_sq_err + se,
         sums.code_gram + gram, sums.code_cross + cross),
    )  # fmt: skip


def evaluate(
    cfgs: list[config.Train],
    saes: "kinds.Inference | sae_lib.SAE",
    acts: data.Activations,
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    almost_dead_threshold: float = 1e-7,
    dense_threshold: float = 1e-2,
) -> list[EvalMetrics]:
    """Evaluates every SAE of a stack in one ordered pass over `acts`, with the parameters as given.

    Returns one EvalMetrics per SAE, in stack order (SPEC 4). The batches come from the fast
    loader without shuffling, `cfgs[0].sae_batch_size` examples each, the last one zero-padded.
    Everything is exact over the whole pass except `quality`, measured on evenly spaced batches
    totalling at least `QUALITY_EXAMPLES` examples (all of them on a smaller dataset).
    """
    cfg = cfgs[0]
    loader = data.Loader(acts, batch_size=cfg.sae_batch_size, shuffle=False, seed=cfg.seed, n_threads=cfg.n_workers, device=device)
    n_batches = -(-len(acts) // cfg.sae_batch_size)
    batches = tqdm.tqdm(loader, total=n_batches, desc="eval", unit="batch", dynamic_ncols=True)
    return evaluate_batches(
        saes, batches, preprocess, device,
        almost_dead_threshold=almost_dead_threshold, dense_threshold=dense_threshold,
        quality_stride=max(1, n_batches // -(-QUALITY_EXAMPLES // cfg.sae_batch_size)),
    )  # fmt: skip


def accumulate(
    saes: "kinds.Inference | sae_lib.SAE",
    batches: Iterable[tuple[Float[Array, "B d_vit"], int]],
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    quality_stride: int = 1,
) -> PassStats:
    """One pass over `(raw x_BD, n_valid)` batches, one jitted reduction per batch for the whole stack.

    Only the first `n_valid` rows of a batch count. Every batch should have the same shape (pad
    the last one), so the kernel compiles once (twice with a `quality_stride` > 1: the sums that
    `quality` needs cost about 2 * len(PRUNE_LEVELS) decoder products, so they are taken on
    every `quality_stride`-th batch only). Sums accumulate in float32 on the device and leave it
    once, at the end.
    """
    saes = kinds.as_inference(saes)
    n_saes, d_sae = saes.b_enc.shape
    d_vit = saes.b_dec.shape[1]
    sums = jax.device_put(_zero_sums(n_saes, d_sae, d_vit), device)
    n = 0
    for i, (x_BD, n_valid) in enumerate(batches):
        sums = _accumulate(sums, saes, preprocess, x_BD, jnp.asarray(n_valid, jnp.int32), with_code=i % quality_stride == 0)
        n += int(n_valid)
    if n == 0:
        raise ValueError("evaluate: no examples")
    host = {f.name: np.asarray(jax.device_get(getattr(sums, f.name)), np.float64) for f in dataclasses.fields(sums)}
    host["code_n"] = int(host["code_n"])
    host["batch_n"] = int(host["batch_n"])
    if not type(saes.sae).batch_coupled:
        host["batch_n"], host["batch_fired"] = n, host["n_fired"].sum(axis=1)  # the same as l0
    return PassStats(n=n, w_dec_norms=np.linalg.norm(np.asarray(saes.W_dec, np.float64), axis=-1), **host)


def metrics_from_stats(
    stats: PassStats, *, almost_dead_threshold: float = 1e-7, dense_threshold: float = 1e-2
) -> list[EvalMetrics]:
    """One EvalMetrics per SAE of the pass, in stack order (SPEC 4, plus `quality`)."""
    n, d_vit = stats.n, stats.d_vit
    freqs = stats.n_fired / n
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_values = stats.values / stats.n_fired
    return [
        EvalMetrics(
            l0=float(stats.n_fired[m].sum() / n),
            l0_batch=float(stats.batch_fired[m] / stats.batch_n) if stats.batch_n else None,
            l1=float(stats.values[m].sum() / n),
            mse=float(stats.sq_err[m] / (n * d_vit)),
            n_dead=int((freqs[m] == 0).sum()),
            n_almost_dead=int((freqs[m] < almost_dead_threshold).sum()),
            n_dense=int((freqs[m] > dense_threshold).sum()),
            freqs=freqs[m].astype(np.float32),
            mean_values=mean_values[m].astype(np.float32),
            almost_dead_threshold=almost_dead_threshold,
            dense_threshold=dense_threshold,
            quality=max(b.quality for b in code_bits(stats, m)),
        )
        for m in range(len(stats.sq_err))
    ]


def code_bits(stats: PassStats, m: int) -> list[quality_lib.Bits]:
    """The description-length terms of the m-th SAE's code at every pruning level (docs/quality.md)."""
    n, d_vit = stats.code_n, stats.d_vit
    out = []
    for t in range(len(quality_lib.PRUNE_LEVELS)):
        scale, shift, sq_err = quality_lib.debias(stats.code_sq_err[m, t], stats.code_gram[m, t], stats.code_cross[m, t])
        n_sent = stats.code_n_fired[m, t]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_values = stats.code_values[m, t] / n_sent
        out.append(quality_lib.description_bits(
            n_sent / n, scale * mean_values + shift, sq_err / (n * d_vit), stats.data_var, d_vit, stats.w_dec_norms[m]
        ))  # fmt: skip
    return out


def evaluate_batches(
    saes: "kinds.Inference | sae_lib.SAE",
    batches: Iterable[tuple[Float[Array, "B d_vit"], int]],
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    almost_dead_threshold: float = 1e-7,
    dense_threshold: float = 1e-2,
    quality_stride: int = 1,
) -> list[EvalMetrics]:
    """`evaluate` over any iterable of `(raw x_BD, n_valid)`: only the first `n_valid` rows count."""
    stats = accumulate(saes, batches, preprocess, device, quality_stride=quality_stride)
    return metrics_from_stats(stats, almost_dead_threshold=almost_dead_threshold, dense_threshold=dense_threshold)


# --------------------------------------------------------------------------- the command line
# `python -m saev_jax.evaluate CKPT... --data.shard-root DIR`: everything below only calls the
# public functions above, the checkpoint loader, plots and summary.
# Its imports are here, not at the top, to keep this section separate from the evaluation code.
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
from typing import Literal  # noqa: E402

import safetensors.numpy  # noqa: E402
import tyro  # noqa: E402


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Which shards to evaluate on. Unset fields take the checkpoint's training values (saev's defaults for a bare sae.pt)."""

    shard_root: str
    """Directory with `metadata.json` and `acts*.bin` shards."""
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
    sae_batch_size: int = 1024 * 16
    """Examples per evaluation batch."""
    n_workers: int = 8
    """Reader threads of the data loader."""
    device: str = "auto"
    """JAX platform: auto, cpu, gpu (or cuda) or tpu."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Matmul precision of the SAEs."""


def _eval_data(base: config.DataLoad, given: EvalData) -> config.DataLoad:
    overrides = {f.name: getattr(given, f.name) for f in dataclasses.fields(given) if getattr(given, f.name) is not None}
    return dataclasses.replace(base, **overrides)


def _unique_names(paths: list[pathlib.Path]) -> list[str]:
    names, seen = [], collections.Counter()
    for path in paths:
        name = path.parent.name if path.name == "sae.pt" or path.suffix == ".safetensors" else (path.name if path.is_dir() else path.stem)
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def evaluate_checkpoints(args: EvalArgs) -> list[tuple[str, config.Train, EvalMetrics]]:
    """Loads, groups (same shards, shape and statistics: one pass each), evaluates and writes; returns (name, cfg, metrics)."""
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
            base, data=_eval_data(base.data, args.data), sae_batch_size=args.sae_batch_size,
            n_workers=args.n_workers, device=args.device, precision=args.precision, ckpt_path=args.out,
        ))  # fmt: skip
    if args.sae_batch_size <= 0:
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
            raise config.InputError(f"{ckpt.source}: d_vit = {ckpt.sae.W_enc.shape[0]} but the shards in {cfg.data.shard_root} have d_vit = {acts.d_vit}")
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
        groups.setdefault((acts_key, ckpt.sae.W_enc.shape, stats_key), []).append(i)

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
            safetensors.numpy.save_file({k: np.asarray(v, np.float32) for k, v in arrays.items()}, dpath / "freqs.safetensors")
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
    import logging

    from saev_jax import evaluate  # Not this `__main__` copy: plots and summary know that module's EvalMetrics.

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    sys.exit(evaluate.main())
