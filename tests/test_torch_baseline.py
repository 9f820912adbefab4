"""The PyTorch baseline (benchmarks/torch_baseline.py) and saev_jax's train step compute the same training.

From the same initial weights and on the same batches, ten steps of each must leave the same
parameters, within float32 tolerance, for SAEs that differ in every per-SAE setting.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Needs PyTorch: skipped where it is not installed.
torch = pytest.importorskip("torch", reason="needs torch")

from benchmarks import torch_baseline  # noqa: E402
from saev_jax import data, plan, step  # noqa: E402
from saev_jax import sae as sae_lib  # noqa: E402

# Three configs that differ in everything a group may, and the batch shape.
from .test_train import B, D, make_cfgs  # noqa: E402

N_STEPS = 10


def make_batches(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # Not centred, so both biases matter; one large entry per batch, so the safe MSE's rescaling is exercised.
    xs = [(rng.normal(size=(B, D)) * 2 + 1).astype(np.float32) for _ in range(n)]
    for x in xs:
        x[rng.integers(B), rng.integers(D)] = 25.0
    return xs


def test_torch_baseline_matches_saev_jax():
    cfgs, xs = make_cfgs(), make_batches(N_STEPS)
    init = sae_lib.make_saes([c.sae for c in cfgs])

    # Copied before the jax steps: train_step donates (deletes) the state it is given.
    device = torch.device("cpu")
    saes = [
        torch_baseline.from_arrays(
            {n: np.asarray(getattr(init, n))[m] for n in sae_lib.TENSOR_NAMES}, c.sae.sparsity_coeff, device
        )
        for m, c in enumerate(cfgs)
    ]
    mesh = plan.make_mesh(jax.devices()[:1])
    state, hparams = step.init_single(init, step.Hparams.from_cfgs(cfgs), mesh)
    preprocess = data.Preprocess(clamp=1e5, act_mean=jnp.zeros(D), scalar=jnp.float32(1.0))
    jax_metrics = []
    for x in xs:
        state, (metrics,) = step.train_step(state, hparams, preprocess, jnp.asarray(x), chunks=(len(cfgs),), mesh=mesh)
        jax_metrics.append(jax.device_get(metrics))

    trainer = torch_baseline.Trainer(saes, [torch_baseline.Hparams.from_cfg(c) for c in cfgs])
    for t, x in enumerate(xs):
        losses = trainer.step(torch.from_numpy(x))
        for m, metrics in enumerate(trainer.metrics(losses)):
            for key in ("mse", "l1", "loss"):
                np.testing.assert_allclose(
                    metrics[f"losses/{key}"], jax_metrics[t][key][m], rtol=1e-5, err_msg=f"{key} sae {m} step {t}"
                )
            assert metrics["metrics/l0"] == jax_metrics[t]["l0"][m]

    assert int(state.step) == trainer.n_steps == N_STEPS
    for m, sae in enumerate(saes):
        for name in sae_lib.TENSOR_NAMES:
            got = getattr(sae, name).detach().numpy()
            want = np.asarray(getattr(state.stacks[0].saes, name)[m])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{name} sae {m}")
