"""Activation shards written by saev: metadata, examples, statistics, preprocessing, loaders.

Shard format (SPEC 1): `metadata.json` plus `acts000000.bin`, `acts000001.bin`, ..., each a raw
C-order float32 array `[n_imgs_per_shard, n_layers, n_tokens, d_vit]`, token 0 being [CLS] when
`cls_token` is true. Every shard has the full shape; the last is zero-padded past `n_imgs`.

- `Metadata`: `metadata.json`, validated.
- `Activations`: the raw examples of one `(patches, layer)` mode; vectorised `read(indices)`.
- `get_stats` / `Preprocess`: SPEC 1 statistics on the host; clamp-centre-scale on the device.
- `Loader`: the fast path. Shuffled (or ordered) batches as device arrays, from reader threads
  that gather whole batches in C out of memory-mapped shards.
- `Dataset`: saev's per-example torch dataset, for compatibility (and as the baseline).

Every mistake in what the user gave us raises `config.InputError` with a one-line message naming
the file, key or value, at construction where it can be known then.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import itertools
import json
import math
import mmap
import os
import pathlib
import queue
import threading
import weakref
from typing import TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jaxtyping import Array, Float, Int

from .. import config


@dataclasses.dataclass(frozen=True)
class Metadata:
    """The contents of a shard directory's `metadata.json` (saev's keys and meanings)."""

    model_family: str
    """The ViT family the activations come from."""
    model_ckpt: str
    """The ViT checkpoint."""
    layers: tuple[int, ...]
    """Layer indices recorded, in the order they are stored in the shards."""
    n_patches_per_img: int
    """Patch tokens per image (not counting [CLS])."""
    cls_token: bool
    """Whether token 0 of every image is the [CLS] token."""
    d_vit: int
    """Width of one activation vector."""
    seed: int
    """Seed saev used when recording."""
    n_imgs: int
    """Images recorded; shard rows at or beyond this are padding."""
    n_patches_per_shard: int
    """saev's shard size knob; `n_imgs_per_shard = n_patches_per_shard // n_layers // n_tokens`."""
    data: str
    """Description of the image dataset."""

    @classmethod
    def load(cls, shard_root: str | os.PathLike) -> "Metadata":
        """Parses and validates `<shard_root>/metadata.json`.

        Raises InputError (naming the file and key) when the directory or file is missing, the
        JSON is malformed, a key is missing or has the wrong type, or a size is not positive.
        Unknown extra keys are ignored, so newer saev versions still load.
        """
        fpath = pathlib.Path(shard_root) / "metadata.json"
        if not os.path.isdir(shard_root):
            raise config.InputError(f"{shard_root}: shard directory not found")
        try:
            with open(fpath) as fd:
                dct = json.load(fd)
        except FileNotFoundError:
            raise config.InputError(f"{fpath}: metadata.json not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise config.InputError(f"{fpath}: cannot read: {err}") from None
        except json.JSONDecodeError as err:
            raise config.InputError(f"{fpath}: invalid JSON: {err}") from None
        if not isinstance(dct, dict):
            raise config.InputError(f"{fpath}: expected a JSON object, got {type(dct).__name__}")

        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in dct:
                raise config.InputError(f"{fpath}: missing key '{field.name}'")
            value = dct[field.name]
            if field.name == "layers":
                ok = isinstance(value, list) and value and all(_is_int(v) for v in value)
                if not ok or len(set(value)) != len(value):
                    raise config.InputError(f"{fpath}: 'layers' = {value!r} must be a non-empty list of distinct ints")
                value = tuple(value)
            elif field.type is int:
                if not _is_int(value):
                    raise config.InputError(f"{fpath}: '{field.name}' = {value!r} must be an int")
            elif type(value) is not field.type:
                raise config.InputError(f"{fpath}: '{field.name}' = {value!r} must be {field.type.__name__}")
            kwargs[field.name] = value
        md = cls(**kwargs)
        for key in ("n_patches_per_img", "d_vit", "n_imgs", "n_patches_per_shard"):
            if getattr(md, key) <= 0:
                raise config.InputError(f"{fpath}: '{key}' = {getattr(md, key)} must be positive")
        if md.n_imgs_per_shard <= 0:
            raise config.InputError(
                f"{fpath}: 'n_patches_per_shard' = {md.n_patches_per_shard} is smaller than one image "
                f"({md.n_layers} layers x {md.n_tokens} tokens)"
            )
        return md

    def dump(self, shard_root: str | os.PathLike) -> None:
        """Writes `<shard_root>/metadata.json` as saev does."""
        dct = dataclasses.asdict(self)
        dct["layers"] = list(self.layers)
        with open(pathlib.Path(shard_root) / "metadata.json", "w") as fd:
            json.dump(dct, fd, indent=4)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_tokens(self) -> int:
        """Tokens stored per image and layer: the patches, plus [CLS] if recorded."""
        return self.n_patches_per_img + int(self.cls_token)

    @property
    def n_imgs_per_shard(self) -> int:
        return self.n_patches_per_shard // self.n_layers // self.n_tokens

    @property
    def n_shards(self) -> int:
        return -(-self.n_imgs // self.n_imgs_per_shard)

    @property
    def shard_shape(self) -> tuple[int, int, int, int]:
        """Shape of every `acts*.bin`: `[n_imgs_per_shard, n_layers, n_tokens, d_vit]`."""
        return (self.n_imgs_per_shard, self.n_layers, self.n_tokens, self.d_vit)


def shard_fname(shard_i: int) -> str:
    """saev's name for the shard_i-th shard file."""
    return f"acts{shard_i:06d}.bin"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Activations:
    """The raw (not preprocessed) examples of one `(patches, layer)` mode of a shard directory.

    Examples are numbered as in saev (SPEC 1 table). For the `all` modes the order is
    image-major: example `i` of `patches/all` is image `i // (n_layers * n_patches_per_img)`,
    layer `(i // n_patches_per_img) % n_layers`, patch `i % n_patches_per_img`; of `cls/all` and
    `meanpool/all`, image `i // n_layers`, layer `i % n_layers`. Layers are positions in
    `metadata.layers` here; `cfg.layer` names a value of it. Increasing example indices are
    increasing positions in the shard files, so a sorted read walks the files forward.

    Construction validates everything that can be checked without reading the data (metadata,
    mode, layer, every shard file's presence, readability and exact size) and raises InputError.
    Non-finite values are found as they are read: `read` raises InputError naming the shard file
    and image, because one NaN would silently turn every SAE of a sweep into NaN, scanning
    terabytes up front is too slow, and checking a block costs one extra pass over memory.
    """

    def __init__(self, cfg: config.DataLoad):
        self.cfg = cfg
        self.metadata = md = Metadata.load(cfg.shard_root)
        md_fpath = os.path.join(cfg.shard_root, "metadata.json")
        if cfg.patches not in ("cls", "patches", "meanpool"):
            raise config.InputError(f"data.patches = {cfg.patches!r}: must be 'cls', 'patches' or 'meanpool'")
        if isinstance(cfg.layer, bool) or not (isinstance(cfg.layer, int) or cfg.layer in ("all", "meanpool")):
            raise config.InputError(f"data.layer = {cfg.layer!r}: must be an int, 'all' or 'meanpool'")
        if isinstance(cfg.layer, int) and cfg.layer not in md.layers:
            raise config.InputError(
                f"data.layer = {cfg.layer} is not a recorded layer: {md_fpath} has layers {list(md.layers)}"
            )
        if cfg.patches == "cls" and not md.cls_token:
            raise config.InputError(f"data.patches = 'cls' needs a [CLS] token, but {md_fpath} has cls_token = false")

        if cfg.max_open_shards <= 0:
            raise config.InputError(f"data.max_open_shards = {cfg.max_open_shards}: must be positive")

        self._layer_i = md.layers.index(cfg.layer) if isinstance(cfg.layer, int) else None
        self._first_patch = int(md.cls_token)
        fpaths = [self.shard_fpath(i) for i in range(md.n_shards)]
        for fpath in fpaths:
            self._check_shard(fpath)
        # Files are opened on first use and at most max_open_shards at a time: a many-layer
        # dump has thousands of shards and the usual descriptor limit is 1024.
        self._files = _ShardFiles(fpaths, self.shard_nbytes, cfg.max_open_shards)

    @property
    def shard_nbytes(self) -> int:
        """Bytes in every shard file."""
        return math.prod(self.metadata.shard_shape) * 4

    def _check_shard(self, fpath: str) -> None:
        md = self.metadata
        if not os.path.exists(fpath):
            raise config.InputError(f"{fpath}: shard file missing (metadata.json implies {md.n_shards} shards)")
        if not os.path.isfile(fpath):
            raise config.InputError(f"{fpath}: not a regular file")
        size = os.path.getsize(fpath)
        if size != self.shard_nbytes:
            raise config.InputError(
                f"{fpath}: {size} bytes, but metadata.json implies {self.shard_nbytes} "
                f"(float32 {list(md.shard_shape)} = [n_imgs_per_shard, n_layers, n_tokens, d_vit])"
            )
        try:
            os.close(os.open(fpath, os.O_RDONLY))
        except OSError as err:
            raise config.InputError(f"{fpath}: cannot read: {err}") from None

    def __getstate__(self) -> dict:
        # Open files do not pickle (torch DataLoader workers started by spawn or forkserver
        # pickle their dataset): send the config and open the files again there.
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def shard_fpath(self, shard_i: int) -> str:
        """Path of the shard_i-th `.bin` file."""
        return os.path.join(self.cfg.shard_root, shard_fname(shard_i))

    @property
    def d_vit(self) -> int:
        return self.metadata.d_vit

    def __len__(self) -> int:
        md = self.metadata
        n = md.n_imgs
        if self.cfg.patches == "patches":
            n *= md.n_patches_per_img
        if self.cfg.layer == "all":
            n *= md.n_layers
        return n

    def _locate(
        self, indices: Int[np.ndarray, " n"]
    ) -> tuple[Int[np.ndarray, " n"], Int[np.ndarray, " n"] | None, Int[np.ndarray, " n"] | None]:
        """Image, layer position (None: mean over layers) and token (None: mean over patches) of each example."""
        md = self.metadata
        n_patches, n_layers = md.n_patches_per_img, md.n_layers
        per_img = indices
        if self.cfg.patches == "patches":
            per_img = indices // n_patches
            tok = self._first_patch + indices % n_patches
        elif self.cfg.patches == "cls":
            tok = np.zeros_like(indices)
        else:
            tok = None
        if self.cfg.layer == "all":
            layer = per_img % n_layers
            img = per_img // n_layers
        elif self.cfg.layer == "meanpool":
            layer, img = None, per_img
        else:
            layer, img = np.full_like(indices, self._layer_i), per_img
        return img, layer, tok

    def image_i(self, indices: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
        """The image each example comes from."""
        return self._locate(np.asarray(indices, dtype=np.int64))[0]

    def patch_i(self, indices: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
        """The patch (0 .. n_patches_per_img - 1) of each example, or -1 where an example is not one patch."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.cfg.patches == "patches":
            return indices % self.metadata.n_patches_per_img
        return np.full_like(indices, -1)

    def read(
        self, indices: Int[np.ndarray, " n"], *, out: Float[np.ndarray, "n d_vit"] | None = None
    ) -> Float[np.ndarray, "n d_vit"]:
        """The raw examples at `indices`, in the order given, as float32 `[n, d_vit]`.

        Written into `out` (C-contiguous float32) if given, else into a new array; returns it.
        Reads are grouped by shard and gathered in C from the memory-mapped files (sorted
        indices make them one forward sweep). Raises IndexError for an index outside [0, len)
        and InputError for a non-finite value (naming the shard file and image).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
        if out is None:
            out = np.empty((indices.size, self.d_vit), dtype=np.float32)
        if out.shape != (indices.size, self.d_vit) or out.dtype != np.float32 or not out.flags.c_contiguous:
            want = (indices.size, self.d_vit)
            raise ValueError(f"out must be C-contiguous float32 {want}, got {out.dtype} {out.shape}")
        if indices.size == 0:
            return out
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"example index out of range [0, {len(self)}): {indices.min()}..{indices.max()}")
        if np.all(indices[1:] >= indices[:-1]):
            self._read_sorted(indices, out)
        else:
            order = np.argsort(indices, kind="stable")
            out[order] = self._read_sorted(indices[order], np.empty_like(out))
        self._check_finite(out, indices)
        return out

    def _read_sorted(
        self, indices: Int[np.ndarray, " n"], out: Float[np.ndarray, "n d_vit"]
    ) -> Float[np.ndarray, "n d_vit"]:
        md = self.metadata
        img, layer, tok = self._locate(indices)
        shard = img // md.n_imgs_per_shard
        pos = img % md.n_imgs_per_shard
        # Sorted indices give non-decreasing shards: one contiguous segment per shard.
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for a, b in zip([0, *bounds], [*bounds, indices.size]):
            sel = slice(a, b)
            layer_n = None if layer is None else layer[sel]
            tok_n = None if tok is None else tok[sel]
            with self._files.use(int(shard[a])) as shard_file:
                self._gather(shard_file.mapped(md.shard_shape), pos[sel], layer_n, tok_n, out[sel])
        return out

    def _row_span(self) -> tuple[int, int]:
        """The rows `[lo, hi)` of an image (rows numbered layer-major, `layer * n_tokens + token`) this mode reads."""
        md = self.metadata
        n_tokens, first = md.n_tokens, self._first_patch
        top = 1 if self.cfg.patches == "cls" else n_tokens
        bottom = 0 if self.cfg.patches == "cls" else first
        if self._layer_i is not None:
            return self._layer_i * n_tokens + bottom, self._layer_i * n_tokens + top
        return bottom, (md.n_layers - 1) * n_tokens + top

    @property
    def examples_per_image(self) -> int:
        return len(self) // self.metadata.n_imgs

    @property
    def image_read_nbytes(self) -> int:
        """Bytes read per image by `read_images` (the rows this mode needs, and the gaps between them)."""
        lo, hi = self._row_span()
        return (hi - lo) * self.d_vit * 4

    def read_images(
        self, img_a: int, img_b: int, *, out: Float[np.ndarray, "n d_vit"], scratch: list | None = None,
        direct: bool = False,
    ) -> Float[np.ndarray, "n d_vit"]:
        """Every example of images `[img_a, img_b)`, in dataset order, into `out`; returns it.

        Reads with `pread`, never through a memory map: per shard one large read of the images'
        byte range when the rows this mode needs are at least half of it, else one read per image
        (its needed rows only). Raises InputError naming the file and byte offset when a read
        fails or comes back short (a file that shrank or vanished), and for non-finite values.
        `scratch`, a one-element list, lets a thread recycle its read buffer between calls.
        `direct` reads around the page cache where alignment allows (`O_DIRECT`).
        """
        md = self.metadata
        per_img, d_vit = self.examples_per_image, md.d_vit
        if not 0 <= img_a <= img_b <= md.n_imgs:
            raise IndexError(f"images [{img_a}, {img_b}) out of range [0, {md.n_imgs})")
        if out.shape != ((img_b - img_a) * per_img, d_vit) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {((img_b - img_a) * per_img, d_vit)}, got {out.dtype} {out.shape}")
        lo, hi = self._row_span()
        n_image_rows = md.n_layers * md.n_tokens
        merge = 2 * (hi - lo) >= n_image_rows
        stride = n_image_rows if merge else hi - lo  # rows between consecutive images in the buffer
        row_nbytes = d_vit * 4
        img = img_a
        while img < img_b:
            shard_i, first = divmod(img, md.n_imgs_per_shard)
            k = min(img_b - img, md.n_imgs_per_shard - first)
            n_rows = (k - 1) * stride + hi
            if scratch is not None and scratch[0] is not None and scratch[0].shape[0] >= n_rows:
                buf = scratch[0]
            else:
                buf = _aligned_empty((n_rows, d_vit))
                if scratch is not None:
                    scratch[0] = buf
            with self._files.use(shard_i) as shard_file:
                if merge:
                    offset = (first * n_image_rows + lo) * row_nbytes
                    shard_file.pread_into(buf[lo:n_rows], offset, direct=direct)
                else:
                    for j in range(k):
                        offset = ((first + j) * n_image_rows + lo) * row_nbytes
                        shard_file.pread_into(buf[j * stride + lo : j * stride + hi], offset, direct=direct)
            # Image j's row r sits at buffer row j * stride + r: view the buffer as whole images
            # (overlapping ones when stride < an image; only rows in [lo, hi) are ever touched).
            view_ILTD = np.lib.stride_tricks.as_strided(
                buf,
                shape=(k, md.n_layers, md.n_tokens, d_vit),
                strides=(stride * row_nbytes, md.n_tokens * row_nbytes, row_nbytes, 4),
                writeable=False,
            )
            indices = np.arange((img - img_a) * per_img, (img - img_a + k) * per_img, dtype=np.int64)
            img_n, layer, tok = self._locate(indices + img_a * per_img)
            self._gather(view_ILTD, img_n - img, layer, tok, out[indices[0] : indices[-1] + 1])
            img += k
        self._check_finite(out, np.arange(img_a * per_img, img_b * per_img, dtype=np.int64))
        return out

    def read_range(self, start: int, stop: int, *, out: Float[np.ndarray, "n d_vit"]) -> Float[np.ndarray, "n d_vit"]:
        """Examples `[start, stop)` into `out`, read as `read_images` does (whole images around them)."""
        per_img = self.examples_per_image
        img_a, img_b = start // per_img, -(-stop // per_img)
        whole = self.read_images(img_a, img_b, out=np.empty(((img_b - img_a) * per_img, self.d_vit), np.float32))
        out[...] = whole[start - img_a * per_img : stop - img_a * per_img]
        return out

    def _gather(
        self,
        acts_ILTD: Float[np.ndarray, "n_imgs n_layers n_tokens d_vit"],
        pos: Int[np.ndarray, " n"],
        layer: Int[np.ndarray, " n"] | None,
        tok: Int[np.ndarray, " n"] | None,
        out_nD: Float[np.ndarray, "n d_vit"],
    ) -> None:
        """Examples of images `pos` of `acts_ILTD` into `out_nD`; None means the mean over that axis."""
        md = self.metadata
        n_layers, n_tokens, d_vit = md.n_layers, md.n_tokens, md.d_vit
        if layer is not None and tok is not None:
            if acts_ILTD.flags.c_contiguous:
                # One row per example: a single C-level take straight into the output. (The
                # indices are in range; mode="raise" would make take copy through a temporary.)
                rows_RD = acts_ILTD.reshape(-1, d_vit)
                np.take(rows_RD, (pos * n_layers + layer) * n_tokens + tok, axis=0, out=out_nD, mode="clip")
            else:
                out_nD[...] = acts_ILTD[pos, layer, tok]
            return
        patches = slice(self._first_patch, n_tokens)
        if layer is None and tok is None:
            n_rows, axes = n_layers * md.n_patches_per_img, (1, 2)
        elif layer is None:
            n_rows, axes = n_layers, 1
        else:
            n_rows, axes = md.n_patches_per_img, 1
        # Means read several rows per example; chunk so the temporary stays near 64 MB.
        chunk = max(1, 2**26 // (n_rows * d_vit * 4))
        for a in range(0, pos.size, chunk):
            p = pos[a : a + chunk]
            if layer is None and tok is None:
                x = acts_ILTD[p, :, patches]
            elif layer is None:
                x = acts_ILTD[p, :, tok[a : a + chunk]]
            else:
                x = acts_ILTD[p, layer[a : a + chunk], patches]
            out_nD[a : a + chunk] = x.mean(axis=axes, dtype=np.float64)

    def _check_finite(self, x_nD: Float[np.ndarray, "n d_vit"], indices: Int[np.ndarray, " n"]) -> None:
        # One summation pass; it is non-finite iff some element is (or the sum overflowed).
        if np.isfinite(x_nD.sum()):
            return
        bad = np.flatnonzero(~np.isfinite(x_nD).all(axis=1))
        if bad.size == 0:
            return
        i = int(indices[bad[0]])
        img = int(self.image_i(np.array([i]))[0])
        shard_i, pos = divmod(img, self.metadata.n_imgs_per_shard)
        raise config.InputError(
            f"{self.shard_fpath(shard_i)}: non-finite activation in image {pos} of this shard "
            f"(image {img}, example {i} of data.patches={self.cfg.patches!r}, data.layer={self.cfg.layer!r})"
        )


class _ShardFile:
    """One open shard file: a descriptor, and a memory map made on first use."""

    def __init__(self, fpath: str, nbytes: int):
        self.fpath, self.nbytes = fpath, nbytes
        try:
            self.fd = os.open(fpath, os.O_RDONLY)
        except FileNotFoundError:
            raise config.InputError(f"{fpath}: shard file disappeared") from None
        except OSError as err:
            raise config.InputError(f"{fpath}: cannot open: {err}") from None
        self.users = 0
        self.evicted = False
        self._mmap = None
        self._no_readahead = False
        self._direct_fd: int | None = None

    def check_size(self) -> None:
        """InputError unless the file still has its full size (a shrunk file would SIGBUS a map)."""
        size = os.fstat(self.fd).st_size
        if size != self.nbytes:
            raise config.InputError(f"{self.fpath}: changed size while reading: now {size} bytes, expected {self.nbytes}")

    def mapped(self, shape: tuple[int, ...]) -> Float[np.ndarray, "..."]:
        """The whole file as a read-only float32 array of `shape`, size checked first."""
        self.check_size()
        if self._mmap is None:
            self._mmap = mmap.mmap(self.fd, self.nbytes, prot=mmap.PROT_READ)
        return np.frombuffer(self._mmap, dtype=np.float32).reshape(shape)

    def pread_into(self, buf: np.ndarray, offset: int, *, direct: bool = False) -> None:
        """Fills the C-contiguous `buf` from byte `offset`; InputError naming file and offset if it cannot.

        `direct`: bypass the page cache (`O_DIRECT`) when buffer, offset and size are 4 KiB
        aligned and the file system allows it: the disk then writes straight into `buf`, which
        saves the kernel's copy and its page-cache bookkeeping (most of the CPU of a cold read).
        """
        if not self._no_readahead and hasattr(os, "posix_fadvise"):
            # Reads here are large and at random offsets: the kernel's readahead (often several
            # MB past each read) would only fetch bytes nobody asked for.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._no_readahead = True
        view = memoryview(buf).cast("B")
        fd = self.fd
        if direct and buf.ctypes.data % 4096 == 0 and offset % 4096 == 0 and view.nbytes % 4096 == 0:
            fd = self._direct()
        done = 0
        while done < view.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as err:
                if fd != self.fd and err.errno == errno.EINVAL:  # O_DIRECT refused after all
                    self._direct_fd, fd = -1, self.fd
                    continue
                raise config.InputError(f"{self.fpath}: read error at byte {offset + done}: {err}") from None
            if n == 0:
                size = os.fstat(self.fd).st_size
                raise config.InputError(
                    f"{self.fpath}: short read at byte {offset + done} (file is {size} bytes, expected {self.nbytes})"
                )
            done += n

    def _direct(self) -> int:
        # The O_DIRECT descriptor, opened on first use; the plain one where it cannot be had.
        if self._direct_fd is None:
            try:
                self._direct_fd = os.open(self.fpath, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) if hasattr(os, "O_DIRECT") else -1
            except OSError:
                self._direct_fd = -1
        return self.fd if self._direct_fd < 0 else self._direct_fd

    def close(self) -> None:
        # A map outlives the descriptor; arrays still viewing it keep it alive until they go.
        self._mmap = None
        os.close(self.fd)
        if self._direct_fd is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)


class _ShardFiles:
    """At most `capacity` shard files open at once, least recently used closed first.

    A file in use by a thread is never closed under it: `use` counts users, and an evicted file
    closes when its last user is done (so the cap can be passed by the number of threads).
    """

    def __init__(self, fpaths: list[str], nbytes: int, capacity: int):
        self.fpaths, self.nbytes, self.capacity = fpaths, nbytes, capacity
        self.open: collections.OrderedDict[int, _ShardFile] = collections.OrderedDict()
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, shard_i: int):
        with self.lock:
            shard_file = self.open.get(shard_i)
            if shard_file is None:
                shard_file = _ShardFile(self.fpaths[shard_i], self.nbytes)
                self.open[shard_i] = shard_file
                while len(self.open) > self.capacity:
                    _, old = self.open.popitem(last=False)
                    old.evicted = True
                    if old.users == 0:
                        old.close()
            self.open.move_to_end(shard_i)
            shard_file.users += 1
        try:
            yield shard_file
        finally:
            with self.lock:
                shard_file.users -= 1
                if shard_file.evicted and shard_file.users == 0:
                    shard_file.close()

    def __del__(self) -> None:
        try:
            for shard_file in self.open.values():
                shard_file.close()
        except Exception:  # at interpreter exit `os` may already be gone; the OS closes them
            pass


def get_stats(acts: Activations, cfg: config.DataLoad) -> tuple[Float[np.ndarray, " d_vit"], float]:
    """The preprocessing statistics of SPEC 1: `(act_mean, scalar)`.

    `scale_mean` / `scale_norm`: True estimates from the `n_random_samples` examples of
    `sample_indices(len(acts), n_random_samples, seed=42)`, clamped to `[-clamp, clamp]` first; False gives zeros / 1; a string loads a `.npy` or torch `.pt` file.
    The norm uses whichever mean is in effect. Raises InputError, naming the shard root or the
    file, if a sampled value exceeds 1e3 in size, a mean exceeds 1e3, or a loaded file is bad.
    Memory grows with `n_random_samples` (8 bytes each for the indices), never with the data set
    (saev's full permutation costs 8 bytes per example); the sample is read in chunks.
    """
    d_vit = acts.d_vit
    act_mean = np.zeros(d_vit, dtype=np.float32)
    scalar = 1.0
    if isinstance(cfg.scale_mean, str):
        act_mean = _load_stat(cfg.scale_mean, "data.scale_mean", (d_vit,))
    if isinstance(cfg.scale_norm, str):
        scalar = float(_load_stat(cfg.scale_norm, "data.scale_norm", ()))
        if not scalar > 0:
            raise config.InputError(f"{cfg.scale_norm}: data.scale_norm must be positive, got {scalar}")
    if cfg.scale_mean is not True and cfg.scale_norm is not True:
        _check_mean(act_mean, cfg.scale_mean if isinstance(cfg.scale_mean, str) else cfg.shard_root)
        return act_mean, scalar

    n = min(cfg.n_random_samples, len(acts))
    if n <= 0:
        raise config.InputError(f"data.n_random_samples = {cfg.n_random_samples}: must be positive")
    sample = sample_indices(len(acts), n, seed=42)
    chunks = [np.sort(c) for c in np.array_split(sample, -(-n // 16384))]

    def clamped(chunk):
        x = np.clip(acts.read(chunk), -cfg.clamp, cfg.clamp)
        biggest = np.abs(x).max()
        if biggest > 1e3:
            raise config.InputError(
                f"{cfg.shard_root}: activation of size {biggest:.4g} > 1e3 in the sample used for the "
                f"mean and norm; these shards look broken (or set data.clamp)"
            )
        return x

    if cfg.scale_mean is True:
        total = np.zeros(d_vit, dtype=np.float64)
        for chunk in chunks:
            total += clamped(chunk).sum(axis=0, dtype=np.float64)
        act_mean = (total / n).astype(np.float32)
    _check_mean(act_mean, cfg.scale_mean if isinstance(cfg.scale_mean, str) else cfg.shard_root)
    if cfg.scale_norm is True:
        total_norm = 0.0
        for chunk in chunks:
            diff = (clamped(chunk) - act_mean).astype(np.float64)
            total_norm += np.sqrt(np.einsum("nd,nd->n", diff, diff)).sum()
        scalar = total_norm / n / math.sqrt(d_vit)
        if not scalar > 0:
            raise config.InputError(f"{cfg.shard_root}: every sampled example equals the mean; cannot scale the norm")
    return act_mean, float(scalar)


def _check_mean(act_mean: Float[np.ndarray, " d_vit"], where: str) -> None:
    biggest = np.abs(act_mean).max()
    if not biggest <= 1e3:
        raise config.InputError(f"{where}: mean activation of size {biggest:.4g} > 1e3; these statistics look broken")


def _load_stat(fpath: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of `shape` from a `.npy` or torch `.pt`/`.pth` file; InputError naming the file."""
    if not os.path.isfile(fpath):
        raise config.InputError(f"{fpath}: {key} file not found")
    suffix = pathlib.Path(fpath).suffix
    try:
        if suffix == ".npy":
            value = np.load(fpath, allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            value = torch.load(fpath, map_location="cpu", weights_only=True)
            value = value.numpy(force=True) if isinstance(value, torch.Tensor) else np.asarray(value)
        else:
            raise config.InputError(f"{fpath}: {key} must be a .npy or torch .pt file")
    except config.InputError:
        raise
    except Exception as err:  # numpy and torch raise many types for a corrupt file
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise config.InputError(f"{fpath}: cannot load {key}: {type(err).__name__}: {first_line}") from None
    value = np.asarray(value)
    if value.dtype.kind not in "fiu" or value.size != math.prod(shape):
        raise config.InputError(
            f"{fpath}: {key} must hold {math.prod(shape)} numbers, got {value.dtype} {list(value.shape)}"
        )
    value = value.astype(np.float32).reshape(shape)
    if not np.all(np.isfinite(value)):
        raise config.InputError(f"{fpath}: {key} holds non-finite values")
    return value


class Preprocess(eqx.Module):
    """SPEC 1 preprocessing of raw examples, on the device: clamp, minus the mean, divide by the scalar."""

    clamp: Float[Array, ""]
    act_mean: Float[Array, " d_vit"]
    scalar: Float[Array, ""]

    def __init__(self, clamp: float, act_mean: Float[np.ndarray, " d_vit"], scalar: float):
        self.clamp = jnp.asarray(clamp, dtype=jnp.float32)
        self.act_mean = jnp.asarray(act_mean, dtype=jnp.float32)
        self.scalar = jnp.asarray(scalar, dtype=jnp.float32)

    def __call__(self, x: Float[Array, "*batch d_vit"]) -> Float[Array, "*batch d_vit"]:
        """`(clip(x, -clamp, clamp) - act_mean) / scalar`, for one example or a batch."""
        return (jnp.clip(x, -self.clamp, self.clamp) - self.act_mean) / self.scalar


def make_preprocess(acts: Activations, cfg: config.DataLoad) -> Preprocess:
    """Preprocess with `cfg.clamp` and the statistics of `get_stats(acts, cfg)`."""
    act_mean, scalar = get_stats(acts, cfg)
    return Preprocess(cfg.clamp, act_mean, scalar)


class Example(TypedDict):
    """One item of `Dataset`, as in saev."""

    act: torch.Tensor
    """The preprocessed example, float32 [d_vit]."""
    image_i: int
    """The image it comes from."""
    patch_i: int
    """Its patch, or -1 when it is not one patch (cls, meanpool)."""


class Dataset(torch.utils.data.Dataset):
    """saev's map-style torch dataset: item i is `{"act", "image_i", "patch_i"}`, preprocessed.

    Same examples and order as `Activations(cfg)`; statistics from `get_stats` at
    construction. One example per call: use `Loader` for speed.
    """

    def __init__(self, cfg: config.DataLoad):
        self.cfg = cfg
        self.acts = Activations(cfg)
        act_mean, scalar = get_stats(self.acts, cfg)
        self.act_mean = torch.from_numpy(act_mean)
        self.scalar = scalar

    @property
    def metadata(self) -> Metadata:
        return self.acts.metadata

    @property
    def d_vit(self) -> int:
        return self.acts.d_vit

    def __len__(self) -> int:
        return len(self.acts)

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} examples")
        i = np.array([i % len(self)])
        act = torch.from_numpy(self.acts.read(i)[0])
        act = (act.clamp(-self.cfg.clamp, self.cfg.clamp) - self.act_mean) / self.scalar
        return Example(act=act, image_i=int(self.acts.image_i(i)[0]), patch_i=int(self.acts.patch_i(i)[0]))


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


def sample_indices(n_total: int, n: int, seed: int) -> Int[np.ndarray, " n"]:
    """`min(n, n_total)` distinct indices of `[0, n_total)`, a random sample without replacement.

    The first `n` values of a keyed permutation of `[0, n_total)` (`permute`, key from `seed`):
    memory and time grow with `n`, not with `n_total` (a full `np.random.permutation` costs 8
    bytes per example). The same `(n_total, seed)` gives nested samples for growing `n`.
    """
    n = min(n, n_total)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    return permute(np.arange(n, dtype=np.uint64), n_total, _keys(seed, 0x5A3B1E)).astype(np.int64)


def _keys(seed: int, *domain: int) -> Int[np.ndarray, " 4"]:
    # Four 64-bit round keys for `permute`, one independent stream per (seed, domain...).
    return np.random.default_rng([seed, *domain]).integers(0, 2**64, size=4, dtype=np.uint64)


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
        pos = np.arange(w * self.blocks_per_window, min((w + 1) * self.blocks_per_window, self.n_blocks), dtype=np.uint64)
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
            self.order = BlockOrder(acts.metadata.n_imgs, acts.examples_per_image, imgs_per_block, blocks_per_window, seed)

    def __len__(self) -> int:
        """Batches in the one ordered pass (`shuffle=False`), from batch 0; the shuffled stream has no end."""
        if self.shuffle:
            raise TypeError("a shuffled Loader is endless")
        return -(-len(self.acts) // self.batch_size)

    def batch_indices(self, batch_i: int) -> Int[np.ndarray, " n"]:
        """The dataset indices of global batch `batch_i`, in the order of its rows (without padding)."""
        if self.shuffle and self.order is not None:
            start = batch_i * self.batch_size
            return np.concatenate([self.order.indices(g, rows) for g, rows in self.order.slots(start, start + self.batch_size)])
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
            indices = np.concatenate(self._batch_segments(batch_i))[self.row_start : self.row_start + self.local_batch_size]
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


def permute(x: Int[np.ndarray, " n"], n: int, keys: Int[np.ndarray, " n_rounds"]) -> Int[np.ndarray, " n"]:
    """A pseudo-random bijection of [0, n), chosen by `keys`, applied to `x` (uint64, all < n).

    A balanced Feistel network on the smallest even number of bits covering n (one round per
    key), made a bijection of [0, n) by cycle walking: re-encrypt until the value is < n.
    O(len(x)) time and memory, whatever n is.
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def encrypt(v):
        left, right = v >> shift, v & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << shift) | right

    y = encrypt(np.asarray(x, dtype=np.uint64))
    todo = np.flatnonzero(y >= n)
    while todo.size:
        y[todo] = encrypt(y[todo])
        todo = todo[y[todo] >= n]
    return y


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a fast 64-bit hash with good avalanche (uint64 products wrap).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _aligned_empty(shape: tuple[int, int]) -> Float[np.ndarray, "..."]:
    nbytes = math.prod(shape) * 4
    buf = np.empty(nbytes + 4096, dtype=np.uint8)
    start = -buf.ctypes.data % 4096
    return buf[start : start + nbytes].view(np.float32).reshape(shape)
