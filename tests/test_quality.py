"""The quality score (bits per example saved by coding through the SAE) on constructed cases."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import data, evaluation, quality
from saev_jax import sae as sae_lib


def test_binary_and_geometric_entropy():
    np.testing.assert_allclose(quality.binary_entropy(np.array([0.0, 0.5, 1.0, 0.11])), [0, 1, 0, 0.4999], atol=1e-4)
    # A quantised exponential: tends to log2(e * ratio) for large ratios, to 0 for tiny ones, and grows.
    ratios = np.array([1e-3, 0.1, 1.0, 10.0, 1e3])
    h = quality.geometric_entropy(ratios)
    assert h[0] < 1e-3 and np.all(np.diff(h) > 0)
    np.testing.assert_allclose(h[-1], math.log2(math.e * 1e3), atol=1e-3)
    # Against a direct sum over the geometric distribution.
    q = math.exp(-1.0)
    p = (1 - q) * q ** np.arange(200)
    np.testing.assert_allclose(h[2], -(p * np.log2(p)).sum(), rtol=1e-9)


def test_terms_are_the_documented_formula():
    freqs = np.array([0.0, 0.25, 0.5])
    values = np.array([np.nan, 2.0, 3.0])
    bits = quality.description_bits(
        freqs, values, mse=0.01, data_var=1.0, d_vit=4, w_dec_norms=np.array([1.0, 1.0, 0.5])
    )
    assert bits.residual_saved == pytest.approx(2 * math.log2(100))
    assert bits.support == pytest.approx(quality.binary_entropy(0.25) + 1.0)
    delta = math.sqrt(12 * 0.01)
    per = quality.geometric_entropy(np.array([2.0, 1.5]) / delta) + math.log2(math.e) / 2
    assert bits.values == pytest.approx(0.25 * per[0] + 0.5 * per[1])
    assert bits.quality == pytest.approx(bits.residual_saved - bits.support - bits.values)
    assert math.isnan(quality.quality(freqs, values, mse=0.0, data_var=0.0, d_vit=4))  # constant data


def test_statistics_level_ordering():
    """A sparse code that explains the data beats a dense one, a collapsed one and no code at all."""
    d, n_feat, k = 64, 512, 8
    good = quality.quality(np.full(n_feat, k / n_feat), np.full(n_feat, 3.0), mse=0.003, data_var=1.0, d_vit=d)
    # Under-sparse: half the features fire on every example; a bit lower MSE.
    dense = quality.quality(np.full(n_feat, 0.5), np.full(n_feat, 0.3), mse=0.002, data_var=1.0, d_vit=d)
    # Over-sparse: one feature per example, most variance left in the residual.
    collapsed = quality.quality(np.full(n_feat, 1 / n_feat), np.full(n_feat, 3.0), mse=0.8, data_var=1.0, d_vit=d)
    nothing = quality.quality(np.zeros(n_feat), np.full(n_feat, np.nan), mse=1.0, data_var=1.0, d_vit=d)
    assert nothing == 0.0
    assert good > 0 > dense
    assert good > collapsed
    # Dead features cost nothing: adding them changes nothing.
    padded = quality.quality(
        np.r_[np.full(n_feat, k / n_feat), np.zeros(100)],
        np.r_[np.full(n_feat, 3.0), np.full(100, np.nan)],
        0.003,
        1.0,
        d,
    )
    assert padded == pytest.approx(good)


D, N_FEAT, N = 16, 16, 4096


def sparse_data(rng) -> tuple[np.ndarray, np.ndarray]:
    """Examples built from 2 (on average) of 16 orthonormal directions with positive codes, plus noise."""
    truth, _ = np.linalg.qr(rng.normal(size=(D, D)))
    codes = (rng.random((N, N_FEAT)) < 2 / N_FEAT) * rng.lognormal(1.0, 0.3, (N, N_FEAT))
    x = codes @ truth.T + rng.normal(0, 0.05, (N, D))
    return x.astype(np.float32), truth.T.astype(np.float32)  # rows of truth.T are the directions


def sae_from(W_enc, b_enc, W_dec) -> sae_lib.SAE:
    d, s = W_enc.shape
    sae = sae_lib.SAE(d, s, key=jax.random.key(0))
    leaves = tuple(jnp.asarray(a, jnp.float32) for a in (W_enc, b_enc, W_dec, np.zeros(d)))
    return eqx.tree_at(lambda m: (m.W_enc, m.b_enc, m.W_dec, m.b_dec), sae, leaves)


def test_evaluated_quality_ranks_constructed_saes():
    """Through evaluate_batches: the true dictionary beats a dense and a collapsed SAE of the same width."""
    rng = np.random.default_rng(0)
    x_ND, truth_FD = sparse_data(rng)
    S = 2 * N_FEAT
    # True dictionary (and 16 dead spare features).
    perfect = sae_from(
        np.c_[truth_FD.T, np.zeros((D, N_FEAT))],
        np.r_[np.zeros(N_FEAT), np.full(N_FEAT, -1e3)],
        np.r_[truth_FD, truth_FD],
    )
    # Dense: +e_i and -e_i with a large positive bias, so every feature is always on and the
    # reconstruction is exact: (relu(x + c) - relu(-x + c)) / 2 = x.
    eye = np.eye(D)
    dense = sae_from(np.c_[eye, -eye], np.full(S, 100.0), np.r_[eye, -eye] / 2)
    # Collapsed: only the two most used true directions survive.
    keep = np.zeros(S)
    keep[:2] = 1
    collapsed = sae_from(
        np.c_[truth_FD.T, np.zeros((D, N_FEAT))] * keep, np.where(keep > 0, 0.0, -1e3), np.r_[truth_FD, truth_FD]
    )
    stack = jax.tree.map(lambda *leaves: jnp.stack(leaves), perfect, dense, collapsed)
    pre = data.Preprocess(clamp=1e5, act_mean=np.zeros(D, np.float32), scalar=1.0)
    batches = [(jnp.asarray(x_ND[i : i + 1024]), 1024) for i in range(0, N, 1024)]
    good, bad_dense, bad_collapsed = evaluation.evaluate_batches(stack, batches, pre)
    assert bad_dense.mse < good.mse and bad_dense.l0 == S  # The dense SAE reconstructs better ...
    assert bad_collapsed.l0 < good.l0  # ... and the collapsed one is sparser,
    assert good.quality > 0  # but only the true dictionary saves bits,
    assert good.quality > bad_dense.quality and good.quality > bad_collapsed.quality


def test_uniform_shrinkage_is_not_penalised():
    """An L1-style shrinkage of every active value is undone by `debias`: same quality.

    b_enc = -0.2 only keeps noise (std 0.05) from switching features on; -0.7 shrinks values by 0.5 more.
    """

    rng = np.random.default_rng(1)
    x_ND, truth_FD = sparse_data(rng)
    perfect = sae_from(truth_FD.T, np.full(N_FEAT, -0.2), truth_FD)
    shrunk = sae_from(truth_FD.T, np.full(N_FEAT, -0.7), truth_FD)
    stack = jax.tree.map(lambda *leaves: jnp.stack(leaves), perfect, shrunk)
    pre = data.Preprocess(clamp=1e5, act_mean=np.zeros(D, np.float32), scalar=1.0)
    stats = evaluation.accumulate(stack, [(jnp.asarray(x_ND), N)], pre)
    good, bad = evaluation.metrics_from_stats(stats)
    assert bad.mse > 5 * good.mse  # shrinkage dominates the raw error ...
    scale, shift, sq_err = quality.debias(stats.code_sq_err[1, 0], stats.code_gram[1, 0], stats.code_cross[1, 0])
    assert shift == pytest.approx(0.7, abs=0.03) and scale == pytest.approx(1.0, abs=0.02)
    assert bad.l0 == pytest.approx(good.l0, rel=0.01)
    assert sq_err / (N * D) < 1.2 * quality.debias(
        stats.code_sq_err[0, 0], stats.code_gram[0, 0], stats.code_cross[0, 0]
    )[2] / (N * D)  # ... and the shared shift removes it,
    assert bad.quality == pytest.approx(good.quality, abs=1.0)  # so both are the same code, give or take a bit.
    assert evaluation.code_bits(stats, 1)[0].quality == pytest.approx(
        bad.quality, abs=1.0
    )  # level 0: no pruning needed
    # The quality without the correction would have ranked the shrunk SAE far lower.
    no_debias = quality.quality(bad.freqs, bad.mean_values, bad.mse, stats.data_var, D, stats.w_dec_norms[1])
    assert no_debias < bad.quality - 10


def test_debias_solves_least_squares():
    rng = np.random.default_rng(2)
    z, u = rng.normal(size=50), rng.normal(size=50)
    e = 0.3 * z - 0.7 * u + rng.normal(0, 0.01, 50)
    scale, shift, sq_err = quality.debias(e @ e, np.array([z @ z, z @ u, u @ u]), np.array([e @ z, e @ u]))
    coef, res, *_ = np.linalg.lstsq(np.c_[z, u], e, rcond=None)
    assert (scale, shift) == pytest.approx((1 + coef[0], coef[1]))
    assert sq_err == pytest.approx(res[0], rel=1e-6)
    assert quality.debias(1.0, np.zeros(3), np.zeros(2)) == (1.0, 0.0, 1.0)  # every feature dead


def test_pruning_ignores_spurious_small_activations():
    """b_enc = 0 lets noise switch features on weakly; the pruned code is as good as a clean encoder's."""
    rng = np.random.default_rng(3)
    x_ND, truth_FD = sparse_data(rng)
    noisy = sae_from(truth_FD.T, np.zeros(N_FEAT), truth_FD)
    clean = sae_from(truth_FD.T, np.full(N_FEAT, -0.2), truth_FD)
    stack = jax.tree.map(lambda *leaves: jnp.stack(leaves), noisy, clean)
    pre = data.Preprocess(clamp=1e5, act_mean=np.zeros(D, np.float32), scalar=1.0)
    stats = evaluation.accumulate(stack, [(jnp.asarray(x_ND), N)], pre)
    m_noisy, m_clean = evaluation.metrics_from_stats(stats)
    assert m_noisy.l0 > 3 * m_clean.l0
    as_is = evaluation.code_bits(stats, 0)[0].quality
    assert as_is < m_clean.quality - 10  # As it is, the noisy code is much worse; pruned on the
    # coarse doubling grid of levels, it closes most of the gap and never beats the clean code.
    assert as_is + 0.75 * (m_clean.quality - as_is) < m_noisy.quality <= m_clean.quality
