"""Trains many SAEs at once on one stream of activations.

Configs that agree on every key in `config.CANNOT_PARALLELIZE` form a group; a group
trains as one stack of SAEs in one jitted, vmapped step, so each batch read from disk
serves every SAE of the group. Groups train one after another.

    python -m saev_jax.train sweeps/x.toml --data.shard-root DIR [--lr 1e-3 ...]
"""

import functools
import logging
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
import tyro
from jaxtyping import Array, Bool, Float, Int

from . import config, data, evaluate, optim, plots, summary, wandb_queue
from . import sae as sae_lib

logger = logging.getLogger(__name__)


class Hparams(eqx.Module):
    """What may differ between the SAEs of a group: one entry per SAE."""

    lr: Float[Array, " M"]
    n_lr_warmup: Int[Array, " M"]
    sparsity_coeff: Float[Array, " M"]
    n_sparsity_warmup: Int[Array, " M"]
    normalize_w_dec: Bool[Array, " M"]
    remove_parallel_grads: Bool[Array, " M"]

    @classmethod
    def from_cfgs(cls, cfgs: list[config.Train]) -> "Hparams":
        return cls(
            lr=jnp.array([c.lr for c in cfgs], dtype=jnp.float32),
            n_lr_warmup=jnp.array([c.n_lr_warmup for c in cfgs], dtype=jnp.int32),
            sparsity_coeff=jnp.array([c.sae.sparsity_coeff for c in cfgs], dtype=jnp.float32),
            n_sparsity_warmup=jnp.array([c.n_sparsity_warmup for c in cfgs], dtype=jnp.int32),
            normalize_w_dec=jnp.array([c.sae.normalize_w_dec for c in cfgs]),
            remove_parallel_grads=jnp.array([c.sae.remove_parallel_grads for c in cfgs]),
        )


class TrainState(eqx.Module):
    """Everything that changes while a group trains.

    There is no PRNG key: nothing in the step is random. The only randomness after
    initialisation is the data order, a function of the group's seed and `step`.
    """

    saes: sae_lib.SAE
    opt_state: optax.OptState
    step: Int[Array, ""]


def make_state(saes: sae_lib.SAE, hparams: Hparams) -> TrainState:
    """A fresh state: step 0 and each SAE's optimizer state initialised from its own parameters."""

    def init_one(sae, hp):
        return optim.make_optimizer(hp.lr, hp.n_lr_warmup, hp.remove_parallel_grads).init(sae)

    opt_state = jax.vmap(init_one)(saes, hparams)
    return TrainState(saes=saes, opt_state=opt_state, step=jnp.zeros((), jnp.int32))


def _step_one(sae, opt_state, hp: Hparams, x_BD, step):
    """One SAE's update: SPEC 3 steps 1-4. Every argument but x_BD and step is this SAE's own."""
    W_dec = jnp.where(hp.normalize_w_dec, sae.normalize_w_dec().W_dec, sae.W_dec)
    sae = eqx.tree_at(lambda s: s.W_dec, sae, W_dec)
    sparsity_coeff = optim.warmup(hp.sparsity_coeff, hp.n_sparsity_warmup)(step)
    (_, metrics), grads = eqx.filter_value_and_grad(sae_lib.loss, has_aux=True)(sae, x_BD, sparsity_coeff)
    optimizer = optim.make_optimizer(hp.lr, hp.n_lr_warmup, hp.remove_parallel_grads)
    updates, opt_state = optimizer.update(grads, opt_state, sae)
    sae = eqx.apply_updates(sae, updates)
    metrics |= {
        "learning_rate": optim.warmup(hp.lr, hp.n_lr_warmup)(step),
        "sparsity_coeff": sparsity_coeff,
    }
    return sae, opt_state, metrics


@functools.partial(jax.jit, donate_argnums=0)
def train_step(
    state: TrainState, hparams: Hparams, preprocess: data.Preprocess, x_BD: Float[Array, "B d_vit"]
) -> tuple[TrainState, dict[str, Float[Array, " M"]]]:
    """One optimizer step of every SAE of the stack on the same raw batch.

    Returns the new state and a dict of `[M]` metrics measured before the update.
    """
    x_BD = preprocess(x_BD)
    step_all = jax.vmap(_step_one, in_axes=(0, 0, 0, None, None))
    saes, opt_state, metrics = step_all(state.saes, state.opt_state, hparams, x_BD, state.step)
    return TrainState(saes=saes, opt_state=opt_state, step=state.step + 1), metrics


def init_b_dec(saes: sae_lib.SAE, cfgs: list[config.Train], acts: data.Activations, preprocess: data.Preprocess) -> sae_lib.SAE:
    """Sets each SAE's b_dec to the mean of the first `n_reinit_samples` examples of one permutation.

    The permutation is drawn with the first config's `sae.seed` (as saev does) and one
    read of the largest count serves the whole group. SAEs with `n_reinit_samples = 0`
    keep their b_dec.
    """
    counts = [c.sae.n_reinit_samples for c in cfgs]
    n_max = min(max(counts), len(acts))
    if n_max == 0:
        return saes
    perm = np.random.default_rng(cfgs[0].sae.seed).permutation(len(acts))[:n_max]
    sum_fn = jax.jit(lambda x_BD: jnp.sum(preprocess(x_BD), axis=0))

    # Prefix sums of the permutation at every count some SAE asks for.
    bounds = sorted({min(n, n_max) for n in counts} | {0})
    prefix = {0: np.zeros(acts.d_vit, np.float64)}
    running = np.zeros(acts.d_vit, np.float64)
    chunk = 1 << 15
    for lo, hi in zip(bounds, bounds[1:]):
        for start in range(lo, hi, chunk):
            idx = np.sort(perm[start : min(start + chunk, hi)])  # Sorted reads are faster; sums don't care.
            running += np.asarray(sum_fn(acts.read(idx)), np.float64)
        prefix[hi] = running.copy()

    b_dec_MD = np.array(saes.b_dec)
    for m, n in enumerate(counts):
        if n > 0:
            n = min(n, n_max)
            b_dec_MD[m] = prefix[n] / n
    return eqx.tree_at(lambda s: s.b_dec, saes, jnp.asarray(b_dec_MD, jnp.float32))


def n_train_steps(cfg: config.Train) -> int:
    """Steps until more than `n_patches` examples have been seen (saev's BatchLimiter)."""
    return cfg.n_patches // cfg.sae_batch_size + 1


def train(
    cfgs: list[config.Train],
    acts: data.Activations,
    preprocess: data.Preprocess,
    run: wandb_queue.ParallelWandbRun,
    device: jax.Device,
) -> TrainState:
    """Trains one group of configs as one stack; logs through `run`; returns the final state."""
    cfg = cfgs[0]
    hparams = jax.device_put(Hparams.from_cfgs(cfgs), device)
    saes = sae_lib.make_saes([c.sae for c in cfgs], cfg.precision)
    saes = init_b_dec(saes, cfgs, acts, preprocess)
    state = jax.device_put(make_state(saes, hparams), device)

    n_steps = n_train_steps(cfg)
    B = cfg.sae_batch_size
    loader = data.Loader(acts, batch_size=B, shuffle=True, seed=cfg.seed, n_threads=cfg.n_workers, device=device)
    batches = iter(loader)
    bar = tqdm.trange(n_steps, desc=f"train {len(cfgs)} SAEs", unit="step", dynamic_ncols=True)
    last_t, last_step = time.perf_counter(), 0
    try:
        for step in bar:
            x_BD, _ = next(batches)
            state, metrics = train_step(state, hparams, preprocess, x_BD)
            if step % cfg.log_every == 0 or step == n_steps - 1:
                metrics = jax.device_get(metrics)  # The one host transfer of a log step.
                run.log(_metrics_for_wandb(metrics, n_seen=(step + 1) * B), step=step)
                now = time.perf_counter()
                rate = (step + 1 - last_step) * B / max(now - last_t, 1e-9)
                last_t, last_step = now, step + 1
                bar.set_postfix(ex_per_s=f"{rate:,.0f}", loss=f"{metrics['loss'][0]:.4g}")
    finally:
        batches.close()
    return state


def _metrics_for_wandb(metrics: dict[str, np.ndarray], *, n_seen: int) -> list[dict[str, float]]:
    """One wandb dict per SAE with SPEC 3's keys, from a dict of `[M]` host arrays."""
    keys = {
        "losses/mse": "mse", "losses/l1": "l1", "losses/sparsity": "sparsity", "losses/loss": "loss",
        "metrics/l0": "l0", "metrics/l1": "l1",
        "progress/learning_rate": "learning_rate", "progress/sparsity_coeff": "sparsity_coeff",
    }  # fmt: skip
    n_saes = len(metrics["loss"])
    return [
        {name: float(metrics[key][m]) for name, key in keys.items()} | {"progress/n_patches_seen": n_seen}
        for m in range(n_saes)
    ]


def get_device(name: str) -> jax.Device:
    """The JAX device a config's `device` names; InputError if this machine has none."""
    platform = {"auto": None, "cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(name.lower(), "?")
    if platform == "?":
        raise config.InputError(f"device = {name!r}: must be auto, cpu, gpu (or cuda) or tpu")
    try:
        return jax.devices(platform)[0]
    except RuntimeError:
        raise config.InputError(f"device = {name!r}: JAX has no {platform} backend here (see README: installing for GPU/TPU)") from None


def open_group(cfgs: list[config.Train]) -> data.Activations:
    """Opens and checks a group's data before anything is trained or written."""
    cfg = cfgs[0]
    config.check_groupable(cfgs)
    for c in cfgs:
        config.validate(c)
    acts = data.Activations(cfg.data)
    if acts.d_vit != cfg.sae.d_vit:
        raise config.InputError(
            f"sae.d_vit = {cfg.sae.d_vit} but the shards in {cfg.data.shard_root} have d_vit = {acts.d_vit}"
        )
    get_device(cfg.device)
    return acts


def train_group(cfgs: list[config.Train], acts: data.Activations) -> list[str]:
    """Trains, evaluates and checkpoints one group; returns its run ids (the live one first)."""
    cfg = cfgs[0]
    device = get_device(cfg.device)
    preprocess = jax.device_put(data.make_preprocess(acts, cfg.data), device)
    ckpt_dpath = pathlib.Path(cfg.ckpt_path)
    mode = "online" if cfg.track else "disabled"
    # ParallelWandbRun drops the empty tag (saev's default).
    run = wandb_queue.ParallelWandbRun(cfg.wandb_project, cfgs, mode, [cfg.tag], ckpt_dpath / "wandb-queue")
    with run:
        state = train(cfgs, acts, preprocess, run, device)
        results = evaluate.evaluate(cfgs, state.saes, acts, preprocess, device)
        run.log([r.for_wandb() for r in results], step=int(state.step))
        for run_id, c, sae, result in zip(run.ids, cfgs, sae_lib.unstack(state.saes), results):
            sae_lib.save(sae, ckpt_dpath / run_id, c, result.to_json())
        paths = plots.save_plots(ckpt_dpath, run.ids, cfgs, results)
        run.log(plots.wandb_images(paths), step=int(state.step))
    return run.finish()


def main(cfgs: list[config.Train]) -> list[str]:
    """Trains every config, group by group; returns every run id.

    Every group's configs and data are checked before the first group trains, so bad
    input fails fast and writes nothing. At the end, each `ckpt_path` gets a
    `summary.csv` of its runs, also printed as a table.
    """
    groups = config.split_cfgs(cfgs)
    opened = [open_group(group) for group in groups]
    ids = []
    for i, (group, acts) in enumerate(zip(groups, opened)):
        logger.info("Group %d/%d: %d SAEs, d_sae=%d.", i + 1, len(groups), len(group), group[0].sae.d_sae)
        ids.extend(train_group(group, acts))
    for ckpt_path in dict.fromkeys(c.ckpt_path for c in cfgs):
        summary.summarize(ckpt_path, ids)
    return ids


def cli(argv: list[str] | None = None) -> list[str]:
    """`python -m saev_jax.train [SWEEP.toml] [--field value ...]`.

    Flags override `Train`'s defaults; a sweep file's values override the flags and its
    lists become a grid.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    sweep_fpath = args.pop(0) if args and not args[0].startswith("-") else None
    base = tyro.cli(
        config.Train,
        args=args,
        prog="python -m saev_jax.train [SWEEP.toml]",
        description=__doc__,
    )
    cfgs = config.grid(base, config.load_sweep(sweep_fpath)) if sweep_fpath else [base]
    logger.info("%d configs in %d groups.", len(cfgs), len(config.split_cfgs(cfgs)))
    return main(cfgs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # Not its backend probing at INFO.
    try:
        run_ids = cli()
    except config.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(run_ids))
