"""What every SAE kind shares: the interface, the tensors' initialisation and the loss helpers.

A kind is an `eqx.Module` holding one SAE's parameters. The train step only calls its
methods, so it never branches on the kind: `init_kind_state` (the kind's non-trainable state),
`loss` (on a whole batch, since BatchTopK couples the examples), `encode` (the inference
form), `encode_train` (the training form) and `decode`. Per-SAE hyper-parameters come in as
an `eqx.Module` of arrays (`[M]` for a stack) built by the kind's `make_hparams`.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .. import config

PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
"""The four tensors every kind holds, in the order checkpoints and exports list them."""


class Kind(eqx.Module):
    """Abstract base of an SAE kind. Concrete kinds are final and hold the same four tensors.

    `h = (x - b_dec) @ W_enc + b_enc` are the pre-activations; `x_hat = f @ W_dec + b_dec`.
    """

    W_enc: eqx.AbstractVar[Float[Array, "d_vit d_sae"]]
    b_enc: eqx.AbstractVar[Float[Array, " d_sae"]]
    W_dec: eqx.AbstractVar[Float[Array, "d_sae d_vit"]]
    b_dec: eqx.AbstractVar[Float[Array, " d_vit"]]
    precision: eqx.AbstractVar[str]

    name: ClassVar[str]
    """The `sae.kind` value that selects this kind."""
    batch_coupled: ClassVar[bool]
    """Whether the training form couples the examples of a batch (then `encode` differs from `encode_train`)."""

    @classmethod
    @abc.abstractmethod
    def make_stack(cls, cfgs: list[config.Train], precision: str) -> "Kind":
        """A stack (leading M axis on every leaf) of freshly initialised SAEs, one per config."""

    @classmethod
    @abc.abstractmethod
    def make_hparams(cls, cfgs: list[config.Train]) -> eqx.Module:
        """The per-SAE hyper-parameters of a stack of this kind, as `[M]` arrays."""

    @abc.abstractmethod
    def init_kind_state(self) -> eqx.Module:
        """This SAE's non-trainable state at step 0 (call under `filter_vmap` for a stack)."""

    @abc.abstractmethod
    def encode_train(self, state: eqx.Module, x_BD: Float[Array, "B d_vit"], hp: eqx.Module) -> Float[Array, "B d_sae"]:
        """The feature activations the training loss sees."""

    @abc.abstractmethod
    def encode(self, state: eqx.Module, x_BD: Float[Array, "B d_vit"], hp: eqx.Module) -> Float[Array, "B d_sae"]:
        """The feature activations at inference: each example on its own."""

    @abc.abstractmethod
    def loss(
        self, state: eqx.Module, x_BD: Float[Array, "B d_vit"], hp: eqx.Module, step: Int[Array, ""]
    ) -> tuple[Float[Array, ""], tuple[dict[str, Float[Array, ""]], eqx.Module]]:
        """`(total, (metrics, new_state))` on a batch: differentiate `total`; metrics are scalars."""

    def dense_loss(
        self, state: eqx.Module, x_BD: Float[Array, "B d_vit"], hp: eqx.Module, step: Int[Array, ""]
    ) -> tuple[Float[Array, ""], tuple[dict[str, Float[Array, ""]], eqx.Module]]:
        """`loss` computed densely: what a step redoes when `loss` reports `select_overflow` (a sparse
        loss that was not exact on this batch). A kind without a sparse loss: `loss` itself."""
        return self.loss(state, x_BD, hp, step)

    @abc.abstractmethod
    def inference_tensors(self, state: eqx.Module) -> dict[str, Float[Array, "..."]]:
        """What inference needs besides the four tensors and the config, for checkpoints (ReLU, TopK: none)."""

    @abc.abstractmethod
    def with_inference_tensors(self, tensors: dict[str, Float[Array, "..."]]) -> tuple["Kind", eqx.Module]:
        """The inverse of `inference_tensors`: this SAE and the state inference reads, from those tensors.

        `tensors` has exactly the names and shapes `inference_tensors` gives (the caller checks);
        ValueError if their values cannot come from this kind (say, two BatchTopK thresholds).
        """

    def matmul(self, a: Array, b: Array) -> Array:
        """A matrix product at this SAE's precision (float32 products, or bf16 with float32 sums)."""
        if self.precision == "bfloat16":
            return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        if self.precision == "tensorfloat32":  # TF32 on GPUs (saev's setting), bf16x3 on TPUs, float32 on CPUs
            return jnp.matmul(a, b, precision=jax.lax.Precision.HIGH)
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

    def pre_acts(self, x_BD: Float[Array, "B d_vit"]) -> Float[Array, "B d_sae"]:
        """`(x - b_dec) @ W_enc + b_enc`."""
        return self.matmul(x_BD - self.b_dec, self.W_enc) + self.b_enc

    def decode(self, f_BS: Float[Array, "B d_sae"]) -> Float[Array, "B d_vit"]:
        """`f @ W_dec + b_dec`."""
        return self.matmul(f_BS, self.W_dec) + self.b_dec

    def normalize_w_dec(self) -> "Kind":
        """The same SAE with each decoder row rescaled to unit L2 norm."""
        W_dec = self.W_dec / jnp.linalg.norm(self.W_dec, axis=1, keepdims=True)
        return eqx.tree_at(lambda sae: sae.W_dec, self, W_dec)


class NoState(eqx.Module):
    """The state of a kind that has none."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r}: must be one of {PRECISIONS}")
    return precision


def kaiming_tensors(d_vit: int, d_sae: int, key: PRNGKeyArray) -> tuple[Array, Array, Array, Array]:
    """SPEC 3's untied init: W_enc, W_dec Kaiming-uniform (bound sqrt(6 / second dim)), zero biases."""
    enc_key, dec_key = jax.random.split(key)
    enc_bound, dec_bound = (6 / d_sae) ** 0.5, (6 / d_vit) ** 0.5
    W_enc = jax.random.uniform(enc_key, (d_vit, d_sae), minval=-enc_bound, maxval=enc_bound)
    W_dec = jax.random.uniform(dec_key, (d_sae, d_vit), minval=-dec_bound, maxval=dec_bound)
    return W_enc, jnp.zeros(d_sae), W_dec, jnp.zeros(d_vit)


def tied_tensors(d_vit: int, d_sae: int, key: PRNGKeyArray) -> tuple[Array, Array, Array, Array]:
    """SPEC 11's tied init: Kaiming-uniform W_dec with unit-norm rows, W_enc = W_dec^T, zero biases."""
    bound = (6 / d_vit) ** 0.5
    W_dec = jax.random.uniform(key, (d_sae, d_vit), minval=-bound, maxval=bound)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True)
    return W_dec.T, jnp.zeros(d_sae), W_dec, jnp.zeros(d_vit)


def seed_keys(cfgs: list[config.Train]) -> PRNGKeyArray:
    """One PRNG key per config, from its `sae.seed` (as `sae.make_saes` does)."""
    return jax.vmap(jax.random.key)(jnp.array([c.sae.seed for c in cfgs]))


def stack_shape(cfgs: list[config.Train]) -> tuple[int, int]:
    """The one (d_vit, d_sae) of a stack's configs; ValueError if they differ."""
    shapes = {(c.sae.d_vit, c.sae.d_sae) for c in cfgs}
    if len(shapes) != 1:
        raise ValueError(f"a stack needs one d_vit and d_sae, got (d_vit, d_sae) in {sorted(shapes)}")
    return shapes.pop()


def safe_mse(x_hat_BD: Float[Array, "B D"], x_BD: Float[Array, "B D"]) -> Float[Array, ""]:
    """Mean squared error over batch and dims, computed on inputs divided by max|x|.

    Dividing first keeps the squares in range for activations with huge entries; the
    mean is multiplied by max|x| twice (not by its square, which can overflow alone).
    """
    upper = jnp.max(jnp.abs(x_BD))
    return jnp.mean(((x_hat_BD - x_BD) / upper) ** 2) * upper * upper


def fvu(x_hat_BD: Float[Array, "B D"], x_BD: Float[Array, "B D"]) -> Float[Array, ""]:
    """Fraction of variance unexplained: sum (x_hat - x)^2 / sum (x - mean_b x)^2 over the batch.

    Gao et al.'s normalised MSE with the batch's own variance as the normaliser (sparsify's
    FVU), so the TopK family's loss and its AuxK term are scale-free. Both sums are taken on
    inputs divided by max|x| (the ratio does not change) so huge activations cannot overflow.
    """
    upper = jnp.maximum(jnp.max(jnp.abs(x_BD)), jnp.finfo(jnp.float32).tiny)
    x_BD, x_hat_BD = x_BD / upper, x_hat_BD / upper
    var = jnp.sum((x_BD - jnp.mean(x_BD, axis=0)) ** 2)
    return jnp.sum((x_hat_BD - x_BD) ** 2) / jnp.maximum(var, jnp.finfo(jnp.float32).tiny)


def l0(f_BS: Float[Array, "B S"]) -> Float[Array, ""]:
    """Mean over the batch of the number of active features."""
    return jnp.mean(jnp.sum(f_BS > 0, axis=1, dtype=jnp.float32))


def l1(f_BS: Float[Array, "B S"]) -> Float[Array, ""]:
    """Mean over the batch of the sum of the feature activations."""
    return jnp.mean(jnp.sum(f_BS, axis=1))
