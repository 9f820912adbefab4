"""BatchTopK SAE (Bussmann, Leask & Nanda 2024): the k * B largest activations of the batch, plus AuxK.

At inference the batch coupling goes: one threshold theta, an EMA of the smallest activation
training kept, gives `f = relu(h) * 1[relu(h) > theta]` per example.
"""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import config
from . import base, select, sparse, topk

SPARSE_TRAINING = True
"""Whether BatchTopK and Matryoshka train on the sparse path (`sparse_loss`) where the width allows.
That path picks from each example's `select.batch_candidates` largest and differs from exact
BatchTopK when an example holds more of the batch's k * B (reported as `select_overflow`); the
train step then redoes the chunk of SAEs with `dense_loss` (step._chunk_step), so training is
exact, and pays for the dense form only on the (rare) batches that overflow.
Evaluation's sparse form (`encode_sparse`) is exact either way (a dense remainder on overflow)."""


class BatchTopKHparams(eqx.Module):
    """Per-SAE settings of a BatchTopK stack."""

    k: Int[Array, "*M"]
    topk_threshold_lr: Float[Array, "*M"]
    aux: select.AuxKHparams
    k_max: int = eqx.field(static=True, default=0)
    """The stack's largest k (0: d_sae); the selection considers `select.batch_candidates` per example."""

    @classmethod
    def from_cfgs(cls, cfgs: list[config.Train]) -> "BatchTopKHparams":
        return cls(
            k=jnp.array([c.sae.k for c in cfgs], jnp.int32),
            topk_threshold_lr=jnp.array([c.sae.topk_threshold_lr for c in cfgs], jnp.float32),
            aux=select.AuxKHparams.from_cfgs(cfgs),
            k_max=max(c.sae.k for c in cfgs),
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

    def update_sparse(self, v_N: Float[Array, " N"], col_N, n: int, rate: Float[Array, ""]) -> "ThresholdState":
        """`update` from the kept entries (values `v_N` of latents `col_N`) of a batch of n examples."""
        fired_S = sparse.fired(v_N, col_N, self.dead_counts.tokens_since_fired.shape[-1])
        return ThresholdState(
            self.dead_counts.update_fired(fired_S, n), select.ema_threshold(self.threshold, v_N, rate)
        )


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

    def init_kind_state(self) -> ThresholdState:
        return ThresholdState.initial(self.b_enc.shape[-1])

    def encode_train(self, state, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams) -> Float[Array, "B d_sae"]:
        return select.topk_batch(jax.nn.relu(self.pre_acts(x_BD)), hp.k)[0]

    def encode(
        self, state: ThresholdState, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams
    ) -> Float[Array, "B d_sae"]:
        return encode_with_threshold(self.pre_acts(x_BD), state.threshold)

    def encode_sparse(self, state: ThresholdState, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams) -> sparse.Code:
        """`encode` as each example's `select.batch_candidates` largest, plus a dense remainder on overflow."""
        return threshold_code(self.pre_acts(x_BD), state.threshold, hp)

    def loss(self, state: ThresholdState, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams, step: Int[Array, ""]):
        # `sparse_loss` equals `dense_loss` unless it reports `select_overflow`; the train step then redoes it densely.
        if SPARSE_TRAINING and sparse.use_sparse(self.b_enc.shape[-1], topk.k_max_of(hp, self.b_enc.shape[-1])):
            return self.sparse_loss(state, x_BD, hp, step)
        return self.dense_loss(state, x_BD, hp, step)

    def sparse_loss(
        self, state: ThresholdState, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams, step: Int[Array, ""]
    ):
        """`loss` from each example's `select.batch_candidates` largest pre-activations (kinds/sparse.py)."""
        picked, h_BS, overflow = sparse_batch_pick(self, x_BD, hp)
        v_N, row_N, col_N, overflow = take_kept(self, x_BD, h_BS, picked, overflow, hp)
        x_hat_BD = sparse.decode(v_N, row_N, col_N, self.W_dec, jnp.bool_(True), x_BD.shape[0]) + self.b_dec
        recon = base.fvu(x_hat_BD, x_BD)
        total, metrics = topk.with_sparse_auxk(
            self, state.dead_counts, x_BD, h_BS, v_N, x_hat_BD, recon, hp.aux, overflow
        )
        new_state = state.update_sparse(v_N, col_N, x_BD.shape[0], hp.topk_threshold_lr)
        # select_overflow: an example had more of the batch's k * B than its candidates (or AuxK's ties
        # did not fit): then (only then) this differs from `dense_loss`; the train step redoes it with that.
        return total, (metrics | {"threshold": new_state.threshold}, new_state)

    def dense_loss(
        self, state: ThresholdState, x_BD: Float[Array, "B d_vit"], hp: BatchTopKHparams, step: Int[Array, ""]
    ):
        """`loss` computed on dense `[B, d_sae]` activations."""
        h_BS = self.pre_acts(x_BD)
        f_BS, _ = select.topk_batch(jax.nn.relu(h_BS), hp.k)
        x_hat_BD = self.decode(f_BS)
        recon = base.fvu(x_hat_BD, x_BD)
        total, metrics = topk.with_auxk(self, state.dead_counts, x_BD, h_BS, f_BS, x_hat_BD, recon, hp.aux)
        new_state = state.update(f_BS, hp.topk_threshold_lr)
        return total, (metrics | {"threshold": new_state.threshold}, new_state)


def threshold_code(h_BS: Float[Array, "B d_sae"], threshold: Float[Array, ""], hp) -> sparse.Code:
    """`encode_with_threshold(h, threshold)` as a `sparse.Code`, with the training form's count on the batch.

    Slots: each example's `select.batch_candidates` largest pre-activations, kept above the
    threshold. An example with more above it makes the code overflow, and only then is the
    dense remainder computed. Likewise the training form's count is exact: when the batch's
    selection overflows its candidates, it is counted densely.
    """
    B, S = h_BS.shape
    k_max = topk.k_max_of(hp, S)
    vals_BC, cols_BC = select.top_k(h_BS, select.batch_candidates(S, k_max))
    a_BC = jax.nn.relu(vals_BC)
    keep_BC = a_BC > threshold
    overflow = (vals_BC.shape[1] < S) & jnp.any(keep_BC[:, -1])

    def rest():
        return encode_with_threshold(h_BS, threshold).at[jnp.arange(B)[:, None], cols_BC].set(0.0)

    rest_BS = sparse.run_if(overflow, rest, jnp.zeros_like(h_BS))
    picked, _, train_overflow = select.pick_batch_from(vals_BC, cols_BC, hp.k, S)
    dense_count = lambda: jnp.sum(select.topk_batch(jax.nn.relu(h_BS), hp.k)[0] > 0, dtype=jnp.int32)  # noqa: E731
    n_train = jnp.where(
        train_overflow,
        sparse.run_if(train_overflow, dense_count, jnp.int32(0)),
        jnp.sum(picked.keep_BK, dtype=jnp.int32),
    )
    return sparse.Code(jnp.where(keep_BC, a_BC, 0.0), cols_BC, overflow, rest_BS, n_train, d_sae=S)


def take_kept(sae: base.Kind, x_BD, h_BS, picked: select.Picked, overflow, hp):
    """`topk.take_picked` of the kept candidates only, as `(k_max + select.TIE_SLOTS) * B` entries: the
    sparse passes then cost what TopK's do, not 4x (the candidates are 4 k_max per example, the batch keeps
    k * B). Also `overflow`, or'ed with whether the kept ones did not fit (ties at the threshold)."""
    B, S = h_BS.shape
    n = (topk.k_max_of(hp, S) + select.TIE_SLOTS) * B
    keep_N, row_N, col_N, more = sparse.compact(picked.keep_BK, picked.cols_BK, n)
    v_N = sparse.take(h_BS, x_BD, sae.b_dec, sae.W_enc, sae.b_enc, row_N, col_N, jnp.bool_(True))
    return jnp.where(keep_N, jax.nn.relu(v_N), 0.0), row_N, col_N, overflow | more


def sparse_batch_pick(sae: base.Kind, x_BD, hp) -> tuple[select.Picked, Float[Array, "B d_sae"], Bool[Array, ""]]:
    """BatchTopK's selection for a sparse step: the picked slots, the (gradient-free) pre-activations, overflow."""
    h_BS = jax.lax.stop_gradient(sae.pre_acts(x_BD))  # its gradient comes sparsely, through sparse.take
    picked, _, overflow = select.pick_batch(h_BS, hp.k, topk.k_max_of(hp, h_BS.shape[1]))
    return picked, h_BS, overflow
