"""The frontier figure: what it plots (read back from the Figure's artists), and the group figure's title."""

import math

import numpy as np

from saev_jax import config, plots, summary
from saev_jax.metrics import EvalMetrics

D = 8


def row(run_id, kind, exp, l0, fvu, quality=1.0, **extra):
    sae = config.SparseAutoencoder(d_vit=D, exp_factor=exp, kind=kind, **({"k": 2} if kind == "topk" else {}))
    scalars = {"l0": l0, "mse": fvu, "fvu": fvu, "quality": quality, "quality_stderr": 0.0, "n_dead": 0} | extra
    return summary.make_row(run_id, config.Train(sae=sae), scalars)


def by_gid(fig, gid):
    return [a for ax in fig.axes for a in [*ax.collections, *ax.lines] if a.get_gid() == gid]


def test_frontier_plots_every_sae_front_star_and_unhealthy():
    rows = [
        row("r1", "relu", 2, 2.0, 0.5, quality=1.0),
        row("r2", "relu", 2, 8.0, 0.2, quality=3.0),
        row("r3", "relu", 4, 16.0, 0.3, quality=2.0),  # Beaten by r2 on both axes: off the front.
        row("t1", "topk", 4, 4.0, 0.25, quality=2.5),
        row("bad", "relu", 4, 0.5, 3e22, quality=7348.0),  # Finite but blown up: broken.
        row("div", "topk", 2, 3.0, 0.1, quality=9.0, diverged_step=5),
    ]
    fig = plots.plot_frontier(rows, summary.best(rows))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel().startswith("FVU")
    points = {c.get_label(): c.get_offsets().data.tolist() for c in ax.collections if c.get_gid() is None}
    assert points == {
        "relu d_sae=16": [[2.0, 0.5], [8.0, 0.2]], "relu d_sae=32": [[16.0, 0.3]], "topk d_sae=32": [[4.0, 0.25]],
    }  # fmt: skip
    markers = {
        c.get_label(): c.get_paths()[0].vertices.round(3).tolist() for c in ax.collections if c.get_gid() is None
    }
    assert markers["relu d_sae=32"] == markers["topk d_sae=32"] != markers["relu d_sae=16"]  # Marker: width.
    colors = {c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections if c.get_gid() is None}
    assert colors["relu d_sae=16"] == colors["relu d_sae=32"] != colors["topk d_sae=32"]  # Colour: kind.
    (front,) = by_gid(fig, "pareto")
    assert np.asarray(front.get_xydata()).tolist() == [[2.0, 0.5], [4.0, 0.25], [8.0, 0.2]]
    (best,) = by_gid(fig, "best")
    assert best.get_offsets().data.tolist() == [[8.0, 0.2]]  # Not the blown-up or the diverged one.
    (sick,) = by_gid(fig, "unhealthy")
    xy = sick.get_offsets().data
    assert xy[:, 0].tolist() == [0.5, 3.0]
    top = ax.get_ylim()[1]
    assert xy[0, 1] == top and xy[1, 1] == 0.1 and math.isclose(top, 1.1 * 0.5)  # The blown-up one at the top edge.


def test_frontier_marks_stopped_saes_off_the_front():
    rows = [
        row("r1", "relu", 2, 2.0, 0.5),
        row("r2", "relu", 2, 8.0, 0.2, quality=3.0),
        row("s1", "relu", 2, 4.0, 0.1, quality=9.0, stopped_at_step=40),  # Would lead the front and the table.
    ]
    fig = plots.plot_frontier(rows, summary.best(rows))
    (stopped,) = by_gid(fig, "stopped")
    assert stopped.get_offsets().data.tolist() == [[4.0, 0.1]]
    (front,) = by_gid(fig, "pareto")
    assert np.asarray(front.get_xydata()).tolist() == [[2.0, 0.5], [8.0, 0.2]]
    (best,) = by_gid(fig, "best")
    assert best.get_offsets().data.tolist() == [[8.0, 0.2]]
    points = {c.get_label(): c.get_offsets().data.tolist() for c in fig.axes[0].collections if c.get_gid() is None}
    assert points == {"relu d_sae=16": [[2.0, 0.5], [8.0, 0.2]]}


def test_frontier_falls_back_to_mse_and_marks_ties():
    rows = [row("a", "relu", 2, 2.0, 0.4, quality=5.0), row("b", "relu", 2, 4.0, 0.3, quality=5.0)]
    for r in rows:
        r["fvu"] = math.nan
    fig = plots.plot_frontier(rows, summary.best(rows))
    assert fig.axes[0].get_ylabel().startswith("MSE")
    (best,) = by_gid(fig, "best")
    assert best.get_offsets().data.tolist() == [[2.0, 0.4], [4.0, 0.3]] and best.get_label() == "best (tied)"
    # Every latent dead: L0 = 0 has no place on a log axis, and the title says so.
    rows.append(row("dead", "relu", 2, 0.0, 9e6, n_dead=16))
    assert "1 not shown (L0 of 0" in plots.plot_frontier(rows, summary.best(rows)).get_suptitle()


def test_save_plots_titles_every_width_and_writes_the_frontier(tmp_path):
    cfgs = [config.Train(sae=config.SparseAutoencoder(d_vit=D, exp_factor=e)) for e in (2, 4)]
    metrics = [
        EvalMetrics(l0=2.0, l1=1.0, mse=0.3, n_dead=0, n_almost_dead=0, n_dense=0, freqs=np.full(D * e, 0.1, np.float32),
                    mean_values=np.ones(D * e, np.float32), almost_dead_threshold=1e-7, dense_threshold=1e-2, quality=1.0, fvu=0.3)
        for e in (2, 4)
    ]  # fmt: skip
    assert plots._widths(cfgs) == "d_sae in {16, 32}" and plots._widths(cfgs[:1]) == "d_sae=16"
    paths = plots.save_plots(tmp_path, ["a", "b"], cfgs, metrics)
    assert paths.frontier == tmp_path / "frontier.png" and paths.frontier.read_bytes()[:4] == b"\x89PNG"


def test_group_figure_bolds_the_healthy_best_only(tmp_path):
    def m(quality, mse):
        return EvalMetrics(l0=2.0, l1=1.0, mse=mse, n_dead=0, n_almost_dead=0, n_dense=0, freqs=np.full(2 * D, 0.1, np.float32),
                           mean_values=np.ones(2 * D, np.float32), almost_dead_threshold=1e-7, dense_threshold=1e-2, quality=quality)  # fmt: skip

    rows_metrics = [m(1.0, 0.3), m(7348.0, 3e22), m(2.0, 0.2)]
    cfg = config.Train(sae=config.SparseAutoencoder(d_vit=D, exp_factor=2))
    rows = [summary.make_row(f"r{i}", cfg, x) for i, x in enumerate(rows_metrics)]
    fig = plots.plot_group(rows_metrics, ["a", "b", "c"], starred=summary.best(rows))
    bold = [t.get_text() for t in fig.axes[2].get_yticklabels() if t.get_fontweight() == "bold"]
    assert bold == ["c  L0=2"]
