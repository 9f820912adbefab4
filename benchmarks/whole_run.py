"""The whole run, end to end: `python -m saev_jax.train` against the original loop on the same shards.

Each program runs in a fresh process (so imports count), on the same synthetic shard set, and
reports where its seconds go. saev_jax's phases are timed by wrapping its functions in the child
process (nothing in the package changes); the baseline is `benchmarks/torch_baseline.py`'s
faithful loop with saev's statistics, b_dec init, evaluation and checkpoint writing around it,
written plainly here.

    python benchmarks/whole_run.py [--cases real small] [--out benchmarks/results/whole-run-cpu]

Cases (issue 8's table):
- real: real-activation-like 384-d data, 128,000 examples; 4 SAEs exp 8, 150k patches, batch 1024.
- small: synthetic 128-d, 128,000 examples; 4 SAEs exp 8, 200k patches, batch 1024.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

# The report's machine line and files. The harness imports the standard library only, so the children's import times stay theirs.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `python benchmarks/whole_run.py` as well as -m
from benchmarks import harness  # noqa: E402

CASES = {
    # Heavy-tailed (log-normal magnitudes), anisotropic (Zipf feature frequencies: a few directions
    # carry most of the variance), non-zero mean (a per-layer offset), noisy: what a ViT layer's
    # patch activations look like to an SAE, at DINOv2-S width.
    "real": dict(
        synth=dict(
            d_vit=384,
            n_features=3072,
            k=24,
            noise=0.1,
            zipf_exponent=1.0,
            n_imgs=500,
            n_patches_per_img=256,
            layers=(-2,),
            seed=11,
        ),
        n_patches=150_000,
    ),
    "small": dict(
        synth=dict(
            d_vit=128,
            n_features=1024,
            k=8,
            noise=0.05,
            zipf_exponent=1.0,
            n_imgs=500,
            n_patches_per_img=256,
            layers=(-2,),
            seed=12,
        ),
        n_patches=200_000,
    ),
    # A smoke test of this script, not a measurement.
    "tiny": dict(
        synth=dict(d_vit=32, n_features=64, k=4, n_imgs=64, n_patches_per_img=64, layers=(-2,), seed=13),
        n_patches=5_000,
    ),
}
N_SAES, EXP, BATCH, LRS = 4, 8, 1024, (1e-3, 2e-3, 4e-3, 8e-3)
PHASES = ("imports", "statistics", "b_dec init", "compile", "train", "eval", "quality", "plots", "writing", "summary")


# ---------------------------------------------------------------------------------------------
# Children: each runs one program and prints a JSON line of phase timings.


def _timed(times: dict, key: str, fn):
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    return wrapper


def time_phases(launched: float) -> tuple[dict, dict]:
    """Imports saev_jax and wraps its phases to time them: (times by phase, times of the training loop).

    The training loop (`training.train_pruned`, which `train_round` calls) runs the b_dec init
    too: a phase's `train` is the loop's time less the b_dec init. The step is compiled before
    the loop, beside the statistics.
    """
    times = {"imports": time.time() - launched}  # interpreter start-up and imports, as a user waits for them
    t0 = time.perf_counter()
    from saev_jax import checkpoint, data, evaluation, plots, summary, training

    times["imports"] += time.perf_counter() - t0
    loop = {}
    data.make_preprocess = _timed(times, "statistics", data.make_preprocess)
    training.init_b_dec = _timed(times, "b_dec init", training.init_b_dec)
    training.Layout.compile_within_limit = _timed(times, "compile", training.Layout.compile_within_limit)
    training.train_pruned = _timed(loop, "train", training.train_pruned)
    evaluation.accumulate = _timed(times, "eval", evaluation.accumulate)
    evaluation.metrics_from_stats = _timed(times, "quality", evaluation.metrics_from_stats)
    plots.save_plots = _timed(times, "plots", plots.save_plots)
    plots.wandb_images = _timed(times, "plots", plots.wandb_images)
    checkpoint.save = _timed(times, "writing", checkpoint.save)
    summary.summarize = _timed(times, "summary", summary.summarize)
    return times, loop


def child_jax(args, launched: float) -> dict:
    times, loop = time_phases(launched)
    from saev_jax import train

    sweep = pathlib.Path(args.tmp) / "sweep.toml"
    sweep.write_text(f"lr = {list(LRS)}\n")
    t0 = time.perf_counter()
    train.cli([
        str(sweep), "--data.shard-root", args.shards, "--data.layer", "-2", "--data.patches", "patches",
        "--sae.d-vit", str(args.d_vit), "--sae.exp-factor", str(EXP), "--n-patches", str(args.n_patches), "--sae-batch-size", str(BATCH),
        "--no-track", "--ckpt-path", str(pathlib.Path(args.tmp) / "ckpt-jax"), "--n-workers", "2", "--log-every", "25",
    ])  # fmt: skip
    times["total in cli"] = time.perf_counter() - t0
    times["train"] = loop["train"] - times.get("b_dec init", 0.0)
    return times


def child_torch(args, launched: float) -> dict:
    """The original's whole run: saev's statistics over a random subset read example by example,
    b_dec from a random sample, the training loop, its evaluation pass, a torch.save per SAE."""
    times = {"imports": time.time() - launched}
    t0 = time.perf_counter()
    import dataclasses

    import numpy as np
    import torch
    import wandb  # noqa: F401  saev imports wandb at start-up

    from benchmarks import torch_baseline as tb
    from saev_jax import config, data

    times["imports"] += time.perf_counter() - t0
    torch.set_num_threads(os.cpu_count())

    t0 = time.perf_counter()
    data_cfg = config.DataLoad(shard_root=args.shards, layer=-2, patches="patches", scale_mean=False, scale_norm=False)
    dataset = data.Dataset(data_cfg)
    # saev's get_stats: a random subset of n_random_samples examples through a DataLoader.
    n = min(config.DataLoad().n_random_samples, len(dataset))
    subset = torch.utils.data.Subset(dataset, np.random.default_rng(42).permutation(len(dataset))[:n].tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=1024, num_workers=2, shuffle=False)
    acts = torch.cat([b["act"] for b in loader])
    dataset.act_mean = acts.mean(0)
    dataset.scalar = float(((acts - dataset.act_mean).norm(dim=1)).mean() / np.sqrt(acts.shape[1]))
    times["statistics"] = time.perf_counter() - t0

    d_vit = dataset.d_vit
    cfgs = [
        config.Train(data=data_cfg, n_workers=2, sae_batch_size=BATCH, n_patches=args.n_patches, log_every=25,
                     lr=lr, sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=EXP, seed=m))
        for m, lr in enumerate(LRS)
    ]  # fmt: skip
    device = torch.device("cpu")
    saes = tb.make_saes(cfgs, device)
    t0 = time.perf_counter()
    idx = np.random.default_rng(cfgs[0].sae.seed).permutation(len(dataset))[: cfgs[0].sae.n_reinit_samples].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=1024, num_workers=2)
    mean = torch.cat([b["act"] for b in loader]).mean(0)
    with torch.no_grad():
        for sae in saes:
            sae.b_dec.copy_(mean)
    times["b_dec init"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trainer = tb.Trainer(saes, [tb.Hparams.from_cfg(c) for c in cfgs])
    tb.train(
        trainer,
        tb.batches(tb.make_dataloader(cfgs[0], dataset), cfgs[0].n_patches),
        device,
        log_every=25,
        on_log=lambda *_: None,
    )
    times["train"] = time.perf_counter() - t0

    # saev's evaluate: one ordered pass, every SAE on every batch, counts and sums in float.
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=2, shuffle=False)
    S = saes[0].W_enc.shape[1]
    fired = torch.zeros(len(saes), S)
    values = torch.zeros(len(saes), S)
    sq_err = torch.zeros(len(saes))
    with torch.no_grad():
        for batch in loader:
            x = batch["act"]
            for m, sae in enumerate(saes):
                f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
                x_hat = f @ sae.W_dec + sae.b_dec
                fired[m] += (f > 0).sum(0)
                values[m] += f.sum(0)
                sq_err[m] += ((x_hat - x) ** 2).sum()
    metrics = [
        dict(l0=float(fired[m].sum() / len(dataset)), mse=float(sq_err[m] / len(dataset) / d_vit))
        for m in range(len(saes))
    ]
    times["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = pathlib.Path(args.tmp) / "ckpt-torch"
    for m, (sae, cfg) in enumerate(zip(saes, cfgs)):
        (out / str(m)).mkdir(parents=True, exist_ok=True)
        torch.save(sae.state_dict(), out / str(m) / "sae.pt")
        (out / str(m) / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg), default=str))
        (out / str(m) / "metrics.json").write_text(json.dumps(metrics[m]))
    times["writing"] = time.perf_counter() - t0
    return times


# ---------------------------------------------------------------------------------------------


def run_child(program: str, shards: pathlib.Path, n_patches: int, d_vit: int, tmp: pathlib.Path) -> dict:
    t0 = time.time()
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", program, "--launched", repr(t0),
           "--shards", str(shards), "--n-patches", str(n_patches), "--d-vit", str(d_vit), "--tmp", str(tmp)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{program} child failed:\n{proc.stderr[-4000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    times["end to end"] = wall
    times["other"] = wall - sum(times.get(p, 0.0) for p in PHASES)
    return times


def report(results: dict) -> str:
    lines = []
    for case, r in results.items():
        c = CASES[case]
        s = c["synth"]
        lines += [
            f"### {case}: d_vit {s['d_vit']}, {s['n_imgs'] * s['n_patches_per_img']:,} examples, "
            f"{N_SAES} SAEs exp {EXP}, {c['n_patches']:,} patches, batch {BATCH}", "",
        ]  # fmt: skip
        fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        lines += harness.table(["phase", "original (torch loop) s", "saev_jax s"],
                               [[p, fmt(r["torch"].get(p)), fmt(r["jax"].get(p))] for p in (*PHASES, "other", "end to end")])  # fmt: skip
        lines += [
            "",
            f"End to end: saev_jax is **{r['torch']['end to end'] / r['jax']['end to end']:.2f}x** the original's speed.",
            "",
        ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=["real", "small"], choices=list(CASES))
    parser.add_argument("--out", default="benchmarks/results/whole-run-cpu")
    parser.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--n-patches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--d-vit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        times = (child_jax if args.child == "jax" else child_torch)(args, args.launched)
        print(json.dumps(times))
        return

    from saev_jax import synthetic

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            root = pathlib.Path(tmp) / case
            synthetic.write_shards(root / "shards", synthetic.Synthetic(**CASES[case]["synth"]))
            results[case] = {}
            for program in ("torch", "jax"):
                work = root / program
                work.mkdir()
                results[case][program] = run_child(
                    program, root / "shards", CASES[case]["n_patches"], CASES[case]["synth"]["d_vit"], work
                )
                print(
                    case,
                    program,
                    json.dumps({k: round(v, 1) for k, v in results[case][program].items()}),
                    file=sys.stderr,
                    flush=True,
                )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = f"{harness.machine_line(harness.machine())} Shared with other jobs; {when}.\n\n" + report(results)
    harness.write(args.out, {"cases": {k: CASES[k] for k in results}, "results": results}, md)


if __name__ == "__main__":
    main()
