"""Soak test of resuming: random SIGKILLs of `python -m saev_jax.train`, then the same command again.

    python -m benchmarks.soak [--kills 20] [--seed 0] [--out benchmarks/results] [--skip-overhead]

Not part of the test suite (minutes of CPU). In a temporary directory it writes a small
synthetic shard set and a sweep of two groups (two batch sizes) of three SAEs each, with
`save_every` small, then:

1. trains the sweep once, uninterrupted (the reference);
2. runs the same command on a second `ckpt_path`, kills it with SIGKILL at a uniformly random
   moment of the first 60% of the reference's duration (start-up, statistics, training,
   evaluation or writing; a resumed run has less left to do), and starts it again, `--kills`
   times or until a run ends before its kill; then lets it finish;
3. compares the two: every config has exactly one checkpoint on each side, and each file of it
   (`sae.safetensors`, `metrics.json`, and any other file but `cfg.json`, whose `ckpt_path`
   differs) is bit-identical; nothing half-written is left in the soaked `ckpt_path`;
4. measures snapshots at a real size (SAEs of d_vit 1024 x d_sae 16384 with their Adam
   moments): save, find (checksums) and restore times, on this machine's disk.

Results go to <out>/soak-cpu.json and <out>/soak-cpu.md. The exit status is 0 only if every
restart after a kill ran without an error, and the final checkpoints equal the reference's.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import harness

# The soaked processes train on the CPU: deterministic kernels, so bit-identity is expected.
ENV = os.environ | {"JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
CHECKED_SUFFIXES = (".safetensors", ".json")


def write_inputs(workdir: pathlib.Path, save_every: int) -> pathlib.Path:
    """Shards and a sweep file; returns the sweep's path."""
    from saev_jax import config, synthetic

    shard_root = workdir / "shards"
    if not (shard_root / "metadata.json").exists():
        synthetic.write_shards(
            shard_root,
            synthetic.Synthetic(
                d_vit=32, n_features=128, k=4, n_imgs=512, n_patches_per_img=16, n_patches_per_shard=4096
            ),
        )
    has_save_every = "save_every" in {f.name for f in dataclasses.fields(config.Train)}
    sweep = workdir / "sweep.toml"
    sweep.write_text(
        f"""
n_patches = 400000
sae_batch_size = [256, 512]
log_every = 10
track = false
n_lr_warmup = 20
n_workers = 1
device = "cpu"
{f"save_every = {save_every}" if has_save_every else "# this saev_jax has no save_every"}

[data]
shard_root = "{shard_root}"
layer = -1
n_random_samples = 4096

[sae]
d_vit = 32
exp_factor = 4
sparsity_coeff = [1e-4, 1e-3, 1e-2]
n_reinit_samples = 2048
"""
    )
    return sweep


def command(sweep: pathlib.Path, ckpt_dpath: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "saev_jax.train", str(sweep), "--ckpt-path", str(ckpt_dpath)]


def run_to_end(cmd: list[str], log_fpath: pathlib.Path) -> tuple[int, float]:
    """Runs `cmd` to its end; (exit status, seconds)."""
    t0 = time.perf_counter()
    with open(log_fpath, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV).returncode
    return rc, time.perf_counter() - t0


def soak(cmd: list[str], n_kills: int, t_ref: float, rng: random.Random, logs_dpath: pathlib.Path) -> list[dict]:
    """Kills `cmd` at random moments `n_kills` times, restarting it each time; then lets it finish."""
    cycles = []
    for i in range(n_kills + 1):
        log_fpath = logs_dpath / f"cycle-{i:03d}.log"
        kill_at = rng.uniform(0.0, 0.6 * t_ref) if i < n_kills else None
        t0 = time.perf_counter()
        with open(log_fpath, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
            try:
                proc.wait(timeout=kill_at)
                killed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
        text = log_fpath.read_text(errors="replace")
        cycle = {
            "cycle": i,
            "kill_at_s": None if kill_at is None else round(kill_at, 2),
            "killed": killed,
            "rc": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 2),
            "resumed": re.findall(r"resuming (\S+) from step (\d+)", text),
            "skipped_lines": sum("skipping" in line.lower() for line in text.splitlines()),
        }
        if not killed and proc.returncode != 0:
            cycle["error_tail"] = text[-2000:]
        cycles.append(cycle)
        print(json.dumps({k: v for k, v in cycle.items() if k != "error_tail"}), flush=True)
        if not killed:
            break
    return cycles


def checkpoints(ckpt_dpath: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Run directories by their config (cfg.json without ckpt_path)."""
    found: dict[str, list[pathlib.Path]] = {}
    for cfg_fpath in sorted(ckpt_dpath.glob("*/cfg.json")):
        cfg = json.loads(cfg_fpath.read_text())
        cfg.pop("ckpt_path", None)
        found.setdefault(json.dumps(cfg, sort_keys=True), []).append(cfg_fpath.parent)
    return found


def compare(ref_dpath: pathlib.Path, soak_dpath: pathlib.Path) -> dict:
    """Bit-identity of every checkpoint file, config by config, and leftovers in the soaked directory."""
    ref, got = checkpoints(ref_dpath), checkpoints(soak_dpath)
    problems = []
    n_files = 0
    for key, ref_dpaths in ref.items():
        got_dpaths = got.get(key, [])
        name = ref_dpaths[0].name
        if len(got_dpaths) != 1:
            problems.append(f"config of reference run {name}: {len(got_dpaths)} checkpoints after the soak")
            continue
        for fpath in sorted(ref_dpaths[0].iterdir()):
            if fpath.name == "cfg.json" or not fpath.name.endswith(CHECKED_SUFFIXES):
                continue
            other = got_dpaths[0] / fpath.name
            n_files += 1
            if not other.is_file():
                problems.append(f"{other}: missing")
            elif other.read_bytes() != fpath.read_bytes():
                problems.append(f"{other}: differs from the reference's {fpath}")
    problems += [f"{len(v)} checkpoint(s) of a config the reference lacks" for k, v in got.items() if k not in ref]
    # Temporary names of half-written checkpoints or snapshots must not survive a finished run.
    leftovers = [str(p.relative_to(soak_dpath)) for p in soak_dpath.rglob("*") if ".tmp" in p.name]
    return {
        "n_configs": len(ref),
        "n_files_compared": n_files,
        "identical": not problems and n_files > 0,
        "problems": problems,
        "leftovers": leftovers,
    }


def measure_overhead(dpath: pathlib.Path, n_saes: int, repeats: int = 3) -> dict:
    """Save, find and restore times of a snapshot of `n_saes` SAEs at d_vit 1024, d_sae 16384, with Adam moments."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from saev_jax import snapshot

    d_vit, d_sae = 1024, 16384
    rng = np.random.default_rng(0)

    def params():
        return {
            "W_enc": jnp.asarray(rng.standard_normal((n_saes, d_vit, d_sae), np.float32)),
            "b_enc": jnp.asarray(rng.standard_normal((n_saes, d_sae), np.float32)),
            "W_dec": jnp.asarray(rng.standard_normal((n_saes, d_sae, d_vit), np.float32)),
            "b_dec": jnp.asarray(rng.standard_normal((n_saes, d_vit), np.float32)),
        }

    state = {"saes": params(), "mu": params(), "nu": params(), "step": jnp.int32(1000)}
    n_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    save_s, latest_s, restore_s = [], [], []
    for i in range(repeats + 1):  # The first round warms up the page cache and the allocator.
        t0 = time.perf_counter()
        fpath = snapshot.save(dpath, 1000 + i, state, {"step": 1000 + i})
        t1 = time.perf_counter()
        step, found = snapshot.latest(dpath)
        t2 = time.perf_counter()
        restored, _ = snapshot.restore(found, state)
        jax.block_until_ready(restored)
        t3 = time.perf_counter()
        assert found == fpath and step == 1000 + i
        if i:
            save_s.append(t1 - t0)
            latest_s.append(t2 - t1)
            restore_s.append(t3 - t2)
        del restored
    snapshot.clear(dpath)
    return {
        "n_saes": n_saes,
        "d_vit": d_vit,
        "d_sae": d_sae,
        "gib": round(n_bytes / 2**30, 3),
        "save_s": round(statistics.median(save_s), 2),
        "latest_s": round(statistics.median(latest_s), 2),
        "restore_s": round(statistics.median(restore_s), 2),
        "save_gib_per_s": round(n_bytes / 2**30 / statistics.median(save_s), 2),
    }


def step_seconds_h200() -> float | None:
    """Seconds per step of 8 ViT-L SAEs (d_vit 1024, d_sae 16384, batch 4096) on an H200, from benchmarks/results."""
    fpath = pathlib.Path(__file__).parent / "results" / "gpu-nvidia-h200.json"
    try:
        rows = json.loads(fpath.read_text())
    except (OSError, ValueError):
        return None
    for row in rows.get("in_memory", []):
        want = {"size": "vitl", "M": 8, "batch_size": 4096, "variant": "vmap", "precision": "float32"}
        if all(row.get(k) == v for k, v in want.items()):
            return row["seconds_per_step"]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the run is let finish")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument(
        "--save-every", type=int, default=5, help="steps between snapshots (if this saev_jax has save_every)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument(
        "--workdir", type=pathlib.Path, default=None, help="kept afterwards (default: a temporary directory)"
    )
    parser.add_argument("--skip-overhead", action="store_true", help="skip the real-size snapshot timings")
    parser.add_argument("--overhead-saes", type=int, default=2, help="SAEs in the real-size snapshot")
    args = parser.parse_args()

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="saev-soak-")
        args.workdir = pathlib.Path(tmp.name)
    workdir = args.workdir
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    sweep = write_inputs(workdir, args.save_every)

    ref_dpath, soak_dpath = workdir / "ref", workdir / "soak"
    for dpath in (ref_dpath, soak_dpath):
        if dpath.exists():
            raise SystemExit(f"error: {dpath} exists; use a fresh --workdir")
    rc, t_ref = run_to_end(command(sweep, ref_dpath), workdir / "logs" / "reference.log")
    if rc != 0:
        print((workdir / "logs" / "reference.log").read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"error: the reference run failed with exit status {rc}")
    print(f"reference run: {t_ref:.1f} s", flush=True)

    cycles = soak(command(sweep, soak_dpath), args.kills, t_ref, random.Random(args.seed), workdir / "logs")
    survived = sum(c["killed"] for c in cycles)
    finished = not cycles[-1]["killed"] and cycles[-1]["rc"] == 0
    errors = [c for c in cycles if not c["killed"] and c["rc"] != 0]
    result = {
        "command": " ".join(sys.argv),
        "reference_s": round(t_ref, 1),
        "kills": survived,
        "cycles_that_resumed": sum(bool(c["resumed"]) for c in cycles),
        "finished": finished,
        "cycles": cycles,
        "comparison": compare(ref_dpath, soak_dpath) if finished else None,
    }
    if not args.skip_overhead:
        result["snapshot_real_size"] = measure_overhead(workdir / "overhead", args.overhead_saes)
        t_step = step_seconds_h200()
        if t_step:
            per_sae = result["snapshot_real_size"]["save_s"] / args.overhead_saes
            # save_every that keeps 8 ViT-L SAEs' snapshots under 1% of their H200 training time.
            result["h200_vitl_m8"] = {
                "step_s": round(t_step, 4),
                "save_s_here_for_8": round(8 * per_sae, 2),
                "save_every_for_1pct": int(100 * 8 * per_sae / t_step) + 1,
            }
    ok = finished and not errors and result["comparison"]["identical"] and not result["comparison"]["leftovers"]
    result["ok"] = ok
    harness.write(args.out / "soak-cpu", result, report(result))
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


def report(r: dict) -> str:
    lines = [
        "# Soak: SIGKILL and resume (CPU)",
        "",
        f"`{r['command']}`",
        "",
        f"- reference run, uninterrupted: {r['reference_s']} s",
        f"- SIGKILLs survived: {r['kills']} (cycles that printed `resuming ... from step N`: {r['cycles_that_resumed']})",
        f"- final run finished cleanly: {r['finished']}",
    ]
    c = r["comparison"]
    if c:
        lines.append(
            f"- final checkpoints bit-identical to the reference: {c['identical']} "
            f"({c['n_files_compared']} files of {c['n_configs']} configs)"
        )
        lines += [f"  - {p}" for p in c["problems"][:20]]
        lines.append(f"- half-written leftovers: {c['leftovers'] or 'none'}")
    errors = [x for x in r["cycles"] if not x["killed"] and x["rc"] != 0]
    for x in errors:
        lines += [f"- cycle {x['cycle']} failed with exit status {x['rc']}:", "", "```", x["error_tail"][-1500:], "```"]
    if "snapshot_real_size" in r:
        s = r["snapshot_real_size"]
        lines += [
            "",
            f"Snapshot of {s['n_saes']} SAEs (d_vit {s['d_vit']}, d_sae {s['d_sae']}) with Adam moments, "
            f"{s['gib']} GiB, on this machine's disk: save {s['save_s']} s ({s['save_gib_per_s']} GiB/s, "
            f"fsync included), find with checksums {s['latest_s']} s, restore {s['restore_s']} s (medians of 3).",
        ]
        if "h200_vitl_m8" in r:
            h = r["h200_vitl_m8"]
            lines.append(
                f"With 8 such SAEs at {h['step_s']} s per step (H200, benchmarks/results/gpu-nvidia-h200.json), "
                f"a save of about {h['save_s_here_for_8']} s costs under 1% of training at save_every >= "
                f"{h['save_every_for_1pct']} steps (if that machine's disk writes as fast as this one's)."
            )
    lines.append("")
    lines.append(f"Result: {'PASS' if r['ok'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
