"""The step over stacks, chunks and devices: same SAEs however they are laid out, pads that never
leak, no collectives, and a diverging SAE that sinks nobody."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saev_jax import config, plan, step, training
from saev_jax import sae as sae_lib

from .test_train import D, batches, identity_preprocess, make_cfgs


def group_cfgs() -> list[config.Train]:
    """Five configs in two widths (three of exp 4, two of exp 2), every per-SAE setting varied."""
    cfgs = [dataclasses.replace(c, sae=dataclasses.replace(c.sae, n_reinit_samples=0)) for c in make_cfgs()]
    narrow = [
        dataclasses.replace(c, sae=dataclasses.replace(c.sae, exp_factor=2, seed=10 + i))
        for i, c in enumerate(cfgs[:2])
    ]
    return [cfgs[0], narrow[0], cfgs[1], cfgs[2], narrow[1]]


def make_layout(cfgs, n_devices: int, chunk: int) -> training.Layout:
    n_dev = n_devices
    stacks = [
        plan.StackPlan(idx, D, cfgs[idx[0]].sae.d_sae, -(-len(idx) // n_dev) * n_dev, chunk)
        for idx in plan.stacks_of(cfgs)
    ]
    return training.Layout(cfgs, plan.Round(tuple(stacks), 0), plan.make_mesh(jax.devices()[:n_devices]))


def run(cfgs, xs, *, n_devices=1, chunk=8, poison_pads=False):
    """Trains `cfgs` on `xs`; returns per config (in config order) its SAE as numpy arrays and its diverged_at."""
    layout = make_layout(cfgs, n_devices, chunk)
    state = layout.init_group_state(None, identity_preprocess())
    if poison_pads:
        stacks = []
        for s, stack in zip(layout.round.stacks, state.stacks):
            is_pad = jnp.arange(s.n_padded) >= s.n_saes
            poison = lambda leaf: jnp.where(is_pad.reshape((-1,) + (1,) * (leaf.ndim - 1)), jnp.nan, leaf)  # noqa: E731
            saes = jax.tree.map(poison, stack.saes)
            stacks.append(dataclasses.replace(stack, saes=jax.device_put(saes, stack.saes.W_enc.sharding)))
        state = dataclasses.replace(state, stacks=tuple(stacks))
    pre = jax.device_put(identity_preprocess(), layout.replicated)
    for x in xs:
        x = jax.device_put(jnp.asarray(x), layout.replicated)
        state, _ = step.train_step(state, layout.hparams, pre, x, chunks=layout.chunks, mesh=layout.mesh)
    out = [None] * len(cfgs)
    for indices, saes, diverged_at in layout.real_saes(state):
        for j, i in enumerate(indices):
            out[i] = ({n: np.asarray(getattr(saes, n)[j]) for n in sae_lib.TENSOR_NAMES}, int(diverged_at[j]))
    return out


def assert_same(a, b, exact: bool):
    for (pa, da), (pb, db) in zip(a, b, strict=True):
        assert da == db
        for name in sae_lib.TENSOR_NAMES:
            if exact:
                np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
            else:
                np.testing.assert_allclose(pa[name], pb[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def reference():
    """Two widths, 1 device, each stack in one chunk."""
    return run(group_cfgs(), batches(4))


def test_each_width_is_trained_as_alone(reference):
    cfgs, xs = group_cfgs(), batches(4)
    for i, cfg in enumerate(cfgs):
        assert_same([reference[i]], run([cfg], xs), exact=False)


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 2])  # 2 runs fast: it chunks too
def test_chunks_give_the_same_saes(reference, chunk):
    assert_same(reference, run(group_cfgs(), batches(4), chunk=chunk), exact=False)


def test_four_devices_uneven_stacks_give_the_same_saes(reference):
    # 3 and 2 SAEs on 4 devices: both stacks padded (to 4), the pads poisoned with NaN.
    assert_same(reference, run(group_cfgs(), batches(4), n_devices=4, poison_pads=True), exact=False)


@pytest.mark.slow  # the four-device test above poisons its pads too (to float32 tolerance)
def test_nan_pads_leave_real_saes_bit_identical():
    cfgs, xs = group_cfgs(), batches(3)
    clean = run(cfgs, xs, n_devices=4, chunk=1)
    assert_same(clean, run(cfgs, xs, n_devices=4, chunk=1, poison_pads=True), exact=True)


def test_sharded_step_has_no_collectives():
    layout = make_layout(group_cfgs(), 4, 1)
    hlo = layout.compile(identity_preprocess()).step.as_text()
    # The partitioned program: each device holds 1 of the 4 (padded) exp-4 SAEs, not all 4.
    assert f"f32[1,{D},{D * 4}]" in hlo and f"f32[4,{D},{D * 4}]" not in hlo
    for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert op not in hlo, op


def test_a_diverging_sae_is_frozen_and_sinks_nobody():
    cfgs, xs = group_cfgs(), batches(5)
    bad = dataclasses.replace(cfgs[0], lr=1e30, n_lr_warmup=0, sae=dataclasses.replace(cfgs[0].sae, seed=99))
    with_bad = run(cfgs[:2] + [bad] + cfgs[2:], xs, chunk=1)
    without = run(cfgs, xs, chunk=1)
    params, diverged_at = with_bad[2]
    assert diverged_at >= 0
    assert all(np.all(np.isfinite(v)) for v in params.values())
    # Frozen from the diverging step on: more steps change nothing.
    more = run(cfgs[:2] + [bad] + cfgs[2:], xs + batches(2, seed=7), chunk=1)
    assert more[2][1] == diverged_at
    for name in sae_lib.TENSOR_NAMES:
        np.testing.assert_array_equal(more[2][0][name], params[name])
    # The others end exactly as they would have without it (each SAE is its own chunk).
    assert_same(without, with_bad[:2] + with_bad[3:], exact=True)
    assert all(d == -1 for _, d in without)


def test_a_finite_blow_up_is_frozen_too():
    """An SAE whose loss passes BLOWUP x its first step's loss while finite is frozen like a non-finite one;
    an lr 1e3 SAE beside an lr 1e-3 one is marked diverged and its neighbour is untouched."""
    cfgs, xs = group_cfgs()[:1], batches(3)
    tame = dataclasses.replace(cfgs[0], lr=1e-3, n_lr_warmup=0)
    wild = dataclasses.replace(tame, lr=1e3, sae=dataclasses.replace(tame.sae, seed=98))
    (_, tame_div), (params, wild_div) = run([tame, wild], xs, chunk=1)
    assert tame_div == -1 and wild_div >= 0 and all(np.all(np.isfinite(v)) for v in params.values())
    assert_same(run([tame], xs, chunk=1), run([tame, wild], xs, chunk=1)[:1], exact=True)

    # The rule itself: a first loss far below today's (finite) loss freezes SAE 1 at this step, not SAE 0.
    layout = make_layout([tame, tame], 1, 2)
    state = layout.init_group_state(None, identity_preprocess())
    pre = jax.device_put(identity_preprocess(), layout.replicated)
    state, _ = step.train_step(state, layout.hparams, pre, jnp.asarray(xs[0]), chunks=layout.chunks, mesh=layout.mesh)
    first = np.asarray(state.stacks[0].first_loss)
    assert np.all(np.isfinite(first) & (first > 0))
    low = jnp.asarray([first[0], first[1] / step.BLOWUP / 10], jnp.float32)
    state = eqx.tree_at(
        lambda s: s.stacks[0].first_loss, state, jax.device_put(low, state.stacks[0].first_loss.sharding)
    )
    before = np.asarray(state.stacks[0].saes.W_enc)
    state, metrics = step.train_step(
        state, layout.hparams, pre, jnp.asarray(xs[1]), chunks=layout.chunks, mesh=layout.mesh
    )
    assert np.asarray(state.stacks[0].diverged_at).tolist() == [-1, 1]
    assert np.asarray(metrics[0]["diverged"]).tolist() == [False, True]
    after = np.asarray(state.stacks[0].saes.W_enc)
    np.testing.assert_array_equal(after[1], before[1])
    assert not np.array_equal(after[0], before[0])
