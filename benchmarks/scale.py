"""The step at real sizes: memory planned against measured, and throughput against chunk size and devices.

    python benchmarks/scale.py [--quick]          # CPU: one subprocess per case, 4 forced CPU devices
    python benchmarks/scale.py --gpu              # on a GPU: saev's classification.toml group at full size

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


def run_case(d_vit: int, exp: int, m: int, batch: int, n_devices: int, chunk: int, steps: int, precision: str) -> dict:
    """One case, in this process: returns its row."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from saev_jax import config, data, plan, step, train

    base = config.Train(
        sae_batch_size=batch, n_devices=n_devices, sae_chunk=chunk, precision=precision, track=False,
        sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=exp, n_reinit_samples=0),
    )  # fmt: skip
    cfgs = [dataclasses.replace(base, lr=1e-4 * (1 + i), sae=dataclasses.replace(base.sae, seed=i)) for i in range(m)]
    group_plan, mesh = train.plan_group(cfgs)
    if len(group_plan.rounds) != 1:
        return {"skipped": f"needs {len(group_plan.rounds)} rounds"}
    layout = train.Layout(cfgs, group_plan.rounds[0], mesh, group_plan.limit)
    preprocess = data.Preprocess(1e5, np.zeros(d_vit, np.float32), 1.0)
    t0 = time.perf_counter()
    compiled, xla_peak = layout.compile(preprocess)
    compile_s = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = layout.init_state(None, preprocess)
    pre = jax.device_put(preprocess, layout.replicated)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (batch, d_vit)), layout.replicated)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        state, metrics = compiled(state, layout.hparams, pre, x)
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
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) and print its row
    args = parser.parse_args()
    if args.case:
        print("ROW " + json.dumps(run_case(**json.loads(args.case))))
        return
    if args.gpu:
        cases = [dict(d_vit=1024, exp=32, m=12, batch=16384, n_devices=1, chunk=c, steps=5, precision="float32") for c in (1, 2, 4, 12)]
        env, name = dict(os.environ), "gpu"
    else:
        d, b, steps = (128, 1024, 3) if args.quick else (256, 4096, 3)
        cases = [dict(d_vit=d, exp=16, m=8, batch=b, n_devices=n, chunk=c, steps=steps, precision="float32")
                 for n, c in ((1, 8), (1, 4), (1, 2), (1, 1), (2, 4), (4, 2), (4, 1))]  # fmt: skip
        env, name = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4"), "cpu"
    rows = []
    for case in cases:
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True, text=True)
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
