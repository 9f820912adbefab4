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

import equinox as eqx
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


def _zero(dtype, *refs: Array) -> Array:
    """0 of `dtype` that depends on `refs`: inside `shard_map` it varies over the mesh axes they vary
    over, as a loop carry must when the loop body's results do."""
    return sum((jnp.sum(r.reshape(-1)[:0]).astype(dtype) for r in refs), jnp.zeros((), dtype))


def _loop(n: int, active: Bool[Array, ""], body, init, *refs: Array):
    """`body(start, chunk, acc)` for start = 0, chunk, 2 chunk, ... < n (none if not `active`).

    `refs`: the arrays the body reads (see `_zero`).
    """
    chunk, n_chunks = _padded(n)
    init = init + _zero(init.dtype, active, *refs)

    def step(carry):
        i, acc = carry
        return i + 1, body(i * chunk, chunk, acc)

    stop = jnp.where(active, n_chunks, 0)
    return jax.lax.while_loop(lambda carry: carry[0] < stop, step, (jnp.int32(0), init))[1]


def run_if(active: Bool[Array, ""], fn, default):
    """`fn()` if `active`, else `default` (same structure), without paying for `fn` when not active.

    A `lax.cond`, and under `vmap` still one: its predicate becomes "any SAE of the vmapped chunk
    is active" (a `lax.cond` whose predicate is batched would compute both branches), and the
    inactive ones get `default`. (A while loop of at most one iteration did this before, but XLA
    hoisted the loop-invariant `fn` out of it and so computed it always.) Not differentiable:
    `fn` may close over arrays only as data (stop their gradients).
    """
    out = jax.eval_shape(fn)
    # Inside shard_map both must vary over `active`'s mesh axes (see `_zero`).
    vary = lambda tree: jax.tree.map(lambda d, o: jnp.asarray(d, o.dtype) + _zero(o.dtype, active), tree, out)  # noqa: E731
    default = vary(default)
    # Whatever `fn` reads (batched or not) becomes an explicit argument, as custom_vmap needs.
    closed = jax.make_jaxpr(lambda: vary(fn()))()
    consts = list(closed.consts)
    body = lambda *c: jax.tree.unflatten(jax.tree.structure(out), jax.core.eval_jaxpr(closed.jaxpr, c))  # noqa: E731

    @jax.custom_batching.custom_vmap
    def cond(active, default, consts):
        return jax.lax.cond(active, lambda: body(*consts), lambda: default)

    @cond.def_vmap
    def rule(axis_size, in_batched, active, default, consts):
        active_b, default_b, consts_b = in_batched
        bcast = lambda tree, batched: jax.tree.map(  # noqa: E731
            lambda a, b: a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a))), tree, batched
        )
        active, default = bcast(active, active_b), bcast(default, default_b)
        axes = jax.tree.map(lambda b: 0 if b else None, consts_b)

        def run():
            got = jax.vmap(lambda c: body(*c), in_axes=(axes,))(consts)
            pick = lambda g, d: jnp.where(active.reshape(-1, *[1] * (g.ndim - 1)), g, d)  # noqa: E731
            return jax.tree.map(pick, got, default)

        out = jax.lax.cond(jnp.any(active), run, lambda: default)
        return out, jax.tree.map(lambda _: True, out)

    return cond(active, default, consts)


def one_at_a_time(fn):
    """`fn(*arrays)` that, under `vmap`, runs one batch entry after another (`lax.map`).

    JAX would batch the scatters and gathers inside `fn` into ones with an extra index
    dimension, which XLA's CPU backend runs slower (a TopK step of one SAE at d_vit 1024,
    d_sae 16384, batch 4096 measured 3.8 s that way against 2.6 s with this). The SAEs of a chunk are independent, so running them in turn
    loses nothing but the overlap of small kernels.
    """
    f = jax.custom_batching.custom_vmap(fn)

    def rule(axis_size, in_batched, *args):
        batched = [a for a, b in zip(args, in_batched) if b]

        def one(xs):
            it = iter(xs)
            return f(*[next(it) if b else a for a, b in zip(args, in_batched)])

        out = jax.lax.map(one, batched)
        return out, jax.tree.map(lambda _: True, out)

    f.def_vmap(rule)
    return f


def _slices(start, chunk, *arrays):
    return [jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in arrays]


def _scatter_rows(v_N, src_RD, row_N, col_N, n_out: int, active) -> Float[Array, "n_out D"]:
    """`out[col_n] += v_n * src[row_n]` summed over the entries (a [n_out, D] result)."""
    return one_at_a_time(functools.partial(_scatter_rows_one, n_out=n_out))(v_N, src_RD, row_N, col_N, active)


def _scatter_rows_one(v_N, src_RD, row_N, col_N, active, *, n_out: int):
    chunk, n_chunks = _padded(v_N.shape[0])
    v_N, row_N, col_N = (_pad(a, chunk * n_chunks) for a in (v_N, row_N, col_N))  # padding adds 0 * src[0] to row 0

    def body(start, chunk, out):
        v, row, col = _slices(start, chunk, v_N, row_N, col_N)
        return out.at[col].add(v[:, None] * src_RD[row])

    return _loop(
        v_N.shape[0], active, body, jnp.zeros((n_out, src_RD.shape[1]), src_RD.dtype), v_N, src_RD, row_N, col_N
    )


def _row_dots(a_RD, b_SD, row_N, col_N, active) -> Float[Array, " N"]:
    """`<a[row_n], b[col_n]>` for every entry."""
    return one_at_a_time(_row_dots_one)(a_RD, b_SD, row_N, col_N, active)


def _row_dots_one(a_RD, b_SD, row_N, col_N, active):
    n = row_N.shape[0]
    chunk, n_chunks = _padded(n)
    row_N, col_N = _pad(row_N, chunk * n_chunks), _pad(col_N, chunk * n_chunks)

    def body(start, chunk, out):
        row, col = _slices(start, chunk, row_N, col_N)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.sum(a_RD[row] * b_SD[col], axis=-1), start, 0)

    return _loop(row_N.shape[0], active, body, jnp.zeros(row_N.shape[0], a_RD.dtype), a_RD, b_SD, row_N, col_N)[:n]


# --- decode --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def decode(
    v_N: Float[Array, " N"], row_N: Int[Array, " N"], col_N: Int[Array, " N"], W_dec: Float[Array, "S D"],
    active: Bool[Array, ""], n_rows: int,
) -> Float[Array, "n_rows D"]:  # fmt: skip
    """`out[r] = sum over the entries with row r of v * W_dec[col]`, for r < n_rows.

    Entries with v = 0 contribute nothing (pad unused slots that way). Zero if not `active`.
    """
    return one_at_a_time(functools.partial(_decode_one, n_rows=n_rows))(v_N, row_N, col_N, W_dec, active)


def _decode_one(v_N, row_N, col_N, W_dec, active, *, n_rows: int):
    chunk, n_chunks = _padded(v_N.shape[0])
    v_N, row_N, col_N = (_pad(a, chunk * n_chunks) for a in (v_N, row_N, col_N))

    def body(start, chunk, out):
        v, row, col = _slices(start, chunk, v_N, row_N, col_N)
        return out.at[row].add(v[:, None] * W_dec[col])

    return _loop(v_N.shape[0], active, body, jnp.zeros((n_rows, W_dec.shape[1]), W_dec.dtype), v_N, row_N, col_N, W_dec)


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
    return one_at_a_time(lambda h, r, c: h[r, c])(h_BS, row_N, col_N)


def _take_fwd(h_BS, x_BD, b_dec, W_enc, b_enc, row_N, col_N, active):
    return take(h_BS, x_BD, b_dec, W_enc, b_enc, row_N, col_N, active), (x_BD, b_dec, W_enc, row_N, col_N, active)


def _take_bwd(res, g_N):
    x_BD, b_dec, W_enc, row_N, col_N, active = res
    d_sae = W_enc.shape[1]
    dW_enc = _scatter_rows(g_N, x_BD - b_dec, row_N, col_N, d_sae, active).T
    db_enc = one_at_a_time(lambda g, c: jnp.zeros(d_sae, g.dtype).at[c].add(g))(g_N, col_N)
    # d/d b_dec of sum_n g_n h[row_n, col_n] = -sum_n g_n W_enc[:, col_n] = -W_enc @ db_enc.
    db_dec = -jnp.matmul(W_enc, db_enc, precision=jax.lax.Precision.HIGHEST)
    return None, None, db_dec, dW_enc, db_enc, None, None, None


take.defvjp(_take_fwd, _take_bwd)


# --- selection -----------------------------------------------------------------------------------


def flat(cols_BK: Int[Array, "B K"]) -> tuple[Int[Array, " N"], Int[Array, " N"]]:
    """Row and column of every entry of a `[B, K]` selection, flattened row-major."""
    B, K = cols_BK.shape
    return jnp.repeat(jnp.arange(B, dtype=jnp.int32), K), cols_BK.reshape(-1).astype(jnp.int32)


def compact(
    keep_BK: Bool[Array, "B K"], cols_BK: Int[Array, "B K"], n: int
) -> tuple[Bool[Array, " n"], Int[Array, " n"], Int[Array, " n"], Bool[Array, ""]]:
    """The kept slots of a `[B, K]` selection as n entries `(keep, row, col)` (unused ones not kept),
    and whether more than n were kept (then some are missing)."""
    row_N, col_N = flat(cols_BK)
    keep_N = keep_BK.reshape(-1)
    if n >= keep_N.shape[0]:
        return keep_N, row_N, col_N, jnp.bool_(False)
    (idx_n,) = jnp.nonzero(keep_N, size=n, fill_value=0)
    count = jnp.sum(keep_N, dtype=jnp.int32)
    return keep_N[idx_n] & (jnp.arange(n) < count), row_N[idx_n], col_N[idx_n], count > n


def fired(v_N: Float[Array, " N"], col_N: Int[Array, " N"], d_sae: int) -> Bool[Array, " S"]:
    """Which latents have a positive entry."""
    positive_N = (jax.lax.stop_gradient(v_N) > 0).astype(jnp.int32)  # custom_vmap takes no differentiable input
    return one_at_a_time(lambda p, c: jnp.zeros(d_sae, jnp.int32).at[c].max(p))(positive_N, col_N) > 0


def to_dense(v_N, row_N, col_N, shape: tuple[int, int]) -> Float[Array, "B S"]:
    """The entries as a dense `[B, S]` array (entries with equal (row, col) add up; v = 0 adds nothing)."""
    return jnp.zeros(shape, v_N.dtype).at[row_N, col_N].add(v_N)


SPARSE_MAX_FRACTION = 1 / 64
"""The sparse step is used while k_max <= d_sae / 64. Measured on the 2-core CPU at B 4096, d_vit
1024, d_sae 16384: the sparse passes cost about 46 ms per unit of k (decode 6, its two gradients
12 + 14, the encoder's gradient 14), the four dense products they replace about 10 s, so they
break even near k = 220 = d_sae / 75; both scale with B * d_vit, so the rule is a fraction of
d_sae. (At k = 32 the whole step measured 0.35x ReLU's, benchmarks/results/kinds-speed-cpu.md.)
On a GPU the dense products gain more from the hardware than the gathers and scatters, so the
crossover is likely lower there: kinds_speed's `--dense` rows in benchmarks/gpu.sh measure it."""


def use_sparse(d_sae: int, k_max: int) -> bool:
    """Whether a stack of this width and static selection size trains sparsely."""
    return k_max <= d_sae * SPARSE_MAX_FRACTION


# --- inference: a batch's code for evaluation ------------------------------------------------------


class Code(eqx.Module):
    """A batch's activations in the inference form: K slots per example (value 0 = unused), and the
    activations beyond them as a dense remainder, computed only when some example has any.

    TopK's examples never have more than k; BatchTopK's and Matryoshka's thresholded examples
    rarely have more than their candidates (`overflow` then, and `rest_BS` is not all zero).
    """

    values_BK: Float[Array, "B K"]
    cols_BK: Int[Array, "B K"]
    overflow: Bool[Array, ""]
    rest_BS: Float[Array, "B S"] | None
    """Zero at the slots' latents; None for a kind that cannot overflow."""
    n_train_fired: Int[Array, ""]
    """How many activations of the training form are positive on this batch (BatchTopK's k * B at most)."""
    d_sae: int = eqx.field(static=True)

    def dense(self) -> Float[Array, "B S"]:
        """The activations as a dense `[B, d_sae]` array."""
        B = self.cols_BK.shape[0]
        base_BS = jnp.zeros((B, self.d_sae), self.values_BK.dtype) if self.rest_BS is None else self.rest_BS
        add = lambda base, v, c: base.at[jnp.arange(B)[:, None], c].add(v)  # noqa: E731
        return one_at_a_time(add)(base_BS, self.values_BK, self.cols_BK)

    def decode(self, W_dec: Float[Array, "S D"]) -> Float[Array, "B D"]:
        """`dense() @ W_dec` (no b_dec) from the slots; the remainder's dense product only on overflow."""
        row_N, col_N = flat(self.cols_BK)
        B = self.cols_BK.shape[0]
        x_hat_BD = decode(self.values_BK.reshape(-1), row_N, col_N, W_dec, jnp.bool_(True), B)
        if self.rest_BS is None:
            return x_hat_BD
        rest_product = lambda: jnp.matmul(self.rest_BS, W_dec, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
        return x_hat_BD + run_if(self.overflow, rest_product, jnp.zeros_like(x_hat_BD))

    def products(
        self, rows_b: Int[Array, " b"], a_TbS: Float[Array, "T b S"], W_dec: Float[Array, "S D"]
    ) -> Float[Array, "T b D"]:
        """`a_t @ W_dec` for arrays `a_TbS` that are zero wherever `dense()[rows_b]` is (e.g. pruned copies of it)."""
        cols_bK = self.cols_BK[rows_b]
        a_TbK = jnp.take_along_axis(a_TbS, jnp.broadcast_to(cols_bK, (a_TbS.shape[0], *cols_bK.shape)), axis=2)
        out_TbD = jnp.einsum("tbk,bkd->tbd", a_TbK, W_dec[cols_bK], precision=jax.lax.Precision.HIGHEST)
        if self.rest_BS is None:
            return out_TbD

        def rest_product():
            b = rows_b.shape[0]
            outside_bS = jnp.ones(a_TbS.shape[1:], a_TbS.dtype).at[jnp.arange(b)[:, None], cols_bK].set(0)
            return jnp.matmul(a_TbS * outside_bS, W_dec, precision=jax.lax.Precision.HIGHEST)

        return out_TbD + run_if(self.overflow, rest_product, jnp.zeros_like(out_TbD))
