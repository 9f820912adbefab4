"""Evaluates a stack of SAEs in one pass over the data: feature frequencies, L0, L1, MSE, FVU,
reconstruction bias and cosine similarity, quality; and from the weights, decoder redundancy.

One jitted reduction per batch updates running sums for every SAE of the stack at once (the
stack runs `chunk` SAEs at a time); `quality` (bits per example saved by coding the data
through the SAE, see `quality.py` and `docs/quality.md`) is computed on the host from those
sums. Everything is exact over the whole pass except the residual half of `quality`, whose
decoder products are taken on a systematic sample of the examples; its standard error is
reported beside it.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jaxtyping import Array, Float, Int

from . import config, data, kinds
from . import quality as quality_lib
from .metrics import EvalMetrics

QUALITY_EXAMPLES = 2**11
"""evaluate() samples at least this many examples (or all) for `quality`'s code sums ..."""
QUALITY_MAX_STRIDE = 32
"""... and at least one example in this many: the sums cost 2 * len(PRUNE_LEVELS) decoder
products per sampled example, so 1 in 32 keeps them near 1/5 of the forward pass."""
FLUSH_BATCHES = 128
"""The device sums move into float64/int64 host totals every this many batches: int32 counts
can then never wrap (128 batches of < 2^24 rows), and float32 sums never grow long."""
JACKKNIFE_BLOCKS = 32
"""The sampled residual sums are kept in 32 to 64 contiguous blocks for the standard error."""
N_CODE = 6
"""Scalar residual sums per SAE and pruning level: e.e, z.z, z.u, u.u, e.z, e.u (see _Sums)."""


class _Sums(eqx.Module):
    """Running sums of one evaluation pass on the device since the last flush: per SAE (leading M axis) and of the data.

    For each pruning level t (`quality.PRUNE_LEVELS`) a feature counts as sent when
    f * |W_dec row| > level_t * rms(x). `code_n_fired` and `code_values` (sent counts and
    values) and the residual sums (returned per batch by `_accumulate`) are taken on a sample
    of one example in `stride` only: with f_t the sent values, z = f_t @ W_dec, u = 1[sent] @ W_dec
    and e = x - b_dec - z, the residual sums are per level e.e, z.z, z.u, u.u, e.z, e.u:
    what `quality.debias` needs.
    """

    n_fired: Int[Array, "M d_sae"]
    values: Float[Array, "M d_sae"]
    sq_err: Float[Array, " M"]
    recon: Float[Array, "M 3"]
    """Per SAE: sum of ||x_hat||^2, of <x, x_hat>, of cos(x, x_hat) over the examples."""
    x_sum: Float[Array, " d_vit"]
    x_sq_sum: Float[Array, " d_vit"]
    code_n_fired: Int[Array, "M T d_sae"]
    code_values: Float[Array, "M T d_sae"]
    batch_n: Int[Array, ""]
    batch_fired: Int[Array, " M"]


@dataclasses.dataclass(frozen=True)
class PassStats:
    """The sums of one evaluation pass, on the host in float64; everything EvalMetrics derives from."""

    n: int
    """Number of examples."""
    n_fired: Float[np.ndarray, "M d_sae"]
    values: Float[np.ndarray, "M d_sae"]
    sq_err: Float[np.ndarray, " M"]
    recon: Float[np.ndarray, "M 3"]
    """Per SAE: sums of ||x_hat||^2, <x, x_hat> and cos(x, x_hat) over the examples."""
    x_sum: Float[np.ndarray, " d_vit"]
    x_sq_sum: Float[np.ndarray, " d_vit"]
    code_n_fired: Float[np.ndarray, "M T d_sae"]
    """Per pruning level, how often each feature was sent on the sampled examples."""
    code_values: Float[np.ndarray, "M T d_sae"]
    """Per pruning level, the sum of each feature's sent values on the sampled examples."""
    batch_n: int
    """Number of examples (in full batches) the `batch_fired` counts are over."""
    batch_fired: Float[np.ndarray, " M"]
    """Activations that fired in the training form (batch-coupled kinds only; else 0)."""
    code_block_n: Float[np.ndarray, " K"]
    """Number of sampled examples in each of the K blocks of the residual sums (contiguous in the pass)."""
    code_blocks: Float[np.ndarray, "K M T 6"]
    """The residual sums (e.e, z.z, z.u, u.u, e.z, e.u) of each block's sampled examples."""
    w_dec_norms: Float[np.ndarray, "M d_sae"]
    """L2 norm of every decoder row, from the parameters as evaluated."""
    dec_redundancy: Float[np.ndarray, " M"]
    """Fraction of latents whose nearest other decoder row has cosine similarity > `REDUNDANT_COS`."""

    @property
    def d_vit(self) -> int:
        return self.x_sum.shape[0]

    @property
    def data_var(self) -> float:
        """Mean over dimensions of the variance of the preprocessed data."""
        mean = self.x_sum / self.n
        return float(np.mean(self.x_sq_sum / self.n - mean**2))

    @property
    def total_var(self) -> float:
        """Sum over examples and dimensions of the squared deviation of the data from its mean."""
        return float(np.sum(self.x_sq_sum - self.x_sum**2 / self.n))

    @property
    def code_n(self) -> int:
        """Number of examples the residual sums are over."""
        return int(self.code_block_n.sum())

    @property
    def code_sq_err(self) -> Float[np.ndarray, "M T"]:
        """e.e per SAE and level, summed over the sample."""
        return self.code_blocks[..., 0].sum(0)

    @property
    def code_gram(self) -> Float[np.ndarray, "M T 3"]:
        """(z.z, z.u, u.u) per SAE and level, summed over the sample."""
        return self.code_blocks[..., 1:4].sum(0)

    @property
    def code_cross(self) -> Float[np.ndarray, "M T 2"]:
        """(e.z, e.u) per SAE and level, summed over the sample."""
        return self.code_blocks[..., 4:6].sum(0)


def _zero_sums(n_saes: int, d_sae: int, d_vit: int) -> _Sums:
    T = len(quality_lib.PRUNE_LEVELS)
    return _Sums(
        n_fired=np.zeros((n_saes, d_sae), np.int32),
        values=np.zeros((n_saes, d_sae), np.float32),
        sq_err=np.zeros(n_saes, np.float32),
        recon=np.zeros((n_saes, 3), np.float32),
        x_sum=np.zeros(d_vit, np.float32),
        x_sq_sum=np.zeros(d_vit, np.float32),
        code_n_fired=np.zeros((n_saes, T, d_sae), np.int32),
        code_values=np.zeros((n_saes, T, d_sae), np.float32),
        batch_n=np.zeros((), np.int32),
        batch_fired=np.zeros(n_saes, np.int32),
    )


def _recon_sums(x_BD, x_hat_BD, valid_B1) -> tuple[Float[Array, ""], Float[Array, " 3"]]:
    """Sums over the valid rows of ||x_hat - x||^2, and of ||x_hat||^2, <x, x_hat> and cos(x, x_hat) (0 where either is 0).

    Row sums first, masked per row: the three reductions share one pass over x_hat.
    """
    valid_B = valid_B1[:, 0]
    err_B, hat_sq_B, dot_B = (jnp.sum(a, axis=1) for a in ((x_hat_BD - x_BD) ** 2, x_hat_BD**2, x_BD * x_hat_BD))
    norms_B = jnp.sqrt(jnp.sum(x_BD**2, axis=1) * hat_sq_B)
    cos_B = jnp.where(norms_B > 0, dot_B / jnp.where(norms_B > 0, norms_B, 1.0), 0.0)
    sums = [jnp.sum(jnp.where(valid_B, a, 0.0)) for a in (err_B, hat_sq_B, dot_B, cos_B)]
    return sums[0], jnp.stack(sums[1:])


def _one_sae(sae: kinds.Inference, x_BD, valid_B1, rms_B1, rows_b, sampled_b1, n_valid):
    """One SAE's contribution to the sums of a batch: the plain ones over every row, the code's on the sampled rows."""
    levels_T11 = jnp.asarray(quality_lib.PRUNE_LEVELS, np.float32)[:, None, None]
    code = sae.encode_sparse(x_BD)  # the TopK family: k slots per example (kinds/sparse.py); else None
    if code is None:
        x_hat_BD, f_BS = jax.vmap(sae)(x_BD)
    else:
        x_hat_BD, f_BS = code.decode(sae.W_dec) + sae.b_dec, code.dense()
    f_BS = jnp.where(valid_B1, f_BS, 0.0)
    sq_err, recon = _recon_sums(x_BD, x_hat_BD, valid_B1)
    basic = (jnp.sum(f_BS > 0, axis=0, dtype=jnp.int32), jnp.sum(f_BS, axis=0), sq_err, recon)
    if type(sae.sae).batch_coupled:
        # The training form couples the examples of a batch: count full batches only.
        full = n_valid == x_BD.shape[0]
        n_batch = jnp.sum(sae.encode_batch(x_BD) > 0, dtype=jnp.int32) if code is None else code.n_train_fired
        basic += (jnp.where(full, n_batch, 0),)
    else:
        basic += (jnp.zeros((), jnp.int32),)

    # The code's sums, per pruning level, on the sampled rows only: which features are sent and
    # their values (elementwise, but 7 levels of it cost more than the forward pass on a CPU),
    # and z and u (2T decoder products, done as one product of the stacked [f_t; 1[sent_t]]).
    f_bS, x_bD, rms_b1 = f_BS[rows_b], x_BD[rows_b], rms_B1[rows_b]
    f_bS = jnp.where(sampled_b1, f_bS, 0.0)
    norms_S = jnp.linalg.norm(sae.W_dec, axis=1)
    sent_TbS = (f_bS * norms_S) > levels_T11 * rms_b1
    f_TbS = jnp.where(sent_TbS, f_bS, 0.0)
    levels = (jnp.sum(sent_TbS, axis=1, dtype=jnp.int32), jnp.sum(f_TbS, axis=1))
    T, b, S = sent_TbS.shape
    stacked = jnp.concatenate([f_TbS, sent_TbS.astype(jnp.float32)])
    if code is None:
        zu = (sae.decode(stacked.reshape(2 * T * b, S)) - sae.b_dec).reshape(2, T, b, -1)
    else:  # f and 1[sent] are zero outside the code's slots: products of k rows, not d_sae
        zu = code.products(rows_b, stacked, sae.W_dec).reshape(2, T, b, -1)
    z_TbD, u_TbD = zu[0], zu[1]  # 0 on padding rows: f is.
    e_TbD = jnp.where(sampled_b1, x_bD - sae.b_dec, 0.0) - z_TbD
    dot = lambda a, c: jnp.sum(a * c, axis=(1, 2))  # noqa: E731
    code = jnp.stack(
        [
            dot(e_TbD, e_TbD),
            dot(z_TbD, z_TbD),
            dot(z_TbD, u_TbD),
            dot(u_TbD, u_TbD),
            dot(e_TbD, z_TbD),
            dot(e_TbD, u_TbD),
        ],
        axis=1,
    )
    return basic, levels, code


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("stride", "chunk"))
def _accumulate(
    sums: _Sums,
    saes: kinds.Inference,
    preprocess: data.Preprocess,
    x_BD: Float[Array, "B d_vit"],
    n_valid: Int[Array, ""],
    offset: Int[Array, ""],
    *,
    stride: int,
    chunk: int,
) -> tuple[_Sums, Float[Array, "M T 6"], Int[Array, ""]]:
    """Adds one raw batch (of which the first `n_valid` rows are real) to the sums of every SAE.

    The code's sums are taken on rows offset, offset + stride, ... Returns the new sums, this
    batch's residual sums and its number of sampled rows.
    """
    x_BD = preprocess(x_BD)
    valid_B1 = (jnp.arange(x_BD.shape[0]) < n_valid)[:, None]
    x_BD = jnp.where(valid_B1, x_BD, 0.0)
    rms_B1 = jnp.sqrt(jnp.mean(x_BD**2, axis=1, keepdims=True))
    rows_b = offset + stride * jnp.arange(-(-x_BD.shape[0] // stride))
    sampled_b1 = ((rows_b < n_valid) & (rows_b < x_BD.shape[0]))[:, None]
    rows_b = jnp.minimum(rows_b, x_BD.shape[0] - 1)
    one = functools.partial(
        _one_sae, x_BD=x_BD, valid_B1=valid_B1, rms_B1=rms_B1, rows_b=rows_b, sampled_b1=sampled_b1, n_valid=n_valid
    )
    if chunk >= saes.b_dec.shape[0]:
        out = jax.vmap(one)(saes)
    else:  # Only `chunk` SAEs' [B, d_sae] activations alive at once.
        out = jax.lax.map(one, saes, batch_size=chunk)
    (n_fired, values, sq_err, recon, batch_fired), (code_n_fired, code_values), code = out
    new = _Sums(
        n_fired=sums.n_fired + n_fired, values=sums.values + values, sq_err=sums.sq_err + sq_err, recon=sums.recon + recon,
        x_sum=sums.x_sum + jnp.sum(x_BD, axis=0), x_sq_sum=sums.x_sq_sum + jnp.sum(x_BD**2, axis=0),
        code_n_fired=sums.code_n_fired + code_n_fired, code_values=sums.code_values + code_values,
        batch_n=sums.batch_n + jnp.where(n_valid == x_BD.shape[0], n_valid, 0), batch_fired=sums.batch_fired + batch_fired,
    )  # fmt: skip
    return new, code, jnp.sum(sampled_b1, dtype=jnp.int32)


def quality_stride(n: int, batch_size: int) -> int:
    """The sampling stride evaluate() uses for `quality`'s residual sums on `n` examples.

    The largest power of two that keeps at least `QUALITY_EXAMPLES` examples (all of them on
    a small dataset), at most `QUALITY_MAX_STRIDE` and at most the batch size.
    """
    stride = 1
    while 2 * stride <= min(QUALITY_MAX_STRIDE, batch_size) and n // (2 * stride) >= QUALITY_EXAMPLES:
        stride *= 2
    return stride


def evaluate(
    cfgs: list[config.Train],
    saes: "kinds.Inference | kinds.ReLU",
    acts: data.Activations,
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    almost_dead_threshold: float = 1e-7,
    dense_threshold: float = 1e-2,
    chunk: int | None = None,
    desc: str = "eval",
) -> list[EvalMetrics]:
    """Evaluates every SAE of a stack in one ordered pass over `acts`, with the parameters as given.

    Returns one EvalMetrics per SAE, in stack order (SPEC 4). The batches come from the fast
    loader without shuffling, `cfgs[0].sae_batch_size` examples each, the last one zero-padded.
    Everything is exact over the whole pass except `quality`'s residual sums, taken on every
    `quality_stride(len(acts), batch size)`-th example (`quality_stderr` says how much that
    matters). `chunk` SAEs run at once (default: the whole stack); results do not depend on it.
    `desc` labels the progress bar.
    """
    cfg = cfgs[0]
    loader = data.Loader(
        acts, batch_size=cfg.sae_batch_size, shuffle=False, seed=cfg.seed, n_threads=cfg.n_workers, device=device
    )
    n_batches = -(-len(acts) // cfg.sae_batch_size)
    batches = tqdm.tqdm(loader, total=n_batches, desc=desc, unit="batch", dynamic_ncols=True)
    return evaluate_batches(
        saes, batches, preprocess, device,
        almost_dead_threshold=almost_dead_threshold, dense_threshold=dense_threshold,
        quality_stride=quality_stride(len(acts), cfg.sae_batch_size), chunk=chunk,
    )  # fmt: skip


class _Blocks:
    """Contiguous blocks of per-batch residual sums, `JACKKNIFE_BLOCKS` to twice that many; pairs merge as the pass grows."""

    def __init__(self):
        self.n: list[float] = []
        self.sums: list[np.ndarray] = []
        self.size = 1  # batches per full block
        self.filled = 0  # batches in the last block

    def add(self, n: float, sums: np.ndarray) -> None:
        if self.n and self.filled < self.size:
            self.n[-1] += n
            self.sums[-1] = self.sums[-1] + sums
            self.filled += 1
            return
        if len(self.n) == 2 * JACKKNIFE_BLOCKS:  # Full: merge neighbours, blocks twice as long.
            self.n = [a + b for a, b in zip(self.n[::2], self.n[1::2])]
            self.sums = [a + b for a, b in zip(self.sums[::2], self.sums[1::2])]
            self.size *= 2
        self.n.append(n)
        self.sums.append(sums)
        self.filled = 1

    def arrays(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if not self.n:
            return np.zeros(0), np.zeros((0, *shape))
        return np.asarray(self.n, np.float64), np.stack(self.sums)


def accumulate(
    saes: "kinds.Inference | kinds.ReLU",
    batches: Iterable[tuple[Float[Array, "B d_vit"], int]],
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    quality_stride: int = 1,
    chunk: int | None = None,
) -> PassStats:
    """One pass over `(raw x_BD, n_valid)` batches, one jitted reduction per batch for the whole stack.

    Only the first `n_valid` rows of a batch count. Every batch should have the same shape (pad
    the last one), so the kernel compiles once. `quality`'s code sums are taken on rows
    o, o + s, o + 2s, ... of each batch (s = `quality_stride`, o drawn afresh per batch: every
    example is sampled with probability 1/s, evenly over the whole pass), the rest on every row. Sums accumulate on the device and move into float64/int64 host
    totals every `FLUSH_BATCHES` batches. `chunk` SAEs run at once (default: all).
    """
    saes = kinds.as_inference(saes)
    n_saes, d_sae = saes.b_enc.shape
    d_vit = saes.b_dec.shape[1]
    chunk = n_saes if chunk is None else max(1, min(int(chunk), n_saes))
    T = len(quality_lib.PRUNE_LEVELS)
    zero = lambda: jax.device_put(_zero_sums(n_saes, d_sae, d_vit), device)  # noqa: E731
    sums = zero()
    counts = ("n_fired", "code_n_fired", "batch_n", "batch_fired")
    host = {
        f.name: np.zeros(getattr(sums, f.name).shape, np.int64 if f.name in counts else np.float64)
        for f in dataclasses.fields(sums)
    }
    blocks, pending = _Blocks(), []
    # A fresh offset into every batch: a fixed one would sample the same patch positions of every image.
    offsets = np.random.default_rng(0)

    def flush():
        nonlocal sums, pending
        got, codes = jax.device_get((sums, pending))
        for f in dataclasses.fields(got):
            host[f.name] += np.asarray(getattr(got, f.name), host[f.name].dtype)
        for code, n_code in codes:
            blocks.add(float(n_code), np.asarray(code, np.float64))
        sums, pending = zero(), []

    n = 0
    for x_BD, n_valid in batches:
        if x_BD.shape[0] >= 2**31 // FLUSH_BATCHES:
            raise ValueError(f"evaluate: batches of {x_BD.shape[0]} rows could overflow the int32 counts")
        offset = jnp.asarray(offsets.integers(quality_stride), jnp.int32)
        sums, code, n_code = _accumulate(
            sums, saes, preprocess, x_BD, jnp.asarray(n_valid, jnp.int32), offset, stride=quality_stride, chunk=chunk
        )
        pending.append((code, n_code))
        n += int(n_valid)
        if len(pending) == FLUSH_BATCHES:
            flush()
    flush()
    if n == 0:
        raise ValueError("evaluate: no examples")
    block_n, block_sums = blocks.arrays((n_saes, T, N_CODE))
    host["batch_n"] = int(host["batch_n"])
    if not type(saes.sae).batch_coupled:
        host["batch_n"], host["batch_fired"] = n, host["n_fired"].sum(axis=1)  # the same as l0
    return PassStats(
        n=n, **host, code_block_n=block_n, code_blocks=block_sums,
        w_dec_norms=np.linalg.norm(np.asarray(saes.W_dec, np.float64), axis=-1),
        dec_redundancy=np.asarray(jax.device_get(dec_redundancy(saes.W_dec)), np.float64),
    )  # fmt: skip


REDUNDANT_COS = 0.9
"""Two decoder rows with a cosine similarity above this encode (nearly) the same direction."""
REDUNDANCY_BLOCK_BYTES = 1 << 28
"""`dec_redundancy` compares rows in blocks whose [rows, d_sae] similarities take at most this much."""


@jax.jit
def dec_redundancy(W_dec_MSD: Float[Array, "M d_sae d_vit"]) -> Float[Array, " M"]:
    """Per SAE, the fraction of latents whose nearest other decoder row has cosine similarity > `REDUNDANT_COS`.

    The d_sae x d_sae similarities are taken a block of rows at a time (`REDUNDANCY_BLOCK_BYTES`),
    so a wide SAE never holds them all at once. A zero row is similar to nothing.
    """
    M, S, _ = W_dec_MSD.shape
    norms_MS1 = jnp.linalg.norm(W_dec_MSD, axis=-1, keepdims=True)
    unit_MSD = W_dec_MSD / jnp.where(norms_MS1 > 0, norms_MS1, 1.0)
    block = max(1, min(S, REDUNDANCY_BLOCK_BYTES // (4 * S)))

    def nearest(unit_SD):
        def row(i):  # The most similar other row (lax.map runs `block` rows at once).
            sims_S = jnp.matmul(unit_SD, unit_SD[i], precision=jax.lax.Precision.HIGHEST)
            return jnp.max(jnp.where(jnp.arange(S) == i, -jnp.inf, sims_S))

        return jax.lax.map(row, jnp.arange(S), batch_size=block)

    nearest_MS = jax.lax.map(nearest, unit_MSD)
    return jnp.mean(nearest_MS > REDUNDANT_COS, axis=1)


def metrics_from_stats(
    stats: PassStats, *, almost_dead_threshold: float = 1e-7, dense_threshold: float = 1e-2
) -> list[EvalMetrics]:
    """One EvalMetrics per SAE of the pass, in stack order (SPEC 4, plus `quality` and its standard error)."""
    n, d_vit = stats.n, stats.d_vit
    freqs = stats.n_fired / n
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_values = stats.values / stats.n_fired
    out = []
    for m in range(len(stats.sq_err)):
        quality, stderr = quality_with_stderr(stats, m)
        x_hat_sq, x_dot_x_hat, cos_sum = stats.recon[m]
        with np.errstate(invalid="ignore", divide="ignore"):  # Constant data or a zero reconstruction: NaN or inf.
            fvu = float(np.float64(stats.sq_err[m]) / np.float64(stats.total_var))
            rel_bias = float(np.float64(x_hat_sq) / np.float64(x_dot_x_hat))
        out.append(EvalMetrics(
            l0=float(stats.n_fired[m].sum() / n),
            l0_batch=float(stats.batch_fired[m] / stats.batch_n) if stats.batch_n else None,
            l1=float(stats.values[m].sum() / n),
            mse=float(stats.sq_err[m] / (n * d_vit)),
            n_dead=int((freqs[m] == 0).sum()),
            n_almost_dead=int((freqs[m] < almost_dead_threshold).sum()),
            n_dense=int((freqs[m] > dense_threshold).sum()),
            freqs=freqs[m].astype(np.float32),
            mean_values=mean_values[m].astype(np.float32),
            almost_dead_threshold=almost_dead_threshold,
            dense_threshold=dense_threshold,
            quality=quality,
            quality_stderr=stderr,
            fvu=fvu,
            explained_variance=1.0 - fvu,
            rel_bias=rel_bias,
            cos_sim=float(cos_sum / n),
            dec_redundancy=float(stats.dec_redundancy[m]),
        ))  # fmt: skip
    return out


def _level_code(stats: PassStats, m: int, t: int) -> tuple[Float[np.ndarray, " d_sae"], Float[np.ndarray, " d_sae"]]:
    """Frequencies and mean values of the features SAE m sends at pruning level t, over the whole pass.

    Level 0 sends every fired feature: its statistics are the exact ones. A level's are the
    exact level-0 ones times what the sample says pruning keeps of each feature (the fraction
    of its sampled firings still sent, and the ratio of the sent values' mean to the sampled
    firings' mean; for a feature with no sampled firing, the same ratios pooled over all
    features). With every example sampled this is exact.
    """
    fired, values = stats.n_fired[m], stats.values[m]
    s0, v0 = stats.code_n_fired[m, 0], stats.code_values[m, 0]
    st, vt = stats.code_n_fired[m, t], stats.code_values[m, t]
    with np.errstate(invalid="ignore", divide="ignore"):
        kept = np.where(s0 > 0, st / s0, st.sum() / s0.sum() if s0.sum() > 0 else 0.0)
        pooled_growth = (vt.sum() / st.sum()) / (v0.sum() / s0.sum()) if st.sum() > 0 else 1.0
        growth = np.where(st > 0, (vt / st) / (v0 / s0), pooled_growth)  # Pruning drops the small values.
        mean_values = values / fired * growth
    freqs = fired / stats.n * kept * (stats.w_dec_norms[m] > 0)  # A zero row moves nothing and is never sent.
    return freqs, mean_values


def _level_bits(stats: PassStats, m: int, t: int, code_T6: Float[np.ndarray, "T 6"]) -> quality_lib.Bits:
    """The code of SAE m at pruning level t, with residual sums `code_T6` (every level's) from the sample.

    The debiased squared error of the sample is scaled by the ratio of the exact level-0 error
    (the SAE's own, summed over the whole pass) to the sample's: a ratio estimator, exact when
    every example is sampled, that cancels most of the sample's luck since every level's
    residual moves with level 0's.
    """
    code = code_T6[t]
    scale, shift, sq_err = quality_lib.debias(code[0], code[1:4], code[4:6])
    ratio = stats.sq_err[m] / code_T6[0, 0] if code_T6[0, 0] > 0 else stats.n / max(stats.code_n, 1)
    freqs, mean_values = _level_code(stats, m, t)
    return quality_lib.description_bits(
        freqs, scale * mean_values + shift, sq_err * ratio / (stats.n * stats.d_vit), stats.data_var, stats.d_vit, stats.w_dec_norms[m]
    )  # fmt: skip


def code_bits(stats: PassStats, m: int) -> list[quality_lib.Bits]:
    """The description-length terms of the m-th SAE's code at every pruning level (docs/quality.md)."""
    total = stats.code_blocks[:, m].sum(0)
    return [_level_bits(stats, m, t, total) for t in range(len(quality_lib.PRUNE_LEVELS))]


def quality_with_stderr(stats: PassStats, m: int) -> tuple[float, float]:
    """`quality` of the m-th SAE (the best level's) and its delete-one-block jackknife standard error.

    The error is that of the best level's value from sampling the residual sums, with the
    finite-population correction sqrt(1 - sample / n): 0 when every example was sampled; NaN
    with fewer than two blocks. (The per-feature ratios of `_level_code` are held fixed.)
    """
    levels = [b.quality for b in code_bits(stats, m)]
    best = int(np.nanargmax(levels)) if np.any(np.isfinite(levels)) else 0
    K, n_code = len(stats.code_block_n), stats.code_n
    if K < 2 or not math.isfinite(levels[best]):
        return float(levels[best]), math.nan
    total = stats.code_blocks[:, m].sum(0)
    loo = np.array([_level_bits(stats, m, best, total - stats.code_blocks[k, m]).quality for k in range(K)])
    var = (K - 1) / K * np.sum((loo - loo.mean()) ** 2)
    fpc = max(0.0, 1.0 - n_code / stats.n)
    return float(levels[best]), float(math.sqrt(var * fpc))


def evaluate_batches(
    saes: "kinds.Inference | kinds.ReLU",
    batches: Iterable[tuple[Float[Array, "B d_vit"], int]],
    preprocess: data.Preprocess,
    device: jax.Device | None = None,
    *,
    almost_dead_threshold: float = 1e-7,
    dense_threshold: float = 1e-2,
    quality_stride: int = 1,
    chunk: int | None = None,
) -> list[EvalMetrics]:
    """`evaluate` over any iterable of `(raw x_BD, n_valid)`: only the first `n_valid` rows count."""
    stats = accumulate(saes, batches, preprocess, device, quality_stride=quality_stride, chunk=chunk)
    return metrics_from_stats(stats, almost_dead_threshold=almost_dead_threshold, dense_threshold=dense_threshold)


# --------------------------------------------------------------------------- the command line
# `python -m saev_jax.evaluate CKPT... --data.shard-root DIR`: everything below only calls the
# public functions above, the checkpoint loader, plots and summary.
# Its imports are here, not at the top, to keep this section separate from the evaluation code.
