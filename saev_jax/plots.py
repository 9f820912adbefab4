"""Histograms of feature frequency and mean value, per SAE and overlaid for a whole group, and the
sweep's frontier: L0 against FVU for every SAE.

Figures are `matplotlib.figure.Figure` objects drawn with the Agg canvas and closed after
saving: nothing touches pyplot's global state, so this is safe in threads and headless jobs.

    paths = plots.save_plots(ckpt_dpath, run_ids, cfgs, results)   # PNGs beside the checkpoints
    run.log(plots.wandb_images(paths), step=step)                  # one dict per SAE
"""

import dataclasses
import json
import math
import pathlib
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Float

from . import config
from . import rows as rows_lib
from .metrics import EvalMetrics

FRONTIER_FNAME = "frontier.png"
"""The sweep's frontier figure, beside summary.csv."""

if TYPE_CHECKING:  # matplotlib and wandb take seconds to import: only when a figure is drawn or logged.
    import wandb
    from matplotlib.figure import Figure

SAE_FNAME = "hists.png"
"""File name of an SAE's own histograms inside its checkpoint directory."""
FREQ_RANGE = (-8.0, 0.0)
"""log10 frequency axis: fixed, so figures of different SAEs and sweeps compare directly."""


@dataclasses.dataclass(frozen=True)
class PlotPaths:
    """Where `save_plots` wrote the figures."""

    per_sae: list[pathlib.Path]
    """`<ckpt_path>/<run id>/hists.png`, one per SAE, in input order."""
    group: pathlib.Path
    """`<ckpt_path>/group-<first run id>.png`: every SAE of the group overlaid."""
    frontier: pathlib.Path
    """`<ckpt_path>/frontier.png`: these SAEs' L0 against FVU (the sweep's summary redraws it for every SAE)."""


def label(cfg: config.Train) -> str:
    """A short legend label: learning rate and the sparsity knob (the kind's, for kinds other than ReLU)."""
    if cfg.sae.kind != "relu":
        return f"lr={cfg.lr:.3g} {cfg.sae.kind_label}"
    return f"lr={cfg.lr:.3g} λ={cfg.sae.sparsity_coeff:.3g}"


def _log10_positive(x: Float[np.ndarray, " n"]) -> Float[np.ndarray, " m"]:
    x = np.asarray(x, np.float64)
    return np.log10(x[np.isfinite(x) & (x > 0)])


def _value_range(metrics: list[EvalMetrics]) -> tuple[float, float]:
    vals = np.concatenate([_log10_positive(m.mean_values) for m in metrics] or [np.zeros(0)])
    if vals.size == 0:
        return (-1.0, 1.0)
    lo, hi = math.floor(vals.min() * 2) / 2, math.ceil(vals.max() * 2) / 2
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _stats_line(m: EvalMetrics) -> str:
    return f"L0={m.l0:.3g}  MSE={m.mse:.3g}  dead={m.n_dead}  dense={m.n_dense}  quality={m.quality:.1f}±{m.quality_stderr:.1f} bits"


def _freq_axis(ax, m: EvalMetrics) -> None:
    ax.axvline(math.log10(m.dense_threshold), color="0.5", ls="--", lw=0.8)
    ax.axvline(math.log10(m.almost_dead_threshold), color="0.5", ls=":", lw=0.8)
    ax.set_xlim(*FREQ_RANGE)
    ax.set_xlabel("log10 feature frequency  (dashed: dense, dotted: almost dead)")
    ax.set_ylabel("features")


def _figure(figsize: tuple[float, float]) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _hist(ax, values: Float[np.ndarray, " n"], bins: Float[np.ndarray, " b"], **kw) -> None:
    # One stairs artist per histogram: ax.hist draws one patch per bar, ten times slower.
    counts, _ = np.histogram(values, bins=bins)
    ax.stairs(counts, bins, **kw)


def plot_sae(metrics: EvalMetrics, title: str = "") -> "Figure":
    """One SAE: histograms of log10 frequency (dead features counted in the legend) and of log10 mean value."""
    fig = _figure((10, 3.6))
    ax_f, ax_v = fig.subplots(1, 2)
    bins_f = np.linspace(*FREQ_RANGE, 65)
    _hist(
        ax_f, _log10_positive(metrics.freqs), bins_f, fill=True, color="C0", label=f"{metrics.n_dead} dead (not shown)"
    )
    _freq_axis(ax_f, metrics)
    ax_f.legend(loc="upper left", fontsize=8)
    _hist(ax_v, _log10_positive(metrics.mean_values), np.linspace(*_value_range([metrics]), 49), fill=True, color="C1")
    ax_v.set_xlabel("log10 mean value when fired")
    ax_v.set_ylabel("features")
    fig.suptitle(f"{title}\n{_stats_line(metrics)}" if title else _stats_line(metrics), fontsize=10)
    return fig


def plot_group(
    metrics: list[EvalMetrics], labels: list[str], title: str = "", starred: list[int] | None = None
) -> "Figure":
    """Every SAE of a group overlaid: step histograms of log10 frequency and log10 mean value, and quality.

    Colours follow the input order (viridis), the same in the three panels. The quality labels of
    `starred` (default: the highest quality) are bold.
    """
    if len(metrics) != len(labels):
        raise ValueError(f"plot_group: {len(metrics)} metrics but {len(labels)} labels")
    import matplotlib

    fig = _figure((15, 5.2 + 0.18 * math.ceil(len(metrics) / 4)))
    ax_f, ax_v, ax_q = fig.subplots(1, 3, width_ratios=(1, 1, 0.8))
    colors = [matplotlib.colormaps["viridis"](x) for x in np.linspace(0, 0.9, max(len(metrics), 1))]
    bins_f = np.linspace(*FREQ_RANGE, 65)
    bins_v = np.linspace(*_value_range(metrics), 49)
    for m, lab, c in zip(metrics, labels, colors):
        _hist(ax_f, _log10_positive(m.freqs), bins_f, color=c, lw=1.3, label=f"{lab} ({m.n_dead} dead)")
        _hist(ax_v, _log10_positive(m.mean_values), bins_v, color=c, lw=1.3)
    if metrics:
        _freq_axis(ax_f, metrics[0])
    # Below the panels, not over the histograms.
    fig.legend(loc="outside lower center", fontsize=7, ncol=min(4, max(1, len(metrics))))
    ax_v.set_xlabel("log10 mean value when fired")
    ax_v.set_ylabel("features")
    y = np.arange(len(metrics))
    q = np.array([m.quality for m in metrics], np.float64)
    ax_q.barh(y, np.nan_to_num(q), color=colors)
    ax_q.set_yticks(y, [f"{lab}  L0={m.l0:.3g}" for lab, m in zip(labels, metrics)], fontsize=7)
    ax_q.invert_yaxis()
    ax_q.axvline(0, color="k", lw=0.8)
    ax_q.set_xlabel("quality: bits/example saved\n(higher is better)")
    if starred is None:
        starred = [int(np.nanargmax(q))] if len(q) and np.isfinite(q).any() else []
    for i in starred:
        ax_q.get_yticklabels()[i].set_fontweight("bold")
    fig.suptitle(title or f"{len(metrics)} SAEs", fontsize=11)
    return fig


def save_figure(fig: "Figure", fpath: str | pathlib.Path) -> pathlib.Path:
    """Writes `fig` as a PNG at `fpath` (parents created) and releases it."""
    fpath = pathlib.Path(fpath)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fpath, dpi=110)
    fig.clear()
    return fpath


def save_plots(
    ckpt_dpath: str | pathlib.Path, run_ids: list[str], cfgs: list[config.Train], metrics: list[EvalMetrics]
) -> PlotPaths:
    """Writes each SAE's histograms into `<ckpt_dpath>/<run id>/hists.png` and the group overlay beside them.

    The checkpoint directories may or may not exist yet; they are created if needed.
    """
    if not (len(run_ids) == len(cfgs) == len(metrics)) or not run_ids:
        raise ValueError(f"save_plots: {len(run_ids)} run ids, {len(cfgs)} configs, {len(metrics)} metrics")
    ckpt_dpath = pathlib.Path(ckpt_dpath)
    labels = [label(c) for c in cfgs]
    if len({c.sae.d_sae for c in cfgs}) > 1:
        labels = [f"{lab} d_sae={c.sae.d_sae}" for lab, c in zip(labels, cfgs)]
    per_sae = [
        save_figure(plot_sae(m, f"{run_id}  {lab}"), ckpt_dpath / run_id / SAE_FNAME)
        for run_id, lab, m in zip(run_ids, labels, metrics)
    ]
    # What their metrics.json adds (written before the plots): divergence, so the best is a healthy one.
    rows = []
    for run_id, cfg, m in zip(run_ids, cfgs, metrics):
        fpath = ckpt_dpath / run_id / "metrics.json"
        rows.append(rows_lib.make_row(run_id, cfg, json.loads(fpath.read_text()) if fpath.is_file() else m))
    title = f"{len(metrics)} SAEs, {_widths(cfgs)}, data={cfgs[0].data.shard_root}"
    fig = plot_group(metrics, [f"{r} {lab}" for r, lab in zip(run_ids, labels)], title, rows_lib.best(rows))
    group = save_figure(fig, ckpt_dpath / f"group-{run_ids[0]}.png")
    frontier = save_figure(plot_frontier(rows, rows_lib.best(rows)), ckpt_dpath / FRONTIER_FNAME)
    return PlotPaths(per_sae=per_sae, group=group, frontier=frontier)


def _widths(cfgs: list[config.Train]) -> str:
    widths = sorted({c.sae.d_sae for c in cfgs})
    return f"d_sae={widths[0]}" if len(widths) == 1 else f"d_sae in {{{', '.join(map(str, widths))}}}"


KIND_COLORS = {"relu": "C0", "topk": "C1", "batchtopk": "C2", "matryoshka": "C3", "jumprelu": "C4"}
"""The frontier's colour of each SAE kind (fixed, so figures of different sweeps compare)."""
WIDTH_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
"""The frontier's markers, one per width (d_sae) in increasing order."""


def pareto_front(l0: Float[np.ndarray, " n"], err: Float[np.ndarray, " n"]) -> list[int]:
    """Positions of the points no other point beats on both L0 and error (lower is better), by increasing L0."""
    order = sorted(range(len(l0)), key=lambda i: (l0[i], err[i]))
    front, lowest = [], math.inf
    for i in order:
        if err[i] < lowest:
            front.append(i)
            lowest = err[i]
    return front


def plot_frontier(rows: list[dict[str, object]], starred: list[int], title: str = "") -> "Figure":
    """L0 (log scale) against FVU for SAEs given as summary rows (`rows.make_row`).

    Colour: kind (`KIND_COLORS`); marker: width (`WIDTH_MARKERS`). Healthy SAEs (empty `note`) are
    filled, one scatter per (kind, width) labelled `<kind> d_sae=<width>`; the Pareto front of the
    healthy ones is a line (gid `pareto`); `starred` (the best, `rows.best`) get a star (gid
    `best`); unhealthy ones (diverged, broken, ...) are crosses (gid `unhealthy`), drawn at the top
    edge when their error is off the chart; healthy SAEs that `prune = "halving"` stopped early are
    hollow circles (gid `stopped`), off the front. When some healthy SAE has no fvu, MSE is the y axis.
    """
    fig = _figure((7.5, 5.2))
    ax = fig.subplots()
    l0 = np.array([float(r["l0"]) for r in rows], np.float64)
    use_fvu = all(math.isfinite(r["fvu"]) for r in rows if r["note"] == "")
    key = "fvu" if use_fvu else "mse"
    err = np.array([float(r[key]) for r in rows], np.float64)
    shown = [
        i for i, r in enumerate(rows) if r["note"] == "" and np.isfinite(l0[i]) and l0[i] > 0 and np.isfinite(err[i])
    ]
    stopped = [i for i in shown if rows[i].get("stopped_at_step", "") != ""]
    healthy = [i for i in shown if i not in stopped]
    widths = sorted({int(r["d_sae"]) for r in rows})
    marker = {w: WIDTH_MARKERS[j % len(WIDTH_MARKERS)] for j, w in enumerate(widths)}
    groups: dict[tuple[str, int], list[int]] = {}
    for i in healthy:
        groups.setdefault((str(rows[i]["kind"]), int(rows[i]["d_sae"])), []).append(i)
    for (kind, width), idx in sorted(groups.items()):
        ax.scatter(
            l0[idx],
            err[idx],
            c=KIND_COLORS.get(kind, "C7"),
            marker=marker[width],
            s=36,
            label=f"{kind} d_sae={width}",
            zorder=3,
        )
    if stopped:
        colors = [KIND_COLORS.get(str(rows[i]["kind"]), "C7") for i in stopped]
        ax.scatter(l0[stopped], err[stopped], marker="o", s=36, facecolors="none", edgecolors=colors, zorder=3,
                   gid="stopped", label="stopped early (prune = halving)")  # fmt: skip
    top = max([err[i] for i in shown], default=1.0)
    ymax = 1.1 * top if top > 0 else 1.0
    if healthy:
        front = [healthy[j] for j in pareto_front(l0[healthy], err[healthy])]
        ax.plot(l0[front], err[front], color="0.3", lw=1, ls="--", zorder=2, gid="pareto", label="Pareto front")
    sick = [i for i, r in enumerate(rows) if r["note"] != "" and np.isfinite(l0[i]) and l0[i] > 0]
    if sick:
        y = np.where(np.isfinite(err[sick]), np.minimum(err[sick], ymax), ymax)
        colors = [KIND_COLORS.get(str(rows[i]["kind"]), "C7") for i in sick]
        ax.scatter(
            l0[sick], y, c=colors, marker="x", s=40, zorder=3, gid="unhealthy", label="diverged / broken (never best)"
        )
    stars = [i for i in starred if i in healthy]
    if stars:
        ax.scatter(l0[stars], err[stars], marker="*", s=260, facecolors="none", edgecolors="k", lw=1.2, zorder=4, gid="best",
                   label="best" if len(stars) == 1 else "best (tied)")  # fmt: skip
    from matplotlib import ticker

    ax.set_xscale("log")
    # Plain numbers (20, not 2x10^1): sweeps often span less than a decade of L0.
    ax.xaxis.set_major_formatter(ticker.LogFormatter())
    ax.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    ax.set_ylim(0, ymax)
    ax.set_xlabel("L0: active latents per example (log scale)")
    ax.set_ylabel("FVU: fraction of variance unexplained" if use_fvu else "MSE (no FVU for every SAE)")
    ax.grid(True, which="both", color="0.9", lw=0.6)
    fig.legend(loc="outside right upper", fontsize=8)
    n_off = len(rows) - len(shown) - len(sick)
    extra = f"; {n_off} not shown (L0 of 0 or not finite)" if n_off else ""
    fig.suptitle(title or f"{len(rows)} SAEs: lower left is better{extra}", fontsize=11)
    return fig


def wandb_images(paths: PlotPaths) -> list[dict[str, "wandb.Image"]]:
    """One wandb log dict per SAE: `eval/hists` (its own figure), `eval/group_hists` (the overlay) and `eval/frontier`."""
    import wandb

    shared = {"eval/group_hists": wandb.Image(str(paths.group)), "eval/frontier": wandb.Image(str(paths.frontier))}
    return [{"eval/hists": wandb.Image(str(p))} | shared for p in paths.per_sae]
