"""Expert parallelism: the all-to-all that carries a batch's expert slots to their experts' devices.

Under `"capacity"` each sequence's tokens are gathered into an `(experts, capacity, embed)` block
(under `"dense"` every expert's slots hold the whole sequence; see [`eqzoo.nn.MoE`][]); vmapped over the batch that is `(batch, experts, capacity, embed)`, with
the batch split over the mesh's batch axes (`data`, `fsdp`, `expert`). With experts split over
the `expert` axis, `to_experts` moves the block to
`(batch over data x fsdp, experts over expert)`: one `all_to_all` over `expert`, after which each
device holds the slots of its own experts for every sequence of its `expert` group and runs
its experts locally. `from_experts` is the way back.

Both are the identity on values; only the layout changes. The model is written for one
sequence, so the exchange needs the batch: each op is a `jax.custom_batching.custom_vmap`
whose batching rule (which sees the whole batch) runs the `shard_map`. A `custom_vmap` cannot
be differentiated in reverse mode, so each is a `jax.custom_vjp` whose backward pass is the
other direction (the transpose of a layout change is the opposite change). The ops are the
identity, and no exchange runs, outside an eqzoo mesh with `expert > 1`, for a batch the
batch axes do not split evenly, for experts the `expert` axis does not split, inside another
`shard_map`, and for the outer level of nested vmaps; XLA then lays the products out itself.
"""

import math

import jax
from jax import lax
from jax.custom_batching import custom_vmap
from jax.sharding import PartitionSpec as P

from ._grouped import refuse_forward_mode


def expert_parallel_size() -> int:
    """The size of the active eqzoo mesh's `expert` axis (1 without a mesh), read at trace time."""
    from ..sharding._activation import active_mesh  # eqzoo.sharding imports eqzoo.nn

    mesh = active_mesh()
    return 1 if mesh is None else int(mesh.shape.get("expert", 1))


def _exchange(x, *, to_experts: bool):
    """`x` (batch, experts, ...) with its layout changed between the batch split over every
    batch axis and the batch over `data` x `fsdp` with the experts over `expert`."""
    from ..sharding._activation import active_mesh, batch_axes

    mesh = active_mesh()
    if mesh is None or jax.sharding.get_abstract_mesh().manual_axes:
        return x
    ep = int(mesh.shape.get("expert", 1))
    axes = batch_axes(mesh)
    if ep == 1 or x.ndim < 2 or x.shape[0] % math.prod(mesh.shape[a] for a in axes) or x.shape[1] % ep:
        return x
    outer = tuple(a for a in axes if a != "expert") or None
    by_token, by_expert = P(axes), P(outer, "expert")
    if to_experts:  # split the experts axis among the group, gather the group's sequences
        body = lambda a: lax.all_to_all(a, "expert", 1, 0, tiled=True)  # noqa: E731
        specs = (by_token, by_expert)
    else:
        body = lambda a: lax.all_to_all(a, "expert", 0, 1, tiled=True)  # noqa: E731
        specs = (by_expert, by_token)
    return jax.shard_map(body, mesh=mesh, in_specs=specs[0], out_specs=specs[1], check_vma=False)(x)


def _layout_op(to_experts: bool):
    """The batched exchange as an op: on a batch with no enclosing vmap, the `shard_map`; under
    a further vmap (the outer level of nested vmaps) the identity."""

    @custom_vmap
    def op(x):
        return _exchange(x, to_experts=to_experts)

    @op.def_vmap
    def _(axis_size, in_batched, x):
        return x, in_batched[0]

    return op


_batch_to_experts = _layout_op(True)
_batch_from_experts = _layout_op(False)


def _per_example_op(batched_op):
    """The per-example op: the identity on one example; under `jax.vmap`, `batched_op` on the
    whole batch."""

    @custom_vmap
    def op(x):
        return x

    @op.def_vmap
    def _(axis_size, in_batched, x):
        if not in_batched[0]:
            return x, False
        return batched_op(x), True

    return op


_NOT_REVERSE_MODE = (
    "expert parallelism (an eqzoo mesh with expert > 1, inside activation_sharding) supports "
    "reverse-mode gradients (jax.grad, as training takes them), not forward-mode or higher-order "
    "differentiation (jax.jvp, jax.jacfwd, jax.hessian, a gradient of a gradient); run those "
    "on a mesh without an `expert` axis (the values are the same)."
)


_to_op = refuse_forward_mode(_per_example_op(_batch_to_experts), _NOT_REVERSE_MODE)
_from_op = refuse_forward_mode(_per_example_op(_batch_from_experts), _NOT_REVERSE_MODE)


@jax.custom_vjp
def _to(x):
    return _to_op(x)


@jax.custom_vjp
def _from(x):
    return _from_op(x)


_to.defvjp(lambda x: (_to_op(x), None), lambda _, ct: (_from_op(ct),))
_from.defvjp(lambda x: (_from_op(x), None), lambda _, ct: (_to_op(ct),))


def to_experts(x):
    """One sequence's `(experts, ...)` expert slots, laid out for expert parallelism.

    The identity on values. Under `jax.vmap` inside an eqzoo mesh with `expert > 1`, the batch of
    blocks moves by one `all_to_all` over `expert` from "batch split over every batch axis" to
    "batch over `data` x `fsdp`, experts over `expert`", so each device computes its own
    experts. Call it only where expert parallelism is wanted
    (`expert_parallel_size() > 1`): its derivative is reverse-mode only (`jax.jvp` raises JAX's
    `TypeError` for a `custom_vjp`; higher-order derivatives a `ConfigError`).
    """
    return _to(x)


def from_experts(x):
    """The inverse of `to_experts`: the expert
    outputs back to the devices holding their sequences."""
    return _from(x)
