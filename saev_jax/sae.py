"""saev's sparse autoencoder, by its familiar names.

`SAE` is the ReLU kind (`kinds.ReLU`): one class, whether it is built here, trained as a kind
or loaded from a checkpoint. Every kind (ReLU, TopK, BatchTopK, Matryoshka, JumpReLU) lives in
`kinds/`; `load` gives any of them in its inference form.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import checkpoint, config, steer
from .kinds.base import PRECISIONS, TENSOR_NAMES, safe_mse
from .kinds.relu import ReLU

SAE = ReLU
"""saev's ReLU SAE: `SAE(d_vit, d_sae, key=..., precision=...)`; `sae(x_D) -> (x_hat_D, f_S)`."""

__all__ = ["PRECISIONS", "SAE", "TENSOR_NAMES", "load", "load_cfg", "loss", "make_saes", "safe_mse", "save", "unstack"]


def loss(sae: SAE, x_BD: Float[Array, "B d_vit"], sparsity_coeff: Float[Array, ""]):
    """SPEC 3's loss of one SAE on a batch with this coefficient: (loss, dict of the terms and metrics)."""
    # saev's settings (no warm-up, no L0 target) for one SAE, with this coefficient.
    hp = jax.tree.map(lambda leaf: leaf[0], ReLU.make_hparams([config.Train(n_sparsity_warmup=0)]))
    hp = eqx.tree_at(lambda h: h.sparsity_coeff, hp, jnp.asarray(sparsity_coeff, jnp.float32))
    total, (metrics, _) = sae.loss(steer.init_controller(), x_BD, hp, jnp.int32(0))
    return total, metrics


def make_saes(cfgs: list[config.SparseAutoencoder], precision: str = "float32") -> SAE:
    """A stack of ReLU SAEs, the m-th initialised from `cfgs[m].seed`. All must share d_vit and d_sae."""
    return ReLU.make_stack([config.Train(sae=c) for c in cfgs], precision)


def unstack(saes: eqx.Module) -> list[eqx.Module]:
    """The SAEs of a stack, one by one."""
    n = saes.b_dec.shape[0]
    return [jax.tree.map(lambda leaf: leaf[m], saes) for m in range(n)]


save = checkpoint.save
load = checkpoint.load
load_cfg = checkpoint.load_cfg
