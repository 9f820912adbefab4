"""Every kind in the one train step: a mixed group (kinds and widths) trains as each kind alone;
evaluation in each kind's inference form; a mixed sweep end to end from two sweep files."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import config, evaluation, kinds, optim, plan, step, synthetic, train, training

from .test_train import B, D, batches, identity_preprocess

KIND_SETTINGS = {
    "relu": dict(sparsity_coeff=1e-2),
    "topk": dict(k=3, k_aux=4, dead_threshold_tokens=2 * B),
    "batchtopk": dict(k=2, topk_threshold_lr=0.3),
    "matryoshka": dict(k=4, matryoshka_widths=(4, 8, 16)),
    "jumprelu": dict(l0_coefficient=0.05, jumprelu_init_threshold=0.05, jumprelu_bandwidth=0.1),
}


def mixed_cfgs() -> list[config.Train]:
    """Every kind, two widths of TopK, schedules that differ: one group."""
    cfgs = []
    for i, (kind, extra) in enumerate(KIND_SETTINGS.items()):
        exp = 2 if kind == "matryoshka" else 4
        sae = config.SparseAutoencoder(d_vit=D, exp_factor=exp, kind=kind, seed=i, n_reinit_samples=0, **extra)
        cfgs.append(config.Train(sae_batch_size=B, sae=sae, lr=1e-2, n_lr_warmup=2, n_patches=8 * B))
    cfgs.append(
        dataclasses.replace(
            cfgs[1], lr_schedule="cosine", sae=dataclasses.replace(cfgs[1].sae, exp_factor=2, seed=9, k=5)
        )
    )
    cfgs.append(
        dataclasses.replace(
            cfgs[2], lr_schedule="linear", lr_decay_frac=0.5, sae=dataclasses.replace(cfgs[2].sae, seed=10, k=1)
        )
    )
    for c in cfgs:
        config.validate(c)
    assert len(config.split_cfgs(cfgs)) == 1
    return cfgs


def run(cfgs, xs):
    """Trains `cfgs` (one group) on `xs`; per config its final SAE, kind state and last metrics."""
    stacks = [plan.StackPlan(idx, D, cfgs[idx[0]].sae.d_sae, len(idx), len(idx)) for idx in plan.shapes_of(cfgs)]
    layout = training.Layout(cfgs, plan.Round(tuple(stacks), 0), plan.make_mesh(jax.devices()[:1]))
    state = layout.init_group_state(None, identity_preprocess())
    pre = jax.device_put(identity_preprocess(), layout.replicated)
    for x in xs:
        state, metrics = step.train_step(
            state, layout.hparams, pre, jnp.asarray(x), chunks=layout.chunks, mesh=layout.mesh
        )
    metrics = layout.real_metrics(jax.device_get(metrics))
    out = [None] * len(cfgs)
    for indices, bundle, diverged_at in layout.real_saes(state):
        assert np.all(diverged_at == -1)
        for j, i in enumerate(indices):
            out[i] = (jax.tree.map(lambda leaf: np.asarray(leaf[j]), (bundle.sae, bundle.kind_state)), metrics[i])
    return out, layout


@pytest.fixture(scope="module")
def mixed():
    cfgs, xs = mixed_cfgs(), batches(4)
    together, layout = run(cfgs, xs)
    return cfgs, xs, together, layout


def test_mixed_group_trains_in_one_step(mixed):
    cfgs, _, together, layout = mixed
    # One stack per (kind, d_sae): 5 kinds, TopK in two widths.
    assert sorted((cfgs[s.cfg_indices[0]].sae.kind, s.d_sae) for s in layout.round.stacks) == sorted(
        {(c.sae.kind, c.sae.d_sae) for c in cfgs}
    )
    for (_, _), metrics in together:
        assert np.isfinite(metrics["loss"]) and "learning_rate" in metrics
    # Each kind's state moved: TopK's dead counters, BatchTopK's threshold.
    (_, topk_state), _ = together[1]
    assert np.all(topk_state.tokens_since_fired % B == 0) and topk_state.tokens_since_fired.max() > 0
    (_, btk_state), metrics = together[2]
    assert btk_state.threshold > 0 and metrics["threshold"] == pytest.approx(float(btk_state.threshold))
    # The learning rate follows each SAE's own schedule (4 steps taken; the metrics are of step 3).
    for i in (1, 5, 6):
        c = cfgs[i]
        lr = optim.warmup_decay(
            c.lr, c.n_lr_warmup, training.n_train_steps(c), optim.SCHEDULES.index(c.lr_schedule), c.lr_decay_frac
        )(3)
        assert together[i][1]["learning_rate"] == pytest.approx(float(lr), rel=1e-6)


@pytest.mark.slow
def test_mixed_group_trains_each_kind_as_alone(mixed):
    cfgs, xs, together, _ = mixed
    by_stack = {}
    for i, c in enumerate(cfgs):
        by_stack.setdefault((c.sae.kind, c.sae.d_sae), []).append(i)
    for indices in by_stack.values():
        alone, _ = run([cfgs[i] for i in indices], xs)
        for i, (tree, metrics) in zip(indices, alone):
            for a, b in zip(jax.tree.leaves(together[i][0]), jax.tree.leaves(tree), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            assert together[i][1].keys() == metrics.keys()


def test_evaluation_uses_the_inference_form():
    """BatchTopK: L0 with the threshold per example; batch-mode L0 exactly k on full batches."""
    cfg = config.Train(sae_batch_size=B, sae=config.SparseAutoencoder(d_vit=D, exp_factor=4, kind="batchtopk", k=3))
    stack = kinds.make_stack([cfg])
    hp = kinds.make_hparams([cfg])
    state = kinds.init_kind_state(stack)
    state = dataclasses.replace(state, threshold=jnp.array([0.4], jnp.float32))
    bundle = kinds.Inference(stack, state, hp)
    xs = batches(3, seed=4)
    padded = np.zeros_like(xs[0])
    padded[:5] = xs[0][:5]
    stats = evaluation.accumulate(
        bundle, [(jnp.asarray(x), B) for x in xs] + [(jnp.asarray(padded), 5)], identity_preprocess()
    )
    (result,) = evaluation.metrics_from_stats(stats)
    # Reference: relu(h) > 0.4, per example, in NumPy.
    W_enc, b_enc, b_dec = (np.asarray(getattr(stack, n)[0], np.float64) for n in ("W_enc", "b_enc", "b_dec"))
    x_all = np.concatenate(xs + [xs[0][:5]]).astype(np.float64)
    h = (x_all - b_dec) @ W_enc + b_enc
    assert result.l0 == pytest.approx(np.mean(np.sum(np.maximum(h, 0) > 0.4, axis=1)), rel=1e-6)
    assert stats.batch_n == 3 * B and result.l0_batch == 3.0
    # ReLU: the batch form is the inference form.
    relu = kinds.as_inference(
        kinds.make_stack([dataclasses.replace(cfg, sae=config.SparseAutoencoder(d_vit=D, exp_factor=4))])
    )
    (r,) = evaluation.metrics_from_stats(
        evaluation.accumulate(relu, [(jnp.asarray(x), B) for x in xs], identity_preprocess())
    )
    assert r.l0_batch == r.l0


@pytest.mark.slow
def test_mixed_sweep_files_end_to_end(tmp_path):
    root = tmp_path / "shards"
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=16, n_features=48, k=3, n_imgs=96, n_patches_per_img=8, n_patches_per_shard=640)
    )
    common = f"""
n_patches = 2000
sae_batch_size = 256
log_every = 4
track = false
n_workers = 1
ckpt_path = "{tmp_path / "ckpt"}"
[data]
shard_root = "{root}"
layer = -1
n_random_samples = 512
"""
    (tmp_path / "relu.toml").write_text(common + "[sae]\nd_vit = 16\nexp_factor = 2\nsparsity_coeff = [1e-3, 1e-2]\n")
    (tmp_path / "topk.toml").write_text(
        common + '[sae]\nd_vit = 16\nexp_factor = 4\nkind = ["topk", "batchtopk"]\nk = 3\n'
    )
    ids = train.cli([str(tmp_path / "relu.toml"), str(tmp_path / "topk.toml")])
    assert len(ids) == 4
    kinds_seen = []
    for run_id in ids:
        cfg = config.from_dict(config.Train, json.loads((tmp_path / "ckpt" / run_id / "cfg.json").read_text()))
        metrics = json.loads((tmp_path / "ckpt" / run_id / "metrics.json").read_text())
        kinds_seen.append(cfg.sae.kind)
        if cfg.sae.kind == "batchtopk":
            assert metrics["l0_batch"] == pytest.approx(3.0)
    assert sorted(kinds_seen) == ["batchtopk", "relu", "relu", "topk"]
