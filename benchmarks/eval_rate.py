"""Evaluation's per-example rate against training's, per SAE kind, data in memory.

    python -m benchmarks.eval_rate [--d-vit 256] [--d-sae 4096] [--k 32] [--batch 4096] [--n-saes 2]
        [--stride 32] [--repeats 5] [--kinds relu,topk,batchtopk,matryoshka,jumprelu] [--out PATH]

For each kind, one stack of `--n-saes` SAEs: two training steps (so BatchTopK's threshold is
set), then timed round-robin over kinds (`harness.time_interleaved`, each call ended by a device sync): one training step (`step.train_step`) and one
evaluation batch (`evaluation._accumulate`, with `quality`'s sampled sums on 1 example in
`--stride`, the default on data sets of >= 65,536 examples) on the same batch. The rate ratio is
training's time per batch over evaluation's: >= 1 means evaluating an example costs no more
than training on it. Writes benchmarks/results/eval-rate-<platform>.{json,md} unless --out.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from saev_jax import config, data, evaluation, kinds, plan, step

from . import harness


def make_runners(kind: str, args):
    extra = dict(k=args.k) if kind in ("topk", "batchtopk", "matryoshka") else {}
    sae = config.SparseAutoencoder(
        d_vit=args.d_vit, exp_factor=args.d_sae // args.d_vit, kind=kind, n_reinit_samples=0, **extra
    )
    cfgs = [config.Train(sae_batch_size=args.batch, sae=dataclasses.replace(sae, seed=m)) for m in range(args.n_saes)]
    mesh = plan.make_mesh(jax.devices()[:1])
    state, hp = step.init_single(kinds.make_stack(cfgs), step.Hparams.from_cfgs(cfgs), mesh)
    pre = data.Preprocess(clamp=1e5, act_mean=jnp.zeros(args.d_vit), scalar=jnp.float32(1.0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.d_vit)), jnp.float32)
    box = {"state": state}

    def train():
        box["state"], metrics = step.train_step(box["state"], hp, pre, x, chunks=(args.n_saes,), mesh=mesh)
        box["out"] = (box["state"], metrics)

    train.sync = lambda: harness.sync(box["out"])
    train(), train(), train.sync()
    stack = box["state"].stacks[0]
    # Copies: the train step donates (and so deletes) the state it is given.
    inference = jax.tree.map(jnp.copy, kinds.Inference(stack.saes, stack.kind_state, hp[0].kind))
    sums = [jax.device_put(evaluation._zero_sums(args.n_saes, sae.d_sae, args.d_vit))]
    n_valid, offset = jnp.asarray(args.batch, jnp.int32), jnp.asarray(3, jnp.int32)

    def ev():
        sums[0], code, n = evaluation._accumulate(
            sums[0], inference, pre, x, n_valid, offset, stride=args.stride, chunk=args.n_saes
        )
        box["ev"] = (sums[0], code, n)

    ev.sync = lambda: harness.sync(box["ev"])
    return train, ev


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-vit", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-saes", type=int, default=2)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", default="relu,topk,batchtopk,matryoshka,jumprelu")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    platform, device = jax.devices()[0].platform, jax.devices()[0].device_kind
    runners = {}
    for kind in args.kinds.split(","):
        runners[kind, "train"], runners[kind, "eval"] = make_runners(kind, args)
    timed = harness.time_interleaved(runners, n_warmup=1, n_repeats=args.repeats, min_repeat_s=0.0, max_s=1e9)
    rows = []
    for kind in args.kinds.split(","):
        tr, ev = timed[kind, "train"], timed[kind, "eval"]
        t, e = tr["seconds"], ev["seconds"]
        rows.append(dict(kind=kind, train_s=t, eval_s=e, eval_rate_vs_train=t / e, train_times_s=tr["times"],
                         eval_times_s=ev["times"]))  # fmt: skip
    machine = harness.machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Evaluation vs training per example, {device} ({platform}), {when}: {args.n_saes} SAEs per kind, d_vit {args.d_vit}, "
        f"d_sae {args.d_sae}, k {args.k} (TopK family), batch {args.batch}, quality sampled 1 in {args.stride}; medians of "
        f"{args.repeats} round-robin repeats.",
        "",
        "`python -m benchmarks.eval_rate "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
        + "`",
        "",
        *harness.table(["kind", "train step (s)", "eval batch (s)", "eval rate / train rate"]),
    ]
    lines += [harness.row([r["kind"], f"{r['train_s']:.3f}", f"{r['eval_s']:.3f}", f"{r['eval_rate_vs_train']:.2f}"])
              for r in rows]  # fmt: skip
    lines += ["", harness.machine_line(machine)]
    out = args.out or f"benchmarks/results/eval-rate-{platform}"
    harness.write(
        out, dict(args=vars(args), device=device, when=when, machine=machine, rows=rows), "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
