"""saev's ReLU SAE with an L1 penalty (SPEC 3), unchanged; `sae.SAE` is this class."""

import typing

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import config, optim, steer
from . import base


class ReLUHparams(eqx.Module):
    """Per-SAE settings of a ReLU stack."""

    sparsity_coeff: Float[Array, "*M"]
    n_sparsity_warmup: Int[Array, "*M"]
    steer: steer.Hparams
    """The L0 controller's settings (`sae.target_l0`)."""


@typing.final
class ReLU(base.Kind):
    """`f = relu(h)`; loss = per-element MSE + sparsity_coeff_t * mean_b sum_i f (SPEC 3)."""

    W_enc: Float[Array, "d_vit d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_vit"]
    b_dec: Float[Array, " d_vit"]
    precision: str = eqx.field(static=True)

    name: typing.ClassVar[str] = "relu"
    batch_coupled: typing.ClassVar[bool] = False

    def __init__(self, d_vit: int, d_sae: int, *, key: PRNGKeyArray, precision: str = "float32"):
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = base.kaiming_tensors(d_vit, d_sae, key)
        self.precision = base.check_precision(precision)

    @classmethod
    def make_stack(cls, cfgs: list[config.Train], precision: str) -> "ReLU":
        d_vit, d_sae = base.stack_shape(cfgs)
        return eqx.filter_vmap(lambda key: cls(d_vit, d_sae, key=key, precision=precision))(base.seed_keys(cfgs))

    @classmethod
    def make_hparams(cls, cfgs: list[config.Train]) -> ReLUHparams:
        return ReLUHparams(
            sparsity_coeff=jnp.array([c.sae.sparsity_coeff for c in cfgs], jnp.float32),
            n_sparsity_warmup=jnp.array([c.n_sparsity_warmup for c in cfgs], jnp.int32),
            steer=steer.Hparams.from_cfgs(cfgs),
        )

    def inference_tensors(self, state) -> dict[str, Array]:
        return {}

    def with_inference_tensors(self, tensors) -> tuple["ReLU", steer.ControllerState]:
        return self, steer.init_controller()

    def __call__(self, x_D: Float[Array, " d_vit"]) -> tuple[Float[Array, " d_vit"], Float[Array, " d_sae"]]:
        """(reconstruction, features) of one example: ReLU needs no state or settings."""
        f_S = jax.nn.relu(self.pre_acts(x_D[None]))[0]
        return self.decode(f_S[None])[0], f_S

    def init_kind_state(self) -> steer.ControllerState:
        return steer.init_controller()

    def encode_train(self, state, x_BD: Float[Array, "B d_vit"], hp: ReLUHparams) -> Float[Array, "B d_sae"]:
        return jax.nn.relu(self.pre_acts(x_BD))

    def encode(self, state, x_BD: Float[Array, "B d_vit"], hp: ReLUHparams) -> Float[Array, "B d_sae"]:
        return jax.nn.relu(self.pre_acts(x_BD))

    def loss(self, state, x_BD: Float[Array, "B d_vit"], hp: ReLUHparams, step: Int[Array, ""]):
        f_BS = self.encode_train(state, x_BD, hp)
        mse = base.safe_mse(self.decode(f_BS), x_BD)
        coeff = optim.warmup(steer.coefficient(hp.sparsity_coeff, state, hp.steer), hp.n_sparsity_warmup)(step)
        l1 = base.l1(f_BS)
        sparsity = coeff * l1
        total = mse + sparsity
        metrics = {
            "mse": mse,
            "l1": l1,
            "l0": base.l0(f_BS),
            "sparsity": sparsity,
            "loss": total,
            "sparsity_coeff": coeff,
        }
        return total, (metrics, steer.update(state, hp.steer, metrics["l0"], step))
