"""SAE kinds behind one interface (`base.Kind`): one file each, selected by `sae.kind`.

    stack = kinds.make_stack(cfgs, precision)      # one kind, one d_sae
    hparams = kinds.make_hparams(cfgs)             # [M] arrays
    state = kinds.init_state(stack)                # [M] non-trainable state
    total, (metrics, state) = sae.loss(state, x_BD, hp, step)   # one SAE (vmap for a stack)
"""

import equinox as eqx
import jax
from jaxtyping import Array, Float

from .. import config
from .. import sae as sae_lib
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


class Inference(eqx.Module):
    """An SAE of any kind bound to its state and settings, used like `sae.SAE`: one example in.

    `__call__(x) -> (x_hat, f)`, `encode`, `decode` give the inference form (BatchTopK and
    Matryoshka with their threshold); `encode_batch` gives the training form on a batch.
    A stack of them (leading M axis on every leaf) is what evaluation takes.
    """

    sae: Kind
    state: eqx.Module
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
        return self.sae.encode(self.state, x_D[None], self.hp)[0]

    def decode(self, f: Float[Array, "*B d_sae"]) -> Float[Array, "*B d_vit"]:
        return self.sae.decode(f)

    def __call__(self, x_D: Float[Array, " d_vit"]) -> tuple[Float[Array, " d_vit"], Float[Array, " d_sae"]]:
        f_S = self.encode(x_D)
        return self.decode(f_S), f_S

    def encode_batch(self, x_BD: Float[Array, "B d_vit"]) -> Float[Array, "B d_sae"]:
        """The activations training sees on this batch (BatchTopK: the k * B largest)."""
        return self.sae.encode_train(self.state, x_BD, self.hp)

    def encode_sparse(self, x_BD: Float[Array, "B d_vit"]):
        """The inference form on a batch as a `sparse.Code` for kinds that have one (the TopK family), else None."""
        encode = getattr(self.sae, "encode_sparse", None)
        return None if encode is None else encode(self.state, x_BD, self.hp)


def as_kind(saes: "Kind | sae_lib.SAE") -> Kind:
    """A `sae.SAE` (or a stack of them) as the ReLU kind with the same tensors; a kind as it is."""
    if not isinstance(saes, sae_lib.SAE):
        return saes
    # Both hold W_enc, b_enc, W_dec, b_dec (in that order) and a static precision.
    template = jax.eval_shape(lambda: ReLU(1, 1, key=jax.random.key(0), precision=saes.precision))
    return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(saes))


def as_inference(saes: "Inference | Kind | sae_lib.SAE") -> Inference:
    """A stack as `Inference`: a stack of `sae.SAE` becomes ReLU SAEs with the same tensors."""
    if isinstance(saes, Inference):
        return saes
    saes = as_kind(saes)
    if not isinstance(saes, ReLU):
        raise TypeError(f"as_inference: a {type(saes).__name__} stack needs its state and hparams; build Inference")
    # ReLU's inference reads neither state nor settings.
    return Inference(saes, NoState(), ReLU.make_hparams([config.Train()] * saes.b_enc.shape[0]))


__all__ = ["Inference", "as_inference", "as_kind", "KINDS", "BatchTopK", "JumpReLU", "Kind", "Matryoshka", "NoState", "ReLU", "TopK", "init_state",
           "kind_class", "make_hparams", "make_stack", "stack_key"]  # fmt: skip
