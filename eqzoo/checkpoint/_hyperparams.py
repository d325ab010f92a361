"""The numeric hyperparameters of `optax.inject_hyperparams` optimizers in a restored state:
found by position, compared with a concrete restore target's, and taken from one or the other."""

import warnings
from typing import Any, Literal

import jax
import numpy as np

from .._errors import user_stacklevel
from ._errors import CheckpointError, list_items

HyperparamsChoice = Literal["saved", "target"]


def _is_injected(x: Any) -> bool:
    # optax's InjectHyperparamsState / InjectStatefulHyperparamsState (NamedTuples)
    return isinstance(x, tuple) and isinstance(getattr(x, "hyperparams", None), dict) and hasattr(x, "inner_state")


def hyperparam_positions(state) -> tuple[int, ...]:
    """The positions in `state.arrays` of the numeric hyperparameters of every
    `optax.inject_hyperparams` state in the optimizer state. Scheduled ones are left out: the
    optimizer recomputes them from its step count at every update."""
    indexed = jax.tree.unflatten(state.structure.treedef, range(state.structure.treedef.num_leaves))
    found = []
    for node in jax.tree.leaves(indexed.opt_state, is_leaf=_is_injected):
        if _is_injected(node):
            scheduled = getattr(node, "hyperparams_states", None) or {}
            found += [i for name, i in node.hyperparams.items() if name not in scheduled and isinstance(i, int)]
    return tuple(sorted(found))


def check_choice(choice: Any, target, names: tuple[str, ...]) -> None:
    """Raise `CheckpointError` for a bad `hyperparams=` or, with `"target"`, a target without values."""
    if choice not in ("saved", "target"):
        raise CheckpointError(f"Checkpointer.restore(hyperparams=...) must be 'saved' or 'target'; got {choice!r}.")
    if choice == "saved":
        return
    abstract = [names[i] for i in hyperparam_positions(target) if not isinstance(target.arrays[i], jax.Array)]
    if abstract:
        raise CheckpointError(
            f"Checkpointer.restore(hyperparams='target') takes the hyperparameters from the target, but the "
            f"target's {abstract} have no values (an abstract target, as abstract_state makes). Pass a real "
            "target (TrainState.create(model, optimizer, ...)), or restore the saved ones and set yours: "
            "opt = state.opt_state; opt.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32); "
            "state = state.replace(opt_state=opt)."
        )


def _show(x) -> str:
    value = np.asarray(x)
    return repr(value.item()) if value.size == 1 else np.array2string(value, threshold=6)


def reconcile(target, arrays: tuple, names: tuple[str, ...], choice: HyperparamsChoice, where: str) -> tuple:
    """`arrays` (restored) with the hyperparameters `choice` says: the saved ones (warning where
    a concrete target holds others), or the target's."""
    differ = []
    for i in hyperparam_positions(target):
        mine = target.arrays[i]
        if isinstance(mine, jax.Array) and not np.array_equal(np.asarray(arrays[i]), np.asarray(mine)):
            differ.append(i)
    if not differ:
        return arrays
    lines = [f"{names[i]}: saved {_show(arrays[i])}, target {_show(target.arrays[i])}" for i in differ]
    if choice == "saved":
        warnings.warn(
            f"{where}: the restore target's optax.inject_hyperparams values differ from the saved ones "
            f"in {len(differ)} hyperparameter(s):\n" + list_items(lines) + "\nThe restored state keeps the saved values "
            "(the run goes on as it was). To train on with the target's, restore with "
            "hyperparams='target'.",
            stacklevel=user_stacklevel(),
        )
        return arrays
    out = list(arrays)
    for i in differ:
        out[i] = jax.device_put(target.arrays[i], arrays[i].sharding, may_alias=False)
    return tuple(out)
