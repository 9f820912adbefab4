"""`Loader`: the fast path. Shuffled (or ordered) batches as device arrays, from reader threads.

`random` read mode gathers whole batches in C out of memory-mapped shards; `blocks` reads windows
of whole images with `pread` in a keyed order (`BlockOrder`) when the shards outgrow memory.
"""

import concurrent.futures
import itertools
import os
import queue
import threading
import weakref

import jax
import numpy as np
from jaxtyping import Array, Float, Int

from .. import config
from .format import Activations, _aligned_empty
from .stats import _keys, permute


def available_memory() -> int:
    """Bytes the OS says can be used without swapping (`MemAvailable`), else the physical memory."""
    try:
        with open("/proc/meminfo") as fd:
            for line in fd:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_read_mode(acts: Activations) -> str:
    """`blocks` when the shard files are larger than the memory available to cache them, else `random`."""
    return "blocks" if acts.metadata.n_shards * acts.shard_nbytes > available_memory() else "random"


class BlockOrder:
    """Which example sits at each position of the `blocks` stream: a pure function of (seed, position).

    The images are cut into blocks of `imgs_per_block` consecutive images (the last block may
    be shorter). Epoch e takes the full blocks in a keyed random order (key from `(seed, e)`),
    then the short one, and cuts that sequence into windows of `blocks_per_window` blocks (the
    last window may be shorter). The examples of a window come in a keyed random order (key from
    `(seed, e, w)`). Epochs are concatenated. Each position costs O(1) to place, so batch i can
    be computed (and a run resumed) without reading or replaying anything before it.
    """

    def __init__(self, n_imgs: int, per_img: int, imgs_per_block: int, blocks_per_window: int, seed: int):
        self.n_imgs, self.per_img, self.imgs_per_block, self.seed = n_imgs, per_img, imgs_per_block, seed
        self.n = n_imgs * per_img
        self.block_n = imgs_per_block * per_img
        """Examples in a full block."""
        self.n_full_blocks = n_imgs // imgs_per_block
        self.n_blocks = -(-n_imgs // imgs_per_block)
        self.blocks_per_window = blocks_per_window
        self.window_n = blocks_per_window * self.block_n
        """Examples in a full window."""
        self.n_windows = -(-self.n_blocks // blocks_per_window)
        """Windows per epoch."""

    def window_size(self, w: int) -> int:
        """Examples in window w of an epoch."""
        return min(self.window_n, self.n - w * self.window_n)

    def window_span(self, g: int) -> tuple[int, int]:
        """Stream positions `[start, stop)` of the g-th window of the stream (`g = epoch * n_windows + w`)."""
        epoch, w = divmod(g, self.n_windows)
        start = epoch * self.n + w * self.window_n
        return start, start + self.window_size(w)

    def window_of(self, position: int) -> int:
        """The stream window (`epoch * n_windows + w`) holding a stream position."""
        epoch, q = divmod(position, self.n)
        return epoch * self.n_windows + q // self.window_n

    def blocks(self, g: int) -> Int[np.ndarray, " n_blocks"]:
        """The blocks of stream window g, in window order."""
        epoch, w = divmod(g, self.n_windows)
        pos = np.arange(
            w * self.blocks_per_window, min((w + 1) * self.blocks_per_window, self.n_blocks), dtype=np.uint64
        )
        out = pos.astype(np.int64)
        full = pos < self.n_full_blocks
        if full.any():
            out[full] = permute(pos[full], self.n_full_blocks, _keys(self.seed, epoch, 1)).astype(np.int64)
        return out

    def block_images(self, block: int) -> tuple[int, int]:
        """The images `[first, stop)` of a block."""
        return block * self.imgs_per_block, min((block + 1) * self.imgs_per_block, self.n_imgs)

    def slots(self, start: int, stop: int) -> list[tuple[int, Int[np.ndarray, " n"]]]:
        """Stream positions `[start, stop)` as `(window g, rows of that window)` pieces, in stream order."""
        pieces = []
        while start < stop:
            g = self.window_of(start)
            w_start, w_stop = self.window_span(g)
            end = min(stop, w_stop)
            epoch, w = divmod(g, self.n_windows)
            pos = np.arange(start - w_start, end - w_start, dtype=np.uint64)
            rows = permute(pos, self.window_size(w), _keys(self.seed, epoch, 2, w)).astype(np.int64)
            pieces.append((g, rows))
            start = end
        return pieces

    def indices(self, g: int, rows: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
        """Dataset indices of rows of window g (window row j * block_n + o is example o of its j-th block)."""
        return self.blocks(g)[rows // self.block_n] * self.block_n + rows % self.block_n


class Loader:
    """Batches of raw examples as device arrays, read and transferred by background threads.

    Iterating yields `(x_BD, n_valid)`: `x_BD` a float32 `jax.Array [local_batch_size, d_vit]`
    on `device` (raw: apply `Preprocess` in the jitted step), `n_valid` an int.

    Read modes (`read_mode`, default `acts.cfg.read_mode`; `auto` picks `blocks` when the shard
    files are larger than the available memory, `choose_read_mode`):

    - `random`, `shuffle=True`: an endless stream. Epoch e is a pseudo-random permutation of
      every example, a keyed bijection of [0, len) (`permute`, a Feistel network with cycle
      walking) drawn from `(seed, e)`, so it costs no memory however large the dataset; epochs
      are concatenated and cut into full batches. Which examples share a batch is uniformly
      random; inside a batch the rows of each epoch come in dataset order, so each read is one
      forward sweep through the memory-mapped files. Fast while the files fit in the page
      cache; on a cold cache every example is a random 4 KB page fault.
    - `blocks`, `shuffle=True`: an endless stream for shard sets larger than memory, read at
      disk speed: runs of whole images (`block_bytes` per read, `io_threads` reads in flight,
      `pread`, no memory maps) in a keyed random order, shuffled through windows of
      `shuffle_buffer_bytes / 2` (`BlockOrder` has the exact order). Every example exactly once
      per epoch; a batch mixes the examples of one window (or two), not of the whole set.
    - `shuffle=False` (either mode): one pass in dataset order; the last batch is zero-padded
      and `n_valid` counts its real rows. `blocks` reads it with `pread` too.

    Resuming: batch i is a pure function of `(seed, i)` (and the dataset, batch size and mode),
    cheap to compute; `start_batch=N` starts the stream at batch N, so a run resumed at step N
    gets exactly the batches it would have had, after reading at most one window.

    Multi-host: `rows=(process_index, process_count)` yields only that process's contiguous
    share, rows `[p * B / P, (p + 1) * B / P)`, of every global batch (B a multiple of P); every
    process computes the same global batches. In `random` mode a process reads only its rows;
    in `blocks` mode it reads the windows its rows fall in (whole windows).

    `n_threads` reader threads (0 means 1) each build whole batches (`random`, and ordered
    passes); `blocks` uses one thread that gathers batches out of the window buffers. One
    transfer thread puts batches on the device in order, two ahead of the consumer; at most
    `max(2, buffer_bytes // batch bytes)` host batches are in flight, in recycled buffers
    (unless the device array shares the host buffer, as on CPU). The stream does not depend on
    `n_threads` or `io_threads`. Closing the iterator (`.close()`, or dropping it) stops and
    joins the threads; so does interpreter exit.
    """

    def __init__(
        self,
        acts: Activations,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        n_threads: int = 2,
        buffer_bytes: int = 2**30,
        device: jax.Device | jax.sharding.Sharding | None = None,
        read_mode: str | None = None,
        start_batch: int = 0,
        rows: tuple[int, int] = (0, 1),
        shuffle_buffer_bytes: int | None = None,
        block_bytes: int = 2**22,
        io_threads: int = 16,
        direct_io: bool = True,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n_threads < 0:
            raise ValueError(f"n_threads must not be negative, got {n_threads}")
        if seed < 0:
            raise ValueError(f"seed must not be negative, got {seed}")
        if start_batch < 0:
            raise ValueError(f"start_batch must not be negative, got {start_batch}")
        if len(acts) == 0:
            raise ValueError("no examples to load")
        process_i, n_processes = rows
        if not 0 <= process_i < n_processes or batch_size % n_processes:
            raise ValueError(f"rows = {rows}: need 0 <= process < count and batch_size {batch_size} divisible by count")
        read_mode = acts.cfg.read_mode if read_mode is None else read_mode
        if read_mode not in ("auto", "random", "blocks"):
            raise config.InputError(f"data.read_mode = {read_mode!r}: must be 'auto', 'random' or 'blocks'")
        self.acts = acts
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.start_batch = start_batch
        self.read_mode = choose_read_mode(acts) if read_mode == "auto" else read_mode
        self.local_batch_size = batch_size // n_processes
        self.row_start = process_i * self.local_batch_size
        # saev's n_workers defaults to 32; more readers than cores only contend. 0 (saev: no
        # worker processes) still needs one reader: the threads are what overlap reads with steps.
        self.n_threads = max(1, min(n_threads, os.cpu_count() or 1))
        # Reads wait on the disk, not the CPU: many in flight keep its queue full.
        self.io_threads = max(1, io_threads)
        self.direct_io = direct_io
        self.n_buffered = max(2, buffer_bytes // (self.local_batch_size * acts.d_vit * 4))
        self.device = device if device is not None else jax.devices()[0]
        self.order = None
        if self.read_mode == "blocks":
            if shuffle_buffer_bytes is None:
                shuffle_buffer_bytes = acts.cfg.shuffle_buffer_mib * 2**20
            imgs_per_block = max(1, round(block_bytes / acts.image_read_nbytes))
            block_mem = imgs_per_block * acts.examples_per_image * acts.d_vit * 4
            blocks_per_window = max(1, shuffle_buffer_bytes // 2 // block_mem)
            self.order = BlockOrder(
                acts.metadata.n_imgs, acts.examples_per_image, imgs_per_block, blocks_per_window, seed
            )

    def __len__(self) -> int:
        """Batches in the one ordered pass (`shuffle=False`), from batch 0; the shuffled stream has no end."""
        if self.shuffle:
            raise TypeError("a shuffled Loader is endless")
        return -(-len(self.acts) // self.batch_size)

    def batch_indices(self, batch_i: int) -> Int[np.ndarray, " n"]:
        """The dataset indices of global batch `batch_i`, in the order of its rows (without padding)."""
        if self.shuffle and self.order is not None:
            start = batch_i * self.batch_size
            return np.concatenate(
                [self.order.indices(g, rows) for g, rows in self.order.slots(start, start + self.batch_size)]
            )
        return np.concatenate(self._batch_segments(batch_i))

    def _batch_segments(self, batch_i: int) -> list[Int[np.ndarray, " n"]]:
        # `random` mode: one sorted run of indices per epoch that the batch touches, in stream order.
        n, size = len(self.acts), self.batch_size
        if not self.shuffle:
            return [np.arange(batch_i * size, min((batch_i + 1) * size, n), dtype=np.int64)]
        start, stop = batch_i * size, (batch_i + 1) * size
        segments = []
        for epoch in range(start // n, (stop - 1) // n + 1):
            pos = np.arange(max(start, epoch * n), min(stop, (epoch + 1) * n), dtype=np.uint64) - np.uint64(epoch * n)
            segments.append(np.sort(permute(pos, n, _keys(self.seed, epoch)).astype(np.int64)))
        return segments

    def read_batch(
        self, batch_i: int, out: Float[np.ndarray, "local_batch_size d_vit"] | None = None
    ) -> tuple[Float[np.ndarray, "local_batch_size d_vit"], int]:
        """This process's rows of batch `batch_i` on the host, zero-padded, and its count of real rows."""
        x_BD = _aligned_empty((self.local_batch_size, self.acts.d_vit)) if out is None else out
        lo = batch_i * self.batch_size + self.row_start
        hi = lo + self.local_batch_size
        if not self.shuffle:
            n_valid = max(0, min(hi, len(self.acts)) - lo)
            if n_valid and self.read_mode == "blocks":
                self.acts.read_range(lo, lo + n_valid, out=x_BD[:n_valid])
            elif n_valid:
                self.acts.read(np.arange(lo, lo + n_valid), out=x_BD[:n_valid])
        elif self.order is not None:
            raise RuntimeError("a shuffled blocks-mode batch is read through the window buffers; iterate the Loader")
        else:
            indices = np.concatenate(self._batch_segments(batch_i))[
                self.row_start : self.row_start + self.local_batch_size
            ]
            n_valid = indices.size
            self.acts.read(indices, out=x_BD[:n_valid])
        x_BD[n_valid:] = 0.0
        return x_BD, n_valid

    def __iter__(self) -> "LoaderIterator":
        return LoaderIterator(self)


class LoaderIterator:
    """One run of a Loader's threads; `close()` (or garbage collection) stops them."""

    def __init__(self, loader: Loader):
        self._pipeline = _Pipeline(loader)
        self._finalizer = weakref.finalize(self, self._pipeline.stop)

    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self) -> tuple[Float[Array, "batch_size d_vit"], int]:
        return self._pipeline.next()

    def close(self) -> None:
        """Stops and joins the threads. Idempotent."""
        self._finalizer()


_END = object()


class _Pipeline:
    """Producers -> host batches by number -> transfer thread (in order) -> queue of device arrays.

    Producers: `n_threads` batch readers (`random` mode and ordered passes), or, for a shuffled
    `blocks` stream, a window reader (block reads on an I/O thread pool into one of two window
    buffers) and one assembler gathering batches out of the windows. Host batch buffers cycle
    through `free`. Holds no reference to the LoaderIterator, so dropping the iterator finalizes it.
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        self.n_batches = None if loader.shuffle else len(loader)
        self.stopping = threading.Event()
        self.next_batch = itertools.count(loader.start_batch)
        self.free: queue.Queue = queue.Queue()  # recycled host batches
        self.n_host = 0  # host batches that exist and are not owned by a device array
        self.n_host_lock = threading.Lock()
        self.ready: dict[int, object] = {}
        self.ready_cond = threading.Condition()
        self.out: queue.Queue = queue.Queue(maxsize=2)
        if loader.shuffle and loader.order is not None:
            self.windows: dict[int, object] = {}
            self.window_cond = threading.Condition()
            self.window_slots = threading.Semaphore(2)
            self.window_bufs: queue.Queue = queue.Queue()
            for _ in range(2):
                self.window_bufs.put(None)
            targets = [("saev-windows", self._read_windows), ("saev-assembler", self._assemble)]
        else:
            targets = [(f"saev-reader-{i}", self._read) for i in range(loader.n_threads)]
        targets.append(("saev-transfer", self._transfer))
        self.threads = [threading.Thread(target=fn, name=name, daemon=True) for name, fn in targets]
        for thread in self.threads:
            thread.start()

    def _take_buffer(self) -> Float[np.ndarray, "local_batch_size d_vit"] | None:
        # A recycled host batch, or a new one while fewer than n_buffered exist (None when stopping).
        while not self.stopping.is_set():
            with self.n_host_lock:
                if self.free.empty() and self.n_host < self.loader.n_buffered:
                    self.n_host += 1
                    # Page-aligned, so that jax.device_put on CPU can alias it instead of copying.
                    return _aligned_empty((self.loader.local_batch_size, self.loader.acts.d_vit))
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def _deliver(self, batch_i: int, result: object) -> None:
        with self.ready_cond:
            self.ready[batch_i] = result
            self.ready_cond.notify_all()

    def _read(self) -> None:
        while True:
            buf = self._take_buffer()
            if buf is None:
                return
            batch_i = next(self.next_batch)
            if self.n_batches is not None and batch_i >= self.n_batches:
                self.free.put(buf)
                return
            try:
                result = self.loader.read_batch(batch_i, out=buf)
            except BaseException as err:  # handed to the consumer, which re-raises it
                result = err
            self._deliver(batch_i, result)

    def _needed(self, g: int) -> bool:
        # Whether stream window g holds any row of this process (rows [r0, r0 + b) of each batch).
        loader = self.loader
        start, stop = loader.order.window_span(g)
        size, r0 = loader.batch_size, loader.row_start
        q = start - start % size + r0
        if q + loader.local_batch_size <= start:
            q += size
        return q < stop

    def _read_windows(self) -> None:
        loader, order, acts = self.loader, self.loader.order, self.loader.acts
        local = threading.local()
        first = order.window_of(loader.start_batch * loader.batch_size + loader.row_start)

        def read_block(buf, j, block):
            if not hasattr(local, "scratch"):
                local.scratch = [None]
            img_a, img_b = order.block_images(int(block))
            rows = slice(j * order.block_n, j * order.block_n + (img_b - img_a) * order.per_img)
            acts.read_images(img_a, img_b, out=buf[rows], scratch=local.scratch, direct=loader.direct_io)

        with concurrent.futures.ThreadPoolExecutor(loader.io_threads, thread_name_prefix="saev-io") as pool:
            for g in itertools.count(first):
                if not self._needed(g):
                    continue
                while not self.window_slots.acquire(timeout=0.05):
                    if self.stopping.is_set():
                        return
                buf = self.window_bufs.get()
                if buf is None:
                    buf = np.empty((order.window_n, acts.d_vit), dtype=np.float32)
                blocks = order.blocks(g)
                # Submitted in file order, so that the disk's queue walks forward.
                futures = [pool.submit(read_block, buf, j, blocks[j]) for j in np.argsort(blocks)]
                try:
                    for future in futures:
                        while not self.stopping.is_set():
                            try:
                                future.result(timeout=0.05)
                                break
                            except concurrent.futures.TimeoutError:
                                pass
                        if self.stopping.is_set():
                            for f in futures:
                                f.cancel()
                            return
                    result = buf
                except BaseException as err:
                    result = err
                with self.window_cond:
                    self.windows[g] = result
                    self.window_cond.notify_all()
                if isinstance(result, BaseException):
                    return

    def _window(self, g: int) -> Float[np.ndarray, "window_n d_vit"] | None:
        with self.window_cond:
            while g not in self.windows:
                if self.stopping.is_set():
                    return None
                self.window_cond.wait(timeout=0.05)
            result = self.windows[g]
        if isinstance(result, BaseException):
            raise result
        return result

    def _release_windows_before(self, position: int) -> None:
        # Windows that end at or before `position` are used up: their buffers go to the reader.
        with self.window_cond:
            done = [g for g in self.windows if self.loader.order.window_span(g)[1] <= position]
            for g in done:
                buf = self.windows.pop(g)
                if not isinstance(buf, BaseException):
                    self.window_bufs.put(buf)
                    self.window_slots.release()

    def _assemble(self) -> None:
        loader, order = self.loader, self.loader.order
        for batch_i in itertools.count(loader.start_batch):
            buf = self._take_buffer()
            if buf is None:
                return
            start = batch_i * loader.batch_size + loader.row_start
            try:
                n = 0
                for g, rows in order.slots(start, start + loader.local_batch_size):
                    window = self._window(g)
                    if window is None:
                        return
                    np.take(window, rows, axis=0, out=buf[n : n + rows.size], mode="clip")
                    n += rows.size
                    # Batches may be larger than windows: free each window once passed.
                    self._release_windows_before(start + n)
                result = (buf, n)
            except BaseException as err:  # handed to the consumer, which re-raises it
                result = err
            self._release_windows_before(start + loader.batch_size)
            self._deliver(batch_i, result)
            if isinstance(result, BaseException):
                return

    def _transfer(self) -> None:
        for batch_i in itertools.count(self.loader.start_batch):
            if self.n_batches is not None and batch_i >= self.n_batches:
                self._put(_END)
                return
            with self.ready_cond:
                while batch_i not in self.ready:
                    if self.stopping.is_set():
                        return
                    self.ready_cond.wait(timeout=0.05)
                result = self.ready.pop(batch_i)
            if isinstance(result, BaseException):
                self._put(result)
                return
            x_BD, n_valid = result
            try:
                x_dev = to_device(x_BD, self.loader.device)
                x_dev.block_until_ready()
            except BaseException as err:
                self._put(err)
                return
            # Recycle the host buffer unless the device array is that very memory (CPU aliasing).
            if _shares_memory(x_dev, x_BD):
                with self.n_host_lock:
                    self.n_host -= 1
            else:
                self.free.put(x_BD)
            if not self._put((x_dev, n_valid)):
                return

    def _put(self, item: object) -> bool:
        while not self.stopping.is_set():
            try:
                self.out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def next(self) -> tuple[jax.Array, int]:
        while True:
            try:
                item = self.out.get(timeout=0.1)
            except queue.Empty:
                if self.stopping.is_set():
                    raise StopIteration from None
                continue
            if item is _END:
                self.stop()
                raise StopIteration
            if isinstance(item, BaseException):
                self.stop()
                raise item
            return item

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()


def to_device(x: np.ndarray, where: jax.Device | jax.sharding.Sharding) -> jax.Array:
    """`x` on a device, or as this process's part of a global array laid out by a sharding.

    With a sharding, every process passes the rows its devices hold (all of them when
    replicated); no collective is involved, so reader threads may call it while the main
    thread runs multi-process programs.
    """
    if isinstance(where, jax.sharding.Sharding):
        return jax.make_array_from_process_local_data(where, x)
    return jax.device_put(x, where)


def _shares_memory(x_dev: jax.Array, x_host: np.ndarray) -> bool:
    try:
        return x_dev.unsafe_buffer_pointer() == x_host.ctypes.data
    except Exception:  # not a single-device buffer: assume the worst, never recycle
        return True
