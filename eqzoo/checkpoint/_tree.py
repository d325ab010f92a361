"""Names for the leaves of a pytree, and the flat `{name: array}` form checkpoints store.

A leaf's name is its path with the parts joined by dots: `model.blocks.attn.qkv.weight`,
`opt_state.1.0.mu.embed.weight`. Characters outside `[A-Za-z0-9_-]` inside a part are escaped as
`%XX` so every name is also a safe file name and distinct paths never share a name. Typed PRNG
keys are stored as their raw `jax.random.key_data` and rewrapped with their implementation.
"""

import functools
import re
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from .._errors import shape_str
from ._errors import CheckpointError

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def _escape(part: str) -> str:
    if not part:
        return "%"
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), part)


def _part(key: Any) -> str:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    """The dotted name of a `jax.tree_util` key path (`model.blocks.attn.qkv.weight`)."""
    return ".".join(_escape(_part(k)) for k in path)


def leaf_names(tree: Any, *, is_leaf=None) -> list[str]:
    """The names of `tree`'s leaves in `jax.tree.leaves` order; raises if two names collide."""
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
        raise CheckpointError(f"two leaves share the checkpoint name(s) {dup}; rename the fields or dict keys.")
    return names


@functools.lru_cache(maxsize=64)
def _names_for(treedef) -> tuple[str, ...]:
    # The dynamic tree of a TrainState: its flat arrays are this tree's leaves, in order.
    return tuple(leaf_names(jax.tree.unflatten(treedef, [0] * treedef.num_leaves)))


def state_names(state) -> tuple[str, ...]:
    """The names of a `TrainState`'s flat arrays (`state.arrays`), in order."""
    return _names_for(state.structure.treedef)


def is_key(leaf: Any) -> bool:
    """Whether `leaf` (an array or `ShapeDtypeStruct`) is a typed PRNG key array."""
    return jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


@functools.lru_cache(maxsize=16)
def _impl_of(dtype) -> tuple[str, tuple[int, ...]]:
    impls: list[str] = []

    def probe(k):
        impls.append(str(jax.random.key_impl(k)))
        return jax.random.key_data(k)

    data = jax.eval_shape(probe, jax.ShapeDtypeStruct((), dtype))
    return impls[0], tuple(data.shape)


def key_impl(leaf: Any) -> str:
    """The implementation name of a typed key (array or `ShapeDtypeStruct`), e.g. `threefry2x32`."""
    return _impl_of(leaf.dtype)[0]


def dtype_name(leaf: Any) -> str:
    """How a leaf's dtype is written in checkpoint metadata: `float32`, `bfloat16`, `key<threefry2x32>`."""
    if is_key(leaf):
        return f"key<{key_impl(leaf)}>"
    return np.dtype(leaf.dtype).name


def describe(leaf: Any) -> dict[str, Any]:
    """`{"shape": [...], "dtype": "..."}` for the checkpoint metadata."""
    return {"shape": [int(s) for s in leaf.shape], "dtype": dtype_name(leaf)}


def spec_str(spec: dict[str, Any]) -> str:
    return f"{spec['dtype']}{shape_str(tuple(spec['shape']))}"


def to_stored(leaf: jax.Array) -> jax.Array:
    """What is written for a leaf: the array itself, or a key's raw data."""
    return jax.random.key_data(leaf) if is_key(leaf) else leaf


def _key_data_sharding(sharding, extra: int):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, *([None] * extra)))
    return sharding  # single-device shardings fit any rank


class StoredSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: Any
    sharding: Any


def stored_spec(leaf: Any, sharding) -> StoredSpec:
    """Shape, dtype and sharding of what is stored for `leaf` (a key's data for typed keys)."""
    if is_key(leaf):
        _, data_shape = _impl_of(leaf.dtype)
        return StoredSpec(
            tuple(leaf.shape) + data_shape, np.dtype(np.uint32), _key_data_sharding(sharding, len(data_shape))
        )
    return StoredSpec(tuple(leaf.shape), leaf.dtype, sharding)


def from_stored(stored: jax.Array, target: Any) -> jax.Array:
    """Turn a restored array back into the leaf `target` describes (rewrapping keys)."""
    if is_key(target):
        return jax.random.wrap_key_data(stored, impl=key_impl(target))
    return stored


def default_sharding(leaf: Any, override) -> Any:
    """The sharding a restored leaf gets: `override` (a sharding or a callable of (name, leaf)),
    else the target leaf's own, else the first local device."""
    if override is not None:
        return override
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    return sharding


def is_array_like(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def restore_specs(leaves: dict[str, Any], shardings: Any, stored_as: dict[str, str]) -> tuple[dict, dict]:
    """`(abstract, restore_args)` for orbax: for each target leaf (`{name: leaf}`), keyed by its
    stored name (`stored_as`, else its own), where `shardings` (`restore`'s argument) puts it."""
    abstract, restore_args = {}, {}
    for name, leaf in leaves.items():
        if callable(shardings) and not isinstance(shardings, Sharding):
            sharding = shardings(name, leaf)
        else:
            sharding = default_sharding(leaf, shardings)
        spec = stored_spec(leaf, sharding)
        try:
            spec.sharding.shard_shape(spec.shape)
        except Exception as err:
            raise CheckpointError(f"cannot place {name} of shape {spec.shape} with sharding {spec.sharding}: {err}") from err
        stored_name = stored_as.get(name, name)
        abstract[stored_name] = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=spec.sharding)
        restore_args[stored_name] = ocp.ArrayRestoreArgs(sharding=spec.sharding, global_shape=spec.shape, dtype=spec.dtype)
    return abstract, restore_args
