"""The jitted, vmapped train step against a plain NumPy reference, and stacking."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import config, data, plan, step, training
from saev_jax import sae as sae_lib

from . import reference

D, EXP, B = 8, 4, 16
S = D * EXP


def make_cfgs() -> list[config.Train]:
    """Three configs of one group that differ in everything that may differ inside a group."""
    base = config.Train(sae_batch_size=B, sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP))
    variants = [
        dict(lr=1e-2, n_lr_warmup=3, n_sparsity_warmup=0, sae=dict(sparsity_coeff=1e-2, seed=1)),
        dict(lr=3e-3, n_lr_warmup=0, n_sparsity_warmup=4, sae=dict(sparsity_coeff=5e-2, seed=2, normalize_w_dec=False)),
        dict(
            lr=2e-2,
            n_lr_warmup=5,
            n_sparsity_warmup=2,
            sae=dict(sparsity_coeff=0.0, seed=3, remove_parallel_grads=False),
        ),
    ]
    cfgs = []
    for v in variants:
        sae = dataclasses.replace(base.sae, **v.pop("sae"))
        cfgs.append(dataclasses.replace(base, sae=sae, **v))
    config.check_groupable(cfgs)
    return cfgs


def identity_preprocess() -> data.Preprocess:
    return data.Preprocess(clamp=1e5, act_mean=jnp.zeros(D), scalar=jnp.float32(1.0))


def batches(k: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Non-centred data, so b_dec and the encoder bias matter.
    return [(rng.normal(size=(B, D)) * 2 + 1).astype(np.float32) for _ in range(k)]


def run_steps(cfgs, xs, *, chunk=None):
    """Trains `cfgs` as one stack on one device; returns (the stack, per-step metrics)."""
    mesh = plan.make_mesh(jax.devices()[:1])
    stacked = jax.sharding.NamedSharding(mesh, jax.P(step.SAE_AXIS))
    hparams = jax.device_put(step.Hparams.from_cfgs(cfgs), stacked)
    state = step.make_group_state((step.make_stack(sae_lib.make_saes([c.sae for c in cfgs]), hparams),))
    state = jax.device_put(state, step.group_state_sharding(state, mesh))
    history = []
    for x in xs:
        state, (metrics,) = step.train_step(
            state, (hparams,), identity_preprocess(), jnp.asarray(x), chunks=(chunk or len(cfgs),), mesh=mesh
        )
        history.append(jax.device_get(metrics))
    assert int(state.step) == len(xs)
    return state.stacks[0], history


def test_step_matches_numpy_reference():
    cfgs, xs = make_cfgs(), batches(8)
    init = sae_lib.make_saes([c.sae for c in cfgs])
    state, history = run_steps(cfgs, xs)
    for m, cfg in enumerate(cfgs):
        params = {name: np.asarray(getattr(init, name)[m]) for name in sae_lib.TENSOR_NAMES}
        ref = reference.SAETrainer(
            params,
            lr=cfg.lr,
            n_lr_warmup=cfg.n_lr_warmup,
            coeff=cfg.sae.sparsity_coeff,
            n_coeff_warmup=cfg.n_sparsity_warmup,
            normalize=cfg.sae.normalize_w_dec,
            remove_parallel=cfg.sae.remove_parallel_grads,
        )
        for t, x in enumerate(xs):
            terms = ref.step(x.astype(np.float64))
            for key, value in terms.items():
                np.testing.assert_allclose(
                    history[t][key][m], value, rtol=2e-5, atol=1e-7, err_msg=f"{key} sae {m} step {t}"
                )
        # 8 Adam steps at lr up to 2e-2 leave float32 within ~1e-6 (about 10 ulp at the
        # parameters' scale of ~0.5) of the float64 reference.
        for name in sae_lib.TENSOR_NAMES:
            np.testing.assert_allclose(
                getattr(state.saes, name)[m], ref.p[name], rtol=1e-5, atol=2e-6, err_msg=f"{name} sae {m}"
            )


def test_stack_equals_each_alone():
    cfgs, xs = make_cfgs(), batches(6, seed=1)
    together, hist_together = run_steps(cfgs, xs)
    for m, cfg in enumerate(cfgs):
        alone, hist_alone = run_steps([cfg], xs)
        for name in sae_lib.TENSOR_NAMES:
            np.testing.assert_allclose(
                getattr(together.saes, name)[m], getattr(alone.saes, name)[0], rtol=1e-6, atol=1e-7, err_msg=name
            )
        for t in range(len(xs)):
            np.testing.assert_allclose(hist_together[t]["loss"][m], hist_alone[t]["loss"][0], rtol=1e-6)


def test_step_compiles_once_per_group():
    step.train_step.clear_cache()
    cfgs = make_cfgs()
    run_steps(cfgs, batches(3))
    # At most two entries: the first step's inputs and the step's own outputs (whose 1-device
    # sharding JAX may canonicalise differently).
    n_compiled = step.train_step._cache_size()
    assert n_compiled <= 2
    # Other hyper-parameter values (same group shape) reuse the compiled step.
    run_steps([dataclasses.replace(c, lr=c.lr * 2, n_lr_warmup=7) for c in cfgs], batches(2))
    assert step.train_step._cache_size() == n_compiled


def test_warmups_reach_lr_and_loss():
    cfg = dataclasses.replace(make_cfgs()[0], lr=1e-2, n_lr_warmup=4, n_sparsity_warmup=4)
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, sparsity_coeff=0.1))
    _, history = run_steps([cfg], batches(6))
    lrs = [float(h["learning_rate"][0]) for h in history]
    coeffs = [float(h["sparsity_coeff"][0]) for h in history]
    np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2], rtol=1e-6)
    np.testing.assert_allclose(coeffs, [0.0, 0.025, 0.05, 0.075, 0.1, 0.1], rtol=1e-6)
    # The sparsity warm-up reaches the loss (saev computed it but never used it).
    assert history[0]["sparsity"][0] == 0.0 and history[0]["loss"][0] == history[0]["mse"][0]
    for h in history[1:]:
        np.testing.assert_allclose(h["sparsity"][0], h["sparsity_coeff"][0] * h["l1"][0], rtol=1e-6)
        np.testing.assert_allclose(h["loss"][0], h["mse"][0] + h["sparsity"][0], rtol=1e-6)


def test_first_update_with_warmup_changes_nothing():
    cfg = make_cfgs()[0]  # n_lr_warmup = 3: zero learning rate at t = 0.
    init = sae_lib.make_saes([cfg.sae])
    state, _ = run_steps([cfg], batches(1))
    np.testing.assert_array_equal(state.saes.W_enc, init.W_enc)


def test_n_train_steps_matches_saev_batch_limiter():
    # saev's BatchLimiter yields until more than n_patches examples were seen.
    for n_patches, batch_size, expected in ((100, 10, 11), (105, 10, 11), (99, 10, 10), (5, 10, 1)):
        cfg = config.Train(n_patches=n_patches, sae_batch_size=batch_size)
        seen, steps = 0, 0
        while True:
            steps += 1
            seen += batch_size
            if seen > n_patches:
                break
        assert training.n_train_steps(cfg) == steps == expected


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def full_disk(sae, dpath, *args, **kwargs):  # Writes part of the temporary directory, then the disk is full.
        tmp = dpath.with_name(f".{dpath.name}.tmp")
        tmp.mkdir(parents=True)
        (tmp / "sae.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.checkpoint, "save", full_disk)
    with pytest.raises(
        config.InputError,
        match=r"ckpt/run1: could not write the checkpoint: No space left on device; .*run the same command again",
    ) as err:
        training.save_checkpoint(None, tmp_path / "ckpt" / "run1", config.Train(), None, {})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt" / ".run1.tmp").exists() and not (tmp_path / "ckpt" / "run1").exists()


def test_the_training_bar_shows_the_best_and_median_live_loss():
    from saev_jax import training

    metrics = [
        {"loss": 3.0, "diverged": False},
        {"loss": 1e30, "diverged": True},
        {"loss": 1.0, "diverged": False},
        {"loss": 2.0, "diverged": False},
    ]
    assert training.loss_postfix(metrics) == {"best_loss": "1", "median_loss": "2"}
    assert training.loss_postfix([{"loss": float("nan"), "diverged": True}]) == {"loss": "all diverged"}
