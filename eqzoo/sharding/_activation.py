"""Optional activation sharding constraints, read at trace time; no-ops unless a mesh is set.

Model code stays mesh-agnostic: a layer calls `constrain(x, "residual")` with a *logical* name,
and only inside `with activation_sharding(mesh):` does that become
`jax.lax.with_sharding_constraint` with the spec the active rules give that name.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._errors import ShardingError

ACTIVATION_RULES: dict[str, P] = {
    # One sequence's hidden states, (seq, embed): replicated across `fsdp` (weights are
    # gathered, activations are not split by width) and across `tensor` (Megatron keeps the
    # residual stream whole on every tensor-parallel device). The batch axis added by `jax.vmap`
    # is left unconstrained, so it keeps the batch's data x fsdp split.
    "residual": P(None, None),
}
"""The default activation rules: logical activation name -> `PartitionSpec` of one example
(no batch axis; the batch axis `jax.vmap` adds stays unconstrained)."""

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, P]] | None] = contextvars.ContextVar(
    "eqzoo_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping[str, P] | None = None) -> Iterator[None]:
    """Within this context, [`eqzoo.sharding.constrain`][] applies sharding constraints on `mesh`.

    The context is read while a function is *traced*: wrap the first call of a jitted step (or
    pass `mesh=` to [`eqzoo.train.make_train_step`][], which does this for you). A compiled
    function keeps whatever constraints it was traced with.

    **Arguments:**

    - `mesh`: the device mesh, or `None` to switch constraints off inside the block.
    - `rules`: logical activation name -> `PartitionSpec` of one unbatched example; defaults to
      `eqzoo.sharding.ACTIVATION_RULES`. Names missing from the rules are left unconstrained.
    """
    if mesh is not None:
        rules = ACTIVATION_RULES if rules is None else dict(rules)
        for name, spec in rules.items():
            if not isinstance(spec, P):
                raise ShardingError(f"activation rule {name!r} must map to a PartitionSpec; got {spec!r}.")
            for axis in _spec_axes(spec):
                if axis not in mesh.shape:
                    raise ShardingError(
                        f"activation rule {name!r} uses mesh axis {axis!r}, which the mesh "
                        f"{dict(mesh.shape)} does not have."
                    )
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _spec_axes(spec: P) -> list[str]:
    out = []
    for entry in spec:
        if entry is None or entry is P.UNCONSTRAINED:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return out


def constrain(x: jax.Array, name: str) -> jax.Array:
    """Constrain the sharding of activation `x` by the active rule for `name`, if any.

    A no-op outside [`eqzoo.sharding.activation_sharding`][], and for names the active rules do
    not mention; it never changes values.

    **Arguments:**

    - `x`: an activation of one example (inside `jax.vmap` the batch axis is added for you and
      left unconstrained).
    - `name`: its logical name, e.g. `"residual"` for the `(seq, embed)` hidden states between
      transformer blocks.

    **Returns:** `x`, with a sharding constraint attached when one applies.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = rules.get(name)
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
