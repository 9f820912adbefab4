"""Loader throughput: the fast `data.Loader` against saev's way of loading, in one run.

    python benchmarks/loader.py [--d-vits 768 1024] [--gb 3.0] [--batch-size 16384] ...

For each d_vit it writes a synthetic shard set of about `gb` GB (one recorded layer, 256
patches + [CLS] per image, several shards) into a temporary directory under `tmp_dpath`, warms
the page cache by reading every file, then times, in `patches` mode:

- `Loader(shuffle=True)`: shuffled batches delivered as jax device arrays (raw);
- `Loader(shuffle=False)`: the ordered pass (evaluation);
- saev's way: the per-example `data.Dataset` (which also preprocesses, as saev's did) through
  `torch.utils.data.DataLoader(num_workers=2, shuffle=True)`, for a bounded number of batches;
- with the page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, if allowed) right
  before each run, both shuffled loaders again (the fast one also with 8 threads), timing from
  the first batch.

Each fast-Loader run maps the files afresh, so its page faults count, as in a first epoch.

Every figure is a median over `n_repeats` timed runs after a warm-up. It also reports shuffle
quality: distinct images and shards per shuffled batch against the expectation under uniform
sampling without replacement. Results go to `<out_dpath>/loader-<device>.{md,json}`.

Cold mode, for shard sets larger than memory (`--cold-only` skips everything above):

    python benchmarks/loader.py --cold-only --cold-dpath /work/bigshards --cold-gb 30

writes (once; kept for reruns unless `--cold-delete`) a shard set of `cold_gb` GB at d_vit 1024
into `cold_dpath`, then, `cold_repeats` times, alternates: page cache dropped, a rest of
`cold_rest_s`, the disk's sequential read speed (whole files in order, 16 MiB reads, as `dd`
does) over `cold_read_gb`; page cache dropped, the same rest, the `blocks` Loader delivering
`cold_read_gb` of shuffled batches as device arrays (timed from its first batch, so the first
window's read counts). Each Loader figure is compared with the sequential run just before
it: cloud disks throttle after a burst, so only neighbours are comparable. Also the shuffle
quality of `blocks` on that set. Results: `<out_dpath>/loader-cold-<device>.{md,json}`.
"""

import concurrent.futures
import dataclasses
import gc
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import torch

from saev_jax import config, data, synthetic

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `python benchmarks/loader.py` as well as -m
from benchmarks import harness  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    """Loader benchmark settings."""

    d_vits: tuple[int, ...] = (768, 1024)
    """Activation widths to benchmark."""
    gb: float = 3.0
    """Approximate size of each shard set on disk, in GB."""
    batch_size: int = 16384
    """Examples per batch (saev's default sae_batch_size)."""
    n_threads: int = 2
    """Reader threads of the fast Loader."""
    n_timed_batches: int = 40
    """Batches per timed run of the fast Loader."""
    n_baseline_batches: int = 6
    """Batches per timed run of the torch DataLoader (it is slow), after 5 warm-up batches."""
    n_repeats: int = 3
    """Timed runs per figure; the median is reported."""
    cold: bool = True
    """Also time with the page cache dropped (needs permission to write /proc/sys/vm/drop_caches)."""
    cold_only: bool = False
    """Only the cold, larger-than-memory benchmark."""
    cold_dpath: str = ""
    """Where the larger-than-memory shard set lives (written if absent); empty: no cold benchmark."""
    cold_gb: float = 30.0
    """Size of that shard set in GB (make it larger than the RAM)."""
    cold_read_gb: float = 4.0
    """GB read per timed cold run (sequential and Loader alike)."""
    cold_repeats: int = 3
    """Sequential / Loader pairs."""
    cold_rest_s: float = 5.0
    """Pause after dropping the page cache, before each timed cold run."""
    cold_io_threads: int = 16
    """Reads in flight in the blocks Loader."""
    cold_delete: bool = False
    """Delete the cold shard set afterwards."""
    tmp_dpath: str = tempfile.gettempdir()
    """Where the temporary shard sets go (deleted afterwards)."""
    out_dpath: str = "benchmarks/results"
    """Where loader-<device>.md and .json go."""


def main(args: Args) -> None:
    if args.cold_dpath:
        cold_main(args)
    if args.cold_only:
        return
    load_start = os.getloadavg()
    results = []
    for d_vit in args.d_vits:
        shard_dpath = pathlib.Path(tempfile.mkdtemp(prefix=f"loader-bench-{d_vit}-", dir=args.tmp_dpath))
        try:
            results.append(bench_one(args, d_vit, shard_dpath))
        finally:
            shutil.rmtree(shard_dpath)
    report = {"machine": harness.machine(), "args": dataclasses.asdict(args), "load_avg_start": load_start,
              "load_avg_end": os.getloadavg(), "results": results}  # fmt: skip
    harness.write(pathlib.Path(args.out_dpath) / f"loader-{jax.default_backend()}", report, markdown(report), indent=2)


def bench_one(args: Args, d_vit: int, shard_dpath: pathlib.Path) -> dict:
    n_patches = 256
    n_imgs = max(1, int(args.gb * 1e9 / ((n_patches + 1) * d_vit * 4)))
    cfg = synthetic.Synthetic(d_vit=d_vit, n_features=4 * d_vit, n_imgs=n_imgs, n_patches_per_img=n_patches,
                              layers=(-2,), n_patches_per_shard=n_imgs * (n_patches + 1) // 4 + 1)  # fmt: skip
    start = time.perf_counter()
    md = synthetic.write_shards(shard_dpath, cfg)
    gen_s = time.perf_counter() - start
    nbytes = sum(f.stat().st_size for f in shard_dpath.glob("acts*.bin"))
    print(f"d_vit {d_vit}: wrote {nbytes / 1e9:.2f} GB, {md.n_shards} shards, in {gen_s:.0f} s")

    data_cfg = config.DataLoad(shard_root=str(shard_dpath), n_random_samples=2**16)
    acts = data.Activations(data_cfg)
    example_bytes = d_vit * 4
    row = {"d_vit": d_vit, "n_examples": len(acts), "n_imgs": n_imgs, "n_shards": md.n_shards,
           "gb_on_disk": nbytes / 1e9, "generate_s": gen_s}  # fmt: skip

    def fast(shuffle, n_threads=args.n_threads, n_batches=args.n_timed_batches, cold=False):
        def run():
            if cold:
                drop_caches()
            # Fresh memory maps every run: a mapping that has already touched its pages skips
            # their page faults, which a real first epoch over a large dataset does not.
            loader = data.Loader(data.Activations(data_cfg), batch_size=args.batch_size, shuffle=shuffle,
                                 seed=0, n_threads=n_threads)  # fmt: skip
            return time_batches(iter(loader), n_warmup=0 if cold else 3, n_timed=n_batches)

        return summarize([run() for _ in range(args.n_repeats)], args.batch_size, example_bytes)

    def baseline(cold=False):
        # No statistics when cold: sampling them would read (and keep mapped) part of the data.
        stats = {} if not cold else {"scale_mean": False, "scale_norm": False}
        dataset = data.Dataset(dataclasses.replace(data_cfg, **stats))

        def run():
            if cold:
                drop_caches()
            dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=2)
            # Skip the batches the workers prefetch while starting (2 workers x prefetch_factor 2,
            # plus the first); then every batch is made while we wait.
            return time_batches(iter(dataloader), n_warmup=5, n_timed=args.n_baseline_batches)

        return summarize([run() for _ in range(args.n_repeats)], args.batch_size, example_bytes)

    warm_page_cache(shard_dpath)
    n_ordered = max(1, min(args.n_timed_batches, len(acts) // args.batch_size - 3))
    row["fast_shuffled"] = fast(shuffle=True)
    row["fast_ordered"] = fast(shuffle=False, n_batches=n_ordered)
    row["torch_dataloader"] = baseline()
    row["speedup"] = row["fast_shuffled"]["examples_per_s"] / row["torch_dataloader"]["examples_per_s"]
    row["shuffle_quality"] = shuffle_quality(acts, args.batch_size)
    row["window_alternative"] = window_alternative(data_cfg, args, cold=False)
    del acts  # its mappings would keep pages in the page cache
    gc.collect()
    if args.cold:
        if drop_caches():
            row["cold_fast_shuffled"] = fast(shuffle=True, n_batches=5, cold=True)
            row["cold_fast_shuffled_8_threads"] = fast(shuffle=True, n_threads=8, n_batches=5, cold=True)
            row["cold_torch_dataloader"] = baseline(cold=True)
            row["cold_window_alternative"] = window_alternative(data_cfg, args, cold=True)
        else:
            row["cold"] = "not measured: cannot drop the page cache here"
    print(json.dumps(row, indent=2))
    return row


def write_cold_shards(dpath: pathlib.Path, gb: float, d_vit: int = 1024, n_patches: int = 256) -> data.Metadata:
    """A shard set of about `gb` GB (1 GB shards, one layer, [CLS] + 256 patches) of normal noise.

    Contents only need to be finite and not constant: one block of random images is written
    again and again, its first value changed per block, so writing is disk-bound.
    """
    n_tokens, per_shard = n_patches + 1, max(1, int(1e9 // ((n_patches + 1) * d_vit * 4)))
    n_shards = max(1, round(gb * 1e9 / (per_shard * n_tokens * d_vit * 4)))
    md = data.Metadata("bench", "bench", (-2,), n_patches, True, d_vit, 0, per_shard * n_shards,
                       per_shard * n_tokens, "cold loader benchmark: normal noise")  # fmt: skip
    dpath.mkdir(parents=True, exist_ok=True)
    chunk = np.random.default_rng(0).standard_normal((16 * n_tokens, d_vit), dtype=np.float32)
    for shard_i in range(n_shards):
        with open(dpath / data.shard_fname(shard_i), "wb") as fd:
            for j in range(0, per_shard, 16):
                chunk[0, 0] = shard_i * per_shard + j
                fd.write(chunk[: min(16, per_shard - j) * n_tokens].tobytes())
    md.dump(dpath)  # last, so a half-written set is never taken for a whole one
    return md


def sequential_gb_per_s(dpath: pathlib.Path, nbytes: float, first_file: int) -> float:
    """Cold sequential read speed: whole shard files in order from `first_file`, 16 MiB at a time."""
    files = sorted(dpath.glob("acts*.bin"))
    buf = bytearray(2**24)
    done, start = 0, time.perf_counter()
    for i in range(len(files)):
        with open(files[(first_file + i) % len(files)], "rb", buffering=0) as fd:
            while done < nbytes and (n := fd.readinto(buf)):
                done += n
        if done >= nbytes:
            break
    return done / (time.perf_counter() - start) / 1e9


def cold_main(args: Args) -> None:
    """The larger-than-memory benchmark: the blocks Loader against the disk's sequential speed."""
    dpath = pathlib.Path(args.cold_dpath)
    if not (dpath / "metadata.json").exists():
        start = time.perf_counter()
        write_cold_shards(dpath, args.cold_gb)
        print(f"wrote {dpath} in {time.perf_counter() - start:.0f} s")
    data_cfg = config.DataLoad(shard_root=str(dpath), scale_mean=False, scale_norm=False)
    acts = data.Activations(data_cfg)
    md = acts.metadata
    set_gb = md.n_shards * acts.shard_nbytes / 1e9
    report = {"machine": harness.machine(), "args": dataclasses.asdict(args), "load_avg_start": os.getloadavg(),
              "shard_set_gb": set_gb, "mem_available_gb": data.available_memory() / 1e9,
              "auto_read_mode": data.choose_read_mode(acts), "n_shards": md.n_shards, "runs": []}  # fmt: skip
    n_batches = max(2, int(args.cold_read_gb * 1e9 / (args.batch_size * acts.d_vit * 4)))
    for r in range(args.cold_repeats):
        drop_caches() or exit("cold mode needs to drop the page cache (root)")
        time.sleep(args.cold_rest_s)
        seq = sequential_gb_per_s(dpath, n_batches * args.batch_size * acts.d_vit * 4, first_file=5 * r)
        drop_caches()
        time.sleep(args.cold_rest_s)
        loader = data.Loader(data.Activations(data_cfg), batch_size=args.batch_size, shuffle=True, seed=r,
                             read_mode="blocks", io_threads=args.cold_io_threads)  # fmt: skip
        s_per_batch = time_batches(iter(loader), n_warmup=0, n_timed=n_batches)
        got = args.batch_size * acts.d_vit * 4 / s_per_batch / 1e9
        run = {"sequential_gb_per_s": seq, "loader_gb_per_s": got, "ratio": got / seq, "n_batches": n_batches,
               "load_avg": os.getloadavg()[0]}  # fmt: skip
        print(json.dumps(run))
        report["runs"].append(run)
    loader = data.Loader(acts, batch_size=args.batch_size, shuffle=True, seed=0, read_mode="blocks")
    report["window_examples"] = loader.order.window_n
    report["block_examples"] = loader.order.block_n
    report["shuffle_quality_blocks"] = shuffle_quality(acts, args.batch_size, read_mode="blocks")
    report["shuffle_quality_random"] = shuffle_quality(acts, args.batch_size, read_mode="random")
    report["load_avg_end"] = os.getloadavg()
    if args.cold_delete:
        shutil.rmtree(dpath)
    harness.write(
        pathlib.Path(args.out_dpath) / f"loader-cold-{jax.default_backend()}", report, cold_markdown(report), indent=2
    )


def cold_markdown(report: dict) -> str:
    m, args = report["machine"], report["args"]
    ratios = [run["ratio"] for run in report["runs"]]
    lines = [
        "# Loader on a cold page cache, shard set larger than RAM",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB RAM ({report['mem_available_gb']:.1f} GB "
        f"available at the start); JAX device {m['jax_device']}. Load average at start / end: "
        f"{report['load_avg_start'][0]:.1f} / {report['load_avg_end'][0]:.1f} (other jobs shared the 2 cores).",
        "",
        f"Shard set: {report['shard_set_gb']:.1f} GB in {report['n_shards']} shards, d_vit 1024, 256 patches + [CLS] "
        f"per image, `patches` mode (`read_mode=auto` picks `{report['auto_read_mode']}` here). Batch "
        f"{args['batch_size']}; `blocks` Loader with {args['cold_io_threads']} reads in flight, "
        f"blocks of {report['block_examples']} examples, windows of {report['window_examples']:,} examples. "
        f"Each pair: page cache dropped and {args['cold_rest_s']:.0f} s rest before each of (a) a sequential read "
        f"of {args['cold_read_gb']} GB (whole files, 16 MiB reads) and (b) the Loader delivering as many bytes of "
        "shuffled device arrays, timed from its first batch.",
        "",
    ]
    lines += harness.table(["pair", "sequential GB/s", "blocks Loader GB/s", "Loader / sequential", "load avg"],
                           [[i, f"{run['sequential_gb_per_s']:.2f}", f"{run['loader_gb_per_s']:.2f}", f"{run['ratio']:.2f}",
                             f"{run['load_avg']:.1f}"] for i, run in enumerate(report["runs"])])  # fmt: skip
    lines += ["", f"Median ratio: **{statistics.median(ratios):.2f}** (min {min(ratios):.2f}, max {max(ratios):.2f}).", "",
              "Shuffle quality (mean over 20 batches; ideal = uniform sampling without replacement):", ""]  # fmt: skip
    quality = [(mode, report[f"shuffle_quality_{mode}"]) for mode in ("random", "blocks")]
    lines += harness.table(["mode", "distinct images / batch", "ideal", "distinct shards / batch", "ideal"],
                           [[mode, f"{q['distinct_images_per_batch']:.1f}", f"{q['ideal_distinct_images_per_batch']:.1f}",
                             f"{q['distinct_shards_per_batch']:.2f}", f"{q['ideal_distinct_shards_per_batch']:.2f}"]
                            for mode, q in quality])  # fmt: skip
    return "\n".join(lines) + "\n"


def time_batches(it, *, n_warmup: int, n_timed: int) -> float:
    """Seconds per batch to draw `n_timed` batches after `n_warmup`."""
    try:
        for _ in range(n_warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(n_timed):
            batch = next(it)
            x = batch[0] if isinstance(batch, tuple) else batch["act"]
            if isinstance(x, jax.Array):
                x.block_until_ready()
        return (time.perf_counter() - start) / n_timed
    finally:
        if hasattr(it, "close"):
            it.close()
        del it
        gc.collect()


def window_alternative(data_cfg: config.DataLoad, args: Args, *, cold: bool, n_batches: int = 5) -> dict:
    """The design not taken, for comparison: shuffle whole images inside a 1 GiB window.

    Images (each one contiguous run of examples) are taken in random order, a window of 1 GiB
    of them at a time, and batches are drawn at random from inside the window: reads stay
    local (the page cache is the buffer), but a batch holds at most one window of images.
    Read with the Loader's read path from `n_threads` threads; host arrays only.
    """
    if cold:
        drop_caches()
    acts = data.Activations(data_cfg)
    md = acts.metadata
    per_img = len(acts) // md.n_imgs
    imgs_per_window = max(1, 2**30 // (per_img * acts.d_vit * 4))
    rng = np.random.default_rng(0)
    window = rng.permutation(md.n_imgs)[:imgs_per_window]
    order = rng.permutation((window[:, None] * per_img + np.arange(per_img)).ravel())
    n_batches = min(n_batches, order.size // args.batch_size)
    batches = [np.sort(order[b * args.batch_size : (b + 1) * args.batch_size]) for b in range(n_batches)]
    distinct = float(np.mean([np.unique(acts.image_i(b)).size for b in batches]))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.n_threads) as pool:
        list(pool.map(acts.read, batches))
    seconds = (time.perf_counter() - start) / n_batches
    return {**summarize([seconds], args.batch_size, acts.d_vit * 4), "imgs_per_window": int(window.size),
            "distinct_images_per_batch": distinct}  # fmt: skip


def summarize(seconds_per_batch: list[float], batch_size: int, example_bytes: int) -> dict:
    median = statistics.median(seconds_per_batch)
    return {"s_per_batch_runs": seconds_per_batch, "examples_per_s": batch_size / median,
            "gb_per_s": batch_size * example_bytes / median / 1e9}  # fmt: skip


def shuffle_quality(acts: data.Activations, batch_size: int, n_batches: int = 20, read_mode: str = "random") -> dict:
    """Distinct images and shards per shuffled batch, and their expectation under uniform sampling."""
    loader = data.Loader(acts, batch_size=batch_size, shuffle=True, seed=0, read_mode=read_mode)
    md, n = acts.metadata, len(acts)
    images, shards = [], []
    for b in range(n_batches):
        img = acts.image_i(loader.batch_indices(b))
        images.append(np.unique(img).size)
        shards.append(np.unique(img // md.n_imgs_per_shard).size)
    per_img = n // md.n_imgs
    shard_sizes = [min(md.n_imgs_per_shard, md.n_imgs - s * md.n_imgs_per_shard) * per_img for s in range(md.n_shards)]
    return {
        "distinct_images_per_batch": float(np.mean(images)),
        "ideal_distinct_images_per_batch": md.n_imgs * (1 - p_untouched(n, per_img, batch_size)),
        "distinct_shards_per_batch": float(np.mean(shards)),
        "ideal_distinct_shards_per_batch": sum(1 - p_untouched(n, size, batch_size) for size in shard_sizes),
    }


def p_untouched(n: int, group: int, batch: int) -> float:
    """P(a uniform sample of `batch` of `n` items, without replacement, misses a group of `group`)."""
    if batch > n - group:
        return 0.0
    lg = math.lgamma
    return math.exp(lg(n - group + 1) - lg(n - group - batch + 1) - lg(n + 1) + lg(n - batch + 1))


def warm_page_cache(dpath: pathlib.Path) -> None:
    for fpath in sorted(dpath.glob("acts*.bin")):
        with open(fpath, "rb") as fd:
            while fd.read(2**26):
                pass


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fd:
            fd.write("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def markdown(report: dict) -> str:
    m = report["machine"]
    args = report["args"]
    lines = [
        "# Loader throughput",
        "",
        harness.machine_line(m),
        f"Load average at start / end: {report['load_avg_start'][0]:.1f} / {report['load_avg_end'][0]:.1f} "
        "(other jobs shared the machine).",
        "",
        f"`patches` mode, one layer, float32, batch {args['batch_size']}; fast Loader with {args['n_threads']} reader "
        f"threads, timed over {args['n_timed_batches']} batches after 3 warm-up batches; baseline: per-example "
        f"`data.Dataset` through `torch.utils.data.DataLoader(num_workers=2, shuffle=True)`, "
        f"{args['n_baseline_batches']} batches after 5 warm-up batches (cold: after the caches were dropped "
        f"before the run). Medians of {args['n_repeats']} runs.",
        "",
    ]
    rows = []
    for r in report["results"]:
        base = r["torch_dataloader"]["examples_per_s"]
        entries = [("fast Loader, shuffled", "warm", r["fast_shuffled"]), ("fast Loader, ordered", "warm", r["fast_ordered"]),
                   ("torch DataLoader (saev's way)", "warm", r["torch_dataloader"])]  # fmt: skip
        if "window_alternative" in r:
            entries.append(
                ("alternative not taken: 1 GiB image window (host reads only)", "warm", r["window_alternative"])
            )
        if "cold_fast_shuffled" in r:
            entries += [("fast Loader, shuffled", "cold", r["cold_fast_shuffled"]),
                        ("fast Loader, shuffled, 8 threads", "cold", r["cold_fast_shuffled_8_threads"]),
                        ("torch DataLoader (saev's way)", "cold", r["cold_torch_dataloader"])]  # fmt: skip
        if "cold_window_alternative" in r:
            entries.append(("alternative not taken: 1 GiB image window (host reads only)", "cold",
                            r["cold_window_alternative"]))  # fmt: skip
        rows += [[r["d_vit"], f"{r['n_examples']:,}", f"{r['gb_on_disk']:.2f}", name, cache, f"{fig['examples_per_s']:,.0f}",
                  f"{fig['gb_per_s']:.2f}", f"{fig['examples_per_s'] / base:.1f}x"] for name, cache, fig in entries]  # fmt: skip
    lines += harness.table(
        ["d_vit", "examples", "GB", "loader", "page cache", "examples/s", "GB/s", "vs torch DataLoader"], rows
    )
    lines += ["", "Shuffle quality (mean over 20 shuffled batches; ideal = uniform sampling without replacement):", ""]
    rows = []
    for r in report["results"]:
        q, w = r["shuffle_quality"], r.get("window_alternative", {})
        rows.append([r["d_vit"], f"{r['n_imgs']:,}", f"{q['distinct_images_per_batch']:.1f}",
                     f"{q['ideal_distinct_images_per_batch']:.1f}", f"{q['distinct_shards_per_batch']:.2f}",
                     f"{q['ideal_distinct_shards_per_batch']:.2f}",
                     f"{w.get('imgs_per_window', '-')}, {w.get('distinct_images_per_batch', float('nan')):.1f}"])  # fmt: skip
    lines += harness.table(["d_vit", "images", "distinct images / batch", "ideal", "distinct shards / batch", "ideal",
                            "1 GiB image window: images in window, distinct images / batch"], rows)  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import tyro  # only the command line needs it

    main(tyro.cli(Args))
