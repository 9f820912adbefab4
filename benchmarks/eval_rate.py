"""Evaluation's arithmetic rate against the training step's, per batch, data in memory.

Evaluation is one forward pass per example, a third of a training step's arithmetic, so
"at the training step's rate" means one eval batch in a third of a step's time.

    python benchmarks/eval_rate.py D_VIT EXP N_SAES BATCH [--old PATH_TO_OLD_EVALUATE_PY]

`--old` times an earlier evaluate.py's kernel (with every batch's quality sums) in the same run.
"""

import importlib.util
import sys
import time
import jax, jax.numpy as jnp, numpy as np
from saev_jax import evaluate, data, config, step, plan, kinds
from saev_jax import sae as sae_lib
D, EXP, M, B = [int(a) for a in sys.argv[1:5]]
old_evaluate = None
if "--old" in sys.argv:  # e.g. `git show ac46351:saev_jax/evaluate.py | sed 's/^from \./from saev_jax/' > /tmp/old_evaluate.py`
    spec = importlib.util.spec_from_file_location("old_evaluate", sys.argv[sys.argv.index("--old") + 1])
    old_evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old_evaluate)
S = D * EXP
cfgs = [config.Train(sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP, seed=i), sae_batch_size=B) for i in range(M)]
saes = sae_lib.make_saes([c.sae for c in cfgs])
pre = data.Preprocess(clamp=1e5, act_mean=np.zeros(D, np.float32), scalar=1.0)
x = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)); nv = jnp.asarray(B, jnp.int32)
mesh = plan.make_mesh(jax.devices()[:1])
state, hp = step.init_single(jax.tree.map(jnp.copy, saes), step.Hparams.from_cfgs(cfgs), mesh); st = [state]
def tr():
    st[0], _ = step.train_step(st[0], hp, pre, x, chunks=(M,), mesh=mesh); jax.block_until_ready(st[0])
fns = {"train_step": tr}
for stride in (32, 64):
    s = [jax.device_put(evaluate._zero_sums(M, S, D))]
    def ev(s=s, stride=stride):
        s[0], c, n = evaluate._accumulate(s[0], kinds.as_inference(saes), pre, x, nv, jnp.asarray(3, jnp.int32), stride=stride, chunk=M); jax.block_until_ready((s[0], c))
    fns[f"eval_stride{stride}"] = ev
if old_evaluate is not None:
    o = [old_evaluate._zero_sums(M, S, D)]

    def old():
        o[0] = old_evaluate._accumulate(o[0], saes, pre, x, nv, with_code=True)
        jax.block_until_ready(o[0])

    fns["old_eval_with_quality"] = old
for f in fns.values(): f(); f()
ts = {k: [] for k in fns}
for _ in range(5):
    for k, f in fns.items():
        t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
med = {k: float(np.median(v)) for k, v in ts.items()}
print(f"D={D} S={S} M={M} B={B}:", {k: f"{v*1e3:.0f} ms" for k, v in med.items()})
print("eval arithmetic rate / training step's (eval = 1/3 of a step's arithmetic):", {k: round(med["train_step"] / 3 / v, 2) for k, v in med.items() if k != "train_step"})
