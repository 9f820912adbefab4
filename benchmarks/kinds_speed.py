"""Step time of each SAE kind against ReLU at the same width, on this machine's default device.

    python -m benchmarks.kinds_speed [--d-vit 256 --exp-factor 16 --batch 4096 --n-saes 2 --repeats 7]

Each kind trains as its own one-stack group of `--n-saes` SAEs (one compiled step each); after two
warm-up steps, `--repeats` timed steps (each ended by `block_until_ready`), median reported, and the
ratio to ReLU measured in the same run. Writes benchmarks/results/kinds-speed-<platform>.{json,md}.
"""

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from saev_jax import config, data, plan, step, train

KINDS = {
    "relu": dict(),
    "topk": dict(k=32),
    "batchtopk": dict(k=32),
    "matryoshka": dict(k=32),
    "jumprelu": dict(),
}


def time_kind(kind: str, args) -> dict:
    sae = config.SparseAutoencoder(d_vit=args.d_vit, exp_factor=args.exp_factor, kind=kind, n_reinit_samples=0, **KINDS[kind])
    cfgs = [config.Train(sae_batch_size=args.batch, sae=dataclasses.replace(sae, seed=m)) for m in range(args.n_saes)]
    for c in cfgs:
        config.validate(c)
    n = len(cfgs)
    stacks = (plan.StackPlan(tuple(range(n)), args.d_vit, sae.d_sae, n, n),)
    layout = train.Layout(cfgs, plan.Round(stacks, 0), plan.make_mesh(jax.devices()[:1]))
    state = layout.init_state(None, None)
    pre = jax.device_put(data.Preprocess(clamp=1e5, act_mean=jnp.zeros(args.d_vit), scalar=jnp.float32(1.0)), layout.replicated)
    rng = np.random.default_rng(0)
    xs = [jax.device_put(jnp.asarray(rng.normal(size=(args.batch, args.d_vit)), jnp.float32), layout.replicated) for _ in range(4)]
    times = []
    for i in range(2 + args.repeats):
        t0 = time.perf_counter()
        state, metrics = step.train_step(state, layout.hparams, pre, xs[i % 4], chunks=layout.chunks, mesh=layout.mesh)
        jax.block_until_ready((state, metrics))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return dict(kind=kind, median_s=statistics.median(times), times_s=times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-vit", type=int, default=256)
    parser.add_argument("--exp-factor", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-saes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    rows = [time_kind(kind, args) for kind in KINDS]
    base = rows[0]["median_s"]
    d_sae = args.d_vit * args.exp_factor
    lines = [
        f"Train step of {args.n_saes} SAEs, d_vit {args.d_vit}, d_sae {d_sae}, batch {args.batch}, k = 32 for the TopK family, "
        f"on {jax.devices()[0].device_kind} ({platform}); median of {args.repeats} steps after 2 warm-up steps.",
        "",
        "| kind | median step (s) | vs relu |",
        "|---|---|---|",
    ]
    lines += [f"| {r['kind']} | {r['median_s']:.3f} | {r['median_s'] / base:.2f}x |" for r in rows]
    md = "\n".join(lines) + "\n"
    out = pathlib.Path(args.out or f"benchmarks/results/kinds-speed-{platform}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(args=vars(args), device=jax.devices()[0].device_kind, rows=rows), indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
