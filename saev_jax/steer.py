"""Sweeps that steer themselves (issue 19): an L0 controller per SAE, and successive halving.

**The controller.** An SAE with `sae.target_l0` has its sparsity coefficient (ReLU's
`sparsity_coeff`, JumpReLU's `l0_coefficient`) scaled by a per-SAE factor that a feedback
loop moves every step, inside the jitted step, toward the L0 asked for:

    y_t   = log(1 + L0_t)                                   (the batch L0 of step t)
    m_t   = EMA of y with decay `ema_decay`, debiased       (as Adam debiases its moments)
    e_t   = m_t - log(1 + target_l0)
    u_t+1 = u_t + clip(gain * lr_t * e_t, -max_change * lr_t, max_change * lr_t)   once t >= start
    coeff = configured coefficient * exp(u_t)               (then the sparsity warm-up, as without a target)

where `lr_t` is the SAE's own learning rate at step t (its warm-up and decay included).

Why this form:

- L0 responds to the coefficient roughly as a power law (on synthetic data L0 ~ 1/lambda over
  two decades), so the loop works on logarithms: the error is a ratio of L0s, the update a
  ratio of coefficients, and one gain serves targets from 8 to 512 alike. `log(1 + L0)`
  stays finite when every latent is silent.
- It is an integral controller (the coefficient accumulates the error), because the
  coefficient that gives a wanted L0 is unknown and drifts as the SAE learns (at a fixed
  coefficient a ReLU SAE's L0 keeps falling for thousands of steps); a proportional one would
  settle off target.
- It runs on the SAE's clock, `sum_t lr_t`: an Adam step moves the parameters by about
  `lr_t`, so the SAE answers a change of its coefficient after a number of steps proportional
  to 1 / lr. Scaling the gain by `lr_t` keeps the loop as fast as, and no faster than, the SAE
  it steers, whatever the learning rate: nothing moves while the learning rate warms up from 0
  (no wind-up of the integral while the SAE cannot follow) and the coefficient settles as the
  learning rate decays. A loop faster than its plant overshoots, and a ReLU SAE pushed too
  sparse loses latents for good (nothing revives a dead ReLU latent), hence also the bound
  `max_change` on each step, which caps the drift while a far start (L0 in the thousands at
  initialisation) is corrected: at lr 4e-3 a factor e takes at least 100 steps.
- The EMA only smooths the batch-to-batch noise of L0 (small batches); it is short (about 20
  steps) against the SAE's response, so it adds little lag.
- No update before `start`, the end of the sparsity warm-up: while the coefficient rises by
  schedule the L0 says nothing about the coefficient's final value. The EMA runs from step 0,
  so it is warm at `start`.

The constants (GAIN, MAX_CHANGE, EMA_DECAY) were set on synthetic data (`benchmarks/steer.py`,
lr 4e-3: targets 8, 32 and 128 in one stack, all from one starting coefficient, are within 6%
from step 1500 on, mean of 200 steps). When the SAE cannot reach its target at any coefficient (a ReLU
SAE asked for an L0 its dead latents no longer allow) the integral keeps going: the coefficient
falls by decades, bounded only by `max_change` per step.

An SAE without a target keeps its configured coefficient bit for bit (`coefficient` selects
it with `jnp.where`); its controller state is carried but never read.

**Successive halving** (`halving_stops`) is a host-side function of the running metrics at a
rung; the training loop decides when rungs happen and what stopping means.
"""

import dataclasses
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from . import config, optim

GAIN = 2.5
"""Change of log(coefficient) per unit of learning rate per unit of smoothed log-L0 error (at lr 4e-3, 0.01 a step)."""
MAX_CHANGE = 2.5
"""Bound on |change of log(coefficient)| per unit of learning rate (at lr 4e-3: 0.01 a step, a factor e in 100 steps)."""
EMA_DECAY = 0.95
"""Decay of the EMA of log(1 + batch L0): a time constant of 20 steps."""


class Hparams(eqx.Module):
    """The controller's per-SAE settings (`[M]` arrays in a stack, scalars for one SAE)."""

    on: Bool[Array, "*M"]
    """Whether this SAE has a target (False: the configured coefficient, unchanged)."""
    target_l0: Float[Array, "*M"]
    """The L0 asked for (0 where off)."""
    start: Int[Array, "*M"]
    """First step whose L0 moves the coefficient (the end of the sparsity warm-up)."""
    gain: Float[Array, "*M"]
    max_change: Float[Array, "*M"]
    ema_decay: Float[Array, "*M"]
    learning_rate: optim.LRSchedule
    """The SAE's learning-rate schedule, as the optimizer's: the controller runs on its clock."""

    @classmethod
    def from_cfgs(cls, cfgs: list[config.Train]) -> "Hparams":
        """One entry per config, with the module's GAIN, MAX_CHANGE and EMA_DECAY."""
        targets = [c.sae.target_l0 for c in cfgs]
        n = len(cfgs)
        return cls(
            on=jnp.array([t is not None for t in targets]),
            target_l0=jnp.array([0.0 if t is None else t for t in targets], jnp.float32),
            start=jnp.array([c.n_sparsity_warmup for c in cfgs], jnp.int32),
            gain=jnp.full(n, GAIN, jnp.float32),
            max_change=jnp.full(n, MAX_CHANGE, jnp.float32),
            ema_decay=jnp.full(n, EMA_DECAY, jnp.float32),
            learning_rate=optim.LRSchedule.from_cfgs(cfgs),
        )


class ControllerState(eqx.Module):
    """The controller's state of one SAE (a leading M axis in a stack)."""

    log_scale: Float[Array, "*M"]
    """log(coefficient in use / configured coefficient)."""
    log_l0_ema: Float[Array, "*M"]
    """EMA of log(1 + batch L0), not yet debiased."""
    ema_weight: Float[Array, "*M"]
    """Sum of the EMA's weights, 1 - ema_decay^n after n steps; the EMA divided by it is debiased."""


def init_controller() -> ControllerState:
    """Step 0 of one SAE: the configured coefficient, an empty EMA."""
    zero = jnp.zeros((), jnp.float32)
    return ControllerState(log_scale=zero, log_l0_ema=zero, ema_weight=zero)


def coefficient(configured: Float[ArrayLike, ""], state: ControllerState, hp: Hparams) -> Float[Array, ""]:
    """The sparsity coefficient in use (before the sparsity warm-up): `configured` itself where off."""
    return jnp.where(hp.on, configured * jnp.exp(state.log_scale), configured)


def smoothed_l0(state: ControllerState) -> Float[Array, "*M"]:
    """The debiased EMA of the batch L0, back in L0 units (NaN before the first step)."""
    return jnp.expm1(state.log_l0_ema / state.ema_weight)


def update(state: ControllerState, hp: Hparams, l0: Float[ArrayLike, ""], step: Int[ArrayLike, ""]) -> ControllerState:
    """The state after a step whose batch L0 was `l0` (see the module docstring); traced, no branches."""
    y = jnp.log1p(jax.lax.stop_gradient(jnp.asarray(l0, jnp.float32)))
    ema = hp.ema_decay * state.log_l0_ema + (1 - hp.ema_decay) * y
    weight = hp.ema_decay * state.ema_weight + (1 - hp.ema_decay)
    error = ema / weight - jnp.log1p(hp.target_l0)
    lr = hp.learning_rate(step)
    change = jnp.clip(hp.gain * lr * error, -hp.max_change * lr, hp.max_change * lr)
    moves = hp.on & (step >= hp.start)
    return ControllerState(
        log_scale=jnp.where(moves, state.log_scale + change, state.log_scale), log_l0_ema=ema, ema_weight=weight
    )


def report(hp: eqx.Module, state: eqx.Module) -> dict[str, float | None]:
    """What `metrics.json` says of one SAE's steering, from its kind's settings and state (no M axis).

    `{"target_l0": target or None, "final_sparsity_coeff": the coefficient in use at the end}`
    for ReLU and JumpReLU (without a target, the configured coefficient); `{}` for a kind
    without a controller.
    """
    if not isinstance(state, ControllerState):
        return {}
    # ReLU calls its coefficient sparsity_coeff, JumpReLU l0_coefficient.
    configured = hp.sparsity_coeff if hasattr(hp, "sparsity_coeff") else hp.l0_coefficient
    on = bool(hp.steer.on)
    return {
        "target_l0": float(hp.steer.target_l0) if on else None,
        "final_sparsity_coeff": float(coefficient(configured, state, hp.steer)),
    }


# Successive halving -------------------------------------------------------------------------


def tier(cfg: config.Train) -> tuple[str, int, float | None]:
    """What an SAE is compared on at a rung: kind, width, sparsity target (`target_l0`, or `k`
    for the TopK family; None for an SAE without one)."""
    sae = cfg.sae
    target = sae.k if sae.kind in ("topk", "batchtopk", "matryoshka") else sae.target_l0
    return (sae.kind, sae.d_sae, None if target is None else float(target))


@dataclasses.dataclass(frozen=True)
class Rung:
    """What one rung decided, per SAE of the sweep (in the order given)."""

    stop: np.ndarray
    """Bool [M]: the SAEs that stop training at this rung."""
    why: tuple[str, ...]
    """For a stopped SAE, one phrase saying why ('' for the others), for the rung's log line."""


def halving_stops(
    tiers: Sequence[tuple],
    mse: Float[ArrayLike, " M"],
    l0: Float[ArrayLike, " M"],
    alive: Bool[ArrayLike, " M"],
    keep: float,
) -> Rung:
    """Which alive SAEs stop at a rung of successive halving.

    SAEs are compared only with the alive SAEs of their own tier (equal tuples whose last
    element is the sparsity target or None, as `tier` makes them). In a
    tier of n alive SAEs, `n_keep = ceil(keep * n)` at least go on:

    - a tier whose last element (the sparsity target) is not None: the `n_keep` with the
      lowest running reconstruction error `mse` go on, the others stop;
    - a tier without a target: SAE a dominates b if `mse[a] <= mse[b]` and `l0[a] <= l0[b]`,
      one of them strictly. Every SAE that no other dominates goes on (that may be more than
      `n_keep`); if fewer than `n_keep` do, the dominated ones with the fewest dominators,
      then the lowest `mse`, fill up to `n_keep`; the others stop.

    Ties go to the lower index; a non-finite `mse` or `l0` ranks last and is dominated by
    every finite SAE. SAEs not `alive` (stopped earlier, diverged) never stop here, count in
    no tier and dominate nobody.
    """
    mse, l0 = np.asarray(mse, np.float64), np.asarray(l0, np.float64)
    bad = ~(np.isfinite(mse) & np.isfinite(l0))
    mse, l0 = np.where(bad, np.inf, mse), np.where(bad, np.inf, l0)
    alive = np.asarray(alive, bool)
    if not 0 < keep < 1:
        raise ValueError(f"keep = {keep}: must be in (0, 1)")
    if not len(tiers) == len(mse) == len(l0) == len(alive):
        raise ValueError("tiers, mse, l0 and alive need one entry per SAE")
    stop = np.zeros(len(alive), bool)
    why = [""] * len(alive)
    members: dict[tuple, list[int]] = {}
    for i, t in enumerate(tiers):
        if alive[i]:
            members.setdefault(t, []).append(i)
    for t, idx in members.items():
        n_keep = math.ceil(keep * len(idx))
        if t[-1] is not None:
            order = sorted(idx, key=lambda i: (mse[i], i))
            for rank, i in enumerate(order[n_keep:], start=n_keep + 1):
                stop[i] = True
                why[i] = f"MSE {mse[i]:.4g} ranks {rank} of {len(idx)} in tier {_label(t)} (keeping {n_keep})"
            continue
        dominators = {i: [j for j in idx if _dominates(mse, l0, j, i)] for i in idx}
        order = sorted(idx, key=lambda i: (len(dominators[i]), mse[i], i))
        n_go_on = max(n_keep, sum(1 for i in idx if not dominators[i]))
        for i in order[n_go_on:]:
            stop[i] = True
            j = min(dominators[i], key=lambda j: (mse[j], j))
            why[i] = (
                f"dominated on (MSE, L0) = ({mse[i]:.4g}, {l0[i]:.4g}) by #{j} ({mse[j]:.4g}, {l0[j]:.4g}) in tier {_label(t)}"
            )
    return Rung(stop=stop, why=tuple(why))


def _dominates(mse: np.ndarray, l0: np.ndarray, a: int, b: int) -> bool:
    no_worse = mse[a] <= mse[b] and l0[a] <= l0[b]
    better = mse[a] < mse[b] or l0[a] < l0[b]
    # Two SAEs both at infinity on both axes: neither dominates.
    return bool(no_worse and better)


def _label(t: tuple) -> str:
    return " ".join("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in t)
