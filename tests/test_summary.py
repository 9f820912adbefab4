"""The summary table: which SAE is starred (healthy, ties), its columns, the CSV."""

import csv
import io
import math

import numpy as np

from saev_jax import config, plots, summary
from saev_jax.metrics import EvalMetrics

D, S = 8, 32


def metrics(**kw) -> EvalMetrics:
    fields = dict(
        l0=4.0, l1=2.0, mse=0.3, n_dead=1, n_almost_dead=2, n_dense=0, freqs=np.full(S, 0.1, np.float32),
        mean_values=np.ones(S, np.float32), almost_dead_threshold=1e-7, dense_threshold=1e-2, quality=3.0,
        quality_stderr=0.5, fvu=0.3, explained_variance=0.7,
    )  # fmt: skip
    return EvalMetrics(**(fields | kw))


def cfg(**sae) -> config.Train:
    return config.Train(lr=1e-3, sae=config.SparseAutoencoder(d_vit=D, exp_factor=S // D, **sae))


def table_of(entries) -> tuple[list[str], list[dict]]:
    rows = [summary.make_row(*e) for e in entries]
    return summary.format_table(rows).splitlines(), rows


def starred(lines: list[str]) -> list[str]:
    return [line.split()[1] for line in lines[2:] if line.startswith("*")]


def test_blown_up_but_finite_sae_is_never_best():
    # The reported sweep: lr 1e3 stayed finite, MSE 3.09e22, 3063 of 3072 latents dead, quality 7348.
    healthy = {
        "l0": 31.0,
        "mse": 0.21,
        "n_dead": 12,
        "quality": 120.0,
        "quality_stderr": 5.0,
        "diverged": False,
        "diverged_step": None,
    }
    blown = {
        "l0": 0.4,
        "mse": 3.09e22,
        "n_dead": 3063,
        "quality": 7348.0,
        "quality_stderr": 5.0,
        "diverged": False,
        "diverged_step": None,
    }
    wide = config.Train(lr=1e-3, sae=config.SparseAutoencoder(d_vit=384, exp_factor=8))
    lines, rows = table_of([("good", wide, healthy), ("bad", config.Train(lr=1e3, sae=wide.sae), blown)])
    assert starred(lines) == ["good"]
    assert rows[1]["note"].startswith("broken: mse 3.09e+22") and rows[0]["note"] == ""
    # With the fvu the evaluation now computes, the same SAE is broken by fvu > 1.
    lines, rows = table_of([("good", wide, healthy | {"fvu": 0.2}), ("bad", wide, blown | {"fvu": 2.4e22})])
    assert starred(lines) == ["good"] and rows[1]["note"] == "broken: fvu 2.4e+22 > 1"


def test_unhealthy_reasons():
    c = cfg()
    cases = {
        "diverged at step 17": {"diverged": True, "diverged_step": 17},
        "diverged": {"diverged": True},
        "evaluation failed: OOM": {"eval_error": "OOM"},
        "broken: l0 is not finite": {"l0": math.nan},
        "broken: quality is not finite": {"quality": math.inf},
        "broken: fvu 1.5 > 1": {"fvu": 1.5},
        "broken: every latent dead": {"n_dead": S},
    }
    for note, change in cases.items():
        assert summary.make_row("r", c, metrics().to_json() | change)["note"] == note
    assert summary.make_row("r", c, metrics())["note"] == ""
    old = {k: v for k, v in metrics().to_json().items() if k not in ("quality", "quality_stderr", "fvu")}
    assert summary.make_row("r", c, old)["note"] == ""  # An older metrics.json: unknown, not broken.
    # Without normalisation the data's scale is unknown: a large mse alone breaks nothing.
    raw = config.Train(data=config.DataLoad(scale_norm=False), sae=c.sae)
    assert summary.make_row("r", raw, metrics(mse=1e6, fvu=math.nan))["note"] == ""
    assert summary.make_row("r", c, metrics(mse=1e6, fvu=math.nan))["note"].startswith("broken: mse")


def test_ties_within_the_standard_error_are_all_starred():
    c = cfg()
    # Best 10 ± 3; 7 ± 4 is within hypot(3, 4) = 5 of it, 4.9 ± 0 is not; 20 is diverged.
    entries = [
        ("a", c, metrics(quality=7.0, quality_stderr=4.0)),
        ("b", c, metrics(quality=10.0, quality_stderr=3.0)),
        ("c", c, metrics(quality=4.9, quality_stderr=0.0)),
        ("d", c, metrics().to_json() | {"quality": 20.0, "diverged_step": 3}),
    ]
    lines, rows = table_of(entries)
    assert starred(lines) == ["a", "b"] and summary.best(rows) == [0, 1]
    assert "2 tied within their standard errors" in summary.legend(rows)
    # Unknown stderr counts as 0: only an exact tie is a tie.
    rows = [summary.make_row("x", c, metrics(quality=q, quality_stderr=math.nan)) for q in (1.0, 2.0, 2.0)]
    assert summary.best(rows) == [1, 2]
    assert summary.best([summary.make_row("x", c, metrics(n_dead=S))]) == []


def test_columns_show_kind_width_own_sparsity_fvu_and_stderr(tmp_path):
    entries = [
        ("relu", cfg(sparsity_coeff=0.01), metrics()),
        (
            "topk",
            config.Train(sae=config.SparseAutoencoder(d_vit=D, exp_factor=8, kind="topk", k=5)),
            metrics(fvu=0.25, explained_variance=0.75),
        ),
        ("jump", cfg(kind="jumprelu", l0_coefficient=0.002), metrics(quality_stderr=0.125)),
    ]
    lines, _ = table_of(entries)
    assert lines[0].split() == list(summary.TABLE_COLUMNS)
    cells = {line.split()[1]: dict(zip(summary.TABLE_COLUMNS, line.split()[1:])) for line in lines[2:]}
    assert (
        cells["relu"]["sparsity"] == "0.01"
        and cells["topk"]["sparsity"] == "5"
        and cells["jump"]["sparsity"] == "0.002"
    )
    assert cells["topk"]["kind"] == "topk" and cells["topk"]["d_sae"] == str(8 * D) and cells["relu"]["d_sae"] == str(S)
    assert (
        cells["topk"]["fvu"] == "0.25"
        and cells["topk"]["expl_var"] == "0.75"
        and cells["jump"]["quality_stderr"] == "0.125"
    )
    fpath = summary.write_summary(tmp_path, entries, file=io.StringIO())
    rows = {r["run_id"]: r for r in csv.DictReader(open(fpath))}
    # A sparsity setting the kind does not read is empty: TopK rows carry no sparsity_coeff.
    assert (rows["topk"]["sparsity_coeff"], rows["topk"]["k"], rows["topk"]["l0_coefficient"]) == ("", "5", "")
    assert (rows["relu"]["sparsity_coeff"], rows["relu"]["k"]) == ("0.01", "")
    assert float(rows["topk"]["fvu"]) == 0.25 and rows["relu"]["note"] == ""
    assert (tmp_path / plots.FRONTIER_FNAME).read_bytes()[:4] == b"\x89PNG"


def test_steered_saes_show_their_target_and_final_coefficient():
    steered = {"l0": 8.1, "mse": 0.2, "quality": 3.0, "quality_stderr": 0.5, "target_l0": 8.0,
               "final_sparsity_coeff": 0.0731}  # fmt: skip
    plain = {"l0": 30.0, "mse": 0.1, "quality": 2.0, "quality_stderr": 0.5}
    lines, rows = table_of([("steered", cfg(sparsity_coeff=0.01, target_l0=8), steered), ("plain", cfg(), plain)])
    header = lines[0].split()
    assert header[header.index("sparsity") + 1] == "target_l0"
    cells = {line[2:].split()[0]: line[2:].split()[1:] for line in lines[2:]}  # after the star's column
    at = header.index("sparsity") - 1  # cells start after the run id
    assert cells["steered"][at : at + 2] == ["0.0731", "8"]  # the coefficient it ended at, not the configured 0.01
    assert cells["plain"][at] == "0.0004" and cells["plain"][at + 1] == "relu"  # no target: the kind follows
    assert "target_l0: the L0 the SAE was steered to" in summary.legend(rows)
    assert "target_l0" not in table_of([("plain", cfg(), plain)])[0][0]
