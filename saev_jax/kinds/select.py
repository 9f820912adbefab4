"""Selection with a traced count, and AuxK: the pieces TopK, BatchTopK and Matryoshka share.

Everything here takes the number to keep as an array, so one compiled step serves SAEs with
different k. Two forms, both exact:

- dense (`topk_rows`, `topk_batch`, `auxk_loss`): the n-th largest value by 32 bisection passes
  on the float bits (research/sae-kinds.md 7.1), then a mask over `[B, d_sae]`. The reference.
- sparse (`pick_rows`, `pick_batch`, `pick_auxk`, used by the train step and evaluation):
  `lax.top_k` with the stack's static k_max (a traced k <= k_max picks its k-th value out of
  the sorted k_max), giving `[B, k_max + TIE_SLOTS]` slots. BatchTopK takes each example's
  `BATCH_CANDIDATES * k_max` largest and finds the batch's (k * B)-th largest among those by
  bisection on `[B, 4 k_max]`; that is the batch's threshold unless an example's last
  candidate reaches it. Either selection reports when the dense form may keep a latent outside
  its slots (`Picked.overflow`, the metric `select_overflow`); the train step then redoes the
  SAE's chunk densely (step._chunk_step), so training stays exact.

Measured side by side on the 2-core CPU at [4096, 16384] (benchmarks/results/kinds-speed-cpu.md):
`lax.top_k` k 32: 0.25 s, k 128: 0.53 s, k 512: 1.2 s; `lax.approx_max_k` k 32: 0.27 s (on CPU
it is exact and no faster); the 32-pass bisection: 3.2 s per row-wise and 3.5 s batch-wide
selection, more than the 2.5 s encoder product itself. So: `lax.top_k` everywhere.
On GPUs the same choice: XLA lowers top_k to a top-k kernel (newer versions RAFT's select_k)
or, for larger k on older versions, a sort and slice (research/sae-kinds.md 7.7); the bisection
reads the whole `[B, d_sae]` 32 times, ~10 ms per SAE at B 16k, d_sae 16k on an H100. On TPUs `lax.approx_max_k` is the fast one but it is
approximate (recall_target < 1 misses some of the true top k); it would change what is
trained, so it is not used; `lax.top_k` stays exact there at a cost.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_POS_INF_BITS = 0x7F800000
DEAD_COUNT_CAP = 1 << 30
"""Dead-latent counters saturate here, so a latent that never fires cannot overflow int32."""


def kth_largest_nonneg(a: Float[Array, "..."], n: Int[Array, ""], axis: int | None = None) -> Float[Array, "..."]:
    """The exact n-th largest entry of `a >= 0` (over all of `a`, or along `axis`, kept as size 1).

    For non-negative float32 the IEEE order is the int32 order of the bit patterns, so 32
    bisection steps of "how many entries are >= mid" pin the n-th largest pattern exactly.
    If `a` has fewer than n entries (along `axis`), the result is 0.
    """
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    # The bounds derive from `bits` so that inside `shard_map` they vary over the same mesh
    # axes as the loop body's results (a fori_loop carry must keep its type).
    zero = jnp.min(bits, axis=axis, keepdims=axis is not None) * 0
    lo = zero  # invariant: count(bits >= lo) >= n
    hi = zero + _POS_INF_BITS  # invariant: count(bits >= hi) < n

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(bits >= mid, axis=axis, keepdims=axis is not None, dtype=jnp.int32) >= n
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def keep_at_least(a: Float[Array, "..."], threshold: Float[Array, "..."]) -> Float[Array, "..."]:
    """`a` where `a >= threshold`, else 0; the gradient reaches the kept entries only."""
    return jnp.where(a >= jax.lax.stop_gradient(threshold), a, 0.0)


def topk_rows(a_BS: Float[Array, "B S"], k: Int[Array, ""]) -> Float[Array, "B S"]:
    """Each row's k largest entries of `a >= 0` (TopK), the rest zeroed."""
    return keep_at_least(a_BS, kth_largest_nonneg(a_BS, k, axis=-1))


def topk_batch(a_BS: Float[Array, "B S"], k: Int[Array, ""]) -> tuple[Float[Array, "B S"], Float[Array, ""]]:
    """The k * B largest entries of `a >= 0` over the whole batch (BatchTopK), and the threshold used."""
    threshold = kth_largest_nonneg(a_BS, k * a_BS.shape[0])
    return keep_at_least(a_BS, threshold), threshold


def min_positive(f_BS: Float[Array, "B S"]) -> tuple[Float[Array, ""], Bool[Array, ""]]:
    """The smallest positive entry (what BatchTopK's threshold EMA tracks) and whether there is one."""
    m = jnp.min(jnp.where(f_BS > 0, f_BS, jnp.inf))
    return jnp.where(jnp.isfinite(m), m, 0.0), jnp.isfinite(m)


def ema_threshold(threshold: Float[Array, ""], f_BS: Float[Array, "B S"], rate: Float[Array, ""]) -> Float[Array, ""]:
    """BatchTopK's inference threshold after one batch: an EMA of the smallest kept activation.

    A negative `threshold` means "not started": it becomes the first observed value, so the
    EMA carries no memory of an arbitrary start. A batch with nothing kept leaves it alone.
    """
    m, seen = min_positive(jax.lax.stop_gradient(f_BS))
    new = jnp.where(threshold < 0, m, threshold + rate * (m - threshold))
    return jnp.where(seen, new, threshold)


class DeadCounts(eqx.Module):
    """Per latent, how many training examples have gone by since it last fired (saturating)."""

    tokens_since_fired: Int[Array, " d_sae"]

    @classmethod
    def zeros(cls, d_sae: int) -> "DeadCounts":
        return cls(tokens_since_fired=jnp.zeros(d_sae, jnp.int32))

    def dead(self, dead_threshold_tokens: Int[Array, ""]) -> Bool[Array, " d_sae"]:
        """Latents that have not fired for at least `dead_threshold_tokens` examples."""
        return self.tokens_since_fired >= dead_threshold_tokens

    def update(self, f_BS: Float[Array, "B d_sae"]) -> "DeadCounts":
        """After a batch: +B for every latent, 0 for those that fired (f > 0) on any example."""
        return self.update_fired(jnp.any(f_BS > 0, axis=0), f_BS.shape[0])

    def update_fired(self, fired_S: Bool[Array, " d_sae"], n: int) -> "DeadCounts":
        """After a batch of n examples in which the latents of `fired_S` fired."""
        counts = jnp.minimum(self.tokens_since_fired + n, DEAD_COUNT_CAP)
        return DeadCounts(tokens_since_fired=jnp.where(fired_S, 0, counts))


class AuxKHparams(eqx.Module):
    """AuxK's per-SAE settings (`[M]` arrays in a stack)."""

    k_aux: Int[Array, "*M"]
    auxk_alpha: Float[Array, "*M"]
    dead_threshold_tokens: Int[Array, "*M"]
    k_aux_max: int = eqx.field(static=True, default=512)
    """The stack's largest k_aux (at most d_sae): the static size of AuxK's selection."""

    @classmethod
    def from_cfgs(cls, cfgs) -> "AuxKHparams":
        return cls(
            k_aux=jnp.array([c.sae.k_aux for c in cfgs], jnp.int32),
            auxk_alpha=jnp.array([c.sae.auxk_alpha for c in cfgs], jnp.float32),
            dead_threshold_tokens=jnp.array([c.sae.dead_threshold_tokens for c in cfgs], jnp.int32),
            k_aux_max=max(min(c.sae.k_aux, c.sae.d_sae) for c in cfgs),
        )


def auxk_loss(
    h_BS: Float[Array, "B S"],
    dead_S: Bool[Array, " S"],
    residual_BD: Float[Array, "B D"],
    W_dec: Float[Array, "S D"],
    k_aux: Int[Array, ""],
    matmul=jnp.matmul,
) -> Float[Array, ""]:
    """Gao et al.'s AuxK loss (their appendix A.2), 0 when no latent is dead.

    Per example, the k_aux largest ReLU'd pre-activations among the dead latents reconstruct
    the residual `e = x - x_hat` (gradient stopped) through the decoder without b_dec:
    `sum ||e_hat - e||^2 / sum ||e - mean_b e||^2`.
    """
    a_BS = jnp.where(dead_S, jax.nn.relu(h_BS), 0.0)
    a_BS = topk_rows(a_BS, k_aux)
    e_BD = jax.lax.stop_gradient(residual_BD)
    e_hat_BD = matmul(a_BS, W_dec)
    var = jnp.maximum(jnp.sum((e_BD - jnp.mean(e_BD, axis=0)) ** 2), jnp.finfo(jnp.float32).tiny)
    return jnp.any(dead_S) * jnp.sum((e_hat_BD - e_BD) ** 2) / var


# --- sparse selection: (keep, cols) of a static number of candidates per row ------------------

BATCH_CANDIDATES = 4
"""BatchTopK's candidates per example, in multiples of the stack's k_max (see `batch_candidates`)."""


TIE_SLOTS = 2
"""Slots beyond k_max that `pick_rows` takes, for ties at the k-th value (see there)."""


class Picked(eqx.Module):
    """Selected latents as `[B, K]` candidate slots: which are kept, and their latent indices.

    K is static (the stack's k_max + TIE_SLOTS, or BatchTopK's candidate count); a slot not kept is padding.
    """

    keep_BK: Bool[Array, "B K"]
    cols_BK: Int[Array, "B K"]
    overflow: Bool[Array, ""]
    """Whether the dense form may keep a latent outside the slots (then these slots are not exact)."""


def top_k(a_BS: Float[Array, "B S"], k: int) -> tuple[Float[Array, "B k"], Int[Array, "B k"]]:
    """`lax.top_k` behind an optimization barrier.

    On XLA's CPU backend an elementwise use of top_k's values could fuse with it and turn it
    into a full sort: 33 s instead of 0.15 s at [4096, 16384], k 32 (a barrier on the values
    alone, or reading them back by index, measured 5x slower than this inside the step). The
    extra scalar keeps XLA from folding the barrier's operand into top_k's own result tuple,
    which crashed its CPU compiler in a small step.
    """
    vals_BK, cols_BK, _ = jax.lax.optimization_barrier((*jax.lax.top_k(a_BS, k), jnp.zeros((), a_BS.dtype)))
    return vals_BK, cols_BK


def pick_rows(h_BS: Float[Array, "B S"], k: Int[Array, ""], k_max: int) -> Picked:
    """Per row, the latents dense `topk_rows(relu(h), k)` keeps with a positive value, as slots.

    `lax.top_k` of the static `k_max + TIE_SLOTS` largest; the k-th value decides, and a tie with
    it is kept as the dense form keeps it. If the last slot is kept, a tied latent may lie beyond
    it (`overflow`). With 1 extra slot that happened on 1 of 5 TopK steps at B 4096, d_sae 16384,
    k 32 (float32 ties of the 32nd and 33rd largest of some row, ~1e-5 per row); with 2 it takes three equal values.
    """
    n = min(k_max + TIE_SLOTS, h_BS.shape[1])
    vals_BK, cols_BK = top_k(h_BS, n)
    kth_B1 = jax.lax.dynamic_slice_in_dim(vals_BK, jnp.clip(k, 1, k_max) - 1, 1, axis=1)
    keep_BK = (vals_BK >= kth_B1) & (vals_BK > 0)
    overflow = (n < h_BS.shape[1]) & jnp.any(keep_BK[:, -1])
    return Picked(keep_BK=keep_BK, cols_BK=cols_BK, overflow=overflow)


def batch_candidates(d_sae: int, k_max: int) -> int:
    """How many of each example's largest pre-activations BatchTopK considers (at most d_sae)."""
    return min(d_sae, BATCH_CANDIDATES * k_max)


def pick_batch(
    h_BS: Float[Array, "B S"], k: Int[Array, ""], k_max: int
) -> tuple[Picked, Float[Array, ""], Bool[Array, ""]]:
    """The batch's k * B largest of relu(h), as slots of each row's `batch_candidates` largest.

    Returns the slots, the threshold (the (k * B)-th largest, as `topk_batch`) and `overflow`:
    whether an example may have more kept latents than its candidates. Without overflow the
    result is exactly `topk_batch`'s: the threshold of the candidates is a lower bound of the
    batch's, and if no row's last candidate reaches it, no latent outside the candidates does.
    """
    return pick_batch_from(*top_k(h_BS, batch_candidates(h_BS.shape[1], k_max)), k, h_BS.shape[1])


def pick_batch_from(
    vals_BC, cols_BC, k: Int[Array, ""], d_sae: int
) -> tuple[Picked, Float[Array, ""], Bool[Array, ""]]:
    """`pick_batch` from each row's candidates, `top_k(h, batch_candidates(d_sae, k_max))`."""
    B, n_cand = vals_BC.shape
    a_BC = jax.nn.relu(vals_BC)
    threshold = kth_largest_nonneg(a_BC, k * B)
    last_B = a_BC[:, -1]
    overflow = (n_cand < d_sae) & jnp.any((last_B > 0) & (last_B >= threshold))
    return Picked(keep_BK=(a_BC >= threshold) & (a_BC > 0), cols_BK=cols_BC, overflow=overflow), threshold, overflow


def pick_auxk(h_BS: Float[Array, "B S"], dead_S: Bool[Array, " S"], k_aux: Int[Array, ""], k_aux_max: int) -> Picked:
    """Per row, the k_aux largest pre-activations among the dead latents that are positive (AuxK's)."""
    masked_BS = jnp.where(dead_S, h_BS, -jnp.inf)
    k_aux_max = min(k_aux_max, h_BS.shape[1])
    return pick_rows(masked_BS, jnp.minimum(k_aux, k_aux_max), k_aux_max)
