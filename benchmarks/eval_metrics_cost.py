"""What the evaluation metrics of issue 20 cost: one batch of `evaluation._accumulate` now against
an earlier commit's (before fvu, rel_bias and cos_sim were summed), and `dec_redundancy` once per pass.

    python benchmarks/eval_metrics_cost.py D_VIT EXP N_SAES BATCH [N_REPEATS] [--old-commit SHA]

Medians of interleaved runs (old and new alternating which goes first) after two warm-ups, with a device sync (`jax.block_until_ready`).
"""

import importlib.util
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from saev_jax import config, data, evaluation, kinds
from saev_jax import sae as sae_lib

args = [a for a in sys.argv[1:] if not a.startswith("--")]
old_commit = sys.argv[sys.argv.index("--old-commit") + 1] if "--old-commit" in sys.argv else "b5a7a9f"
if old_commit in args:
    args.remove(old_commit)
D, EXP, M, B = (int(a) for a in args[:4])
repeats = int(args[4]) if len(args) > 4 else 9
S = D * EXP

# The earlier evaluate.py (the library before it moved to evaluation.py), imported beside the current one.
source = subprocess.run(
    ["git", "show", f"{old_commit}:saev_jax/evaluate.py"], capture_output=True, text=True, check=True
).stdout
source = source.replace("from . import ", "from saev_jax import ").replace(
    "from .metrics import", "from saev_jax.metrics import"
)
with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fd:
    fd.write(source)
spec = importlib.util.spec_from_file_location("old_evaluate", fd.name)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

saes = kinds.as_inference(
    sae_lib.make_saes([config.SparseAutoencoder(d_vit=D, exp_factor=EXP, seed=i) for i in range(M)])
)
pre = data.Preprocess(clamp=1e5, act_mean=np.zeros(D, np.float32), scalar=1.0)
x = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)).astype(np.float32))
n_valid, offset = jnp.asarray(B, jnp.int32), jnp.asarray(3, jnp.int32)
fns = {}
for name, mod in (("old", old), ("new", evaluation)):
    # XLA's own count of the compiled kernel's work: deterministic, unlike timings on a shared machine.
    compiled = mod._accumulate.lower(
        mod._zero_sums(M, S, D), saes, pre, x, n_valid, offset, stride=32, chunk=M
    ).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"{name}: {cost['flops'] / 1e9:.4f} GFLOP, {cost['bytes accessed'] / 1e6:.2f} MB accessed per batch (XLA cost analysis)"
    )
    sums = [jax.device_put(mod._zero_sums(M, S, D))]

    def one_batch(sums=sums, mod=mod):
        sums[0], code, _ = mod._accumulate(sums[0], saes, pre, x, n_valid, offset, stride=32, chunk=M)
        jax.block_until_ready((sums[0], code))

    fns[f"{name} batch"] = one_batch
fns["dec_redundancy"] = lambda: jax.block_until_ready(evaluation.dec_redundancy(saes.W_dec))
for f in fns.values():
    f(), f()
times = {k: [] for k in fns}
for r in range(repeats):
    # Whichever kernel runs second in a round ran ~8% slower here: alternate the order.
    order = list(fns) if r % 2 == 0 else [list(fns)[1], list(fns)[0], *list(fns)[2:]]
    for k in order:
        f = fns[k]
        t0 = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t0)
med = {k: float(np.median(v)) for k, v in times.items()}
print(
    f"{jax.devices()[0].platform} D={D} S={S} M={M} B={B}, medians of {repeats}:",
    {k: f"{v * 1e3:.1f} ms" for k, v in med.items()},
)
print(
    f"new/old per batch: {med['new batch'] / med['old batch']:.3f}; dec_redundancy = {med['dec_redundancy'] / med['new batch']:.2f} batches, once per pass"
)
