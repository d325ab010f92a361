"""Pipeline parallelism: a layer stack split by depth over the mesh's `stage` axis, run as a
GPipe schedule of micro-batches, or a circular one.

A [`eqzoo.nn.Stacked`][] applied under an eqzoo mesh with `stage > 1` (inside
[`eqzoo.sharding.activation_sharding`][]) views its stacked arrays `(layers, ...)` as
`(stage, layers / stage, ...)`, split over `stage`: stage `s` holds layers
`s * layers / stage ...`. The batch is cut into `M` micro-batches and a buffer of one
micro-batch's activations per stage, `(stage, micro, ...)` split over `stage`, runs
`M + stage - 1` steps: at step `t` stage 0 takes micro-batch `t`, every stage runs its own
layers on its slot (a `vmap` over the stage axis of a `scan` over its layers), and the buffer
moves one stage on (`jnp.roll` over the stage axis, which XLA lowers to a collective-permute),
the last stage's output being micro-batch `t - (stage - 1)`. Reverse-mode differentiation
runs the same schedule backwards (the transpose of the roll is the roll the other way).

The roll is the only communication inside the schedule's loop, forward and backward. Stage 0's
micro-batches come from a buffer split over `stage` like the slots, and the last stage's
outputs are read out after the loop, so neither they nor their cotangents cross stages step by
step. Each `data` shard of a micro-batch runs on its own copy of the stage's weights
(replicated over `data` anyway), so a step's weight gradients stay partial sums over that
shard's examples, added up across the steps and reduced over `data` once, after the loop; with
weights shared by the shards XLA reduced them in every step. Over `fsdp` they are still
reduced at each step (as the weights are gathered): a copy per `fsdp` shard would hold the
whole stage's weights and gradient sums, the memory FSDP is there to save. Layers with ops
that must see the whole batch in one `vmap` (MoE layers under expert parallelism or
`"ragged"`) share their weights over `data` too.

The models are written for one example and `jax.vmap`ped over the batch, so the schedule needs
the batch: the pipelined stack is a `jax.custom_batching.custom_vmap` whose batching rule (which
sees the whole batch) runs the schedule. Its rule is only reached when the `vmap` is the
innermost transformation of the stack's inputs (`jax.grad` of a vmapped loss, as training takes
it); elsewhere (one example, `vmap` of `grad`, a surrounding `jax.checkpoint`) the stack runs
as a plain scan, which XLA partitions by gathering each stage's layers: the same values, no
pipelining.

Every slot always holds a real micro-batch (the buffer starts as copies of micro-batch 0 and
stage 0 keeps taking the last one once all have entered), so the bubble's discarded work runs
on real activations and cannot produce NaNs whose zero cotangents would still poison a gradient.

With `pipeline_repeats=R > 1` (the circular, or interleaved, schedule) each stage holds `R`
chunks of `layers / (stage * R)` layers, chunk `r` of stage `s` being layers
`(r * stage + s) * layers / (stage * R) ...`, and a micro-batch goes round the stages `R`
times: `M * R + stage - 1` steps, each running one chunk (`1 / R` of a stage's layers), at
step `t` stage `s` running micro-batch `(t - s) % M` through its chunk `(t - s) // M`. The
stack stays stored as GPipe's (contiguous blocks over `stage`, the natural layer order, which
checkpoints and other meshes read); the schedule views it as `(stage, R, layers / (stage * R),
...)` split over `stage`, which XLA moves into place by an all-to-all (or collective-permutes)
over `stage` before the loop, and the gradients back after it. A micro-batch leaving the last
stage before its last repeat waits for stage 0 in a circular buffer of `M` micro-batch slots per
stage, split over `stage` (stage 0's row is the one read: it starts as the micro-batches
themselves), so it needs `M >= stage`; reading and writing a slot stays on each device, and the
roll is still the only communication inside the loop. Slots hold real micro-batches throughout
(a last repeat's output is kept in a second buffer, not put back for stage 0).
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.sharding import NamedSharding, PartitionSpec as P

from ..sharding._errors import ShardingError
from ._jaxpr import holds_primitive


def pipeline_stages() -> int:
    """The size of the active eqzoo mesh's `stage` axis (1 without a mesh, or inside a
    `shard_map`), read at trace time."""
    from ..sharding._activation import active_mesh  # eqzoo.sharding imports eqzoo.nn
    from ..sharding._mesh import stage_size

    if jax.sharding.get_abstract_mesh().manual_axes:
        return 1
    return stage_size(active_mesh())


def default_microbatches(batch: int, stages: int, batch_ways: int = 1) -> int:
    """The number of micro-batches used when none is set: the largest `m <= 2 * stages` that
    divides `batch` into micro-batches the batch axes (`batch_ways` devices) still split evenly,
    else the largest `m <= 2 * stages` dividing `batch`."""
    fits = [m for m in range(1, 2 * stages + 1) if batch % m == 0]
    even = [m for m in fits if (batch // m) % batch_ways == 0]
    return max(even or fits)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The fraction of a pipeline schedule's steps each stage spends idle (computing a
    discarded slot): `(stages - 1) / (microbatches * repeats + stages - 1)`. With `repeats=1`
    GPipe's schedule, `microbatches + stages - 1` steps of a stage's whole share of the layers;
    with more, the circular schedule, `microbatches * repeats + stages - 1` steps of
    `1 / repeats` of that work each."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def _under_vmap(leaves: list) -> bool:
    # The custom_vmap's rule runs only when the innermost transformation of the inputs is a
    # vmap: then JAX hands the bind to the vmap's trace first, and the rule's ordinary
    # operations are differentiated by any enclosing grad. Under an inner JVP (vmap of grad,
    # or no vmap at all) JAX would need a transpose rule custom_vmap does not have.
    try:
        from jax._src.interpreters.batching import BatchTrace  # no public name for it
        from jax.extend.core import find_top_trace
    except ImportError as error:  # a JAX release that moved them: say so rather than fail obscurely
        raise ShardingError(
            "pipeline parallelism (a mesh with stage > 1) tells whether the layer stack runs under "
            "the batch's vmap from jax._src.interpreters.batching.BatchTrace and "
            f"jax.extend.core.find_top_trace, which this JAX release ({jax.__version__}) lacks ({error}). "
            "Use a mesh with stage=1, or the JAX version in eqzoo's constraints.txt."
        ) from error

    return isinstance(find_top_trace(leaves), BatchTrace)


def pipelined_apply(
    body: Callable, arrays: Any, carry: Any, xs: Any, num_layers: int, *, scan: bool
) -> tuple[Any, Any] | None:
    """`lax.scan(body, carry, (arrays, xs))` run as a pipeline over the active mesh's `stage`
    axis, or `None` where it cannot be (no `stage` axis, not under an innermost `vmap`): the
    caller then runs its plain scan.

    **Raises:** [`eqzoo.sharding.ShardingError`][] when `stage` does not divide `num_layers`.
    """
    from ..sharding._activation import active_pipeline_repeats

    stages = pipeline_stages()
    if stages == 1:
        return None
    if num_layers % stages:
        raise ShardingError(
            f"pipeline parallelism: the mesh's stage={stages} does not divide the stack's "
            f"{num_layers} layers (each stage holds an equal share of them). Use a stage size "
            f"that divides {num_layers}, or a depth divisible by {stages}."
        )
    repeats = active_pipeline_repeats()
    if num_layers % (stages * repeats):
        fits = [r for r in range(1, num_layers // stages + 1) if num_layers % (stages * r) == 0]
        raise ShardingError(
            f"pipeline parallelism: stage={stages} x pipeline_repeats={repeats} = {stages * repeats} "
            f"chunks do not divide the stack's {num_layers} layers (the circular schedule gives "
            f"each stage {repeats} chunks of equal depth). Use pipeline_repeats in {fits}, or a "
            f"depth divisible by {stages * repeats}."
        )
    # Hoist what `body` closes over (per-example positions, masks ...: batched tracers) into
    # explicit arguments: a custom_vmap function may only close over unbatched values.
    one = jax.tree.map(lambda a: a[0], (arrays, xs))
    closed, shapes = jax.make_jaxpr(lambda c, lx: body(c, lx), return_shape=True)(carry, one)
    consts = list(closed.consts)
    if not _under_vmap(jax.tree.leaves((consts, arrays, carry, xs))):
        return None
    _check_ring(stages)
    out_tree = jax.tree.structure(shapes)

    def step(consts, c, lx):
        flat = jax.core.eval_jaxpr(closed.jaxpr, consts, *jax.tree.leaves((c, lx)))
        return jax.tree.unflatten(out_tree, flat)

    def plain(consts, arrays, carry, xs):
        return _scan_layers(lambda c, lx: step(consts, c, lx), carry, (arrays, xs), scan)

    op = custom_vmap(plain)

    @op.def_vmap
    def _(axis_size, in_batched, consts, arrays, carry, xs):
        consts_b, arrays_b, carry_b, xs_b = in_batched
        if any(jax.tree.leaves(arrays_b)):  # a vmap over models (an ensemble): no pipeline
            axes = tuple(jax.tree.map(lambda b: 0 if b else None, in_batched))
            out = jax.vmap(plain, in_axes=axes)(consts, arrays, carry, xs)
        else:
            plan = _Plan(stages, repeats, axis_size, step, scan, whole_batch=_sees_whole_batch(closed.jaxpr))
            out = plan.run(consts, consts_b, arrays, carry, carry_b, xs, xs_b)
        return out, jax.tree.map(lambda _: True, out)

    return op(consts, arrays, carry, xs)


def _check_ring(stages: int) -> None:
    from ..sharding._activation import active_context_attention, active_mesh
    from ..sharding._mesh import context_size

    ring = active_context_attention()
    if ring != "gather" and context_size(active_mesh()) > 1:
        raise ShardingError(
            f"pipeline parallelism (stage={stages}) does not run ring attention "
            f"(context_attention={ring!r}): its shard_map cannot run inside the pipeline's "
            "per-stage vmap. Use context_attention='gather' with a stage axis, or a mesh with "
            "stage=1 for ring attention."
        )


_WHOLE_BATCH_OPS = frozenset({"custom_vmap_call", "shard_map"})


def _sees_whole_batch(jaxpr: Any) -> bool:
    """Whether `jaxpr` (or one of its sub-programs) holds an op whose batching rule runs a
    `shard_map` over the whole batch (eqzoo's expert exchange and grouped experts): such an op
    must see the batch as one `vmap` over every batch axis (`batch_vmap`'s)."""
    return holds_primitive(jaxpr, _WHOLE_BATCH_OPS)


def _scan_layers(f, carry, layer_inputs, scan: bool):
    """`lax.scan(f, carry, layer_inputs)`, or the same loop unrolled."""
    if scan:
        return jax.lax.scan(f, carry, layer_inputs)
    n = jax.tree.leaves(layer_inputs)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = f(carry, jax.tree.map(lambda a, i=i: a[i], layer_inputs))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


class _Plan:
    """One pipelined application: the sizes, the mesh layout and the schedule."""

    def __init__(
        self, stages: int, repeats: int, batch: int, step: Callable, scan: bool, *, whole_batch: bool
    ):
        from ..sharding._activation import active_mesh, active_pipeline_microbatches, batch_axes

        self.mesh = active_mesh()
        self.batch_axes = batch_axes(self.mesh)
        ways = math.prod(int(self.mesh.shape[a]) for a in self.batch_axes)
        micro = active_pipeline_microbatches()
        if micro is None:
            micro = default_microbatches(batch, stages, ways)
        elif batch % micro:
            raise ShardingError(
                f"pipeline parallelism: a batch of {batch} cannot be cut into "
                f"pipeline_microbatches={micro} equal micro-batches. Use a number of micro-batches "
                f"that divides {batch} (e.g. {default_microbatches(batch, stages, ways)}), or a batch "
                f"that is a multiple of {micro}."
            )
        if repeats > 1 and micro < stages:
            chosen = "" if active_pipeline_microbatches() is not None else " (the default choice)"
            fits = [m for m in range(stages, batch + 1) if batch % m == 0]
            even = [m for m in fits if (batch // m) % ways == 0]  # micro-batches the batch axes split
            fix = f"pipeline_microbatches={(even or fits)[0]}" if fits else f"a batch of at least {stages}"
            raise ShardingError(
                f"pipeline parallelism: the circular schedule (pipeline_repeats={repeats}) needs at "
                f"least stage={stages} micro-batches (stage 0 runs a repeat's micro-batches back to "
                "back, and the first must have come back round by the time it has run the last); "
                f"got {micro}{chosen} for a batch of {batch}. Use {fix}, or pipeline_repeats=1."
            )
        self.stages, self.micro, self.size, self.step, self.scan = stages, micro, batch // micro, step, scan
        self.repeats = repeats
        # The micro-batch axis is split over the batch axes when they divide it.
        self.spread = self.batch_axes if self.batch_axes and self.size % ways == 0 else None
        # Each `data` shard of a micro-batch runs on its own copy of the stage's weights (see
        # `_copies`), except in layers whose ops must see the whole batch in one vmap, which
        # the copies would split in two (MoE layers under expert parallelism or "ragged").
        self.copy_axes = ("data",) if self.spread and "data" in self.spread and not whole_batch else ()
        self.copies = math.prod(int(self.mesh.shape[a]) for a in self.copy_axes)

    def _constrain(self, x, *lead):
        spec = P(*lead, *(P.UNCONSTRAINED,) * (x.ndim - len(lead)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _micro(self, x):
        # (batch, ...) -> (micro, size, ...), micro-batch m holding examples m, m + micro, ...:
        # a batch split over the batch axes in contiguous blocks stays split along `size`.
        x = x.reshape(self.size, self.micro, *x.shape[1:])
        return self._constrain(jnp.swapaxes(x, 0, 1), None, self.spread)

    def _unmicro(self, x):
        return jnp.swapaxes(x, 0, 1).reshape(self.size * self.micro, *x.shape[2:])

    def _by_stage(self, x):
        # (layers, ...) -> (stage, layers / stage, ...), the stage axis split over `stage`.
        if self.repeats == 1:
            return self._constrain(x.reshape(self.stages, -1, *x.shape[1:]), "stage")
        # Circular: (layers, ...) -> (stage, repeats, layers / (stage * repeats), ...), chunk r
        # of stage s holding layers (r * stage + s) * layers / (stage * repeats) .... The stack is
        # stored split over `stage` in its natural order (contiguous blocks: what checkpoints
        # and other meshes read), so this re-lays it out: XLA lowers it to one all-to-all over
        # `stage` per step (the gradients' transpose to one more), outside the schedule's loop.
        # The stored layout is pinned first: its transpose pins the gradient's, so that XLA
        # moves the gradients back by an all-to-all too (left free, it all-gathered the whole
        # stack's gradients onto every device and sliced them).
        x = self._constrain(x, "stage").reshape(self.repeats, self.stages, -1, *x.shape[1:])
        return self._constrain(jnp.swapaxes(x, 0, 1), "stage")

    def _layer_rows(self, x):
        # A per-example per-layer input (batch, layers, ...) as its stage reads it:
        # (batch, stage, layers / stage, ...), or (batch, repeats, stage, layers / (stage * repeats), ...).
        if self.repeats == 1:
            return x.reshape(x.shape[0], self.stages, -1, *x.shape[2:])
        return x.reshape(x.shape[0], self.repeats, self.stages, -1, *x.shape[2:])

    def _copies(self, x):
        # (stage, layers / stage, ...) -> (stage, data, layers / stage, ...), a copy of the
        # stage's weights per `data` shard, each device holding the one it uses: the weights
        # are replicated over `data` anyway. This broadcast's transpose, after the schedule, is
        # the one sum of the weight gradients over `data`. Not over `fsdp`: its shards would
        # then hold whole copies (and whole gradient sums) where FSDP keeps a slice, so the
        # stage's weights are gathered, and their gradients reduced, at each step.
        x = jnp.broadcast_to(x[:, None], (x.shape[0], self.copies, *x.shape[1:]))
        return self._constrain(x, "stage", self.copy_axes)

    def run(self, consts, consts_b, arrays, carry, carry_b, xs, xs_b):
        n, size = self.micro, self.size
        full = lambda x, b: x if b else jnp.broadcast_to(x, (n * size, *x.shape))  # noqa: E731
        carry = jax.tree.map(full, carry, carry_b)
        xs_leaves, xs_tree = jax.tree.flatten(xs)
        xs_b = jax.tree.leaves(xs_b)
        # What travels with each example: its carry, the closed-over values and per-layer inputs
        # of its own (the latter as (stage, layers / stage, ...), each stage reading its own row).
        own = lambda leaves, flags: [x for x, b in zip(leaves, flags, strict=True) if b]  # noqa: E731
        moving = (
            carry,
            own(consts, consts_b),
            [self._layer_rows(x) for x in own(xs_leaves, xs_b)],
        )
        inputs = jax.tree.map(self._micro, moving)  # (micro, size, ...)
        shared_xs = [None if b else self._by_stage(x) for x, b in zip(xs_leaves, xs_b, strict=True)]
        stage_arrays = jax.tree.map(self._by_stage, arrays)
        # Which of them get a copy per `data` shard: the floating ones (what has a gradient).
        copied = jax.tree.map(lambda x: bool(self.copy_axes) and jnp.issubdtype(x.dtype, jnp.inexact), stage_arrays)
        stage_arrays = jax.tree.map(lambda x, c: self._copies(x) if c else x, stage_arrays, copied)

        def merge(shared, mine):
            it = iter(mine)
            return [next(it) if x is None else x for x in shared]

        def run_stage(s, layers, stage_xs, slot, r=None):
            # Stage s's layers on its slot; `r`: the repeat (circular schedule), whose chunk of
            # the layers, and of the per-layer inputs, the stage runs.
            def one_example(layers, item):
                c, own_consts, own_xs = item
                all_consts = merge([None if b else c0 for c0, b in zip(consts, consts_b, strict=True)], own_consts)
                mine = [x[s] for x in own_xs] if r is None else [x[r, s] for x in own_xs]
                lxs = jax.tree.unflatten(xs_tree, merge(stage_xs, mine))
                c, ys = _scan_layers(lambda c, lx: self.step(all_consts, c, lx), c, (layers, lxs), self.scan)
                return (c, own_consts, own_xs), ys

            if not self.copy_axes:
                batch_spmd = {"spmd_axis_name": self.spread} if self.spread else {}
                return jax.vmap(one_example, in_axes=(None, 0), **batch_spmd)(layers, slot)
            # The slot's (size, ...) as (data, size / data, ...): `data` shard i runs its own
            # examples on copy i, split further over the other batch axes.
            rest = tuple(a for a in self.spread if a not in self.copy_axes)
            per_copy = jax.vmap(one_example, in_axes=(None, 0), **({"spmd_axis_name": rest} if rest else {}))
            by_copy = jax.tree.map(lambda x: x.reshape(self.copies, -1, *x.shape[1:]), slot)
            axes = jax.tree.map(lambda c: 0 if c else None, copied)
            out = jax.vmap(per_copy, in_axes=(axes, 0), spmd_axis_name=self.copy_axes)(layers, by_copy)
            return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)

        if self.repeats > 1:

            def run_chunk(s, r, layers, stage_xs, slot):
                # Repeat r's chunk of the stage's (repeats, layers / (stage * repeats), ...).
                layers = jax.tree.map(lambda x, c: x[:, r] if c else x[r], layers, copied)
                stage_xs = [None if x is None else x[r] for x in stage_xs]
                return run_stage(s, layers, stage_xs, slot, r)

            return self._circular(run_chunk, stage_arrays, shared_xs, inputs)

        stages = jnp.arange(self.stages, dtype=jnp.int32)
        run_all = jax.vmap(run_stage, spmd_axis_name="stage")

        steps = n + self.stages - 1
        first = stages == 0

        def fed(x):
            # (micro, size, ...) -> (steps, stage, size, ...): stage 0's row holds the
            # micro-batch it takes at each step, split over `stage` like the buffer, so that
            # neither taking it nor its cotangent moves anything between stages in the loop.
            x = x[jnp.minimum(jnp.arange(steps), n - 1)]
            x = jnp.zeros((steps, self.stages, *x.shape[1:]), x.dtype).at[:, 0].set(x)
            return self._constrain(x, None, "stage", self.spread)

        def tick(state, feed):
            take = lambda s, f: jnp.where(first.reshape(-1, *(1,) * (s.ndim - 1)), f, s)  # noqa: E731
            state = jax.tree.map(take, state, feed)  # stage 0 takes micro-batch t
            state = jax.tree.map(lambda s: self._constrain(s, "stage", self.spread), state)
            out, ys = run_all(stages, stage_arrays, shared_xs, state)
            # The whole buffer, split over `stage`: the last stage's slot (micro-batch
            # t - (stage - 1)) is read out after the loop, in one transfer.
            return jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), out), (out[0], ys)

        state = jax.tree.map(lambda x: jnp.broadcast_to(x[0], (self.stages, *x.shape[1:])), inputs)
        _, (outs, ys) = jax.lax.scan(tick, state, jax.tree.map(fed, inputs))
        out = jax.tree.map(lambda x: self._unmicro(x[self.stages - 1:, -1]), outs)
        return out, jax.tree.map(self._collect_ys, ys)

    def _collect_ys(self, y):
        # y: (steps, stage, size, layers / stage, ...); micro-batch m was on stage s at step m + s.
        s = jnp.arange(self.stages)[None, :]
        m = jnp.arange(self.micro)[:, None]
        y = y[m + s, s]  # (micro, stage, size, layers / stage, ...)
        y = jnp.moveaxis(y, 2, 1).reshape(self.micro, self.size, -1, *y.shape[4:])
        return self._unmicro(y)

    def _circular(self, run_chunk, stage_arrays, shared_xs, inputs):
        """The circular schedule: `micro * repeats + stage - 1` steps; at step t stage s runs
        micro-batch `(t - s) % micro` through its chunk `(t - s) // micro`.

        Micro-batch m leaves the last stage after repeat r at step `r * micro + m + stage - 1`
        and is due at stage 0 at step `(r + 1) * micro + m`: it waits `micro - stage` steps in
        a circular buffer of `micro` slots per stage, `(stage, micro, size, ...)` split over
        `stage` (stage 0's row is the one used: it starts with the micro-batches themselves, and
        slot m is overwritten by micro-batch m's return from the ring). Reading and writing a
        slot is local to each device, so the roll stays the only communication in the loop.
        The last repeat's outputs go to a second such buffer (the last stage's row used), read
        out after the loop.
        """
        n, stages_n, repeats = self.micro, self.stages, self.repeats
        steps = n * repeats + stages_n - 1
        stages = jnp.arange(stages_n, dtype=jnp.int32)
        first, last = stages == 0, stages == stages_n - 1
        run_all = jax.vmap(run_chunk, spmd_axis_name="stage")

        def rows(x):
            # (micro, size, ...) -> (stage, micro, size, ...): stage 0's row holds x.
            x = jnp.zeros((stages_n, *x.shape), x.dtype).at[0].set(x)
            return self._constrain(x, "stage", None, self.spread)

        def by_stage(flags, x):
            return flags.reshape(-1, *(1,) * (x.ndim - 1))

        def put(buffer, where, x, i):
            # Slot i of each stage's row of `buffer` set to its `x` where `where` (per stage).
            old = jax.lax.dynamic_index_in_dim(buffer, i, axis=1, keepdims=False)
            new = jnp.where(by_stage(where, x), x, old)
            return jax.lax.dynamic_update_index_in_dim(buffer, new, i, axis=1)

        def tick(loop, t):
            state, waiting, done = loop
            # Stage 0's slot now holds what the last stage ran at step t - 1: micro-batch
            # (t - stage) % micro between two repeats (while the first micro-batches have not
            # come round, and after the last repeat, something else: not kept, so that a slot
            # stage 0 reads always holds a micro-batch's input to one of its repeats).
            back = (t >= stages_n) & (t < (repeats - 1) * n + stages_n)
            waiting = jax.tree.map(
                lambda w, x: put(w, first & back, x, (t - stages_n) % n), waiting, state
            )
            # Stage 0 takes micro-batch t % micro: first from the micro-batches, then as it
            # comes back round; once all are done, the last repeat's inputs again (real values).
            taken = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, t % n, axis=1, keepdims=False), waiting)
            state = jax.tree.map(lambda s, f: jnp.where(by_stage(first, s), f, s), state, taken)
            state = jax.tree.map(lambda s: self._constrain(s, "stage", self.spread), state)
            repeat = jnp.clip((t - stages) // n, 0, repeats - 1)
            out, ys = run_all(stages, repeat, stage_arrays, shared_xs, state)
            # The last stage finishes micro-batch (t - stage + 1) % micro's last repeat.
            finished = last & (t - stages_n + 1 >= (repeats - 1) * n)
            done = jax.tree.map(lambda d, x: put(d, finished, x, (t - stages_n + 1) % n), done, out[0])
            return (jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), out), waiting, done), ys

        state = jax.tree.map(lambda x: jnp.broadcast_to(x[0], (stages_n, *x.shape[1:])), inputs)
        waiting = jax.tree.map(rows, inputs)
        done = jax.tree.map(lambda x: self._constrain(jnp.zeros((stages_n, *x.shape), x.dtype), "stage", None, self.spread), inputs[0])
        (_, _, done), ys = jax.lax.scan(tick, (state, waiting, done), jnp.arange(steps, dtype=jnp.int32))
        out = jax.tree.map(lambda x: self._unmicro(x[-1]), done)
        return out, jax.tree.map(self._collect_circular_ys, ys)

    def _collect_circular_ys(self, y):
        # y: (steps, stage, size, layers / (stage * repeats), ...); micro-batch m's repeat r ran
        # on stage s at step r * micro + m + s, through layers (r * stage + s) * chunk ....
        m = jnp.arange(self.micro)[:, None, None]
        r = jnp.arange(self.repeats)[None, :, None]
        s = jnp.arange(self.stages)[None, None, :]
        y = y[r * self.micro + m + s, s]  # (micro, repeats, stage, size, chunk, ...)
        y = jnp.moveaxis(y, 3, 1).reshape(self.micro, self.size, -1, *y.shape[5:])
        return self._unmicro(y)
