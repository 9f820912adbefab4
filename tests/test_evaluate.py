"""evaluate() against a plain NumPy reference; EvalMetrics' outputs; plots and the sweep summary."""

import csv
import dataclasses
import io
import json
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import wandb

from saev_jax import config, data, evaluation, plots, summary, synthetic
from saev_jax import quality as quality_lib
from saev_jax import sae as sae_lib

D, EXP, M = 8, 4, 3
S = D * EXP
ALMOST_DEAD, DENSE = 0.05, 0.5


def make_saes() -> sae_lib.SAE:
    """Three SAEs with a dead feature (0) and an always-on feature (1) each, and non-trivial b_dec."""
    saes = sae_lib.make_saes([config.SparseAutoencoder(d_vit=D, exp_factor=EXP, seed=s) for s in range(M)])
    rng = np.random.default_rng(0)
    b_enc = rng.normal(0, 0.3, (M, S)).astype(np.float32)
    b_enc[:, 0], b_enc[:, 1] = -1e3, 1e3
    b_dec = rng.normal(0, 0.5, (M, D)).astype(np.float32)
    return eqx.tree_at(lambda s: (s.b_enc, s.b_dec), saes, (jnp.asarray(b_enc), jnp.asarray(b_dec)))


def make_preprocess() -> data.Preprocess:
    rng = np.random.default_rng(1)
    return data.Preprocess(clamp=3.0, act_mean=rng.normal(0, 0.2, D).astype(np.float32), scalar=1.7)


def reference(saes: sae_lib.SAE, pre: data.Preprocess, x_ND: np.ndarray) -> list[dict[str, object]]:
    """SPEC 4 written plainly in NumPy, float64, one SAE at a time."""
    x = (np.clip(x_ND.astype(np.float64), -3.0, 3.0) - np.asarray(pre.act_mean, np.float64)) / float(pre.scalar)
    out = []
    for m in range(M):
        W_enc, b_enc, W_dec, b_dec = (np.asarray(getattr(saes, n)[m], np.float64) for n in sae_lib.TENSOR_NAMES)
        f = np.maximum((x - b_dec) @ W_enc + b_enc, 0)
        x_hat = f @ W_dec + b_dec
        fired = f > 0
        freqs = fired.mean(0)
        with np.errstate(invalid="ignore"):
            mean_values = f.sum(0) / fired.sum(0)
        fvu = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        cos = np.array([a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(x, x_hat)])
        out.append(dict(
            fvu=fvu, explained_variance=1 - fvu, rel_bias=(x_hat**2).sum(1).mean() / (x * x_hat).sum(1).mean(),
            cos_sim=cos.mean(), dec_redundancy=reference_redundancy(W_dec),
            l0=fired.sum(1).mean(), l1=f.sum(1).mean(), mse=((x_hat - x) ** 2).mean(),
            freqs=freqs, mean_values=mean_values,
            n_dead=int((freqs == 0).sum()), n_almost_dead=int((freqs < ALMOST_DEAD).sum()), n_dense=int((freqs > DENSE).sum()),
        ))  # fmt: skip
    return out


def reference_redundancy(W_dec: np.ndarray) -> float:
    """The fraction of rows whose most similar other row has cosine > 0.9, with the whole Gram matrix (a zero row: cosine 0)."""
    norms = np.linalg.norm(W_dec, axis=1, keepdims=True)
    unit = W_dec / np.where(norms > 0, norms, 1)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(sims.max(1) > 0.9))


def padded_batches(x_ND: np.ndarray, batch_size: int, pad_value: float):
    """Batches of `batch_size` rows, the last padded with `pad_value` (anything: it must be masked)."""
    for start in range(0, len(x_ND), batch_size):
        x = x_ND[start : start + batch_size]
        pad = np.full((batch_size - len(x), D), pad_value, np.float32)
        yield jnp.asarray(np.concatenate([x, pad])), len(x)


def check_against_reference(results: list[evaluation.EvalMetrics], ref: list[dict[str, object]]) -> None:
    assert len(results) == M
    for r, e in zip(results, ref):
        np.testing.assert_allclose(r.freqs, e["freqs"], rtol=0, atol=1e-7)
        np.testing.assert_array_equal(np.isnan(r.mean_values), np.isnan(e["mean_values"]))
        np.testing.assert_allclose(r.mean_values, e["mean_values"], rtol=1e-4)
        np.testing.assert_allclose([r.l0, r.l1, r.mse], [e["l0"], e["l1"], e["mse"]], rtol=1e-4)
        for key in ("fvu", "explained_variance", "rel_bias", "cos_sim", "dec_redundancy"):
            np.testing.assert_allclose(getattr(r, key), e[key], rtol=1e-5, atol=1e-7, err_msg=key)
        assert (r.n_dead, r.n_almost_dead, r.n_dense) == (e["n_dead"], e["n_almost_dead"], e["n_dense"])
        assert (r.almost_dead_threshold, r.dense_threshold) == (ALMOST_DEAD, DENSE)
        assert math.isfinite(r.quality)


@pytest.mark.parametrize("pad_value", [0.0, 1e3])
def test_evaluate_batches_matches_numpy_with_padded_last_batch(pad_value):
    rng = np.random.default_rng(2)
    x_ND = (rng.normal(size=(37, D)) * 2 + 0.5).astype(np.float32)  # 37 = 2 * 16 + 5: the last batch is padded.
    saes, pre = make_saes(), make_preprocess()
    results = evaluation.evaluate_batches(
        saes, padded_batches(x_ND, 16, pad_value), pre, almost_dead_threshold=ALMOST_DEAD, dense_threshold=DENSE
    )
    ref = reference(saes, pre, x_ND)
    check_against_reference(results, ref)
    # The constructed cases are present, so the threshold counts are exercised.
    assert all(np.isnan(r.mean_values[0]) and r.freqs[0] == 0 and r.freqs[1] == 1 for r in results)
    assert all(r.n_dead >= 1 and r.n_dense >= 1 for r in results)


def test_dec_redundancy_counts_near_duplicates_in_blocks(monkeypatch):
    """Constructed: rows 0-2 near-duplicates, row 3 at cosine 0.85 of row 4, a zero row; the same in blocks of 3 rows."""
    rng = np.random.default_rng(7)
    W = rng.normal(size=(2, 11, D)).astype(np.float32)
    W[0, 1] = W[0, 0] * 2 + 0.01 * rng.normal(size=D)
    W[0, 2] = W[0, 0] * 0.5 + 0.01 * rng.normal(size=D)
    u, v = np.eye(D)[0], np.eye(D)[1]
    W[0, 3], W[0, 4] = u, 0.85 * u + np.sqrt(1 - 0.85**2) * v
    W[0, 5] = 0.0
    W[0, 6:] = np.eye(D)[2:7] * 3  # orthogonal to everything else above
    whole = np.asarray(evaluation.dec_redundancy(jnp.asarray(W)))
    assert whole[0] == pytest.approx(3 / 11) and reference_redundancy(np.float64(W[0])) == pytest.approx(3 / 11)
    assert whole[1] == pytest.approx(reference_redundancy(np.float64(W[1])))
    monkeypatch.setattr(evaluation, "REDUNDANCY_BLOCK_BYTES", 4 * 11 * 3)  # 3 rows per block
    evaluation.dec_redundancy.clear_cache()
    np.testing.assert_array_equal(np.asarray(evaluation.dec_redundancy(jnp.asarray(W))), whole)
    evaluation.dec_redundancy.clear_cache()


def test_quality_stride_changes_only_quality():
    rng = np.random.default_rng(4)
    x_ND = rng.normal(size=(64, D)).astype(np.float32)
    saes, pre = make_saes(), make_preprocess()
    every = evaluation.accumulate(saes, padded_batches(x_ND, 16, 0.0), pre)
    strided = evaluation.accumulate(saes, padded_batches(x_ND, 16, 0.0), pre, quality_stride=2)
    assert (every.code_n, strided.code_n) == (64, 32)
    np.testing.assert_array_equal(every.n_fired, strided.n_fired)
    np.testing.assert_array_equal(every.sq_err, strided.sq_err)
    # Level 0 of the code is the SAE as it is: its counts are the fire counts.
    np.testing.assert_array_equal(every.code_n_fired[:, 0], every.n_fired)
    np.testing.assert_allclose(every.code_sq_err[:, 0], every.sq_err, rtol=1e-5)


def reference_code_sums(saes: sae_lib.SAE, pre: data.Preprocess, x_ND: np.ndarray, batch_size: int, stride: int):
    """The code sums of the sampled rows, plainly in NumPy float64: the rows evaluate samples are
    o, o + stride, ... of each batch, o drawn per batch from default_rng(0) (as `accumulate` documents)."""
    offsets = np.random.default_rng(0)
    rows = []
    for start in range(0, len(x_ND), batch_size):
        o = int(offsets.integers(stride))
        rows += [start + r for r in range(o, batch_size, stride) if start + r < len(x_ND)]
    x = (np.clip(x_ND[rows].astype(np.float64), -3.0, 3.0) - np.asarray(pre.act_mean, np.float64)) / float(pre.scalar)
    rms = np.sqrt((x**2).mean(1, keepdims=True))
    n_fired, values, code = [], [], []
    for m in range(M):
        W_enc, b_enc, W_dec, b_dec = (np.asarray(getattr(saes, n)[m], np.float64) for n in sae_lib.TENSOR_NAMES)
        f = np.maximum((x - b_dec) @ W_enc + b_enc, 0)
        norms = np.linalg.norm(W_dec, axis=1)
        per_level = []
        for c in quality_lib.PRUNE_LEVELS:
            sent = f * norms > c * rms
            z, u = np.where(sent, f, 0) @ W_dec, sent @ W_dec
            e = x - b_dec - z
            per_level.append(
                (
                    sent.sum(0),
                    np.where(sent, f, 0).sum(0),
                    [(e * e).sum(), (z * z).sum(), (z * u).sum(), (u * u).sum(), (e * z).sum(), (e * u).sum()],
                )
            )
        n_fired.append([p[0] for p in per_level])
        values.append([p[1] for p in per_level])
        code.append([p[2] for p in per_level])
    return len(rows), np.array(n_fired), np.array(values), np.array(code)


@pytest.mark.parametrize("stride", [1, 4])
def test_code_sums_match_numpy_on_the_sampled_rows(stride):
    rng = np.random.default_rng(5)
    x_ND = (rng.normal(size=(70, D)) * 2 + 0.5).astype(np.float32)
    saes, pre = make_saes(), make_preprocess()
    stats = evaluation.accumulate(saes, padded_batches(x_ND, 16, 1e3), pre, quality_stride=stride)
    n_code, n_fired, values, code = reference_code_sums(saes, pre, x_ND, 16, stride)
    assert stats.code_n == n_code and (stride > 1) == (n_code < 70)
    np.testing.assert_array_equal(stats.code_n_fired, n_fired)
    np.testing.assert_allclose(stats.code_values, values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.code_blocks.sum(0), code, rtol=1e-4, atol=1e-4)
    assert len(stats.code_block_n) == 5  # one block per batch at this size


def test_chunks_and_flushes_change_nothing(monkeypatch):
    """Chunks of the stack and host flushes are bookkeeping: the same sums either way; counts are int64 on the host."""
    rng = np.random.default_rng(6)
    x_ND = rng.normal(size=(100, D)).astype(np.float32)
    saes, pre = make_saes(), make_preprocess()
    whole = evaluation.accumulate(saes, padded_batches(x_ND, 16, 0.0), pre, quality_stride=2)
    assert whole.n_fired.dtype == np.int64 and whole.code_n_fired.dtype == np.int64
    monkeypatch.setattr(evaluation, "FLUSH_BATCHES", 1)
    for chunk in (1, 2):
        other = evaluation.accumulate(saes, padded_batches(x_ND, 16, 0.0), pre, quality_stride=2, chunk=chunk)
        for f in dataclasses.fields(whole):
            np.testing.assert_allclose(
                getattr(other, f.name), getattr(whole, f.name), rtol=1e-5, atol=1e-5, err_msg=f.name
            )
    results = evaluation.metrics_from_stats(other)
    assert [r.quality for r in results] == pytest.approx(
        [r.quality for r in evaluation.metrics_from_stats(whole)], rel=1e-4
    )


def test_sampled_quality_reports_its_error():
    """Every example sampled: exact, error 0. One in four: an error estimate, and the estimate within a few of it."""
    rng = np.random.default_rng(7)
    x_ND = (rng.normal(size=(1024, D)) * 2 + 0.5).astype(np.float32)
    saes, pre = make_saes(), make_preprocess()
    exact = evaluation.evaluate_batches(saes, padded_batches(x_ND, 32, 0.0), pre)
    sampled = evaluation.evaluate_batches(saes, padded_batches(x_ND, 32, 0.0), pre, quality_stride=4)
    for e, s in zip(exact, sampled):
        assert e.quality_stderr == 0.0 and 0 < s.quality_stderr < 0.2 * abs(e.quality)
        assert abs(s.quality - e.quality) < 4 * s.quality_stderr
        assert (s.mse, s.l0, s.l1) == (e.mse, e.l0, e.l1)  # the plain statistics stay exact
        np.testing.assert_array_equal(s.freqs, e.freqs)
    assert evaluation.quality_stride(10**6, 1024) == evaluation.QUALITY_MAX_STRIDE
    assert evaluation.quality_stride(10**6, 16) == 16
    assert evaluation.quality_stride(evaluation.QUALITY_EXAMPLES, 1024) == 1


def test_tensorfloat32_is_float32_on_a_cpu():
    """The `tensorfloat32` precision only lets a GPU use TF32: on a CPU its evaluation is float32's."""
    rng = np.random.default_rng(8)
    x_ND = rng.normal(size=(32, D)).astype(np.float32)
    saes, pre = make_saes(), make_preprocess()
    fresh = sae_lib.make_saes(
        [config.SparseAutoencoder(d_vit=D, exp_factor=EXP, seed=s) for s in range(M)], "tensorfloat32"
    )
    names = sae_lib.TENSOR_NAMES
    tf32 = eqx.tree_at(lambda s: tuple(getattr(s, n) for n in names), fresh, tuple(getattr(saes, n) for n in names))
    assert tf32.precision == "tensorfloat32"
    a = evaluation.accumulate(saes, padded_batches(x_ND, 16, 0.0), pre)
    b = evaluation.accumulate(tf32, padded_batches(x_ND, 16, 0.0), pre)
    np.testing.assert_allclose(b.sq_err, a.sq_err, rtol=1e-6)
    np.testing.assert_array_equal(b.n_fired, a.n_fired)


def test_evaluate_reads_shards_in_one_pass(tmp_path):
    """The public evaluate(): synthetic shards through Activations and the fast loader, last batch padded."""
    synthetic.write_shards(
        tmp_path,
        synthetic.Synthetic(d_vit=D, n_features=16, k=2, n_imgs=5, n_patches_per_img=7, n_patches_per_shard=64),
    )
    data_cfg = config.DataLoad(
        shard_root=str(tmp_path), patches="patches", layer=-2, scale_mean=False, scale_norm=False, clamp=3.0
    )
    acts = data.Activations(data_cfg)
    assert len(acts) % 16 != 0
    cfg = config.Train(
        data=data_cfg, sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP), sae_batch_size=16, n_workers=2
    )
    saes, pre = make_saes(), make_preprocess()
    results = evaluation.evaluate([cfg] * M, saes, acts, pre, almost_dead_threshold=ALMOST_DEAD, dense_threshold=DENSE)
    check_against_reference(results, reference(saes, pre, acts.read(np.arange(len(acts)))))


def make_metrics(**kw) -> evaluation.EvalMetrics:
    freqs = np.array([0.0, 1e-8, 0.2, 0.9], np.float32)
    fields = dict(
        l0=1.1, l1=2.5, mse=0.3, n_dead=1, n_almost_dead=2, n_dense=2, freqs=freqs,
        mean_values=np.array([np.nan, 0.5, 1.0, 2.0], np.float32), almost_dead_threshold=1e-7, dense_threshold=1e-2, quality=3.5, quality_stderr=0.25,
        fvu=0.25, explained_variance=0.75, rel_bias=0.9, cos_sim=0.8, dec_redundancy=0.0,
    )  # fmt: skip
    return evaluation.EvalMetrics(**(fields | kw))


def test_for_wandb_keys_and_tables():
    metrics = make_metrics()
    logged = metrics.for_wandb()
    assert set(logged) == {f"eval/{f.name}" for f in dataclasses.fields(evaluation.EvalMetrics)}
    assert "eval/quality" in logged and logged["eval/quality"] == 3.5
    assert (logged["eval/fvu"], logged["eval/explained_variance"], logged["eval/cos_sim"]) == (0.25, 0.75, 0.8)
    # With the SAE's config: its kind, width and its kind's own sparsity setting, no other kind's.
    for sae_cfg, setting in (
        (config.SparseAutoencoder(d_vit=D, exp_factor=EXP, kind="topk", k=7), ("eval/k", 7)),
        (
            config.SparseAutoencoder(d_vit=D, exp_factor=EXP, kind="jumprelu", l0_coefficient=0.3),
            ("eval/l0_coefficient", 0.3),
        ),
        (config.SparseAutoencoder(d_vit=D, exp_factor=EXP, sparsity_coeff=1e-3), ("eval/sparsity_coeff", 1e-3)),
    ):
        named = metrics.for_wandb(sae_cfg)
        assert set(named) - set(logged) == {"eval/kind", "eval/d_sae", setting[0]}
        assert (named["eval/kind"], named["eval/d_sae"], named[setting[0]]) == (sae_cfg.kind, S, setting[1])
    for key, column in (("eval/freqs", "freq"), ("eval/mean_values", "mean_value")):
        table = logged[key]
        assert isinstance(table, wandb.Table) and table.columns == [column] and len(table.data) == 4
    scalars = metrics.to_json()
    assert "freqs" not in scalars and json.loads(json.dumps(scalars)) == scalars


def test_plots_write_pngs(tmp_path):
    cfgs = [config.Train(lr=lr, sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP)) for lr in (1e-3, 1e-2)]
    rng = np.random.default_rng(0)
    metrics = [
        make_metrics(
            freqs=rng.uniform(0, 0.1, S).astype(np.float32), mean_values=rng.uniform(0.1, 2, S).astype(np.float32)
        ),
        make_metrics(freqs=np.zeros(S, np.float32), mean_values=np.full(S, np.nan, np.float32), n_dead=S),  # all dead
    ]
    paths = plots.save_plots(tmp_path, ["run-a", "run-b"], cfgs, metrics)
    assert paths.per_sae == [tmp_path / "run-a" / plots.SAE_FNAME, tmp_path / "run-b" / plots.SAE_FNAME]
    for fpath in [*paths.per_sae, paths.group]:
        assert fpath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fpath.stat().st_size > 10_000
    logged = plots.wandb_images(paths)
    assert len(logged) == 2 and all(isinstance(v, wandb.Image) for d in logged for v in d.values())


def test_summary_table_csv_and_cli(tmp_path, capsys):
    cfgs = [
        config.Train(lr=1e-3, sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP, sparsity_coeff=0.01)),
        config.Train(lr=4e-3, sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP, sparsity_coeff=0.1)),
    ]
    metrics = [make_metrics(quality=-1.0, mse=0.25), make_metrics(quality=7.0, l0=3.0)]
    entries = [(f"run{i}", c, m) for i, (c, m) in enumerate(zip(cfgs, metrics))]
    out = io.StringIO()
    fpath = summary.write_summary(tmp_path, entries, file=out)
    table = out.getvalue().splitlines()
    assert table[0].split() == list(summary.TABLE_COLUMNS)
    assert table[2].split()[:2] == ["run0", "0.01"] and table[3].startswith("* run1")
    with open(fpath) as fd:
        rows = list(csv.DictReader(fd))
    assert [r["run_id"] for r in rows] == ["run0", "run1"]
    assert float(rows[0]["mse"]) == 0.25 and float(rows[1]["quality"]) == 7.0 and float(rows[1]["lr"]) == 4e-3
    assert int(rows[0]["n_dead"]) == 1 and int(rows[1]["d_sae"]) == S

    # The CLI rebuilds the same CSV from checkpoint directories.
    for run_id, cfg, m in entries:
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "cfg.json").write_text(json.dumps(config.to_dict(cfg)))
        (tmp_path / run_id / "metrics.json").write_text(json.dumps(m.to_json()))
    csv_before = fpath.read_text()
    fpath.unlink()
    assert summary.main([str(tmp_path)]) == 0
    assert fpath.read_text() == csv_before
    assert "run1" in capsys.readouterr().out
    assert summary.main([str(tmp_path / "missing")]) == 2
    # The end-of-sweep call: only the given runs present there, in the given order.
    fpath.unlink()
    assert summary.summarize(tmp_path, ["run1", "elsewhere", "run0"], file=io.StringIO()) == fpath
    with open(fpath) as fd:
        assert [r["run_id"] for r in csv.DictReader(fd)] == ["run1", "run0"]
    assert summary.summarize(tmp_path, ["elsewhere"]) is None
