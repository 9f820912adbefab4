"""BatchTopK SAE (Bussmann, Leask & Nanda 2024): the k * B largest activations of the batch, plus AuxK.

At inference the batch coupling goes: one threshold theta, an EMA of the smallest activation
training kept, gives `f = relu(h) * 1[relu(h) > theta]` per example.
"""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import config
from . import base, select, topk


class BatchTopKHparams(eqx.Module):
    """Per-SAE settings of a BatchTopK stack."""

    k: Int[Array, "*M"]
    topk_threshold_lr: Float[Array, "*M"]
    aux: select.AuxKHparams

    @classmethod
    def from_cfgs(cls, cfgs: list[config.Train]) -> "BatchTopKHparams":
        return cls(
            k=jnp.array([c.sae.k for c in cfgs], jnp.int32),
            topk_threshold_lr=jnp.array([c.sae.topk_threshold_lr for c in cfgs], jnp.float32),
            aux=select.AuxKHparams.from_cfgs(cfgs),
        )


class ThresholdState(eqx.Module):
    """Dead-latent counters and the inference threshold (negative until the first batch)."""

    dead_counts: select.DeadCounts
    threshold: Float[Array, ""]

    @classmethod
    def initial(cls, d_sae: int) -> "ThresholdState":
        return cls(dead_counts=select.DeadCounts.zeros(d_sae), threshold=jnp.array(-1.0, jnp.float32))

    def update(self, f_BS: Float[Array, "B d_sae"], rate: Float[Array, ""]) -> "ThresholdState":
        return ThresholdState(self.dead_counts.update(f_BS), select.ema_threshold(self.threshold, f_BS, rate))

    @classmethod
    def from_tensors(cls, tensors: dict[str, Array]) -> "ThresholdState":
        """The state `inference_tensors` saved (one threshold, repeated per latent); dead counts at 0."""
        threshold = jnp.asarray(tensors["threshold"], jnp.float32)
        if not jnp.all(threshold == threshold[0]):
            raise ValueError("threshold must be one value repeated for every latent")
        return cls(dead_counts=select.DeadCounts.zeros(threshold.shape[0]), threshold=threshold[0])


def encode_with_threshold(h_BS: Float[Array, "B d_sae"], threshold: Float[Array, ""]) -> Float[Array, "B d_sae"]:
    """`relu(h) * 1[relu(h) > threshold]`; before any training batch (threshold < 0) plain ReLU."""
    a_BS = jax.nn.relu(h_BS)
    return jnp.where(a_BS > threshold, a_BS, 0.0)


@typing.final
class BatchTopK(base.Kind):
    """Training: `f = relu(h)` kept where among the k * B largest of the batch; loss = FVU + auxk_alpha * AuxK."""

    W_enc: Float[Array, "d_vit d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_vit"]
    b_dec: Float[Array, " d_vit"]
    precision: str = eqx.field(static=True)

    name: typing.ClassVar[str] = "batchtopk"
    batch_coupled: typing.ClassVar[bool] = True

    def __init__(self, d_vit: int, d_sae: int, *, key: PRNGKeyArray, precision: str = "float32"):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = base.tied_tensors(d_vit, d_sae, key)
        self.precision = base.check_precision(precision)

    @classmethod
    def make_stack(cls, cfgs: list[config.Train], precision: str) -> "BatchTopK":
        d_vit, d_sae = base.stack_shape(cfgs)
        return eqx.filter_vmap(lambda key: cls(d_vit, d_sae, key=key, precision=precision))(base.seed_keys(cfgs))

    @classmethod
    def make_hparams(cls, cfgs: list[config.Train]) -> BatchTopKHparams:
        return BatchTopKHparams.from_cfgs(cfgs)

    def inference_tensors(self, state) -> dict[str, Array]:
        # One threshold for every latent, as SAELens saves BatchTopK (as a JumpReLU).
        return {"threshold": jnp.full(self.b_enc.shape, state.threshold)}

    def with_inference_tensors(self, tensors) -> tuple["BatchTopK", ThresholdState]:
        return self, ThresholdState.from_tensors(tensors)

    def init_state(self) -> ThresholdState:
        return ThresholdState.initial(self.b_enc.shape[-1])

    def encode_train(self, state, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams) -> Float[Array, "B d_sae"]:
        return select.topk_batch(jax.nn.relu(self.pre_acts(x_BD)), hp.k)[0]

    def encode(self, state: ThresholdState, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams) -> Float[Array, "B d_sae"]:
        return encode_with_threshold(self.pre_acts(x_BD), state.threshold)

    def loss(self, state: ThresholdState, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams, step: Int[Array, ""]):
        h_BS = self.pre_acts(x_BD)
        f_BS, _ = select.topk_batch(jax.nn.relu(h_BS), hp.k)
        x_hat_BD = self.decode(f_BS)
        recon = base.fvu(x_hat_BD, x_BD)
        total, metrics = topk.with_auxk(self, state.dead_counts, x_BD, h_BS, f_BS, x_hat_BD, recon, hp.aux)
        new_state = state.update(f_BS, hp.topk_threshold_lr)
        return total, (metrics | {"threshold": new_state.threshold}, new_state)
