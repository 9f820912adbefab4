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
import dataclasses
import itertools
import json
import math
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

from . import config


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

        self._layer_i = md.layers.index(cfg.layer) if isinstance(cfg.layer, int) else None
        self._first_patch = int(md.cls_token)
        self._shards = [self._open_shard(i) for i in range(md.n_shards)]

    def _open_shard(self, shard_i: int) -> Float[np.ndarray, "n_rows d_vit"]:
        md = self.metadata
        fpath = self.shard_fpath(shard_i)
        expected = math.prod(md.shard_shape) * 4
        if not os.path.exists(fpath):
            raise config.InputError(f"{fpath}: shard file missing (metadata.json implies {md.n_shards} shards)")
        if not os.path.isfile(fpath):
            raise config.InputError(f"{fpath}: not a regular file")
        size = os.path.getsize(fpath)
        if size != expected:
            raise config.InputError(
                f"{fpath}: {size} bytes, but metadata.json implies {expected} "
                f"(float32 {list(md.shard_shape)} = [n_imgs_per_shard, n_layers, n_tokens, d_vit])"
            )
        try:
            mmap = np.memmap(fpath, dtype=np.float32, mode="r", shape=(expected // 4 // md.d_vit, md.d_vit))
        except OSError as err:
            raise config.InputError(f"{fpath}: cannot read: {err}") from None
        # A plain ndarray view (it keeps the mapping alive) so numpy's fast paths apply.
        return mmap.view(np.ndarray)

    def __getstate__(self) -> dict:
        # Pickling the memory maps would copy every shard (torch DataLoader workers started by
        # spawn or forkserver pickle their dataset): send the config and map again there.
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
            self._gather(self._shards[shard[a]], pos[sel], layer_n, tok_n, out[sel])
        return out

    def _gather(
        self,
        rows_RD: Float[np.ndarray, "n_rows d_vit"],
        pos: Int[np.ndarray, " n"],
        layer: Int[np.ndarray, " n"] | None,
        tok: Int[np.ndarray, " n"] | None,
        out_nD: Float[np.ndarray, "n d_vit"],
    ) -> None:
        """Examples of one shard (images at `pos`) into `out_nD`; None means the mean over that axis."""
        md = self.metadata
        n_layers, n_tokens, d_vit = md.n_layers, md.n_tokens, md.d_vit
        if layer is not None and tok is not None:
            # One row per example: a single C-level take straight into the output. (The indices
            # are in range; mode="raise" would make take copy through a temporary.)
            np.take(rows_RD, (pos * n_layers + layer) * n_tokens + tok, axis=0, out=out_nD, mode="clip")
            return
        acts_ILTD = rows_RD.reshape(md.shard_shape)
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


def get_stats(acts: Activations, cfg: config.DataLoad) -> tuple[Float[np.ndarray, " d_vit"], float]:
    """The preprocessing statistics of SPEC 1: `(act_mean, scalar)`.

    `scale_mean` / `scale_norm`: True estimates from the first `n_random_samples` examples of
    `np.random.default_rng(seed=42).permutation(len(acts))` (saev's sample), clamped to
    `[-clamp, clamp]` first; False gives zeros / 1; a string loads a `.npy` or torch `.pt` file.
    The norm uses whichever mean is in effect. Raises InputError, naming the shard root or the
    file, if a sampled value exceeds 1e3 in size, a mean exceeds 1e3, or a loaded file is bad.
    The permutation costs 8 bytes per example transiently (as in saev); the sample is read in
    chunks, so memory does not grow with `n_random_samples`.
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
    sample = np.random.default_rng(seed=42).permutation(len(acts))[:n]
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


class Loader:
    """Batches of raw examples as device arrays, read and transferred by background threads.

    Iterating yields `(x_BD, n_valid)`: `x_BD` a float32 `jax.Array [batch_size, d_vit]` on
    `device` (raw: apply `Preprocess` in the jitted step), `n_valid` an int.

    `shuffle=True`: an endless stream. Epoch e is a pseudo-random permutation of every example,
    a keyed bijection of [0, len) (a Feistel network, with cycle walking) drawn from
    `(seed, e)`, so it costs no memory however large the dataset; epochs are concatenated and
    cut into full batches (`n_valid == batch_size` always). Which examples share a batch is
    uniformly random; inside a batch the rows of each epoch come in dataset order, so each
    read is one forward sweep through the files (SAE losses are batch means; the order inside a
    batch does not matter). Cut at multiples of `len(acts)`, the stream is exactly one
    permutation per epoch. `shuffle=False`: one pass in dataset order; the last batch is zero-padded and
    `n_valid` counts its real rows.

    `n_threads` reader threads each read whole batches (C-level gathers that release the
    GIL); one transfer thread puts them on the device in order, two ahead of the consumer.
    At most `max(2, buffer_bytes // batch bytes)` host batches are in flight. The stream is
    deterministic in `seed` whatever `n_threads` is. Closing the iterator (`.close()`, or
    dropping it) stops and joins the threads; so does interpreter exit.
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
        device: jax.Device | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n_threads <= 0:
            raise ValueError(f"n_threads must be positive, got {n_threads}")
        if seed < 0:
            raise ValueError(f"seed must not be negative, got {seed}")
        if len(acts) == 0:
            raise ValueError("no examples to load")
        self.acts = acts
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        # saev's n_workers defaults to 32; more readers than cores only contend.
        self.n_threads = min(n_threads, os.cpu_count() or 1)
        self.n_buffered = max(2, buffer_bytes // (batch_size * acts.d_vit * 4))
        self.device = device if device is not None else jax.devices()[0]

    def __len__(self) -> int:
        """Batches in the one ordered pass (`shuffle=False`); the shuffled stream has no end."""
        if self.shuffle:
            raise TypeError("a shuffled Loader is endless")
        return -(-len(self.acts) // self.batch_size)

    def batch_indices(self, batch_i: int) -> Int[np.ndarray, " n"]:
        """The dataset indices of batch `batch_i`, in the order of its rows (without padding)."""
        return np.concatenate(self._batch_segments(batch_i))

    def _batch_segments(self, batch_i: int) -> list[Int[np.ndarray, " n"]]:
        # One sorted run of indices per epoch that the batch touches, in stream order.
        n, size = len(self.acts), self.batch_size
        if not self.shuffle:
            return [np.arange(batch_i * size, min((batch_i + 1) * size, n), dtype=np.int64)]
        start, stop = batch_i * size, (batch_i + 1) * size
        segments = []
        for epoch in range(start // n, (stop - 1) // n + 1):
            pos = np.arange(max(start, epoch * n), min(stop, (epoch + 1) * n), dtype=np.uint64) - np.uint64(epoch * n)
            keys = np.random.default_rng([self.seed, epoch]).integers(0, 2**64, size=4, dtype=np.uint64)
            segments.append(np.sort(permute(pos, n, keys).astype(np.int64)))
        return segments

    def read_batch(self, batch_i: int) -> tuple[Float[np.ndarray, "batch_size d_vit"], int]:
        """Batch `batch_i` on the host, zero-padded to `batch_size` rows, and its count of real rows."""
        # Page-aligned, so that jax.device_put on CPU can alias it instead of copying.
        x_BD = _aligned_empty((self.batch_size, self.acts.d_vit))
        n_valid = 0
        for indices in self._batch_segments(batch_i):
            self.acts.read(indices, out=x_BD[n_valid : n_valid + indices.size])
            n_valid += indices.size
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
    """Reader threads -> batches in order -> transfer thread -> queue of device arrays.

    Holds no reference to the LoaderIterator, so dropping the iterator finalizes it.
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        self.n_batches = None if loader.shuffle else len(loader)
        self.stopping = threading.Event()
        self.next_batch = itertools.count()
        self.slots = threading.Semaphore(loader.n_buffered)
        self.ready: dict[int, object] = {}
        self.ready_cond = threading.Condition()
        self.out: queue.Queue = queue.Queue(maxsize=2)
        self.threads = [
            threading.Thread(target=self._read, name=f"saev-reader-{i}", daemon=True) for i in range(loader.n_threads)
        ]
        self.threads.append(threading.Thread(target=self._transfer, name="saev-transfer", daemon=True))
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        while not self.stopping.is_set():
            if not self.slots.acquire(timeout=0.05):
                continue
            batch_i = next(self.next_batch)
            if self.n_batches is not None and batch_i >= self.n_batches:
                self.slots.release()
                return
            try:
                result = self.loader.read_batch(batch_i)
            except BaseException as err:  # handed to the consumer, which re-raises it
                result = err
            with self.ready_cond:
                self.ready[batch_i] = result
                self.ready_cond.notify_all()

    def _transfer(self) -> None:
        for batch_i in itertools.count():
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
                x_BD = to_device(x_BD, self.loader.device)
                x_BD.block_until_ready()
            except BaseException as err:
                self._put(err)
                return
            finally:
                self.slots.release()
            if not self._put((x_BD, n_valid)):
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
