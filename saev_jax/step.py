"""The train step: one optimizer step of every SAE of a group, on one shared batch.

A group's SAEs live in stacks, one per SAE shape: every leaf of a `Stack` has a leading
axis of its SAEs. `train_step` preprocesses the batch once and updates every stack; inside
a stack the SAEs run in chunks of `c` (`jax.lax.map(..., batch_size=c)`), so only `c` SAEs'
`[batch, d_sae]` activations are alive at once while the whole state stays resident. The
stack axis is split over a device mesh axis `'sae'` with `jax.shard_map`: each device
updates its own SAEs on the replicated batch, and the compiled step has no collectives.

An SAE whose loss or updated parameters are not finite, or whose loss blew up while staying
finite (more than `BLOWUP` times its first step's loss), keeps its last parameters and
optimizer state from then on (`Stack.diverged_at` records the step); no other SAE notices,
and the host learns of it at the next log step, not by a round trip per step.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from . import config, data, kinds, optim

SAE_AXIS = "sae"
BLOWUP = 1e4
"""An SAE whose loss exceeds this many times its first step's loss has diverged (frozen as a non-finite one):
every kind's loss is a reconstruction error plus a penalty, which training only lowers from its start."""
"""The mesh axis the stack axis of every `Stack` is split over."""


class Hparams(eqx.Module):
    """What may differ between the SAEs of a stack: one entry per SAE.

    `kind` holds the SAE kind's own settings (`kinds.make_hparams`: the ReLU's sparsity
    coefficient, TopK's k, ...); everything else here is the optimiser's.
    """

    learning_rate: optim.LRSchedule
    """Each SAE's learning rate as a function of the step."""
    normalize_w_dec: Bool[Array, " M"]
    remove_parallel_grads: Bool[Array, " M"]
    max_grad_norm: Float[Array, " M"]
    """Gradient clipping norm; 0: none."""
    kind: eqx.Module

    @classmethod
    def from_cfgs(cls, cfgs: list[config.Train]) -> "Hparams":
        return cls(
            learning_rate=optim.LRSchedule.from_cfgs(cfgs),
            normalize_w_dec=jnp.array([c.sae.normalize_w_dec for c in cfgs]),
            remove_parallel_grads=jnp.array([c.sae.remove_parallel_grads for c in cfgs]),
            max_grad_norm=jnp.array([c.max_grad_norm for c in cfgs], dtype=jnp.float32),
            kind=kinds.make_hparams(cfgs),
        )


class Stack(eqx.Module):
    """SAEs of one kind and shape and everything of theirs that changes in training; leading axis M."""

    saes: kinds.Kind
    opt_state: optax.OptState
    diverged_at: Int[Array, " M"]
    """The step at which each SAE's update first was not finite or its loss blew up (it is frozen since); -1 if never."""
    kind_state: eqx.Module
    """The kind's non-trainable state (dead-latent counters, BatchTopK's threshold; empty for ReLU)."""
    first_loss: Float[Array, " M"]
    """Each SAE's loss at its first step (NaN before it): what `BLOWUP` compares against."""

    @property
    def n_saes(self) -> int:
        return self.diverged_at.shape[0]


class GroupState(eqx.Module):
    """Everything that changes while a group trains.

    There is no PRNG key: nothing in the step is random. The only randomness after
    initialisation is the data order, a function of the group's seed and `step`.
    """

    stacks: tuple[Stack, ...]
    step: Int[Array, ""]


def make_stack(saes: kinds.Kind, hparams: Hparams) -> Stack:
    """A fresh stack: each SAE's optimizer state initialised from its own parameters, its kind's state at step 0."""

    def init_one(sae, hp):
        return optim.make_optimizer(hp.learning_rate, hp.remove_parallel_grads, hp.max_grad_norm).init(sae)

    opt_state = eqx.filter_vmap(init_one)(saes, hparams)
    n = hparams.max_grad_norm.shape[0]
    return Stack(
        saes=saes, opt_state=opt_state, diverged_at=jnp.full(n, -1, jnp.int32), kind_state=kinds.init_kind_state(saes),
        first_loss=jnp.full(n, jnp.nan, jnp.float32),
    )  # fmt: skip


def make_group_state(stacks: tuple[Stack, ...]) -> GroupState:
    """Step 0 of a group."""
    return GroupState(stacks=tuple(stacks), step=jnp.zeros((), jnp.int32))


def group_state_sharding(state: GroupState, mesh: Mesh) -> GroupState:
    """Where each leaf of a GroupState lives: every stack split over `'sae'`, the step count everywhere."""
    stacked = NamedSharding(mesh, PartitionSpec(SAE_AXIS))
    return GroupState(stacks=jax.tree.map(lambda _: stacked, state.stacks), step=NamedSharding(mesh, PartitionSpec()))


def init_single(saes: kinds.Kind, hparams: Hparams, mesh: Mesh) -> tuple[GroupState, tuple[Hparams]]:
    """A one-stack state and its hyper-parameters placed on `mesh` (for tests, benchmarks and tools).

    Then `train_step(state, hparams, preprocess, x_BD, chunks=(M,), mesh=mesh)`.
    """
    state = make_group_state((make_stack(saes, hparams),))
    state = jax.device_put(state, group_state_sharding(state, mesh))
    return state, (jax.device_put(hparams, NamedSharding(mesh, PartitionSpec(SAE_AXIS))),)


def _all_finite(tree) -> Bool[Array, ""]:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def _step_one(stack: Stack, hp: Hparams, x_BD: Float[Array, "B d_vit"], step: Int[Array, ""], dense: bool = False):
    """One SAE's update (SPEC 3 steps 1-4, the loss being its kind's), dropped if anything came out non-finite.

    `stack` and `hp` are this SAE's own (no leading axis); returns its new Stack entry and metrics.
    `dense`: with the kind's `dense_loss` (the exact form a sparse loss falls back to) instead of `loss`.
    """
    sae = stack.saes
    W_dec = jnp.where(hp.normalize_w_dec, sae.normalize_w_dec().W_dec, sae.W_dec)
    normed = eqx.tree_at(lambda s: s.W_dec, sae, W_dec)
    loss_fn = lambda s: (s.dense_loss if dense else s.loss)(stack.kind_state, x_BD, hp.kind, step)  # noqa: E731
    (loss, (metrics, kind_state)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(normed)
    optimizer = optim.make_optimizer(hp.learning_rate, hp.remove_parallel_grads, hp.max_grad_norm)
    updates, opt_state = optimizer.update(grads, stack.opt_state, normed)
    updated = eqx.apply_updates(normed, updates)

    # A diverged SAE keeps the parameters it had before its first non-finite or blown-up step, for good.
    first_loss = jnp.where(jnp.isnan(stack.first_loss), loss, stack.first_loss)
    blown = loss > BLOWUP * jnp.abs(first_loss)
    ok = jnp.isfinite(loss) & ~blown & _all_finite(updated) & _all_finite(opt_state) & _all_finite(kind_state)
    alive = stack.diverged_at < 0
    keep = ok & alive
    new = Stack(
        saes=updated, opt_state=opt_state, diverged_at=stack.diverged_at, kind_state=kind_state, first_loss=first_loss
    )
    new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, stack)
    new = eqx.tree_at(lambda s: s.diverged_at, new, jnp.where(alive & ~ok, step, stack.diverged_at))
    metrics |= {"learning_rate": hp.learning_rate(step), "diverged": ~(ok & alive)}
    return new, metrics


OVERFLOW = "select_overflow"
"""The metric by which a kind's sparse loss says it was not exact for an SAE (`kinds.select.pick_batch`)."""


def _chunk_step(args: tuple[Stack, Hparams], x_BD, step):
    """The SAEs of one chunk (vmapped); redone densely, all of them, if any one's sparse loss overflowed.

    The condition is one flag for the whole chunk, outside the vmap, so the dense redo is a real
    branch that runs only when needed (a per-SAE `lax.cond` under vmap computes both branches).
    """
    new, metrics = jax.vmap(lambda a: _step_one(*a, x_BD, step))(args)
    if OVERFLOW not in metrics:
        return new, metrics

    def dense():
        new_d, metrics_d = jax.vmap(lambda a: _step_one(*a, x_BD, step, dense=True))(args)
        return new_d, metrics_d | {OVERFLOW: metrics[OVERFLOW]}  # still reported: this step fell back

    return jax.lax.cond(jnp.any(metrics[OVERFLOW] > 0), dense, lambda: (new, metrics))


def _stack_step(stack: Stack, hp: Hparams, x_BD, step, *, chunk: int):
    """Every SAE of a (device-local) stack, `chunk` at a time; one compiled program whatever M is."""
    one_chunk = lambda args: _chunk_step(args, x_BD, step)  # noqa: E731
    n = stack.n_saes
    if chunk >= n:
        return one_chunk((stack, hp))
    # As `lax.map(..., batch_size=chunk)`, but with the chunk's function (and its one cond) outside the vmap.
    n_full = n - n % chunk
    head = jax.tree.map(lambda a: a[:n_full].reshape(n_full // chunk, chunk, *a.shape[1:]), (stack, hp))
    out = jax.tree.map(lambda a: a.reshape(n_full, *a.shape[2:]), jax.lax.map(one_chunk, head))
    if n_full == n:
        return out
    tail = one_chunk(jax.tree.map(lambda a: a[n_full:], (stack, hp)))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("chunks", "mesh"))
def train_step(
    state: GroupState,
    hparams: tuple[Hparams, ...],
    preprocess: data.Preprocess,
    x_BD: Float[Array, "B d_vit"],
    *,
    chunks: tuple[int, ...],
    mesh: Mesh,
) -> tuple[GroupState, tuple[dict[str, Float[Array, " M"]], ...]]:
    """One optimizer step of every SAE of every stack on the same raw batch.

    `chunks[i]` is how many SAEs of stack i each device runs at once; `mesh` has an axis
    `'sae'` that divides every stack's length (pad the stacks to a multiple of it). Returns
    the new state and, per stack, a dict of `[M]` metrics measured before the update.
    """
    x_BD = preprocess(x_BD)
    sae_spec, replicated = PartitionSpec(SAE_AXIS), PartitionSpec()
    new_stacks, metrics = [], []
    for stack, hp, chunk in zip(state.stacks, hparams, chunks, strict=True):
        stack_step = jax.shard_map(
            functools.partial(_stack_step, chunk=chunk),
            mesh=mesh,
            in_specs=(sae_spec, sae_spec, replicated, replicated),
            out_specs=(sae_spec, sae_spec),
        )
        new, m = stack_step(stack, hp, x_BD, state.step)
        new_stacks.append(new)
        metrics.append(m)
    return GroupState(stacks=tuple(new_stacks), step=state.step + 1), tuple(metrics)
