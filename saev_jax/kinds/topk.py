"""TopK SAE (Gao et al. 2024): each example keeps its k largest pre-activations, plus AuxK.

The step is sparse (kinds/sparse.py): one dense encoder product, `lax.top_k` with the stack's
static k_max, then decoding, AuxK and every gradient from the k selected latents per example.
`dense_loss` is the same loss written densely (the reference, and the faster form when k is
close to d_sae: see `sparse.use_sparse`).
"""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import config
from . import base, select, sparse


class TopKHparams(eqx.Module):
    """Per-SAE settings of a TopK stack."""

    k: Int[Array, "*M"]
    aux: select.AuxKHparams
    k_max: int = eqx.field(static=True, default=0)
    """The stack's largest k: the static size of the selection (0: d_sae)."""


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
        k = jnp.array([c.sae.k for c in cfgs], jnp.int32)
        return TopKHparams(k=k, aux=select.AuxKHparams.from_cfgs(cfgs), k_max=max(c.sae.k for c in cfgs))

    def inference_tensors(self, state) -> dict[str, Array]:
        return {}

    def with_inference_tensors(self, tensors) -> tuple["TopK", select.DeadCounts]:
        return self, self.init_kind_state()

    def init_kind_state(self) -> select.DeadCounts:
        return select.DeadCounts.zeros(self.b_enc.shape[-1])

    def encode_train(self, state, x_BD: Float[Array, "B d_vit"], hp: TopKHparams) -> Float[Array, "B d_sae"]:
        return select.topk_rows(jax.nn.relu(self.pre_acts(x_BD)), hp.k)

    def encode(self, state, x_BD: Float[Array, "B d_vit"], hp: TopKHparams) -> Float[Array, "B d_sae"]:
        return self.encode_train(state, x_BD, hp)

    def encode_sparse(self, state, x_BD: Float[Array, "B d_vit"], hp: TopKHparams) -> sparse.Code:
        """`encode` as k_max slots per example (the form evaluation uses)."""
        h_BS = self.pre_acts(x_BD)
        picked = select.pick_rows(h_BS, hp.k, k_max_of(hp, h_BS.shape[1]))
        values_BK = jnp.where(picked.keep_BK, jnp.take_along_axis(jax.nn.relu(h_BS), picked.cols_BK, axis=1), 0.0)
        n_fired = jnp.sum(values_BK > 0, dtype=jnp.int32)
        return sparse.Code(values_BK, picked.cols_BK, jnp.bool_(False), None, n_fired, d_sae=h_BS.shape[1])

    def loss(self, state: select.DeadCounts, x_BD: Float[Array, "B d_vit"], hp: TopKHparams, step: Int[Array, ""]):
        if sparse.use_sparse(self.b_enc.shape[-1], k_max_of(hp, self.b_enc.shape[-1])):
            return self.sparse_loss(state, x_BD, hp, step)
        return self.dense_loss(state, x_BD, hp, step)

    def sparse_loss(
        self, state: select.DeadCounts, x_BD: Float[Array, "B d_vit"], hp: TopKHparams, step: Int[Array, ""]
    ):
        """`loss` from the k_max largest pre-activations per example (kinds/sparse.py)."""
        k_max = k_max_of(hp, self.b_enc.shape[-1])
        h_BS = jax.lax.stop_gradient(self.pre_acts(x_BD))  # its gradient comes sparsely, through sparse.take
        picked = select.pick_rows(h_BS, hp.k, k_max)
        v_N, row_N, col_N = take_picked(self, x_BD, h_BS, picked)
        x_hat_BD = sparse.decode(v_N, row_N, col_N, self.W_dec, jnp.bool_(True), x_BD.shape[0]) + self.b_dec
        recon = base.fvu(x_hat_BD, x_BD)
        total, metrics = with_sparse_auxk(self, state, x_BD, h_BS, v_N, x_hat_BD, recon, hp.aux, picked.overflow)
        return total, (metrics, state.update_fired(sparse.fired(v_N, col_N, self.b_enc.shape[-1]), x_BD.shape[0]))

    def dense_loss(
        self, state: select.DeadCounts, x_BD: Float[Array, "B d_vit"], hp: TopKHparams, step: Int[Array, ""]
    ):
        """`loss` computed on dense `[B, d_sae]` activations."""
        h_BS = self.pre_acts(x_BD)
        f_BS = select.topk_rows(jax.nn.relu(h_BS), hp.k)
        x_hat_BD = self.decode(f_BS)
        total, metrics = with_auxk(self, state, x_BD, h_BS, f_BS, x_hat_BD, base.fvu(x_hat_BD, x_BD), hp.aux)
        return total, (metrics, state.update(f_BS))


def k_max_of(hp, d_sae: int) -> int:
    """The static selection size of a stack's hparams (at most d_sae)."""
    return min(hp.k_max or d_sae, d_sae)


def take_picked(sae: base.Kind, x_BD, h_BS, picked: select.Picked, active=True):
    """The kept slots as entries `(v, row, col)`: v = relu(h) differentiably, 0 on slots not kept."""
    row_N, col_N = sparse.flat(picked.cols_BK)
    active = jnp.asarray(active)
    v_N = sparse.take(h_BS, x_BD, sae.b_dec, sae.W_enc, sae.b_enc, row_N, col_N, active)
    return jnp.where(picked.keep_BK.reshape(-1), jax.nn.relu(v_N), 0.0), row_N, col_N


def sparse_auxk_loss(
    sae: base.Kind, dead_S, x_BD, h_BS, x_hat_BD, aux_hp: select.AuxKHparams
) -> tuple[Float[Array, ""], Bool[Array, ""]]:
    """`select.auxk_loss` from the dead latents' k_aux largest per example; nothing runs without dead latents.

    Also whether its selection overflowed (ties beyond its slots: then it is not exact).
    """
    B, S = h_BS.shape
    k_aux_max = min(aux_hp.k_aux_max, S)
    active = jnp.any(dead_S)
    pick = lambda: select.pick_auxk(h_BS, dead_S, aux_hp.k_aux, k_aux_max)  # noqa: E731
    none = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(pick))
    picked = sparse.run_if(active, pick, none)
    a_N, row_N, col_N = take_picked(sae, x_BD, h_BS, picked, active)
    e_hat_BD = sparse.decode(a_N, row_N, col_N, sae.W_dec, active, B)
    e_BD = jax.lax.stop_gradient(x_BD - x_hat_BD)
    var = jnp.maximum(jnp.sum((e_BD - jnp.mean(e_BD, axis=0)) ** 2), jnp.finfo(jnp.float32).tiny)
    return active * jnp.sum((e_hat_BD - e_BD) ** 2) / var, active & picked.overflow


def with_sparse_auxk(
    sae: base.Kind, counts: select.DeadCounts, x_BD, h_BS, v_N, x_hat_BD, recon, aux_hp: select.AuxKHparams, overflow
):
    """`with_auxk` from the kept entries' values `v_N` instead of dense activations.

    `overflow`: whether the selection of `v_N` overflowed its slots; the metric `select_overflow`
    is 1 if it or AuxK's did (then the loss is not exact and the train step redoes it densely).
    """
    dead_S = counts.dead(aux_hp.dead_threshold_tokens)
    aux, aux_overflow = sparse_auxk_loss(sae, dead_S, x_BD, h_BS, x_hat_BD, aux_hp)
    total = recon + aux_hp.auxk_alpha * aux
    B = x_BD.shape[0]
    metrics = {
        "mse": base.safe_mse(x_hat_BD, x_BD), "fvu": base.fvu(x_hat_BD, x_BD), "recon": recon, "aux_loss": aux,
        "l0": jnp.sum(v_N > 0, dtype=jnp.float32) / B, "l1": jnp.sum(v_N) / B,
        "n_dead": jnp.sum(dead_S, dtype=jnp.float32), "loss": total,
        "select_overflow": (overflow | aux_overflow).astype(jnp.float32),
    }  # fmt: skip
    return total, metrics


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
        "select_overflow": jnp.float32(0),
    }  # fmt: skip
    return total, metrics
