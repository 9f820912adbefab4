"""SAE kinds behind one interface (`base.Kind`): one file each, selected by `sae.kind`.

    stack = kinds.make_stack(cfgs, precision)      # one kind, one d_sae
    hparams = kinds.make_hparams(cfgs)             # [M] arrays
    state = kinds.init_state(stack)                # [M] non-trainable state
    total, (metrics, state) = sae.loss(state, x_BD, hp, step)   # one SAE (vmap for a stack)
"""

import equinox as eqx

from .. import config
from .base import Kind, NoState
from .batchtopk import BatchTopK
from .jumprelu import JumpReLU
from .matryoshka import Matryoshka
from .relu import ReLU
from .topk import TopK

KINDS: dict[str, type[Kind]] = {cls.name: cls for cls in (ReLU, TopK, BatchTopK, Matryoshka, JumpReLU)}
"""Every kind by its `sae.kind` name."""


def kind_class(cfgs: list[config.Train]) -> type[Kind]:
    """The one kind of a stack's configs; ValueError if they mix kinds."""
    names = {c.sae.kind for c in cfgs}
    if len(names) != 1:
        raise ValueError(f"a stack needs one kind, got {sorted(names)}")
    return KINDS[names.pop()]


def stack_key(cfg: config.Train) -> tuple[str, int]:
    """Configs with equal keys train in one stack: same kind and same d_sae."""
    return (cfg.sae.kind, cfg.sae.d_sae)


def make_stack(cfgs: list[config.Train], precision: str = "float32") -> Kind:
    """A stack of freshly initialised SAEs of one kind and width, the m-th from `cfgs[m].sae.seed`."""
    return kind_class(cfgs).make_stack(cfgs, precision)


def make_hparams(cfgs: list[config.Train]) -> eqx.Module:
    """The kind-specific per-SAE hyper-parameters of a stack, as `[M]` arrays."""
    return kind_class(cfgs).make_hparams(cfgs)


def init_state(stack: Kind) -> eqx.Module:
    """The kind's state at step 0 for every SAE of a stack."""
    return eqx.filter_vmap(lambda sae: sae.init_state())(stack)


__all__ = ["KINDS", "BatchTopK", "JumpReLU", "Kind", "Matryoshka", "NoState", "ReLU", "TopK", "init_state",
           "kind_class", "make_hparams", "make_stack", "stack_key"]  # fmt: skip
