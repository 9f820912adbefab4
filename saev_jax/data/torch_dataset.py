"""`Dataset`: saev's per-example torch dataset, for compatibility (and as the baseline)."""

from typing import TypedDict

import numpy as np
import torch

from .. import config
from .format import Activations, Metadata
from .stats import get_stats


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
