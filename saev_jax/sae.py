"""The sparse autoencoder: one `eqx.Module` per SAE, stacks built with `eqx.filter_vmap`."""

import os
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from . import config

if typing.TYPE_CHECKING:
    from . import checkpoint, data

TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")


class SAE(eqx.Module):
    """One sparse autoencoder; `__call__` handles one example.

    A stack of M SAEs is the same module with a leading M axis on every leaf.
    """

    W_enc: Float[Array, "d_vit d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_vit"]
    b_dec: Float[Array, " d_vit"]
    precision: str = eqx.field(static=True)

    def __init__(self, d_vit: int, d_sae: int, *, key: PRNGKeyArray, precision: str = "float32"):
        # Kaiming-uniform as torch's default kaiming_uniform_ (a=0): bound sqrt(6 / n),
        # n being the size of the matrix's second dimension.
        enc_key, dec_key = jax.random.split(key)
        enc_bound, dec_bound = (6 / d_sae) ** 0.5, (6 / d_vit) ** 0.5
        self.W_enc = jax.random.uniform(enc_key, (d_vit, d_sae), minval=-enc_bound, maxval=enc_bound)
        self.b_enc = jnp.zeros(d_sae)
        self.W_dec = jax.random.uniform(dec_key, (d_sae, d_vit), minval=-dec_bound, maxval=dec_bound)
        self.b_dec = jnp.zeros(d_vit)
        if precision not in PRECISIONS:
            raise ValueError(f"precision = {precision!r}: must be one of {PRECISIONS}")
        self.precision = precision

    def _matmul(self, a: Array, b: Array) -> Array:
        # float32: full float32 products (JAX would otherwise use TF32 on recent GPUs).
        # tensorfloat32: TF32 products on GPUs (saev turns TF32 on), bf16x3 on TPUs, float32 on CPUs.
        # bfloat16: bf16 operands, float32 accumulation; parameters stay float32.
        if self.precision == "bfloat16":
            return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        if self.precision == "tensorfloat32":
            return jnp.matmul(a, b, precision=jax.lax.Precision.HIGH)
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

    def encode(self, x: Float[Array, " d_vit"]) -> Float[Array, " d_sae"]:
        return jax.nn.relu(self._matmul(x - self.b_dec, self.W_enc) + self.b_enc)

    def decode(self, f: Float[Array, " d_sae"]) -> Float[Array, " d_vit"]:
        return self._matmul(f, self.W_dec) + self.b_dec

    def __call__(self, x: Float[Array, " d_vit"]) -> tuple[Float[Array, " d_vit"], Float[Array, " d_sae"]]:
        """Returns the reconstruction and the feature activations of one example."""
        f = self.encode(x)
        return self.decode(f), f

    def normalize_w_dec(self) -> "SAE":
        """The same SAE with each decoder row rescaled to unit L2 norm."""
        W_dec = self.W_dec / jnp.linalg.norm(self.W_dec, axis=1, keepdims=True)
        return eqx.tree_at(lambda sae: sae.W_dec, self, W_dec)


def safe_mse(x_hat_BD: Float[Array, "B D"], x_BD: Float[Array, "B D"]) -> Float[Array, ""]:
    """Mean squared error over batch and dims, computed on inputs divided by max|x|.

    Dividing first keeps the squares in range for activations with huge entries; the
    mean is multiplied by max|x| twice (not by its square, which can overflow alone).
    """
    upper = jnp.max(jnp.abs(x_BD))
    return jnp.mean(((x_hat_BD - x_BD) / upper) ** 2) * upper * upper


def loss(sae: SAE, x_BD: Float[Array, "B d_vit"], sparsity_coeff: Float[Array, ""]):
    """SPEC 3's loss of one SAE on a batch: (loss, dict of the terms and metrics)."""
    x_hat_BD, f_BS = jax.vmap(sae)(x_BD)
    mse = safe_mse(x_hat_BD, x_BD)
    l1 = jnp.mean(jnp.sum(f_BS, axis=1))
    l0 = jnp.mean(jnp.sum(f_BS > 0, axis=1, dtype=jnp.float32))
    sparsity = sparsity_coeff * l1
    total = mse + sparsity
    return total, {"mse": mse, "l1": l1, "l0": l0, "sparsity": sparsity, "loss": total}


def make_saes(cfgs: list[config.SparseAutoencoder], precision: str = "float32") -> SAE:
    """A stack of SAEs, the m-th initialised from `cfgs[m].seed`. All must share d_vit and d_sae."""
    shapes = {(c.d_vit, c.d_sae) for c in cfgs}
    if len(shapes) != 1:
        raise ValueError(f"make_saes: a stack needs one d_vit and exp_factor, got (d_vit, d_sae) in {shapes}")
    ((d_vit, d_sae),) = shapes
    keys = jax.vmap(jax.random.key)(jnp.array([c.seed for c in cfgs]))
    return eqx.filter_vmap(lambda key: SAE(d_vit, d_sae, key=key, precision=precision))(keys)


def unstack(saes: SAE) -> list[SAE]:
    """The SAEs of a stack, one by one."""
    n = saes.b_dec.shape[0]
    return [jax.tree.map(lambda leaf: leaf[m], saes) for m in range(n)]


def save(
    sae: SAE,
    dpath: str | os.PathLike,
    cfg: config.Train,
    metrics: dict[str, object],
    preprocess: "data.Preprocess | None" = None,
    freqs: Float[np.ndarray, " d_sae"] | None = None,
    kind_tensors: "dict[str, np.ndarray] | None" = None,
) -> None:
    """Writes a checkpoint directory atomically: `checkpoint.save` (sae.safetensors, the
    preprocessing statistics, the feature frequencies, the kind's inference tensors, cfg.json, metrics.json)."""
    from . import checkpoint

    checkpoint.save(sae, dpath, cfg, metrics, preprocess, freqs, kind_tensors)


def load(path: str | os.PathLike, precision: str = "float32") -> "checkpoint.Checkpoint":
    """The checkpoint at `path` (ours, or saev's `sae.pt`) as a `checkpoint.Checkpoint`:
    `.sae`, `.preprocess`, `.cfg`, `.freqs`, and `encode_raw` / `decode_raw` on raw activations."""
    from . import checkpoint

    return checkpoint.load(path, precision)


def load_cfg(dpath: str | os.PathLike) -> config.Train:
    """The `Train` config saved beside a checkpoint."""
    from . import checkpoint

    return checkpoint.load_cfg(dpath)
