"""Statistics and preprocessing (SPEC 1), and sampling by a keyed permutation.

- `get_stats` / `Preprocess` / `make_preprocess`: statistics on the host; clamp-centre-scale on
  the device.
- `sample_indices` and `permute`: samples and orders that cost O(n) for n of N examples, whatever N is.
"""

import math
import os
import pathlib

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .. import config
from .format import Activations


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
            import torch  # Only here: loading statistics saved by torch.

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
