"""prune = "halving" against the full grid (issue 19): an 8-SAE ReLU sweep (4 learning rates x 2 target_l0)
trained through the real command (`python -m saev_jax.train`, one process per run, timed whole: start,
compile, data, training, evaluation, checkpoints) on the same synthetic shards, with and without pruning.

Reports the wall-time ratio (goal <= 0.65), that all 8 checkpoints are written in both, and per target
the best SAE's evaluation MSE with pruning over the full grid's best (goal within 2%). The two modes
take turns (`--repeats`), so a change in a shared machine's load hits both; medians are reported.

    python benchmarks/halving.py --n-patches 400000 --repeats 3 --out benchmarks/results/halving-cpu
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402

LRS = (1e-4, 3e-4, 1e-3, 3e-3)
TARGETS = (8, 32)


def sweep_text(shards: pathlib.Path, ckpt: pathlib.Path, args, prune: bool) -> str:
    return f"""
n_patches = {args.n_patches}
sae_batch_size = {args.batch_size}
log_every = 25
save_every = 0
track = false
lr = {list(LRS)}
ckpt_path = "{ckpt}"
n_workers = 1
{'prune = "halving"' if prune else ""}

[data]
shard_root = "{shards}"
layer = -1
n_random_samples = 4096

[sae]
d_vit = {args.d_vit}
exp_factor = {args.exp_factor}
target_l0 = {list(TARGETS)}
"""


def run_once(shards: pathlib.Path, tmp: pathlib.Path, args, prune: bool) -> dict:
    ckpt = tmp / ("halving" if prune else "full")
    shutil.rmtree(ckpt, ignore_errors=True)
    sweep = tmp / f"sweep-{'halving' if prune else 'full'}.toml"
    sweep.write_text(sweep_text(shards, ckpt, args, prune))
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(pathlib.Path(__file__).resolve().parent.parent))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "saev_jax.train", str(sweep)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    saes = []
    for dpath in sorted(ckpt.iterdir()):
        if (dpath / "metrics.json").is_file():
            cfg = json.loads((dpath / "cfg.json").read_text())
            m = json.loads((dpath / "metrics.json").read_text())
            saes.append({"lr": cfg["lr"], "target_l0": cfg["sae"]["target_l0"], "mse": m["mse"], "l0": m["l0"],
                         "stopped_at_step": m.get("stopped_at_step")})  # fmt: skip
    rungs = [line for line in proc.stderr.splitlines() if "rung " in line]
    return {"seconds": seconds, "n_checkpoints": len(saes), "saes": saes, "rung_lines": rungs,
            "phases": phases(proc.stderr, seconds)}  # fmt: skip


def phases(stderr: str, seconds: float) -> dict[str, float]:
    """Seconds from the first log line to the first compiled step, then to the start of evaluation (training),
    from the log's timestamps (`%(asctime)s`, millisecond resolution); the rest of the process's `seconds`
    (evaluation, writing, the summary, and the interpreter's start before the first log line)."""
    import datetime

    stamps = []
    for line in stderr.replace("\r", "\n").splitlines():
        try:
            t = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        stamps.append((t, line[24:]))
    if not stamps:
        return {}
    t0 = stamps[0][0]

    def first(text: str) -> float:
        return next(((t - t0).total_seconds() for t, rest in stamps if text in rest), float("nan"))

    train_start, eval_start = first("Compiled the step"), first("Evaluation:")
    return {"to_first_compile": train_start, "training": eval_start - train_start, "evaluation_and_after": seconds - eval_start,
            "process": seconds}  # fmt: skip


def best_mse(saes: list[dict], target: float) -> float:
    return min(s["mse"] for s in saes if s["target_l0"] == target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-patches", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--d-vit", type=int, default=64)
    parser.add_argument("--exp-factor", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/halving-cpu")
    args = parser.parse_args()

    from saev_jax import synthetic

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = pathlib.Path(tmp_s)
        shards = tmp / "shards"
        n_imgs = max(64, args.n_patches // 256 // 4)  # A quarter of the examples: about 4 epochs.
        synthetic.write_shards(shards, synthetic.Synthetic(
            d_vit=args.d_vit, n_features=4 * args.d_vit, k=8, n_imgs=n_imgs, n_patches_per_img=256,
            n_patches_per_shard=65536,
        ))  # fmt: skip
        runs = {"full": [], "halving": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(run_once(shards, tmp, args, prune=mode == "halving"))
                print(mode, f"{runs[mode][-1]['seconds']:.1f} s", file=sys.stderr)

    full_s = statistics.median(r["seconds"] for r in runs["full"])
    halving_s = statistics.median(r["seconds"] for r in runs["halving"])
    last_full, last_halving = runs["full"][-1], runs["halving"][-1]
    per_target = {
        t: {"full_best_mse": best_mse(last_full["saes"], t), "halving_best_mse": best_mse(last_halving["saes"], t)}
        for t in map(float, TARGETS)
    }
    for v in per_target.values():
        v["ratio"] = v["halving_best_mse"] / v["full_best_mse"]
    results = {
        "args": vars(args), "machine": harness.machine(), "full_seconds": [r["seconds"] for r in runs["full"]],
        "halving_seconds": [r["seconds"] for r in runs["halving"]], "wall_ratio": halving_s / full_s,
        "checkpoints": {"full": last_full["n_checkpoints"], "halving": last_halving["n_checkpoints"]},
        "per_target": per_target, "runs": runs,
    }  # fmt: skip
    lines = [
        "# prune = \"halving\" against the full grid (CPU)", "",
        harness.machine_line(results["machine"]), "",
        f"8 ReLU SAEs (lr {list(LRS)} x target_l0 {list(TARGETS)}), d_vit {args.d_vit}, d_sae {args.d_vit * args.exp_factor}, "
        f"{args.n_patches} examples in batches of {args.batch_size}; default rungs (0.25, 0.5), keep 0.5; "
        f"whole `python -m saev_jax.train` runs, {args.repeats} repeat(s) each, taking turns, medians. "
        "Phases from the log's timestamps: start to the first compiled step (statistics, planning, compiling), "
        "training (rungs and their recompiles included), then evaluation and writing.", "",
        *harness.table(["", "full grid", "halving", "ratio (goal <= 0.65)"], [
            ["wall seconds", f"{full_s:.1f}", f"{halving_s:.1f}", f"{halving_s / full_s:.3f}"],
            *[[f"of which {name.replace('_', ' ')} (last run)", f"{last_full['phases'].get(name, float('nan')):.1f}",
               f"{last_halving['phases'].get(name, float('nan')):.1f}", ""]
              for name in ("to_first_compile", "training", "evaluation_and_after")],
            ["checkpoints written", last_full["n_checkpoints"], last_halving["n_checkpoints"], ""],
        ]), "",
        *harness.table(["target_l0", "full grid best eval MSE", "halving best eval MSE", "ratio (goal <= 1.02)"], [
            [f"{t:g}", f"{v['full_best_mse']:.5g}", f"{v['halving_best_mse']:.5g}", f"{v['ratio']:.4f}"]
            for t, v in per_target.items()
        ]), "",
        "Rungs (last halving run):", "", *[f"- `{line.split('INFO')[-1].strip(' :')}`" for line in last_halving["rung_lines"]], "",
        f"Command: `python benchmarks/halving.py --n-patches {args.n_patches} --batch-size {args.batch_size} "
        f"--d-vit {args.d_vit} --exp-factor {args.exp_factor} --repeats {args.repeats}`", "",
    ]  # fmt: skip
    harness.write(args.out, results, "\n".join(lines))


if __name__ == "__main__":
    main()
