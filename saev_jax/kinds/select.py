"""Selection with a traced count, and AuxK: the pieces TopK, BatchTopK and Matryoshka share.

Everything here takes the number to keep as an array, so one compiled step serves SAEs with
different k (`lax.top_k` needs a static k). Selection is exact: the n-th largest value is found
by bisection on the float bits (research/sae-kinds.md 7.1).
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


def ema_threshold(
    threshold: Float[Array, ""], f_BS: Float[Array, "B S"], rate: Float[Array, ""]
) -> Float[Array, ""]:
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
        fired_S = jnp.any(f_BS > 0, axis=0)
        counts = jnp.minimum(self.tokens_since_fired + f_BS.shape[0], DEAD_COUNT_CAP)
        return DeadCounts(tokens_since_fired=jnp.where(fired_S, 0, counts))


class AuxKHparams(eqx.Module):
    """AuxK's per-SAE settings (`[M]` arrays in a stack)."""

    k_aux: Int[Array, "*M"]
    auxk_alpha: Float[Array, "*M"]
    dead_threshold_tokens: Int[Array, "*M"]

    @classmethod
    def from_cfgs(cls, cfgs) -> "AuxKHparams":
        return cls(
            k_aux=jnp.array([c.sae.k_aux for c in cfgs], jnp.int32),
            auxk_alpha=jnp.array([c.sae.auxk_alpha for c in cfgs], jnp.float32),
            dead_threshold_tokens=jnp.array([c.sae.dead_threshold_tokens for c in cfgs], jnp.int32),
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
