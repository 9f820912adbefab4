"""Issue 19's controller at work: ReLU SAEs asked for L0 = 8, 32, 128, 512 in one stack.

Synthetic activations (`saev_jax.synthetic`, d_vit 64, a known sparse dictionary) train one
stack of ReLU SAEs that start from the same sparsity coefficient and differ only in
`sae.target_l0` (plus one SAE without a target, the control: its coefficient must stay put).
Every SAE shares each batch (one `step.train_step` per batch). Records the batch L0 and the
coefficient in use every `--every` steps; writes the figure (L0 and lambda against steps, log
axes), a table of the final L0 (mean over the last 10% of steps, and the evaluation L0 on the
whole set) against each target, and the raw curves as JSON.

    python -m benchmarks.steer [--steps 3000] [--out benchmarks/results/steer-cpu]
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

from saev_jax import config, data, evaluation, plan, steer, step, synthetic, training

# `python benchmarks/steer.py` as well as -m
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402

SYNTH = synthetic.Synthetic(
    d_vit=64, n_features=512, k=8, noise=0.05, seed=3, n_imgs=2048, n_patches_per_img=64, layers=(-2,)
)
TARGETS = (8, 32, 128, 512)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--n-lr-warmup", type=int, default=100)
    parser.add_argument("--sparsity-coeff", type=float, default=0.016, help="every SAE's starting coefficient")
    parser.add_argument("--exp-factor", type=int, default=32)
    parser.add_argument("--every", type=int, default=10, help="record the metrics every this many steps")
    parser.add_argument("--out", default="benchmarks/results/steer-cpu")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="comma-separated target_l0 values")
    parser.add_argument("--d-vit", type=int, default=SYNTH.d_vit, help="width of the synthetic activations")
    parser.add_argument("--n-features", type=int, default=SYNTH.n_features, help="true features of the synthetic data")
    parser.add_argument("--true-k", type=float, default=SYNTH.k, help="true features active per token")
    args = parser.parse_args()
    synth = dataclasses.replace(SYNTH, d_vit=args.d_vit, n_features=args.n_features, k=args.true_k)
    targets = [int(t) for t in args.targets.split(",")]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "shards"
        synthetic.write_shards(root, synth)
        data_cfg = config.DataLoad(shard_root=str(root), patches="patches", layer=synth.layers[0])
        acts = data.Activations(data_cfg)
        preprocess = data.make_preprocess(acts, data_cfg)
        x_ND = acts.read(np.arange(len(acts)))
    n, B = len(x_ND), args.batch
    sae_cfg = config.SparseAutoencoder(
        d_vit=synth.d_vit, exp_factor=args.exp_factor, sparsity_coeff=args.sparsity_coeff, n_reinit_samples=n
    )
    base = config.Train(
        data=data_cfg, sae=sae_cfg, n_patches=(args.steps - 1) * B, sae_batch_size=B, lr=args.lr,
        n_lr_warmup=args.n_lr_warmup, track=False, n_workers=1,
    )  # fmt: skip
    cfgs = config.grid(base, {"sae": {"target_l0": targets}}) + [base]
    for c in cfgs:
        config.validate(c)
    assert len(config.split_cfgs(cfgs)) == 1 and len(plan.stacks_of(cfgs)) == 1, "one group, one stack"
    n_steps = training.n_train_steps(base)
    assert n_steps == args.steps

    layout = training.Layout(
        cfgs,
        plan.Round((plan.StackPlan(tuple(range(len(cfgs))), synth.d_vit, sae_cfg.d_sae, len(cfgs), len(cfgs)),), 0),
        plan.make_mesh(jax.devices()[:1]),
    )
    state = layout.init_group_state(acts, preprocess)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-n_steps * B // n))])
    steps, l0s, coeffs, pending = [], [], [], []
    t0 = time.perf_counter()
    for i in range(n_steps):
        x_BD = jnp.asarray(x_ND[order[i * B : (i + 1) * B]])
        state, (metrics,) = step.train_step(
            state, layout.hparams, preprocess, x_BD, chunks=layout.chunks, mesh=layout.mesh
        )
        pending.append((i, {k: metrics[k] for k in ("l0", "sparsity_coeff", "diverged")}))
        if len(pending) == args.every or i == n_steps - 1:
            got = jax.device_get(pending)  # one transfer per `every` steps
            for s, m in got:
                steps.append(s)
                l0s.append(np.asarray(m["l0"])[: len(cfgs)])
                coeffs.append(np.asarray(m["sparsity_coeff"])[: len(cfgs)])
                assert not np.any(m["diverged"]), s
            pending = []
    jax.block_until_ready(state)
    t_train = time.perf_counter() - t0
    l0s, coeffs = np.array(l0s), np.array(coeffs)
    print(f"trained {len(cfgs)} SAEs (d_sae {sae_cfg.d_sae}), {n_steps} steps of {B}: {t_train:.0f} s", file=sys.stderr)

    def batches():
        for start in range(0, n, B):
            x = x_ND[start : start + B]
            yield jnp.asarray(np.pad(x, ((0, B - len(x)), (0, 0)))), len(x)

    ((indices, bundle, _),) = layout.real_saes(state)
    results = evaluation.metrics_from_stats(evaluation.accumulate(bundle, batches(), preprocess, quality_stride=64))
    final_state = jax.device_get(bundle.kind_state)
    tail = slice(int(0.9 * len(steps)), None)
    rows = []
    for j, i in enumerate(indices):
        c, r = cfgs[i], results[j]
        target = c.sae.target_l0
        l0_tail = float(np.mean(l0s[tail, j]))
        rows.append(dict(
            target_l0=target, start_coeff=c.sae.sparsity_coeff, final_coeff=float(coeffs[-1, j]),
            l0_last10pct=l0_tail, l0_eval=float(r.l0), mse_eval=float(r.mse), n_dead=int(r.n_dead),
            smoothed_l0=float(steer.smoothed_l0(jax.tree.map(lambda a: a[j], final_state))),
            rel_err_eval=None if target is None else float(r.l0) / target - 1,
        ))  # fmt: skip

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(out.with_suffix(".png"), np.array(steps), l0s, coeffs, cfgs, n_steps)
    machine = harness.machine()
    lines = [
        harness.machine_line(machine),
        "",
        f"Synthetic data: d_vit {synth.d_vit}, {synth.n_features} true features, about {synth.k:g} active per token ({n} examples). "
        f"One stack of {len(cfgs)} ReLU SAEs, d_sae {sae_cfg.d_sae}, every one starting at sparsity_coeff {args.sparsity_coeff:g}; "
        f"lr {args.lr:g} (warm-up {args.n_lr_warmup} steps), batch {B}, {n_steps} steps; controller GAIN {steer.GAIN:g}, "
        f"MAX_CHANGE {steer.MAX_CHANGE:g}, MIN_BOUND {steer.MIN_BOUND:g}, EMA_DECAY {steer.EMA_DECAY:g}. Train {t_train:.0f} s on {jax.devices()[0].device_kind}.",
        "",
    ]
    lines += harness.table(
        ["target_l0", "final λ", "batch L0 (last 10%)", "eval L0", "eval L0 / target − 1", "eval MSE", "dead"],
        [["none" if r["target_l0"] is None else f"{r['target_l0']:g}", f"{r['final_coeff']:.4g}", f"{r['l0_last10pct']:.1f}",
          f"{r['l0_eval']:.1f}", "" if r["rel_err_eval"] is None else f"{r['rel_err_eval']:+.1%}", f"{r['mse_eval']:.4f}",
          r["n_dead"]] for r in rows],
    )  # fmt: skip
    ok = all(abs(r["rel_err_eval"]) <= 0.1 for r in rows if r["target_l0"] is not None)
    control = rows[-1]
    lines += [
        "",
        f"- {'PASS' if ok else 'FAIL'}: every target's evaluation L0 within 10%.",
        f"- {'PASS' if control['final_coeff'] == float(np.float32(args.sparsity_coeff)) else 'FAIL'}: the SAE without a target kept "
        f"sparsity_coeff = {control['final_coeff']:g}.",
        "",
        f"Figure: `{out.with_suffix('.png').name}`. Total wall time {time.perf_counter() - t_start:.0f} s. "
        f"Command: `python -m benchmarks.steer {' '.join(sys.argv[1:])}`",
    ]
    every = slice(None, None, 10)  # the JSON keeps every 10th step; the figure has them all
    curves = dict(steps=steps[every], l0=l0s[every].T.tolist(), coeff=coeffs[every].T.tolist())
    md = "\n".join(lines) + "\n"
    harness.write(out, dict(args=vars(args), machine=machine, rows=rows, curves=curves), md, indent=None)


def plot(fpath, steps, l0s, coeffs, cfgs, n_steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l0, ax_c) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, c in enumerate(cfgs):
        t = c.sae.target_l0
        label = f"target_l0 = {t:g}" if t is not None else "no target"
        color = colors[j % len(colors)] if t is not None else "0.5"
        ax_l0.plot(steps, l0s[:, j], color=color, lw=1, label=label)
        if t is not None:
            ax_l0.axhline(t, color=color, ls=":", lw=1)
        ax_c.plot(steps, coeffs[:, j], color=color, lw=1, label=label)
    ax_l0.set(yscale="log", ylabel="batch L0", title="ReLU SAEs steered to an L0 (dotted: targets)")
    ax_c.set(yscale="log", ylabel="sparsity coefficient λ", xlabel="step", xlim=(0, n_steps))
    ax_l0.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fpath, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
