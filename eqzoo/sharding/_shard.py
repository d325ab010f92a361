"""Placing models, train states and batches on a mesh."""

import math
import re
import warnings
from collections.abc import Collection
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .._errors import shape_str, user_stacklevel
from ..train._state import TrainState
from ._errors import ShardingError
from ._mesh import _BATCH_AXES, AXES, CONTEXT_AXIS, SEQUENCE_KEYS, check_mesh, context_size
from ._rules import (
    DIT_RULES,
    GPT2_RULES,
    MIXTRAL_RULES,
    VIT_RULES,
    Rules,
    _compile,
    _entry_axes,
    _is_leaf_array,
    default_rules,
    drop_missing_axes,
    partition_specs,
    path_str,
)

BATCH_SPEC = P(_BATCH_AXES)
"""How batches are split: the leading (batch) axis over `data` x `fsdp` x `expert`, everything else
whole. On a mesh with `context > 1`, the functions that take it as their default
(`shard_batch`, `make_global_batch`, a train step's host batches) also split the second
(sequence) axis of each sequence entry over `context` (the entries named in
[`eqzoo.sharding.SEQUENCE_KEYS`][] or in `sequence_keys=`): see [`eqzoo.sharding.batch_spec`][]."""


def batch_spec(mesh: Mesh, ndim: int = 2, *, sequence: bool = True) -> P:
    """The default `PartitionSpec` of a batch leaf with `ndim` dimensions on `mesh`.

    The leading (batch) axis is split over the mesh's batch axes (`BATCH_SPEC`, less the axes
    the mesh lacks). On a mesh with `context > 1` (context parallelism), a sequence leaf with
    two or more dimensions is read as `(batch, seq, ...)` and its sequence axis is split over
    `context` too: tokens `(batch, seq)` -> `P(("data", "fsdp", "expert"), "context")`.

    **Arguments:** `mesh`; `ndim`, the leaf's number of dimensions; `sequence`, whether the
    leaf is a sequence (`False` for class labels `(batch, k)`, images or per-example features:
    only the batch axis is split). The batch functions decide it per entry from its key:
    [`eqzoo.sharding.SEQUENCE_KEYS`][].

    **Returns:** the spec.
    """
    spec = drop_missing_axes(BATCH_SPEC, mesh)
    if sequence and ndim >= 2 and context_size(mesh) > 1:
        return P(*spec, CONTEXT_AXIS)
    return spec


def _state_specs(state: TrainState, rules: Rules, mesh: Mesh) -> list[P]:
    """One spec per entry of `state.arrays`: the model by the rules; optimizer-state leaves
    follow the parameter whose path is the longest suffix of theirs and whose shape matches
    (Adam's `mu`/`nu` ...); scalars, the step, the key and anything unmatched are replicated."""
    parts = jax.tree.unflatten(state.structure.treedef, state.arrays)
    model_specs = partition_specs(parts.model, rules, mesh)
    params: dict[str, tuple[tuple[int, ...], P]] = {}
    for (path, leaf), spec in zip(
        jax.tree_util.tree_flatten_with_path(parts.model)[0], jax.tree.leaves(model_specs), strict=True
    ):
        params[path_str(path)] = (tuple(leaf.shape), spec)
    specs = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(parts)[0]:
        shape = tuple(leaf.shape)
        spec = P()
        if shape:
            names = path_str(path).split(".")
            if names[0] == "model":
                spec = params[".".join(names[1:])][1]
            else:
                for i in range(1, len(names)):
                    match = params.get(".".join(names[i:]))
                    if match is not None and match[0] == shape:
                        spec = match[1]
                        break
        specs.append(spec)
    return specs


def _warn_unmatched(model: Any, rules: Rules) -> None:
    """Warn about each of the caller's own rules that matches no array of `model`: a typo in a
    pattern would otherwise leave the parameters it meant to split replicated on every device,
    silently. Patterns of eqzoo's default rule sets (which also name LoRA and int8 layouts a
    model may not have), with any spec, are not checked."""
    leaves = jax.tree_util.tree_flatten_with_path(model)[0]
    paths = [path_str(path) for path, leaf in leaves if _is_leaf_array(leaf) and getattr(leaf, "ndim", 0)]
    if not paths:
        return
    # by pattern alone: a user's copy of eqzoo's rules with other specs keeps its LoRA/int8 entries
    builtin = {pattern for pattern, _ in (*GPT2_RULES, *MIXTRAL_RULES, *VIT_RULES, *DIT_RULES)}
    unmatched = [
        pattern for pattern, _ in rules
        if pattern not in builtin and not any(re.search(pattern, p) for p in paths)
    ]
    if unmatched:
        shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
        names = ", ".join(f"'{pattern}'" for pattern in unmatched)  # as written, not repr's doubled backslashes
        warnings.warn(
            f"sharding rule(s) {names} match no parameter of {type(model).__name__}, so they split "
            f"nothing. Rules are searched (re.search) in dotted paths; this model's are: {shown} "
            "(eqzoo.sharding.path_str makes them from key paths).",
            stacklevel=user_stacklevel(),
        )


def _resolve_rules(tree: Any, rules: Rules | None, mesh: Mesh) -> Rules:
    model = tree.model if isinstance(tree, TrainState) else tree
    if rules is not None:
        _compile(rules)  # a malformed rule is named before it is searched
        _warn_unmatched(model, rules)
        return rules
    defaults = default_rules(model)
    foreign = {str(a): int(n) for a, n in mesh.shape.items() if a not in AXES and int(n) > 1}
    if foreign and jax.tree.leaves(model):
        # A hand-built mesh with names of its own ("dp", "model", ...): the default rules and
        # the batch placement name eqzoo's axes only, so these devices would all hold and compute the same.
        warnings.warn(
            f"mesh axis(es) {foreign} are not eqzoo axis names {list(AXES)}: the default sharding "
            "rules and the batch placement do not use them, so every parameter is replicated over "
            "them and their devices compute the same thing. Name the mesh's axes as eqzoo does "
            "(eqzoo.sharding.make_mesh('data=4,tensor=2')), or pass rules= that name them.",
            stacklevel=user_stacklevel(),
        )
    split = {a: int(mesh.shape[a]) for a in ("fsdp", "tensor") if int(mesh.shape.get(a, 1)) > 1}
    if not defaults and split and jax.tree.leaves(model):
        axes = ", ".join(f"{a}={n}" for a, n in split.items())
        warnings.warn(
            f"eqzoo has no default sharding rules for {type(model).__name__}: every parameter is "
            f"replicated, and the mesh's {axes} splits only the batch. Pass rules=((regex, "
            "PartitionSpec), ...) for its parameter paths (eqzoo.sharding.LLAMA_RULES shows the "
            "form; docs/scaling.md), or use a mesh with data parallelism alone.",
            stacklevel=user_stacklevel(),
        )
    return tuple((pattern, drop_missing_axes(spec, mesh)) for pattern, spec in defaults)


def _warn_split_heads(model: Any, mesh: Mesh) -> None:
    # The default rules split attention projections over `tensor` by their flattened
    # heads * head_dim rows; a tensor size that does not divide the heads still fits, but cuts
    # heads in two, and every layer then gathers the partial heads.
    config = getattr(model, "config", None)
    tensor = int(mesh.shape.get("tensor", 1))
    if tensor == 1 or config is None:
        return
    heads = {"num_heads": getattr(config, "num_heads", None), "num_kv_heads": getattr(config, "num_kv_heads", None)}
    counts = [n for n in heads.values() if isinstance(n, int) and n > 0]
    for name, n in heads.items():
        if isinstance(n, int) and n > 0 and n % tensor:
            whole = math.gcd(*counts)  # sizes that keep every kind of head whole
            divisors = [d for d in range(2, whole + 1) if whole % d == 0]
            warnings.warn(
                f"tensor={tensor} does not divide {name}={n}: the default rules then cut attention "
                f"heads across devices and every layer gathers the pieces (GPT-2 124M on tensor=8 "
                f"all-gathers 576 MiB of activations per step at batch 16 x 1024, which tensor=4 "
                f"does not). Use a tensor size that divides every head count ({divisors or 'none above 1'}), or pass rules= that keep heads whole.",
                stacklevel=user_stacklevel(),
            )
            return


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """The `NamedSharding` every array leaf of `tree` gets on `mesh`.

    **Arguments:**

    - `tree`: a model, any pytree, or a [`eqzoo.train.TrainState`][]; leaves may be arrays or
      `jax.ShapeDtypeStruct`s. For a `TrainState` the model follows the rules, each optimizer
      state leaf follows its parameter (matched by path suffix and shape), and scalars, the step
      and the PRNG key are replicated.
    - `mesh`: from [`eqzoo.sharding.make_mesh`][].
    - `rules`: `(regex, PartitionSpec)` pairs; default [`eqzoo.sharding.default_rules`][] of the
      model.

    **Returns:** a pytree of the same structure with a `NamedSharding` per array leaf (`None`
    for other leaves); for a `TrainState`, a `TrainState` whose `arrays` are the shardings.

    **Raises:** [`eqzoo.sharding.ShardingError`][] when a rule does not fit a parameter (naming
    the parameter, its shape and the mesh axis), or for a mesh whose axes are not
    `AxisType.Auto` (`jax.make_mesh`'s default is `Explicit`; build it with `make_mesh`).
    """
    check_mesh(mesh, "tree_shardings")
    if rules is None:
        _warn_split_heads(tree.model if isinstance(tree, TrainState) else tree, mesh)
    rules = _resolve_rules(tree, rules, mesh)
    if isinstance(tree, TrainState):
        shardings = [NamedSharding(mesh, s) for s in _state_specs(tree, rules, mesh)]
        return jax.tree.unflatten(jax.tree.structure(tree), shardings)
    specs = partition_specs(tree, rules, mesh)
    return jax.tree.map(
        lambda leaf, s: NamedSharding(mesh, s) if _is_leaf_array(leaf) else None, tree, specs
    )


def _place(tree: Any, shardings: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    where = [i for i, s in enumerate(targets) if s is not None]
    placed = jax.device_put([leaves[i] for i in where], [targets[i] for i in where])  # one call
    for i, x in zip(where, placed, strict=True):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def shard(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Place every array of `tree` (a model, any pytree or a `TrainState`) on `mesh`.

    The arrays are copied from wherever they are; for a model too large for one device build
    it already sharded with [`eqzoo.sharding.sharded_init`][] instead.

    **Arguments:** as for [`eqzoo.sharding.tree_shardings`][].

    **Returns:** the same tree with its arrays sharded.
    """
    return _place(tree, tree_shardings(tree, mesh, rules))


def shard_state(state: TrainState, mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """Place a [`eqzoo.train.TrainState`][] on `mesh`: parameters by the rules, optimizer state
    following its parameters, step and key replicated.

    The result keeps `state.structure`, so a train step made with
    `make_train_step(..., mesh=mesh)` keeps the state in this layout step after step.

    **Arguments:** `state`; `mesh`; `rules` (default [`eqzoo.sharding.default_rules`][] of
    `state.model`).

    **Returns:** the sharded `TrainState`.
    """
    return shard(state, mesh, rules)


def abstract_sharded(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """`tree` with each array replaced by a `jax.ShapeDtypeStruct` carrying its sharding on `mesh`.

    This is the target a checkpoint restores into to land directly in a given layout (orbax
    reads each device's shard only). `tree` may itself be abstract (from `eqx.filter_eval_shape`),
    so no memory is allocated.

    **Arguments:** as for [`eqzoo.sharding.tree_shardings`][].

    **Returns:** the abstract tree (a `TrainState` for a `TrainState`).
    """
    shardings = tree_shardings(tree, mesh, rules)
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    out = [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if s is not None else x
        for x, s in zip(leaves, targets, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _check_batch_leaf(who: str, path: Any, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    name = f"batch{jax.tree_util.keystr(path)}"
    if len(spec) > len(shape):
        raise ShardingError(
            f"{who}: {name} of shape {shape_str(shape)} has fewer dimensions than the batch spec "
            f"{spec}; every batch leaf needs a leading batch axis."
        )
    sizes = {str(k): int(v) for k, v in mesh.shape.items()}
    for dim, entry in enumerate(spec):
        axes = _entry_axes(entry)
        unknown = [a for a in axes if a not in sizes]
        if unknown:
            raise ShardingError(f"{who}: batch spec {spec} names mesh axis {unknown[0]!r}, not in {sizes}.")
        n = math.prod(sizes[a] for a in axes)
        if shape[dim] % n and dim == 1 and CONTEXT_AXIS in axes:
            raise ShardingError(
                f"{who}: {name} of shape {shape_str(shape)}: its sequence length {shape[dim]} is "
                f"split over mesh axis context={sizes[CONTEXT_AXIS]} (context parallelism reads a "
                f"batch leaf's second axis as its sequence), which does not divide it. Use a "
                f"sequence length divisible by {n} (e.g. {shape[dim] - shape[dim] % n or n} or "
                f"{shape[dim] + n - shape[dim] % n}: pad the rows, or change seq_len), or a mesh "
                "with a context size that divides it. If this entry is not a sequence (labels, "
                "images, per-example features), leave its key out of sequence_keys= "
                "(default eqzoo.sharding.SEQUENCE_KEYS) and only its batch axis is split."
            )
        if shape[dim] % n:
            names = "x".join(f"{a}={sizes[a]}" for a in axes if sizes[a] > 1)
            raise ShardingError(
                f"{who}: {name} of shape {shape_str(shape)}: dimension {dim} (size {shape[dim]}) is "
                f"split over mesh axis {names} ({n} devices), which does not divide it; use a "
                f"global batch size divisible by {n}."
            )


def _batch_spec(spec: P, mesh: Mesh, ndim: int = 1, sequence: bool = True) -> P:
    # The default fits any mesh (a hand-built one may lack `expert`, say) and splits a sequence
    # leaf over `context`; a given spec is taken as is.
    return batch_spec(mesh, ndim, sequence=sequence) if spec == BATCH_SPEC else spec


def _sequence_keys(sequence_keys: Collection[str] | None, who: str) -> frozenset[str] | None:
    if sequence_keys is None:
        return None
    if isinstance(sequence_keys, str) or not all(isinstance(k, str) for k in sequence_keys):
        raise ShardingError(
            f"{who}: sequence_keys must be a collection of batch key names, e.g. "
            f"('tokens', 'targets'), or None; got {sequence_keys!r}"
            + (f" (one key is written ({sequence_keys!r},))." if isinstance(sequence_keys, str) else ".")
        )
    return frozenset(sequence_keys)


def _leaf_name(path: Any) -> str | None:
    # The innermost dict key or attribute name on the path; None for a bare array or an entry
    # of a tuple or list batch.
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
        if isinstance(entry, jax.tree_util.GetAttrKey):
            return entry.name
    return None


def _is_sequence(path: Any, sequence_keys: frozenset[str] | None) -> bool:
    # A named entry is a sequence when its name is among the keys; an unnamed one (a tuple
    # batch, a bare array) and every entry under sequence_keys=None are read by shape.
    name = _leaf_name(path)
    return sequence_keys is None or name is None or name in sequence_keys


def _leaf_sharding(
    who: str, path: Any, shape: tuple[int, ...], mesh: Mesh, spec: P, sequence_keys: frozenset[str] | None
) -> NamedSharding:
    leaf_spec = _batch_spec(spec, mesh, len(shape), _is_sequence(path, sequence_keys))
    _check_batch_leaf(who, path, shape, leaf_spec, mesh)
    return NamedSharding(mesh, leaf_spec)


def batch_split(mesh: Mesh) -> int:
    """How many ways `BATCH_SPEC` splits a batch's leading axis on `mesh` (data x fsdp x expert)."""
    spec = _batch_spec(BATCH_SPEC, mesh)
    sizes = {str(k): int(v) for k, v in mesh.shape.items()}
    return math.prod(sizes[a] for a in _entry_axes(spec[0])) if len(spec) else 1


def _batch_sharding(batch: Any, mesh: Mesh, spec: P, who: str, sequence_keys: Collection[str] | None) -> Any:
    check_mesh(mesh, who)
    keys = _sequence_keys(sequence_keys, who)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _leaf_sharding(who, path, tuple(np.shape(x)), mesh, spec, keys), batch
    )


def shard_batch(
    batch: Any, mesh: Mesh, spec: P = BATCH_SPEC, *, sequence_keys: Collection[str] | None = SEQUENCE_KEYS
) -> Any:
    """Put a *global* batch (the same full batch in every process) on `mesh`.

    **Arguments:**

    - `batch`: a pytree of arrays whose leading axis is the batch.
    - `mesh`: the mesh.
    - `spec`: how to split each leaf; default `BATCH_SPEC`, the batch axis over `data` x `fsdp` x
      `expert` (and, with `context > 1`, a sequence entry's second axis over `context`:
      [`eqzoo.sharding.batch_spec`][]).
    - `sequence_keys`: which entries are sequences, by key (a dict batch's keys, at any depth;
      default [`eqzoo.sharding.SEQUENCE_KEYS`][], the keys eqzoo's losses read). Other named
      entries are split over the batch axes only; unnamed leaves (a tuple batch, a bare array)
      and, with `None`, every leaf count as sequences when they have two or more dimensions.
      Matters only on a mesh with `context > 1`.

    **Returns:** the batch as sharded `jax.Array`s.

    **Raises:** [`eqzoo.sharding.ShardingError`][] when the batch size, or under context
    parallelism the sequence length, is not divisible.
    """
    return jax.device_put(batch, _batch_sharding(batch, mesh, spec, "shard_batch", sequence_keys))


def make_global_batch(
    local_batch: Any, mesh: Mesh, spec: P = BATCH_SPEC, *, sequence_keys: Collection[str] | None = SEQUENCE_KEYS
) -> Any:
    """Assemble each process's slice of a batch into one global `jax.Array` per leaf.

    On `P` processes, process `i` passes the rows it loaded (an eqzoo loader built with the
    global `batch_size` yields rows `[i*B/P, (i+1)*B/P)`); the result is the `(B, ...)` global
    batch, sharded by `spec`, without any process holding the other processes' rows. Uses
    `jax.make_array_from_process_local_data`. With one process it is the same as
    [`eqzoo.sharding.shard_batch`][].

    **Arguments:**

    - `local_batch`: a pytree of numpy (or JAX) arrays, this process's rows.
    - `mesh`: the global mesh.
    - `spec`: how to split each leaf of the global batch; default `BATCH_SPEC` (with
      `context > 1`, as [`eqzoo.sharding.batch_spec`][] gives).
    - `sequence_keys`: which entries are sequences, as for [`eqzoo.sharding.shard_batch`][].

    **Returns:** the global batch.

    **Raises:** [`eqzoo.sharding.ShardingError`][] when the global batch size (or, under
    context parallelism, the sequence length) is not divisible by the mesh axes of `spec`.
    """
    who = f"make_global_batch ({jax.process_count()} process(es) x local rows)"
    check_mesh(mesh, "make_global_batch")
    keys = _sequence_keys(sequence_keys, who)

    def one(path, x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:] if x.ndim else x.shape
        sharding = _leaf_sharding(who, path, global_shape, mesh, spec, keys)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(one, local_batch)
