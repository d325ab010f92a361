"""`abstract_state`: the shape of a `TrainState` without allocating it, as a restore target."""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax

from .._errors import ConfigError
from ..train import Precision, TrainState
from ._config import is_config


def _is_leaf_array(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct | np.ndarray)


def _is_model(x: Any) -> bool:
    """Whether `x` is a model rather than a function that builds one: an Equinox module holding
    arrays (real or `jax.ShapeDtypeStruct`s). A module is callable, so without this test a
    model passed where a builder belongs would be called with the key as its input."""
    return isinstance(x, eqx.Module) and any(_is_leaf_array(leaf) for leaf in jax.tree.leaves(x))


def _key_by_name(fn: Callable[..., Any]) -> bool:
    """Whether `fn` takes its key as the keyword-only `key=` (Equinox's convention for a
    module's constructor: `abstract_state(MyModel, optimizer)`) rather than positionally."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    key = params.get("key")
    return key is not None and key.kind is inspect.Parameter.KEYWORD_ONLY


def abstract_state(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    trainable: Any = eqx.is_inexact_array,
    precision: Precision | None = None,
    key_impl: str | None = None,
    **overrides: Any,
) -> TrainState:
    """The `TrainState` that `TrainState.create` would build, with `jax.ShapeDtypeStruct`s for
    arrays, traced with `eqx.filter_eval_shape` (no parameter is initialised, no memory used).

    **Arguments:**

    - `model`: a model config (e.g. [`eqzoo.models.GPT2Config`][]), a preset name, a
      function `key -> model` (or `key -> (model, model_state)` for stateful models; a class
      or function whose `key` is keyword-only, as Equinox modules' are, is called with
      `key=`), or a model itself (or `(model, model_state)`), real or abstract, whose
      arrays' shapes and dtypes are used (nothing is copied).
    - `optimizer`: the optax transformation of the run.
    - `trainable`, `precision`: as in [`eqzoo.train.TrainState.create`][].
    - `key_impl`: the PRNG implementation of the run's key (default JAX's default).
    - `**overrides`: config fields to replace, with a config or preset name only.

    **Returns:** an abstract `TrainState`, ready for [`eqzoo.checkpoint.Checkpointer.restore`][].
    Give its leaves shardings (`jax.ShapeDtypeStruct(..., sharding=...)`) or pass `shardings=`
    to `restore` to restore onto a mesh.
    """
    if isinstance(model, str) or is_config(model):
        from ..models import create
        from ..models._registry import check_buildable

        check_buildable(model)

        config = model

        def make(k):
            return create(config, key=k, **overrides)

    else:
        if overrides:
            raise ConfigError(
                f"abstract_state: config overrides {sorted(overrides)} apply to a config or preset name only; "
                f"with a {'model' if _is_model(model) else 'function'} build the model you want instead."
            )
        if _is_model(model) or (isinstance(model, tuple) and len(model) == 2 and _is_model(model[0])):
            return _from_model(model, optimizer, trainable, precision, key_impl)
        if callable(model):
            make = (lambda k: model(key=k)) if _key_by_name(model) else model
        else:
            raise TypeError(
                "abstract_state takes a config, a preset name, a function key -> model or a model; "
                f"got {type(model).__name__}."
            )

    def build(k) -> TrainState:
        out = make(k)
        m, model_state = out if isinstance(out, tuple) else (out, None)
        return TrainState.create(m, optimizer, key=k, model_state=model_state, trainable=trainable, precision=precision)

    maker: Callable[..., Any] = build
    return eqx.filter_eval_shape(maker, jax.random.key(0, impl=key_impl))


def _from_model(given: Any, optimizer, trainable, precision, key_impl) -> TrainState:
    """`abstract_state` of a model (or `(model, model_state)`): its arrays enter the trace as
    shapes only, so neither they nor the optimizer state are computed or copied."""
    dynamic, static = eqx.partition(given, _is_leaf_array, is_leaf=_is_leaf_array)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dynamic)

    def build(arrays, k) -> TrainState:
        out = eqx.combine(arrays, static)
        m, model_state = out if isinstance(out, tuple) else (out, None)
        return TrainState.create(m, optimizer, key=k, model_state=model_state, trainable=trainable, precision=precision)

    return jax.eval_shape(build, shapes, jax.random.key(0, impl=key_impl))
