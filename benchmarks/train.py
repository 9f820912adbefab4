"""How fast saev_jax trains SAEs, against the original PyTorch loop (benchmarks/torch_baseline.py).

    python -m benchmarks.train [--quick] [--sizes small medium] [--ms 1 4 8 16] [--out DIR]

In one run on one device it measures:
- the device's matmul peak: a large float32 matmul (full float32, no TF32), and bfloat16 on
  accelerators;
- with data in memory (one batch already on the device), for every size and M: the steady-state
  throughput of (a) saev_jax's vmapped step on one stack of M SAEs, in float32 and bfloat16,
  (b) saev_jax one SAE at a time (M stacks of one, one `train_step` call each per batch),
  (c) the torch baseline (M modules, a Python loop, one backward each);
- end to end from shards written by `saev_jax.synthetic`: (a) through the real trainer,
  `saev_jax.train.train` with its `Loader`, in float32 and bfloat16, and (c) with saev's
  per-example `Dataset` behind a torch `DataLoader`;
- the accuracy cost of bfloat16: final eval MSE and L0 of the end-to-end runs, bf16 against
  float32 (same data, seeds and batches).

Every figure is a median over timed repeats that follow a warm-up, with an explicit device sync
(`jax.block_until_ready` / `torch.cuda.synchronize`) closing each repeat. Throughput is counted
in SAE-examples/s (examples/s x M) and in FLOP/s at 12 * d_vit * d_sae FLOPs per example per SAE
(forward: two matmuls; backward: four), also as a fraction of the measured peak. Measurements
that would not fit their time box are skipped and say so. Results go to <out>/<device>.json,
<out>/<device>.md and <out>/<device>-scaling.png, rewritten after every measurement.
"""

import os

# JAX and torch share the accelerator: JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import gc
import importlib
import itertools
import json
import logging
import pathlib
import re
import statistics
import sys
import tempfile
import time
import types
import warnings

import numpy as np


class _Missing(types.ModuleType):
    """Stands in for an optional package that is not installed; any use of it fails loudly."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ModuleNotFoundError(f"{self.__name__} is not installed (benchmarks/train.py replaced it with a stub)")


def _stub_missing(*names: str) -> list[str]:
    """Lets saev_jax import where `tyro` (its CLI) or `wandb` (its logging) is missing, as on a bare
    GPU machine. Nothing this benchmark runs calls either. Returns the names it stubbed."""
    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _Missing(name)
            stubbed.append(name)
    return stubbed


STUBBED = _stub_missing("tyro", "wandb")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from benchmarks import harness, torch_baseline  # noqa: E402
from saev_jax import config, data, evaluation, plan, step, synthetic, training  # noqa: E402
from saev_jax import sae as sae_lib  # noqa: E402

logger = logging.getLogger("benchmarks.train")

SIZES = {"small": (128, 1024), "medium": (512, 4096), "vitb": (768, 12288), "vitl": (1024, 16384)}
"""name -> (d_vit, d_sae)."""
LARGE = ("vitb", "vitl")
"""Sizes measured on accelerators only."""
VARIANTS = {
    "vmap": "(a) saev_jax, vmapped stack of M",
    "one-by-one": "(b) saev_jax, M stacks of 1",
    "torch": "(c) torch baseline",
    "torch-1t": "(c') torch baseline, 1 thread",
}


def flops_per_example(d_vit: int, d_sae: int) -> int:
    """Matmul FLOPs of one training example for one SAE: 2 forward and 4 backward matmuls."""
    return 12 * d_vit * d_sae


# ---------------------------------------------------------------- devices


def describe_devices() -> dict[str, object]:
    """What this run ran on: JAX's backend and devices, torch's device, the CPU model."""
    cpu_model = harness.cpu_model()
    backend = jax.default_backend()
    jax_device = jax.devices()[0]
    torch_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    name = (
        "cpu"
        if backend == "cpu"
        else f"{backend}-{re.sub(r'[^a-z0-9]+', '-', jax_device.device_kind.lower()).strip('-')}"
    )
    return {
        "name": name,
        "jax_backend": backend,
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_device_kind": jax_device.device_kind,
        "torch_device": str(torch_device),
        "torch_device_name": torch.cuda.get_device_name() if torch_device.type == "cuda" else cpu_model,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_at_start": os.getloadavg(),
        "stubbed_imports": STUBBED,
    }


def torch_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- timing (benchmarks/harness.py)


class MatmulRunner:
    """An n x n @ n x n JAX matmul: float32 at full precision (as saev_jax's float32 step), or bf16 with float32 accumulation."""

    def __init__(self, dtype, n: int):
        key_a, key_b = jax.random.split(jax.random.key(0))
        self.a, self.b = jax.random.normal(key_a, (n, n), dtype), jax.random.normal(key_b, (n, n), dtype)
        if dtype == jnp.float32:
            self.matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
        else:
            self.matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        self.flops, self.out = 2 * n**3, None

    def __call__(self) -> None:
        self.out = self.matmul(self.a, self.b)

    def sync(self) -> None:
        jax.block_until_ready(self.out)


def matmul_peak(dtype, n: int, args) -> dict[str, object]:
    """FLOP/s of MatmulRunner(dtype, n): the median of 7 timed repeats after a warm-up."""
    runner = MatmulRunner(dtype, n)
    t = harness.time_interleaved(
        {"peak": runner}, n_warmup=2, n_repeats=7, min_repeat_s=args.min_repeat_s, max_s=args.max_measure_s
    )["peak"]
    return {"dtype": jnp.dtype(dtype).name, "n": n, "flops_per_s": runner.flops / t["seconds"]} | t


# ---------------------------------------------------------------- configs and runners


def make_cfgs(d_vit: int, d_sae: int, n_saes: int, batch_size: int, precision: str, **kwargs) -> list[config.Train]:
    """A group of `n_saes` configs that differ where a sweep would (lr, sparsity coefficient, seed)."""
    lrs, coeffs = (3e-4, 1e-3, 3e-3), (4e-4, 1e-3, 4e-3, 1e-2)
    return [
        config.Train(
            sae_batch_size=batch_size,
            precision=precision,
            lr=lrs[m % len(lrs)],
            sae=config.SparseAutoencoder(
                d_vit=d_vit, exp_factor=d_sae // d_vit, seed=m, sparsity_coeff=coeffs[m % len(coeffs)]
            ),
            **kwargs,
        )
        for m in range(n_saes)
    ]


class VmappedGroup:
    """(a) One stack of M SAEs, one `training.train_step` per batch; metrics leave the device every `log_every` steps, as in `training.train`."""

    def __init__(self, cfgs: list[config.Train], x_BD: jax.Array, log_every: int):
        self.mesh = plan.make_mesh(jax.devices()[:1])
        saes = sae_lib.make_saes([c.sae for c in cfgs], cfgs[0].precision)
        self.state, self.hparams = step.init_single(saes, step.Hparams.from_cfgs(cfgs), self.mesh)
        self.chunks = (len(cfgs),)
        d_vit = x_BD.shape[1]
        self.preprocess = data.Preprocess(clamp=1e5, act_mean=np.zeros(d_vit, np.float32), scalar=1.0)
        self.x_BD, self.log_every, self.n_steps = x_BD, log_every, 0

    def __call__(self) -> None:
        self.state, metrics = step.train_step(
            self.state, self.hparams, self.preprocess, self.x_BD, chunks=self.chunks, mesh=self.mesh
        )
        if self.n_steps % self.log_every == 0:
            jax.device_get(metrics)
        self.n_steps += 1

    def sync(self) -> None:
        jax.block_until_ready(self.state)


class OneByOne:
    """(b) M stacks of one SAE; each batch is M `training.train_step` calls."""

    def __init__(self, cfgs: list[config.Train], x_BD: jax.Array, log_every: int):
        self.groups = [VmappedGroup([cfg], x_BD, log_every) for cfg in cfgs]

    def __call__(self) -> None:
        for group in self.groups:
            group()

    def sync(self) -> None:
        for group in self.groups:
            group.sync()


class TorchLoop:
    """(c) The torch baseline on one in-memory batch: M modules, a Python loop, `.item()` logging every `log_every` steps.

    `n_threads` sets torch's intra-op threads for its calls (None: torch's default, as saev).
    """

    DEFAULT_THREADS = torch.get_num_threads()

    def __init__(
        self,
        cfgs: list[config.Train],
        x_BD: np.ndarray,
        device: torch.device,
        log_every: int,
        n_threads: int | None = None,
    ):
        self.device, self.n_threads = device, n_threads or self.DEFAULT_THREADS
        saes = torch_baseline.make_saes(cfgs, device)
        self.trainer = torch_baseline.Trainer(saes, [torch_baseline.Hparams.from_cfg(c) for c in cfgs])
        self.x_BD = torch.from_numpy(x_BD).to(device)
        self.log_every = log_every

    def __call__(self) -> None:
        torch.set_num_threads(self.n_threads)
        losses = self.trainer.step(self.x_BD)
        if (self.trainer.n_steps - 1) % self.log_every == 0:
            self.trainer.metrics(losses)

    def sync(self) -> None:
        torch_sync(self.device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the benchmark


class Benchmark:
    """Runs the measurements in order, keeps every result, rewrites the outputs after each one."""

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.device = describe_devices()
        self.torch_device = torch.device(self.device["torch_device"])
        self.accelerator = self.device["jax_backend"] != "cpu"
        self.results = {
            "device": self.device,
            "args": vars(args) | {"out": str(args.out)},
            "peak": [],
            "in_memory": [],
            "end_to_end": [],
            "accuracy": [],
            "notes": [],
        }
        args.out.mkdir(parents=True, exist_ok=True)
        self.stem = args.out / self.device["name"]
        # On a small shared CPU torch's default threads can collide with other load: time 1 thread too.
        self.torch_variants = ["torch"] + (["torch-1t"] if args.torch_one_thread else [])

    # -- bookkeeping

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.time_budget_s

    def peak(self, precision: str) -> float:
        """The measured peak for a precision (bf16 falls back to float32's where it was not measured)."""
        peaks = best_peaks(self.results)
        return peaks.get(precision) or peaks["float32"]

    def finish(self) -> None:
        """Fractions of the peak against the best peak of the whole run (it may have risen since a row was measured)."""
        for row in self.results["in_memory"] + self.results["end_to_end"]:
            if "flops_per_s" in row:
                row["frac_peak"] = row["flops_per_s"] / self.peak(row["precision"])
        self.results["wall_s"] = self.elapsed()
        self.results["device"]["load_average_at_end"] = os.getloadavg()
        self.save()

    def save(self) -> None:
        harness.write(self.stem, self.results, to_markdown(self.results), echo=False)
        try:
            plot_scaling(self.results, self.stem.parent / f"{self.stem.name}-scaling.png")
        except Exception as err:  # a plot must never cost the numbers
            logger.warning("plot failed: %s", err)

    # -- measurements

    def measure_peaks(self) -> None:
        n = self.args.peak_n or (8192 if self.accelerator else 2048)
        dtypes = [jnp.float32] + ([jnp.bfloat16] if "bfloat16" in self.args.precisions else [])
        for dtype in dtypes:
            result = matmul_peak(dtype, n, self.args) | {"when": f"{self.elapsed():.0f}s"}
            logger.info("peak %s: %.1f GFLOP/s", result["dtype"], result["flops_per_s"] / 1e9)
            self.results["peak"].append(result)
            self.save()

    def measure_in_memory(self, size: str, n_saes: int, batch_size: int, variants: list[tuple[str, str]]) -> None:
        """Times each (variant, precision) of `variants` on one batch already on the device.

        On CPU the variants and a float32 matmul are timed in turns (`harness.time_interleaved`), so their
        ratios hold under a drifting load; on accelerators one at a time, to bound memory.
        """
        args = self.args
        d_vit, d_sae = SIZES[size]
        B = batch_size
        x_BD = (np.random.default_rng(0).normal(size=(B, d_vit)) + 0.5).astype(np.float32)
        x_jax = jax.device_put(x_BD)
        flops = flops_per_example(d_vit, d_sae) * B * n_saes
        todo = []
        for variant, precision in variants:
            row = {
                "size": size,
                "d_vit": d_vit,
                "d_sae": d_sae,
                "M": n_saes,
                "batch_size": B,
                "variant": variant,
                "precision": precision,
            }
            # At least three steps run (warm-up, calibration, one repeat); at half the peak measured so far:
            predicted = flops / (0.5 * self.peak(precision))
            if self.over_budget():
                self.skip(row, "in_memory", f"time budget of {args.time_budget_s:.0f}s spent")
            elif 3 * predicted > args.max_measure_s:
                self.skip(
                    row,
                    "in_memory",
                    f"predicted {predicted:.1f}s per step is too slow for a {args.max_measure_s:.0f}s time box",
                )
            else:
                todo.append(row)
        blocks = [todo] if not self.accelerator else [[row] for row in todo]
        for block in blocks:
            if not block:
                continue
            runners = {}
            try:
                if not self.accelerator:
                    runners["peak"] = MatmulRunner(jnp.float32, args.peak_n)
                for row in block:
                    cfgs = make_cfgs(d_vit, d_sae, n_saes, B, row["precision"])
                    if row["variant"].startswith("torch"):
                        n_threads = 1 if row["variant"] == "torch-1t" else None
                        runners[id(row)] = TorchLoop(cfgs, x_BD, self.torch_device, args.log_every, n_threads)
                    elif row["variant"] == "vmap":
                        runners[id(row)] = VmappedGroup(cfgs, x_jax, args.log_every)
                    else:
                        runners[id(row)] = OneByOne(cfgs, x_jax, args.log_every)
                timings = harness.time_interleaved(
                    runners,
                    n_warmup=args.n_warmup,
                    n_repeats=args.n_repeats,
                    min_repeat_s=args.min_repeat_s,
                    max_s=args.max_measure_s * len(block),
                )
            except Exception as err:  # e.g. out of memory: record it and go on
                for row in block:
                    self.skip(row, "in_memory", f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            finally:
                runners = None
                free_memory()
            nearby = 2 * args.peak_n**3 / timings["peak"]["seconds"] if "peak" in timings else None
            for row in block:
                t = timings[id(row)]
                row |= rates(t["seconds"], B, n_saes, d_vit, d_sae) | {
                    "seconds_per_step": t["seconds"],
                    "repeats": t["repeats"],
                    "steps_per_repeat": t["calls_per_repeat"],
                }
                row["frac_peak"] = row["flops_per_s"] / self.peak(row["precision"])
                if nearby:
                    row["peak_nearby"] = nearby
                    row["frac_peak_nearby"] = row["flops_per_s"] / nearby
                self.results["in_memory"].append(row)
                logger.info(
                    "%-6s M=%-2d B=%-5d %-10s %-8s %12.0f SAE-ex/s %7.1f GFLOP/s (%.0f%% of best peak, %s of peak in turns)",
                    size,
                    n_saes,
                    B,
                    row["variant"],
                    row["precision"],
                    row["sae_examples_per_s"],
                    row["flops_per_s"] / 1e9,
                    100 * row["frac_peak"],
                    f"{100 * row['frac_peak_nearby']:.0f}%" if nearby else "-",
                )
            self.save()

    def skip(self, row: dict, table: str, why: str) -> None:
        logger.info("skip %s: %s", {k: row[k] for k in ("size", "M", "variant", "precision") if k in row}, why)
        self.results[table].append(row | {"skipped": why})
        self.save()

    def measure_end_to_end(self, shard_root: str) -> None:
        """(a) through `training.train` with the Loader, float32 and bfloat16, then evaluated; (c) with saev's Dataset + DataLoader."""
        args = self.args
        d_vit, d_sae = SIZES[args.e2e_size]
        M, B = args.e2e_m, args.e2e_batch_size
        data_cfg = config.DataLoad(shard_root=shard_root, n_random_samples=args.n_random_samples)
        common = dict(
            data=data_cfg,
            n_workers=args.n_workers,
            log_every=max(1, args.e2e_steps // 5),
            n_patches=args.e2e_steps * B - 1,
            n_lr_warmup=max(1, args.e2e_steps // 10),
            track=False,
        )
        acts = data.Activations(data_cfg)
        preprocess = jax.device_put(data.make_preprocess(acts, data_cfg))
        base = {"size": args.e2e_size, "d_vit": d_vit, "d_sae": d_sae, "M": M, "batch_size": B, "n_examples": len(acts)}

        for precision in args.precisions:
            # The same step with the data already on the device, right before: the e2e run's ceiling.
            self.measure_in_memory(args.e2e_size, M, B, [("vmap", precision)])
            row = base | {"variant": "vmap", "precision": precision, "path": "training.train + data.Loader"}
            if self.over_budget():
                self.skip(row, "end_to_end", "time budget spent")
                continue
            cfgs = make_cfgs(d_vit, d_sae, M, B, precision, **common)
            for c in cfgs:
                config.validate(c)
            cfgs = [
                dataclasses.replace(c, sae=dataclasses.replace(c.sae, n_reinit_samples=args.n_random_samples))
                for c in cfgs
            ]
            clock = LogClock()
            t0 = time.perf_counter()
            state = training.train(training.make_layout(cfgs), acts, preprocess, clock)
            jax.block_until_ready(state)
            wall = time.perf_counter() - t0
            seconds = clock.seconds_per_step()
            row |= rates(seconds, B, M, d_vit, d_sae) | {
                "seconds_per_step": seconds,
                "n_steps": int(state.step),
                "wall_s_with_startup": wall,
                "intervals": clock.intervals(),
            }
            self.results["end_to_end"].append(row)
            logger.info("end to end vmap %s: %.0f SAE-ex/s", precision, row["sae_examples_per_s"])
            state = None
            free_memory()
            self.save()
        self.measure_accuracy(acts, preprocess, d_vit, d_sae, dict(common, log_every=args.acc_steps))
        for variant in self.torch_variants:
            self.measure_in_memory(args.e2e_size, M, B, [(variant, "float32")])
            row = base | {"variant": variant, "precision": "float32", "path": "data.Dataset + torch DataLoader"}
            if self.over_budget():
                self.skip(row, "end_to_end", "time budget spent")
                continue
            cfgs = make_cfgs(d_vit, d_sae, M, B, "float32", **common)
            torch.set_num_threads(1 if variant == "torch-1t" else TorchLoop.DEFAULT_THREADS)
            seconds, n_batches = torch_end_to_end(cfgs, self.torch_device, args.torch_e2e_batches, args.n_workers)
            torch.set_num_threads(TorchLoop.DEFAULT_THREADS)
            row |= rates(seconds, B, M, d_vit, d_sae) | {
                "seconds_per_step": seconds,
                "n_steps": n_batches,
                "n_workers": args.n_workers,
            }
            self.results["end_to_end"].append(row)
            logger.info("end to end %s: %.0f SAE-ex/s", variant, row["sae_examples_per_s"])
            free_memory()
            self.save()

    def measure_accuracy(self, acts, preprocess, d_vit: int, d_sae: int, common: dict) -> None:
        """Trains the same group (same data order, seeds, hyper-parameters) in each precision and evaluates it on every example."""
        args = self.args
        if "float32" not in args.precisions or len(args.precisions) < 2 or self.over_budget():
            return
        B, n_steps = args.acc_batch_size, args.acc_steps
        common = common | {"n_patches": n_steps * B - 1, "n_lr_warmup": n_steps // 10}
        coeffs = (1e-3, 3e-3, 1e-2, 3e-2)
        finals = {}
        for precision in args.precisions:
            cfgs = make_cfgs(d_vit, d_sae, args.e2e_m, B, precision, **common)
            cfgs = [
                dataclasses.replace(c, lr=1e-3, sae=dataclasses.replace(c.sae, sparsity_coeff=coeffs[m % len(coeffs)]))
                for m, c in enumerate(cfgs)
            ]
            state = training.train(training.make_layout(cfgs), acts, preprocess, LogClock())
            finals[precision] = evaluation.evaluate(cfgs, state.stacks[0].saes, acts, preprocess, jax.devices()[0])
            state = None
            free_memory()
        self.results["accuracy_setup"] = {
            "size": args.e2e_size,
            "M": args.e2e_m,
            "batch_size": B,
            "n_steps": n_steps,
            "lr": 1e-3,
            "sparsity_coeffs": [c.sae.sparsity_coeff for c in cfgs],
            "n_examples": len(acts),
        }
        for precision, metrics in finals.items():
            for m, (mine, ref) in enumerate(zip(metrics, finals["float32"])):
                self.results["accuracy"].append(
                    {
                        "precision": precision,
                        "sae": m,
                        "mse": mine.mse,
                        "l0": mine.l0,
                        "n_dead": mine.n_dead,
                        "mse_vs_float32": mine.mse / ref.mse - 1,
                        "l0_vs_float32": mine.l0 / ref.l0 - 1 if ref.l0 else float("nan"),
                    }
                )
        self.save()


def best_peaks(results: dict) -> dict[str, float]:
    """The highest peak measured per dtype: on a shared machine, the one least disturbed by others."""
    peaks: dict[str, float] = {}
    for p in results["peak"]:
        peaks[p["dtype"]] = max(peaks.get(p["dtype"], 0.0), p["flops_per_s"])
    return peaks


def rates(seconds_per_step: float, B: int, M: int, d_vit: int, d_sae: int) -> dict[str, float]:
    return {
        "examples_per_s": B / seconds_per_step,
        "sae_examples_per_s": B * M / seconds_per_step,
        "flops_per_s": flops_per_example(d_vit, d_sae) * B * M / seconds_per_step,
    }


class LogClock:
    """Stands in for the wandb run in `training.train`: notes when each log step's metrics reached the host.

    `training.train` fetches a log step's metrics with one `jax.device_get`, so every step up to
    that one has finished when `log` is called: the time between two calls is the time of the
    steps between them, data loading included.
    """

    def __init__(self):
        self.marks: list[tuple[int, float]] = []

    def log(self, metrics: list[dict], *, step: int) -> None:
        del metrics
        self.marks.append((step, time.perf_counter()))

    def intervals(self) -> list[float]:
        """Seconds per step between consecutive log steps, leaving out the first (compilation)."""
        return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in itertools.pairwise(self.marks[1:])]

    def seconds_per_step(self) -> float:
        return statistics.median(self.intervals())


def torch_end_to_end(
    cfgs: list[config.Train], device: torch.device, n_batches: int, n_workers: int
) -> tuple[float, int]:
    """Seconds per step of the torch baseline reading through saev's per-example Dataset, and the steps taken.

    The DataLoader's workers each build whole batches, start together and read two batches
    ahead, so batches arrive in rounds of `n_workers`: timing starts once the read-ahead is used
    up (after 2 x n_workers steps) and spans whole rounds.
    """
    dataset = data.Dataset(cfgs[0].data)
    B = cfgs[0].sae_batch_size
    n_batches = min(n_batches, len(dataset) // B)
    saes = torch_baseline.make_saes(cfgs, device)
    trainer = torch_baseline.Trainer(saes, [torch_baseline.Hparams.from_cfg(c) for c in cfgs])
    marks = []

    def on_log(step: int, metrics: list[dict]) -> None:
        del metrics
        torch_sync(device)
        marks.append(time.perf_counter())

    loader = torch_baseline.make_dataloader(cfgs[0], dataset)
    stream = itertools.islice(torch_baseline.batches(loader, n_batches * B), n_batches)
    with warnings.catch_warnings():
        # The workers only read shards; they never touch JAX, which the fork warning is about.
        warnings.filterwarnings("ignore", message=".*os.fork.*")
        torch_baseline.train(trainer, stream, device, log_every=1, on_log=on_log)
    # marks[i]: step i done. The first prefetch_factor (2) x n_workers batches were read ahead.
    first = min(2 * n_workers, len(marks) - 2)
    n_rounds = max(1, (len(marks) - 1 - first) // n_workers)
    last = min(len(marks) - 1, first + n_rounds * n_workers)
    return (marks[last] - marks[first]) / (last - first), len(marks)


def write_shards(dpath: str, args) -> None:
    d_vit, _ = SIZES[args.e2e_size]
    cfg = synthetic.Synthetic(
        d_vit=d_vit,
        n_features=4 * d_vit,
        n_imgs=args.e2e_imgs,
        n_patches_per_img=256,
        layers=(-2, -1),
        n_patches_per_shard=2**18,
        seed=0,
    )
    synthetic.write_shards(dpath, cfg)


# ---------------------------------------------------------------- output


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def to_markdown(results: dict) -> str:
    dev = results["device"]
    peaks = best_peaks(results)
    lines = [
        f"# saev_jax training throughput on {dev['name']}",
        "",
        f"JAX {dev['jax']} on `{dev['jax_devices']}` ({dev['jax_device_kind']}); torch {dev['torch']} on "
        f"`{dev['torch_device']}` ({dev['torch_device_name']}, {dev['torch_threads']} threads); CPU: {dev['cpu_model']} "
        f"({dev['cpu_count']} cores). XLA_FLAGS=`{dev['xla_flags']}`. Load average (1, 5, 15 min) at start "
        f"{tuple(round(x, 1) for x in dev['load_average_at_start'])}, at end "
        f"{tuple(round(x, 1) for x in dev.get('load_average_at_end', (float('nan'),) * 3))}; wall time {results.get('wall_s', float('nan')):.0f}s.",
        "",
        "Measured matmul peak (the best of the runs at the start and the end; all: "
        + ", ".join(f"{p['dtype']} {p['flops_per_s'] / 1e9:,.1f} at {p['when']}" for p in results["peak"]) + "): "
        + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()) + ".",
        "Figures are medians of timed repeats after a warm-up, each repeat closed by a device sync. "
        "SAE-ex/s = examples/s x M; FLOP/s counts 12 d_vit d_sae per example per SAE; % = of the measured peak "
        "of the row's precision (float32 rows: the float32 peak); on CPU, in brackets, % of a float32 matmul timed in "
        "turns with the row's variants (the machine is shared and its load drifts; the ratios between variants of one block "
        "come from the same rounds).",
        "",
        "## With data in memory",
        "",
        *harness.table(["size (d_vit, d_sae)", "M", "batch", "(a) vmap f32 SAE-ex/s", "GFLOP/s", "% peak", "(a) vmap bf16 SAE-ex/s",
                        "% bf16 peak", "(b) one-by-one SAE-ex/s", "% peak", "(c) torch SAE-ex/s", "% peak", "(c') torch 1 thread",
                        "(a)/(c)", "(a bf16)/(c)", "(b)/(c)", "(a)/(c')"]),
    ]  # fmt: skip
    cells: dict[tuple, dict] = {}
    for row in results["in_memory"]:
        cells.setdefault((row["size"], row["M"], row["batch_size"]), {})[(row["variant"], row["precision"])] = row

    def get(cell, key, field):
        row = cell.get(key)
        return None if row is None or "skipped" in row else row[field]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    main_batch = results["args"]["batch_size"]
    for (size, M, B), cell in sorted(
        cells.items(), key=lambda kv: (list(SIZES).index(kv[0][0]), kv[0][2] != main_batch, kv[0][1])
    ):
        d_vit, d_sae = SIZES[size]
        a32, a16 = (
            get(cell, ("vmap", "float32"), "sae_examples_per_s"),
            get(cell, ("vmap", "bfloat16"), "sae_examples_per_s"),
        )
        b, c = (
            get(cell, ("one-by-one", "float32"), "sae_examples_per_s"),
            get(cell, ("torch", "float32"), "sae_examples_per_s"),
        )

        def pct(key, cell=cell):
            flops = get(cell, key, "flops_per_s")
            frac = None if flops is None else flops / peaks.get(key[1], peaks["float32"])
            near = get(cell, key, "frac_peak_nearby") if key in cell and "frac_peak_nearby" in cell[key] else None
            return "-" if frac is None else f"{100 * frac:.0f}%" + (f" ({100 * near:.0f}%)" if near else "")

        c1 = get(cell, ("torch-1t", "float32"), "sae_examples_per_s")
        gf = get(cell, ("vmap", "float32"), "flops_per_s")
        lines.append(harness.row([
            f"{size} ({d_vit}, {d_sae})", M, B, _fmt(a32), _fmt(gf / 1e9) if gf else "-", pct(("vmap", "float32")),
            _fmt(a16), pct(("vmap", "bfloat16")), _fmt(b), pct(("one-by-one", "float32")), _fmt(c),
            pct(("torch", "float32")), _fmt(c1), ratio(a32, c), ratio(a16, c), ratio(b, c), ratio(a32, c1),
        ]))  # fmt: skip
    skipped = [r for r in results["in_memory"] if "skipped" in r]
    if skipped:
        lines += [
            "",
            "Skipped: "
            + "; ".join(f"{r['size']} M={r['M']} {r['variant']} {r['precision']} ({r['skipped']})" for r in skipped)
            + ".",
        ]

    e2e = [r for r in results["end_to_end"] if "skipped" not in r]
    if e2e:
        in_mem = {
            (r["size"], r["M"], r["batch_size"], r["variant"], r["precision"]): r
            for r in results["in_memory"]
            if "skipped" not in r
        }
        torch_rates = {r["variant"]: r["sae_examples_per_s"] for r in e2e if r["variant"].startswith("torch")}
        lines += [
            "",
            "## End to end from shards",
            "",
            f"{e2e[0]['size']} SAEs, M = {e2e[0]['M']}, batch {e2e[0]['batch_size']}, {e2e[0]['n_examples']:,} examples on disk "
            f"(saev_jax.synthetic). Steady state (compilation and loader start-up excluded): median seconds per step "
            "between log steps.",
            "",
        ]
        rows = []
        for r in e2e:
            mem = in_mem.get((r["size"], r["M"], r["batch_size"], r["variant"], r["precision"]))
            rows.append([
                f"{VARIANTS[r['variant']]}: {r['path']}", r["precision"], _fmt(r["sae_examples_per_s"]), _fmt(r["examples_per_s"]),
                _fmt(r["flops_per_s"] / 1e9), f"{100 * r['flops_per_s'] / peaks.get(r['precision'], peaks['float32']):.0f}%",
                ratio(r["sae_examples_per_s"], torch_rates.get("torch")), ratio(r["sae_examples_per_s"], torch_rates.get("torch-1t")),
                ratio(r["sae_examples_per_s"], mem and mem["sae_examples_per_s"]),
            ])  # fmt: skip
        lines += harness.table(["path", "precision", "SAE-ex/s", "examples/s", "GFLOP/s", "% peak", "vs (c) torch e2e",
                                "vs (c') torch 1 thread e2e", "vs same step, data in memory (measured just before)"], rows)  # fmt: skip
    if results["accuracy"]:
        setup = results.get("accuracy_setup", {})
        lines += [
            "",
            "## Accuracy of bfloat16",
            "",
            f"The same group ({setup.get('size')} SAEs, M = {setup.get('M')}, sparsity coefficients {setup.get('sparsity_coeffs')}, "
            f"lr {setup.get('lr')}) trained {setup.get('n_steps')} steps of batch {setup.get('batch_size')} through `training.train` in "
            f"each precision (same data order and seeds), then evaluated on all {setup.get('n_examples', 0):,} examples.",
            "",
        ]
        lines += harness.table(
            ["SAE", "precision", "eval MSE", "eval L0", "dead", "MSE vs float32", "L0 vs float32"],
            [[r["sae"], r["precision"], f"{r['mse']:.5g}", f"{r['l0']:.4g}", r["n_dead"], f"{100 * r['mse_vs_float32']:+.2f}%",
              f"{100 * r['l0_vs_float32']:+.2f}%"]
             for r in sorted(results["accuracy"], key=lambda r: (r["sae"], r["precision"] != "float32"))],
        )  # fmt: skip
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def plot_scaling(results: dict, fpath: pathlib.Path) -> None:
    """SAE-examples/s against M, one panel per size: how a group's throughput grows until the device is compute-bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = results["args"]["batch_size"]  # Not the end-to-end check's batch: one batch size per curve.
    rows = [r for r in results["in_memory"] if "skipped" not in r and r["batch_size"] == batch]
    sizes = [s for s in SIZES if any(r["size"] == s for r in rows)]
    if not sizes:
        return
    peaks = best_peaks(results)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
    styles = {
        ("vmap", "float32"): "o-",
        ("vmap", "bfloat16"): "s-",
        ("one-by-one", "float32"): "^--",
        ("torch", "float32"): "x:",
        ("torch-1t", "float32"): "+:",
    }
    for ax, size in zip(axes[0], sizes):
        d_vit, d_sae = SIZES[size]
        for (variant, precision), style in styles.items():
            pts = sorted(
                (r["M"], r["sae_examples_per_s"])
                for r in rows
                if (r["size"], r["variant"], r["precision"]) == (size, variant, precision)
            )
            if pts:
                ax.plot(*zip(*pts), style, label=f"{VARIANTS[variant]} {precision}")
        for dtype, flops in peaks.items():
            ax.axhline(
                flops / flops_per_example(d_vit, d_sae),
                color="gray",
                ls="--" if dtype == "float32" else "-.",
                lw=1,
                label=f"matmul peak {dtype}",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="M (SAEs trained together)",
            ylabel="SAE-examples / s",
            title=f"{size}: d_vit {d_vit}, d_sae {d_sae}, batch {batch}",
        )
        ax.set_xticks(sorted({r["M"] for r in rows}), labels=[str(m) for m in sorted({r["M"] for r in rows})])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Group throughput vs M on {results['device']['name']} ({results['device']['jax_device_kind']})")
    fig.tight_layout()
    fig.savefig(fpath, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    accelerator = jax.default_backend() != "cpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        default=None,
        help="default: all four on accelerators, small and medium on CPU",
    )
    parser.add_argument("--ms", nargs="+", type=int, default=[1, 4, 8, 16], help="group sizes M")
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument(
        "--batch-size", type=int, default=None, help="in-memory batch (default 4096 on accelerators, 512 on CPU)"
    )
    parser.add_argument(
        "--n-warmup", type=int, default=None, help="untimed steps, the first compiles (default 2 accelerators, 1 CPU)"
    )
    parser.add_argument(
        "--n-repeats",
        type=int,
        default=None,
        help="timed repeats; the median is reported (default 3 accelerators, 5 CPU)",
    )
    parser.add_argument("--min-repeat-s", type=float, default=None, help="calls per repeat so a repeat lasts this long")
    parser.add_argument("--max-measure-s", type=float, default=None, help="time box of one measurement")
    parser.add_argument("--time-budget-s", type=float, default=float("inf"), help="start no new measurement after this")
    parser.add_argument(
        "--log-every", type=int, default=25, help="metrics leave the device every this many steps (saev: 25)"
    )
    parser.add_argument(
        "--peak-n", type=int, default=None, help="matmul size for the peak (default 8192 accelerators, 2048 CPU)"
    )
    parser.add_argument("--e2e-size", choices=list(SIZES), default="small")
    parser.add_argument("--e2e-m", type=int, default=4)
    parser.add_argument(
        "--e2e-batch-size", type=int, default=None, help="default 16384 (saev's) on accelerators, 4096 on CPU"
    )
    parser.add_argument("--e2e-steps", type=int, default=None, help="steps of each saev_jax end-to-end run")
    parser.add_argument("--e2e-imgs", type=int, default=None, help="images in the synthetic shards (256 patches each)")
    parser.add_argument(
        "--torch-e2e-batches",
        type=int,
        default=None,
        help="batches of the torch end-to-end run (timed after the first 2 x n_workers)",
    )
    parser.add_argument("--acc-batch-size", type=int, default=None, help="batch of the bf16-vs-float32 accuracy runs")
    parser.add_argument("--acc-steps", type=int, default=None, help="steps of each accuracy run")
    parser.add_argument(
        "--n-workers", type=int, default=os.cpu_count(), help="loader threads (saev_jax) / worker processes (torch)"
    )
    parser.add_argument(
        "--n-random-samples", type=int, default=2**16, help="examples for the preprocessing statistics and b_dec"
    )
    parser.add_argument(
        "--torch-one-thread",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the torch baseline with 1 intra-op thread (default: on CPU)",
    )
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--no-table", action="store_true", help="do not print the markdown table at the end")
    parser.add_argument("--quick", action="store_true", help="tiny everything: checks that the script runs")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)

    def default(name, quick, accel, cpu):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else accel if accelerator else cpu)

    default("sizes", ["small"], list(SIZES), ["small", "medium"])
    default("torch_one_thread", not accelerator, False, True)
    default("batch_size", 256, 4096, 512)
    default("n_warmup", 1, 2, 1)
    default("n_repeats", 2, 3, 5)
    default("min_repeat_s", 0.01, 0.1, 0.5)
    default("max_measure_s", 5.0, 15.0, 25.0)
    default("peak_n", 512, 8192, 2048)
    default("e2e_batch_size", 512, 16384, 4096)
    default("e2e_steps", 12, 60, 30)
    default("e2e_imgs", 64, 3072, 512)
    default("torch_e2e_batches", 8, 48, 10)
    default("acc_batch_size", 512, 16384, 1024)
    default("acc_steps", 20, 200, 200)
    if args.quick:
        args.ms = [m for m in args.ms if m <= 2] or [1]
        args.n_random_samples = min(args.n_random_samples, 4096)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = Benchmark(args)
    logger.info("device: %s", json.dumps(bench.device))
    bench.measure_peaks()
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory(prefix="saev-bench-") as shard_root:
            t0 = time.perf_counter()
            write_shards(shard_root, args)
            logger.info("wrote shards in %.1fs", time.perf_counter() - t0)
            bench.measure_end_to_end(shard_root)
    # The figures the targets name first, in case the time budget runs out.
    order = [("vitl", 8), ("small", 16)] + [(s, m) for s in SIZES for m in sorted(args.ms)]
    accel_ok = bench.accelerator
    variants = (
        [(v, "float32") for v in bench.torch_variants]
        + [("vmap", p) for p in args.precisions]
        + [("one-by-one", "float32")]
    )
    done = set()
    for size, n_saes in order:
        if size not in args.sizes or n_saes not in args.ms or (size, n_saes) in done:
            continue
        done.add((size, n_saes))
        if size in LARGE and not accel_ok:
            note = f"{size} is measured on accelerators only."
            if note not in bench.results["notes"]:
                bench.results["notes"].append(note)
            continue
        bench.measure_in_memory(size, n_saes, args.batch_size, variants)
    bench.measure_peaks()  # Again at the end: on a shared machine the peak moves.
    bench.finish()
    if not args.no_table:
        print(bench.stem.with_suffix(".md").read_text())
    return bench.results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    main()
