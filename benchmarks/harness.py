"""What every benchmark repeats: timing (warm-up, device sync, medians), the machine, markdown tables, the outputs.

Only the standard library at import time: `whole_run.py` times its children's imports, and a
benchmark that never touches JAX or torch should not pay for them. JAX is imported where a
device sync needs it.
"""

import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence


def sync(x):
    """Blocks until every JAX array in `x` (any pytree) is computed; returns `x`."""
    import jax

    return jax.block_until_ready(x)


def median_time(fn: Callable[[], object], *, n_warmup: int = 1, n_repeats: int = 5, sync: Callable = sync) -> dict:
    """Median seconds of `fn()`, each call closed by `sync` of its result, after `n_warmup` untimed calls.

    Returns `{"seconds": median, "times": [every timed call]}`.
    """
    for _ in range(n_warmup):
        sync(fn())
    times = []
    for _ in range(n_repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "times": times}


def sync_torch(device) -> None:
    """Blocks until the work queued on a torch `device` is done (CUDA; a CPU's work is done when it returns)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """A `time_interleaved` runner made of a function: a call runs `fn()`, `.sync()` waits for its last result."""

    def __init__(self, fn: Callable[[], object], wait: Callable = sync):
        self.fn, self.wait, self.out = fn, wait, None

    def __call__(self) -> None:
        self.out = self.fn()

    def sync(self) -> None:
        self.wait(self.out)


def time_interleaved(
    runners: dict,
    *,
    n_warmup: int,
    n_repeats: int,
    min_repeat_s: float = 0.0,
    max_s: float | None = None,
    rotate: bool = False,
) -> dict[object, dict]:
    """Median seconds per call of each runner (a callable with a `.sync()`, such as a `Runner`), timed in turns.

    Each runner gets `n_warmup` untimed calls (the first compiles) and one calibration call; a
    timed repeat is k calls then one sync, k chosen so that it lasts about `min_repeat_s` (dispatch
    and sync amortised as in a real loop; one call when it is 0). The repeats take turns (runner 1,
    runner 2, ..., runner 1, ...), so a change in a shared machine's load hits every runner alike;
    with `rotate`, round r starts at the r-th runner (mod their number), so that each runner takes
    each place in a round equally often (a kernel run right after another can be slower). The
    number of rounds is cut, to no fewer than one, to stay within `max_s` (None: no cut).
    """
    start = time.perf_counter()
    calls = {}
    for name, runner in runners.items():
        for _ in range(max(1, n_warmup)):
            runner()
            runner.sync()
        t0 = time.perf_counter()
        runner()
        runner.sync()
        one = time.perf_counter() - t0
        calls[name] = (max(1, min(1000, int(min_repeat_s / max(one, 1e-9)))), one)
    round_s = sum(k * one for k, one in calls.values())
    n = n_repeats if max_s is None else max(1, min(n_repeats, int((max_s - (time.perf_counter() - start)) / round_s)))
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(n):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            runner, k = runners[name], calls[name][0]
            t0 = time.perf_counter()
            for _ in range(k):
                runner()
            runner.sync()
            times[name].append((time.perf_counter() - t0) / k)
    return {name: {"seconds": statistics.median(ts), "repeats": n, "calls_per_repeat": calls[name][0], "times": ts}
            for name, ts in times.items()}  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as fd:
            return next(line.split(":", 1)[1].strip() for line in fd if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def ram_gib() -> float:
    """The machine's physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def machine() -> dict:
    """What a run ran on: CPU, cores, RAM, library versions, JAX's first device."""
    import jax

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "mem_gib": round(ram_gib(), 1),
            "python": platform.python_version(), "numpy": _version("numpy"), "jax": jax.__version__,
            "torch": _version("torch"), "jax_device": str(jax.devices()[0])}  # fmt: skip


def machine_line(m: dict) -> str:
    """One line naming the machine of `machine()`, for the top of a results file."""
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB RAM; JAX device {m['jax_device']}; "
            f"numpy {m['numpy']}, jax {m['jax']}, torch {m['torch']}.")  # fmt: skip


def row(cells: Sequence[object]) -> str:
    """One markdown table row: `| a | b |`."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence[str], rows: Iterable[Sequence[object]] = ()) -> list[str]:
    """A markdown table's lines: the header, its rule, then one line per row (cells already formatted)."""
    return [row(header), "|" + "---|" * len(header), *(row(r) for r in rows)]


def write(out: str | os.PathLike, results: object, md: str, *, indent: int | None = 1, echo: bool = True) -> None:
    """Writes `out`.json (the numbers) and `out`.md (the report), creating the folder; prints the report if `echo`."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=indent, default=str) + "\n")
    out.with_suffix(".md").write_text(md)
    if echo:
        print(md)
