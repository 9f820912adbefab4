import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import config, optim
from saev_jax import sae as sae_lib

from . import reference

D, S, B = 8, 32, 16


def random_params(rng) -> dict[str, np.ndarray]:
    return {
        "W_enc": rng.normal(size=(D, S)).astype(np.float32) / np.sqrt(D),
        "b_enc": rng.normal(size=S).astype(np.float32) * 0.1,
        "W_dec": rng.normal(size=(S, D)).astype(np.float32) / np.sqrt(S),
        "b_dec": rng.normal(size=D).astype(np.float32) * 0.1,
    }


def to_sae(params) -> sae_lib.SAE:
    sae = sae_lib.SAE(D, S, key=jax.random.key(0))
    names = sae_lib.TENSOR_NAMES
    return eqx.tree_at(lambda s: tuple(getattr(s, n) for n in names), sae, tuple(jnp.asarray(params[n]) for n in names))


def test_init_shapes_and_bounds():
    sae = sae_lib.SAE(D, S, key=jax.random.key(1))
    assert sae.W_enc.shape == (D, S) and sae.W_dec.shape == (S, D)
    assert sae.b_enc.shape == (S,) and sae.b_dec.shape == (D,)
    assert np.all(sae.b_enc == 0) and np.all(sae.b_dec == 0)
    for W, n in ((sae.W_enc, S), (sae.W_dec, D)):
        bound = reference.kaiming_bound(n)
        assert np.abs(W).max() <= bound
        # Uniform on [-bound, bound]: it fills the range.
        assert np.abs(W).max() > 0.9 * bound and abs(float(W.mean())) < 0.1 * bound


def test_make_saes_stacks_per_seed():
    cfgs = [config.SparseAutoencoder(d_vit=D, exp_factor=S // D, seed=s) for s in (0, 1, 0)]
    saes = sae_lib.make_saes(cfgs)
    assert saes.W_enc.shape == (3, D, S)
    np.testing.assert_array_equal(saes.W_enc[0], saes.W_enc[2])
    assert not np.array_equal(saes.W_enc[0], saes.W_enc[1])
    alone = sae_lib.SAE(D, S, key=jax.random.key(1))
    np.testing.assert_array_equal(saes.W_dec[1], alone.W_dec)


def test_forward_loss_and_grads_match_reference():
    rng = np.random.default_rng(0)
    params = random_params(rng)
    x = rng.normal(size=(B, D)).astype(np.float32) * 3
    coeff = 0.05
    sae = to_sae(params)
    (total, terms), grads = eqx.filter_value_and_grad(sae_lib.loss, has_aux=True)(
        sae, jnp.asarray(x), jnp.float32(coeff)
    )
    ref_terms, ref_grads = reference.loss_and_grads(
        {k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64), coeff
    )
    for key, value in ref_terms.items():
        np.testing.assert_allclose(terms[key], value, rtol=1e-5, err_msg=key)
    for name in sae_lib.TENSOR_NAMES:
        np.testing.assert_allclose(getattr(grads, name), ref_grads[name], rtol=1e-5, atol=1e-7, err_msg=name)
    _, _, x_hat = reference.forward(params, x)
    np.testing.assert_allclose(jax.vmap(sae)(jnp.asarray(x))[0], x_hat, rtol=1e-5, atol=1e-6)


def test_safe_mse_survives_huge_values():
    # One entry's square (9e38) overflows float32; the mean over 32 entries (2.8e37) does not.
    x = np.zeros((4, D), np.float32)
    x[1, 2] = 3e19
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.mean(x**2))
    mse = sae_lib.safe_mse(jnp.zeros_like(x), jnp.asarray(x))
    np.testing.assert_allclose(mse, (3e19) ** 2 / x.size, rtol=1e-6)


def test_normalize_w_dec():
    sae = sae_lib.SAE(D, S, key=jax.random.key(2)).normalize_w_dec()
    np.testing.assert_allclose(jnp.linalg.norm(sae.W_dec, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("enabled", [True, False])
def test_remove_parallel_grads_makes_rows_orthogonal(enabled):
    rng = np.random.default_rng(3)
    sae = to_sae(random_params(rng))  # Rows deliberately not of unit norm.
    grads = to_sae(random_params(rng))
    out, _ = optim.remove_parallel_grads(jnp.asarray(enabled)).update(grads, optax_empty(), sae)
    dots = np.sum(np.asarray(out.W_dec, np.float64) * np.asarray(sae.W_dec, np.float64), axis=1)
    if enabled:
        norms = np.linalg.norm(out.W_dec, axis=1) * np.linalg.norm(sae.W_dec, axis=1)
        assert np.all(np.abs(dots) <= 1e-6 * norms)
    else:
        np.testing.assert_array_equal(out.W_dec, grads.W_dec)
    np.testing.assert_array_equal(out.W_enc, grads.W_enc)


def optax_empty():
    import optax

    return optax.EmptyState()


@pytest.mark.parametrize("n", [0, 1, 10])
def test_warmup_schedule(n):
    peak = 3e-4
    schedule = optim.warmup(jnp.float32(peak), jnp.int32(n))
    for t in (0, 1, n - 1, n, n + 5):
        if t >= 0:
            np.testing.assert_allclose(schedule(jnp.int32(t)), reference.warmup(peak, n, t), rtol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    sae = sae_lib.SAE(D, S, key=jax.random.key(4))
    cfg = config.Train(sae=config.SparseAutoencoder(d_vit=D, exp_factor=S // D))
    sae_lib.save(sae, tmp_path / "run", cfg, {"mse": 0.5})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["cfg.json", "metrics.json", "sae.safetensors"]
    loaded = sae_lib.load(tmp_path / "run").sae
    for name in sae_lib.TENSOR_NAMES:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(sae, name))
        assert getattr(loaded, name).dtype == jnp.float32
    assert sae_lib.load_cfg(tmp_path / "run") == cfg
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]  # No temporary directory left behind.
    with pytest.raises(FileExistsError):
        sae_lib.save(sae, tmp_path / "run", cfg, {})
    with pytest.raises(config.InputError, match="nope"):
        sae_lib.load(tmp_path / "nope")
