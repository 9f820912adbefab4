"""Issue 19: the L0 controller (against a plain NumPy loop, and in the train step), its config
checks, and successive halving's choice on hand-built rungs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import config, kinds, plan, steer, step, train, training

D = 8


# The controller alone --------------------------------------------------------------------


def numpy_controller(l0s, target, on, start, gain, max_change, decay, lr, n_lr_warmup, min_bound=steer.MIN_BOUND):
    """The update of steer.py's docstring, one SAE, a constant learning rate after a linear warm-up."""
    log_scale, ema, weight = 0.0, 0.0, 0.0
    out = []
    for t, l0 in enumerate(l0s):
        ema = decay * ema + (1 - decay) * math.log(1 + l0)
        weight = decay * weight + (1 - decay)
        error = ema / weight - math.log(1 + target)
        lr_t = lr * min(t / n_lr_warmup, 1.0) if n_lr_warmup > 0 else lr
        bound = max(max_change * lr_t, min_bound)
        change = max(-bound, min(bound, gain * lr_t * error))
        if on and t >= start:
            log_scale += change
        out.append(log_scale)
    return np.array(out)


def controller_hparams(target, on, start, lr, n_lr_warmup, gain=2.5, max_change=2.5, decay=0.9):
    cfgs = [
        config.Train(lr=lr_i, n_lr_warmup=w, n_sparsity_warmup=s, sae=config.SparseAutoencoder(d_vit=D, target_l0=t if o else None))
        for t, o, s, lr_i, w in zip(target, on, start, lr, n_lr_warmup)
    ]  # fmt: skip
    hp = steer.Hparams.from_cfgs(cfgs)
    n = len(cfgs)
    return dataclasses.replace(
        hp, gain=jnp.full(n, gain), max_change=jnp.full(n, max_change), ema_decay=jnp.full(n, decay)
    )


def test_update_matches_numpy_reference():
    # Five SAEs: off; on from step 0; on after a sparsity warm-up of 5 with an lr warm-up; a large
    # error that the per-step bound clips; the same at a learning rate whose bound is the floor.
    # Random L0s that straddle every target.
    target, on, start = [16.0, 16.0, 4.0, 2.0, 2.0], [False, True, True, True, True], [0, 0, 5, 0, 0]
    lr, n_lr_warmup = [0.01, 0.02, 0.05, 0.01, 0.001], [0, 0, 8, 0, 0]
    gain, max_change, decay = 3.0, 2.0, 0.8
    hp = controller_hparams(target, on, start, lr, n_lr_warmup, gain, max_change, decay)
    rng = np.random.default_rng(0)
    l0s = rng.uniform(0, 60, size=(30, 5)).astype(np.float32)
    l0s[:, 3:] = 500.0  # log(501 / 3) * 3 = 15 >> max_change: every change is the bound
    update = jax.jit(jax.vmap(steer.update, in_axes=(0, 0, 0, None)))
    state = jax.vmap(lambda _: steer.init_controller())(jnp.arange(5))
    got = []
    for t in range(len(l0s)):
        state = update(state, hp, jnp.asarray(l0s[t]), jnp.int32(t))
        got.append(np.asarray(state.log_scale))
    got = np.array(got)
    for m in range(5):
        want = numpy_controller(l0s[:, m], target[m], on[m], start[m], gain, max_change, decay, lr[m], n_lr_warmup[m])
        np.testing.assert_allclose(got[:, m], want, rtol=1e-5, atol=1e-7, err_msg=f"SAE {m}")
    assert np.all(got[:, 0] == 0) and np.all(got[:5, 2] == 0) and got[-1, 2] != 0
    np.testing.assert_allclose(np.diff(got[:, 3]), max_change * lr[3], rtol=1e-5)
    np.testing.assert_allclose(np.diff(got[:, 4]), steer.MIN_BOUND, rtol=1e-5)  # 2.0 * 0.001 < MIN_BOUND
    # The smoothed L0 is the debiased EMA of log(1 + L0), back in L0 units.
    ema = 0.0
    for t in range(len(l0s)):
        ema = decay * ema + (1 - decay) * math.log(1 + l0s[t, 1])
    np.testing.assert_allclose(steer.smoothed_l0(state)[1], math.expm1(ema / (1 - decay ** len(l0s))), rtol=1e-5)


def test_coefficient_without_target_is_the_configured_one_bit_for_bit():
    hp = controller_hparams([0.0, 8.0], [False, True], [0, 0], [0.01, 0.01], [0, 0])
    state = steer.ControllerState(log_scale=jnp.array([0.7, 0.7]), log_l0_ema=jnp.zeros(2), ema_weight=jnp.zeros(2))
    configured = jnp.array([4e-4, 4e-4], jnp.float32)
    coeff = jax.vmap(steer.coefficient)(configured, state, hp)
    assert coeff[0] == configured[0]
    np.testing.assert_allclose(coeff[1], 4e-4 * np.exp(0.7), rtol=1e-6)


def test_update_is_traced_once_for_any_values():
    update = jax.jit(steer.update)
    hp = jax.tree.map(lambda a: a[0], controller_hparams([8.0], [True], [3], [0.01], [2]))
    state = steer.init_controller()
    for t, l0 in enumerate([0.0, 1.0, 1e6, 8.0]):
        state = update(state, hp, jnp.float32(l0), jnp.int32(t))
    assert update._cache_size() == 1
    assert all(np.isfinite(leaf) for leaf in jax.tree.leaves(state))


# The controller in the train step --------------------------------------------------------


def sparse_data(n_steps: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of x = codes @ dictionary + noise: 32 unit directions in R^8, about 3 active, nonnegative."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(32, D))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    out = []
    for _ in range(n_steps):
        codes = (rng.random((batch, 32)) < 3 / 32) * rng.lognormal(0, 0.5, (batch, 32))
        out.append((codes @ truth + 0.05 * rng.normal(size=(batch, D))).astype(np.float32))
    return out


def relu_cfgs(targets, *, kind="relu", batch=64, n_steps=300, exp_factor=8, **train_kw) -> list[config.Train]:
    # JumpReLU: a bandwidth wide enough for the straight-through threshold gradient to see these inputs.
    coeff = (
        {"sparsity_coeff": 0.02}
        if kind == "relu"
        else dict(l0_coefficient=0.01, jumprelu_init_threshold=0.05, jumprelu_bandwidth=0.1)
    )
    cfgs = []
    for i, t in enumerate(targets):
        sae = config.SparseAutoencoder(
            d_vit=D, exp_factor=exp_factor, kind=kind, seed=i, n_reinit_samples=0, target_l0=t, **coeff
        )
        cfgs.append(
            config.Train(
                sae=sae, sae_batch_size=batch, n_patches=(n_steps - 1) * batch, lr=1e-2, n_lr_warmup=10, **train_kw
            )
        )
    for c in cfgs:
        config.validate(c)
    return cfgs


def train_stack(cfgs, xs):
    """One stack on one device through step.train_step; its final stack and per-step metrics (real SAEs only)."""
    stacks = [plan.StackPlan(idx, D, cfgs[idx[0]].sae.d_sae, len(idx), len(idx)) for idx in plan.stacks_of(cfgs)]
    assert len(stacks) == 1
    layout = training.Layout(cfgs, plan.Round(tuple(stacks), 0), plan.make_mesh(jax.devices()[:1]))
    from .test_train import identity_preprocess

    state = layout.init_group_state(None, identity_preprocess())
    pre = jax.device_put(identity_preprocess(), layout.replicated)
    history = []
    for x in xs:
        state, (metrics,) = step.train_step(
            state, layout.hparams, pre, jnp.asarray(x), chunks=layout.chunks, mesh=layout.mesh
        )
        history.append(metrics)
    return jax.device_get(state.stacks[0]), jax.device_get(history)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, targets, n_steps", [("relu", (2.0, 6.0, 16.0), 400), ("jumprelu", (2.0, 4.0, 8.0), 1000)]
)
def test_several_targets_in_one_stack_reach_them(kind, targets, n_steps):
    # JumpReLU follows more slowly (its threshold moves only through the straight-through estimate).
    # Unclipped, as the controller was tuned: with JumpReLU's default clipping at norm 1.0 its
    # thresholds move more slowly on these tiny inputs and target 8 ends at 6.7 after 1000 steps
    # (a known gap of the controller under the new kinds' defaults; issue 19 keeps it open).
    cfgs = relu_cfgs(targets, kind=kind, n_steps=n_steps, max_grad_norm=0.0)
    stack, history = train_stack(cfgs, sparse_data(n_steps, 64))
    l0 = np.array([h["l0"] for h in history])  # [step, M]
    assert np.all(stack.diverged_at == -1)
    final = l0[-n_steps // 10 :].mean(axis=0)
    np.testing.assert_allclose(final, targets, rtol=0.1)
    # The coefficients moved apart, the sparser target the larger.
    coeff = np.array([h["sparsity_coeff"] for h in history])[-1]
    assert coeff[0] > coeff[1] > coeff[2]


@pytest.mark.slow
def test_each_coefficient_is_its_own():
    """An SAE's coefficient, state and parameters in a stack equal those it gets trained alone."""
    n_steps = 40
    cfgs = relu_cfgs((2.0, None, 16.0), n_steps=n_steps, exp_factor=4)
    xs = sparse_data(n_steps, 32)
    together, hist_together = train_stack(cfgs, xs)
    assert np.ptp(hist_together[-1]["sparsity_coeff"][[0, 2]]) > 0  # the two targets were steered apart
    for m, cfg in enumerate(cfgs):
        alone, hist_alone = train_stack([cfg], xs)
        for got, want in zip(
            jax.tree.leaves((alone.saes, alone.kind_state)), jax.tree.leaves((together.saes, together.kind_state))
        ):
            np.testing.assert_allclose(got[0], want[m], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            [h["sparsity_coeff"][0] for h in hist_alone], [h["sparsity_coeff"][m] for h in hist_together], rtol=1e-6
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["relu", "jumprelu"])
def test_saes_without_target_are_bit_identical_beside_steered_ones(kind):
    n_steps = 12
    steered = relu_cfgs((2.0, None, 16.0, None), kind=kind, n_steps=n_steps, exp_factor=4, n_sparsity_warmup=3)
    plain = [dataclasses.replace(c, sae=dataclasses.replace(c.sae, target_l0=None)) for c in steered]
    xs = sparse_data(n_steps, 32)
    a, hist_a = train_stack(steered, xs)
    b, hist_b = train_stack(plain, xs)
    for m in (1, 3):
        for got, want in zip(jax.tree.leaves((a.saes, a.opt_state)), jax.tree.leaves((b.saes, b.opt_state))):
            np.testing.assert_array_equal(got[m], want[m])
        for key in hist_b[0]:
            np.testing.assert_array_equal([h[key][m] for h in hist_a], [h[key][m] for h in hist_b], err_msg=key)
    # The steered ones differ, and their coefficient is the configured one until the warm-up ends.
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(jax.tree.leaves(a.saes), jax.tree.leaves(b.saes)))
    coeff_a = np.array([h["sparsity_coeff"] for h in hist_a])
    coeff_b = np.array([h["sparsity_coeff"] for h in hist_b])
    np.testing.assert_array_equal(coeff_a[:4], coeff_b[:4])
    assert coeff_a[-1, 0] != coeff_b[-1, 0]


def test_the_logged_coefficient_is_the_steered_one():
    """`sparsity_coeff` (wandb: progress/sparsity_coeff) at step t is configured * exp(log_scale after step t-1)."""
    n_steps = 15
    cfgs = relu_cfgs((2.0,), n_steps=n_steps, exp_factor=4)
    xs = sparse_data(n_steps, 32)
    coeffs = [h["sparsity_coeff"][0] for h in train_stack(cfgs, xs)[1]]
    before_last, _ = train_stack(cfgs, xs[:-1])
    np.testing.assert_allclose(coeffs[-1], 0.02 * np.exp(before_last.kind_state.log_scale[0]), rtol=1e-6)
    assert coeffs[-1] > coeffs[0]  # L0 starts far above 2: the coefficient rises


def test_report_gives_target_and_final_coefficient():
    n_steps = 15
    cfgs = relu_cfgs((2.0, None), n_steps=n_steps, exp_factor=4)
    stack, hist = train_stack(cfgs, sparse_data(n_steps, 32))
    hp = kinds.make_hparams(cfgs)
    one = lambda tree, m: jax.tree.map(lambda a: a[m], tree)  # noqa: E731
    steered, plain = (steer.report(one(hp, m), one(stack.kind_state, m)) for m in (0, 1))
    assert steered["target_l0"] == 2.0 and plain == {"target_l0": None, "final_sparsity_coeff": float(np.float32(0.02))}
    np.testing.assert_allclose(steered["final_sparsity_coeff"], 0.02 * np.exp(stack.kind_state.log_scale[0]), rtol=1e-6)
    assert steered["final_sparsity_coeff"] > 0.02
    topk = kinds.TopK.make_stack([with_sae(kind="topk")], "float32")
    assert steer.report(None, kinds.init_kind_state(topk)) == {}


# Config ----------------------------------------------------------------------------------


def with_sae(**kw) -> config.Train:
    return config.Train(sae=config.SparseAutoencoder(d_vit=D, exp_factor=4, **kw))


@pytest.mark.parametrize(
    "cfg, match",
    [
        (with_sae(target_l0=0), r"sae.target_l0 = 0.*\(0, d_sae = 32\)"),
        (with_sae(target_l0=-3.0), r"sae.target_l0 = -3.0"),
        (with_sae(target_l0=32), r"sae.target_l0 = 32.*d_sae = 32"),
        (with_sae(target_l0=8, kind="topk"), r"sae.target_l0 = 8: kind topk has L0 = k: set sae.k"),
        (with_sae(target_l0=8, kind="matryoshka"), r"sae.target_l0.*sae.k"),
        (with_sae(target_l0="8"), r"sae.target_l0 = \"8\": must be a number"),
        (with_sae(target_l0=8, sparsity_coeff=0.0), r"sae.sparsity_coeff = 0.0: must be positive with sae.target_l0"),
        (with_sae(target_l0=8, kind="jumprelu", l0_coefficient=0.0), r"sae.l0_coefficient = 0.0"),
        (config.Train(prune="halve"), r"prune = \"halve\""),
        (config.Train(prune="halving", prune_keep=1.0), r"prune_keep = 1.0: must be in \(0, 1\)"),
        (config.Train(prune="halving", prune_keep=0.0), r"prune_keep = 0.0"),
        (
            config.Train(prune="halving", prune_rungs=(0.5, 1.0)),
            r"prune_rungs = \[0.5, 1.0\]: .*past the end of training",
        ),
        (config.Train(prune="halving", prune_rungs=()), r"prune_rungs = \[\]"),
        (config.Train(prune="halving", prune_rungs=(0.5, 0.25)), r"prune_rungs.*strictly increasing"),
        (config.Train(prune_keep=0.25), r"prune_keep = 0.25: only prune = halving reads it"),
    ],
)
def test_bad_input_is_one_line_naming_key_and_value(cfg, match):
    with pytest.raises(config.InputError, match=match) as err:
        config.validate(cfg)
    assert "\n" not in str(err.value)


def test_good_steer_configs_pass():
    for cfg in [with_sae(target_l0=1), with_sae(target_l0=31.5), with_sae(target_l0=8, kind="jumprelu"),
                config.Train(prune="halving", prune_rungs=(0.1, 0.3, 0.9), prune_keep=1 / 3)]:  # fmt: skip
        config.validate(cfg)


def test_a_list_of_targets_is_a_sweep_axis_in_one_group():
    sweep = {"lr": [1e-3, 3e-3], "sae": {"target_l0": [16, 64]}, "prune": "halving", "prune_rungs": [[0.25, 0.5]]}
    cfgs = config.grid(with_sae(), sweep)
    assert [(c.lr, c.sae.target_l0) for c in cfgs] == [(1e-3, 16.0), (1e-3, 64.0), (3e-3, 16.0), (3e-3, 64.0)]
    assert all(type(c.sae.target_l0) is float and c.prune_rungs == (0.25, 0.5) for c in cfgs)
    assert len(config.split_cfgs(cfgs)) == 1
    assert len({kinds.stack_key(c) for c in cfgs}) == 1
    # What halving compares on: same kind and width, the two targets apart.
    assert len({steer.tier(c) for c in cfgs}) == 2
    # A different pruning setting is a different group.
    other = dataclasses.replace(cfgs[0], prune_keep=0.25)
    assert len(config.split_cfgs(cfgs + [other])) == 2
    # The configs survive the JSON round trip cfg.json makes.
    assert [config.from_dict(config.Train, config.to_dict(c)) for c in cfgs] == cfgs


def test_tier():
    assert steer.tier(with_sae(target_l0=16)) == ("relu", 32, 16.0)
    assert steer.tier(with_sae()) == ("relu", 32, None)
    assert steer.tier(with_sae(kind="topk", k=8)) == ("topk", 32, 8.0)
    assert steer.tier(with_sae(kind="jumprelu", target_l0=4)) == ("jumprelu", 32, 4.0)


# Successive halving ----------------------------------------------------------------------


def test_halving_keeps_exactly_the_best_fraction_per_targeted_tier():
    a, b = ("relu", 256, 16.0), ("relu", 256, 64.0)
    tiers = [a, b, a, b, a, b, a, b, ("topk", 256, 32.0)]
    mse = [0.40, 0.10, 0.20, 0.30, 0.10, 0.20, 0.30, 0.40, 0.5]
    l0 = [1.0] * 9  # L0 is not looked at in a targeted tier
    rung = steer.halving_stops(tiers, mse, l0, np.ones(9, bool), keep=0.5)
    # Tier a: MSEs 0.4, 0.2, 0.1, 0.3 at 0, 2, 4, 6 -> keep 4, 2. Tier b: 0.1, 0.3, 0.2, 0.4 -> keep 1, 5.
    np.testing.assert_array_equal(np.flatnonzero(rung.stop), [0, 3, 6, 7])
    assert "ranks 4 of 4" in rung.why[0] and "keeping 2" in rung.why[0] and rung.why[1] == ""
    # A tier of one always goes on; keep rounds up: 3 of 4 at keep 0.6.
    rung = steer.halving_stops(tiers, mse, l0, np.ones(9, bool), keep=0.6)
    np.testing.assert_array_equal(np.flatnonzero(rung.stop), [0, 7])


def test_halving_ignores_stopped_saes_and_ranks_non_finite_last():
    t = ("relu", 64, 8.0)
    mse = [0.1, np.nan, 0.3, 0.2, 0.05, 0.4]
    alive = np.array([True, True, True, True, False, True])
    rung = steer.halving_stops([t] * 6, mse, [5.0] * 6, alive, keep=0.5)
    # Alive: 0 (0.1), 1 (nan), 2 (0.3), 3 (0.2), 5 (0.4): keep ceil(2.5) = 3 -> 0, 3, 2; 4 was out already.
    np.testing.assert_array_equal(np.flatnonzero(rung.stop), [1, 5])
    # Ties go to the lower index.
    rung = steer.halving_stops([t] * 4, [0.2, 0.1, 0.2, 0.2], [1.0] * 4, np.ones(4, bool), keep=0.5)
    np.testing.assert_array_equal(np.flatnonzero(rung.stop), [2, 3])


def test_halving_without_target_stops_the_dominated():
    t = ("relu", 64, None)
    # (MSE, L0): 0 and 1 and 3 are on the front; 2 is dominated by 1, 4 by 0 and 1 and 3.
    mse = [0.1, 0.2, 0.25, 0.3, 0.35]
    l0 = [40.0, 20.0, 30.0, 10.0, 45.0]
    rung = steer.halving_stops([t] * 5, mse, l0, np.ones(5, bool), keep=0.4)
    np.testing.assert_array_equal(np.flatnonzero(rung.stop), [2, 4])
    assert "dominated" in rung.why[2] and "#1" in rung.why[2]
    # A front smaller than ceil(keep * n) is filled by the least dominated, then the lowest MSE.
    mse = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    l0 = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]  # a chain: i is dominated by every j < i
    rung = steer.halving_stops([t] * 6, mse, l0, np.ones(6, bool), keep=0.5)
    np.testing.assert_array_equal(np.flatnonzero(rung.stop), [3, 4, 5])
    # A tier where nobody dominates anybody keeps everyone, whatever keep says.
    rung = steer.halving_stops([t] * 3, [0.1, 0.2, 0.3], [30.0, 20.0, 10.0], np.ones(3, bool), keep=0.1)
    assert not rung.stop.any()


def test_halving_rejects_keep_outside_the_open_interval():
    for keep in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="keep"):
            steer.halving_stops([("relu", 8, None)], [0.1], [1.0], [True], keep=keep)


def test_metrics_json_and_summary_report_the_target_and_final_coefficient(tmp_path):
    """Through the CLI: a steered SAE's metrics.json and summary.csv carry its target and final λ; an unsteered one's do not."""
    import csv
    import json

    from saev_jax import synthetic

    shards = tmp_path / "shards"
    synthetic.write_shards(
        shards,
        synthetic.Synthetic(d_vit=8, n_features=24, k=2, n_imgs=32, n_patches_per_img=8, n_patches_per_shard=256),
    )
    ids = train.cli([
        "--data.shard-root", str(shards), "--n-patches", "640", "--sae-batch-size", "64", "--n-workers", "1",
        "--no-track", "--ckpt-path", str(tmp_path / "ckpt"), "--sae.exp-factor", "2",
        "--sae.n-reinit-samples", "0", "--sae.target-l0", "4",
    ])  # fmt: skip
    metrics = json.loads((tmp_path / "ckpt" / ids[0] / "metrics.json").read_text())
    assert metrics["target_l0"] == 4.0
    assert (
        metrics["final_sparsity_coeff"] > 0
        and metrics["final_sparsity_coeff"] != config.SparseAutoencoder.sparsity_coeff
    )
    with open(tmp_path / "ckpt" / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["target_l0"]) == 4.0 and float(row["final_sparsity_coeff"]) == metrics["final_sparsity_coeff"]
