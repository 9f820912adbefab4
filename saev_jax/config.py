"""Configs for training sweeps of SAEs, sweep expansion and grouping.

The dataclasses, their defaults and the sweep semantics follow `saev`'s, so a
sweep file written for `saev` gives the same configs in the same order here. The SAE
seeds follow SPEC's rule (see `grid`), which differs from what saev's code does.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import tomllib
import types
import typing
from collections.abc import Iterator
from typing import Literal


class InputError(ValueError):
    """Something the user gave us is wrong. The message is one line naming the file, key or value."""


@dataclasses.dataclass(frozen=True)
class DataLoad:
    """How to turn a directory of activation shards into examples."""

    shard_root: str = os.path.join(".", "shards")
    """Directory with `metadata.json` and `acts*.bin` shards, as written by saev."""
    patches: Literal["cls", "patches", "meanpool"] = "patches"
    """Which tokens an example is made of: the [CLS] token, one patch token, or the mean of the patch tokens."""
    layer: int | Literal["all", "meanpool"] = -2
    """Which recorded layer (a value in `metadata.layers`), every layer (`all`), or their mean (`meanpool`)."""
    clamp: float = 1e5
    """Clamp activations to [-clamp, clamp] before anything else."""
    n_random_samples: int = 2**19
    """How many random examples estimate the mean and the norm scale."""
    scale_mean: bool | str = True
    """Subtract the mean activation: estimate it (True), don't (False), or load it from this file."""
    scale_norm: bool | str = True
    """Scale so the mean L2 norm of an example is sqrt(d_vit): estimate (True), don't (False), or load from this file."""
    read_mode: Literal["auto", "random", "blocks"] = "auto"
    """How shuffled batches are read: `random` draws every example from a full random permutation
    (fast while the shards fit in the page cache); `blocks` reads runs of whole images in large
    reads and shuffles them through a buffer of `shuffle_buffer_mib` (for shard sets larger than
    memory); `auto` picks `blocks` when the shard files are larger than the memory available."""
    shuffle_buffer_mib: int = 2048
    """Host memory for the `blocks` shuffle buffer, in MiB: a batch mixes examples of one window
    of half this size (the other half is read ahead)."""
    max_open_shards: int = 256
    """Shard files kept open at once (least recently used are closed), whatever the shard count."""


@dataclasses.dataclass(frozen=True)
class SparseAutoencoder:
    """One SAE's architecture and its regularisation."""

    d_vit: int = 1024
    """Width of the ViT activations."""
    exp_factor: int = 16
    """Expansion factor: the SAE has d_vit * exp_factor features."""
    sparsity_coeff: float = 4e-4
    """Weight of the L1 penalty on the feature activations."""
    n_reinit_samples: int = 1024 * 16 * 32
    """How many examples' mean initialises b_dec; 0 keeps it at zero."""
    ghost_grads: bool = False
    """Ghost gradients; not implemented (as in saev), so True is an error."""
    remove_parallel_grads: bool = True
    """Remove the component of each decoder row's gradient along that row."""
    normalize_w_dec: bool = True
    """Rescale each decoder row to unit norm before every step."""
    seed: int = 0
    """Seed of the SAE's weight initialisation."""
    kind: Literal["relu", "topk", "batchtopk", "matryoshka", "jumprelu"] = "relu"
    """Which SAE (SPEC 11): saev's ReLU + L1, TopK, BatchTopK, Matryoshka (BatchTopK-based) or JumpReLU."""
    k: int = 32
    """topk, batchtopk, matryoshka: active latents per example (BatchTopK: on average over the batch)."""
    k_aux: int = 512
    """topk, batchtopk, matryoshka: how many dead latents per example AuxK uses to model the residual."""
    auxk_alpha: float = 1 / 32
    """topk, batchtopk, matryoshka: weight of the AuxK loss (0 turns AuxK off)."""
    dead_threshold_tokens: int = 10_000_000
    """topk, batchtopk, matryoshka: a latent is dead for AuxK after this many training examples without firing."""
    topk_threshold_lr: float = 0.01
    """batchtopk, matryoshka: rate of the EMA of the smallest kept activation, the inference threshold."""
    matryoshka_widths: tuple[int, ...] = ()
    """matryoshka: increasing prefix ends, the last d_sae; empty means d_sae * (1/16, 1/8, 1/4, 1/2, 1). In a sweep file write [[...]]."""
    l0_coefficient: float = 1e-3
    """jumprelu: weight of the L0 penalty (warmed up over `n_sparsity_warmup` steps)."""
    jumprelu_init_threshold: float = 0.0
    """jumprelu: initial threshold of every latent; 0 means 0.001 * sqrt(d_vit) (GDM's 0.001 at E|x|^2 = 1, rescaled)."""
    jumprelu_bandwidth: float = 0.0
    """jumprelu: width eps of the straight-through estimator's rectangle kernel; 0 means 0.001 * sqrt(d_vit)."""
    target_l0: float | None = None
    """relu, jumprelu: steer the sparsity coefficient (sparsity_coeff or l0_coefficient, then its starting value)
    every step so that the batch L0 ends near this (`steer.py`); None (no key) keeps the coefficient fixed."""

    @property
    def d_sae(self) -> int:
        return self.d_vit * self.exp_factor

    @property
    def setting(self) -> tuple[str, float | int]:
        """`(name, value)` of this kind's own sparsity setting: `k` for the TopK family,
        `l0_coefficient` for JumpReLU, `sparsity_coeff` for ReLU."""
        name = SETTINGS[self.kind]
        return name, getattr(self, name)

    @property
    def kind_label(self) -> str:
        """The kind and its sparsity knob, for tables and legends: `relu`, `topk k=32`, `jumprelu l0=0.001`."""
        if self.kind in ("topk", "batchtopk", "matryoshka"):
            return f"{self.kind} k={self.k}"
        if self.kind == "jumprelu":
            return f"jumprelu l0={self.l0_coefficient:g}"
        return self.kind


SETTINGS = {"relu": "sparsity_coeff", "topk": "k", "batchtopk": "k", "matryoshka": "k", "jumprelu": "l0_coefficient"}
"""Each kind's own sparsity setting: the `[sae]` field that trades reconstruction for sparsity."""


@dataclasses.dataclass(frozen=True)
class Train:
    """A training run: data, SAE, optimisation, logging and checkpoints."""

    data: DataLoad = dataclasses.field(default_factory=DataLoad)
    """Which activations to train on."""
    n_workers: int = 32
    """Reader threads of the data loader (saev: DataLoader workers); 0 (saev: read in the main process) means one."""
    n_patches: int = 100_000_000
    """Train until more than this many examples have been seen."""
    sae: SparseAutoencoder = dataclasses.field(default_factory=SparseAutoencoder)
    """The SAE."""
    n_sparsity_warmup: int = 0
    """Steps over which the sparsity coefficient rises linearly from 0; 0 means no warm-up."""
    lr: float | None = None
    """Adam learning rate. Unset: saev's 4e-4 for relu; for the other kinds their peers' 2e-4 * sqrt(2^14 / d_sae) (SPEC 11)."""
    n_lr_warmup: int = 500
    """Steps over which the learning rate rises linearly from 0; 0 means no warm-up."""
    lr_schedule: Literal["constant", "linear", "cosine"] | None = None
    """After the warm-up: constant; linear decay to 0 over the last `lr_decay_frac` of training; or cosine to 0.
    Unset: constant for relu (saev), linear for the other kinds (SPEC 11)."""
    lr_decay_frac: float = 0.2
    """With lr_schedule = "linear": the fraction of training steps over which the learning rate decays to 0."""
    max_grad_norm: float | None = None
    """Clip each SAE's gradient to this global L2 norm before Adam; 0: no clipping. Unset: 0 for relu (saev), 1.0 for the other kinds."""
    sae_batch_size: int = 1024 * 16
    """Examples per step (shared by every SAE of a group)."""
    track: bool = True
    """Log to wandb; False sets wandb's mode to disabled."""
    wandb_project: str = "saev"
    """The wandb project."""
    tag: str = ""
    """A tag for the wandb runs."""
    log_every: int = 25
    """Log training metrics every this many steps."""
    ckpt_path: str = os.path.join(".", "checkpoints")
    """Where `<run id>/sae.safetensors`, `cfg.json` and `metrics.json` go."""
    device: str = "auto"
    """JAX platform to train on: auto (JAX's default), cpu, gpu (or cuda) or tpu."""
    seed: int = 42
    """Seed of everything but the SAE weights (data order)."""
    precision: Literal["float32", "tensorfloat32", "bfloat16"] = "float32"
    """Matmul precision: bfloat16 multiplies in bf16 with float32 accumulation; tensorfloat32 lets the device use TF32
    (saev's setting on GPUs; bf16x3 on TPUs; the same as float32 on CPUs); parameters and Adam state stay float32."""
    n_devices: int = 0
    """Train on the first this many devices of the platform; 0 means all of them."""
    memory_budget_gib: float = 0.0
    """Memory each device may use, in GiB, for the planner; 0 means what the device reports (CPU: the available RAM)."""
    sae_chunk: int = 0
    """SAEs each device updates at once inside the step; 0 lets the planner choose from the memory."""
    save_every: int = 1000
    """Snapshot the whole training state every this many steps (and on SIGTERM/SIGINT, and when training ends); 0: only then."""
    fresh: bool = False
    """Ignore snapshots and finished groups that an earlier run left in ckpt_path: train everything afresh."""
    slurm: bool = False
    """Submit each group as a Slurm job (submitit; pip install 'saev_jax[slurm]') instead of training here."""
    slurm_acct: str = ""
    """The Slurm account the jobs of `slurm = true` are charged to ('' for the cluster's default)."""
    log_to: str = os.path.join(".", "logs")
    """Where the Slurm jobs of `slurm = true` write their logs."""
    prune: Literal["none", "halving"] = "none"
    """Successive halving of the sweep: at each of `prune_rungs` the worse SAEs of each tier (same kind, width
    and sparsity target) stop early and are evaluated and kept as they are (`steer.halving_stops`); none: train all."""
    prune_rungs: tuple[float, ...] = (0.25, 0.5)
    """prune = halving: when the rungs happen, as increasing fractions of the training steps, each in (0, 1)."""
    prune_keep: float = 0.5
    """prune = halving: the fraction of each tier's running SAEs that go on at a rung (rounded up), in (0, 1)."""
    eval_n_patches: int = 0
    """Evaluate each SAE after training on at most this many examples: a random subset of the shards, the same
    for every SAE evaluated on them with this cap (a fixed seed); 0 (default), or more than the shards hold: all of them."""

    def __post_init__(self):
        # Fields left unset take their kind's default here, so every reader sees a value and
        # cfg.json records what trained; `unset` remembers them, so a sweep that changes the
        # kind (`grid`) resolves them again for it.
        defaults = kind_defaults(self.sae)
        unset = tuple(name for name in defaults if getattr(self, name) is None)
        for name in unset:
            object.__setattr__(self, name, defaults[name])
        object.__setattr__(self, "unset", unset)


def default_lr(sae: SparseAutoencoder) -> float:
    """saev's 4e-4 for relu; 2e-4 * sqrt(2^14 / d_sae) for the other kinds (Gao et al.'s rule, as SPEC 11)."""
    if sae.kind == "relu":
        return 4e-4
    return 2e-4 * math.sqrt(2**14 / max(sae.d_sae, 1))


def kind_defaults(sae: SparseAutoencoder) -> dict[str, object]:
    """The values `Train`'s unset optimiser fields take for this SAE's kind: saev's for relu, SPEC 11's for the others."""
    relu = sae.kind == "relu"
    return {
        "lr": default_lr(sae),
        "lr_schedule": "constant" if relu else "linear",
        "max_grad_norm": 0.0 if relu else 1.0,
    }


CANNOT_PARALLELIZE = frozenset({
    "data", "n_workers", "n_patches", "sae_batch_size", "track", "wandb_project", "tag",
    "log_every", "ckpt_path", "device", "slurm", "slurm_acct", "log_to",
    "sae.d_vit", "precision", "n_devices", "memory_budget_gib", "sae_chunk", "save_every", "fresh",
    "prune", "prune_rungs", "prune_keep", "eval_n_patches",
})  # fmt: skip


LAYOUT_KEYS = frozenset({"memory_budget_gib", "sae_chunk", "fresh", "n_workers", "n_devices", "eval_n_patches"})
"""Keys that say how a group runs, not what it trains: a resume may change them (`snapshot.diff_configs`),
and they do not name the group (`group_name`). `eval_n_patches` is one: evaluation follows training."""


def n_train_steps(cfg: Train) -> int:
    """Steps until more than `n_patches` examples have been seen (saev's BatchLimiter)."""
    return cfg.n_patches // cfg.sae_batch_size + 1


def to_dict(cfg) -> dict[str, object]:
    """A config as plain JSON-ready data (tuples as lists, as JSON and wandb give them back)."""
    return dataclasses.asdict(
        cfg, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items}
    )


def from_dict(cls, dct: dict[str, object], *, where: str = "config"):
    """Builds `cls` (a config dataclass) from plain data, as `to_dict` writes it.

    Raises InputError naming `where` and the key for a key that names no field.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in dct.items():
        if key not in fields:
            raise InputError(f"{where}: unknown key '{key}' (not a field of {cls.__name__})")
        sub = _SUBCONFIGS.get((cls, key))
        if sub:
            if not isinstance(value, dict):
                raise InputError(f"{where}: '{key}' must be a table, got {value!r}")
            kwargs[key] = from_dict(sub, value, where=f"{where}.{key}")
        else:
            kwargs[key] = _coerce(fields[key], value, where)
    return cls(**kwargs)


_SUBCONFIGS = {(Train, "data"): DataLoad, (Train, "sae"): SparseAutoencoder}


def _coerce(field: dataclasses.Field, value: object, where: str) -> object:
    if typing.get_origin(field.type) is types.UnionType and type(None) in typing.get_args(field.type):
        # `X | None` (None: unset, resolved per kind): None, or what an X field takes.
        (inner,) = [a for a in typing.get_args(field.type) if a is not type(None)]
        return None if value is None else _coerce(types.SimpleNamespace(name=field.name, type=inner), value, where)
    # TOML writes `lr = 1` as an int; a float field takes it as a float.
    if field.type is float and type(value) is int:
        return float(value)
    if field.type == tuple[int, ...]:
        # TOML and JSON give lists; a frozen config holds tuples (they hash).
        if not isinstance(value, (list, tuple)) or not all(type(v) is int for v in value):
            raise InputError(f"{where}: {field.name} = {value!r} must be a list of ints (in a sweep file, [[...]])")
        return tuple(value)
    if field.type == tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or not all(type(v) in (int, float) for v in value):
            raise InputError(f"{where}: {field.name} = {value!r} must be a list of numbers (in a sweep file, [[...]])")
        return tuple(float(v) for v in value)
    if field.type == float | None and type(value) is int:
        return float(value)
    if field.type in (int, float, bool, str) and type(value) is not field.type:
        raise InputError(f"{where}: {field.name} = {value!r} must be {field.type.__name__}")
    return value


def expand(sweep: dict[str, object]) -> Iterator[dict[str, object]]:
    """The Cartesian product of every list in `sweep`, nested tables expanded in place.

    Keys vary in file order, the first slowest and the last fastest; a nested table
    counts as one key at its position. `sweep` is not modified.
    """
    if not sweep:
        yield {}
        return
    *rest, (key, value) = sweep.items()
    if isinstance(value, list):
        values = value
    elif isinstance(value, dict):
        values = list(expand(value))
    else:
        values = [value]
    for head in expand(dict(rest)):
        for v in values:
            yield {**head, key: v}


def grid(base: Train, sweep: dict[str, object]) -> list[Train]:
    """Every config of a sweep, in saev's order.

    The d-th config gets `seed = base.seed + d` (the sweep's `seed`, if it sets one,
    replaces `base.seed`); when the sweep sets any `[sae]` key, also
    `sae.seed = (sweep's sae.seed or base.sae.seed) + seed_base + d` (SPEC 2).
    saev's own `grid` differs in the SAE seeds only: it reuses one `[sae]` dict for every
    combination of the other keys and writes each seed back into it, so its seeds compound
    (on sweeps/saev_example.toml saev draws 42-47, 90-100 and 144-159 where this gives 42-59).
    Raises InputError naming any key that names no config field.
    """
    # The base's optimiser fields that took its kind's default resolve again for each config's kind.
    # `dataclasses.replace` forgets which were unset: a value equal to the base kind's default counts as unset.
    unset = base.unset or tuple(k for k, v in kind_defaults(base.sae).items() if getattr(base, k) == v)
    cfgs = []
    for d, dct in enumerate(expand(sweep)):
        dct = dict(dct)
        seed = dct.pop("seed", base.seed)
        sae_dct = dict(dct.pop("sae", None) or {})
        data_dct = dct.pop("data", None) or {}
        for table, value in (("sae", sae_dct), ("data", data_dct)):
            if not isinstance(value, dict):
                raise InputError(f"sweep: '{table}' must be a table, got {value!r}")
        if sae_dct:
            sae_dct["seed"] = sae_dct.get("seed", base.sae.seed) + seed + d
        merged = {k: v for k, v in to_dict(base).items() if k not in unset} | dct
        merged["sae"] = to_dict(base.sae) | sae_dct
        merged["data"] = to_dict(base.data) | data_dct
        merged["seed"] = seed + d
        cfgs.append(from_dict(Train, merged, where="sweep"))
    return cfgs


def load_sweep(fpath: str | pathlib.Path) -> dict[str, object]:
    """Reads a TOML sweep file; InputError naming the file if it is missing or invalid."""
    try:
        with open(fpath, "rb") as fd:
            return tomllib.load(fd)
    except FileNotFoundError:
        raise InputError(f"{fpath}: sweep file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{fpath}: invalid TOML: {err}") from None


def _canonical(cfg: Train, key: str) -> str:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True)


def group_key(cfg: Train) -> tuple[str, ...]:
    """What must be equal for two configs to share one vmapped stack."""
    return tuple(_canonical(cfg, key) for key in sorted(CANNOT_PARALLELIZE))


def split_cfgs(cfgs: list[Train]) -> list[list[Train]]:
    """Groups configs that can train as one stack: equal on every key in CANNOT_PARALLELIZE.

    Groups come in first-seen order; each group's configs in input order.
    """
    groups: dict[tuple[str, ...], list[Train]] = {}
    for cfg in cfgs:
        groups.setdefault(group_key(cfg), []).append(cfg)
    return list(groups.values())


def check_groupable(cfgs: list[Train]) -> None:
    """InputError naming the keys on which `cfgs` differ, if they cannot share one stack."""
    differing = sorted(key for key in CANNOT_PARALLELIZE if len({_canonical(c, key) for c in cfgs}) > 1)
    if differing:
        raise InputError(
            f"{len(cfgs)} configs cannot train as one stack: they differ on {', '.join(differing)} "
            "(use split_cfgs to group them)"
        )


def validate(cfg: Train) -> None:
    """Checks values no sweep expansion can catch; InputError naming the key and value."""
    checks = [
        (cfg.sae.ghost_grads, "sae.ghost_grads", "ghost gradients are not implemented (nor in saev)"),
        (cfg.sae.d_vit <= 0, "sae.d_vit", "must be positive"),
        (cfg.sae.exp_factor <= 0, "sae.exp_factor", "must be positive"),
        (cfg.sae_batch_size <= 0, "sae_batch_size", "must be positive"),
        (cfg.n_patches <= 0, "n_patches", "must be positive"),
        (cfg.log_every <= 0, "log_every", "must be positive"),
        (cfg.n_workers < 0, "n_workers", "must not be negative (0 means one reader thread)"),
        (cfg.eval_n_patches < 0, "eval_n_patches", "must not be negative (0 evaluates on every example)"),
        (cfg.seed < 0, "seed", "must not be negative (NumPy's generators take no negative seed)"),
        (cfg.sae.seed < 0, "sae.seed", "must not be negative"),
        (cfg.lr < 0, "lr", "must not be negative"),
        (not cfg.max_grad_norm >= 0, "max_grad_norm", "must not be negative (0 means no clipping)"),
        (cfg.n_lr_warmup < 0, "n_lr_warmup", "must not be negative"),
        (cfg.n_sparsity_warmup < 0, "n_sparsity_warmup", "must not be negative"),
        (cfg.sae.sparsity_coeff < 0, "sae.sparsity_coeff", "must not be negative"),
        (cfg.sae.n_reinit_samples < 0, "sae.n_reinit_samples", "must not be negative"),
        (cfg.n_devices < 0, "n_devices", "must not be negative (0 means every device)"),
        (not cfg.memory_budget_gib >= 0, "memory_budget_gib", "must not be negative (0 means what the device has)"),
        (cfg.sae_chunk < 0, "sae_chunk", "must not be negative (0 lets the planner choose)"),
        (cfg.save_every < 0, "save_every", "must not be negative (0 snapshots only on signals and at the end)"),
        (cfg.precision not in ("float32", "tensorfloat32", "bfloat16"), "precision", "must be float32, tensorfloat32 or bfloat16"),
        (cfg.data.patches not in typing.get_args(DataLoad.__annotations__["patches"]), "data.patches", "must be cls, patches or meanpool"),
        (isinstance(cfg.data.layer, str) and cfg.data.layer not in ("all", "meanpool"), "data.layer", "must be an int, 'all' or 'meanpool'"),
        (cfg.data.read_mode not in typing.get_args(DataLoad.__annotations__["read_mode"]), "data.read_mode", "must be auto, random or blocks"),
        (cfg.data.shuffle_buffer_mib <= 0, "data.shuffle_buffer_mib", "must be positive"),
        (cfg.data.max_open_shards <= 0, "data.max_open_shards", "must be positive"),
    ]  # fmt: skip
    checks += _kind_checks(cfg)
    for bad, key, why in checks:
        if bad:
            value = _canonical(cfg, key)
            raise InputError(f"{key} = {value}: {why}")


KIND_FIELDS = {
    "sparsity_coeff": ("relu",),
    "k": ("topk", "batchtopk", "matryoshka"),
    "k_aux": ("topk", "batchtopk", "matryoshka"),
    "auxk_alpha": ("topk", "batchtopk", "matryoshka"),
    "dead_threshold_tokens": ("topk", "batchtopk", "matryoshka"),
    "topk_threshold_lr": ("batchtopk", "matryoshka"),
    "matryoshka_widths": ("matryoshka",),
    "l0_coefficient": ("jumprelu",),
    "jumprelu_init_threshold": ("jumprelu",),
    "jumprelu_bandwidth": ("jumprelu",),
}
"""The `[sae]` fields that only some kinds read: setting one for another kind is an error."""


def _kind_checks(cfg: Train) -> list[tuple[bool, str, str]]:
    sae, default = cfg.sae, SparseAutoencoder()
    kinds = typing.get_args(SparseAutoencoder.__annotations__["kind"])
    if sae.kind not in kinds:
        return [(True, "sae.kind", f"must be one of {', '.join(kinds)}")]
    widths = sae.matryoshka_widths
    checks = [
        (getattr(sae, name) != getattr(default, name) and sae.kind not in owners,
         f"sae.{name}", f"only kind {' or '.join(owners)} reads it, but sae.kind = {sae.kind}")
        for name, owners in KIND_FIELDS.items()
    ]  # fmt: skip
    checks += [
        (sae.k <= 0, "sae.k", "must be positive"),
        (sae.k > sae.d_sae and sae.kind in KIND_FIELDS["k"], "sae.k", f"must be at most d_sae = {sae.d_sae}"),
        (sae.k_aux <= 0, "sae.k_aux", "must be positive"),
        (sae.auxk_alpha < 0, "sae.auxk_alpha", "must not be negative"),
        (not 0 < sae.dead_threshold_tokens < 2**30, "sae.dead_threshold_tokens", "must be in [1, 2^30)"),
        (not 0 < sae.topk_threshold_lr <= 1, "sae.topk_threshold_lr", "must be in (0, 1]"),
        (any(w <= 0 for w in widths), "sae.matryoshka_widths", "must be positive"),
        (list(widths) != sorted(set(widths)), "sae.matryoshka_widths", "must be strictly increasing"),
        (bool(widths) and widths[-1] != sae.d_sae, "sae.matryoshka_widths", f"must end at d_sae = {sae.d_sae}"),
        (sae.l0_coefficient < 0, "sae.l0_coefficient", "must not be negative"),
        (sae.jumprelu_init_threshold < 0, "sae.jumprelu_init_threshold", "must not be negative"),
        (sae.jumprelu_bandwidth < 0, "sae.jumprelu_bandwidth", "must not be negative"),
        (cfg.lr_schedule not in ("constant", "linear", "cosine"), "lr_schedule", "must be constant, linear or cosine"),
        (not 0 <= cfg.lr_decay_frac <= 1, "lr_decay_frac", "must be in [0, 1]"),
        (cfg.lr_decay_frac != Train.lr_decay_frac and cfg.lr_schedule != "linear", "lr_decay_frac", "only lr_schedule = linear reads it"),
        (sae.k * cfg.sae_batch_size >= 2**31, "sae.k", "k * sae_batch_size must be below 2^31"),
    ]  # fmt: skip
    return checks + _steer_checks(cfg)


def field_type(key: str):
    """The annotated type of a dotted `Train` field (`lr`, `sae.k`, `data.layer`), or None if it names none."""
    cls, parts = Train, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        if i < len(parts) - 1:
            cls = _SUBCONFIGS.get((cls, part))
            if cls is None:
                return None
    return fields[parts[-1]].type


def unknown_keys(sweep: dict[str, object]) -> list[str]:
    """Every key of a sweep file (`[sae]` and `[data]` keys dotted) that names no config field, in file order."""
    out = []
    for key, value in sweep.items():
        if (Train, key) in _SUBCONFIGS and isinstance(value, dict):
            out += [f"{key}.{sub}" for sub in value if field_type(f"{key}.{sub}") is None]
        elif field_type(key) is None:
            out.append(key)
    return out


def check_sweep_keys(sweep: dict[str, object], where: str) -> None:
    """InputError listing, in one line, every key of the sweep file `where` that names no config field."""
    unknown = unknown_keys(sweep)
    if unknown:
        names = ", ".join(f"'{key}'" for key in unknown)
        what = "key" if len(unknown) == 1 else f"{len(unknown)} keys"
        raise InputError(f"{where}: unknown {what} {names} (no such config field; --help lists them)")


def sweep_items(sweep: dict[str, object]) -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every setting in a sweep file, `[sae]` and `[data]` keys dotted."""
    for key, value in sweep.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                yield f"{key}.{sub}", sub_value
        else:
            yield key, value


def _bool_or_str(key: str) -> bool:
    kind = field_type(key)
    return kind is not None and kind is not bool and bool in typing.get_args(kind)


def normalize_flags(args: list[str]) -> list[str]:
    """saev's spellings of flags, as tyro reads them here: `--data.no-scale-mean` is `--data.scale-mean False`
    and a bare `--data.scale-mean` is `--data.scale-mean True` (fields that take a bool or a file name)."""
    out = []
    for i, arg in enumerate(args):
        name = arg[2:].replace("_", "-") if arg.startswith("--") and "=" not in arg else ""
        prefix, dot, last = name.rpartition(".")
        negated = prefix + dot + last[3:]
        if last.startswith("no-") and _bool_or_str(negated.replace("-", "_")):
            out += [f"--{negated}", "False"]
        elif name and _bool_or_str(name.replace("-", "_")) and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out += [arg, "True"]
        else:
            out.append(arg)
    return out


def flag_keys(args: list[str]) -> dict[str, str]:
    """The dotted `Train` fields that `args` (tyro's flags) set, each with the flag as written (`--data.layer`)."""
    out = {}
    for arg in args:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        key = flag[2:].replace("-", "_")
        prefix, dot, last = key.rpartition(".")
        if field_type(key) is None and last.startswith("no_"):  # --no-track, --data.no-scale-mean
            key = prefix + dot + last[3:]
        if field_type(key) is not None:
            out[key] = flag
    return out


def overridden_flags(
    sweep: dict[str, object], flags: dict[str, str], base: Train
) -> list[tuple[str, str, object, object]]:
    """(key, flag, flag's value, file's value) of every flag in `flags` that the sweep file sets to something else."""
    out = []
    for key, value in sweep_items(sweep):
        if key in flags:
            given = json.loads(_canonical(base, key))
            if value != given and value != [given]:  # A one-value list sets the flag's value too.
                out.append((key, flags[key], given, value))
    return out


def group_name(cfgs: list[Train]) -> str:
    """A group's name, `group-<8 hex digits>`: a hash of what its configs share (the values of
    `CANNOT_PARALLELIZE`: data, ckpt_path, n_patches, ...), not of its place on the command line.

    So rerunning a command with another sweep file added finds this group's snapshots again,
    and a group whose SAEs changed (another lr, one more file joining it) finds them too, and is
    refused as made with other configs. `LAYOUT_KEYS` and `slurm` are left out: they say how to
    run (a resume may change them), and a Slurm job trains its group with `slurm = false`.
    """
    shared = {key: _canonical(cfgs[0], key) for key in sorted(CANNOT_PARALLELIZE - LAYOUT_KEYS - {"slurm"})}
    return "group-" + hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:8]


def _steer_checks(cfg: Train) -> list[tuple[bool, str, str]]:
    sae, target = cfg.sae, cfg.sae.target_l0
    is_number = isinstance(target, (int, float)) and not isinstance(target, bool)
    rungs = cfg.prune_rungs
    return [
        (target is not None and sae.kind in ("topk", "batchtopk", "matryoshka"), "sae.target_l0",
         f"kind {sae.kind} has L0 = k: set sae.k instead of target_l0"),
        (target is not None and not is_number, "sae.target_l0", "must be a number"),
        (is_number and not 0 < target < sae.d_sae, "sae.target_l0", f"must be in (0, d_sae = {sae.d_sae})"),
        (is_number and sae.kind == "relu" and not sae.sparsity_coeff > 0, "sae.sparsity_coeff",
         "must be positive with sae.target_l0 (it is the controller's starting value)"),
        (is_number and sae.kind == "jumprelu" and not sae.l0_coefficient > 0, "sae.l0_coefficient",
         "must be positive with sae.target_l0 (it is the controller's starting value)"),
        (cfg.prune not in ("none", "halving"), "prune", "must be none or halving"),
        (not 0 < cfg.prune_keep < 1, "prune_keep", "must be in (0, 1)"),
        (not rungs or any(not 0 < r < 1 for r in rungs), "prune_rungs",
         "must be fractions of training in (0, 1); a rung at or past the end of training never happens"),
        (list(rungs) != sorted(set(rungs)), "prune_rungs", "must be strictly increasing"),
        (cfg.prune == "none" and cfg.prune_keep != Train.prune_keep, "prune_keep", "only prune = halving reads it"),
        (cfg.prune == "none" and rungs != Train.prune_rungs, "prune_rungs", "only prune = halving reads it"),
    ]  # fmt: skip
