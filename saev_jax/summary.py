"""The end of a sweep: one row per SAE in the terminal and in `<ckpt_path>/summary.csv`,
and the sweep's frontier (L0 against FVU) in `<ckpt_path>/frontier.png`.

    python -m saev_jax.summary CKPT_DIR

rebuilds both from the `cfg.json` and `metrics.json` of every checkpoint in CKPT_DIR
(after a crash, or to compare sweeps that wrote to one directory).

Which SAE is starred and which are unhealthy: `rows.py`.
"""

import csv
import json
import math
import pathlib
import sys

from . import config
from . import sae as sae_lib
from .rows import COLUMNS, MSE_LIMIT, Entry, best, health, make_row  # noqa: F401 (summary's names)

CSV_FNAME = "summary.csv"
TABLE_COLUMNS = (
    "run_id",
    "sparsity",
    "kind",
    "d_sae",
    "lr",
    "mse",
    "fvu",
    "expl_var",
    "l0",
    "n_dead",
    "n_dense",
    "quality",
    "quality_stderr",
    "note",
)
"""Columns of the terminal table, in order; `sparsity` is the kind's own setting (`config.SETTINGS`)."""


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table_cells(row: dict[str, object], columns: tuple[str, ...] = TABLE_COLUMNS) -> list[str]:
    own = config.SETTINGS.get(row["kind"], "sparsity_coeff")
    steered = row.get("target_l0", "") not in ("", None) and row.get("final_sparsity_coeff", "") not in ("", None)
    shown = row | {
        "sparsity": row["final_sparsity_coeff"] if steered else row[own],
        "expl_var": row["explained_variance"],
        "stopped": row.get("stopped_at_step", ""),
        "target_l0": row.get("target_l0", "") if steered else "",
    }
    return [_fmt(shown[c]) for c in columns]


def _has(rows: list[dict[str, object]], key: str) -> bool:
    return any(r.get(key, "") not in ("", None) for r in rows)


def _columns(rows: list[dict[str, object]]) -> tuple[str, ...]:
    """`TABLE_COLUMNS`, with `target_l0` after `sparsity` when some SAE was steered to an L0, and `stopped` (the
    step prune = halving stopped an SAE at) before `note` when some row has one."""
    columns = TABLE_COLUMNS
    if _has(rows, "target_l0"):
        at = columns.index("sparsity") + 1
        columns = columns[:at] + ("target_l0",) + columns[at:]
    if _has(rows, "stopped_at_step"):
        columns = columns[:-1] + ("stopped", columns[-1])
    return columns


def format_table(rows: list[dict[str, object]]) -> str:
    """A fixed-width text table of `TABLE_COLUMNS` (and `stopped`, `_columns`); the rows of `best` are marked `*`."""
    starred = set(best(rows))
    columns = _columns(rows)
    cells = [list(columns)] + [_table_cells(r, columns) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
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
    ] + ([
        "target_l0: the L0 the SAE was steered to; its sparsity is the coefficient the controller ended at."
    ] if _has(rows, "target_l0") else []) + ([
        "stopped: the step at which prune = halving stopped the SAE (it ranked low in its tier); never starred."
    ] if _has(rows, "stopped_at_step") else []))  # fmt: skip


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
    frontier = plots.save_figure(plots.plot_frontier(rows, best(rows)), ckpt_dpath / plots.FRONTIER_FNAME)
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
    present = [
        r for r in run_ids if (ckpt_dpath / r / "cfg.json").is_file() and (ckpt_dpath / r / "metrics.json").is_file()
    ]
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
