"""`TrainState`: everything a training run needs to continue, held as flat arrays.

The state keeps its array leaves in one flat tuple and the tree structure (plus any non-array
leaves) in a static field. A train step therefore dispatches a cached `jax.jit` over a tuple of
arrays and rebuilds the state in O(1) Python work, whatever the number of parameters; the
structured views (`state.model`, `state.opt_state`, ...) are rebuilt on access.
"""

import warnings
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PyTree

from .._errors import ConfigError, user_stacklevel
from .._typing import PRNGKey
from ._precision import DynamicLossScale, Precision, check_precision


class StateParts(NamedTuple):
    """The structured contents of a [`eqzoo.train.TrainState`][]."""

    model: PyTree
    opt_state: PyTree
    step: Int[Array, ""]
    key: PRNGKey
    model_state: PyTree


class Structure:
    """How to rebuild `StateParts` from the flat arrays: a treedef plus the non-array leaves.

    Compared by identity, so every state produced by the same step shares it and the compiled
    step is looked up without touching the arrays.
    """

    __slots__ = ("treedef", "static", "trainable")

    def __init__(self, treedef, static, trainable):
        self.treedef = treedef
        self.static = static
        self.trainable = trainable

    def unflatten(self, arrays) -> StateParts:
        return eqx.combine(jax.tree.unflatten(self.treedef, arrays), self.static)

    def __repr__(self) -> str:
        return f"Structure(num_arrays={self.treedef.num_leaves})"


def _flatten(parts: StateParts, trainable) -> tuple[tuple[Array, ...], Structure]:
    dynamic, static = eqx.partition(parts, eqx.is_array)
    arrays, treedef = jax.tree.flatten(dynamic)
    return tuple(arrays), Structure(treedef, static, trainable)


class TrainState(eqx.Module):
    """Model, optimizer state, step counter, PRNG key and (optional) model state.

    Build it with [`eqzoo.train.TrainState.create`][]; read `state.model`, `state.opt_state`,
    `state.step`, `state.key`, `state.model_state`; change parts with `state.replace(...)`.
    """

    arrays: tuple[Array, ...]
    structure: Structure = eqx.field(static=True)

    @classmethod
    def create(
        cls,
        model: PyTree,
        optimizer: optax.GradientTransformation,
        *,
        key: PRNGKey,
        model_state: PyTree = None,
        trainable: Any = eqx.is_inexact_array,
        precision: Precision | None = None,
    ) -> "TrainState":
        """A fresh state at step 0.

        **Arguments:**

        - `model`: the model (any Equinox module / pytree). For a stateful preset, unpack what
          `eqzoo.models.create` returns: the model here, its state as `model_state=`.
        - `optimizer`: an optax transformation; initialised on the trainable leaves.
        - `key`: a typed PRNG key (`jax.random.key(seed)`), split each step for the loss.
        - `model_state`: optional `eqx.nn.State` (BatchNorm statistics) for stateful models.
        - `trainable`: an `eqx.partition` filter (a callable or a pytree of bools) choosing the
          leaves that receive gradients; the others stay fixed. Default: every float array.
        - `precision`: the [`eqzoo.train.Precision`][] the train step will use. The trainable
          floating-point leaves are cast to its `param_dtype` (the others, a frozen base
          model say, are kept as they are), and with dynamic loss scaling the optimizer state
          also holds the loss scale.

        **Returns:** the `TrainState`. It holds `model`'s arrays and `key` themselves, not
        copies: a train step that donates (the default) frees the trainable ones at its first
        call, so go on with `state.model`, or pass `jax.tree.map(jnp.copy, model)` to keep the
        original. Arrays the `trainable` filter leaves out (a frozen base) are not donated: the
        new states share them.
        """
        if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
            raise ConfigError(
                "TrainState.create needs a typed PRNG key; make one with jax.random.key(seed) "
                "(not the legacy jax.random.PRNGKey)."
            )
        if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], eqx.nn.State):
            # the pair was taken as the model, and the step failed calling it ("Expected a
            # callable value, got (CNN(...), State(...))", hundreds of lines long)
            raise ConfigError(
                f"TrainState.create: got a (model, model_state) pair ({type(model[0]).__name__}, "
                f"State), what eqzoo.models.create returns for a stateful model (BatchNorm). Unpack "
                f"it: model, model_state = models.create(...); TrainState.create(model, optimizer, "
                f"key=key, model_state=model_state), with a loss that takes and returns the "
                f"model_state."
            )
        if precision is not None:
            check_precision(precision, "TrainState.create")
            params, frozen = eqx.partition(model, trainable)
            want = jnp.dtype(precision.param_dtype)
            wider = {x.dtype.name for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < want.itemsize}
            if wider:
                warnings.warn(
                    f"TrainState.create: the trainable {sorted(wider)} parameters are cast to {want.name}, "
                    f"precision.param_dtype (master weights: their memory and the optimizer's grow with "
                    f"it). To keep them as they are, pass Precision(param_dtype={sorted(wider)[0]!r}, ...).",
                    stacklevel=user_stacklevel(),
                )
            model = eqx.combine(precision.cast_to_param(params), frozen)
        params = eqx.filter(model, trainable)
        opt_state = optimizer.init(params)
        if precision is not None and precision.loss_scale == "dynamic":
            opt_state = (opt_state, DynamicLossScale.init())
        parts = StateParts(model, opt_state, jnp.zeros((), jnp.int32), key, model_state)
        return cls.from_parts(parts, trainable=trainable)

    @classmethod
    def from_parts(cls, parts: StateParts, *, trainable: Any = eqx.is_inexact_array) -> "TrainState":
        """Build a state from its structured parts (for example after restoring a checkpoint)."""
        arrays, structure = _flatten(StateParts(*parts), trainable)
        return cls(arrays, structure)

    def parts(self) -> StateParts:
        """The structured contents as a [`eqzoo.train.StateParts`][] named tuple."""
        return self.structure.unflatten(self.arrays)

    @property
    def model(self) -> PyTree:
        """The model."""
        return self.parts().model

    @property
    def opt_state(self) -> PyTree:
        """The optimizer state."""
        return self.parts().opt_state

    @property
    def step(self) -> Int[Array, ""]:
        """The number of optimizer steps taken (an int32 scalar array)."""
        return self.parts().step

    @property
    def key(self) -> PRNGKey:
        """The PRNG key the next step will split."""
        return self.parts().key

    @property
    def model_state(self) -> PyTree:
        """The model's `eqx.nn.State`, or `None`."""
        return self.parts().model_state

    def replace(self, **changes: Any) -> "TrainState":
        """A copy with some parts replaced, e.g. `state.replace(model=new_model)`."""
        unknown = set(changes) - set(StateParts._fields)
        if unknown:
            raise ConfigError(f"TrainState has no part(s) {sorted(unknown)}; parts are {list(StateParts._fields)}.")
        parts = self.parts()._replace(**changes)
        return type(self).from_parts(parts, trainable=self.structure.trainable)

    def _with_arrays(self, arrays: tuple[Array, ...]) -> "TrainState":
        # O(1): same structure, new arrays (what a compiled step returns).
        new = object.__new__(type(self))
        object.__setattr__(new, "arrays", arrays)
        object.__setattr__(new, "structure", self.structure)
        return new
