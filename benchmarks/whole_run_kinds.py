"""The whole run of a TopK sweep against a ReLU sweep of the same size, on the same shards, phase by phase.

Each sweep runs `python -m saev_jax.train`'s command line in a fresh process (imports count),
its phases timed as benchmarks/whole_run.py times them (by wrapping the package's functions in
the child; nothing in the package changes). Same synthetic shards, same number of SAEs, width,
batch and patches; the sweeps differ in `sae.kind` (and the TopK family's k).

    python -m benchmarks.whole_run_kinds [--d-vit 256] [--exp 16] [--k 32] [--n-patches 200000]
        [--batch 1024] [--out benchmarks/results/whole-run-kinds-cpu]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from benchmarks.whole_run import PHASES, time_phases  # noqa: E402

LRS = (1e-3, 2e-3, 4e-3, 8e-3)
"""The 4 SAEs of each sweep."""


def child(args) -> dict:
    times, loop = time_phases(args.launched)
    from saev_jax import train

    sweep = pathlib.Path(args.tmp) / "sweep.toml"
    sweep.write_text(f"lr = {list(LRS)}\n")
    kind = ["--sae.kind", args.child] + (["--sae.k", str(args.k)] if args.child != "relu" else [])
    t0 = time.perf_counter()
    train.cli([
        str(sweep), "--data.shard-root", args.shards, "--data.layer", "-2", "--data.patches", "patches",
        "--sae.d-vit", str(args.d_vit), "--sae.exp-factor", str(args.exp), *kind, "--n-patches", str(args.n_patches),
        "--sae-batch-size", str(args.batch), "--no-track", "--ckpt-path", str(pathlib.Path(args.tmp) / "ckpt"),
        "--n-workers", "2", "--log-every", "25",
    ])  # fmt: skip
    times["total in cli"] = time.perf_counter() - t0
    times["train"] = loop["train"] - times.get("b_dec init", 0.0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-vit", type=int, default=256)
    parser.add_argument("--exp", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--n-patches", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--kinds", default="relu,topk")
    parser.add_argument("--out", default="benchmarks/results/whole-run-kinds-cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    from saev_jax import synthetic

    synth = dict(d_vit=args.d_vit, n_features=8 * args.d_vit, k=16, noise=0.05, zipf_exponent=1.0, n_imgs=500,
                 n_patches_per_img=256, layers=(-2,), seed=14)  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = pathlib.Path(tmp) / "shards"
        synthetic.write_shards(shards, synthetic.Synthetic(**synth))
        for kind in args.kinds.split(","):
            work = pathlib.Path(tmp) / kind
            work.mkdir()
            t0 = time.time()
            cmd = [sys.executable, "-m", "benchmarks.whole_run_kinds", "--child", kind, "--launched", repr(t0),
                   "--shards", str(shards), "--tmp", str(work), "--d-vit", str(args.d_vit), "--exp", str(args.exp),
                   "--k", str(args.k), "--n-patches", str(args.n_patches), "--batch", str(args.batch)]  # fmt: skip
            env = os.environ | {
                "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]),
                "WANDB_MODE": "disabled",
            }
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
            times = json.loads(proc.stdout.strip().splitlines()[-1])
            times["end to end"] = time.time() - t0
            times["other"] = times["end to end"] - sum(times.get(p, 0.0) for p in PHASES)
            results[kind] = times
            print(kind, json.dumps({k: round(v, 1) for k, v in times.items()}), file=sys.stderr, flush=True)
    kinds = list(results)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [
        f"{harness.machine_line(harness.machine())} Shared with other jobs; {when}.",
        "",
        f"4 SAEs per sweep (lr {', '.join(map(str, LRS))}), d_vit {args.d_vit}, d_sae {args.d_vit * args.exp}, "
        f"batch {args.batch}, {args.n_patches:,} patches, on the same synthetic shards (128,000 examples); TopK "
        f"family k {args.k}. Seconds per phase of `python -m saev_jax.train`.",
        "",
        f"`python -m benchmarks.whole_run_kinds --d-vit {args.d_vit} --exp {args.exp} --k {args.k} "
        f"--n-patches {args.n_patches} --batch {args.batch} --kinds {args.kinds}`",
        "",
        *harness.table(
            ["phase", *kinds], [[p, *(fmt(results[k].get(p)) for k in kinds)] for p in (*PHASES, "other", "end to end")]
        ),  # fmt: skip
        "",
    ]
    if "relu" in results:
        lines += [
            f"End to end, {k} / relu: **{results[k]['end to end'] / results['relu']['end to end']:.2f}x**; "
            f"train phase: {results[k]['train'] / results['relu']['train']:.2f}x."
            for k in kinds
            if k != "relu"
        ]
    harness.write(args.out, {"args": vars(args), "synth": synth, "results": results}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
