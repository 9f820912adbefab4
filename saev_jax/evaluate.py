"""Evaluates a stack of SAEs in one pass over the data: feature frequencies, L0, L1, MSE, quality.

One jitted reduction per batch updates running sums for every SAE of the stack at once;
`quality` (bits per example saved by coding the data through the SAE, see `quality.py` and
`docs/quality.md`) is computed on the host from those sums.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
import wandb
from jaxtyping import Array, Float, Int

from . import config, data
from . import quality as quality_lib
from . import sae as sae_lib


@dataclasses.dataclass(frozen=True)
class EvalMetrics:
    """Results of evaluating a trained SAE on a dataset."""

    l0: float
    """Mean L0 across all examples."""
    l1: float
    """Mean L1 across all examples."""
    mse: float
    """Mean MSE across all examples."""
    n_dead: int
    """Number of features that never fired on any example."""
    n_almost_dead: int
    """Number of features that fired on fewer than `almost_dead_threshold` of examples."""
    n_dense: int
    """Number of features that fired on more than `dense_threshold` of examples."""
    freqs: Float[np.ndarray, " d_sae"]
    """How often each feature fired."""
    mean_values: Float[np.ndarray, " d_sae"]
    """The mean value of each feature when it fired (NaN for a feature that never fired)."""
    almost_dead_threshold: float
    """Threshold for an "almost dead" feature."""
    dense_threshold: float
    """Threshold for a dense feature."""
    quality: float = math.nan
    """Bits per example saved by sending the data through this SAE instead of raw (higher is better; docs/quality.md)."""

    def to_json(self) -> dict[str, float | int]:
        """The scalar fields, for `metrics.json`."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("freqs", "mean_values")
        }

    def for_wandb(self) -> dict[str, object]:
        """`eval/<field>` keys; the two per-feature arrays as wandb tables."""
        dct = self.to_json() | {
            "freqs": wandb.Table(columns=["freq"], data=self.freqs[:, None].tolist()),
            "mean_values": wandb.Table(columns=["mean_value"], data=self.mean_values[:, None].tolist()),
        }
        return {f"eval/{key}": value for key, value in dct.items()}


class _Sums(eqx.Module):
    """Running sums of one evaluation pass: per SAE (leading M axis) and of the data itself."""

    n_fired: Int[Array, "M d_sae"]
    values: Float[Array, "M d_sae"]
    sq_err: Float[Array, " M"]
    x_sum: Float[Array, " d_vit"]
    x_sq_sum: Float[Array, " d_vit"]


def _zero_sums(n_saes: int, d_sae: int, d_vit: int) -> _Sums:
    return _Sums(
        n_fired=jnp.zeros((n_saes, d_sae), jnp.int32),
        values=jnp.zeros((n_saes, d_sae), jnp.float32),
        sq_err=jnp.zeros(n_saes, jnp.float32),
        x_sum=jnp.zeros(d_vit, jnp.float32),
        x_sq_sum=jnp.zeros(d_vit, jnp.float32),
    )


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(
    sums: _Sums, saes: sae_lib.SAE, preprocess: data.Preprocess, x_BD: Float[Array, "B d_vit"], n_valid: Int[Array, ""]
) -> _Sums:
    """Adds one raw batch (of which the first `n_valid` rows are real) to the sums of every SAE."""
    x_BD = preprocess(x_BD)
    valid_B1 = (jnp.arange(x_BD.shape[0]) < n_valid)[:, None]
    x_BD = jnp.where(valid_B1, x_BD, 0.0)

    def one(sae):
        x_hat_BD, f_BS = jax.vmap(sae)(x_BD)
        f_BS = jnp.where(valid_B1, f_BS, 0.0)
        sq_err = jnp.sum(jnp.where(valid_B1, (x_hat_BD - x_BD) ** 2, 0.0))
        return jnp.sum(f_BS > 0, axis=0, dtype=jnp.int32), jnp.sum(f_BS, axis=0), sq_err

    n_fired, values, sq_err = jax.vmap(one)(saes)
    return _Sums(
        n_fired=sums.n_fired + n_fired,
        values=sums.values + values,
        sq_err=sums.sq_err + sq_err,
        x_sum=sums.x_sum + jnp.sum(x_BD, axis=0),
        x_sq_sum=sums.x_sq_sum + jnp.sum(x_BD**2, axis=0),
    )


def evaluate(
    cfgs: list[config.Train],
    saes: sae_lib.SAE,
    acts: data.Activations,
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    almost_dead_threshold: float = 1e-7,
    dense_threshold: float = 1e-2,
) -> list[EvalMetrics]:
    """Evaluates every SAE of a stack in one ordered pass over `acts`, with the parameters as given.

    Returns one EvalMetrics per SAE, in stack order (SPEC 4). The batches come from the fast
    loader without shuffling, `cfgs[0].sae_batch_size` examples each, the last one zero-padded.
    """
    cfg = cfgs[0]
    loader = data.Loader(acts, batch_size=cfg.sae_batch_size, shuffle=False, seed=cfg.seed, n_threads=cfg.n_workers, device=device)
    n_batches = -(-len(acts) // cfg.sae_batch_size)
    batches = tqdm.tqdm(loader, total=n_batches, desc="eval", unit="batch", dynamic_ncols=True)
    return evaluate_batches(
        saes, batches, preprocess, device,
        almost_dead_threshold=almost_dead_threshold, dense_threshold=dense_threshold,
    )  # fmt: skip


def evaluate_batches(
    saes: sae_lib.SAE,
    batches: Iterable[tuple[Float[Array, "B d_vit"], int]],
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    almost_dead_threshold: float = 1e-7,
    dense_threshold: float = 1e-2,
) -> list[EvalMetrics]:
    """`evaluate` over any iterable of `(raw x_BD, n_valid)`: only the first `n_valid` rows count.

    Every batch should have the same shape (pad the last one), so the kernel compiles once.
    """
    n_saes, d_sae = saes.b_enc.shape
    d_vit = saes.b_dec.shape[1]
    sums = jax.device_put(_zero_sums(n_saes, d_sae, d_vit), device)
    n = 0
    for x_BD, n_valid in batches:
        sums = _accumulate(sums, saes, preprocess, x_BD, jnp.asarray(n_valid, jnp.int32))
        n += int(n_valid)
    if n == 0:
        raise ValueError("evaluate: no examples")
    host = jax.device_get(sums)
    n_fired, values, sq_err = (np.asarray(a, np.float64) for a in (host.n_fired, host.values, host.sq_err))
    x_mean = np.asarray(host.x_sum, np.float64) / n
    data_var = float(np.mean(np.asarray(host.x_sq_sum, np.float64) / n - x_mean**2))
    w_dec_norms = np.linalg.norm(np.asarray(saes.W_dec, np.float64), axis=-1)

    freqs = n_fired / n
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_values = values / n_fired
    results = []
    for m in range(n_saes):
        mse = float(sq_err[m] / (n * d_vit))
        results.append(
            EvalMetrics(
                l0=float(n_fired[m].sum() / n),
                l1=float(values[m].sum() / n),
                mse=mse,
                n_dead=int((freqs[m] == 0).sum()),
                n_almost_dead=int((freqs[m] < almost_dead_threshold).sum()),
                n_dense=int((freqs[m] > dense_threshold).sum()),
                freqs=freqs[m].astype(np.float32),
                mean_values=mean_values[m].astype(np.float32),
                almost_dead_threshold=almost_dead_threshold,
                dense_threshold=dense_threshold,
                quality=quality_lib.quality(freqs[m], mean_values[m], mse, data_var, d_vit, w_dec_norms[m]),
            )
        )
    return results
