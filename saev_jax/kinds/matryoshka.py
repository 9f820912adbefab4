"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025), BatchTopK-based.

One BatchTopK selection over all latents; the loss adds a reconstruction loss for each prefix
of the dictionary: `sum_g w_g * FVU(f[:, :m_g] @ W_dec[:m_g] + b_dec) + auxk_alpha * AuxK`.
A stack shares one static grid of block ends (the union of its SAEs' prefix ends); each SAE
weighs the grid's prefixes with its own traced weights (non-zero at its own prefix ends), so
SAEs with different prefixes still train in one step. All prefix reconstructions come from one
block-wise decode, a running sum of block outputs: the FLOPs of one dense decode.
"""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import config
from . import base, batchtopk, select, sparse, topk

DEFAULT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)
"""Prefix ends, as fractions of d_sae, when `sae.matryoshka_widths` is empty (SPEC 11)."""


def widths(sae_cfg: config.SparseAutoencoder) -> tuple[int, ...]:
    """The prefix ends of one SAE: its `matryoshka_widths`, or d_sae * DEFAULT_FRACTIONS."""
    if sae_cfg.matryoshka_widths:
        return tuple(sae_cfg.matryoshka_widths)
    return tuple(sorted({max(1, round(sae_cfg.d_sae * frac)) for frac in DEFAULT_FRACTIONS}))


def grid(cfgs: list[config.Train]) -> tuple[int, ...]:
    """The block ends a stack shares: every prefix end any of its SAEs uses, ascending."""
    return tuple(sorted({w for c in cfgs for w in widths(c.sae)}))


class MatryoshkaHparams(eqx.Module):
    """Per-SAE settings of a Matryoshka stack; `prefix_weights` over the stack's grid of block ends."""

    k: Int[Array, "*M"]
    topk_threshold_lr: Float[Array, "*M"]
    prefix_weights: Float[Array, "*M G"]
    aux: select.AuxKHparams
    k_max: int = eqx.field(static=True, default=0)
    """The stack's largest k (0: d_sae), as BatchTopK's."""


@typing.final
class Matryoshka(base.Kind):
    """BatchTopK activations (threshold at inference) and a weighted sum of prefix losses."""

    W_enc: Float[Array, "d_vit d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_vit"]
    b_dec: Float[Array, " d_vit"]
    block_ends: tuple[int, ...] = eqx.field(static=True)
    precision: str = eqx.field(static=True)

    name: typing.ClassVar[str] = "matryoshka"
    batch_coupled: typing.ClassVar[bool] = True

    def __init__(
        self, d_vit: int, d_sae: int, *, key: PRNGKeyArray, block_ends: tuple[int, ...], precision: str = "float32"
    ):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = base.tied_tensors(d_vit, d_sae, key)
        if not block_ends or block_ends[-1] != d_sae or list(block_ends) != sorted(set(block_ends)):
            raise ValueError(f"block_ends = {block_ends}: must increase and end at d_sae = {d_sae}")
        self.block_ends = tuple(block_ends)
        self.precision = base.check_precision(precision)

    @classmethod
    def make_stack(cls, cfgs: list[config.Train], precision: str) -> "Matryoshka":
        d_vit, d_sae = base.stack_shape(cfgs)
        ends = grid(cfgs)
        make = lambda key: cls(d_vit, d_sae, key=key, block_ends=ends, precision=precision)  # noqa: E731
        return eqx.filter_vmap(make)(base.seed_keys(cfgs))

    @classmethod
    def make_hparams(cls, cfgs: list[config.Train]) -> MatryoshkaHparams:
        ends = grid(cfgs)
        weights = np.zeros((len(cfgs), len(ends)), np.float32)
        for m, c in enumerate(cfgs):
            mine = widths(c.sae)
            # Uniform weights summing to 1, so the loss has a plain SAE's scale and lr and
            # auxk_alpha carry over.
            weights[m, [ends.index(w) for w in mine]] = 1 / len(mine)
        base_hp = batchtopk.BatchTopKHparams.from_cfgs(cfgs)
        return MatryoshkaHparams(base_hp.k, base_hp.topk_threshold_lr, jnp.asarray(weights), base_hp.aux, base_hp.k_max)

    def inference_tensors(self, state) -> dict[str, Array]:
        return {"threshold": jnp.full(self.b_enc.shape, state.threshold)}

    def with_inference_tensors(self, tensors) -> tuple["Matryoshka", batchtopk.ThresholdState]:
        return self, batchtopk.ThresholdState.from_tensors(tensors)

    def init_kind_state(self) -> batchtopk.ThresholdState:
        return batchtopk.ThresholdState.initial(self.b_enc.shape[-1])

    def encode_train(self, state, x_BD: Float[Array, "B d_vit"], hp: MatryoshkaHparams) -> Float[Array, "B d_sae"]:
        return select.topk_batch(jax.nn.relu(self.pre_acts(x_BD)), hp.k)[0]

    def encode(self, state: batchtopk.ThresholdState, x_BD: Float[Array, "B d_vit"], hp) -> Float[Array, "B d_sae"]:
        return batchtopk.encode_with_threshold(self.pre_acts(x_BD), state.threshold)

    def encode_sparse(self, state: batchtopk.ThresholdState, x_BD: Float[Array, "B d_vit"], hp) -> sparse.Code:
        """`encode` as a `sparse.Code` (as BatchTopK's)."""
        return batchtopk.threshold_code(self.pre_acts(x_BD), state.threshold, hp)

    def prefix_fvus(self, f_BS: Float[Array, "B d_sae"], x_BD: Float[Array, "B d_vit"]):
        """The FVU of every prefix of the grid, `[G]`, and the full reconstruction."""
        x_hat_BD = jnp.broadcast_to(self.b_dec, x_BD.shape)
        fvus, start = [], 0
        for end in self.block_ends:
            x_hat_BD = x_hat_BD + self.matmul(f_BS[:, start:end], self.W_dec[start:end])
            fvus.append(base.fvu(x_hat_BD, x_BD))
            start = end
        return jnp.stack(fvus), x_hat_BD

    def loss(self, state: batchtopk.ThresholdState, x_BD: Float[Array, "B d_vit"], hp: MatryoshkaHparams, step):
        # `sparse_loss` equals `dense_loss` unless it reports `select_overflow`; the train step then redoes it densely.
        if batchtopk.SPARSE_TRAINING and sparse.use_sparse(
            self.b_enc.shape[-1], topk.k_max_of(hp, self.b_enc.shape[-1])
        ):
            return self.sparse_loss(state, x_BD, hp, step)
        return self.dense_loss(state, x_BD, hp, step)

    def sparse_loss(self, state: batchtopk.ThresholdState, x_BD: Float[Array, "B d_vit"], hp: MatryoshkaHparams, step):
        """`loss` from BatchTopK's sparse selection; each prefix's reconstruction is a partial sum of the kept entries."""
        B = x_BD.shape[0]
        picked, h_BS, overflow = batchtopk.sparse_batch_pick(self, x_BD, hp)
        v_N, row_N, col_N, overflow = batchtopk.take_kept(self, x_BD, h_BS, picked, overflow, hp)
        # Decode each block of the grid into its own rows, then add the blocks up: prefix g is blocks 0..g.
        block_N = jnp.searchsorted(jnp.asarray(self.block_ends), col_N, side="right").astype(jnp.int32)
        G = len(self.block_ends)
        blocks_GBD = sparse.decode(v_N, block_N * B + row_N, col_N, self.W_dec, jnp.bool_(True), G * B).reshape(
            G, B, -1
        )
        x_hats_GBD = jnp.cumsum(blocks_GBD, axis=0) + self.b_dec
        fvus_G = jnp.stack([base.fvu(x_hats_GBD[g], x_BD) for g in range(G)])
        x_hat_BD = x_hats_GBD[-1]
        recon = jnp.sum(hp.prefix_weights * fvus_G)
        total, metrics = topk.with_sparse_auxk(
            self, state.dead_counts, x_BD, h_BS, v_N, x_hat_BD, recon, hp.aux, overflow
        )
        new_state = state.update_sparse(v_N, col_N, B, hp.topk_threshold_lr)
        # select_overflow: an example had more of the batch's k * B than its candidates (or AuxK's ties
        # did not fit): then (only then) this differs from `dense_loss`; the train step redoes it with that.
        return total, (metrics | {"threshold": new_state.threshold}, new_state)

    def dense_loss(self, state: batchtopk.ThresholdState, x_BD: Float[Array, "B d_vit"], hp: MatryoshkaHparams, step):
        """`loss` computed on dense `[B, d_sae]` activations."""
        h_BS = self.pre_acts(x_BD)
        f_BS, _ = select.topk_batch(jax.nn.relu(h_BS), hp.k)
        fvus_G, x_hat_BD = self.prefix_fvus(f_BS, x_BD)
        recon = jnp.sum(hp.prefix_weights * fvus_G)
        total, metrics = topk.with_auxk(self, state.dead_counts, x_BD, h_BS, f_BS, x_hat_BD, recon, hp.aux)
        new_state = state.update(f_BS, hp.topk_threshold_lr)
        return total, (metrics | {"threshold": new_state.threshold}, new_state)
