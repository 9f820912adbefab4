"""The optimizer of one SAE as an Optax chain whose hyper-parameters may be traced arrays.

Inside the vmapped train step every hyper-parameter is a traced scalar (one per SAE),
so nothing here may branch in Python on a value or need a static step count
(`optax.linear_schedule` does: it fails under vmap with a traced warm-up length).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from . import config


def warmup(peak: ArrayLike, n_steps: ArrayLike) -> optax.Schedule:
    """`peak * min(t / n_steps, 1)` at step count t; `n_steps == 0` means `peak` from t = 0.

    With a warm-up the first update (t = 0) has value 0, as in saev.
    """

    def schedule(count: ArrayLike) -> Float[Array, ""]:
        frac = jnp.where(n_steps > 0, count / jnp.maximum(n_steps, 1), 1.0)
        return peak * jnp.minimum(frac, 1.0)

    return schedule


SCHEDULES = ("constant", "linear", "cosine")
"""What the learning rate does after its warm-up; `Hparams` carries the index into this tuple."""


def warmup_decay(
    peak: ArrayLike, n_warmup: ArrayLike, n_steps: ArrayLike, schedule: ArrayLike, decay_frac: ArrayLike
) -> optax.Schedule:
    """A linear warm-up over `n_warmup` steps (as `warmup`), then by `SCHEDULES[schedule]`:

    - 0, constant: `peak` to the end;
    - 1, linear: `peak` until the last `decay_frac * n_steps` steps, then linearly to 0 at
      step `n_steps` (Anthropic's, SAELens's and Nabeshima's decay);
    - 2, cosine: from the end of the warm-up, `peak * (1 + cos(pi * progress)) / 2`, 0 at
      step `n_steps` (saev's WarmupCosine).

    Every argument may be a traced scalar (one per SAE under vmap).
    """

    def schedule_fn(count: ArrayLike) -> Float[Array, ""]:
        count = jnp.asarray(count, jnp.float32)
        rise = warmup(1.0, n_warmup)(count)
        n_decay = jnp.maximum(decay_frac * n_steps, 1.0)
        linear = jnp.clip((n_steps - count) / n_decay, 0.0, 1.0)
        progress = jnp.clip((count - n_warmup) / jnp.maximum(n_steps - n_warmup, 1), 0.0, 1.0)
        cosine = 0.5 * (1 + jnp.cos(np.pi * progress))
        after = jnp.select([schedule == 1, schedule == 2], [linear, cosine], 1.0)
        return peak * rise * after

    return schedule_fn


class LRSchedule(eqx.Module):
    """The learning-rate schedule of each SAE (`[M]` arrays in a stack): `warmup_decay` with traced settings.

    The optimizer steps by it and the L0 controller (`steer.py`) runs on its clock.
    """

    peak: Float[Array, "*M"]
    """`lr`."""
    n_warmup: Int[Array, "*M"]
    n_steps: Int[Array, "*M"]
    schedule: Int[Array, "*M"]
    """Index into `SCHEDULES`."""
    decay_frac: Float[Array, "*M"]

    @classmethod
    def from_cfgs(cls, cfgs: list[config.Train]) -> "LRSchedule":
        return cls(
            peak=jnp.array([c.lr for c in cfgs], jnp.float32),
            n_warmup=jnp.array([c.n_lr_warmup for c in cfgs], jnp.int32),
            n_steps=jnp.array([config.n_train_steps(c) for c in cfgs], jnp.int32),
            schedule=jnp.array([SCHEDULES.index(c.lr_schedule) for c in cfgs], jnp.int32),
            decay_frac=jnp.array([c.lr_decay_frac for c in cfgs], jnp.float32),
        )

    def __call__(self, step: ArrayLike) -> Float[Array, ""]:
        """The learning rate at `step` (call on one SAE's entry); an `optax.Schedule`."""
        return warmup_decay(self.peak, self.n_warmup, self.n_steps, self.schedule, self.decay_frac)(step)


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


def clip_by_global_norm(max_norm: Float[ArrayLike, ""]) -> optax.GradientTransformation:
    """Scales the whole gradient down to global L2 norm `max_norm` when it is longer; `max_norm <= 0`: unchanged.

    `max_norm` may be traced (one per SAE), so SAEs that clip and SAEs that do not share one step;
    an unclipped gradient passes through bit for bit.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        clip = (max_norm > 0) & (norm > max_norm)
        scale = jnp.where(clip, max_norm / jnp.where(clip, norm, 1.0), 1.0)
        return jax.tree.map(lambda g: jnp.where(clip, g * scale.astype(g.dtype), g), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    learning_rate: optax.Schedule, remove_parallel: ArrayLike, max_grad_norm: ArrayLike = 0.0
) -> optax.GradientTransformation:
    """One SAE's optimizer: parallel-gradient removal, clipping to `max_grad_norm` (0: none), then Adam
    with this learning-rate schedule."""
    return optax.chain(
        remove_parallel_grads(remove_parallel),
        clip_by_global_norm(max_grad_norm),
        optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8),
    )
