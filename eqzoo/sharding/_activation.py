"""Optional activation sharding constraints, read at trace time; no-ops unless a mesh is set.

Model code stays mesh-agnostic: a layer calls `constrain(x, "residual")` with a *logical* name,
and only inside `with activation_sharding(mesh):` does that become
`jax.lax.with_sharding_constraint` with the spec the active rules give that name.
"""

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .._errors import int_hint
from ._errors import ShardingError
from ._mesh import _BATCH_AXES, check_mesh, context_size
from ._rules import _entry_axes, drop_missing_axes

ACTIVATION_RULES: dict[str, P] = {
    # One sequence's hidden states, (seq, embed): split along the sequence over `context`
    # (context parallelism: a block's norms, MLP and projections are per position, so they run
    # on each device's own positions); replicated across `fsdp` (weights are gathered,
    # activations are not split by width) and across `tensor` (Megatron keeps the residual
    # stream whole on every tensor-parallel device). The batch axis is added by the vmap around
    # the model: `batch_vmap` pins it to the batch axes, plain `jax.vmap` leaves it
    # unconstrained.
    "residual": P("context", None),
    # Attention's rotated queries (seq, heads, head_dim): they stay split over `context`, each
    # device computing its own query rows. Heads and head_dim are left to XLA (split over
    # `tensor` by the projection's layout).
    "attn_q": P("context", P.UNCONSTRAINED, P.UNCONSTRAINED),
    # Attention's rotated keys and values (seq, kv_heads, head_dim) as the scores read them:
    # whole along the sequence, i.e. all-gathered over `context` once per layer (and their
    # gradients reduce-scattered back in the backward pass). Not read by ring attention
    # (`context_attention="ring"`), which keeps them split.
    "attn_kv": P(None, P.UNCONSTRAINED, P.UNCONSTRAINED),
    # The token embedding table (vocab, embed) as the lookup uses it: gathered over `fsdp`
    # (as FSDP gathers every weight it uses) and vocab-parallel over `tensor`, so a lookup is a
    # masked local gather plus one all-reduce over `tensor`.
    "vocab_table": P("tensor", None),
    # Learned position embeddings (max_seq, embed), as GPT-2's lookup reads them: gathered (the
    # table is small; its rows are picked by data when documents are packed).
    "position_table": P(None, None),
}
"""The default activation rules: logical name -> `PartitionSpec`. `"residual"` is the hidden
states of one example (no batch axis: [`eqzoo.sharding.batch_vmap`][] adds it, over the mesh's
batch axes), split along the sequence over `context`; `"attn_q"` and `"attn_kv"` are
attention's queries (split over `context`) and keys/values (gathered over `context`) of one
example; `"vocab_table"` is the token embedding table as the lookup reads it, and
`"position_table"` GPT-2's position embedding table as its lookup reads it. On a mesh with
`context=1` (the default) the `context` entries split nothing."""

ContextAttention = Literal["gather", "ring", "ring_balanced"]
"""The type of a `context_attention` argument: `"gather"`, `"ring"` or `"ring_balanced"`
([`eqzoo.sharding.CONTEXT_ATTENTION`][])."""
CONTEXT_ATTENTION: tuple[str, ...] = ("gather", "ring", "ring_balanced")
"""The attention strategies under context parallelism (a mesh with `context > 1`), chosen with
`context_attention=` on [`eqzoo.sharding.activation_sharding`][],
[`eqzoo.train.make_train_step`][] and [`eqzoo.train.make_eval_step`][]:

- `"gather"` (the default): each device keeps its query rows and all-gathers the keys and
  values over `context` (the `"attn_kv"` rule); XLA partitions the one-device program.
- `"ring"`: ring attention (Liu et al., 2023, "Ring Attention with Blockwise Transformers"):
  each device keeps its own key/value block and passes it round the `context` ring
  (`context` steps of `jax.lax.ppermute`), combining the blocks with a float32 online
  softmax. No device holds the whole keys/values or a `(heads, seq / context, seq)` score
  block: per-device attention memory falls with `context` (docs/scaling.md).
- `"ring_balanced"`: ring attention in the load-balanced ("zigzag") order for causal
  attention: the sequence is cut into `2 * context` chunks and device `i` works on chunks `i`
  and `2 * context - 1 - i` (moved there and back by `jax.lax.ppermute` inside each attention
  layer), so that every device has the same unmasked work at every ring step and the step's
  critical path is about halved. Needs sequence lengths divisible by `2 * context`; attention
  built with `causal=False` runs as `"ring"`."""

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, P], str, int | None, int] | None] = contextvars.ContextVar(
    "eqzoo_activation_sharding", default=None
)


def check_context_attention(value, who: str) -> str:
    """`value` if it names a strategy of `eqzoo.sharding.CONTEXT_ATTENTION`, else a `ShardingError`."""
    if not isinstance(value, str) or value not in CONTEXT_ATTENTION:
        raise ShardingError(
            f"{who}: context_attention must be one of {CONTEXT_ATTENTION} ('gather': all-gather the "
            "keys/values over context; 'ring': ring attention; 'ring_balanced': ring attention in "
            f"the load-balanced order for causal attention); got {value!r}."
        )
    return value


@contextlib.contextmanager
def activation_sharding(
    mesh: Mesh | None,
    rules: Mapping[str, P] | None = None,
    *,
    context_attention: ContextAttention = "gather",
    pipeline_microbatches: int | None = None,
    pipeline_repeats: int = 1,
) -> Iterator[None]:
    """Within this context, [`eqzoo.sharding.constrain`][] applies sharding constraints on `mesh`.

    The context is read while a function is *traced*: wrap the first call of a jitted step (or
    pass `mesh=` to [`eqzoo.train.make_train_step`][], which does this for you). A compiled
    function keeps whatever constraints it was traced with.

    **Arguments:**

    - `mesh`: the device mesh, or `None` to switch constraints off inside the block.
    - `rules`: logical activation name -> `PartitionSpec` of one unbatched example; defaults to
      `eqzoo.sharding.ACTIVATION_RULES`. Names missing from the rules are left unconstrained.
    - `context_attention`: how attention runs when `mesh` has `context > 1`: `"gather"`
      (all-gather the keys and values), `"ring"` (ring attention) or `"ring_balanced"` (ring
      attention in the load-balanced order); see `eqzoo.sharding.CONTEXT_ATTENTION`. Ignored on
      a mesh with `context=1`.
    - `pipeline_microbatches`: when `mesh` has `stage > 1`, how many micro-batches a layer stack
      cuts the batch into for its pipeline (each must hold the same number of examples: the
      batch must be a multiple of it). `None` (the default): the largest number up to
      `2 * stage` that divides the batch, preferring micro-batches the batch axes still split
      evenly. More micro-batches shrink the pipeline's bubble, `(stage - 1) / (micro + stage -
      1)` of the steps, but make each step's work smaller. Ignored on a mesh with `stage=1`.
    - `pipeline_repeats`: when `mesh` has `stage > 1`, how many times a micro-batch goes round
      the stages (the circular, or interleaved, schedule): each stage holds this many chunks
      of `layers / (stage * pipeline_repeats)` layers, chunk `r` of stage `s` being layers
      `(r * stage + s) * layers / (stage * pipeline_repeats) ...`. `1` (the default) is GPipe's
      schedule. More repeats shrink the bubble to `(stage - 1) / (micro * pipeline_repeats +
      stage - 1)` for `pipeline_repeats` times as many point-to-point transfers; with more than
      one, `stage * pipeline_repeats` must divide the stack's depth and the micro-batches be at
      least `stage` (docs/scaling.md). Ignored on a mesh with `stage=1`.
    """
    check_context_attention(context_attention, "activation_sharding")
    check_pipeline_microbatches(pipeline_microbatches, "activation_sharding")
    pipeline_repeats = check_pipeline_repeats(pipeline_repeats, "activation_sharding")
    if mesh is not None:
        check_mesh(mesh, "activation_sharding")
    if mesh is not None and rules is None:
        # eqzoo's defaults fit any mesh: an axis the mesh lacks is dropped from them.
        rules = {name: drop_missing_axes(spec, mesh) for name, spec in ACTIVATION_RULES.items()}
    elif mesh is not None:
        rules = dict(rules)
        for name, spec in rules.items():
            if not isinstance(spec, P):
                raise ShardingError(f"activation rule {name!r} must map to a PartitionSpec; got {spec!r}.")
            for axis in _spec_axes(spec):
                if axis not in mesh.shape:
                    raise ShardingError(
                        f"activation rule {name!r} uses mesh axis {axis!r}, which the mesh "
                        f"{dict(mesh.shape)} does not have."
                    )
    active = (mesh, rules, context_attention, pipeline_microbatches, pipeline_repeats)
    token = _ACTIVE.set(None if mesh is None else active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the innermost [`eqzoo.sharding.activation_sharding`][] block, or `None`.

    Read at trace time, as [`eqzoo.sharding.constrain`][] does; code that lays out its own
    intermediates (e.g. [`eqzoo.train.fused_cross_entropy`][]) uses it to find the mesh.
    """
    active = _ACTIVE.get()
    return None if active is None else active[0]


def active_context_attention() -> str:
    """The `context_attention` of the innermost [`eqzoo.sharding.activation_sharding`][] block
    (`"gather"` outside one); read at trace time by [`eqzoo.nn.Attention`][]."""
    active = _ACTIVE.get()
    return "gather" if active is None else active[2]


def active_pipeline_microbatches() -> int | None:
    """The `pipeline_microbatches` of the innermost [`eqzoo.sharding.activation_sharding`][]
    block (`None`, the default choice, outside one); read at trace time by
    [`eqzoo.nn.Stacked`][] on a mesh with `stage > 1`."""
    active = _ACTIVE.get()
    return None if active is None else active[3]


def active_pipeline_repeats() -> int:
    """The `pipeline_repeats` of the innermost [`eqzoo.sharding.activation_sharding`][] block
    (`1`, GPipe's schedule, outside one); read at trace time by [`eqzoo.nn.Stacked`][] on a
    mesh with `stage > 1`."""
    active = _ACTIVE.get()
    return 1 if active is None else active[4]


def check_pipeline_repeats(value, who: str) -> int:
    """`value` as a Python int if it is a positive integer, else a `ShardingError`."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 1:
        raise ShardingError(
            f"{who}: pipeline_repeats must be an integer >= 1 (how many times a micro-batch goes "
            "round the pipeline's stages: 1 for GPipe's schedule, more for the circular one); got "
            f"{value!r}.{int_hint(value)}"
        )
    return int(value)


def check_pipeline_microbatches(value, who: str) -> int | None:
    """`value` if it is `None` or a positive int, else a `ShardingError`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ShardingError(
            f"{who}: pipeline_microbatches must be a positive integer (the number of micro-batches "
            f"a pipelined layer stack cuts the batch into) or None for the default; got {value!r}."
        )
    return value


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of `mesh` that split a batch (`data`, `fsdp`, `expert`; those of size 1 left out).

    `context` is not among them: it splits each sequence along its length (the batch's second
    axis), not the batch; see [`eqzoo.sharding.batch_spec`][]."""
    return tuple(a for a in _BATCH_AXES if mesh.shape.get(a, 1) > 1)


def batch_vmap(fn: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
    """`jax.vmap(fn)` whose batch axis is the mesh's batch axes inside `activation_sharding`.

    Use it instead of `jax.vmap` to batch a per-example model in a loss that runs under a mesh
    (eqzoo's losses do). Inside [`eqzoo.sharding.activation_sharding`][] (which
    `make_train_step(mesh=...)` enters) it is
    `jax.vmap(fn, spmd_axis_name=("data", "fsdp", "expert"))`
    (the axes of size > 1), so every sharding constraint inside `fn` — the
    [`eqzoo.sharding.constrain`][] calls of the transformer blocks — also pins the batch axis to
    those mesh axes. Outside, or on a mesh without batch axes, it is plain `jax.vmap`.

    Why it matters: with the batch axis left unconstrained, XLA's partitioner is free to
    un-shard it, and for FSDP (weights split over `fsdp` along the embedding, the batch split
    over `fsdp` too) it did: GPT-2 124M on `fsdp=8` all-gathered the MLP's whole-batch
    activations in every layer, 10.7 GB of collectives per step, against 1.3 GB with the batch
    pinned (`benchmarks/collective_bytes.py`, docs/performance.md).

    **Arguments:** as for `jax.vmap` (`fn`, `in_axes`, `out_axes`).

    **Returns:** the batched function; the mesh is read each time it is traced.
    """

    def batched(*args, **kwargs):
        mesh = active_mesh()
        axes = () if mesh is None else batch_axes(mesh)
        spmd = {"spmd_axis_name": axes} if axes else {}
        return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, **spmd)(*args, **kwargs)

    return batched


def check_context_split(seq: int, who: str) -> None:
    """Raise [`eqzoo.sharding.ShardingError`][] when the active mesh splits sequences over
    `context` and `context` does not divide `seq` (read at trace time; nothing to check
    outside [`eqzoo.sharding.activation_sharding`][])."""
    ctx = context_size(active_mesh())
    if ctx > 1 and seq % ctx:
        down, up = seq - seq % ctx, seq + ctx - seq % ctx
        raise ShardingError(
            f"{who}: a sequence of {seq} positions cannot be split over mesh axis context={ctx} "
            f"(context parallelism needs the sequence length divisible by {ctx}). Use sequences "
            f"of {down or up} or {up} positions (pad the rows; packed rows can be padded with "
            "segment id 0), or a mesh whose context size divides the length."
        )


def _spec_axes(spec: P) -> list[str]:
    return [a for entry in spec for a in _entry_axes(entry)]


def constrain(x: jax.Array, name: str) -> jax.Array:
    """Constrain the sharding of activation `x` by the active rule for `name`, if any.

    A no-op outside [`eqzoo.sharding.activation_sharding`][], and for names the active rules do
    not mention; it never changes values.

    **Arguments:**

    - `x`: an activation of one example (inside [`eqzoo.sharding.batch_vmap`][] the batch axis
      is added over the mesh's batch axes; inside plain `jax.vmap` it is left unconstrained).
      A dimension the rule's mesh axes do not divide is left unconstrained.
    - `name`: its logical name, e.g. `"residual"` for the `(seq, embed)` hidden states between
      transformer blocks.

    **Returns:** `x`, with a sharding constraint attached when one applies.
    """
    sharding = _active_sharding(x, name)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def constrain_forward(x: jax.Array, name: str) -> jax.Array:
    """[`eqzoo.sharding.constrain`][] on the value only: its tangent, and so its gradient, is
    left to XLA.

    For a weight read under a layout of its own (the token table by `"vocab_table"`): the
    transpose of a plain constraint would pin the weight's *gradient* to that layout too,
    forcing its partial sums to be all-reduced there, before XLA can add them to the weight's
    other gradient contributions (a tied embedding's head) and reduce once.
    """
    sharding = _active_sharding(x, name)
    return x if sharding is None else _forward_only(x, sharding)


def _active_sharding(x: jax.Array, name: str) -> NamedSharding | None:
    # The sharding the active rule for `name` gives `x`; None outside activation_sharding or for
    # a name the rules do not mention.
    active = _ACTIVE.get()
    spec = None if active is None else active[1].get(name)
    return None if spec is None else NamedSharding(active[0], _fitting(spec, x.shape, active[0]))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _forward_only(x, sharding):
    return jax.lax.with_sharding_constraint(x, sharding)


@_forward_only.defjvp
def _forward_only_jvp(sharding, primals, tangents):
    # The tangent passes through unconstrained, so its transpose (the gradient) is unconstrained
    # too; forward-mode differentiation works as well (a custom_vjp would refuse it).
    (x,), (t,) = primals, tangents
    return jax.lax.with_sharding_constraint(x, sharding), t


def _fitting(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    # A dimension the rule's mesh axes do not divide is left to XLA (P.UNCONSTRAINED) rather
    # than failing: a rule is a layout hint for every model that uses the name.
    out = []
    for dim, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        n = math.prod(int(mesh.shape[a]) for a in _entry_axes(entry))
        out.append(P.UNCONSTRAINED if n > 1 and shape[dim] % n else entry)
    return P(*out)
