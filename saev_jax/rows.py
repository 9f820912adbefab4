"""One row per SAE of a sweep, and the judgement read from it: healthy or not, and the best.

The summary table, summary.csv and the plots all read these rows, so they agree on the star.

Which SAE is "best" (`*`): the highest `quality` among the healthy SAEs only. An SAE is not
healthy (its `note` says why, and it is never starred) when

- its evaluation failed (`eval_error` in metrics.json);
- it diverged (`diverged_step`, or `diverged: true`: training froze it);
- it is broken: a non-finite mse, l0 or quality; `fvu > 1` (it reconstructs worse than the
  data's mean would); when fvu is unknown, `mse > MSE_LIMIT` on normalised data (whose mean
  squared element is about 1, so no usable SAE comes near); or every latent dead.

An SAE that `prune = "halving"` stopped early (`stopped_at_step`) is healthy but never starred:
it trained on fewer examples than the others, and stopped because it ranked low among its tier.

Qualities are estimates with a standard error (`quality_stderr`): every healthy SAE whose
quality is within the combined standard error sqrt(se_best^2 + se^2) of the best one's is
starred too, as a tie the evaluation cannot resolve.
"""

import math
from collections.abc import Mapping

from . import config
from .metrics import EvalMetrics

MSE_LIMIT = 100.0
"""Without an fvu, an SAE on normalised data (`scale_norm` not false) with a larger mse is broken."""
COLUMNS = (
    "run_id", "kind", "d_sae", "sparsity_coeff", "k", "l0_coefficient", "lr",
    "mse", "fvu", "explained_variance", "l0", "l1", "n_dead", "n_almost_dead", "n_dense",
    "quality", "quality_stderr", "rel_bias", "cos_sim", "dec_redundancy", "target_l0", "final_sparsity_coeff",
    "diverged_step", "stopped_at_step", "note",
)  # fmt: skip
"""Columns of summary.csv, in order. A sparsity setting the row's kind does not read is empty."""
Entry = tuple[str, config.Train, EvalMetrics | Mapping[str, object]]
"""(run id, its config, its EvalMetrics or the dict of its metrics.json)."""


def _float(scalars: Mapping[str, object], key: str) -> float:
    value = scalars.get(key)
    return math.nan if value is None else float(value)


def health(cfg: config.Train, scalars: Mapping[str, object]) -> str:
    """Why an SAE is not healthy (one short phrase), or "" if it is (the module docstring's rule)."""
    if "eval_error" in scalars:
        return f"evaluation failed: {scalars['eval_error']}"
    step = scalars.get("diverged_step")
    if step is not None or scalars.get("diverged"):
        return "diverged" if step is None else f"diverged at step {int(step)}"
    for key in ("mse", "l0", "quality"):
        if key in scalars and not math.isfinite(_float(scalars, key)):  # Missing (an older metrics.json) is not broken.
            return f"broken: {key} is not finite"
    fvu, mse = _float(scalars, "fvu"), _float(scalars, "mse")
    if fvu > 1:
        return f"broken: fvu {fvu:.3g} > 1"
    if math.isnan(fvu) and cfg.data.scale_norm is not False and mse > MSE_LIMIT:
        return f"broken: mse {mse:.3g} > {MSE_LIMIT:g} on normalised data"
    if "n_dead" in scalars and int(scalars["n_dead"]) >= cfg.sae.d_sae:
        return "broken: every latent dead"
    return ""


def make_row(run_id: str, cfg: config.Train, metrics: EvalMetrics | Mapping[str, object]) -> dict[str, object]:
    """The summary row of one SAE (`COLUMNS`); a metric missing from an old metrics.json is NaN (counts: -1)."""
    scalars = metrics.to_json() if isinstance(metrics, EvalMetrics) else metrics
    own = config.SETTINGS.get(cfg.sae.kind)
    row: dict[str, object] = {"run_id": run_id, "kind": cfg.sae.kind, "d_sae": cfg.sae.d_sae, "lr": cfg.lr}
    for key in ("sparsity_coeff", "k", "l0_coefficient"):
        row[key] = getattr(cfg.sae, key) if key == own else ""
    for key in (
        "mse",
        "fvu",
        "explained_variance",
        "l0",
        "l1",
        "quality",
        "quality_stderr",
        "rel_bias",
        "cos_sim",
        "dec_redundancy",
    ):
        row[key] = _float(scalars, key)
    for key in ("n_dead", "n_almost_dead", "n_dense"):
        row[key] = int(scalars[key]) if key in scalars else -1
    for key in ("target_l0", "final_sparsity_coeff"):  # Steered SAEs (sae.target_l0) only.
        row[key] = "" if scalars.get(key) is None else float(scalars[key])
    step = scalars.get("diverged_step")
    row["diverged_step"] = "" if step is None else int(step)
    stopped = scalars.get("stopped_at_step")
    row["stopped_at_step"] = "" if stopped is None else int(stopped)
    row["note"] = health(cfg, scalars)
    return {col: row[col] for col in COLUMNS}


def best(rows: list[dict[str, object]]) -> list[int]:
    """Positions of the starred rows: the healthy row of highest quality and every healthy row tied with it.

    Tied: its quality is within sqrt(se_best^2 + se^2) of the best's (a NaN stderr counts as 0).
    Rows stopped early (`stopped_at_step`) are never starred. Empty when no row is healthy.
    """
    healthy = [
        i for i, r in enumerate(rows)
        if r["note"] == "" and math.isfinite(r["quality"]) and r.get("stopped_at_step", "") == ""
    ]  # fmt: skip
    if not healthy:
        return []
    top = max(healthy, key=lambda i: rows[i]["quality"])

    def se(i: int) -> float:
        s = rows[i]["quality_stderr"]
        return 0.0 if math.isnan(s) else s

    q_top = rows[top]["quality"]
    return [i for i in healthy if q_top - rows[i]["quality"] <= math.hypot(se(top), se(i))]
