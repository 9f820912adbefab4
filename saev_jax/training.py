"""Trains many SAEs at once on one stream of activations (the library under `python -m saev_jax.train`).

Configs that agree on every key in `config.CANNOT_PARALLELIZE` form a group. The planner
(`plan.py`) lays each group out on the devices: one stack per SAE shape, every stack
trained by the one jitted step (`step.py`) on the same batch, so each batch read from disk
serves every SAE of the group. Groups (and the rounds a group too big for its devices is
split into) train one after another.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from . import (
    checkpoint,
    config,
    data,
    evaluation,
    kinds,
    launch,
    plan,
    plots,
    snapshot,
    steer,
    step,
    summary,
    wandb_queue,
)

logger = logging.getLogger(__name__)


def init_b_dec(
    stacks: list[step.Stack],
    stack_cfgs: list[list[config.Train]],
    acts: data.Activations,
    preprocess: data.Preprocess,
    *,
    seed: int | None = None,
) -> list[step.Stack]:
    """Sets each SAE's b_dec to the mean of the first `n_reinit_samples` examples of one permutation.

    The permutation is keyed by `seed` (default: the first config's `sae.seed`; training passes
    the group's first config's, so b_dec does not depend on how the group is split into rounds;
    `data.sample_indices`; saev drew a full `np.random.permutation`) and one read of the largest
    count serves every stack. SAEs with `n_reinit_samples = 0` keep their b_dec.
    """
    counts = [[c.sae.n_reinit_samples for c in cfgs] for cfgs in stack_cfgs]
    n_max = max(max(c) for c in counts)
    if n_max == 0:
        return stacks
    n_max = min(n_max, len(acts))
    # A keyed permutation's prefix (data.sample_indices): memory grows with n_max, not with the data set.
    seed = stack_cfgs[0][0].sae.seed if seed is None else seed
    perm = data.sample_indices(len(acts), n_max, seed)
    sum_fn = jax.jit(lambda x_BD: jnp.sum(preprocess(x_BD), axis=0))

    # Prefix sums of the permutation at every count some SAE asks for.
    bounds = sorted({min(n, n_max) for c in counts for n in c} | {0})
    prefix = {0: np.zeros(acts.d_vit, np.float64)}
    running = np.zeros(acts.d_vit, np.float64)
    chunk = 1 << 15
    for lo, hi in zip(bounds, bounds[1:]):
        for start in range(lo, hi, chunk):
            idx = np.sort(perm[start : min(start + chunk, hi)])  # Sorted reads are faster; sums don't care.
            running += np.asarray(sum_fn(acts.read(idx)), np.float64)
        prefix[hi] = running.copy()

    out = []
    for stack, stack_counts in zip(stacks, counts):
        # SAEs start with b_dec = 0; built on the host (the same on every process) and placed.
        b_dec_MD = np.zeros(stack.saes.b_dec.shape, np.float32)
        for m, n in enumerate(stack_counts):
            if n > 0:
                b_dec_MD[m] = prefix[min(n, n_max)] / min(n, n_max)
        out.append(eqx.tree_at(lambda s: s.saes.b_dec, stack, jax.device_put(b_dec_MD, stack.saes.b_dec.sharding)))
    return out


def to_host(tree):
    """A pytree of (possibly sharded, possibly multi-process) arrays as NumPy arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


n_train_steps = config.n_train_steps  # training.n_train_steps, as benchmarks and tests know it.


def pad_cfgs(cfgs: list[config.Train], n_padded: int) -> list[config.Train]:
    """`cfgs` and `n_padded - len(cfgs)` pads: copies of the first with fresh seeds and learning rate 0.

    A pad's update is exactly zero and nothing in the step mixes SAEs, so pads never change
    the real SAEs; they are dropped before logging, evaluation and checkpoints.
    """
    top = max(c.sae.seed for c in cfgs)
    pads = [
        dataclasses.replace(cfgs[0], lr=0.0, sae=dataclasses.replace(cfgs[0].sae, seed=top + 1 + i))
        for i in range(n_padded - len(cfgs))
    ]
    return list(cfgs) + pads


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A layout's compiled step (call it as `step(state, hparams, preprocess, x_BD)`) and XLA's peak bytes per device.

    `layout` is the layout the step was compiled for: after `compile_within_limit` it may have
    smaller chunks than the one asked for, and everything after training (evaluation too) uses it.
    """

    layout: "Layout"
    step: Callable
    peak_bytes: int | None


class DoesNotFit(Exception):
    """XLA's peak for a layout's step, even with chunk 1, is over the usable memory."""

    def __init__(self, layout: "Layout", peak_bytes: int, usable: int):
        super().__init__(
            f"XLA's peak {plan.format_bytes(peak_bytes)} per device is over the {plan.format_bytes(usable)} usable"
        )
        self.layout, self.peak_bytes, self.usable = layout, peak_bytes, usable


class Layout:
    """One round of a group on a mesh: its stacks' configs (padded), hyper-parameters and shardings.

    `read_mode` is the data's resolved read mode (None: the config's, `auto` resolved by the
    loader) and `b_dec_seed` keys the b_dec sample (None: the first config's `sae.seed`); the
    group fixes both once (`GroupPlan`), whatever its rounds. `data_seed` keys the data order
    (None: the first config's `seed`): a layout repacked at a rung keeps its round's, so the
    batches do not change with which SAEs are left.
    """

    def __init__(
        self,
        cfgs: list[config.Train],
        rnd: plan.Round,
        mesh: jax.sharding.Mesh,
        limit: int | None = None,
        *,
        read_mode: str | None = None,
        b_dec_seed: int | None = None,
        data_seed: int | None = None,
    ):
        self.cfgs = cfgs
        self.data_seed = cfgs[0].seed if data_seed is None else data_seed
        self.round = rnd
        self.mesh = mesh
        self.limit = limit
        self.read_mode = read_mode
        self.b_dec_seed = b_dec_seed
        self.stack_cfgs = [[cfgs[i] for i in s.cfg_indices] for s in rnd.stacks]
        self.padded_cfgs = [pad_cfgs(c, s.n_padded) for c, s in zip(self.stack_cfgs, rnd.stacks)]
        self.chunks = tuple(s.chunk for s in rnd.stacks)
        self.stacked = NamedSharding(mesh, PartitionSpec(step.SAE_AXIS))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.hparams = tuple(jax.device_put(step.Hparams.from_cfgs(c), self.stacked) for c in self.padded_cfgs)

    def init_group_state(self, acts: data.Activations, preprocess: data.Preprocess) -> step.GroupState:
        """Fresh stacks, built on the devices that hold them, with b_dec from the data."""
        precision = self.cfgs[0].precision
        stacks = []
        for cfgs, hparams in zip(self.padded_cfgs, self.hparams):
            build = jax.jit(
                lambda hp, cfgs=cfgs: step.make_stack(kinds.make_stack(cfgs, precision), hp),
                out_shardings=self.stacked,
            )
            stacks.append(build(hparams))
        stacks = init_b_dec(stacks, self.padded_cfgs, acts, preprocess, seed=self.b_dec_seed)
        state = step.make_group_state(stacks)
        return jax.device_put(state, step.group_state_sharding(state, self.mesh))

    def abstract_group_state(self) -> step.GroupState:
        """Shapes, dtypes and shardings of `init_group_state`'s result, without allocating it."""
        precision = self.cfgs[0].precision
        stacks = tuple(
            step.make_stack(kinds.make_stack(cfgs, precision), hp) for cfgs, hp in zip(self.padded_cfgs, self.hparams)
        )
        shapes = jax.eval_shape(lambda: step.make_group_state(stacks))
        return jax.tree.map(
            lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
            shapes, step.group_state_sharding(shapes, self.mesh),
        )  # fmt: skip

    def with_chunks(self, chunks: tuple[int, ...]) -> "Layout":
        """This layout with other chunk sizes (same stacks, configs and data settings)."""
        stacks = tuple(dataclasses.replace(st, chunk=c) for st, c in zip(self.round.stacks, chunks, strict=True))
        rnd = dataclasses.replace(self.round, stacks=stacks)
        return Layout(self.cfgs, rnd, self.mesh, self.limit, read_mode=self.read_mode, b_dec_seed=self.b_dec_seed,
                      data_seed=self.data_seed)  # fmt: skip

    def usable(self) -> int | None:
        """Bytes per device the step may use (None without a limit)."""
        return None if self.limit is None else int(self.limit * plan.headroom(self.mesh.devices.flat[0].platform))

    def compile(self, preprocess: data.Preprocess | None = None) -> Compiled:
        """The compiled step of this layout, with XLA's peak-memory estimate per device in bytes.

        Only `preprocess`'s shapes matter (None: those of any statistics), so this can run
        while the statistics are still being computed.
        """
        cfg = self.cfgs[0]
        x = jax.ShapeDtypeStruct((cfg.sae_batch_size, cfg.sae.d_vit), jnp.float32, sharding=self.replicated)
        if preprocess is None:
            shapes = data.Preprocess(1e5, np.zeros(cfg.sae.d_vit, np.float32), 1.0)
            preprocess = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), shapes
            )
        lowered = step.train_step.lower(
            self.abstract_group_state(), self.hparams, preprocess, x, chunks=self.chunks, mesh=self.mesh
        )
        compiled = lowered.compile()
        return Compiled(self, compiled, xla_peak(compiled))

    def compile_within_limit(self, preprocess: data.Preprocess | None = None) -> Compiled:
        """This layout's step, or one with smaller chunks, whose compiled program XLA says fits `limit`.

        The planner's estimate is checked against XLA's memory analysis of the compiled
        program (nothing is allocated); while it is over, the largest chunk is halved (to a divisor
        of the device's share).
        Raises DoesNotFit if even chunk 1 is over (then the group needs more rounds).
        """
        layout, usable = self, self.usable()
        while True:
            t0 = time.perf_counter()
            compiled = layout.compile(preprocess)
            peak = compiled.peak_bytes
            over = usable is not None and peak is not None and peak > usable
            logger.info(
                "Compiled the step (chunks %s) in %.1f s; XLA: %s per device.", list(layout.chunks),
                time.perf_counter() - t0, "?" if peak is None else plan.format_bytes(peak),
            )  # fmt: skip
            if not over:
                return compiled
            if max(layout.chunks) == 1:
                raise DoesNotFit(layout, peak, usable)
            big = max(range(len(layout.chunks)), key=lambda j: layout.chunks[j])
            per_dev = layout.round.stacks[big].n_padded // layout.mesh.size
            smaller = max(c for c in plan.divisors(per_dev) if c <= max(1, layout.chunks[big] // 2))
            layout = layout.with_chunks(tuple(smaller if j == big else c for j, c in enumerate(layout.chunks)))

    def real_metrics(self, metrics: tuple[dict[str, np.ndarray], ...]) -> list[dict[str, float]]:
        """Per config of the round (in config order), its metrics from the per-stack `[M_pad]` arrays."""
        out: list[dict[str, float] | None] = [None] * len(self.cfgs)
        for s, m in zip(self.round.stacks, metrics):
            for j, i in enumerate(s.cfg_indices):
                out[i] = {key: value[j] for key, value in m.items()}
        return out

    def real_saes(self, state: step.GroupState) -> list[tuple[list[int], kinds.Inference, np.ndarray]]:
        """Per stack: config positions, the real SAEs (pads dropped) on this process's first device, and their `diverged_at`.

        The SAEs come with their kind's state and settings (`kinds.Inference`), as evaluation
        needs them. Every process must call it (with several processes it gathers the stacks).
        """
        device = jax.local_devices(backend=self.mesh.devices.flat[0].platform)[0]
        out = []
        for s, stack, hp in zip(self.round.stacks, state.stacks, self.hparams):
            bundle, diverged_at = to_host((kinds.Inference(stack.saes, stack.kind_state, hp.kind), stack.diverged_at))
            bundle = jax.tree.map(lambda leaf: jax.device_put(leaf[: s.n_saes], device), bundle)
            out.append((list(s.cfg_indices), bundle, np.asarray(diverged_at)[: s.n_saes]))
        return out


def xla_peak(compiled) -> int | None:
    """XLA's peak bytes per device of a compiled program (arguments, outputs not aliased, temporaries); None if unknown."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes


class StopSignals:
    """Turns SIGTERM and SIGINT into a request the training loop answers at its next step.

    The loop then writes a snapshot and exits with status 128 + the signal's number (as a
    shell reports a process killed by it), so a scheduler's preemption loses nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Snapshots:
    """A round's snapshots: `<ckpt_path>/snapshots/<name>/`, written by process 0 (snapshot.py)."""

    def __init__(self, cfgs: list[config.Train], name: str):
        self.name = name
        self.dpath = pathlib.Path(cfgs[0].ckpt_path) / "snapshots" / name
        self.cfgs = [config.to_dict(c) for c in cfgs]

    def check_configs(self, saved: list[dict], what: str) -> None:
        diff = snapshot.diff_configs(saved, self.cfgs)
        if diff is not None:
            raise config.InputError(
                f"{self.dpath}: {what} of {self.name} was made with other configs ({diff}); "
                "run the command that made it, or pass --fresh to start afresh"
            )

    def done_ids(self) -> list[str] | None:
        """The run ids of this round if an earlier run finished it (same configs), else None."""
        fpath = self.dpath / "done.json"
        if not fpath.is_file():
            return None
        done = json.loads(fpath.read_text())
        self.check_configs(done["configs"], "the finished run")
        return list(done["ids"])

    def mark_done(self, ids: list[str]) -> None:
        """Records the round as finished (its checkpoints are all written) and drops its snapshots."""
        tmp = self.dpath / ".done.json.tmp"
        self.dpath.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"ids": ids, "configs": self.cfgs}, indent=1) + "\n")
        os.replace(tmp, self.dpath / "done.json")
        snapshot.clear(self.dpath)

    def find(self, like: Callable[[dict], step.GroupState]) -> tuple[step.GroupState, dict] | None:
        """The latest intact snapshot restored onto the shardings of `like(meta)`, and its meta; None if none.

        Its configs are compared with this round's before any tensor is read, so a changed
        sweep is refused naming the key that changed. `like` gets the snapshot's meta (its
        `progress` says which SAEs are still training, hence the layout).
        """
        found = snapshot.latest(self.dpath)
        if found is None:
            return None
        meta = snapshot.read_meta(found[1])
        self.check_configs(meta["configs"], f"the snapshot of step {found[0]}")
        return snapshot.restore(found[1], like(meta))

    def save(self, state: step.GroupState, run: wandb_queue.ParallelWandbRun, progress: "Progress") -> None:
        """Writes a snapshot of `state` and `progress` (every process must call: the state is gathered)."""
        host = to_host(state)
        if launch.is_lead():
            step_i = int(host.step)
            meta = {"name": self.name, "step": step_i, "ids": list(run.ids), "configs": self.cfgs,
                    "journal_positions": run.positions(), "progress": progress.to_json()}  # fmt: skip
            t0 = time.perf_counter()
            snapshot.save(self.dpath, step_i, host, meta)
            logger.info("Snapshot of %s at step %d written in %.1f s.", self.name, step_i, time.perf_counter() - t0)
        launch.barrier(f"{self.name} snapshot")


RUNNING_DECAY = 0.9
"""Decay per logged step of each SAE's running MSE and L0 (`Progress`): about the last 10 log steps count."""


@dataclasses.dataclass
class Progress:
    """What a round keeps on the host beside its `GroupState`, in its snapshots' meta (JSON, exact).

    - `running`: per config of the round, a debiased EMA (decay `RUNNING_DECAY` per log step)
      of its training MSE and L0, from the metrics the loop already fetches every `log_every`
      steps (and at the step before each rung): `{"mse": [...], "l0": [...], "weight": [...]}`,
      the EMA sums not yet divided by `weight` (NaN where an SAE has none yet).
    - `alive`: the round's config positions still training, in order (`prune = "halving"`
      shrinks it at its rungs; a diverged SAE leaves it at the next rung).
    - `retired`: config position (a string, as JSON keys are) -> how it left training:
      `{"step", "why", "diverged_step", "steering"}` (`why` None for a diverged SAE). Its
      parameters are in its checkpoint directory since then; it is evaluated with the rest.
    - `rungs`: one `{"step", "stopped", "diverged"}` per rung passed (config positions).
    - `round`: the current layout's `plan.Round` (JSON) once repacked, else None: a resume
      rebuilds exactly that layout.
    """

    running: dict[str, list[float]]
    alive: list[int]
    retired: dict[str, dict]
    rungs: list[dict]
    round: dict | None = None

    @classmethod
    def fresh(cls, n: int) -> "Progress":
        nan = [float("nan")] * n
        return cls({"mse": list(nan), "l0": list(nan), "weight": [0.0] * n}, list(range(n)), {}, [], None)

    @classmethod
    def from_json(cls, d: dict) -> "Progress":
        return cls(d["running"], list(d["alive"]), d["retired"], d["rungs"], d["round"])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def observe(self, metrics: list[dict[str, object] | None]) -> None:
        """Adds one log step's metrics (per config of the round; None for one not training) to the EMAs."""
        for i, m in enumerate(metrics):
            if m is None or bool(m["diverged"]):
                continue
            w = self.running["weight"][i]
            for key in ("mse", "l0"):
                old = 0.0 if w == 0.0 else self.running[key][i]
                self.running[key][i] = RUNNING_DECAY * old + (1 - RUNNING_DECAY) * float(m[key])
            self.running["weight"][i] = RUNNING_DECAY * w + (1 - RUNNING_DECAY)

    def mean(self, key: str) -> np.ndarray:
        """The debiased running `key` ("mse" or "l0") per config of the round (NaN where none was seen)."""
        w = np.asarray(self.running["weight"], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(w > 0, np.asarray(self.running[key], np.float64) / w, np.nan)


def rung_steps(cfg: config.Train) -> list[int]:
    """The steps after which `prune = "halving"` holds its rungs (`int(f * n_steps)`, at least 1; two fractions
    that round to the same step make one rung); [] without pruning."""
    if cfg.prune != "halving":
        return []
    n = n_train_steps(cfg)
    return sorted({max(1, int(f * n)) for f in cfg.prune_rungs})


def subset_round(layout: Layout, keep: list[int], n_devices: int) -> plan.Round:
    """`layout`'s round for only its configs at positions `keep` (renumbered 0..), each stack padded for the
    devices again and its chunk the largest divisor of its new share no larger than before."""
    stacks = []
    position = {j: k for k, j in enumerate(keep)}
    for s in layout.round.stacks:
        indices = tuple(position[j] for j in s.cfg_indices if j in position)
        if not indices:
            continue
        n_padded = -(-len(indices) // n_devices) * n_devices
        chunk = max(c for c in plan.divisors(n_padded // n_devices) if c <= s.chunk)
        stacks.append(dataclasses.replace(s, cfg_indices=indices, n_padded=n_padded, chunk=chunk))
    return dataclasses.replace(layout.round, stacks=tuple(stacks))


def repacked_round(layout: Layout, keep: list[int]) -> plan.Round:
    """The round of `layout`'s configs at positions `keep`: the planner's layout of them (it may give larger
    chunks) when it fits them in one round, else `subset_round` (which fits wherever `layout` did)."""
    devices = list(layout.mesh.devices.flat)
    cfgs = [layout.cfgs[j] for j in keep]
    fallback = subset_round(layout, keep, len(devices))
    if layout.limit is None:
        return fallback
    largest = max(s.n_padded // len(devices) for s in fallback.stacks)
    if cfgs[0].sae_chunk > largest:  # The planner refuses a chunk larger than any share: clamp it.
        cfgs = [dataclasses.replace(c, sae_chunk=largest) for c in cfgs]
    try:
        planned = plan.make_plan(cfgs, devices, layout.limit, "the round being repacked")
    except config.InputError:
        return fallback
    return planned.rounds[0] if len(planned.rounds) == 1 else fallback


def layout_for(layout: Layout, alive: list[int], rnd: plan.Round) -> Layout:
    """The layout of the round configs `alive` (positions in `layout.cfgs`) laid out as `rnd`, with `layout`'s data settings."""
    return Layout([layout.cfgs[i] for i in alive], rnd, layout.mesh, layout.limit,
                  read_mode=layout.read_mode, b_dec_seed=layout.b_dec_seed, data_seed=layout.data_seed)  # fmt: skip


def repack_state(
    old: Layout, old_alive: list[int], state: step.GroupState, new: Layout, new_alive: list[int]
) -> step.GroupState:
    """`state` (laid out as `old`, whose configs are the round's `old_alive`) with only the round's `new_alive`,
    laid out as `new`: every SAE's parameters, optimizer and kind state carried bit for bit; pads are copies
    of their stack's first SAE (learning rate 0: they never change anyone)."""
    host = to_host(state)
    where = {}  # round position -> (old stack, slot)
    for k, s in enumerate(old.round.stacks):
        for j, i in enumerate(s.cfg_indices):
            where[old_alive[i]] = (k, j)
    stacks = []
    for s in new.round.stacks:
        slots = [where[new_alive[i]] for i in s.cfg_indices]
        (k,) = {k for k, _ in slots}  # One stack per kind and shape, before and after.
        idx = np.array([j for _, j in slots] + [slots[0][1]] * (s.n_padded - len(slots)))
        stacks.append(jax.tree.map(lambda leaf, idx=idx: np.asarray(leaf)[idx], host.stacks[k]))
    out = step.GroupState(stacks=tuple(stacks), step=np.asarray(host.step))
    return jax.device_put(out, step.group_state_sharding(out, new.mesh))


def train(
    layout: Layout,
    acts: data.Activations,
    preprocess: data.Preprocess,
    run: wandb_queue.ParallelWandbRun,
    *,
    state: step.GroupState | None = None,
    snapshots: Snapshots | None = None,
    compiled: Compiled | None = None,
) -> step.GroupState:
    """Trains one round of a group from `state` (default: a fresh one); logs through `run`; returns the final state.

    `train_pruned` with a fresh `Progress` (its final layout dropped): for rounds without
    `prune = "halving"`, whose layout never changes.
    """
    return train_pruned(layout, acts, preprocess, run, state=state, snapshots=snapshots, compiled=compiled)[0]


def train_pruned(
    layout: Layout,
    acts: data.Activations,
    preprocess: data.Preprocess,
    run: wandb_queue.ParallelWandbRun,
    *,
    state: step.GroupState | None = None,
    snapshots: Snapshots | None = None,
    compiled: Compiled | None = None,
    progress: Progress | None = None,
    ckpt_dpath: pathlib.Path | None = None,
) -> tuple[step.GroupState, Layout]:
    """Trains one round from `state` (default: a fresh one); logs through `run`; returns the final state and its layout.

    `layout` is the layout `state` has (the SAEs `progress.alive` of the round, `run` holding
    one wandb run per config of the whole round); `progress` (default: fresh) is updated in
    place: the running metrics at every log step and, under `prune = "halving"`, the rungs
    (`hold_rung`: the stopped SAEs are written to `ckpt_dpath / <run id>`, the others repacked
    into a smaller layout with its own compiled step; the data order is unchanged).
    With `snapshots`, the state and `progress` are saved every `save_every` steps, when training ends, and
    when SIGTERM or SIGINT arrives (then the wandb runs are suspended, their journals kept for
    the resume, and the process exits with 128 + the signal number).
    `compiled` is `layout.compile_within_limit()`'s result if the caller already has it (its
    layout, with the chunks that fit, is the one trained).
    """
    cfg = layout.cfgs[0]
    compiled = compiled or layout.compile_within_limit(preprocess)
    layout = compiled.layout
    if state is None:
        state = layout.init_group_state(acts, preprocess)
    progress = progress or Progress.fresh(len(layout.cfgs))
    n_round = len(progress.running["weight"])
    start = int(to_host(state.step))
    n_steps = n_train_steps(cfg)
    rungs = rung_steps(cfg)
    B = cfg.sae_batch_size
    loader = data.Loader(
        acts, batch_size=B, shuffle=True, seed=layout.data_seed, n_threads=cfg.n_workers, device=layout.replicated,
        start_batch=start, read_mode=layout.read_mode,
    )  # fmt: skip
    batches = iter(loader)
    bar = tqdm.trange(
        start,
        n_steps,
        initial=start,
        total=n_steps,
        desc=f"train {len(layout.cfgs)} SAEs",
        unit="step",
        dynamic_ncols=True,
    )
    last_t, last_step = time.perf_counter(), start
    try:
        with StopSignals() as stop:
            for i in bar:
                x_BD, _ = next(batches)
                state, metrics = compiled.step(state, layout.hparams, preprocess, x_BD)
                rung = len(progress.rungs) < len(rungs) and i + 1 == rungs[len(progress.rungs)]
                if i % cfg.log_every == 0 or i == n_steps - 1 or rung:
                    # The one host transfer of a log step; per config of the round (None: not training).
                    fetched = layout.real_metrics(to_host(metrics))
                    metrics = [None] * n_round
                    for k, m in zip(progress.alive, fetched):
                        metrics[k] = m
                    progress.observe(metrics)
                    extra = [{} for _ in range(n_round)]
                    if rung:
                        new, state, extra = hold_rung(layout, state, progress, run, i + 1, preprocess, ckpt_dpath)
                        if new is not layout:  # Fewer SAEs: their own step (the chunks that fit are stored).
                            compiled = new.compile_within_limit(preprocess)
                            layout = compiled.layout
                            progress.round = dataclasses.asdict(layout.round)
                            bar.set_description(f"train {len(layout.cfgs)} SAEs")
                    run.log([w | e for w, e in zip(_metrics_for_wandb(metrics, n_seen=(i + 1) * B), extra)], step=i)
                    now = time.perf_counter()
                    rate = (i + 1 - last_step) * B / max(now - last_t, 1e-9)
                    last_t, last_step = now, i + 1
                    bar.set_postfix(ex_per_s=f"{rate:,.0f}", **loss_postfix(metrics))
                if snapshots is None:
                    continue
                if stop.signum is not None or (cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < n_steps):
                    snapshots.save(state, run, progress)
                if stop.signum is not None:
                    run.suspend()  # Journals kept, not replayed: the resume continues them.
                    name = signal.Signals(stop.signum).name
                    logger.warning(
                        "%s at step %d: snapshot written; run the same command again to resume.", name, i + 1
                    )
                    raise SystemExit(128 + stop.signum)
    finally:
        batches.close()
    if snapshots is not None and start < n_steps:
        snapshots.save(state, run, progress)  # Evaluation may still fail; the trained state is safe first.
    return state, layout


def hold_rung(
    layout: Layout,
    state: step.GroupState,
    progress: Progress,
    run: wandb_queue.ParallelWandbRun,
    at: int,
    preprocess: data.Preprocess,
    ckpt_dpath: pathlib.Path | None,
) -> tuple[Layout, step.GroupState, list[dict[str, object]]]:
    """One rung of successive halving after `at` steps: which SAEs stop (`steer.halving_stops` on the running
    MSE and L0 of the SAEs still training and not diverged), their checkpoints written (parameters only,
    evaluated with the rest at the end), one log line, and the others repacked (`repack_state`).

    A diverged SAE leaves training here too (it is frozen, so it only costs time), unless no SAE would
    be left. Returns the new layout (not yet compiled), state, and per config of the round what wandb gets
    at this step (`progress/stopped_at_step` for the stopped ones). Every process must call it.
    """
    cfg = layout.cfgs[0]
    n_round = len(progress.running["weight"])
    round_cfgs: list[config.Train | None] = [None] * n_round
    for k, c in zip(progress.alive, layout.cfgs):
        round_cfgs[k] = c
    bundles = layout.real_saes(state)
    diverged_at: dict[int, int] = {}
    where: dict[int, tuple[kinds.Inference, int]] = {}
    for indices, saes, div in bundles:
        for j, (local, d) in enumerate(zip(indices, div)):
            k = progress.alive[local]
            diverged_at[k] = int(d)
            where[k] = (saes, j)
    alive = np.zeros(n_round, bool)
    alive[[k for k in progress.alive if diverged_at[k] < 0]] = True
    tiers = [steer.tier(c) if c is not None else ("-",) for c in round_cfgs]
    decided = steer.halving_stops(tiers, progress.mean("mse"), progress.mean("l0"), alive, cfg.prune_keep)
    stopped = [k for k in progress.alive if decided.stop[k]]
    diverged = [k for k in progress.alive if diverged_at[k] >= 0]
    if len(stopped) + len(diverged) == len(progress.alive):
        diverged = []  # Every SAE left is diverged: keep them, there is nothing to repack into.
    n_rung = len(progress.rungs) + 1
    n_rungs = len(rung_steps(cfg))
    reasons = "; ".join(f"{run.ids[k]}: {decided.why[k]}" for k in stopped)
    logger.info(
        "rung %d/%d at step %d: stopping %d of %d SAEs%s%s", n_rung, n_rungs, at, len(stopped), int(alive.sum()),
        f": {reasons}" if reasons else "",
        f" (and {len(diverged)} diverged: {', '.join(run.ids[k] for k in diverged)})" if diverged else "",
    )  # fmt: skip
    extra: list[dict[str, object]] = [{} for _ in range(n_round)]
    for k in stopped + diverged:
        saes, j = where[k]
        sae, kind_state, hp = jax.tree.map(lambda leaf: leaf[j], (saes.sae, saes.kind_state, saes.hp))
        progress.retired[str(k)] = {
            "step": at,
            "why": decided.why[k] if k in stopped else None,
            "diverged_step": diverged_at[k] if diverged_at[k] >= 0 else None,
            "steering": steer.report(hp, kind_state),
        }
        if k in stopped:
            extra[k] = {"progress/stopped_at_step": at}
        if launch.is_lead() and ckpt_dpath is not None:
            kind_tensors = jax.device_get(sae.inference_tensors(kind_state))
            save_checkpoint(sae, ckpt_dpath / run.ids[k], round_cfgs[k], preprocess, kind_tensors)
    progress.rungs.append({"step": at, "stopped": stopped, "diverged": diverged})
    del bundles, where
    if not stopped and not diverged:
        return layout, state, extra
    new_alive = [k for k in progress.alive if k not in stopped and k not in diverged]
    keep = [progress.alive.index(k) for k in new_alive]
    new = layout_for(layout, keep, repacked_round(layout, keep))
    state = repack_state(layout, progress.alive, state, new, new_alive)
    progress.alive = new_alive
    progress.round = dataclasses.asdict(new.round)
    return new, state, extra


def loss_postfix(metrics: list[dict[str, object]]) -> dict[str, str]:
    """The training bar's loss: the best and median over the SAEs that have not diverged."""
    live = [float(m["loss"]) for m in metrics if m is not None and not m["diverged"]]
    if not live:
        return {"loss": "all diverged"}
    return {"best_loss": f"{min(live):.4g}", "median_loss": f"{float(np.median(live)):.4g}"}


def _metrics_for_wandb(metrics: list[dict[str, np.ndarray] | None], *, n_seen: int) -> list[dict[str, object]]:
    """One wandb dict per SAE with SPEC 3's keys (and `diverged`), from each SAE's host metrics ({} for None:
    an SAE that stopped training).

    Keys a kind does not have are left out (TopK has no sparsity coefficient); a kind's own
    metrics go under `losses/` (its loss terms) or `metrics/`.
    """
    keys = {
        "losses/mse": "mse", "losses/l1": "l1", "losses/sparsity": "sparsity", "losses/loss": "loss",
        "metrics/l0": "l0", "metrics/l1": "l1",
        "progress/learning_rate": "learning_rate", "progress/sparsity_coeff": "sparsity_coeff",
    }  # fmt: skip
    kind_losses = {"fvu", "recon", "aux_loss"}
    out = []
    for m in metrics:
        if m is None:
            out.append({})
            continue
        dct = {name: float(m[key]) for name, key in keys.items() if key in m}
        dct |= {
            f"{'losses' if key in kind_losses else 'metrics'}/{key}": float(value)
            for key, value in m.items() if key not in keys.values() and key != "diverged"
        }  # fmt: skip
        out.append(dct | {"progress/n_patches_seen": n_seen, "progress/diverged": bool(m["diverged"])})
    return out


def open_group(cfgs: list[config.Train]) -> data.Activations:
    """Opens and checks a group's data and devices before anything is trained or written."""
    cfg = cfgs[0]
    config.check_groupable(cfgs)
    for c in cfgs:
        config.validate(c)
    acts = data.Activations(cfg.data)
    if acts.d_vit != cfg.sae.d_vit:
        raise config.InputError(
            f"sae.d_vit = {cfg.sae.d_vit} but the shards in {cfg.data.shard_root} have d_vit = {acts.d_vit}"
        )
    plan.get_devices(cfg)
    return acts


def plan_group(cfgs: list[config.Train]) -> tuple[plan.Plan, jax.sharding.Mesh]:
    """The group's plan on its devices; InputError if one SAE cannot fit."""
    devices = plan.get_devices(cfgs[0])
    limit, source = plan.device_limit(cfgs[0], devices)
    return plan.make_plan(cfgs, devices, limit, source), plan.make_mesh(devices)


def make_layout(cfgs: list[config.Train]) -> Layout:
    """The layout of a group that fits in one round (benchmarks and tools); ValueError otherwise."""
    group_plan, mesh = plan_group(cfgs)
    if len(group_plan.rounds) != 1:
        raise ValueError(f"make_layout: the group needs {len(group_plan.rounds)} rounds")
    return Layout(cfgs, group_plan.rounds[0], mesh, group_plan.limit)


def train_round(
    cfgs: list[config.Train],
    layout: Layout,
    acts: data.Activations,
    get_preprocess: Callable[[], data.Preprocess],
    *,
    name: str = "round",
    label: str | None = None,
    compiled: Compiled | None = None,
) -> list[str]:
    """Trains, evaluates and checkpoints one round; returns its run ids (the live one first).

    The round `name` (`config.group_name`, e.g. `group-1a2b3c4d`) resumes from its latest snapshot in
    `<ckpt_path>/snapshots/<name>/` if an earlier run left one, and is skipped if an earlier
    run finished it. Parameters and configs are written before the evaluation, which then
    adds its metrics; an SAE whose evaluation fails gets `eval_error` and keeps its parameters.
    With several processes, process 0 evaluates and writes while the others wait.
    `get_preprocess()` gives the data's statistics (computed only if the round is not done);
    `compiled` is this layout's checked step if the caller has it; `label` (default `name`) is
    what log lines call the round (`group-1`: its place in this run).

    The phases, in order: skip if done; compile (within the memory limit) while the
    statistics are read; find the snapshot to resume from (in the layout its `Progress` says);
    train (`train_pruned`: under `prune = "halving"` the rungs write the SAEs they stop and
    repack the rest); copy the real SAEs off the training state and free it; write the
    parameters; evaluate, the stopped SAEs read back from their checkpoints and evaluated with
    their kind and width (chunks checked against the same limit); write the metrics
    (`stopped_at_step` for the stopped ones), log and plot.
    """
    cfg = cfgs[0]
    ckpt_dpath = pathlib.Path(cfg.ckpt_path)
    lead = launch.is_lead()
    snapshots = Snapshots(cfgs, name)
    label = label or name

    # Skip if done (the configs were checked by `done_ids`).
    if (ids := snapshots.done_ids()) is not None:
        logger.info("%s is complete (snapshots/%s: %d SAEs, %s): skipping.", label, name, len(ids), ", ".join(ids))
        return ids if lead else []

    # Compile (seconds, in XLA, mostly without the GIL) while the statistics are read.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="saev-compile") as pool:
        compiling = pool.submit(layout.compile_within_limit) if compiled is None else None
        preprocess = get_preprocess()
        compiled = compiled if compiling is None else compiling.result()
    layout = compiled.layout  # The chunks that fit: training and evaluation both use these.

    # Resume: configs compared before any tensor is read; a round that passed a rung resumes in its repacked layout.
    full = layout
    progress = Progress.fresh(len(cfgs))

    def like(meta: dict) -> step.GroupState:
        nonlocal layout, compiled, progress
        if "progress" in meta:  # Snapshots from before halving have none: nothing was pruned then.
            progress = Progress.from_json(meta["progress"])
        if progress.round is not None:
            layout, compiled = layout_for(full, progress.alive, round_from_json(progress.round)), None
        return layout.abstract_group_state()

    found = snapshots.find(like)
    state, resume = None, None
    if found is not None:
        state, meta = found
        resume = dict(zip(meta["ids"], (meta["journal_positions"][i] for i in meta["ids"])))
        logger.info("resuming %s from step %d (snapshots/%s)", label, meta["step"], name)
    del found
    mode = wandb_queue.resolve_mode(cfg.track) if lead else "disabled"
    # ParallelWandbRun drops the empty tag (saev's default).
    run = wandb_queue.ParallelWandbRun(
        cfg.wandb_project, cfgs, mode, [cfg.tag], ckpt_dpath / "wandb-queue", resume=resume if lead else None,
        defer_replay=True,  # `main` replays the queued runs after the summary table.
    )  # fmt: skip
    with run:
        # Train.
        state, layout = train_pruned(
            layout, acts, jax.device_put(preprocess, layout.replicated), run,
            state=state, snapshots=snapshots, compiled=compiled, progress=progress, ckpt_dpath=ckpt_dpath,
        )  # fmt: skip
        final = int(to_host(state.step))

        # Copy the real SAEs off the state, then free it (and the step): evaluation gets its memory.
        stacks = [([progress.alive[j] for j in indices], saes, div) for indices, saes, div in layout.real_saes(state)]
        del state, compiled
        if not lead:
            launch.barrier(f"{name} written")  # Process 0 evaluates and writes meanwhile.
            return []

        # Write the parameters (those of SAEs stopped at a rung were written then).
        diverged_at, steering = [-1] * len(cfgs), [{}] * len(cfgs)
        for indices, saes, div in stacks:
            for j, (i, d) in enumerate(zip(indices, div)):
                diverged_at[i] = int(d)
                sae, kind_state, hp = jax.tree.map(lambda leaf: leaf[j], (saes.sae, saes.kind_state, saes.hp))
                steering[i] = steer.report(hp, kind_state)  # target_l0 and the final coefficient (ReLU, JumpReLU)
                kind_tensors = jax.device_get(sae.inference_tensors(kind_state))
                # An earlier attempt of this round (same run ids, from its snapshot) may have been
                # killed after writing some checkpoints: the resumed state is the same, so rewrite them.
                save_checkpoint(sae, ckpt_dpath / run.ids[i], cfgs[i], preprocess, kind_tensors)
        stopped_at: list[int | None] = [None] * len(cfgs)
        for k, out in progress.retired.items():
            i = int(k)
            steering[i] = out["steering"]
            diverged_at[i] = -1 if out["diverged_step"] is None else out["diverged_step"]
            stopped_at[i] = out["step"] if out["why"] is not None else None
        if progress.retired:
            stacks = with_retired(stacks, progress, cfgs, [ckpt_dpath / r for r in run.ids], full)

        # Evaluate, one stack at a time, each in chunks that fit the round's limit (the round's first layout's chunks).
        first_chunks = {(s.kind, s.d_sae): s.chunk for s in full.round.stacks}
        chunks = [
            eval_chunk(saes, cfg, acts, preprocess, first_chunks[cfgs[indices[0]].sae.kind, cfgs[indices[0]].sae.d_sae],
                       full.usable())
            for indices, saes, _ in stacks
        ]  # fmt: skip
        results = evaluate_round(cfgs, stacks, acts, preprocess, chunks)
        del stacks
        for i, at in enumerate(stopped_at):
            if at is not None:
                steering[i] = steering[i] | {"stopped_at_step": at}

        # Write the metrics, log and plot.
        for i, (run_id, result) in enumerate(zip(run.ids, results)):
            div = {"diverged": diverged_at[i] >= 0, "diverged_step": diverged_at[i] if diverged_at[i] >= 0 else None}
            if isinstance(result, evaluation.EvalMetrics):
                checkpoint.add_metrics(ckpt_dpath / run_id, result.to_json() | div | steering[i], result.freqs)
            else:
                checkpoint.add_metrics(ckpt_dpath / run_id, {"eval_error": result} | div | steering[i])
        run.log([
            (r.for_wandb(c.sae) if isinstance(r, evaluation.EvalMetrics) else {"eval/error": r}) | {"eval/diverged": d >= 0}
            | {f"eval/{key}": value for key, value in st.items() if value is not None}
            for r, d, c, st in zip(results, diverged_at, cfgs, steering)
        ], step=final)  # fmt: skip
        ok = [i for i, r in enumerate(results) if isinstance(r, evaluation.EvalMetrics)]
        if ok:
            paths = plots.save_plots(
                ckpt_dpath, [run.ids[i] for i in ok], [cfgs[i] for i in ok], [results[i] for i in ok]
            )
            images = plots.wandb_images(paths)
            run.log([images[ok.index(i)] if i in ok else {} for i in range(len(cfgs))], step=final)
    ids = run.finish()
    snapshots.mark_done(ids)
    launch.barrier(f"{name} written")
    return ids


def round_from_json(d: dict) -> plan.Round:
    """The `plan.Round` that `dataclasses.asdict` made `d` of."""
    stacks = tuple(plan.StackPlan(**(s | {"cfg_indices": tuple(s["cfg_indices"])})) for s in d["stacks"])
    return plan.Round(stacks, d["planned_bytes"])


def with_retired(
    stacks: list[tuple[list[int], kinds.Inference, np.ndarray]],
    progress: Progress,
    cfgs: list[config.Train],
    dpaths: list[pathlib.Path],
    full: Layout,
) -> list[tuple[list[int], kinds.Inference, np.ndarray]]:
    """`stacks` (round positions, SAEs, diverged_at) with the SAEs that left training at a rung put back, so that
    each kind and shape is still evaluated in one pass: a stack that has any is read back from the checkpoints of
    all its SAEs (every one is written by now), in round order."""
    device = jax.local_devices(backend=full.mesh.devices.flat[0].platform)[0]
    retired = {int(k) for k in progress.retired}
    out = []
    for s in full.round.stacks:
        members = sorted(s.cfg_indices)
        if not retired & set(members):
            out.extend(st for st in stacks if st[0] and st[0][0] in members)
            continue
        loaded = [checkpoint.load(dpaths[i]).sae for i in members]
        saes = jax.device_put(jax.tree.map(lambda *leaves: jnp.stack(leaves), *loaded), device)
        out.append((members, saes, np.full(len(members), -1)))
    return out


def save_checkpoint(sae, dpath: pathlib.Path, cfg: config.Train, preprocess, kind_tensors) -> None:
    """`checkpoint.save` of an unfinished checkpoint; a full or read-only disk is one line (InputError), nothing partial left."""
    try:
        checkpoint.save(sae, dpath, cfg, None, preprocess, None, kind_tensors, replace=True)
    except Exception as err:  # OSError, or safetensors' own error for the same causes.
        if not isinstance(err, OSError) and "No space" not in str(err) and "os error" not in str(err):
            raise
        shutil.rmtree(
            dpath.with_name(f".{dpath.name}.tmp"), ignore_errors=True
        )  # checkpoint.save's temporary directory.
        reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [""])[0]
        raise config.InputError(
            f"{dpath}: could not write the checkpoint: {reason}; the trained state is in its snapshot: "
            "free space and run the same command again"
        ) from err


def eval_chunk(saes: kinds.Inference, cfg: config.Train, acts, preprocess, start: int, usable: int | None) -> int:
    """How many SAEs of a stack evaluation runs at once: `start` (the training chunk), or a smaller
    divisor of the stack while XLA's memory analysis of the evaluation step says it is over `usable`."""
    n = saes.b_dec.shape[0]
    chunk = max(c for c in plan.divisors(n) if c <= max(1, start))
    if usable is None:
        return chunk
    while True:
        peak = eval_peak(saes, cfg, acts, preprocess, chunk)
        if peak is None or peak <= usable or chunk == 1:
            logger.info(
                "Evaluation: %d SAEs at a time; XLA: %s per device.",
                chunk,
                "?" if peak is None else plan.format_bytes(peak),
            )
            return chunk
        chunk = max(c for c in plan.divisors(n) if c <= chunk // 2)


def eval_peak(saes: kinds.Inference, cfg: config.Train, acts, preprocess, chunk: int) -> int | None:
    """XLA's peak bytes of evaluation's per-batch step for `saes` at `chunk` (None if it cannot be analysed)."""
    try:
        n, d_sae = saes.b_enc.shape
        d_vit = saes.b_dec.shape[1]
        B = cfg.sae_batch_size
        spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
        sums = jax.tree.map(spec, evaluation._zero_sums(n, d_sae, d_vit))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        lowered = evaluation._accumulate.lower(
            sums, jax.tree.map(spec, saes), jax.tree.map(spec, preprocess), jax.ShapeDtypeStruct((B, d_vit), jnp.float32),
            scalar, scalar, stride=evaluation.quality_stride(evaluation.n_evaluated(len(acts), cfg.eval_n_patches), B), chunk=chunk,
        )  # fmt: skip
        return xla_peak(lowered.compile())
    except Exception as err:  # Evaluation's internals changed: evaluate with the training chunk.
        logger.warning("Could not analyse the evaluation step's memory (%s: %s).", type(err).__name__, err)
        return None


def evaluate_round(
    cfgs: list[config.Train],
    stacks: list[tuple[list[int], kinds.Inference, np.ndarray]],
    acts,
    preprocess,
    chunks: list[int],
) -> list["evaluation.EvalMetrics | str"]:
    """Per config, its EvalMetrics, or one line saying why its evaluation failed (the others still count).

    A stack is evaluated in one pass, `chunks[k]` SAEs at a time (`eval_chunk`: what fits the
    round's memory); if that fails, its SAEs one by one, so one SAE whose statistics break
    (say, a diverged one) does not cost the others theirs.
    """
    results: list[evaluation.EvalMetrics | str] = ["not evaluated"] * len(cfgs)
    for k, ((indices, saes, _), chunk) in enumerate(zip(stacks, chunks, strict=True)):
        device = saes.b_dec.devices().pop()
        sae_cfg = cfgs[indices[0]].sae
        desc = f"eval stack {k + 1}/{len(stacks)} ({len(indices)} {sae_cfg.kind} SAEs, d_sae {sae_cfg.d_sae})"
        try:
            stack_cfgs = [cfgs[i] for i in indices]
            evaluated = evaluation.evaluate(stack_cfgs, saes, acts, preprocess, device, chunk=chunk, desc=desc)
            for i, r in zip(indices, evaluated):
                results[i] = r
            continue
        except Exception as err:  # Anything: the fallback below says which SAE it was.
            logger.warning(
                "Evaluating a stack failed (%s: %s); evaluating its SAEs one by one.", type(err).__name__, err
            )
        for j, i in enumerate(indices):
            one = jax.tree.map(lambda leaf: leaf[j : j + 1], saes)
            try:
                results[i] = evaluation.evaluate([cfgs[i]], one, acts, preprocess, device)[0]
            except Exception as err:
                results[i] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                logger.error("Evaluating SAE %d (%s) failed: %s", i, cfgs[i].sae, results[i])
    return results


def main(cfgs: list[config.Train]) -> list[str]:
    """Trains every config, group by group (round by round); returns every run id.

    Every group's configs, data and plan are checked before the first group trains, so
    bad input fails fast and writes nothing. Groups with `slurm = true` are submitted as
    Slurm jobs instead (`launch.submit_slurm`). At the end, each `ckpt_path` gets a
    `summary.csv` of its runs, also printed as a table (by process 0 of a multi-process job);
    then the queued wandb runs are replayed, one line printed per run (`wandb_queue.Synced`).
    """
    groups = config.split_cfgs(cfgs)
    opened = [open_group(group) for group in groups]
    if any(group[0].slurm for group in groups):
        launch.submit_slurm([g for g in groups if g[0].slurm], main)
        opened = [acts for group, acts in zip(groups, opened) if not group[0].slurm]
        groups = [group for group in groups if not group[0].slurm]
    plans = [plan_group(group) for group in groups]
    with contextlib.ExitStack() as locks:
        if launch.is_lead():  # One sweep at a time per ckpt_path.
            for ckpt_path in dict.fromkeys(c.ckpt_path for c in cfgs):
                locks.enter_context(snapshot.lock_ckpt_dir(ckpt_path))
        ids = train_groups(groups, opened, plans)
    if launch.is_lead():
        for ckpt_path in dict.fromkeys(c.ckpt_path for c in cfgs):
            summary.summarize(ckpt_path, ids)
        # The queued wandb runs, replayed after the table (minutes for a large sweep): one line per run.
        for ckpt_path in dict.fromkeys(c.ckpt_path for c in cfgs):
            for synced in wandb_queue.replay_finished(pathlib.Path(ckpt_path) / "wandb-queue", ids):
                print(synced.line(), flush=True)
    return ids


@dataclasses.dataclass
class GroupPlan:
    """What a group's resume must reuse, stored in `<ckpt_path>/snapshots/group-<i>.plan.json` before it trains.

    The rounds (stacks, padding, chunks), the data's resolved read mode and the b_dec seed
    (the group's first config's, whatever the rounds), with the configs they were made for.
    """

    plan: plan.Plan
    read_mode: str
    b_dec_seed: int
    configs: list[dict]

    FORMAT = "saev_jax.group_plan/1"

    @staticmethod
    def fpath(cfg: config.Train, name: str) -> pathlib.Path:
        return pathlib.Path(cfg.ckpt_path) / "snapshots" / f"{name}.plan.json"

    def save(self, fpath: pathlib.Path) -> None:
        payload = {"format": self.FORMAT, "plan": self.plan.to_json(), "read_mode": self.read_mode,
                   "b_dec_seed": self.b_dec_seed, "configs": self.configs}  # fmt: skip
        fpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = fpath.with_name(f".{fpath.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, fpath)
        snapshot.fsync(fpath.parent)

    @classmethod
    def load(cls, fpath: pathlib.Path) -> "GroupPlan | None":
        if not fpath.is_file():
            return None
        d = json.loads(fpath.read_text())
        return cls(plan.Plan.from_json(d["plan"]), d["read_mode"], d["b_dec_seed"], d["configs"])


def round_names(name: str, group_plan: plan.Plan) -> list[str]:
    """The snapshot names of a group's rounds: `group-1`, or `group-1-round-1`, ... when it has several."""
    n = len(group_plan.rounds)
    return [name] if n == 1 else [f"{name}-round-{r + 1}" for r in range(n)]


def round_layouts(group: list[config.Train], gp: GroupPlan, mesh) -> list[Layout]:
    """One Layout per round of the group's plan (configs renumbered within the round)."""
    out = []
    for rnd in gp.plan.rounds:
        indices = sorted(j for s in rnd.stacks for j in s.cfg_indices)
        position = {j: k for k, j in enumerate(indices)}
        rnd = dataclasses.replace(rnd, stacks=tuple(
            dataclasses.replace(s, cfg_indices=tuple(position[j] for j in s.cfg_indices)) for s in rnd.stacks
        ))  # fmt: skip
        out.append(
            Layout(
                [group[j] for j in indices], rnd, mesh, gp.plan.limit, read_mode=gp.read_mode, b_dec_seed=gp.b_dec_seed
            )
        )
    return out


def checked_plan(group: list[config.Train], group_plan: plan.Plan, mesh) -> tuple[plan.Plan, list[Compiled]]:
    """The group's plan with every round's step compiled and inside the limit, and those steps.

    Chunks shrink where XLA's peak is over; a round that is over even at chunk 1 makes the
    group re-planned into more rounds with the estimate scaled by how low it was.
    """
    devices = list(mesh.devices.flat)
    correction = 1.0
    for _ in range(8):
        gp = GroupPlan(group_plan, "random", group[0].sae.seed, [])
        try:
            compiled = [layout.compile_within_limit() for layout in round_layouts(group, gp, mesh)]
        except DoesNotFit as err:
            planned = err.layout.round.planned_bytes
            correction *= max(1.1, err.peak_bytes / max(planned, 1) * 1.05)
            logger.info("XLA's peak of a round (%s) is over the limit at chunk 1: re-planning with estimates x%.2f.",
                        plan.format_bytes(err.peak_bytes), correction)  # fmt: skip
            group_plan = plan.make_plan(
                group, devices, group_plan.limit, group_plan.limit_source, correction=correction
            )
            continue
        rounds = [dataclasses.replace(rnd, stacks=tuple(
            dataclasses.replace(s, chunk=c) for s, c in zip(rnd.stacks, comp.layout.chunks)
        ), planned_bytes=comp.peak_bytes or rnd.planned_bytes) for rnd, comp in zip(group_plan.rounds, compiled)]  # fmt: skip
        return dataclasses.replace(group_plan, rounds=tuple(rounds)), compiled
    raise config.InputError(
        f"{group[0].ckpt_path}: no plan of this group fits {plan.format_bytes(group_plan.limit)} per device; raise memory_budget_gib"
    )


def group_plan_for(
    name: str, group: list[config.Train], acts, group_plan: plan.Plan, mesh
) -> tuple[GroupPlan, list[Compiled | None]]:
    """The plan a group trains by: the stored one if an earlier run of it left one, else `group_plan` checked and stored.

    A stored plan made for other configs is refused (naming the key and `--fresh`), and one
    made for another number of devices too. A resume that cannot fit the stored plan is
    refused later (`train_round`) with what to do.
    """
    cfg = group[0]
    fpath = GroupPlan.fpath(cfg, name)
    dicts = [config.to_dict(c) for c in group]
    if cfg.fresh and launch.is_lead():
        fpath.unlink(missing_ok=True)
        for dpath in fpath.parent.glob(f"{name}*"):
            if dpath.is_dir() and (dpath.name == name or dpath.name.startswith(f"{name}-round-")):
                snapshot.clear(dpath)
                (dpath / "done.json").unlink(missing_ok=True)
    launch.barrier(f"{name} fresh")
    stored = None if cfg.fresh else GroupPlan.load(fpath)
    if stored is not None:
        diff = snapshot.diff_configs(stored.configs, dicts)
        if diff is not None:
            raise config.InputError(
                f"{fpath}: {name} was started with other configs ({diff}); run the command that started it, "
                "or pass --fresh to start afresh"
            )
        if stored.plan.n_devices != mesh.size:
            raise config.InputError(
                f"{fpath}: {name} was started on {stored.plan.n_devices} devices, {mesh.size} now; "
                f"resume with --n-devices {stored.plan.n_devices}, or pass --fresh to start afresh"
            )
        stored.plan = dataclasses.replace(stored.plan, limit=group_plan.limit, limit_source=group_plan.limit_source)
        logger.info("%s: the plan of the run being resumed (%d round(s)) is reused.", name, len(stored.plan.rounds))
        return stored, [None] * len(stored.plan.rounds)
    checked, compiled = checked_plan(group, group_plan, mesh)
    read_mode = cfg.data.read_mode if cfg.data.read_mode != "auto" else data.choose_read_mode(acts)
    gp = GroupPlan(checked, read_mode, cfg.sae.seed, dicts)
    if launch.is_lead():
        gp.save(fpath)
    launch.barrier(f"{name} plan")
    return gp, compiled


def train_groups(groups, opened, plans) -> list[str]:
    """Every round of every (opened, planned) group, one after another; returns the run ids."""
    ids = []
    for i, (group, acts, (group_plan, mesh)) in enumerate(zip(groups, opened, plans)):
        # Snapshots and the stored plan are found by what the group's configs share (config.group_name),
        # whatever other sweep files are on the command line; logs call it by its place in this run.
        name, label = config.group_name(group), f"group-{i + 1}"
        gp, compiled = group_plan_for(name, group, acts, group_plan, mesh)
        logger.info(
            "Group %d/%d (%s, snapshots/%s): %d SAEs in %d round(s).",
            i + 1,
            len(groups),
            label,
            name,
            len(group),
            len(gp.plan.rounds),
        )
        for line in gp.plan.lines():
            logger.info(line)
        preprocess = functools.cache(lambda acts=acts, cfg=group[0]: data.make_preprocess(acts, cfg.data))
        for layout, round_name, round_label, comp in zip(
            round_layouts(group, gp, mesh), round_names(name, gp.plan), round_names(label, gp.plan), compiled
        ):
            try:
                ids.extend(
                    train_round(
                        layout.cfgs, layout, acts, preprocess, name=round_name, label=round_label, compiled=comp
                    )
                )
            except DoesNotFit as err:
                raise config.InputError(
                    f"{GroupPlan.fpath(group[0], name)}: resuming {round_label} needs {plan.format_bytes(err.peak_bytes)} per device "
                    f"(XLA, chunk 1), only {plan.format_bytes(err.usable)} is usable now; free memory or raise memory_budget_gib, "
                    "or pass --fresh to re-plan and start over"
                ) from None
    return ids
