"""The planner: chunks and rounds from memory, its bad-input errors, and runs that end the same
whatever the plan."""

import dataclasses
import json
import logging

import jax
import numpy as np
import pytest

from saev_jax import config, plan, train, training
from saev_jax import sae as sae_lib

from .test_cli import D, shard_root, write_sweep  # noqa: F401 (fixture)

GIB = plan.GIB


def cfgs_of(n: int, exp: int = 4, d_vit: int = 64, batch: int = 256, **kw) -> list[config.Train]:
    base = config.Train(sae_batch_size=batch, sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=exp), **kw)
    return [dataclasses.replace(base, sae=dataclasses.replace(base.sae, seed=i)) for i in range(n)]


def one_sae_bytes(cfg: config.Train, n_devices: int = 1) -> int:
    s = plan.StackPlan((0,), cfg.sae.d_vit, cfg.sae.d_sae, n_devices, 1)
    return plan.estimate([s], n_devices, cfg.sae_batch_size)


def test_plenty_of_memory_runs_every_sae_at_once():
    cfgs = cfgs_of(6) + cfgs_of(3, exp=8)
    p = plan.make_plan(cfgs, jax.devices()[:1], 64 * GIB, "test")
    assert len(p.rounds) == 1
    assert [(s.n_saes, s.n_padded, s.chunk) for s in p.rounds[0].stacks] == [(6, 6, 6), (3, 3, 3)]
    assert [s.cfg_indices for s in p.rounds[0].stacks] == [tuple(range(6)), (6, 7, 8)]


def test_four_devices_pad_every_stack():
    p = plan.make_plan(cfgs_of(6) + cfgs_of(3, exp=8), jax.devices()[:4], 64 * GIB, "test")
    assert [(s.n_saes, s.n_padded, s.chunk) for s in p.rounds[0].stacks] == [(6, 8, 2), (3, 4, 1)]
    assert all("4 devices" in line for line in p.lines())


def test_tight_memory_chunks_the_stack():
    cfgs = cfgs_of(8)
    per_sae = plan.in_flight_bytes(cfgs[0].sae.d_sae * 128 + 64 + 256, 256, 256)
    # Room for the whole state twice (chunking copies it) and about two SAEs in flight.
    limit = int(
        (one_sae_bytes(cfgs[0]) + 16 * plan.resident_bytes(2 * 64 * 256 + 256 + 64) + 1.5 * per_sae)
        / plan.headroom("cpu")
    )
    p = plan.make_plan(cfgs, jax.devices()[:1], limit, "test")
    (rnd,) = p.rounds
    assert 1 <= rnd.stacks[0].chunk < 8
    assert rnd.planned_bytes <= limit * plan.headroom("cpu")


def test_state_too_big_for_one_round_splits_the_group():
    cfgs = cfgs_of(6)
    # One SAE in flight and the resident state of about 3 of the 6.
    limit = int((one_sae_bytes(cfgs[0]) + 2.5 * plan.resident_bytes(2 * 64 * 256 + 256 + 64)) / plan.headroom("cpu"))
    p = plan.make_plan(cfgs, jax.devices()[:1], limit, "test")
    assert len(p.rounds) > 1
    assert sorted(i for r in p.rounds for s in r.stacks for i in s.cfg_indices) == list(range(6))
    assert all(r.planned_bytes <= limit * plan.headroom("cpu") for r in p.rounds)
    assert any("round 2/" in line for line in p.lines())


def test_budget_smaller_than_one_sae_is_a_clear_error():
    cfgs = cfgs_of(2, memory_budget_gib=1e-6)
    with pytest.raises(
        config.InputError,
        match=r"one relu SAE of 64x256 at sae_batch_size 256 needs about .* the smallest memory_budget_gib that fits is [0-9.e-]+ ",
    ):
        training.plan_group(cfgs)


def test_more_devices_than_exist_is_a_clear_error():
    with pytest.raises(config.InputError, match=r"n_devices = 99: only 4 cpu devices"):
        plan.get_devices(config.Train(n_devices=99, device="cpu"))


def test_xla_confirms_chunking_shrinks_the_step():
    cfgs = [dataclasses.replace(c, sae=dataclasses.replace(c.sae, n_reinit_samples=0)) for c in cfgs_of(4)]
    mesh = plan.make_mesh(jax.devices()[:1])
    peaks = {}
    for chunk in (1, 4):
        s = plan.StackPlan(tuple(range(4)), 64, 256, 4, chunk)
        peaks[chunk] = training.Layout(cfgs, plan.Round((s,), 0), mesh).compile(_identity(64)).peak_bytes
    assert peaks[1] < peaks[4]


def _identity(d: int):
    from saev_jax import data

    return data.Preprocess(1e5, np.zeros(d, np.float32), 1.0)


@pytest.mark.slow
def test_tiny_budget_and_four_devices_train_the_same_saes(tmp_path, shard_root, caplog):  # noqa: F811
    """The CLI with no flags, with a budget that forces chunk 1, and on 4 devices: the same SAEs."""
    sweep = write_sweep(tmp_path, shard_root, extra="seed = 3")
    text = (
        sweep.read_text().replace("exp_factor = 2", "exp_factor = [2, 4]").replace("[1e-3, 1e-2]", "[1e-3, 1e-2, 3e-2]")
    )
    results = {}
    for name, flags in {
        "default": ["--n-devices", "1"],
        "tiny": ["--n-devices", "1", "--memory-budget-gib", "1e-3"],
        "four": ["--n-devices", "4"],
    }.items():
        sweep.write_text(text.replace(str(tmp_path / "ckpt"), str(tmp_path / name)))
        with caplog.at_level(logging.INFO, logger="saev_jax.train"):
            caplog.clear()
            ids = train.cli([str(sweep), *flags])
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stack ")]
        results[name] = (
            lines,
            [sae_lib.load(tmp_path / name / i).sae for i in ids],
            [sae_lib.load_cfg(tmp_path / name / i) for i in ids],
        )
    assert any("chunk 1" in line for line in results["tiny"][0]) and not any(
        "chunk 1," in line for line in results["default"][0][:1]
    )
    assert all("4 devices" in line for line in results["four"][0])
    ref_cfgs = [(c.sae.exp_factor, c.sae.sparsity_coeff) for c in results["default"][2]]
    for name in ("tiny", "four"):
        assert [(c.sae.exp_factor, c.sae.sparsity_coeff) for c in results[name][2]] == ref_cfgs
        for a, b in zip(results["default"][1], results[name][1]):
            for n in sae_lib.TENSOR_NAMES:
                np.testing.assert_allclose(getattr(a, n), getattr(b, n), rtol=1e-5, atol=1e-6, err_msg=f"{name} {n}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"])
def test_estimate_tracks_xla(kind):
    """Per kind, chunk 1, 2 and all, on 1 and 4 devices: the planner's estimate is within 15% of
    XLA's peak for the compiled step and never more than 5% below it (plan.ACTIVATION_COPIES)."""
    M, d_vit, exp, B = 8, 64, 16, 512
    base = config.Train(
        sae_batch_size=B,
        sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=exp, kind=kind, n_reinit_samples=0, k=8, k_aux=32),
    )
    cfgs = [dataclasses.replace(base, sae=dataclasses.replace(base.sae, seed=i)) for i in range(M)]
    ratios = {}
    for n_dev in (1, 4):
        mesh = plan.make_mesh(jax.devices()[:n_dev])
        for chunk in sorted({1, 2, M // n_dev}):
            s = plan.StackPlan(tuple(range(M)), d_vit, d_vit * exp, M, chunk, kind)
            xla = training.Layout(cfgs, plan.Round((s,), 0), mesh).compile(_identity(d_vit)).peak_bytes
            ratios[n_dev, chunk] = plan.estimate([s], n_dev, B) / xla
    assert all(0.95 <= r <= 1.15 for r in ratios.values()), ratios


def test_chunks_divide_the_share_and_count_the_state_copy():
    cfgs = cfgs_of(6)
    s_all = plan.StackPlan(tuple(range(6)), 64, 256, 6, 6)
    s_two = dataclasses.replace(s_all, chunk=2)
    s_four = dataclasses.replace(s_all, chunk=4)
    resident = 6 * plan.resident_bytes(s_all.n_params)
    flight = plan.in_flight_bytes(s_all.n_params, 256, 256)
    # Chunking keeps a second copy of the stack's state; a remainder (6 = 4 + 2) runs with buffers of its own.
    assert plan.estimate([s_two], 1, 256) - plan.estimate([s_all], 1, 256) == resident - 4 * flight
    assert plan.estimate([s_four], 1, 256) - plan.estimate([s_two], 1, 256) == 4 * flight
    for budget in (0.02, 0.05, 0.1, 1.0):
        p = plan.make_plan(cfgs, jax.devices()[:1], int(budget * GIB), "test")
        assert all(6 % s.chunk == 0 for r in p.rounds for s in r.stacks)


def test_plan_round_trips_through_json():
    p = plan.make_plan(cfgs_of(6) + cfgs_of(3, exp=8), jax.devices()[:4], 64 * GIB, "test")
    assert plan.Plan.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_sae_chunk_larger_than_every_stack_is_a_clear_error():
    with pytest.raises(
        config.InputError,
        match=r"sae_chunk = 9: larger than any stack's share of a device \(at most 3 SAEs on each of 1 devices\)",
    ):
        plan.make_plan(cfgs_of(3, sae_chunk=9), jax.devices()[:1], 64 * GIB, "test")
    p = plan.make_plan(cfgs_of(3, sae_chunk=3), jax.devices()[:1], 64 * GIB, "test")
    assert p.rounds[0].stacks[0].chunk == 3
