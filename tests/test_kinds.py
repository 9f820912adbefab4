"""The SAE kinds (saev_jax/kinds) against plain PyTorch references (tests/reference_kinds.py).

Forward, losses and gradients of each kind at float32 tolerance; per-SAE hyper-parameters under
vmap equal each SAE alone; the selection primitives against NumPy.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import config, kinds, optim
from saev_jax import sae as sae_lib
from saev_jax.kinds import select

torch = pytest.importorskip("torch", reason="the references are written in torch")
from . import reference_kinds as ref  # noqa: E402

D, EXP, B = 8, 4, 16
S = D * EXP
RTOL, ATOL = 2e-5, 2e-6


def make_cfg(kind: str, seed: int = 0, **sae) -> config.Train:
    return config.Train(
        sae_batch_size=B, sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP, kind=kind, seed=seed, **sae)
    )


def random_params(seed: int, kind: str = "topk") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {
        "W_enc": rng.normal(size=(D, S)) / np.sqrt(D),
        "b_enc": rng.normal(size=S) * 0.1,
        "W_dec": rng.normal(size=(S, D)) / np.sqrt(S),
        "b_dec": rng.normal(size=D) * 0.1,
    }
    if kind == "jumprelu":
        p["log_threshold"] = np.log(rng.uniform(0.2, 0.8, size=S))
    return {k: v.astype(np.float32) for k, v in p.items()}


def batch(seed: int) -> np.ndarray:
    # Not centred, so both biases matter.
    return (np.random.default_rng(100 + seed).normal(size=(B, D)) * 2 + 1).astype(np.float32)


def one(cfg: config.Train, p: dict[str, np.ndarray] | None = None):
    """One SAE of `cfg`'s kind (with parameters `p` if given), its hparams and its initial state."""
    stack = kinds.make_stack([cfg])
    sae = jax.tree.map(lambda leaf: leaf[0], stack)
    if p is not None:
        names = tuple(p)
        sae = eqx.tree_at(lambda s: tuple(getattr(s, n) for n in names), sae, tuple(jnp.asarray(p[n]) for n in names))
    hp = jax.tree.map(lambda leaf: leaf[0], kinds.make_hparams([cfg]))
    return sae, hp, sae.init_kind_state()


@eqx.filter_jit
def _loss_and_grads(sae, state, x, hp, step):
    fn = eqx.filter_value_and_grad(lambda s: s.loss(state, x, hp, step), has_aux=True)
    (total, (metrics, new_state)), grads = fn(sae)
    return total, metrics, new_state, grads


def loss_and_grads(sae, state, x, hp, step=0):
    return _loss_and_grads(sae, state, jnp.asarray(x), hp, jnp.int32(step))


def assert_grads_close(grads, ref_grads):
    for name, g in ref_grads.items():
        np.testing.assert_allclose(np.asarray(getattr(grads, name)), g, rtol=RTOL, atol=ATOL, err_msg=name)


# --- selection primitives --------------------------------------------------------------------


def test_kth_largest_matches_sort():
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(6, 40)), 0).astype(np.float32)
    a[0, :30] = 0  # a row with fewer positives than some n
    for n in (1, 3, 17, 40):
        rows = np.asarray(select.kth_largest_nonneg(jnp.asarray(a), jnp.int32(n), axis=-1))
        np.testing.assert_array_equal(rows[:, 0], -np.sort(-a, axis=1)[:, n - 1])
        flat = float(select.kth_largest_nonneg(jnp.asarray(a), jnp.int32(n)))
        assert flat == -np.sort(-a.ravel())[n - 1]
    # More than there are: 0.
    assert float(select.kth_largest_nonneg(jnp.asarray(a), jnp.int32(a.size + 1))) == 0.0


def test_topk_rows_per_sae_k_under_vmap():
    rng = np.random.default_rng(1)
    a = jnp.asarray(np.maximum(rng.normal(size=(3, B, S)), 0), jnp.float32)
    ks = jnp.array([1, 4, 9], jnp.int32)
    together = jax.vmap(select.topk_rows)(a, ks)
    for m in range(3):
        alone = select.topk_rows(a[m], ks[m])
        np.testing.assert_array_equal(together[m], alone)
        ref_f = ref.topk_acts(torch.tensor(np.asarray(a[m], np.float64)), int(ks[m])).numpy()
        np.testing.assert_array_equal(np.asarray(alone), ref_f.astype(np.float32))


def test_batchtopk_keeps_exactly_k_times_B():
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(B, S)), jnp.float32)
    for k in (1, 3, 7):
        f, thr = select.topk_batch(jax.nn.relu(h), jnp.int32(k))
        assert int(jnp.sum(f > 0)) == k * B
        # Per example the count varies; only the batch total is k * B.
        assert len(set(np.sum(np.asarray(f) > 0, axis=1).tolist())) > 1
        assert float(thr) == float(jnp.min(jnp.where(f > 0, f, jnp.inf)))
    # Fewer positives than k * B: every positive kept, nothing else.
    f, thr = select.topk_batch(jax.nn.relu(h), jnp.int32(S))
    assert float(thr) == 0.0 and int(jnp.sum(f > 0)) == int(jnp.sum(h > 0))


def test_dead_counts():
    counts = select.DeadCounts.zeros(4)
    f = jnp.array([[1.0, 0, 0, 0], [0, 0, 2.0, 0]])
    counts = counts.update(f)
    np.testing.assert_array_equal(counts.tokens_since_fired, [0, 2, 0, 2])
    counts = counts.update(jnp.array([[0, 0, 0, 3.0], [0, 0, 0, 0]]))
    np.testing.assert_array_equal(counts.tokens_since_fired, [2, 4, 2, 0])
    np.testing.assert_array_equal(counts.dead(jnp.int32(4)), [False, True, False, False])
    full = select.DeadCounts(jnp.full(2, select.DEAD_COUNT_CAP, jnp.int32)).update(jnp.zeros((5, 2)))
    np.testing.assert_array_equal(full.tokens_since_fired, [select.DEAD_COUNT_CAP] * 2)  # saturates


def test_threshold_ema_starts_at_first_value():
    f1 = jnp.array([[0.5, 0.0], [2.0, 0.0]])
    f2 = jnp.array([[1.5, 0.0], [0.0, 3.0]])
    thr = select.ema_threshold(jnp.float32(-1.0), f1, jnp.float32(0.1))
    assert float(thr) == 0.5
    thr = select.ema_threshold(thr, f2, jnp.float32(0.1))
    np.testing.assert_allclose(float(thr), 0.5 + 0.1 * (1.5 - 0.5), rtol=1e-6)
    assert float(select.ema_threshold(thr, jnp.zeros((2, 2)), jnp.float32(0.1))) == float(thr)  # nothing kept


# --- AuxK ------------------------------------------------------------------------------------


def test_auxk_uses_exactly_the_dead_latents():
    rng = np.random.default_rng(3)
    p = random_params(3)
    x = batch(3)
    dead = np.zeros(S, bool)
    dead[[1, 5, 6, 20, 31]] = True
    h = jnp.asarray(ref.pre_acts(ref.params(p), torch.tensor(x, dtype=torch.float64)).detach().numpy(), jnp.float32)
    residual = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)

    def aux(W_dec, h, k_aux):
        return select.auxk_loss(h, jnp.asarray(dead), residual, W_dec, jnp.int32(k_aux))

    for k_aux in (2, 5, 64):  # fewer than, as many as and more than the dead latents
        value, (g_W, g_h) = jax.value_and_grad(aux, argnums=(0, 1))(jnp.asarray(p["W_dec"]), h, k_aux)
        # Only dead latents' decoder rows and pre-activations get a gradient.
        assert np.all(np.asarray(g_W)[~dead] == 0) and np.all(np.asarray(g_h)[:, ~dead] == 0)
        assert np.any(np.asarray(g_W)[dead] != 0)
        # Per example, at most k_aux dead pre-activations are used.
        assert np.max(np.sum(np.asarray(g_h) != 0, axis=1)) <= min(k_aux, dead.sum())
        W = torch.tensor(p["W_dec"].astype(np.float64))
        expected = ref.auxk(
            torch.tensor(np.asarray(h, np.float64)),
            torch.tensor(dead),
            torch.tensor(np.asarray(residual, np.float64)),
            W,
            k_aux,
        )
        np.testing.assert_allclose(float(value), float(expected), rtol=RTOL)
    # No dead latent: zero loss and zero gradient.
    value, g_W = jax.value_and_grad(lambda W: select.auxk_loss(h, jnp.zeros(S, bool), residual, W, jnp.int32(4)))(
        jnp.asarray(p["W_dec"])
    )
    assert float(value) == 0.0 and not np.any(np.asarray(g_W))


# --- each kind against its reference -----------------------------------------------------------


def dead_state(sae, dead_mask, cfg):
    """The kind's initial state with the latents of `dead_mask` past the dead threshold."""
    counts = jnp.where(jnp.asarray(dead_mask), cfg.sae.dead_threshold_tokens, 0).astype(jnp.int32)
    state = sae.init_kind_state()
    where = (
        (lambda s: s.tokens_since_fired)
        if isinstance(state, select.DeadCounts)
        else (lambda s: s.dead_counts.tokens_since_fired)
    )
    return eqx.tree_at(where, state, counts)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("n_dead", [0, 6])
def test_topk_family_matches_reference(kind, n_dead):
    widths = (4, 8, 16, 32)
    extra = {"matryoshka_widths": widths} if kind == "matryoshka" else {}
    cfg = make_cfg(kind, k=3, k_aux=4, auxk_alpha=0.25, dead_threshold_tokens=100, **extra)
    p, x = random_params(4), batch(4)
    sae, hp, _ = one(cfg, p)
    dead = np.zeros(S, bool)
    dead[np.random.default_rng(5).choice(S, n_dead, replace=False)] = True
    state = dead_state(sae, dead, cfg)
    total, metrics, new_state, grads = loss_and_grads(sae, state, x, hp)
    ref_total, ref_aux, ref_f, ref_grads = ref.loss_and_grads(
        kind, p, x, k=3, k_aux=4, alpha=0.25, dead=dead, widths=widths
    )
    np.testing.assert_allclose(float(total), ref_total, rtol=RTOL)
    np.testing.assert_allclose(float(metrics["aux_loss"]), ref_aux, rtol=RTOL, atol=1e-7)
    assert (ref_aux > 0) == (n_dead > 0)
    f = sae.encode_train(state, jnp.asarray(x), hp)
    np.testing.assert_allclose(np.asarray(f), ref_f, rtol=RTOL, atol=ATOL)
    assert float(metrics["l0"]) == pytest.approx(np.mean(np.sum(ref_f > 0, axis=1)))
    assert float(metrics["n_dead"]) == n_dead
    assert_grads_close(grads, ref_grads)
    # Counters: reset where anything fired, +B elsewhere.
    counts = new_state if kind == "topk" else new_state.dead_counts
    fired = np.any(ref_f > 0, axis=0)
    np.testing.assert_array_equal(np.asarray(counts.tokens_since_fired)[fired], 0)
    old = np.where(dead, 100, 0)
    np.testing.assert_array_equal(np.asarray(counts.tokens_since_fired)[~fired], old[~fired] + B)


def test_matryoshka_prefix_loss_is_the_explicit_sum():
    widths = (2, 6, 32)
    cfg = make_cfg("matryoshka", k=4, matryoshka_widths=widths, auxk_alpha=0.0)
    p, x = random_params(6), batch(6)
    sae, hp, state = one(cfg, p)
    f = sae.encode_train(state, jnp.asarray(x), hp)
    fvus, x_hat = sae.prefix_fvus(f, jnp.asarray(x))
    f64, x64 = np.asarray(f, np.float64), x.astype(np.float64)
    explicit = []
    for m in widths:
        x_hat_m = f64[:, :m] @ p["W_dec"][:m].astype(np.float64) + p["b_dec"]
        explicit.append(np.sum((x_hat_m - x64) ** 2) / np.sum((x64 - x64.mean(0)) ** 2))
    np.testing.assert_allclose(np.asarray(fvus), explicit, rtol=RTOL)
    total, _, _, _ = loss_and_grads(sae, state, x, hp)
    np.testing.assert_allclose(float(total), np.mean(explicit), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(x_hat), np.asarray(sae.decode(f)), rtol=RTOL, atol=ATOL)


def test_matryoshka_stack_shares_a_grid_of_block_ends():
    cfgs = [make_cfg("matryoshka", seed=1, matryoshka_widths=(8, 32)), make_cfg("matryoshka", seed=2)]
    stack = kinds.make_stack(cfgs)
    hp = kinds.make_hparams(cfgs)
    assert stack.block_ends == (2, 4, 8, 16, 32)  # the union with 32 * (1/16, 1/8, 1/4, 1/2, 1)
    np.testing.assert_allclose(np.asarray(hp.prefix_weights), [[0, 0, 0.5, 0, 0.5], [0.2] * 5])


def test_jumprelu_matches_reference():
    cfg = make_cfg("jumprelu", l0_coefficient=0.05, jumprelu_bandwidth=0.3)
    p, x = random_params(7, "jumprelu"), batch(7)
    sae, hp, state = one(cfg, p)
    total, metrics, _, grads = loss_and_grads(sae, state, x, hp)
    ref_total, _, ref_f, ref_grads = ref.loss_and_grads("jumprelu", p, x, eps=0.3, coeff=0.05)
    np.testing.assert_allclose(float(total), ref_total, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(sae.encode(state, jnp.asarray(x), hp)), ref_f, rtol=RTOL, atol=ATOL)
    assert_grads_close(grads, ref_grads)
    assert np.any(ref_grads["log_threshold"] != 0)  # the straight-through estimator reaches the thresholds
    # The L0 coefficient warms up over n_sparsity_warmup steps.
    cfg = dataclasses.replace(cfg, n_sparsity_warmup=4)
    sae, hp, state = one(cfg, p)
    _, metrics, _, _ = loss_and_grads(sae, state, x, hp, step=1)
    np.testing.assert_allclose(float(metrics["sparsity_coeff"]), 0.05 / 4, rtol=1e-6)


def test_jumprelu_default_threshold_and_bandwidth():
    cfg = make_cfg("jumprelu")
    sae, hp, _ = one(cfg)
    np.testing.assert_allclose(np.exp(np.asarray(sae.log_threshold)), 0.001 * np.sqrt(D), rtol=1e-6)
    np.testing.assert_allclose(float(hp.bandwidth), 0.001 * np.sqrt(D), rtol=1e-6)


def test_relu_kind_is_sae_loss():
    """The ReLU kind computes exactly sae.loss (SPEC 3) from the same init."""
    cfg = make_cfg("relu", seed=3, sparsity_coeff=0.02)
    cfg = dataclasses.replace(cfg, n_sparsity_warmup=4)
    sae, hp, state = one(cfg)
    old = sae_lib.make_saes([cfg.sae])
    old = jax.tree.map(lambda leaf: leaf[0], old)
    for name in sae_lib.TENSOR_NAMES:
        np.testing.assert_array_equal(getattr(sae, name), getattr(old, name))
    x = jnp.asarray(batch(8))
    total, metrics, _, grads = loss_and_grads(sae, state, x, hp, step=2)
    coeff = optim.warmup(0.02, 4)(2)
    (old_total, old_metrics), old_grads = eqx.filter_value_and_grad(sae_lib.loss, has_aux=True)(old, x, coeff)
    np.testing.assert_allclose(float(total), float(old_total), rtol=1e-6)
    for key in old_metrics:
        np.testing.assert_allclose(float(metrics[key]), float(old_metrics[key]), rtol=1e-6, err_msg=key)
    for name in sae_lib.TENSOR_NAMES:
        np.testing.assert_allclose(getattr(grads, name), getattr(old_grads, name), rtol=1e-5, atol=1e-7, err_msg=name)


def test_tied_init():
    sae, _, _ = one(make_cfg("topk", seed=4))
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(sae.W_enc, sae.W_dec.T)


# --- stacks: per-SAE hyper-parameters under vmap equal each SAE alone --------------------------

STACKS = {
    "relu": [dict(sparsity_coeff=0.01), dict(sparsity_coeff=0.1)],
    "topk": [dict(k=1), dict(k=5, k_aux=2), dict(k=12, auxk_alpha=0.5)],
    "batchtopk": [dict(k=2, topk_threshold_lr=0.5), dict(k=6)],
    "matryoshka": [dict(k=2, matryoshka_widths=(8, 32)), dict(k=5)],
    "jumprelu": [dict(l0_coefficient=0.01), dict(l0_coefficient=0.2, jumprelu_bandwidth=0.5)],
}


@pytest.mark.parametrize("kind", sorted(STACKS))
def test_stack_equals_each_alone(kind):
    cfgs = [make_cfg(kind, seed=m, dead_threshold_tokens=B, **v) if kind in ("topk", "batchtopk", "matryoshka")
            else make_cfg(kind, seed=m, **v) for m, v in enumerate(STACKS[kind])]  # fmt: skip
    for c in cfgs:
        config._kind_checks(c)  # valid configs
        assert not any(bad for bad, _, _ in config._kind_checks(c))
    stack, hp, state = kinds.make_stack(cfgs), kinds.make_hparams(cfgs), None
    state = kinds.init_kind_state(stack)
    x = jnp.asarray(batch(9))

    def run(sae, state, hp, x):
        # Two steps, so state written by the first (counters, thresholds) feeds the second.
        (total, (metrics, state)), grads = eqx.filter_value_and_grad(
            lambda s: s.loss(state, x, hp, jnp.int32(0)), has_aux=True
        )(sae)
        (total, (metrics, state)), grads = eqx.filter_value_and_grad(
            lambda s: s.loss(state, x * 0.5, hp, jnp.int32(1)), has_aux=True
        )(sae)
        return total, state, grads, sae.encode(state, x, hp)

    together = eqx.filter_jit(eqx.filter_vmap(run, in_axes=(0, 0, 0, None)))(stack, state, hp, x)
    for m, cfg in enumerate(cfgs):
        sae, hp_m, state_m = one(cfg)
        alone = eqx.filter_jit(run)(sae, state_m, hp_m, x)
        pick = lambda tree: jax.tree.map(lambda leaf: leaf[m], tree)  # noqa: E731
        # Matryoshka's stack grid has more blocks than one SAE's, so its sums differ in rounding.
        for a, b in zip(
            jax.tree.leaves(eqx.filter(pick(together), eqx.is_array)), jax.tree.leaves(eqx.filter(alone, eqx.is_array))
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, sae, message",
    [
        ("topk", dict(k=0), "sae.k = 0: must be positive"),
        ("topk", dict(k=S + 1), f"sae.k = {S + 1}: must be at most d_sae = {S}"),
        ("batchtopk", dict(k_aux=0), "sae.k_aux = 0"),
        (
            "matryoshka",
            dict(matryoshka_widths=(8, 4, 32)),
            "sae.matryoshka_widths = [8, 4, 32]: must be strictly increasing",
        ),
        ("matryoshka", dict(matryoshka_widths=(4, 8)), "sae.matryoshka_widths = [4, 8]: must end at d_sae = 32"),
        ("relu", dict(k=8), "sae.k = 8: only kind topk or batchtopk or matryoshka reads it, but sae.kind = relu"),
        ("topk", dict(sparsity_coeff=0.1), "sae.sparsity_coeff = 0.1: only kind relu reads it"),
        ("topk", dict(matryoshka_widths=(32,)), "sae.matryoshka_widths = [32]: only kind matryoshka"),
        ("jumprelu", dict(topk_threshold_lr=0.5), "sae.topk_threshold_lr = 0.5"),
        ("batchtopk", dict(topk_threshold_lr=0.0), "sae.topk_threshold_lr = 0.0: must be in (0, 1]"),
        ("jumprelu", dict(l0_coefficient=-1.0), "sae.l0_coefficient = -1.0: must not be negative"),
        ("cnn", dict(), 'sae.kind = "cnn": must be one of relu, topk'),
    ],
)
def test_bad_kind_fields(kind, sae, message):
    with pytest.raises(config.InputError, match=None) as err:
        config.validate(make_cfg(kind, **sae))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_schedule():
    with pytest.raises(config.InputError, match="lr_decay_frac = 1.5"):
        config.validate(config.Train(lr_schedule="linear", lr_decay_frac=1.5))
    with pytest.raises(config.InputError, match="lr_decay_frac = 0.5: only lr_schedule = linear"):
        config.validate(config.Train(lr_decay_frac=0.5))


def test_widths_from_sweep_file_and_json():
    cfgs = config.grid(
        config.Train(), {"sae": {"kind": "matryoshka", "d_vit": D, "exp_factor": EXP, "matryoshka_widths": [[8, 32]]}}
    )
    assert cfgs[0].sae.matryoshka_widths == (8, 32)
    assert config.from_dict(config.Train, config.to_dict(cfgs[0])) == cfgs[0]
    with pytest.raises(
        config.InputError, match=r"matryoshka_widths = 8 must be a list of ints \(in a sweep file, \[\[...\]\]\)"
    ):
        config.grid(config.Train(), {"sae": {"matryoshka_widths": [8, 32]}})


# --- schedules ---------------------------------------------------------------------------------


def reference_lr(t, peak, n_warmup, n_steps, schedule, frac):
    rise = min(t / n_warmup, 1.0) if n_warmup > 0 else 1.0
    if schedule == "linear":
        start = n_steps - frac * n_steps
        after = 1.0 if t <= start else max(0.0, (n_steps - t) / (frac * n_steps))
    elif schedule == "cosine":
        progress = min(max((t - n_warmup) / (n_steps - n_warmup), 0.0), 1.0)
        after = 0.5 * (1 + np.cos(np.pi * progress))
    else:
        after = 1.0
    return peak * rise * after


def test_schedules_traced_per_sae():
    settings = [
        (1e-3, 10, 100, "constant", 0.2),
        (2e-3, 0, 100, "linear", 0.2),
        (5e-4, 5, 100, "linear", 0.5),
        (1e-3, 20, 100, "cosine", 0.2),
    ]
    arrays = [jnp.array(col) for col in zip(*[(p, w, n, optim.SCHEDULES.index(s), f) for p, w, n, s, f in settings])]
    steps = jnp.arange(0, 111, 3)
    lrs = jax.vmap(lambda p, w, n, s, f: jax.vmap(optim.warmup_decay(p, w, n, s, f))(steps))(*arrays)
    for m, setting in enumerate(settings):
        expected = [reference_lr(int(t), *setting) for t in steps]
        # float32: absolute rounding of about 1e-7 of the peak where cos nears -1.
        np.testing.assert_allclose(np.asarray(lrs[m]), expected, rtol=1e-5, atol=1e-6 * setting[0])


# --- the sparse step (kinds/sparse.py) against the dense form of the same kind -------------------


def _value_grads(sae, state, x, hp, method):
    fn = lambda s: getattr(s, method)(state, x, hp, jnp.int32(0))  # noqa: E731
    (total, (metrics, new_state)), grads = eqx.filter_value_and_grad(fn, has_aux=True)(sae)
    return total, metrics, new_state, grads


def _adam_step(sae, grads):
    opt = optim.make_optimizer(lambda _: 1e-2, jnp.bool_(True))
    updates, _ = opt.update(grads, opt.init(sae), sae)
    return eqx.apply_updates(sae, updates)


def _assert_trees_close(a, b, **tol):
    for u, v in zip(
        jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


def _tied_params(seed: int, group: int) -> dict[str, np.ndarray]:
    """Parameters whose latents come in identical groups of `group`: every pre-activation has ties."""
    p = random_params(seed)
    first = np.arange(S) - np.arange(S) % group
    p["W_enc"], p["b_enc"] = p["W_enc"][:, first], p["b_enc"][first]
    return p


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("case", ["plain", "dead", "ties"])
def test_sparse_step_equals_dense(kind, case):
    extra = {"matryoshka_widths": (4, 8, 16, 32)} if kind == "matryoshka" else {}
    # Ties straddle the k-th value: pairs against TopK's k = 3; triples against BatchTopK's k * B = 32.
    k = 2 if case == "ties" and kind != "topk" else 3
    cfg = make_cfg(kind, k=k, k_aux=4, auxk_alpha=0.25, dead_threshold_tokens=100, **extra)
    p = _tied_params(11, 2 if kind == "topk" else 3) if case == "ties" else random_params(11)
    sae, hp, _ = one(cfg, p)
    if case == "ties":  # slots for the ties: as in a stack whose k_max exceeds this SAE's k
        hp = dataclasses.replace(hp, k_max=6)
    dead = np.zeros(S, bool)
    if case == "dead":
        dead[[0, 3, 8, 17, 30]] = True
    state = dead_state(sae, dead, cfg)
    x = jnp.asarray(batch(11))
    step = eqx.filter_jit(_value_grads)
    sp, de = step(sae, state, x, hp, "sparse_loss"), step(sae, state, x, hp, "dense_loss")
    if case == "ties":  # the k-th value (per row, or over the batch) is tied: both keep the tie
        f = np.asarray(sae.encode_train(state, x, hp))
        assert (np.sum(f > 0) > k * B) if kind != "topk" else np.any(np.sum(f > 0, axis=1) > k)
    np.testing.assert_allclose(float(sp[0]), float(de[0]), rtol=RTOL)
    assert sp[1].keys() == de[1].keys()
    for key in de[1]:
        np.testing.assert_allclose(float(sp[1][key]), float(de[1][key]), rtol=RTOL, atol=1e-7, err_msg=key)
    _assert_trees_close(sp[2], de[2], rtol=0, atol=0)  # counters and threshold exactly
    _assert_trees_close(sp[3], de[3], rtol=RTOL, atol=ATOL)
    _assert_trees_close(_adam_step(sae, sp[3]), _adam_step(sae, de[3]), rtol=RTOL, atol=ATOL)
    # And against the torch reference (no ties there: torch.topk breaks them).
    if case != "ties":
        _, _, _, ref_grads = ref.loss_and_grads(
            kind, p, np.asarray(x), k=3, k_aux=4, alpha=0.25, dead=dead, widths=(4, 8, 16, 32)
        )
        assert_grads_close(sp[3], ref_grads)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("chunked", [False, True])
def test_sparse_stack_per_sae_k_equals_dense_alone(kind, chunked):
    """Per-SAE k (one static k_max) under vmap, or under lax.map chunks of 2, equals each SAE's dense step alone."""
    ks = (1, 3, 2)
    cfgs = [make_cfg(kind, seed=m, k=k, k_aux=3 + m, dead_threshold_tokens=B) for m, k in enumerate(ks)]
    stack, hp = kinds.make_stack(cfgs), kinds.make_hparams(cfgs)
    assert hp.k_max == 3
    dead = np.zeros((3, S), bool)
    dead[0, [2, 9]] = dead[2, [1, 4, 5, 6, 7, 30]] = True
    counts = jnp.where(jnp.asarray(dead), B, 0).astype(jnp.int32)
    state = kinds.init_kind_state(stack)
    state = eqx.tree_at(
        lambda s: s.tokens_since_fired if kind == "topk" else s.dead_counts.tokens_since_fired, state, counts
    )
    x = jnp.asarray(batch(12))
    one_sae = lambda args: _value_grads(*args[:2], x, args[2], "sparse_loss")  # noqa: E731
    if chunked:
        together = eqx.filter_jit(lambda a: jax.lax.map(one_sae, a, batch_size=2))((stack, state, hp))
    else:
        together = eqx.filter_jit(jax.vmap(one_sae))((stack, state, hp))
    for m in range(3):
        pick = lambda tree: jax.tree.map(lambda leaf: leaf[m], tree)  # noqa: E731
        sae_m, state_m = pick(stack), pick(state)
        hp_m = jax.tree.map(lambda leaf: leaf[0], kinds.make_hparams([cfgs[m]]))
        alone = eqx.filter_jit(_value_grads)(sae_m, state_m, x, hp_m, "dense_loss")
        got = pick(together)
        np.testing.assert_allclose(float(got[0]), float(alone[0]), rtol=RTOL)
        _assert_trees_close(got[2], alone[2], rtol=0, atol=0)
        _assert_trees_close(got[3], alone[3], rtol=RTOL, atol=ATOL)


def test_run_if_runs_fn_only_when_some_sae_is_active():
    """sparse.run_if under vmap: fn's result where active, the default elsewhere, and fn not run at all when none is."""
    calls = []
    fn = lambda x: jax.debug.callback(lambda: calls.append(1)) or x * 2 + 1  # noqa: E731
    f = eqx.filter_jit(jax.vmap(lambda a, x: kinds.sparse.run_if(a, lambda: fn(x), jnp.zeros_like(x))))
    x = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(np.asarray(f(jnp.array([True, False, True]), x)), [[1, 3], [0, 0], [9, 11]])
    assert calls
    calls.clear()
    np.testing.assert_array_equal(np.asarray(f(jnp.array([False, False, False]), x)), np.zeros((3, 2)))
    assert not calls


def test_pick_rows_keeps_ties_like_the_dense_form():
    a = np.array([[5.0, 3.0, 3.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)
    picked = select.pick_rows(jnp.asarray(a), jnp.int32(2), 5)
    kept = np.zeros_like(a, bool)
    for r in range(2):
        kept[r, np.asarray(picked.cols_BK[r])[np.asarray(picked.keep_BK[r])]] = True
    dense = np.asarray(select.topk_rows(jnp.asarray(a), jnp.int32(2))) > 0
    np.testing.assert_array_equal(kept, dense)  # row 0: 5 and the three tied 3s; row 1: the two positives
    assert kept[0].sum() == 4


def test_pick_batch_overflow_is_reported():
    # 8 examples, k = k_max = 2: the batch keeps 16, each example offers 4 * 2 = 8 candidates.
    h = np.full((8, S), -1.0, np.float32)
    h[0] = np.linspace(10, 20, S)  # the batch's 16 largest are all in example 0
    h[1:, :2] = 0.5
    picked, thr, overflow = select.pick_batch(jnp.asarray(h), jnp.int32(2), 2)
    assert select.batch_candidates(S, 2) == 8 and bool(overflow)
    h[0, 6:] = -1.0  # example 0 keeps 6; then 10 of the 14 tied 0.5s, so all 14 (as the dense form)
    picked, thr, overflow = select.pick_batch(jnp.asarray(h), jnp.int32(2), 2)
    assert not bool(overflow) and float(thr) == 0.5
    f = np.asarray(select.topk_batch(jax.nn.relu(jnp.asarray(h)), jnp.int32(2))[0])
    kept = np.zeros_like(h, bool)
    for r in range(8):
        kept[r, np.asarray(picked.cols_BK[r])[np.asarray(picked.keep_BK[r])]] = True
    np.testing.assert_array_equal(kept, f > 0)
    assert kept.sum() == 20


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("trained", [False, True])
def test_sparse_evaluation_equals_dense(kind, trained, monkeypatch):
    """evaluation._one_sae on the sparse code gives the dense path's sums (BatchTopK before training: all overflow)."""
    from saev_jax import evaluation

    cfgs = [make_cfg(kind, seed=m, k=2 + m) for m in range(2)]
    stack, hp = kinds.make_stack(cfgs), kinds.make_hparams(cfgs)
    state = kinds.init_kind_state(stack)
    x = jnp.asarray(batch(13))
    if trained and kind != "topk":
        state = eqx.tree_at(lambda s: s.threshold, state, jnp.array([0.4, 0.7], jnp.float32))
    inf = kinds.Inference(stack, state, hp)
    valid = (jnp.arange(B) < B - 3)[:, None]
    xv = jnp.where(valid, x, 0.0)
    rms = jnp.sqrt(jnp.mean(xv**2, axis=1, keepdims=True))
    rows = 1 + 2 * jnp.arange(B // 2)
    sampled = (rows < B - 3)[:, None]

    def sums():
        one = lambda s: evaluation._one_sae(s, xv, valid, rms, rows, sampled, jnp.int32(B - 3))  # noqa: E731
        return eqx.filter_jit(jax.vmap(one))(inf)

    got = sums()
    monkeypatch.setattr(kinds.Inference, "encode_sparse", lambda self, x_BD: None)
    want = sums()
    _assert_trees_close(got, want, rtol=2e-5, atol=2e-5)


def _train_steps(cfgs, params, xs, chunk, hp=None):
    """`step.train_step` of a stack of `cfgs` (SAE m with `params[m]`) on the batches `xs`: final state, all metrics."""
    from saev_jax import data, plan, step

    stack = kinds.make_stack(cfgs)
    names = tuple(params[0])
    stack = eqx.tree_at(
        lambda s: tuple(getattr(s, n) for n in names), stack,
        tuple(jnp.asarray(np.stack([p[n] for p in params])) for n in names),
    )  # fmt: skip
    mesh = plan.make_mesh(jax.devices()[:1])
    step.train_step.clear_cache()  # the tests flip module settings the compiled step was traced with
    state, hps = step.init_single(stack, hp or step.Hparams.from_cfgs(cfgs), mesh)
    pre = data.Preprocess(clamp=1e5, act_mean=jnp.zeros(D), scalar=jnp.float32(1.0))
    metrics = []
    for x in xs:
        state, m = step.train_step(state, hps, pre, jnp.asarray(x), chunks=(chunk,), mesh=mesh)
        metrics.append(m[0])
    return state.stacks[0], metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, chunk, case",
    [("batchtopk", 3, "overflow"), ("batchtopk", 2, "overflow"), ("batchtopk", 3, "ties"), ("matryoshka", 2, "overflow"),
     ("matryoshka", 3, "ties"), ("topk", 2, "overflow")],
)  # fmt: skip
def test_train_step_falls_back_to_dense_exactly(kind, chunk, case, monkeypatch):
    """The sparse train step (forced at this tiny width) of per-SAE k equals the dense step, and where an SAE's
    selection overflows its candidates the fallback is what makes it so. chunk 2 of 3 SAEs: a vmapped chunk
    of 2 and a remainder of 1, one of which overflows and the other not."""
    from saev_jax import step
    from saev_jax.kinds import batchtopk

    monkeypatch.setattr(kinds.sparse, "SPARSE_MAX_FRACTION", 1.0)  # k_max 3 of d_sae 32: sparse
    extra = {"matryoshka_widths": (4, 8, 16, 32)} if kind == "matryoshka" else {}
    ks = (3, 1, 2)
    cfgs = [
        make_cfg(kind, seed=m, k=k, k_aux=4, auxk_alpha=0.25, dead_threshold_tokens=B, **extra)
        for m, k in enumerate(ks)
    ]
    params = [_tied_params(30 + m, 3) if case == "ties" else random_params(30 + m) for m in range(3)]
    xs = [batch(30), batch(31)]
    if case == "overflow" and kind == "topk":  # SAE 1 (k 1): 6 tied largest per example, more than its 5 slots
        params[1] = _tied_params(31, 6)
    elif case == "overflow":  # SAE 1 (k 1): example 0 holds more of the batch's 16 than its 4 k_max = 12 candidates
        p = params[1]
        x0 = xs[0][0] - p["b_dec"]
        proj = (xs[0] - p["b_dec"]) @ x0 / (x0 @ x0)  # 1 for example 0
        p["W_enc"] = (5 * np.outer(x0 / (x0 @ x0), np.ones(S)) + 0.05 * p["W_enc"]).astype(np.float32)
        p["b_enc"] = np.full(S, -5 * (1 + np.sort(proj)[-2]) / 2, np.float32)  # every latent fires on example 0 alone
    hp = kinds.make_hparams(cfgs)
    h = [jnp.asarray((xs[0] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]) for p in params]
    pick = select.pick_rows if kind == "topk" else lambda *a: select.pick_batch(*a)[0]
    over = [bool(pick(h[m], hp.k[m], hp.k_max).overflow) for m in range(3)]
    if case == "overflow":
        assert over == [False, True, False]
    else:  # the batch's threshold is tied: some SAE keeps more than its k * B
        assert not any(over)
        assert any(int(jnp.sum(select.topk_batch(jax.nn.relu(h[m]), hp.k[m])[0] > 0)) > ks[m] * B for m in range(3))
    got, got_m = _train_steps(cfgs, params, xs, chunk)
    monkeypatch.setattr(batchtopk, "SPARSE_TRAINING", False)
    want, want_m = _train_steps(cfgs, params, xs, chunk)
    monkeypatch.setattr(batchtopk, "SPARSE_TRAINING", True)
    for g, w in zip(got_m, want_m, strict=True):
        for key in set(w) - {"select_overflow"}:
            np.testing.assert_allclose(np.asarray(g[key]), np.asarray(w[key]), rtol=RTOL, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(np.asarray(got_m[0]["select_overflow"]), [0.0, float(case == "overflow"), 0.0])
    _assert_trees_close(got.kind_state, want.kind_state, rtol=0, atol=0)
    _assert_trees_close(got.saes, want.saes, rtol=RTOL, atol=ATOL)
    _assert_trees_close(got.opt_state, want.opt_state, rtol=RTOL, atol=ATOL)
    if case == "ties":
        return
    # Without the fallback, the overflowing SAE trains differently (the test can fail).
    monkeypatch.setattr(step, "OVERFLOW", "no such metric")
    plain, _ = _train_steps(cfgs, params, xs, chunk)
    assert not np.allclose(np.asarray(plain.saes.W_dec[1]), np.asarray(want.saes.W_dec[1]), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka"])
def test_train_step_sparse_equals_dense(kind):
    """Two `step.train_step`s (shard_map, then vmap or chunks of 2) of a stack wide enough to train sparsely
    (d_sae 1024, k <= 16) equal the same steps forced dense (k_max = d_sae), per-SAE k and k_aux (an SAE whose
    selection overflowed its candidates, as BatchTopK's on 16 examples do, through the dense fallback)."""
    from saev_jax import data, plan, step

    d_sae = 1024
    cfgs = [config.Train(sae_batch_size=B, sae=config.SparseAutoencoder(d_vit=D, exp_factor=d_sae // D, kind=kind, seed=m, k=k,
            k_aux=8 + m, dead_threshold_tokens=B)) for m, k in enumerate((4, 16, 9))]  # fmt: skip
    hp = step.Hparams.from_cfgs(cfgs)
    assert kinds.sparse.use_sparse(d_sae, hp.kind.k_max)
    dense_hp = dataclasses.replace(hp, kind=dataclasses.replace(hp.kind, k_max=d_sae))
    mesh = plan.make_mesh(jax.devices()[:1])
    pre = data.Preprocess(clamp=1e5, act_mean=jnp.zeros(D), scalar=jnp.float32(1.0))
    results = []
    for h, chunk in ((hp, 3), (hp, 2), (dense_hp, 3)):
        state, hps = step.init_single(kinds.make_stack(cfgs), h, mesh)
        for i in range(2):  # after one batch every latent that did not fire is dead (threshold B): AuxK runs
            state, metrics = step.train_step(state, hps, pre, jnp.asarray(batch(20 + i)), chunks=(chunk,), mesh=mesh)
        results.append((state, metrics))
    assert float(jnp.max(results[0][1][0]["n_dead"])) > 0
    for got in results[:2]:
        _assert_trees_close(got[0].stacks[0].saes, results[2][0].stacks[0].saes, rtol=1e-5, atol=1e-6)
        _assert_trees_close(got[0].stacks[0].kind_state, results[2][0].stacks[0].kind_state, rtol=0, atol=0)
        for key in set(results[2][1][0]) - {"select_overflow"}:  # the dense step never overflows
            np.testing.assert_allclose(got[1][0][key], results[2][1][0][key], rtol=1e-5, atol=1e-6, err_msg=key)
