"""Step time of each SAE kind against ReLU at the same width, on this machine's default device.

    python -m benchmarks.kinds_speed [--d-vit 1024] [--d-sae 16384] [--k 32] [--batch 4096] [--n-saes 1]
        [--repeats 5] [--kinds relu,topk,batchtopk,matryoshka,jumprelu] [--dense] [--out PATH]

Each kind trains as its own one-stack group of `--n-saes` SAEs (one compiled step each). All
kinds are compiled and warmed up first (two steps each); then the timed steps go round-robin
over the kinds, `--repeats` rounds (`harness.time_interleaved`: each repeat ended by a device
sync), so a shared machine's load falls on every kind alike. Medians are reported with the ratio to ReLU measured
in the same run. `--dense` also times the TopK family's dense reference step (`dense_loss`),
as `<kind>-dense`. Several `--d-sae`/`--k` values (comma-separated) give a grid; results are
appended to the json/md at `--out` (default benchmarks/results/kinds-speed-<platform>).
"""

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from saev_jax import config, data, plan, step, training

from . import harness

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


def make_runner(kind: str, d_vit: int, d_sae: int, k: int, args):
    """A function that runs one timed train step of a fresh stack of `kind` (after compiling it)."""
    dense = kind.endswith("-dense")
    name = kind.removesuffix("-dense")
    extra = dict(k=k) if name in TOPK_FAMILY else {}
    sae = config.SparseAutoencoder(d_vit=d_vit, exp_factor=d_sae // d_vit, kind=name, n_reinit_samples=0, **extra)
    cfgs = [config.Train(sae_batch_size=args.batch, sae=dataclasses.replace(sae, seed=m)) for m in range(args.n_saes)]
    for c in cfgs:
        config.validate(c)
    n = len(cfgs)
    stacks = (plan.StackPlan(tuple(range(n)), d_vit, sae.d_sae, n, n),)
    layout = training.Layout(cfgs, plan.Round(stacks, 0), plan.make_mesh(jax.devices()[:1]))
    state = layout.init_group_state(None, None)
    hparams = layout.hparams
    if dense:  # k_max = d_sae: `kinds.sparse.use_sparse` sends the stack to its dense reference step.
        hparams = tuple(dataclasses.replace(hp, kind=dataclasses.replace(hp.kind, k_max=d_sae)) for hp in hparams)
    pre = jax.device_put(
        data.Preprocess(clamp=1e5, act_mean=jnp.zeros(d_vit), scalar=jnp.float32(1.0)), layout.replicated
    )
    rng = np.random.default_rng(0)
    xs = [
        jax.device_put(jnp.asarray(rng.normal(size=(args.batch, d_vit)), jnp.float32), layout.replicated)
        for _ in range(2)
    ]
    box = {"state": state, "i": 0, "out": None, "overflow": []}

    def run():
        box["state"], metrics = step.train_step(
            box["state"], hparams, pre, xs[box["i"] % 2], chunks=layout.chunks, mesh=layout.mesh
        )
        box["i"] += 1
        box["out"] = (box["state"], metrics)
        if "select_overflow" in metrics[0]:  # steps the sparse loss redid densely (kinds' exact fallback)
            box["overflow"].append(metrics[0]["select_overflow"])

    run.sync = lambda: harness.sync(box["out"])
    run.overflow = lambda: (
        float(np.mean([np.any(np.asarray(o) > 0) for o in box["overflow"]])) if box["overflow"] else None
    )
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-vit", type=int, default=1024)
    parser.add_argument("--d-sae", default="16384", help="comma-separated")
    parser.add_argument("--k", default="32", help="comma-separated; the TopK family's k")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n-saes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", default="relu,topk,batchtopk,matryoshka,jumprelu")
    parser.add_argument("--dense", action="store_true", help="also time the TopK family's dense reference step")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    device = jax.devices()[0].device_kind
    out = pathlib.Path(args.out or f"benchmarks/results/kinds-speed-{platform}")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    runs = json.loads(json_path.read_text()) if json_path.exists() and args.out else []
    if not isinstance(runs, list):
        runs = []
    kinds = args.kinds.split(",")
    if args.dense:
        kinds += [f"{k}-dense" for k in kinds if k in TOPK_FAMILY]
    for d_sae in [int(s) for s in args.d_sae.split(",")]:
        for k in [int(s) for s in args.k.split(",")]:
            runners = {kind: make_runner(kind, args.d_vit, d_sae, k, args) for kind in kinds}
            timed = harness.time_interleaved(runners, n_warmup=1, n_repeats=args.repeats, min_repeat_s=0.0, max_s=1e9)
            med = {kind: t["seconds"] for kind, t in timed.items()}
            base = med.get("relu")
            rows = [
                dict(kind=kind, median_s=med[kind], vs_relu=med[kind] / base if base else None,
                     times_s=timed[kind]["times"], overflow_frac=runners[kind].overflow())
                for kind in kinds
            ]  # fmt: skip
            del runners
            run = dict(d_vit=args.d_vit, d_sae=d_sae, k=k, batch=args.batch, n_saes=args.n_saes, repeats=args.repeats,
                       device=device, platform=platform, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       machine=harness.machine(), rows=rows)  # fmt: skip
            runs.append(run)
            print(f"d_vit {args.d_vit} d_sae {d_sae} k {k} batch {args.batch}: " + ", ".join(
                f"{r['kind']} {r['median_s']:.2f}s" + (f" ({r['vs_relu']:.2f}x)" if r["vs_relu"] else "") for r in rows), flush=True)  # fmt: skip
            json_path.write_text(json.dumps(runs, indent=1, default=str) + "\n")
    lines = [
        f"Train step time per kind against ReLU's, {device} ({platform}). One stack of n SAEs per kind; all kinds "
        "compiled and warmed up, then timed round-robin; medians; `vs relu` measured in the same run.",
        "",
        *sorted({harness.machine_line(run["machine"]) for run in runs if "machine" in run}),
        "",
        "`fallback`: the fraction of this kind's steps (all, warm-up included) that some SAE's sparse loss "
        "overflowed, so its chunk was redone densely (`select_overflow`); - for kinds without a sparse loss.",
        "",
        *harness.table(["d_vit", "d_sae", "k", "batch", "n", "kind", "median step (s)", "vs relu", "fallback", "when"]),
    ]
    for run in runs:
        for r in run["rows"]:
            ratio = f"{r['vs_relu']:.2f}x" if r["vs_relu"] else "-"
            fallback = "-" if r.get("overflow_frac") is None else f"{r['overflow_frac']:.2f}"
            cells = [run["d_vit"], run["d_sae"], run["k"], run["batch"], run["n_saes"], r["kind"]]
            lines.append(harness.row([*cells, f"{r['median_s']:.3f}", ratio, fallback, run["when"]]))
    harness.write(out, runs, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
