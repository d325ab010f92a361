"""What kind of optimizer a step was saved with, read from its optimizer state's structure,
recorded in the step's metadata and compared with the restore target's.

The arrays' names and shapes cannot tell `optax.adam` from `optax.adamw`: weight decay holds no
state, so the two states hold the same arrays. Their structures differ (`adamw`'s chain has one
more `EmptyState`), as do the state types of optimizers whose moments look alike
(`ScaleByAdamState`, `ScaleByBeliefState`). A step records its optimizer state's structure as a
short string of those types, `(ScaleByAdamState, EmptyState, EmptyState)`, with every subtree
that holds only arrays (the moments, counts, hyperparameters) left out.
"""

import functools
from typing import Any

import jax
import optax

from ._errors import CheckpointMismatchError

_SHOWN = 400  # characters of a description a message shows


def _describe(node: Any) -> str:
    """`node`'s optimizer-state types and nesting; `""` for a leaf or a subtree without any."""
    if node is None or isinstance(node, optax.MaskedNode):
        return ""  # a masked parameter's placeholder: which parameters are masked shows in the arrays
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax's states are NamedTuples
        inner = [d for d in (_describe(v) for v in node) if d]
        return type(node).__name__ + (f"({', '.join(inner)})" if inner else "")
    flat = jax.tree_util.default_registry.flatten_one_level(node)
    if flat is None:
        return ""
    children, aux = flat
    parts = [_describe(c) for c in children]
    if not any(parts):
        return ""  # parameters, moments, a loss scale: arrays only
    shown = [p or "·" for p in parts]
    if isinstance(node, dict):
        return "{" + ", ".join(f"{k}: {p}" for k, p in zip(aux, shown, strict=True)) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(shown) + "]"
    if isinstance(node, tuple):
        return "(" + ", ".join(shown) + ")"
    return f"{type(node).__name__}({', '.join(shown)})"


def describe_optimizer(opt_state: Any) -> str:
    """A short description of the optimizer that made `opt_state` (arrays or
    `jax.ShapeDtypeStruct`s): the types of its optax states and how they nest, e.g.
    `(ScaleByAdamState, EmptyState, EmptyState)` for `optax.adamw`; `""` when it holds none."""
    return _describe(opt_state)


@functools.lru_cache(maxsize=64)
def _of_treedef(treedef) -> str:
    return describe_optimizer(jax.tree.unflatten(treedef, [0] * treedef.num_leaves).opt_state)


def state_optimizer(state: Any) -> str:
    """`describe_optimizer` of a `TrainState`'s optimizer state, computed once per structure."""
    return _of_treedef(state.structure.treedef)


@functools.lru_cache(maxsize=1)
def _known() -> tuple[tuple[str, str], ...]:
    # (description, name) of a few common optimizers, as this optax builds them; longest first,
    # so a chain holding adamw's states is named by adamw rather than by adam.
    made = {
        "optax.adam": optax.adam(1e-3),
        "optax.adamw": optax.adamw(1e-3),
        "optax.sgd": optax.sgd(1e-3),
        "optax.sgd(..., momentum=...)": optax.sgd(1e-3, momentum=0.9),
        "optax.lion": optax.lion(1e-3),
        "optax.adafactor": optax.adafactor(1e-3),
        "optax.rmsprop": optax.rmsprop(1e-3),
    }
    params = {"w": jax.ShapeDtypeStruct((2,), "float32")}
    found = {describe_optimizer(jax.eval_shape(opt.init, params)): name for name, opt in made.items()}
    return tuple(sorted(((d, n) for d, n in found.items() if d), key=lambda dn: -len(dn[0])))


def _named(description: str) -> str:
    """`description`, shortened, with the common optax optimizer whose state it holds, if any."""
    shown = description if len(description) <= _SHOWN else description[:_SHOWN] + "..."
    try:
        name = next((n for d, n in _known() if d in description), None)
    except Exception:  # an optax without one of those optimizers: no name, the types still show
        name = None
    return (shown or "<no optax state>") + (f" (holds the state {name} makes)" if name else "")


def check_optimizer(saved: Any, target_state: Any, *, where: str) -> None:
    """Raise `CheckpointMismatchError` naming both when the optimizer state's structure recorded
    at save time (`saved`, `describe_optimizer`'s string) differs from the target's. Nothing to
    compare for a step written before it was recorded (`saved` is `None`)."""
    if not isinstance(saved, str):
        return
    mine = state_optimizer(target_state)
    if saved == mine:
        return
    raise CheckpointMismatchError(
        f"{where} was saved with another optimizer than the restore target's. Every array fits, "
        "but the optimizer states are built of other transformations (weight decay and "
        "masks hold no arrays), so training would go on with the target's "
        f"optimizer:\n  saved:  {_named(saved)}\n  target: {_named(mine)}\n"
        "Build the target with the saved run's optimizer (abstract_state(config, optimizer)), or "
        "pass allow_optimizer_change=True to restore the saved moments into the target's "
        "optimizer on purpose."
    )
