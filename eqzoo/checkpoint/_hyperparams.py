"""The numeric hyperparameters of `optax.inject_hyperparams` optimizers in a restored state:
found by position, compared with a concrete restore target's, taken from one or the other, or
set to values the caller names."""

import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from .._errors import user_stacklevel
from ._errors import CheckpointError, list_items
from ._tree import state_names

HyperparamsChoice = Literal["saved", "target"] | Mapping[str, Any]
Resolved = Literal["saved", "target"] | dict[int, Any]  # a dict: {position in arrays: value to set}

_EXAMPLE = "hyperparams={'learning_rate': 1e-4}"


def _is_injected(x: Any) -> bool:
    # optax's InjectHyperparamsState / InjectStatefulHyperparamsState (NamedTuples)
    return isinstance(x, tuple) and isinstance(getattr(x, "hyperparams", None), dict) and hasattr(x, "inner_state")


class _Injected(NamedTuple):
    name: str  # its key in the inject_hyperparams state: "learning_rate"
    path: str  # its checkpoint name: "opt_state.1.hyperparams.learning_rate"
    position: int  # in state.arrays
    scheduled: bool  # given as a schedule: recomputed from the step count at every update


def _injected(state) -> list[_Injected]:
    indexed = jax.tree.unflatten(state.structure.treedef, range(state.structure.treedef.num_leaves))
    names = state_names(state)
    found = []
    for node in jax.tree.leaves(indexed.opt_state, is_leaf=_is_injected):
        if _is_injected(node):
            scheduled = getattr(node, "hyperparams_states", None) or {}
            found += [_Injected(name, names[i], i, name in scheduled) for name, i in node.hyperparams.items() if isinstance(i, int)]
    return found


def _key(h: _Injected, injected: list[_Injected]) -> str:
    # The name a user writes: the hyperparameter's own, unless another injected state has one of
    # the same name (two parameter groups of optax.multi_transform), then its path.
    return h.name if sum(other.name == h.name for other in injected) == 1 else h.path


def hyperparam_positions(state) -> tuple[int, ...]:
    """The positions in `state.arrays` of the numeric hyperparameters of every
    `optax.inject_hyperparams` state in the optimizer state. Scheduled ones are left out: the
    optimizer recomputes them from its step count at every update."""
    return tuple(sorted(h.position for h in _injected(state) if not h.scheduled))


def _json(x: Any) -> Any:
    value = np.asarray(x)
    if value.size != 1:
        return value.tolist()
    scalar = value.reshape(())[()]
    # str() of a NumPy float is its shortest round-tripping form: 0.1, not float32(0.1)'s 0.10000000149...
    return float(str(scalar)) if np.issubdtype(value.dtype, np.floating) else scalar.item()


def injected_values(state) -> dict[str, Any]:
    """`{name: value}` (JSON) of the numeric, unscheduled `optax.inject_hyperparams` values
    `state` holds, named as `Checkpointer.restore(hyperparams={...})` takes them. One read of
    those scalars from the device."""
    injected = _injected(state)
    chosen = [h for h in injected if not h.scheduled]
    # A replicated scalar of a multi-process run is not fully addressable: read one local copy.
    leaves = [state.arrays[h.position] for h in chosen]
    leaves = jax.device_get([x if x.is_fully_addressable else x.addressable_data(0) for x in leaves])
    return {_key(h, injected): _json(x) for h, x in zip(chosen, leaves, strict=True)}


def _resolve(values: Mapping[Any, Any], target) -> dict[int, Any]:
    """`{position: value}` for `restore(hyperparams={name: value})`, each value cast to the
    target's dtype; raises `CheckpointError` for a name that is not an unscheduled injected
    hyperparameter of `target`, or a value that cannot be one."""
    injected = _injected(target)
    if not injected:
        raise CheckpointError(
            f"Checkpointer.restore(hyperparams={dict(values)!r}) sets optax.inject_hyperparams values, but the "
            "target's optimizer injects none. Wrap the optimizer, e.g. "
            "optax.inject_hyperparams(optax.adamw)(learning_rate=3e-4), in the saved run and the target alike."
        )
    keys = [_key(h, injected) for h in injected]
    known = ", ".join(f"{k} (scheduled)" if h.scheduled else k for k, h in zip(keys, injected, strict=True))
    out: dict[int, Any] = {}
    for name, value in values.items():
        matches = [h for k, h in zip(keys, injected, strict=True) if name in (k, h.path)]
        if not matches:
            ambiguous = [h.path for h in injected if h.name == name]
            if ambiguous:
                raise CheckpointError(
                    f"Checkpointer.restore(hyperparams=...): {name!r} is injected in {len(ambiguous)} places "
                    f"{ambiguous}; name the one to set by its path."
                )
            raise CheckpointError(
                f"Checkpointer.restore(hyperparams=...): {name!r} is not an optax.inject_hyperparams "
                f"hyperparameter of the target's optimizer; its injected hyperparameters are: {known}."
            )
        h = matches[0]
        if h.scheduled:
            raise CheckpointError(
                f"Checkpointer.restore(hyperparams=...): {name!r} is scheduled (inject_hyperparams was given a "
                "schedule for it), so the optimizer recomputes it from its step count at every update and a "
                "value set now would be overwritten at the next step. Change the schedule in the optimizer "
                "instead, or inject it as a number to set it here."
            )
        if h.position in out:
            raise CheckpointError(f"Checkpointer.restore(hyperparams=...) sets {h.path} twice (by name and by path).")
        leaf = target.arrays[h.position]
        array = np.asarray(value) if isinstance(value, int | float | np.ndarray | np.generic | jax.Array | list) else None
        if array is None or array.dtype.kind not in "biuf" or array.shape != tuple(leaf.shape):
            raise CheckpointError(
                f"Checkpointer.restore(hyperparams=...): the value of {name!r} must be a number"
                f"{'' if leaf.shape == () else f' array of shape {tuple(leaf.shape)}'}, as the optimizer "
                f"state holds it ({np.dtype(leaf.dtype).name}); got {value!r}."
            )
        if not np.can_cast(array.dtype, leaf.dtype, casting="same_kind"):
            raise CheckpointError(
                f"Checkpointer.restore(hyperparams=...): {name!r} is held as {np.dtype(leaf.dtype).name}, "
                f"which a {array.dtype.name} value {value!r} does not convert to without losing its kind."
            )
        out[h.position] = array.astype(leaf.dtype)
    return out


def set_names(choice: Resolved, target) -> frozenset[str]:
    """The run-record names (`fit`'s `hyperparams` entry) of the injected values a restore was
    told to set: those of a `hyperparams` dict, or every unscheduled one with `"target"`."""
    if choice == "saved":
        return frozenset()
    injected = _injected(target)
    return frozenset(
        _key(h, injected) for h in injected
        if not h.scheduled and (choice == "target" or h.position in choice)
    )


def check_choice(choice: Any, target, names: tuple[str, ...]) -> Resolved:
    """Raise `CheckpointError` for a bad `hyperparams=` or, with `"target"`, a target without
    values; returns the choice, a dict of values resolved to `{position: value}`."""
    if isinstance(choice, Mapping):
        return _resolve(choice, target)
    if choice not in ("saved", "target"):
        raise CheckpointError(
            f"Checkpointer.restore(hyperparams=...) must be 'saved', 'target' or a dict of values to set "
            f"({_EXAMPLE}); got {choice!r}."
        )
    if choice == "saved":
        return choice
    abstract = [names[i] for i in hyperparam_positions(target) if not isinstance(target.arrays[i], jax.Array)]
    if abstract:
        raise CheckpointError(
            f"Checkpointer.restore(hyperparams='target') takes the hyperparameters from the target, but the "
            f"target's {abstract} have no values (an abstract target, as abstract_state makes). Pass a real "
            f"target (TrainState.create(model, optimizer, ...)), or name the values to set: {_EXAMPLE}."
        )
    return choice


def _local(x):
    """A host copy of the whole of `x`. A replicated array of a multi-process run gives its local
    copy; one split over several processes (a vector hyperparameter, sharded) is gathered: a
    collective, which every process reaches (`reconcile` runs in each, on the same arrays)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _show(x) -> str:
    value = _local(x)
    return repr(value.item()) if value.size == 1 else np.array2string(value, threshold=6)


def reconcile(target, arrays: tuple, names: tuple[str, ...], choice: Resolved, where: str) -> tuple:
    """`arrays` (restored) with the hyperparameters `choice` says: the saved ones (warning where
    a concrete target holds others), the target's, or (a dict) the saved ones with those named
    set to the given values, each placed as the restored array is."""
    chosen = choice if isinstance(choice, dict) else {}
    differ = []
    for i in hyperparam_positions(target):
        mine = target.arrays[i]
        if i not in chosen and isinstance(mine, jax.Array) and not np.array_equal(_local(arrays[i]), _local(mine)):
            differ.append(i)
    out = list(arrays)
    for i, value in chosen.items():
        out[i] = jax.device_put(value, arrays[i].sharding)
    if not differ:
        return tuple(out)
    lines = [f"{names[i]}: saved {_show(arrays[i])}, target {_show(target.arrays[i])}" for i in differ]
    if choice != "target":
        warnings.warn(
            f"{where}: the restore target's optax.inject_hyperparams values differ from the saved ones "
            f"in {len(differ)} hyperparameter(s):\n" + list_items(lines) + "\nThe restored state keeps the saved values "
            "(the run goes on as it was). To train on with the target's, restore with "
            f"hyperparams='target'; to set some, name them: {_EXAMPLE}.",
            stacklevel=user_stacklevel(),
        )
        return tuple(out)
    for i in differ:
        out[i] = jax.device_put(target.arrays[i], arrays[i].sharding, may_alias=False)
    return tuple(out)
