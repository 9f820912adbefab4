"""Activation shards written by saev: every public name of the data package, as `data.X`."""

from .format import (
    Activations,
    BlockOrder,
    Dataset,
    Example,
    Loader,
    LoaderIterator,
    Metadata,
    Preprocess,
    available_memory,
    choose_read_mode,
    get_stats,
    make_preprocess,
    permute,
    sample_indices,
    shard_fname,
    to_device,
)

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
