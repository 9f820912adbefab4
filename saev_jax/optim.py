"""The optimizer of one SAE as an Optax chain whose hyper-parameters may be traced arrays.

Inside the vmapped train step every hyper-parameter is a traced scalar (one per SAE),
so nothing here may branch in Python on a value or need a static step count
(`optax.linear_schedule` does: it fails under vmap with a traced warm-up length).
"""

import equinox as eqx
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float


def warmup(peak: ArrayLike, n_steps: ArrayLike) -> optax.Schedule:
    """`peak * min(t / n_steps, 1)` at step count t; `n_steps == 0` means `peak` from t = 0.

    With a warm-up the first update (t = 0) has value 0, as in saev.
    """

    def schedule(count: ArrayLike) -> Float[Array, ""]:
        frac = jnp.where(n_steps > 0, count / jnp.maximum(n_steps, 1), 1.0)
        return peak * jnp.minimum(frac, 1.0)

    return schedule


def remove_parallel_grads(enabled: Bool[ArrayLike, ""]) -> optax.GradientTransformation:
    """Removes from each row of the `W_dec` gradient its component along that row of `W_dec`.

    The decoder rows are kept at unit norm, so a step along a row would only be undone by
    the next normalisation; removing it keeps Adam's statistics for the useful directions.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params):
        W_SD, g_SD = params.W_dec, updates.W_dec
        coeff_S1 = jnp.sum(g_SD * W_SD, axis=1, keepdims=True) / jnp.sum(W_SD * W_SD, axis=1, keepdims=True)
        g_SD = jnp.where(enabled, g_SD - coeff_S1 * W_SD, g_SD)
        return eqx.tree_at(lambda u: u.W_dec, updates, g_SD), state

    return optax.GradientTransformation(init, update)


def make_optimizer(lr: ArrayLike, n_lr_warmup: ArrayLike, remove_parallel: ArrayLike) -> optax.GradientTransformation:
    """One SAE's optimizer: parallel-gradient removal, then Adam with a linear learning-rate warm-up."""
    return optax.chain(
        remove_parallel_grads(remove_parallel),
        optax.adam(warmup(lr, n_lr_warmup), b1=0.9, b2=0.999, eps=1e-8),
    )
