"""SAE kinds behind one interface (`base.Kind`): one file each, selected by `sae.kind`.

stack = kinds.make_stack(cfgs, precision)          # one kind, one d_sae
hparams = kinds.make_hparams(cfgs)                 # [M] arrays
kind_state = kinds.init_kind_state(stack)          # [M] non-trainable state
total, (metrics, kind_state) = sae.loss(kind_state, x_BD, hp, step)   # one SAE (vmap for a stack)
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .. import config
from .base import TENSOR_NAMES, Kind, NoState
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


def init_kind_state(stack: Kind) -> eqx.Module:
    """The kind's state at step 0 for every SAE of a stack."""
    return eqx.filter_vmap(lambda sae: sae.init_kind_state())(stack)


class Inference(eqx.Module):
    """An SAE of any kind bound to its state and settings: one example in.

    `__call__(x) -> (x_hat, f)`, `encode`, `decode` give the inference form (BatchTopK and
    Matryoshka with their threshold); `encode_batch` gives the training form on a batch.
    A stack of them (leading M axis on every leaf) is what evaluation takes.
    """

    sae: Kind
    kind_state: eqx.Module
    hp: eqx.Module

    @property
    def W_enc(self) -> Array:
        return self.sae.W_enc

    @property
    def b_enc(self) -> Array:
        return self.sae.b_enc

    @property
    def W_dec(self) -> Array:
        return self.sae.W_dec

    @property
    def b_dec(self) -> Array:
        return self.sae.b_dec

    def encode(self, x_D: Float[Array, " d_vit"]) -> Float[Array, " d_sae"]:
        return self.sae.encode(self.kind_state, x_D[None], self.hp)[0]

    def decode(self, f: Float[Array, "*B d_sae"]) -> Float[Array, "*B d_vit"]:
        return self.sae.decode(f)

    def __call__(self, x_D: Float[Array, " d_vit"]) -> tuple[Float[Array, " d_vit"], Float[Array, " d_sae"]]:
        f_S = self.encode(x_D)
        return self.decode(f_S), f_S

    def encode_batch(self, x_BD: Float[Array, "B d_vit"]) -> Float[Array, "B d_sae"]:
        """The activations training sees on this batch (BatchTopK: the k * B largest)."""
        return self.sae.encode_train(self.kind_state, x_BD, self.hp)

    def encode_sparse(self, x_BD: Float[Array, "B d_vit"]):
        """The inference form on a batch as a `sparse.Code` for kinds that have one (the TopK family), else None."""
        encode = getattr(self.sae, "encode_sparse", None)
        return None if encode is None else encode(self.kind_state, x_BD, self.hp)


def as_inference(saes: "Inference | ReLU") -> Inference:
    """A stack as `Inference`; a ReLU stack (`sae.SAE`), whose inference reads neither, gets its step-0
    state and default settings (the same structure a loaded or trained ReLU stack has)."""
    if isinstance(saes, Inference):
        return saes
    if not isinstance(saes, ReLU):
        raise TypeError(f"as_inference: a {type(saes).__name__} stack needs its state and hparams; build Inference")
    return Inference(saes, init_kind_state(saes), ReLU.make_hparams([config.Train()] * saes.b_enc.shape[0]))


def make_inference(
    cfg: config.Train, tensors: dict[str, Array], kind_tensors: dict[str, Array], precision: str = "float32"
) -> Inference:
    """One SAE of `cfg.sae.kind` in its inference form, from its four tensors and its kind's inference tensors.

    The inverse of what training saves (`TENSOR_NAMES` and `Kind.inference_tensors`). ValueError,
    naming the kind, if `kind_tensors` lacks a tensor, has one too many or one of the wrong shape.
    """
    cls = KINDS[cfg.sae.kind]
    # Shapes only: the draws of a fresh init would be thrown away.
    template = jax.eval_shape(lambda: jax.tree.map(lambda a: a[0], cls.make_stack([cfg], precision)))
    sae = eqx.tree_at(
        lambda s: [getattr(s, n) for n in TENSOR_NAMES],
        template,
        [jnp.asarray(tensors[n], jnp.float32) for n in TENSOR_NAMES],
    )
    expected = jax.eval_shape(lambda s: s.inference_tensors(s.init_kind_state()), template)
    problems = [f"missing {n}" for n in expected if n not in kind_tensors]
    problems += [f"unknown {n}" for n in kind_tensors if n not in expected]
    problems += [
        f"{n} has shape {list(kind_tensors[n].shape)}, expected {list(e.shape)}"
        for n, e in expected.items() if n in kind_tensors and tuple(kind_tensors[n].shape) != e.shape
    ]  # fmt: skip
    if problems:
        raise ValueError(f"kind {cls.name}: {'; '.join(problems)}")
    try:
        sae, state = sae.with_inference_tensors({n: jnp.asarray(t, jnp.float32) for n, t in kind_tensors.items()})
    except ValueError as err:
        raise ValueError(f"kind {cls.name}: {err}") from None
    hp = jax.tree.map(lambda a: a[0], cls.make_hparams([cfg]))
    return Inference(sae, state, hp)


__all__ = ["Inference", "as_inference", "make_inference", "KINDS", "TENSOR_NAMES", "BatchTopK", "JumpReLU", "Kind", "Matryoshka",
           "NoState", "ReLU", "TopK", "init_kind_state", "kind_class", "make_hparams", "make_stack", "stack_key"]  # fmt: skip
