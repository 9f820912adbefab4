"""Synthetic activation shards, in saev's exact on-disk format, from a known sparse dictionary.

    python -m saev_jax.synthetic --out DIR [--d-vit 64 --n-features 512 --k 8 ...]

writes `metadata.json`, `acts000000.bin`, ... and `truth.npy` (the dictionary, `[n_features,
d_vit]` float32 with unit rows) into DIR.

Generative model. A dictionary `truth` of `n_features` random unit directions in R^d_vit. Feature
f is drawn with probability `q_f` proportional to `1 / rank_f ** zipf_exponent` (ranks shuffled
over feature ids), so a few features are common and most are rare. Every image draws
Poisson(k) *image features* (ids from `q`); each of its patches keeps each image feature with
probability 1/2 (so patches of one image are correlated and a poor shuffle shows), and adds
Poisson(k/2) *private features* of its own; a token has about k active features on average. The
[CLS] token carries all of its image's features plus Poisson(k/2) private ones, all from the same
dictionary. A feature's magnitude is `scale_f * LogNormal(0, 1/2)` with a per-feature
`scale_f ~ 2 * LogNormal(0, 1/2)`, so codes are sparse and nonnegative. Layer l of a token is

    x = gain_l * (codes @ truth) + offset_l + noise * N(0, I)

with `gain_l` spread over [0.75, 1.25] and a constant per-layer `offset_l ~ N(0, 2^2 I)`, so
mean-centering matters; elements are O(1)-O(10), far below saev's 1e3 sanity bound.

Everything is deterministic in `seed` (the dictionary from `(seed, 0)`, shard s from
`(seed, 1, s)`; so changing `n_patches_per_shard` changes the draws). Shards are generated and
written one chunk of images at a time, so memory stays bounded whatever `n_imgs` is.
"""

import dataclasses
import os
import pathlib

import numpy as np
from jaxtyping import Float, Int

from . import data


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """Shape and generative parameters of a synthetic shard set."""

    d_vit: int = 64
    """Width of one activation vector."""
    n_features: int = 512
    """Number of true dictionary features."""
    k: float = 8
    """Average number of active features per token."""
    n_imgs: int = 512
    """Number of images."""
    n_patches_per_img: int = 16
    """Patch tokens per image (not counting [CLS])."""
    layers: tuple[int, ...] = (-2, -1)
    """Layer indices recorded (values, as saev stores them)."""
    cls_token: bool = True
    """Store a [CLS] token as token 0 of every image."""
    n_patches_per_shard: int = 4096
    """saev's shard size knob: each shard holds n_patches_per_shard // n_layers // n_tokens images."""
    noise: float = 0.05
    """Standard deviation of the Gaussian noise added to every element."""
    zipf_exponent: float = 1.0
    """Feature probabilities fall off as 1 / rank ** zipf_exponent."""
    seed: int = 0
    """Seed of the dictionary and of every draw."""


@dataclasses.dataclass(frozen=True)
class Dictionary:
    """The ground truth that generates a shard set."""

    truth: Float[np.ndarray, "n_features d_vit"]
    probs: Float[np.ndarray, " n_features"]
    scales: Float[np.ndarray, " n_features"]
    gains: Float[np.ndarray, " n_layers"]
    offsets: Float[np.ndarray, "n_layers d_vit"]


def make_dictionary(cfg: Synthetic) -> Dictionary:
    """The dictionary, feature probabilities, magnitudes and per-layer gains/offsets of `cfg`."""
    rng = np.random.default_rng([cfg.seed, 0])
    truth = rng.standard_normal((cfg.n_features, cfg.d_vit))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    ranks = rng.permutation(cfg.n_features) + 1
    probs = 1.0 / ranks.astype(np.float64) ** cfg.zipf_exponent
    probs /= probs.sum()
    scales = 2.0 * rng.lognormal(0.0, 0.5, cfg.n_features)
    gains = np.linspace(0.75, 1.25, len(cfg.layers)) if len(cfg.layers) > 1 else np.ones(1)
    offsets = rng.normal(0.0, 2.0, (len(cfg.layers), cfg.d_vit))
    return Dictionary(
        truth=truth.astype(np.float32),
        probs=probs,
        scales=scales,
        gains=gains.astype(np.float32),
        offsets=offsets.astype(np.float32),
    )


def write_shards(out_dpath: str | os.PathLike, cfg: Synthetic) -> data.Metadata:
    """Writes a complete shard set for `cfg` into `out_dpath` (created if needed) and returns its metadata.

    Files: `metadata.json`, `acts%06d.bin` (saev's layout, last shard zero-padded past
    `n_imgs`) and `truth.npy`. Deterministic in `cfg`.
    """
    if cfg.n_imgs <= 0 or cfg.n_patches_per_img <= 0 or cfg.d_vit <= 0 or cfg.n_features <= 0:
        raise ValueError(f"sizes must be positive: {cfg}")
    out_dpath = pathlib.Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)
    md = data.Metadata(
        model_family="synthetic",
        model_ckpt=f"synthetic-seed{cfg.seed}",
        layers=tuple(cfg.layers),
        n_patches_per_img=cfg.n_patches_per_img,
        cls_token=cfg.cls_token,
        d_vit=cfg.d_vit,
        seed=cfg.seed,
        n_imgs=cfg.n_imgs,
        n_patches_per_shard=cfg.n_patches_per_shard,
        data=repr(cfg),
    )
    if md.n_imgs_per_shard <= 0:
        raise ValueError(f"n_patches_per_shard={cfg.n_patches_per_shard} is smaller than one image")

    dictionary = make_dictionary(cfg)
    np.save(out_dpath / "truth.npy", dictionary.truth)
    # Chunks of images small enough that their temporaries stay near 64 MB.
    imgs_per_chunk = max(1, min(md.n_imgs_per_shard, int(2**24 // (md.n_tokens * cfg.d_vit * max(1.0, cfg.k)))))
    shard_nbytes = int(np.prod(md.shard_shape)) * 4
    for shard_i in range(md.n_shards):
        rng = np.random.default_rng([cfg.seed, 1, shard_i])
        start = shard_i * md.n_imgs_per_shard
        n_imgs = min(md.n_imgs_per_shard, cfg.n_imgs - start)
        with open(out_dpath / data.shard_fname(shard_i), "wb") as fd:
            for chunk_start in range(0, n_imgs, imgs_per_chunk):
                n = min(imgs_per_chunk, n_imgs - chunk_start)
                make_images(rng, dictionary, n, cfg).tofile(fd)
            # Zero padding past n_imgs, as saev's full-size memmap leaves it.
            fd.truncate(shard_nbytes)
    md.dump(out_dpath)
    return md


def draw_features(
    rng: np.random.Generator, dictionary: Dictionary, n_imgs: int, cfg: Synthetic
) -> tuple[Int[np.ndarray, " nnz"], Int[np.ndarray, " nnz"], Float[np.ndarray, " nnz"]]:
    """The active features of `n_imgs` fresh images (module docstring) as `(token, feature, magnitude)`.

    `token` numbers the images' tokens image-major (`image * n_tokens + token`); a feature may
    appear twice for one token (the magnitudes add up).
    """
    n_feat, n_patches = cfg.n_features, cfg.n_patches_per_img
    n_tokens = n_patches + int(cfg.cls_token)
    first_patch = int(cfg.cls_token)

    def draw(n_owners: int, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Poisson(rate) features per owner: (owner, feature, magnitude) triples.
        counts = rng.poisson(rate, n_owners)
        owner = np.repeat(np.arange(n_owners), counts)
        feat = rng.choice(n_feat, size=owner.size, p=dictionary.probs)
        mag = dictionary.scales[feat] * rng.lognormal(0.0, 0.5, owner.size)
        return owner, feat, mag

    # Image features: every patch keeps each one with probability 1/2; [CLS] keeps them all.
    img, img_feat, img_mag = draw(n_imgs, cfg.k)
    keep_EP = rng.random((img.size, n_patches)) < 0.5
    entry_i, patch_i = np.nonzero(keep_EP)
    tok = [img[entry_i] * n_tokens + first_patch + patch_i]
    feat = [img_feat[entry_i]]
    mag = [img_mag[entry_i]]
    if cfg.cls_token:
        tok.append(img * n_tokens)
        feat.append(img_feat)
        mag.append(img_mag)
    own_tok, own_feat, own_mag = draw(n_imgs * n_tokens, cfg.k / 2)
    tok.append(own_tok)
    feat.append(own_feat)
    mag.append(own_mag)
    return np.concatenate(tok), np.concatenate(feat), np.concatenate(mag).astype(np.float32)


def make_codes(
    rng: np.random.Generator, dictionary: Dictionary, n_imgs: int, cfg: Synthetic
) -> Float[np.ndarray, "n_imgs n_tokens n_features"]:
    """Dense sparse-nonnegative codes of `n_imgs` fresh images (same draws as `make_images`)."""
    n_tokens = cfg.n_patches_per_img + int(cfg.cls_token)
    tok, feat, mag = draw_features(rng, dictionary, n_imgs, cfg)
    codes = np.bincount(tok * cfg.n_features + feat, weights=mag, minlength=n_imgs * n_tokens * cfg.n_features)
    return codes.reshape(n_imgs, n_tokens, cfg.n_features).astype(np.float32)


def make_images(
    rng: np.random.Generator, dictionary: Dictionary, n_imgs: int, cfg: Synthetic
) -> Float[np.ndarray, "n_imgs n_layers n_tokens d_vit"]:
    """Activations of `n_imgs` fresh images drawn from the generative model (module docstring)."""
    n_tokens = cfg.n_patches_per_img + int(cfg.cls_token)
    tok, feat, mag = draw_features(rng, dictionary, n_imgs, cfg)
    # codes @ truth without the dense codes: add each token's few scaled dictionary rows, one
    # rank at a time (the r-th entry of every token), so no token repeats within one update.
    order = np.argsort(tok, kind="stable")
    tok, feat, mag = tok[order], feat[order], mag[order]
    first = np.r_[True, tok[1:] != tok[:-1]] if tok.size else np.zeros(0, dtype=bool)
    rank = np.arange(tok.size) - np.maximum.accumulate(np.where(first, np.arange(tok.size), 0))
    signal_TD = np.zeros((n_imgs * n_tokens, cfg.d_vit), dtype=np.float32)
    for r in range(int(rank.max(initial=-1)) + 1):
        sel = rank == r
        signal_TD[tok[sel]] += mag[sel, None] * dictionary.truth[feat[sel]]
    signal_ITD = signal_TD.reshape(n_imgs, 1, n_tokens, cfg.d_vit)
    gains = dictionary.gains[None, :, None, None]
    offsets = dictionary.offsets[None, :, None, :]
    shape = (n_imgs, len(cfg.layers), n_tokens, cfg.d_vit)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(cfg.noise)
    return (gains * signal_ITD + offsets + noise).astype(np.float32)


def main(out: pathlib.Path, cfg: Synthetic = Synthetic()) -> None:
    """Writes a synthetic shard set into OUT.

    Args:
        out: Directory to write metadata.json, acts*.bin and truth.npy into.
        cfg: What to generate.
    """
    md = write_shards(out, cfg)
    print(f"wrote {md.n_shards} shards ({md.n_imgs} images, {md.shard_shape} each) and truth.npy to {out}")


if __name__ == "__main__":
    import tyro  # only the command line needs it

    tyro.cli(main, config=(tyro.conf.OmitArgPrefixes,))
