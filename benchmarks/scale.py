"""The step at real sizes: memory planned against measured, and throughput against chunk size and devices.

    python benchmarks/scale.py [--quick]          # CPU: one subprocess per case, 4 forced CPU devices
    python benchmarks/scale.py --gpu              # on a GPU: saev's classification.toml group at full size
    python benchmarks/scale.py --calibrate        # per kind x chunk x devices: the planner's estimate / XLA's peak
    python benchmarks/scale.py --whole SHARDS     # per kind: planned / XLA / peak RSS of a whole `saev_jax.train` run

`--calibrate` compiles only (nothing is allocated) and prints the ratios that
`plan.ACTIVATION_COPIES` is fitted to. `--whole` runs the CLI (train, evaluate, write) at
d_vit 256, exp 32, batch 16384 on the shards in SHARDS (`saev_jax.synthetic`), one process per
case under the planner's own choice and forced chunks, and measures the peak resident memory of
the whole process (`wait4`'s ru_maxrss): results/scale-whole-cpu.{json,md}. Run big cases under
`flock /tmp/bigmem.lock` on a shared machine.

Each case runs in its own process (so peak memory is its own): builds a group's state with
the planner's layout, compiles the step once (XLA's memory analysis), runs warm-up steps then
timed steps with a device sync, and reports the median step time, SAE-examples/s, the planned
bytes per device, XLA's estimate and the measured peak (CPU: the process's peak resident memory
above its baseline before the state was built; GPU: `peak_bytes_in_use`).

CPU figures: fake CPU devices share the machine's cores, so throughput against device count
says nothing about real multi-device speed; the memory columns are the point there.
Results: benchmarks/results/scale-<platform>.{json,md}.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"


def run_case(
    d_vit: int, exp: int, m: int, batch: int, n_devices: int, chunk: int, steps: int, precision: str, kind: str = "relu"
) -> dict:
    """One case, in this process: returns its row."""
    import dataclasses

    import jax
    import numpy as np

    from saev_jax import config, data, training

    base = config.Train(
        sae_batch_size=batch, n_devices=n_devices, sae_chunk=chunk, precision=precision, track=False,
        sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=exp, n_reinit_samples=0, kind=kind),
    )  # fmt: skip
    cfgs = [dataclasses.replace(base, lr=1e-4 * (1 + i), sae=dataclasses.replace(base.sae, seed=i)) for i in range(m)]
    group_plan, mesh = training.plan_group(cfgs)
    if len(group_plan.rounds) != 1:
        return {"skipped": f"needs {len(group_plan.rounds)} rounds"}
    layout = training.Layout(cfgs, group_plan.rounds[0], mesh, group_plan.limit)
    preprocess = data.Preprocess(1e5, np.zeros(d_vit, np.float32), 1.0)
    t0 = time.perf_counter()
    compiled = layout.compile(preprocess)
    xla_peak = compiled.peak_bytes
    compile_s = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = layout.init_group_state(None, preprocess)
    pre = jax.device_put(preprocess, layout.replicated)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (batch, d_vit)), layout.replicated)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        state, metrics = compiled.step(state, layout.hparams, pre, x)
        jax.block_until_ready((state, metrics))
        if i >= 2:  # Two warm-up steps.
            times.append(time.perf_counter() - t)
    stats = jax.local_devices()[0].memory_stats()
    measured = stats["peak_bytes_in_use"] if stats and "peak_bytes_in_use" in stats else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    ) // n_devices  # fmt: skip
    sec = statistics.median(times)
    flops = 12 * batch * d_vit * d_vit * exp * m
    return {
        "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
        "d_vit": d_vit, "d_sae": d_vit * exp, "M": m, "batch": batch, "n_devices": n_devices, "precision": precision,
        "chunk": layout.chunks[0], "seconds_per_step": sec, "sae_examples_per_s": batch * m / sec,
        "tflops": flops / sec / 1e12, "compile_s": compile_s,
        "planned_bytes_per_device": group_plan.rounds[0].planned_bytes, "xla_bytes_per_device": xla_peak,
        "measured_bytes_per_device": int(measured), "limit": group_plan.limit, "limit_source": group_plan.limit_source,
        "n_steps_timed": steps,
    }  # fmt: skip


KINDS = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")


def calibrate(real: bool = False) -> None:
    """Prints, per kind, chunk and device count, XLA's peak and the planner's estimate (compiles only).

    `real`: at d_vit 256, exp 32, batch 16384, 16 SAEs on one device instead (chunks 1 and 4; slow to compile).
    """
    import dataclasses

    import jax

    from saev_jax import config, plan, training

    shapes = ((256, 32, 16384, 16),) if real else ((64, 16, 512, 8), (64, 32, 4096, 4))
    for d_vit, exp, batch, m in shapes:
        for kind in KINDS:
            base = config.Train(
                sae_batch_size=batch,
                sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=exp, kind=kind, n_reinit_samples=0, k=8, k_aux=32),
            )
            cfgs = [dataclasses.replace(base, sae=dataclasses.replace(base.sae, seed=i)) for i in range(m)]
            for n_dev in (1,) if real else (1, 4):
                for chunk in (1, 4) if real else sorted({1, 2, m // n_dev}):
                    s = plan.StackPlan(tuple(range(m)), d_vit, d_vit * exp, m, chunk, kind)
                    xla = (
                        training.Layout(cfgs, plan.Round((s,), 0), plan.make_mesh(jax.devices()[:n_dev]))
                        .compile()
                        .peak_bytes
                    )
                    est = plan.estimate([s], n_dev, batch)
                    print(f"{d_vit}x{d_vit * exp} batch {batch} M {m} {kind:10s} devices {n_dev} chunk {chunk}: "
                          f"XLA {xla / 2**20:8.2f} MiB, estimate {est / 2**20:8.2f} MiB, estimate/XLA {est / xla:.3f}", flush=True)  # fmt: skip


WHOLE_SWEEP = """
n_patches = {n_patches}
sae_batch_size = 16384
log_every = 1
track = false
ckpt_path = "{ckpt}"
n_workers = 1
sae_chunk = {chunk}

[data]
shard_root = "{shards}"
layer = -1
n_random_samples = 8192

[sae]
kind = "{kind}"
d_vit = {d_vit}
exp_factor = 32
seed = {seeds}
"""


def whole(shards: str, cases: list[dict]) -> list[dict]:
    """Runs `python -m saev_jax.train` per case; returns planned / XLA (from its log) and its peak RSS."""
    import re
    import tempfile

    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            sweep = pathlib.Path(tmp) / "sweep.toml"
            seeds = list(range(case["m"]))
            sweep.write_text(WHOLE_SWEEP.format(n_patches=16384 * case.get("steps", 2), ckpt=f"{tmp}/ckpt", chunk=case["chunk"],
                                                shards=shards, kind=case["kind"], d_vit=case["d_vit"], seeds=seeds))  # fmt: skip
            env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
            t0 = time.perf_counter()
            with open(pathlib.Path(tmp) / "log.txt", "w+") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "saev_jax.train", str(sweep)], env=env, stdout=log, stderr=log
                )
                _, status, usage = os.wait4(proc.pid, 0)
                log.seek(0)
                text = log.read()
            n_metrics = len(list(pathlib.Path(f"{tmp}/ckpt").glob("*/metrics.json")))
        planned = [float(x) for x in re.findall(r"planned ([\d.]+) GiB per device", text)]
        xla = [float(x) for x in re.findall(r"XLA: ([\d.]+) GiB per device", text)]
        chunks = re.findall(r"chunk (\d+), planned", text)
        row = dict(case, exit_status=os.waitstatus_to_exitcode(status), seconds=time.perf_counter() - t0,
                   planned_gib=max(planned, default=None), xla_gib=max(xla, default=None), chunk_used=chunks[-1] if chunks else None,
                   peak_rss_gib=usage.ru_maxrss / 2**20, ram_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                   n_metrics_json=n_metrics, last_line=(text.strip().splitlines() or [""])[-1][:200])  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def whole_markdown(rows: list[dict], title: str) -> str:
    head = (
        "| kind | M | d_vit x d_sae | sae_chunk flag | chunk used | train step GiB (planned, XLA-checked) | "
        "largest XLA GiB (train or evaluation step) | peak RSS GiB (whole run) | RAM GiB | metrics.json | exit | s |"
    )
    lines = [f"# {title}", "", head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['m']} | {r['d_vit']} x {r['d_vit'] * 32} | {r['chunk'] or 'none'} | {r['chunk_used']} | "
            f"{r['planned_gib']} | {r['xla_gib']} | {r['peak_rss_gib']:.2f} | {r['ram_gib']:.1f} | {r['n_metrics_json']}/{r['m']} | "
            f"{r['exit_status']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def to_markdown(rows: list[dict], title: str) -> str:
    head = "| d_vit x d_sae | M | batch | devices | chunk | s/step | SAE-ex/s | planned GiB/dev | XLA GiB/dev | measured GiB/dev |"
    lines = [f"# {title}", "", head, "|" + "---|" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} |")
            continue
        lines.append(
            f"| {r['d_vit']} x {r['d_sae']} | {r['M']} | {r['batch']} | {r['n_devices']} | {r['chunk']} | "
            f"{r['seconds_per_step']:.3f} | {r['sae_examples_per_s']:,.0f} | {gib(r['planned_bytes_per_device'])} | "
            f"{gib(r['xla_bytes_per_device'])} | {gib(r['measured_bytes_per_device'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="classification.toml's group of 12 at full size on one GPU")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller CPU cases")
    parser.add_argument("--calibrate", action="store_true", help="estimate / XLA per kind, chunk and device count")
    parser.add_argument("--real", action="store_true", help="--calibrate at d_vit 256, exp 32, batch 16384, 16 SAEs")
    parser.add_argument(
        "--whole", metavar="SHARDS", help="whole CLI runs at d_vit 256 on these shards: peak RSS per kind"
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help="--whole: comma-separated kinds")
    parser.add_argument("--m", type=int, default=4, help="--whole: SAEs per run")
    parser.add_argument("--chunks", default="0", help="--whole: comma-separated sae_chunk values (0: the planner's)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) and print its row
    args = parser.parse_args()
    if args.case:
        print("ROW " + json.dumps(run_case(**json.loads(args.case))))
        return
    if args.calibrate:
        if "JAX_NUM_CPU_DEVICES" not in os.environ:  # Four CPU devices, set before JAX starts.
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        calibrate(args.real)
        return
    if args.whole:
        cases = [
            dict(kind=k, m=args.m, d_vit=256, chunk=int(c))
            for k in args.kinds.split(",")
            for c in args.chunks.split(",")
        ]
        rows = whole(args.whole, cases)
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / "scale-whole-cpu.json"
        old = json.loads(out.read_text()) if out.is_file() else []
        (RESULTS / "scale-whole-cpu.json").write_text(json.dumps(old + rows, indent=1) + "\n")
        title = f"Whole-run peak memory (cpu; {time.strftime('%Y-%m-%d')})"
        (RESULTS / "scale-whole-cpu.md").write_text(whole_markdown(old + rows, title))
        print(whole_markdown(rows, title))
        return
    if args.gpu:
        cases = [
            dict(d_vit=1024, exp=32, m=12, batch=16384, n_devices=1, chunk=c, steps=5, precision="float32")
            for c in (1, 2, 4, 12)
        ]
        env, name = dict(os.environ), "gpu"
    else:
        d, b, steps = (128, 1024, 3) if args.quick else (256, 4096, 3)
        cases = [dict(d_vit=d, exp=16, m=8, batch=b, n_devices=n, chunk=c, steps=steps, precision="float32")
                 for n, c in ((1, 8), (1, 4), (1, 2), (1, 1), (2, 4), (4, 2), (4, 1))]  # fmt: skip
        env, name = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4"), "cpu"
    rows = []
    for case in cases:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True, text=True
        )
        row = next((json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")), None)
        if row is None:
            row = {"skipped": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        row["case"] = case
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scale-{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    title = f"Step memory and throughput ({name}; {time.strftime('%Y-%m-%d')})"
    (RESULTS / f"scale-{name}.md").write_text(to_markdown(rows, title))
    print(to_markdown(rows, title))


if __name__ == "__main__":
    main()
