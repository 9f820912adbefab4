"""TopK SAE (Gao et al. 2024): each example keeps its k largest pre-activations, plus AuxK."""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import config
from . import base, select


class TopKHparams(eqx.Module):
    """Per-SAE settings of a TopK stack."""

    k: Int[Array, "*M"]
    aux: select.AuxKHparams


@typing.final
class TopK(base.Kind):
    """`f = topk_k(relu(h))` per example; loss = FVU + auxk_alpha * AuxK (no sparsity term)."""

    W_enc: Float[Array, "d_vit d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_vit"]
    b_dec: Float[Array, " d_vit"]
    precision: str = eqx.field(static=True)

    name: typing.ClassVar[str] = "topk"
    batch_coupled: typing.ClassVar[bool] = False

    def __init__(self, d_vit: int, d_sae: int, *, key: PRNGKeyArray, precision: str = "float32"):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = base.tied_tensors(d_vit, d_sae, key)
        self.precision = base.check_precision(precision)

    @classmethod
    def make_stack(cls, cfgs: list[config.Train], precision: str) -> "TopK":
        d_vit, d_sae = base.stack_shape(cfgs)
        return eqx.filter_vmap(lambda key: cls(d_vit, d_sae, key=key, precision=precision))(base.seed_keys(cfgs))

    @classmethod
    def make_hparams(cls, cfgs: list[config.Train]) -> TopKHparams:
        return TopKHparams(k=jnp.array([c.sae.k for c in cfgs], jnp.int32), aux=select.AuxKHparams.from_cfgs(cfgs))

    def inference_tensors(self, state) -> dict[str, Array]:
        return {}

    def with_inference_tensors(self, tensors) -> tuple["TopK", select.DeadCounts]:
        return self, self.init_state()

    def init_state(self) -> select.DeadCounts:
        return select.DeadCounts.zeros(self.b_enc.shape[-1])

    def encode_train(self, state, x_BD: Float[Array, "B d_vit"], hp: TopKHparams) -> Float[Array, "B d_sae"]:
        return select.topk_rows(jax.nn.relu(self.pre_acts(x_BD)), hp.k)

    def encode(self, state, x_BD: Float[Array, "B d_vit"], hp: TopKHparams) -> Float[Array, "B d_sae"]:
        return self.encode_train(state, x_BD, hp)

    def loss(self, state: select.DeadCounts, x_BD: Float[Array, "B d_vit"], hp: TopKHparams, step: Int[Array, ""]):
        h_BS = self.pre_acts(x_BD)
        f_BS = select.topk_rows(jax.nn.relu(h_BS), hp.k)
        x_hat_BD = self.decode(f_BS)
        total, metrics = with_auxk(self, state, x_BD, h_BS, f_BS, x_hat_BD, base.fvu(x_hat_BD, x_BD), hp.aux)
        return total, (metrics, state.update(f_BS))


def with_auxk(sae: base.Kind, counts: select.DeadCounts, x_BD, h_BS, f_BS, x_hat_BD, recon, aux_hp: select.AuxKHparams):
    """`(recon + auxk_alpha * AuxK, metrics)`: the TopK family's loss from its pieces.

    Shared by TopK, BatchTopK and Matryoshka. AuxK sees the latents dead *before* this batch.
    """
    dead_S = counts.dead(aux_hp.dead_threshold_tokens)
    aux = select.auxk_loss(h_BS, dead_S, x_BD - x_hat_BD, sae.W_dec, aux_hp.k_aux, sae.matmul)
    total = recon + aux_hp.auxk_alpha * aux
    metrics = {
        "mse": base.safe_mse(x_hat_BD, x_BD), "fvu": base.fvu(x_hat_BD, x_BD), "recon": recon, "aux_loss": aux,
        "l0": base.l0(f_BS), "l1": base.l1(f_BS), "n_dead": jnp.sum(dead_S, dtype=jnp.float32), "loss": total,
    }  # fmt: skip
    return total, metrics
