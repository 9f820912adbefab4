"""Histograms of feature frequency and mean value, per SAE and overlaid for a whole group.

Figures are `matplotlib.figure.Figure` objects drawn with the Agg canvas and closed after
saving: nothing touches pyplot's global state, so this is safe in threads and headless jobs.

    paths = plots.save_plots(ckpt_dpath, run_ids, cfgs, results)   # PNGs beside the checkpoints
    run.log(plots.wandb_images(paths), step=step)                  # one dict per SAE
"""

import dataclasses
import math
import pathlib
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Float

from . import config
from .metrics import EvalMetrics

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
    _hist(ax_f, _log10_positive(metrics.freqs), bins_f, fill=True, color="C0", label=f"{metrics.n_dead} dead (not shown)")
    _freq_axis(ax_f, metrics)
    ax_f.legend(loc="upper left", fontsize=8)
    _hist(ax_v, _log10_positive(metrics.mean_values), np.linspace(*_value_range([metrics]), 49), fill=True, color="C1")
    ax_v.set_xlabel("log10 mean value when fired")
    ax_v.set_ylabel("features")
    fig.suptitle(f"{title}\n{_stats_line(metrics)}" if title else _stats_line(metrics), fontsize=10)
    return fig


def plot_group(metrics: list[EvalMetrics], labels: list[str], title: str = "") -> "Figure":
    """Every SAE of a group overlaid: step histograms of log10 frequency and log10 mean value, and quality.

    Colours follow the input order (viridis), the same in the three panels.
    """
    if len(metrics) != len(labels):
        raise ValueError(f"plot_group: {len(metrics)} metrics but {len(labels)} labels")
    import matplotlib

    fig = _figure((15, 4.8))
    ax_f, ax_v, ax_q = fig.subplots(1, 3, width_ratios=(1, 1, 0.8))
    colors = [matplotlib.colormaps["viridis"](x) for x in np.linspace(0, 0.9, max(len(metrics), 1))]
    bins_f = np.linspace(*FREQ_RANGE, 65)
    bins_v = np.linspace(*_value_range(metrics), 49)
    for m, lab, c in zip(metrics, labels, colors):
        _hist(ax_f, _log10_positive(m.freqs), bins_f, color=c, lw=1.3, label=f"{lab} ({m.n_dead} dead)")
        _hist(ax_v, _log10_positive(m.mean_values), bins_v, color=c, lw=1.3)
    if metrics:
        _freq_axis(ax_f, metrics[0])
    ax_f.legend(loc="upper left", fontsize=6, ncol=1 + len(metrics) // 12)
    ax_v.set_xlabel("log10 mean value when fired")
    ax_v.set_ylabel("features")
    y = np.arange(len(metrics))
    q = np.array([m.quality for m in metrics], np.float64)
    ax_q.barh(y, np.nan_to_num(q), color=colors)
    ax_q.set_yticks(y, [f"{lab}  L0={m.l0:.3g}" for lab, m in zip(labels, metrics)], fontsize=7)
    ax_q.invert_yaxis()
    ax_q.axvline(0, color="k", lw=0.8)
    ax_q.set_xlabel("quality: bits/example saved (higher is better)")
    if len(q) and np.isfinite(q).any():
        best = int(np.nanargmax(q))
        ax_q.get_yticklabels()[best].set_fontweight("bold")
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
    per_sae = [
        save_figure(plot_sae(m, f"{run_id}  {lab}"), ckpt_dpath / run_id / SAE_FNAME)
        for run_id, lab, m in zip(run_ids, labels, metrics)
    ]
    title = f"{len(metrics)} SAEs, d_sae={cfgs[0].sae.d_sae}, data={cfgs[0].data.shard_root}"
    group = save_figure(plot_group(metrics, [f"{r} {lab}" for r, lab in zip(run_ids, labels)], title), ckpt_dpath / f"group-{run_ids[0]}.png")
    return PlotPaths(per_sae=per_sae, group=group)


def wandb_images(paths: PlotPaths) -> list[dict[str, "wandb.Image"]]:
    """One wandb log dict per SAE: `eval/hists` (its own figure) and `eval/group_hists` (the overlay)."""
    import wandb

    return [{"eval/hists": wandb.Image(str(p)), "eval/group_hists": wandb.Image(str(paths.group))} for p in paths.per_sae]
