"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope) with straight-through threshold gradients.

`f = h * 1[h > theta]` with a learned per-latent threshold `theta = exp(log_threshold)`;
loss = FVU + l0_coefficient_t * mean_b sum_i 1[h_i > theta_i]. The step function has no
gradient, so both the activation and the L0 pass a pseudo-derivative to theta through a
rectangle kernel of bandwidth eps: `K(u) = 1[-1/2 < u < 1/2]`, `u = (h - theta) / eps`.
"""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import config, optim, steer
from . import base


def _rect(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _unbroadcast(g, like):
    """Sums a cotangent over the leading (batch) axes that `like` lacks."""
    return jnp.sum(g, axis=tuple(range(g.ndim - like.ndim)))


@jax.custom_vjp
def jumprelu(h, theta, eps):
    """`h * 1[h > theta]`; d/dh = 1[h > theta], d/dtheta = -(theta / eps) K((h - theta) / eps)."""
    return h * (h > theta)


def _jumprelu_fwd(h, theta, eps):
    return jumprelu(h, theta, eps), (h, theta, eps)


def _jumprelu_bwd(res, g):
    h, theta, eps = res
    d_theta = -(theta / eps) * _rect((h - theta) / eps) * g
    # eps is traced (one per SAE) but not learned: its cotangent is zero, of its shape.
    return (h > theta) * g, _unbroadcast(d_theta, theta), jnp.zeros_like(eps)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(h, theta, eps):
    """`1[h > theta]`; d/dh = 0, d/dtheta = -(1 / eps) K((h - theta) / eps)."""
    return (h > theta).astype(h.dtype)


def _step_fwd(h, theta, eps):
    return step(h, theta, eps), (h, theta, eps)


def _step_bwd(res, g):
    h, theta, eps = res
    d_theta = -(1 / eps) * _rect((h - theta) / eps) * g
    return jnp.zeros_like(h), _unbroadcast(d_theta, theta), jnp.zeros_like(eps)


step.defvjp(_step_fwd, _step_bwd)


def default_threshold(d_vit: int) -> float:
    """GDM's 0.001 (for E||x||^2 = 1) in saev_jax's input scale, E||x|| = sqrt(d_vit) after `scale_norm`."""
    return 0.001 * d_vit**0.5


class JumpReLUHparams(eqx.Module):
    """Per-SAE settings of a JumpReLU stack."""

    l0_coefficient: Float[Array, "*M"]
    n_sparsity_warmup: Int[Array, "*M"]
    bandwidth: Float[Array, "*M"]
    steer: steer.Hparams
    """The L0 controller's settings (`sae.target_l0`)."""


@typing.final
class JumpReLU(base.Kind):
    """`f = jumprelu(h, exp(log_threshold))`; loss = FVU + l0_coefficient_t * L0 (with the STE above)."""

    W_enc: Float[Array, "d_vit d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_vit"]
    b_dec: Float[Array, " d_vit"]
    log_threshold: Float[Array, " d_sae"]
    precision: str = eqx.field(static=True)

    name: typing.ClassVar[str] = "jumprelu"
    batch_coupled: typing.ClassVar[bool] = False

    def __init__(
        self, d_vit: int, d_sae: int, *, key: PRNGKeyArray, init_threshold: float | Array, precision: str = "float32"
    ):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = base.tied_tensors(d_vit, d_sae, key)
        self.log_threshold = jnp.full(d_sae, jnp.log(init_threshold), jnp.float32)
        self.precision = base.check_precision(precision)

    @classmethod
    def make_stack(cls, cfgs: list[config.Train], precision: str) -> "JumpReLU":
        d_vit, d_sae = base.stack_shape(cfgs)
        theta0 = jnp.array([init_threshold(c.sae) for c in cfgs], jnp.float32)
        make = lambda key, t: cls(d_vit, d_sae, key=key, init_threshold=t, precision=precision)  # noqa: E731
        return eqx.filter_vmap(make)(base.seed_keys(cfgs), theta0)

    @classmethod
    def make_hparams(cls, cfgs: list[config.Train]) -> JumpReLUHparams:
        return JumpReLUHparams(
            l0_coefficient=jnp.array([c.sae.l0_coefficient for c in cfgs], jnp.float32),
            n_sparsity_warmup=jnp.array([c.n_sparsity_warmup for c in cfgs], jnp.int32),
            bandwidth=jnp.array([bandwidth(c.sae) for c in cfgs], jnp.float32),
            steer=steer.Hparams.from_cfgs(cfgs),
        )

    def inference_tensors(self, state) -> dict[str, Array]:
        return {"threshold": jnp.exp(self.log_threshold)}

    def with_inference_tensors(self, tensors) -> tuple["JumpReLU", steer.ControllerState]:
        threshold = jnp.asarray(tensors["threshold"], jnp.float32)
        if not jnp.all(threshold > 0):
            raise ValueError("threshold must be positive (it is exp(log_threshold))")
        return eqx.tree_at(lambda s: s.log_threshold, self, jnp.log(threshold)), steer.init_controller()

    def init_kind_state(self) -> steer.ControllerState:
        return steer.init_controller()

    def encode_train(self, state, x_BD: Float[Array, "B d_vit"], hp: JumpReLUHparams) -> Float[Array, "B d_sae"]:
        return jumprelu(self.pre_acts(x_BD), jnp.exp(self.log_threshold), hp.bandwidth)

    def encode(self, state, x_BD: Float[Array, "B d_vit"], hp: JumpReLUHparams) -> Float[Array, "B d_sae"]:
        return self.encode_train(state, x_BD, hp)

    def loss(self, state, x_BD: Float[Array, "B d_vit"], hp: JumpReLUHparams, step_count: Int[Array, ""]):
        h_BS = self.pre_acts(x_BD)
        theta_S = jnp.exp(self.log_threshold)
        f_BS = jumprelu(h_BS, theta_S, hp.bandwidth)
        x_hat_BD = self.decode(f_BS)
        recon = base.fvu(x_hat_BD, x_BD)
        coeff = optim.warmup(steer.coefficient(hp.l0_coefficient, state, hp.steer), hp.n_sparsity_warmup)(step_count)
        l0 = jnp.mean(jnp.sum(step(h_BS, theta_S, hp.bandwidth), axis=1))
        sparsity = coeff * l0
        total = recon + sparsity
        metrics = {
            "mse": base.safe_mse(x_hat_BD, x_BD), "fvu": recon, "l0": l0, "l1": base.l1(f_BS), "sparsity": sparsity,
            "sparsity_coeff": coeff, "loss": total, "mean_threshold": jnp.mean(theta_S),
        }  # fmt: skip
        return total, (metrics, steer.update(state, hp.steer, l0, step_count))


def init_threshold(sae_cfg: config.SparseAutoencoder) -> float:
    """The configured initial threshold, or `default_threshold(d_vit)`."""
    return sae_cfg.jumprelu_init_threshold or default_threshold(sae_cfg.d_vit)


def bandwidth(sae_cfg: config.SparseAutoencoder) -> float:
    """The configured bandwidth eps, or `default_threshold(d_vit)` (GDM: eps = theta_0)."""
    return sae_cfg.jumprelu_bandwidth or default_threshold(sae_cfg.d_vit)
