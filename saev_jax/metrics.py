"""What evaluating an SAE gives (`EvalMetrics`): its own module, so the summary and the plots
can read results without importing the evaluator."""

import dataclasses
import math

import numpy as np
from jaxtyping import Float

from . import config


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
    l0_batch: float | None = None
    """Mean L0 of the training form (BatchTopK, Matryoshka: the k * B largest of each full batch; None
    without a full batch); for the other kinds the same as l0."""
    quality: float = math.nan
    """Bits per example saved by sending the data through this SAE instead of raw (higher is better; docs/quality.md)."""
    quality_stderr: float = math.nan
    """Standard error of `quality` from sampling its residual sums (0 when every example was used; NaN if unknown)."""
    fvu: float = math.nan
    """Fraction of variance unexplained: total squared error / total squared deviation of x from its mean."""
    explained_variance: float = math.nan
    """1 - fvu."""
    rel_bias: float = math.nan
    """Relative reconstruction bias E||x_hat||^2 / E<x, x_hat> (1 = unbiased; < 1: shrunk reconstructions)."""
    cos_sim: float = math.nan
    """Mean cosine similarity of x and x_hat over the examples."""
    dec_redundancy: float = math.nan
    """Fraction of latents whose nearest other decoder row has cosine similarity > 0.9 (from the weights)."""
    n_examples: int = 0
    """How many examples the evaluation covered (all of the shards', or `eval_n_patches` of them)."""

    def to_json(self) -> dict[str, float | int]:
        """The scalar fields, for `metrics.json`."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("freqs", "mean_values")
        }

    def for_wandb(self, sae_cfg: "config.SparseAutoencoder | None" = None) -> dict[str, object]:
        """`eval/<field>` keys; the two per-feature arrays as wandb tables. With the SAE's config also
        `eval/kind`, `eval/d_sae` and its kind's own sparsity setting (`eval/k`, `eval/l0_coefficient`
        or `eval/sparsity_coeff`), so runs of any kind compare on one wandb panel."""
        import wandb  # Only here: importing wandb costs seconds.

        named = {}
        if sae_cfg is not None:
            name, value = sae_cfg.setting
            named = {"kind": sae_cfg.kind, "d_sae": sae_cfg.d_sae, name: value}
        dct = (
            self.to_json()
            | named
            | {
                "freqs": wandb.Table(columns=["freq"], data=self.freqs[:, None].tolist()),
                "mean_values": wandb.Table(columns=["mean_value"], data=self.mean_values[:, None].tolist()),
            }
        )
        return {f"eval/{key}": value for key, value in dct.items()}
