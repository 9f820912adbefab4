"""Issue 13's done-when on synthetic data with a known dictionary: a mixed sweep of SAE kinds.

One group (ReLU at several sparsity coefficients, TopK at several k, BatchTopK, Matryoshka and
JumpReLU) trains in one pass over the data (one `step.train_step` per batch for all stacks),
then each stack is evaluated in its kind's inference form (`evaluation.accumulate`). Reports,
per SAE, dictionary recovery (mean over true directions of the max |cosine| with a decoder
row, as benchmarks/quality.py), `quality`, L0 (inference and batch mode) and MSE; and checks:

1. TopK at the true k recovers at least as well as the best ReLU coefficient of the sweep;
2. BatchTopK's evaluation L0 (with its threshold) is within 10% of its k;
3. `quality` ranks the sweep as recovery does (Spearman).

    python -m benchmarks.kinds_recovery [--n-patches 1000000] [--out benchmarks/results/kinds-recovery]
"""

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.quality import recovery, spearman
from saev_jax import config, data, evaluation, plan, step, synthetic, training

SYNTH = synthetic.Synthetic(
    d_vit=64, n_features=256, k=8, noise=0.05, seed=2, n_imgs=2048, n_patches_per_img=64, layers=(-2,)
)
"""quality.py's setting B: about 8 active features per token."""


def sweep(base: config.Train, true_k: int) -> list[config.Train]:
    relu = config.grid(base, {"sae": {"sparsity_coeff": [0.008, 0.016, 0.032, 0.064, 0.128]}})
    topk_base = dataclasses.replace(base, sae=dataclasses.replace(base.sae, kind="topk"))
    topk = config.grid(
        dataclasses.replace(topk_base, seed=base.seed + 10), {"sae": {"k": [true_k // 2, true_k, 2 * true_k]}}
    )
    others = config.grid(
        dataclasses.replace(base, seed=base.seed + 20),
        {"sae": {"kind": ["batchtopk", "matryoshka"], "k": true_k}},
    )
    jump = config.grid(
        dataclasses.replace(base, seed=base.seed + 30), {"sae": {"kind": "jumprelu", "l0_coefficient": [1e-3, 4e-3]}}
    )
    return relu + topk + others + jump


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-patches", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--exp-factor", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/kinds-recovery")
    args = parser.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "shards"
        synthetic.write_shards(root, SYNTH)
        truth = np.load(root / "truth.npy")
        data_cfg = config.DataLoad(shard_root=str(root), patches="patches", layer=SYNTH.layers[0])
        acts = data.Activations(data_cfg)
        preprocess = data.make_preprocess(acts, data_cfg)
        x_ND = acts.read(np.arange(len(acts)))
    n = len(x_ND)
    sae_cfg = config.SparseAutoencoder(d_vit=SYNTH.d_vit, exp_factor=args.exp_factor, n_reinit_samples=n)
    base = config.Train(
        data=data_cfg, sae=sae_cfg, n_patches=args.n_patches, sae_batch_size=args.batch, n_lr_warmup=100,
        lr=args.lr, track=False, n_workers=1,
    )  # fmt: skip
    cfgs = sweep(base, int(SYNTH.k))
    for c in cfgs:
        config.validate(c)
    assert len(config.split_cfgs(cfgs)) == 1, "one group: one pass over the data"

    stacks = tuple(
        plan.StackPlan(idx, SYNTH.d_vit, cfgs[idx[0]].sae.d_sae, len(idx), len(idx)) for idx in plan.shapes_of(cfgs)
    )
    layout = training.Layout(cfgs, plan.Round(stacks, 0), plan.make_mesh(jax.devices()[:1]))
    state = layout.init_group_state(acts, preprocess)  # b_dec = the mean of the whole set
    B, n_steps = args.batch, training.n_train_steps(base)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-n_steps * B // n))])
    t0 = time.perf_counter()
    for i in range(n_steps):
        x_BD = jnp.asarray(x_ND[order[i * B : (i + 1) * B]])
        state, _ = step.train_step(state, layout.hparams, preprocess, x_BD, chunks=layout.chunks, mesh=layout.mesh)
    jax.block_until_ready(state)
    t_train = time.perf_counter() - t0
    print(
        f"trained {len(cfgs)} SAEs in {len(stacks)} stacks, {n_steps} steps, one pass: {t_train:.0f} s", file=sys.stderr
    )

    def batches():
        for start in range(0, n, B):
            x = x_ND[start : start + B]
            yield jnp.asarray(np.pad(x, ((0, B - len(x)), (0, 0)))), len(x)

    t0 = time.perf_counter()
    rows = [None] * len(cfgs)
    for indices, bundle, diverged_at in layout.real_saes(state):
        stride = max(1, -(-n // B) // -(-evaluation.QUALITY_EXAMPLES // B))  # as evaluate() does
        results = evaluation.metrics_from_stats(
            evaluation.accumulate(bundle, batches(), preprocess, quality_stride=stride)
        )
        for j, (i, r) in enumerate(zip(indices, results)):
            c = cfgs[i]
            rows[i] = dict(
                kind=c.sae.kind, label=c.sae.kind_label if c.sae.kind != "relu" else f"relu λ={c.sae.sparsity_coeff:g}", k=c.sae.k if c.sae.kind != "relu" else None,
                sparsity_coeff=c.sae.sparsity_coeff if c.sae.kind == "relu" else None,
                recovery=recovery(np.asarray(bundle.sae.W_dec[j]), truth), quality=r.quality, l0=r.l0,
                l0_batch=r.l0_batch, mse=r.mse, n_dead=r.n_dead, diverged=bool(diverged_at[j] >= 0),
            )  # fmt: skip
    t_eval = time.perf_counter() - t0

    true_k = int(SYNTH.k)
    best_relu = max((r for r in rows if r["kind"] == "relu"), key=lambda r: r["recovery"])
    topk_true = next(r for r in rows if r["kind"] == "topk" and r["k"] == true_k)
    btk = next(r for r in rows if r["kind"] == "batchtopk")
    rho = spearman([r["recovery"] for r in rows], [r["quality"] for r in rows])
    rho_relu_topk = spearman(*zip(*[(r["recovery"], r["quality"]) for r in rows if r["kind"] in ("relu", "topk")]))
    picked = max(rows, key=lambda r: r["quality"])
    checks = [
        (f"TopK k={true_k} recovery {topk_true['recovery']:.3f} >= best ReLU ({best_relu['label']}) {best_relu['recovery']:.3f}",
         topk_true["recovery"] >= best_relu["recovery"]),
        (f"BatchTopK k={btk['k']}: eval L0 (threshold) {btk['l0']:.2f}, within 10% of k: [{0.9 * btk['k']:.1f}, {1.1 * btk['k']:.1f}]",
         abs(btk["l0"] - btk["k"]) <= 0.1 * btk["k"]),
        (f"quality vs recovery, Spearman over the whole mixed sweep: {rho:+.2f} (ReLU and TopK only: {rho_relu_topk:+.2f}); "
         f"quality picks {picked['label']} (recovery {picked['recovery']:.3f}, best {max(r['recovery'] for r in rows):.3f})", rho > 0.5),
    ]  # fmt: skip
    lines = [
        f"Synthetic data: d_vit {SYNTH.d_vit}, {SYNTH.n_features} true features, about {SYNTH.k:g} active per token, noise {SYNTH.noise:g} "
        f"({n} examples). SAEs: d_sae {SYNTH.d_vit * args.exp_factor}, lr {args.lr:g} (warm-up 100 steps, then constant), batch {B}, "
        f"{n_steps} steps; {len(cfgs)} SAEs of {len({r['kind'] for r in rows})} kinds trained in one pass ({len(stacks)} stacks): "
        f"train {t_train:.0f} s, eval {t_eval:.0f} s on {jax.devices()[0].device_kind} (2 shared CPU cores).",
        "",
    ]
    lines += harness.table(
        ["SAE", "recovery", "quality", "L0 (eval)", "L0 (batch mode)", "MSE", "dead"],
        [[r["label"], f"{r['recovery']:.3f}", f"{r['quality']:.1f}", f"{r['l0']:.2f}",
          "" if r["l0_batch"] is None else f"{r['l0_batch']:.2f}", f"{r['mse']:.4f}", r["n_dead"]] for r in rows],
    )  # fmt: skip
    lines += ["", "Checks:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    md = (
        "\n".join(lines)
        + f"\n\nTotal wall time {time.perf_counter() - t_start:.0f} s. Command: `python -m benchmarks.kinds_recovery {' '.join(sys.argv[1:])}`\n"
    )
    harness.write(args.out, dict(args=vars(args), rows=rows, checks=[dict(text=t, ok=ok) for t, ok in checks]), md)


if __name__ == "__main__":
    main()
