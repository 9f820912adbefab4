"""The shard format saev writes, and its readers: metadata, shard files, raw examples.

Shard format (SPEC 1): `metadata.json` plus `acts000000.bin`, `acts000001.bin`, ..., each a raw
C-order float32 array `[n_imgs_per_shard, n_layers, n_tokens, d_vit]`, token 0 being [CLS] when
`cls_token` is true. Every shard has the full shape; the last is zero-padded past `n_imgs`.

- `Metadata`: `metadata.json`, validated.
- `Activations`: the raw examples of one `(patches, layer)` mode; vectorised `read(indices)`
  out of memory maps, `read_images` with `pread` (the `blocks` read mode).

Every mistake in what the user gave us raises `config.InputError` with a one-line message naming
the file, key or value, at construction where it can be known then.
"""

import collections
import contextlib
import dataclasses
import errno
import json
import math
import mmap
import os
import pathlib
import threading

import numpy as np
from jaxtyping import Float, Int

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
        self,
        img_a: int,
        img_b: int,
        *,
        out: Float[np.ndarray, "n d_vit"],
        scratch: list | None = None,
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
            raise config.InputError(
                f"{self.fpath}: changed size while reading: now {size} bytes, expected {self.nbytes}"
            )

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
                self._direct_fd = (
                    os.open(self.fpath, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) if hasattr(os, "O_DIRECT") else -1
                )
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


def _aligned_empty(shape: tuple[int, int]) -> Float[np.ndarray, "..."]:
    nbytes = math.prod(shape) * 4
    buf = np.empty(nbytes + 4096, dtype=np.uint8)
    start = -buf.ctypes.data % 4096
    return buf[start : start + nbytes].view(np.float32).reshape(shape)
