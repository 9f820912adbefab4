"""How a group of SAEs is laid out on the devices it is given, before anything is allocated.

A group's SAEs form one stack per shape. Every stack is split over the devices of a mesh
axis `'sae'` (padded to a multiple of it), and each device runs its share `chunk` SAEs at a
time inside the one jitted step. The planner picks the chunk sizes from the memory each
device has, so that the whole state stays resident and the batch is read once per step;
only when even that state does not fit does it split the group into rounds that train one
after another (each round re-reads the data).

Per SAE with P parameters (SPEC 8): resident `12 P` bytes (parameters and two Adam moments);
in flight `8 P + 3 B d_sae 4` (gradients and updates, and the `[B, d_sae]` activations the
backward pass keeps). Shared per device: a few `[B, d_vit]` batches. The estimate is then
checked, and the chunks shrunk if needed, with XLA's own memory analysis of the compiled step.
"""

import dataclasses
import logging

import jax
import numpy as np
from jax.sharding import Mesh

from . import config, data, kinds
from .step import SAE_AXIS

logger = logging.getLogger(__name__)

HEADROOM = {"cpu": 0.5}
"""Plan to use at most this fraction of a device's memory (0.9 where not listed). On CPU a
process's peak resident memory measured 1.5-1.8x XLA's analysis of the step (runtime, allocator
and input buffers: benchmarks/results/scale-cpu.md), so the CPU plan leaves half the RAM free."""


def headroom(platform: str) -> float:
    """The fraction of a `platform` device's memory a plan may use."""
    return HEADROOM.get(platform, 0.9)


ACTIVATION_COPIES = {
    "relu": (2.7, 1.25),
    "topk": (4.9, 2.0),
    "batchtopk": (5.9, 2.2),
    "matryoshka": (6.1, 2.2),
    "jumprelu": (5.05, 0.1),
}
"""Per kind, the `[B, d_sae]` float32 arrays XLA keeps alive while the step runs: per SAE in flight
(pre-activations, activations, their gradients, and the kind's own: selection masks, AuxK,
prefix losses, thresholds), and once per stack whatever the chunk.

The one place to recalibrate (after a kind's step changes, say): fitted to XLA:CPU's memory
analysis of the compiled step at two shapes (64x1024, batch 512, 8 SAEs; 64x2048, batch 4096,
4 SAEs) for chunks 1, 2 and all, on 1 and 4 devices. `python benchmarks/scale.py --calibrate`
prints XLA's peak over the estimate for each kind and chunk, and
`tests/test_plan.py::test_estimate_tracks_xla` is the judge (within 15%, never 5% under).
"""
SINGLE_COPIES = {"topk": 3.9, "batchtopk": 4.6, "matryoshka": 4.95}
"""Per SAE in flight when a stack runs one SAE at a time (chunk 1), where that differs from
`ACTIVATION_COPIES`: the TopK family's sparse step, not vmapped, keeps fewer `[B, d_sae]` buffers.
The TopK family's entries were refitted after the exact dense fallback (`step._chunk_step`, a
`lax.cond` whose dense branch XLA also plans memory for) and BatchTopK's sparse training landed:
at 64x1024, batch 512 the estimate is 1.00-1.13x XLA's peak; at 64x2048, batch 4096 it is
1.16-1.33x (the sparse buffers grow with B k, not B d_sae), on the safe side."""
BATCH_COPIES = 4
"""`[B, d_vit]` float32 batches alive per device: raw, preprocessed, and the loader's prefetch."""
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StackPlan:
    """One stack of SAEs of one shape: which configs, how many padded SAEs, how they run."""

    cfg_indices: tuple[int, ...]
    """Positions in the group's config list of this stack's SAEs, in stack order."""
    d_vit: int
    d_sae: int
    n_padded: int
    """Stack length after padding to a multiple of the device count (pads are never reported)."""
    chunk: int
    """SAEs each device runs at once inside the step."""
    kind: str = "relu"
    """The SAEs' kind (`sae.kind`), which sets what each keeps alive in flight."""

    @property
    def n_saes(self) -> int:
        return len(self.cfg_indices)

    @property
    def n_params(self) -> int:
        return 2 * self.d_vit * self.d_sae + self.d_sae + self.d_vit


@dataclasses.dataclass(frozen=True)
class Round:
    """Stacks trained together, on one pass over the data."""

    stacks: tuple[StackPlan, ...]
    planned_bytes: int
    """Planned peak bytes per device (estimate, or XLA's analysis once checked)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """A group's layout: rounds trained one after another, on `n_devices` devices with `limit` bytes each."""

    rounds: tuple[Round, ...]
    n_devices: int
    platform: str
    limit: int
    """Bytes per device the plan must stay under."""
    limit_source: str
    """Where `limit` came from: the config's budget, the device, or the OS."""

    def to_json(self) -> dict:
        """The plan as JSON-ready data (`from_json` reads it back): what a resume must reuse."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        rounds = tuple(
            Round(tuple(StackPlan(**(s | {"cfg_indices": tuple(s["cfg_indices"])})) for s in r["stacks"]), r["planned_bytes"])
            for r in d["rounds"]
        )  # fmt: skip
        return cls(rounds, d["n_devices"], d["platform"], d["limit"], d["limit_source"])

    def lines(self) -> list[str]:
        """One line per stack: its SAEs, devices, chunk and planned bytes per device against the limit."""
        out = []
        n_stacks = sum(len(r.stacks) for r in self.rounds)
        i = 0
        for r_i, rnd in enumerate(self.rounds):
            for s in rnd.stacks:
                i += 1
                pads = f" (+{s.n_padded - s.n_saes} padding)" if s.n_padded > s.n_saes else ""
                where = f"round {r_i + 1}/{len(self.rounds)}, " if len(self.rounds) > 1 else ""
                out.append(
                    f"stack {i}/{n_stacks}: {s.n_saes} SAEs{pads} of {s.d_vit}x{s.d_sae}, {where}"
                    f"{self.n_devices} devices ({self.platform}), chunk {s.chunk}, "
                    f"planned {format_bytes(rnd.planned_bytes)} per device of {format_bytes(self.limit)} ({self.limit_source})"
                )
        return out


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps it at least 1 (GiB at most)."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def resident_bytes(n_params: int) -> int:
    """Parameters and both Adam moments of one SAE, float32."""
    return 12 * n_params


def in_flight_bytes(n_params: int, batch_size: int, d_sae: int, kind: str = "relu", chunk: int = 2) -> int:
    """What one SAE of `kind` needs while its update is computed, beyond its resident state
    (`chunk` SAEs at a time: chunk 1 may need less, `SINGLE_COPIES`)."""
    copies = SINGLE_COPIES.get(kind, ACTIVATION_COPIES[kind][0]) if chunk == 1 else ACTIVATION_COPIES[kind][0]
    return int(8 * n_params + copies * batch_size * d_sae * 4)


def stack_flight_bytes(s: StackPlan, n_devices: int, batch_size: int) -> int:
    """Per device, what stack `s` adds to its resident state while the step runs it.

    Its `chunk` SAEs in flight, the arrays alive once per stack, and, when the stack runs in
    more than one chunk, a second copy of its state: `lax.map` writes the new state into a
    buffer of its own instead of updating the donated one in place. A chunk that does not
    divide the device's share leaves a remainder that `lax.map` runs apart, with buffers of
    its own (XLA counts both: 16 SAEs at chunk 6 hold 6 + 4 in flight).
    """
    per_dev = s.n_padded // n_devices
    copy = per_dev * resident_bytes(s.n_params) if s.chunk < per_dev else 0
    shared = int(ACTIVATION_COPIES[s.kind][1] * batch_size * s.d_sae * 4)
    in_flight = s.chunk + per_dev % s.chunk
    return in_flight * in_flight_bytes(s.n_params, batch_size, s.d_sae, s.kind, s.chunk) + shared + copy


def estimate(stacks: list[StackPlan], n_devices: int, batch_size: int) -> int:
    """Estimated peak bytes per device of one round: resident state plus the largest stack in flight.

    Stacks run one after another inside the step, so only one stack's chunk is in flight at a time.
    """
    shared = BATCH_COPIES * batch_size * stacks[0].d_vit * 4
    resident = sum(s.n_padded // n_devices * resident_bytes(s.n_params) for s in stacks)
    return shared + resident + max(stack_flight_bytes(s, n_devices, batch_size) for s in stacks)


def divisors(n: int) -> list[int]:
    """The chunk sizes that split `n` SAEs evenly, smallest first."""
    return [c for c in range(1, n + 1) if n % c == 0]


def get_devices(cfg: config.Train) -> list[jax.Device]:
    """The devices a group trains on: the first `cfg.n_devices` (0: all) of its platform."""
    platform = {"auto": None, "cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(cfg.device.lower(), "?")
    if platform == "?":
        raise config.InputError(f"device = {cfg.device!r}: must be auto, cpu, gpu (or cuda) or tpu")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise config.InputError(
            f"device = {cfg.device!r}: JAX has no {platform} backend here (see README: installing for GPU/TPU)"
        ) from None
    if cfg.n_devices > len(devices):
        raise config.InputError(
            f"n_devices = {cfg.n_devices}: only {len(devices)} {devices[0].platform} devices exist here"
        )
    return devices[: cfg.n_devices or len(devices)]


def make_mesh(devices: list[jax.Device]) -> Mesh:
    """A one-axis mesh `'sae'` over `devices` (Auto axis type, as every JAX version builds it)."""
    return Mesh(np.array(devices), (SAE_AXIS,))


def device_limit(cfg: config.Train, devices: list[jax.Device]) -> tuple[int, str]:
    """Bytes each device may use, and where that number came from.

    With several processes, the smallest of their limits, so every process makes the same plan.
    """
    if cfg.memory_budget_gib > 0:
        return int(cfg.memory_budget_gib * GIB), "memory_budget_gib"
    local = [d for d in devices if d.process_index == jax.process_index()]
    stats = local[0].memory_stats()
    if stats and "bytes_limit" in stats:
        limit, source = int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"{local[0].platform} memory_stats"
    else:  # CPU devices share the host's RAM.
        limit, source = data.available_memory() // len(local), "available RAM"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # In whole MiB: JAX's arrays are 32-bit by default.
        limit_mib = multihost_utils.process_allgather(np.array([limit // 2**20], np.int32))
        limit = int(np.min(limit_mib)) * 2**20
    return limit, source


def stacks_of(cfgs: list[config.Train]) -> list[tuple[int, ...]]:
    """Config positions grouped by `kinds.stack_key` (kind and width; a group has one d_vit), in
    first-seen order: one stack each."""
    stacks: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        stacks.setdefault(kinds.stack_key(c), []).append(i)
    return [tuple(v) for v in stacks.values()]


def make_plan(
    cfgs: list[config.Train], devices: list[jax.Device], limit: int, limit_source: str, *, correction: float = 1.0
) -> Plan:
    """The plan of one group from sizes alone (no compilation; see `training.Layout.compile_within_limit`).

    `correction` scales every estimate (XLA's peak over the estimate, when a compiled step
    showed the estimate low). Raises InputError, naming the smallest `memory_budget_gib` that
    would do, when one SAE alone does not fit a device.
    """
    cfg = cfgs[0]
    B, n_dev = cfg.sae_batch_size, len(devices)
    usable = int(limit * headroom(devices[0].platform))

    def estimate_(stacks):
        return int(estimate(stacks, n_dev, B) * correction)

    def stack_plan(indices, chunk=1):
        c0 = cfgs[indices[0]]
        n_padded = -(-len(indices) // n_dev) * n_dev
        return StackPlan(tuple(indices), c0.sae.d_vit, c0.sae.d_sae, n_padded, chunk, c0.sae.kind)

    largest = max(-(-len(indices) // n_dev) for indices in stacks_of(cfgs))
    if cfg.sae_chunk > largest:
        raise config.InputError(
            f"sae_chunk = {cfg.sae_chunk}: larger than any stack's share of a device (at most {largest} SAEs "
            f"on each of {n_dev} devices); use at most {largest}, or 0 to let the planner choose"
        )
    # Rounds: add SAEs (in config order within each shape) while the resident state and one SAE in flight fit.
    rounds: list[list[list[int]]] = []
    for indices in stacks_of(cfgs):
        one = stack_plan(indices[:1])
        if (need := estimate_([one])) > usable:
            smallest = need / headroom(devices[0].platform) / GIB
            raise config.InputError(
                f"one {one.kind} SAE of {one.d_vit}x{one.d_sae} at sae_batch_size {B} needs about {format_bytes(need)} per device, "
                f"more than the {format_bytes(usable)} usable of {format_bytes(limit)} ({limit_source}); "
                f"the smallest memory_budget_gib that fits is {smallest:.3g} (on a device that has it), or lower sae_batch_size"
            )
        for i in indices:
            placed = False
            if rounds:
                trial = [list(s) for s in rounds[-1]]
                same = [
                    s
                    for s in trial
                    if (cfgs[s[0]].sae.kind, cfgs[s[0]].sae.d_sae) == (cfgs[i].sae.kind, cfgs[i].sae.d_sae)
                ]
                if same:
                    same[0].append(i)
                else:
                    trial.append([i])
                if estimate_([stack_plan(s) for s in trial]) <= usable:
                    rounds[-1] = trial
                    placed = True
            if not placed:
                rounds.append([[i]])

    planned = []
    for stacks in rounds:
        plans = [stack_plan(s) for s in stacks]
        # Grow each stack's chunk (widest stacks last) while the round still fits.
        for j in sorted(range(len(plans)), key=lambda j: plans[j].d_sae):
            per_dev = plans[j].n_padded // n_dev
            if cfg.sae_chunk > 0:
                plans[j] = dataclasses.replace(plans[j], chunk=min(cfg.sae_chunk, per_dev))
                continue
            best = 1
            for c in divisors(per_dev):  # A remainder chunk would hold buffers of its own.
                trial = plans[:j] + [dataclasses.replace(plans[j], chunk=c)] + plans[j + 1 :]
                if estimate_(trial) <= usable:
                    best = c
            plans[j] = dataclasses.replace(plans[j], chunk=best)
        planned.append(Round(tuple(plans), estimate_(plans)))
    return Plan(tuple(planned), n_dev, devices[0].platform, limit, limit_source)
