"""Sparse encoding and decoding for the TopK family: the arithmetic of k active latents, not of d_sae.

An SAE of the TopK family keeps a few latents per example. Here the kept ones are a flat list
of N entries `(value, row, col)` (row: the example, or any segment of the output; col: the
latent), and the two products that touch them cost N * d_vit each instead of B * d_sae * d_vit:

- `take` reads the selected pre-activations `h[row, col]` out of the dense encoder product (the
  one dense product a TopK step needs); its gradient goes only to the selected columns of
  W_enc and b_enc (a scatter-add of `x[row] * g`), and to b_dec through `-W_enc @ db_enc`.
- `decode` is `sum_n value_n * W_dec[col_n]` added into row `row_n` (a gather and a
  scatter-add); its gradient is `<g[row], W_dec[col]>` for the values and a scatter-add of
  `value * g[row]` into the selected rows of W_dec.

Both are `jax.custom_vjp`s whose forward and backward run over the entries in chunks of
`CHUNK` inside a `lax.while_loop`: memory stays at one chunk's `[CHUNK, d_vit]` (JAX's own
gradient of a gather would save every gathered row, and on CPU it measured 2.3x slower than
these loops), and an `active` flag skips the loop entirely (AuxK does nothing without dead
latents). Under `vmap` a while loop runs as long as any SAE of the chunk needs it.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

CHUNK = 8192
"""Entries per loop iteration: a [CHUNK, d_vit] float32 temporary (32 MiB at d_vit 1024)."""


def _padded(n: int) -> tuple[int, int]:
    """(chunk size, number of chunks) for n entries; n is padded up to a multiple of the chunk."""
    chunk = min(CHUNK, max(n, 1))
    return chunk, -(-n // chunk)


def _pad(a: Array, n_to: int) -> Array:
    return jnp.pad(a, [(0, n_to - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _loop(n: int, active: Bool[Array, ""], body, init):
    """`body(start, chunk, acc)` for start = 0, chunk, 2 chunk, ... < n (none if not `active`)."""
    chunk, n_chunks = _padded(n)

    def step(carry):
        i, acc = carry
        return i + 1, body(i * chunk, chunk, acc)

    stop = jnp.where(active, n_chunks, 0)
    return jax.lax.while_loop(lambda carry: carry[0] < stop, step, (jnp.int32(0), init))[1]


def run_if(active: Bool[Array, ""], fn, default):
    """`fn()` if `active`, else `default` (same structure), without paying for `fn` when not active.

    A `lax.cond` under `vmap` computes both branches; a while loop of at most one iteration
    computes `fn` only when some SAE of the vmapped chunk needs it. Not differentiable.
    """
    body = lambda carry: (jnp.zeros_like(carry[0]), fn())  # noqa: E731
    return jax.lax.while_loop(lambda carry: carry[0], body, (active, default))[1]


def _slices(start, chunk, *arrays):
    return [jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in arrays]


def _scatter_rows(v_N, src_RD, row_N, col_N, n_out: int, active) -> Float[Array, "n_out D"]:
    """`out[col_n] += v_n * src[row_n]` summed over the entries (a [n_out, D] result)."""
    chunk, n_chunks = _padded(v_N.shape[0])
    v_N, row_N, col_N = (_pad(a, chunk * n_chunks) for a in (v_N, row_N, col_N))  # padding adds 0 * src[0] to row 0

    def body(start, chunk, out):
        v, row, col = _slices(start, chunk, v_N, row_N, col_N)
        return out.at[col].add(v[:, None] * src_RD[row])

    return _loop(v_N.shape[0], active, body, jnp.zeros((n_out, src_RD.shape[1]), src_RD.dtype))


def _row_dots(a_RD, b_SD, row_N, col_N, active) -> Float[Array, " N"]:
    """`<a[row_n], b[col_n]>` for every entry."""
    n = row_N.shape[0]
    chunk, n_chunks = _padded(n)
    row_N, col_N = _pad(row_N, chunk * n_chunks), _pad(col_N, chunk * n_chunks)

    def body(start, chunk, out):
        row, col = _slices(start, chunk, row_N, col_N)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.sum(a_RD[row] * b_SD[col], axis=-1), start, 0)

    return _loop(row_N.shape[0], active, body, jnp.zeros(row_N.shape[0], a_RD.dtype))[:n]


# --- decode --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def decode(
    v_N: Float[Array, " N"], row_N: Int[Array, " N"], col_N: Int[Array, " N"], W_dec: Float[Array, "S D"],
    active: Bool[Array, ""], n_rows: int,
) -> Float[Array, "n_rows D"]:  # fmt: skip
    """`out[r] = sum over the entries with row r of v * W_dec[col]`, for r < n_rows.

    Entries with v = 0 contribute nothing (pad unused slots that way). Zero if not `active`.
    """
    chunk, n_chunks = _padded(v_N.shape[0])
    v_N, row_N, col_N = (_pad(a, chunk * n_chunks) for a in (v_N, row_N, col_N))

    def body(start, chunk, out):
        v, row, col = _slices(start, chunk, v_N, row_N, col_N)
        return out.at[row].add(v[:, None] * W_dec[col])

    return _loop(v_N.shape[0], active, body, jnp.zeros((n_rows, W_dec.shape[1]), W_dec.dtype))


def _decode_fwd(v_N, row_N, col_N, W_dec, active, n_rows):
    return decode(v_N, row_N, col_N, W_dec, active, n_rows), (v_N, row_N, col_N, W_dec, active)


def _decode_bwd(n_rows, res, g_RD):
    v_N, row_N, col_N, W_dec, active = res
    dv = _row_dots(g_RD, W_dec, row_N, col_N, active)
    dW = _scatter_rows(v_N, g_RD, row_N, col_N, W_dec.shape[0], active)
    return dv, None, None, dW, None


decode.defvjp(_decode_fwd, _decode_bwd)


# --- take ----------------------------------------------------------------------------------------


@jax.custom_vjp
def take(
    h_BS: Float[Array, "B S"], x_BD: Float[Array, "B D"], b_dec: Float[Array, " D"], W_enc: Float[Array, "D S"],
    b_enc: Float[Array, " S"], row_N: Int[Array, " N"], col_N: Int[Array, " N"], active: Bool[Array, ""],
) -> Float[Array, " N"]:  # fmt: skip
    """`h[row, col]` for every entry, where `h = (x - b_dec) @ W_enc + b_enc` was computed densely.

    Differentiable in b_dec, W_enc and b_enc as that formula is, at the cost of the N entries:
    `h` and `x` are taken as data (no gradient). Zero gradients if not `active`.
    """
    return h_BS[row_N, col_N]


def _take_fwd(h_BS, x_BD, b_dec, W_enc, b_enc, row_N, col_N, active):
    return take(h_BS, x_BD, b_dec, W_enc, b_enc, row_N, col_N, active), (x_BD, b_dec, W_enc, row_N, col_N, active)


def _take_bwd(res, g_N):
    x_BD, b_dec, W_enc, row_N, col_N, active = res
    d_sae = W_enc.shape[1]
    dW_enc = _scatter_rows(g_N, x_BD - b_dec, row_N, col_N, d_sae, active).T
    db_enc = jnp.zeros(d_sae, g_N.dtype).at[col_N].add(g_N)
    # d/d b_dec of sum_n g_n h[row_n, col_n] = -sum_n g_n W_enc[:, col_n] = -W_enc @ db_enc.
    db_dec = -jnp.matmul(W_enc, db_enc, precision=jax.lax.Precision.HIGHEST)
    return None, None, db_dec, dW_enc, db_enc, None, None, None


take.defvjp(_take_fwd, _take_bwd)


# --- selection -----------------------------------------------------------------------------------


def flat(cols_BK: Int[Array, "B K"]) -> tuple[Int[Array, " N"], Int[Array, " N"]]:
    """Row and column of every entry of a `[B, K]` selection, flattened row-major."""
    B, K = cols_BK.shape
    return jnp.repeat(jnp.arange(B, dtype=jnp.int32), K), cols_BK.reshape(-1).astype(jnp.int32)


def fired(v_N: Float[Array, " N"], col_N: Int[Array, " N"], d_sae: int) -> Bool[Array, " S"]:
    """Which latents have a positive entry."""
    return jnp.zeros(d_sae, jnp.int32).at[col_N].max((v_N > 0).astype(jnp.int32)) > 0


def to_dense(v_N, row_N, col_N, shape: tuple[int, int]) -> Float[Array, "B S"]:
    """The entries as a dense `[B, S]` array (entries with equal (row, col) add up; v = 0 adds nothing)."""
    return jnp.zeros(shape, v_N.dtype).at[row_N, col_N].add(v_N)


SPARSE_MAX_FRACTION = 1 / 8
"""The sparse step is used while k_max <= d_sae * SPARSE_MAX_FRACTION (measured on CPU, see
benchmarks/results/kinds-speed-cpu.md); closer to d_sae the dense products are faster."""


def use_sparse(d_sae: int, k_max: int) -> bool:
    """Whether a stack of this width and static selection size trains sparsely."""
    return k_max <= d_sae * SPARSE_MAX_FRACTION
