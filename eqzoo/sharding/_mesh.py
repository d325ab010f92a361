"""Device meshes with eqzoo's named axes: `stage`, `data`, `fsdp`, `context`, `expert` and `tensor`."""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ._errors import ShardingError

AXES: tuple[str, ...] = ("stage", "data", "fsdp", "context", "expert", "tensor")
"""The mesh axis names eqzoo uses, outermost first.

- `stage`: pipeline parallelism. The layers of each [`eqzoo.nn.Stacked`][] stack are split by
  depth (stage `s` holds layers `s * L / stage .. (s + 1) * L / stage - 1`), and the batch runs
  through them as micro-batches in a GPipe schedule, or with `pipeline_repeats > 1` a circular
  one (docs/scaling.md, "Pipeline parallelism").
- `data`: plain data parallelism (parameters replicated, batch split).
- `fsdp`: fully sharded data parallelism (batch split *and* parameters split over their
  embedding dimension, gathered layer by layer).
- `expert`: expert parallelism for mixture-of-experts layers (each device holds
  `num_experts / expert` whole experts; tokens travel to their experts and back by all-to-all).
  Outside the expert layers it splits the batch, as `data` does.
- `context`: context (sequence) parallelism for long sequences: each sequence is split along
  its length, the residual stream stays split inside every block, and attention gathers the
  keys and values over `context`, or with `context_attention="ring"` (or `"ring_balanced"`)
  passes their blocks round the `context` ring (docs/scaling.md, "Context parallelism").
- `tensor`: Megatron-style tensor parallelism (attention heads and MLP hidden units split).

`stage` is outermost: its only traffic is one point-to-point transfer of a micro-batch's
activations between neighbouring stages per pipeline step (and the same for their gradients;
the circular schedule adds one re-layout of the stack's weights, and of their gradients, per
train step), so it can cross hosts or slices. `tensor` is innermost so that its devices are neighbours (the same host, NVLink / ICI), because
tensor parallelism communicates inside every layer; `expert` comes next, since its all-to-alls
run in every mixture-of-experts layer. `context` is next: it also communicates in every layer
(an all-gather of the keys and values, a reduce-scatter of their gradients), but that traffic
is a layer's keys and values only (a fraction of the residual stream under grouped-query
attention) and can overlap with the query projection, so it goes outside `expert` and
`tensor` and inside `fsdp` and `data`, whose weight gathers and gradient reductions are
prefetched or run once per step. An axis of size 1 changes no device's place, so meshes written
before `context` or `stage` existed keep their device order.
"""

# The axes a batch is split over (eqzoo.sharding.BATCH_SPEC), outermost first.
_BATCH_AXES: tuple[str, ...] = ("data", "fsdp", "expert")
# The axis a sequence is split over (context parallelism).
CONTEXT_AXIS = "context"
# The axis layer stacks are split over by depth (pipeline parallelism).
STAGE_AXIS = "stage"

SEQUENCE_KEYS: tuple[str, ...] = (
    "tokens", "targets", "mask", "segment_ids", "positions",
    "chosen_tokens", "chosen_targets", "chosen_mask", "rejected_tokens", "rejected_targets", "rejected_mask",
)
"""The batch keys whose entries are `(batch, seq, ...)` sequences: those eqzoo's own losses read
([`eqzoo.train.lm_loss`][] and the preference losses). Under context parallelism (a mesh with
`context > 1`) these entries of a dict batch have their second axis split over `context`; any
other named entry (class labels `(batch, k)`, images, per-example features) is split over the
batch axes only. Pass `sequence_keys=` to [`eqzoo.sharding.shard_batch`][],
[`eqzoo.sharding.make_global_batch`][], [`eqzoo.train.make_train_step`][] or
[`eqzoo.train.make_eval_step`][] to name your own."""

_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*$")


def parse_mesh_shape(shape: str | Mapping[str, int]) -> dict[str, int]:
    """Read a mesh shape written as `"data=2,fsdp=2,tensor=2"` (or given as a dict).

    Axes not named have size 1. One axis may be `-1`; it is resolved by
    [`eqzoo.sharding.make_mesh`][] to fill the remaining devices.

    **Arguments:**

    - `shape`: a string of comma-separated `axis=size` items, or a mapping from axis name to
      size. Axis names must be among `eqzoo.sharding.AXES`.

    **Returns:** a dict with every axis of `AXES`, in that order.

    **Raises:** [`eqzoo.sharding.ShardingError`][] for an unknown axis, a malformed item, a size
    that is zero or below -1, an axis named twice, or more than one `-1`.
    """
    items: list[tuple[str, int]]
    if isinstance(shape, str):
        items = []
        for part in filter(None, (p.strip() for p in shape.split(","))):
            match = _ITEM.match(part)
            if match is None:
                raise ShardingError(
                    f"cannot read mesh item {part!r} in {shape!r}; write axis=size items separated "
                    "by commas, e.g. 'data=2,fsdp=2,tensor=2'."
                )
            items.append((match.group(1), int(match.group(2))))
    elif isinstance(shape, Mapping):
        items = [(str(k), v) for k, v in shape.items()]
    else:
        raise ShardingError(
            f"a mesh shape is a string like 'data=2,tensor=4' or a dict; got {type(shape).__name__}."
        )
    sizes = dict.fromkeys(AXES, 1)
    seen: set[str] = set()
    for name, size in items:
        if name not in AXES:
            raise ShardingError(
                f"unknown mesh axis {name!r} in {shape!r}; eqzoo meshes have the axes {list(AXES)} "
                "(pipeline stages, data parallel, fully sharded data parallel, context (sequence) "
                "parallel, expert parallel, tensor parallel)."
            )
        if name in seen:
            raise ShardingError(f"mesh axis {name!r} is given twice in {shape!r}.")
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size == 0 or size < -1:
            raise ShardingError(
                f"mesh axis {name!r} has size {size!r}; sizes are positive integers, or -1 for "
                "'all remaining devices'."
            )
        seen.add(name)
        sizes[name] = int(size)
    if sum(1 for s in sizes.values() if s == -1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1; got {sizes}.")
    return sizes


def _resolve_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        fill = next(n for n, s in sizes.items() if s == -1)
        if num_devices % known:
            raise ShardingError(
                f"cannot fill mesh axis {fill!r}: the other axes "
                f"{_fmt({k: v for k, v in sizes.items() if k != fill})} use {known} devices, "
                f"which does not divide the {num_devices} devices present."
            )
        sizes = {**sizes, fill: num_devices // known}
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ShardingError(
            f"mesh {_fmt(sizes)} needs {total} devices but {num_devices} are present; make the "
            f"sizes multiply to {num_devices} (use -1 for one axis to fill the rest, e.g. "
            "'data=-1,tensor=2'), or pass devices= to use a subset."
        )
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(shape: str | Mapping[str, int] = "data=-1", *, devices: Sequence[Any] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` over the devices present, with the axes `stage`, `data`, `fsdp`,
    `context`, `expert`, `tensor`.

    Every eqzoo mesh has all six axes (those not given have size 1), always in that order, so
    one set of sharding rules works on any mesh shape. The device order comes from
    `jax.make_mesh`, which places the innermost axis (`tensor`) on the most closely connected
    devices. On several hosts it spans every process's devices (call
    [`eqzoo.sharding.initialize`][] first).

    **Example:** `make_mesh("data=2,fsdp=2,tensor=2")`, `make_mesh({"fsdp": -1})`,
    `make_mesh("fsdp=2,expert=4")` (a mixture of experts, 2 of its experts on each device),
    `make_mesh("data=2,context=4")` (each sequence split in 4 along its length),
    `make_mesh("stage=2,fsdp=2,tensor=2")` (the layer stacks split in 2 by depth, pipelined).

    **Arguments:**

    - `shape`: as for [`eqzoo.sharding.parse_mesh_shape`][]; one axis may be `-1` to take all
      remaining devices. The default is pure data parallelism over every device.
    - `devices`: the devices to use (default `jax.devices()`, every device of every process).

    **Returns:** the mesh, with `AxisType.Auto` axes (the compiler propagates shardings from
    the parameters, the batch and the constraints eqzoo places).

    **Raises:** [`eqzoo.sharding.ShardingError`][] when the sizes do not multiply to the number
    of devices, or for an unknown axis name.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _resolve_sizes(parse_mesh_shape(shape), len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES),
        AXES,
        axis_types=(AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def check_mesh(mesh: Any, who: str) -> Mesh:
    """`mesh` if it is a `jax.sharding.Mesh` whose axes are all `AxisType.Auto`, else a
    [`eqzoo.sharding.ShardingError`][] that says how to build one.

    eqzoo's rules place parameters and batches, and its activation constraints guide XLA's
    partitioner, which needs `Auto` axes: under `Explicit` axes (what `jax.make_mesh` makes
    unless told otherwise) JAX's sharding-in-types rejects the constraints and asks for an
    `out_sharding` on the embedding lookup. Called by every eqzoo function that takes a mesh.
    """
    if not isinstance(mesh, Mesh):
        hint = f" (pass eqzoo.sharding.make_mesh({mesh!r}))" if isinstance(mesh, str | Mapping) else ""
        raise ShardingError(
            f"{who}: mesh must be a jax.sharding.Mesh, from eqzoo.sharding.make_mesh; got "
            f"{type(mesh).__name__}{hint}."
        )
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    other = {str(name): t.name for name, t in types.items() if t != AxisType.Auto}
    if other:
        shape = ",".join(f"{name}={int(n)}" for name, n in mesh.shape.items() if name in AXES) or "data=-1"
        raise ShardingError(
            f"{who}: the mesh's axes {other} are not AxisType.Auto; eqzoo's sharding rules and "
            "activation constraints need Auto axes (jax.make_mesh makes Explicit ones unless told "
            f"otherwise). Build the mesh with eqzoo.sharding.make_mesh({shape!r}), or pass "
            f"axis_types=(jax.sharding.AxisType.Auto,) * {len(types)} to jax.make_mesh."
        )
    return mesh


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """The sizes of a mesh's axes as a dict, e.g.
    `{"stage": 1, "data": 2, "fsdp": 2, "context": 1, "expert": 1, "tensor": 2}`."""
    return {str(name): int(size) for name, size in mesh.shape.items()}


def stage_size(mesh: Mesh | None) -> int:
    """The size of `mesh`'s `stage` axis: 1 without a mesh, or on one built without the axis."""
    return 1 if mesh is None else int(mesh.shape.get(STAGE_AXIS, 1))


def context_size(mesh: Mesh | None) -> int:
    """The size of `mesh`'s `context` axis: 1 without a mesh, or on one built without the axis."""
    return 1 if mesh is None else int(mesh.shape.get(CONTEXT_AXIS, 1))
