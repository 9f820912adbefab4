"""SPEC 11's optimiser defaults: gradient clipping per SAE, the new kinds' learning-rate rule and decay; ReLU as saev."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import config, optim


def tree(rng, scale):
    return {
        "a": jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=5) * scale, jnp.float32),
    }


@pytest.mark.parametrize(("scale", "max_norm"), [(10.0, 1.0), (0.01, 1.0), (10.0, 0.0)])
def test_clip_by_global_norm_matches_numpy(scale, max_norm):
    g = tree(np.random.default_rng(0), scale)
    out, _ = optim.clip_by_global_norm(jnp.float32(max_norm)).update(g, None)
    norm = math.sqrt(sum(float(np.sum(np.float64(v) ** 2)) for v in g.values()))
    factor = max_norm / norm if 0 < max_norm < norm else 1.0
    for k in g:
        np.testing.assert_allclose(out[k], np.float64(g[k]) * factor, rtol=1e-6)
        if factor == 1.0:
            np.testing.assert_array_equal(out[k], g[k])  # untouched, bit for bit
    if factor != 1.0:
        assert math.sqrt(sum(float(np.sum(np.float64(v) ** 2)) for v in out.values())) == pytest.approx(
            max_norm, rel=1e-6
        )


def test_clipping_is_per_sae_in_one_vmapped_update():
    """Two SAEs, one clipped at 1.0 and one not (0): as each alone."""
    rng = np.random.default_rng(1)
    g1, g2 = tree(rng, 10.0), tree(rng, 10.0)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), g1, g2)
    both = jax.vmap(lambda g, m: optim.clip_by_global_norm(m).update(g, None)[0])(stacked, jnp.array([1.0, 0.0]))
    alone = [optim.clip_by_global_norm(jnp.float32(m)).update(g, None)[0] for g, m in ((g1, 1.0), (g2, 0.0))]
    for k in g1:
        np.testing.assert_allclose(both[k][0], alone[0][k], rtol=1e-6)
        np.testing.assert_array_equal(both[k][1], alone[1][k])


def test_relu_keeps_saevs_defaults_and_new_kinds_get_spec_11s():
    relu = config.Train(sae=config.SparseAutoencoder(d_vit=1024, exp_factor=16))
    assert (relu.lr, relu.lr_schedule, relu.max_grad_norm) == (4e-4, "constant", 0.0)
    for kind, exp, lr in (("topk", 16, 2e-4), ("jumprelu", 64, 1e-4), ("matryoshka", 4, 4e-4)):
        cfg = config.Train(sae=config.SparseAutoencoder(d_vit=1024, exp_factor=exp, kind=kind))
        assert cfg.lr == pytest.approx(lr) and cfg.lr == pytest.approx(2e-4 * math.sqrt(2**14 / (1024 * exp)))
        assert (cfg.lr_schedule, cfg.max_grad_norm) == ("linear", 1.0)
    # What the user sets wins, and a round trip through cfg.json keeps it.
    set_ = config.Train(lr=1e-3, lr_schedule="cosine", max_grad_norm=0.5, sae=config.SparseAutoencoder(kind="topk"))
    assert (set_.lr, set_.lr_schedule, set_.max_grad_norm) == (1e-3, "cosine", 0.5)
    assert config.from_dict(config.Train, config.to_dict(set_)) == set_


def test_a_sweep_over_kinds_resolves_each_kinds_defaults():
    cfgs = config.grid(config.Train(), {"sae": {"kind": ["relu", "topk"], "exp_factor": 16, "d_vit": 1024}})
    assert [(c.sae.kind, c.lr, c.lr_schedule, c.max_grad_norm) for c in cfgs] == [
        ("relu", 4e-4, "constant", 0.0),
        ("topk", 2e-4, "linear", 1.0),
    ]
    cfgs = config.grid(config.Train(lr=1e-3), {"sae": {"kind": ["relu", "topk"]}})
    assert [c.lr for c in cfgs] == [1e-3, 1e-3]
    # As the CLI passes it: a base rebuilt with dataclasses.replace.
    base = dataclasses.replace(config.Train(), seed=7)
    cfgs = config.grid(base, {"sae": {"kind": ["relu", "topk"], "exp_factor": 16, "d_vit": 1024}})
    assert [(c.lr, c.lr_schedule, c.max_grad_norm) for c in cfgs] == [(4e-4, "constant", 0.0), (2e-4, "linear", 1.0)]
    with pytest.raises(config.InputError, match="max_grad_norm = -1.0"):
        config.validate(config.Train(max_grad_norm=-1.0))


@pytest.mark.slow
def test_the_optimizer_clips_before_adam():
    """A huge gradient reaches Adam's first moment clipped to norm 1.0; with 0 (ReLU's default) as it is."""
    from saev_jax import sae as sae_lib

    params = sae_lib.SAE(2, 3, key=jax.random.key(0))
    g = jax.tree.map(lambda a: jnp.full_like(a, 100.0), params)
    norm = math.sqrt(sum(a.size for a in jax.tree.leaves(g))) * 100.0
    for max_norm, expected in ((1.0, 100.0 / norm), (0.0, 100.0)):
        opt = optim.make_optimizer(lambda t: 1e-3, jnp.bool_(False), jnp.float32(max_norm))
        _, state = jax.jit(opt.update)(g, opt.init(params), params)
        np.testing.assert_allclose(state[2][0].mu.b_enc, 0.1 * expected, rtol=1e-6)
