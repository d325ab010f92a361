"""`abstract_state`: the shape of a `TrainState` without allocating it, as a restore target."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax

from ..train import Precision, TrainState
from ._config import is_config


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

    - `model`: a model config (e.g. [`eqzoo.models.GPT2Config`][]), a preset name, or a
      function `key -> model` (or `key -> (model, model_state)` for stateful models).
    - `optimizer`: the optax transformation of the run.
    - `trainable`, `precision`: as in [`eqzoo.train.TrainState.create`][].
    - `key_impl`: the PRNG implementation of the run's key (default JAX's default).
    - `**overrides`: config fields to replace, with a config or preset name.

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

    elif callable(model):
        make = model
    else:
        raise TypeError(f"abstract_state takes a config, a preset name or a function key -> model; got {type(model).__name__}.")

    def build(k) -> TrainState:
        out = make(k)
        m, model_state = out if isinstance(out, tuple) else (out, None)
        return TrainState.create(m, optimizer, key=k, model_state=model_state, trainable=trainable, precision=precision)

    maker: Callable[..., Any] = build
    return eqx.filter_eval_shape(maker, jax.random.key(0, impl=key_impl))
