"""Activation shards written by saev: metadata, examples, statistics, preprocessing, loaders.

One concern per file; every public name is re-exported here, so callers write `data.X`:

- `format.py`: the shard format (SPEC 1). `Metadata` (`metadata.json`, validated), `shard_fname`,
  `Activations` (the raw examples of one `(patches, layer)` mode; vectorised `read(indices)` out of
  memory maps, `read_images` with `pread`).
- `stats.py`: `get_stats` / `Preprocess` / `make_preprocess` (SPEC 1 statistics on the host;
  clamp-centre-scale on the device); `sample_indices` and the keyed permutation `permute`.
- `loader.py`: `Loader`, the fast path. Shuffled (or ordered) batches as device arrays, from reader
  threads that gather whole batches in C out of memory-mapped shards (`random`) or read windows of
  blocks in a keyed order (`blocks`, `BlockOrder`); `available_memory`, `choose_read_mode`, `to_device`.
- `torch_dataset.py`: `Dataset`, saev's per-example torch dataset, for compatibility (and as the baseline);
  imported (with torch) on first use of `data.Dataset`.

Every mistake in what the user gave us raises `config.InputError` with a one-line message naming
the file, key or value, at construction where it can be known then.
"""

from .format import Activations, Metadata, shard_fname
from .loader import BlockOrder, Loader, LoaderIterator, available_memory, choose_read_mode, to_device
from .stats import Preprocess, get_stats, make_preprocess, permute, sample_indices


def __getattr__(name: str):
    # The torch Dataset loads on first use, so importing saev_jax (and its step) does not import torch.
    if name in ("Dataset", "Example"):
        from . import torch_dataset

        return getattr(torch_dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Activations",
    "BlockOrder",
    "Dataset",
    "Example",
    "Loader",
    "LoaderIterator",
    "Metadata",
    "Preprocess",
    "available_memory",
    "choose_read_mode",
    "get_stats",
    "make_preprocess",
    "permute",
    "sample_indices",
    "shard_fname",
    "to_device",
]
