"""The end of a sweep: one row per SAE in the terminal and in `<ckpt_path>/summary.csv`,
and the sweep's frontier (L0 against FVU) in `<ckpt_path>/frontier.png`.

    python -m saev_jax.summary CKPT_DIR

rebuilds both from the `cfg.json` and `metrics.json` of every checkpoint in CKPT_DIR
(after a crash, or to compare sweeps that wrote to one directory).

Which SAE is "best" (`*`): the highest `quality` among the healthy SAEs only. An SAE is not
healthy (its `note` says why, and it is never starred) when

- its evaluation failed (`eval_error` in metrics.json);
- it diverged (`diverged_step`, or `diverged: true`: training froze it);
- it is broken: a non-finite mse, l0 or quality; `fvu > 1` (it reconstructs worse than the
  data's mean would); when fvu is unknown, `mse > MSE_LIMIT` on normalised data (whose mean
  squared element is about 1, so no usable SAE comes near); or every latent dead.

Qualities are estimates with a standard error (`quality_stderr`): every healthy SAE whose
quality is within the combined standard error sqrt(se_best^2 + se^2) of the best one's is
starred too, as a tie the evaluation cannot resolve.
"""

import csv
import json
import math
import pathlib
import sys
from collections.abc import Mapping

from . import config
from . import sae as sae_lib
from .metrics import EvalMetrics

CSV_FNAME = "summary.csv"
FRONTIER_FNAME = "frontier.png"
MSE_LIMIT = 100.0
"""Without an fvu, an SAE on normalised data (`scale_norm` not false) with a larger mse is broken."""
SPARSITY_FIELDS = {"relu": "sparsity_coeff", "topk": "k", "batchtopk": "k", "matryoshka": "k", "jumprelu": "l0_coefficient"}
"""Each kind's own sparsity setting (a `config.SparseAutoencoder` field): the table's `sparsity` column."""
COLUMNS = (
    "run_id", "kind", "d_sae", "sparsity_coeff", "k", "l0_coefficient", "lr",
    "mse", "fvu", "explained_variance", "l0", "l1", "n_dead", "n_almost_dead", "n_dense",
    "quality", "quality_stderr", "rel_bias", "cos_sim", "dec_redundancy", "diverged_step", "note",
)  # fmt: skip
"""Columns of summary.csv, in order. A sparsity setting the row's kind does not read is empty."""
TABLE_COLUMNS = ("run_id", "sparsity", "kind", "d_sae", "lr", "mse", "fvu", "expl_var", "l0", "n_dead", "n_dense", "quality", "quality_stderr", "note")
"""Columns of the terminal table, in order; `sparsity` is the kind's own setting (`SPARSITY_FIELDS`)."""

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
    own = SPARSITY_FIELDS.get(cfg.sae.kind)
    row: dict[str, object] = {"run_id": run_id, "kind": cfg.sae.kind, "d_sae": cfg.sae.d_sae, "lr": cfg.lr}
    for key in ("sparsity_coeff", "k", "l0_coefficient"):
        row[key] = getattr(cfg.sae, key) if key == own else ""
    for key in ("mse", "fvu", "explained_variance", "l0", "l1", "quality", "quality_stderr", "rel_bias", "cos_sim", "dec_redundancy"):
        row[key] = _float(scalars, key)
    for key in ("n_dead", "n_almost_dead", "n_dense"):
        row[key] = int(scalars[key]) if key in scalars else -1
    step = scalars.get("diverged_step")
    row["diverged_step"] = "" if step is None else int(step)
    row["note"] = health(cfg, scalars)
    return {col: row[col] for col in COLUMNS}


def best(rows: list[dict[str, object]]) -> list[int]:
    """Positions of the starred rows: the healthy row of highest quality and every healthy row tied with it.

    Tied: its quality is within sqrt(se_best^2 + se^2) of the best's (a NaN stderr counts as 0).
    Empty when no row is healthy.
    """
    healthy = [i for i, r in enumerate(rows) if r["note"] == "" and math.isfinite(r["quality"])]
    if not healthy:
        return []
    top = max(healthy, key=lambda i: rows[i]["quality"])

    def se(i: int) -> float:
        s = rows[i]["quality_stderr"]
        return 0.0 if math.isnan(s) else s

    q_top = rows[top]["quality"]
    return [i for i in healthy if q_top - rows[i]["quality"] <= math.hypot(se(top), se(i))]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table_cells(row: dict[str, object]) -> list[str]:
    own = SPARSITY_FIELDS.get(row["kind"], "sparsity_coeff")
    shown = row | {"sparsity": row[own], "expl_var": row["explained_variance"]}
    return [_fmt(shown[c]) for c in TABLE_COLUMNS]


def format_table(rows: list[dict[str, object]]) -> str:
    """A fixed-width text table of `TABLE_COLUMNS`; the rows of `best` are marked `*`."""
    starred = set(best(rows))
    cells = [list(TABLE_COLUMNS)] + [_table_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for i, row in enumerate(cells):
        mark = "*" if i - 1 in starred else " "
        padded = [c.ljust(w) if j in (0, len(row) - 1) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append((mark + " " + "  ".join(padded)).rstrip())
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def legend(rows: list[dict[str, object]]) -> str:
    """The lines under the table: what the columns and the star mean."""
    n_star = len(best(rows))
    star = {0: "no SAE is healthy: none starred", 1: "* = the best healthy SAE"}.get(
        n_star, f"* = the best healthy SAEs: {n_star} tied within their standard errors"
    )
    return "\n".join([
        f"{len(rows)} SAEs. quality: bits/example saved, higher is better, ± quality_stderr; "
        "fvu: fraction of variance unexplained, expl_var = 1 - fvu.",
        "sparsity: the kind's own setting: sparsity_coeff (relu), k (topk, batchtopk, matryoshka), l0_coefficient (jumprelu).",
        f"{star}; an SAE with a note (diverged, evaluation failed, broken) is never starred.",
    ])  # fmt: skip


def write_summary(ckpt_dpath: str | pathlib.Path, entries: list[Entry], *, file=None) -> pathlib.Path:
    """Prints the table of `entries` (in the given order) to `file` and writes `<ckpt_dpath>/summary.csv`
    and the frontier figure `<ckpt_dpath>/frontier.png` (`plots.plot_frontier`).

    Returns the CSV's path. The CSV holds every column of `COLUMNS`, one row per entry,
    floats written in full precision; it replaces any previous summary.csv there.
    """
    from . import plots  # matplotlib only when a summary is written.

    file = sys.stdout if file is None else file
    rows = [make_row(run_id, cfg, metrics) for run_id, cfg, metrics in entries]
    ckpt_dpath = pathlib.Path(ckpt_dpath)
    ckpt_dpath.mkdir(parents=True, exist_ok=True)
    fpath = ckpt_dpath / CSV_FNAME
    tmp = fpath.with_name(f".{CSV_FNAME}.tmp")
    with open(tmp, "w", newline="") as fd:
        writer = csv.DictWriter(fd, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(fpath)
    frontier = plots.save_figure(plots.plot_frontier(rows, best(rows)), ckpt_dpath / FRONTIER_FNAME)
    print(format_table(rows), file=file)
    print(legend(rows), file=file)
    print(f"Table: {fpath}; frontier (L0 against FVU): {frontier}", file=file)
    return fpath


def read_entries(ckpt_dpath: str | pathlib.Path, run_ids: list[str] | None = None) -> list[Entry]:
    """(run id, config, metrics.json dict) of the checkpoints in `ckpt_dpath`.

    With `run_ids`, those checkpoints in that order (InputError if one is missing); without,
    every subdirectory holding both cfg.json and metrics.json, oldest metrics.json first.
    """
    ckpt_dpath = pathlib.Path(ckpt_dpath)
    if not ckpt_dpath.is_dir():
        raise config.InputError(f"{ckpt_dpath}: no such checkpoint directory")
    if run_ids is None:
        dpaths = [p for p in ckpt_dpath.iterdir() if (p / "cfg.json").is_file() and (p / "metrics.json").is_file()]
        dpaths.sort(key=lambda p: ((p / "metrics.json").stat().st_mtime, p.name))
    else:
        dpaths = [ckpt_dpath / run_id for run_id in run_ids]
    entries = []
    for dpath in dpaths:
        cfg_fpath, metrics_fpath = dpath / "cfg.json", dpath / "metrics.json"
        if not (cfg_fpath.is_file() and metrics_fpath.is_file()):
            raise config.InputError(f"{dpath}: no cfg.json and metrics.json (not a finished checkpoint)")
        entries.append((dpath.name, sae_lib.load_cfg(dpath), json.loads(metrics_fpath.read_text())))
    return entries


def summarize(ckpt_dpath: str | pathlib.Path, run_ids: list[str], *, file=None) -> pathlib.Path | None:
    """The end-of-sweep call: `write_summary` for those of `run_ids` checkpointed in `ckpt_dpath`.

    Run ids without a finished checkpoint there (another group's `ckpt_path`) are skipped;
    returns the CSV's path, or None when none of them is there.
    """
    ckpt_dpath = pathlib.Path(ckpt_dpath)
    present = [r for r in run_ids if (ckpt_dpath / r / "cfg.json").is_file() and (ckpt_dpath / r / "metrics.json").is_file()]
    if not present:
        return None
    return write_summary(ckpt_dpath, read_entries(ckpt_dpath, present), file=file)


def main(argv: list[str] | None = None) -> int:
    """`python -m saev_jax.summary CKPT_DIR`: table and summary.csv from the checkpoints in CKPT_DIR."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        entries = read_entries(args[0])
        if not entries:
            raise config.InputError(f"{args[0]}: no checkpoints (subdirectories with cfg.json and metrics.json)")
        write_summary(args[0], entries)
    except config.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
