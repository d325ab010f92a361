"""`abstract_state`: the shape of a `TrainState` without allocating it, as a restore target."""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding
from jax.tree_util import keystr

from .._errors import ConfigError
from ..train import Precision, TrainState
from ._config import is_config


def _is_leaf_array(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct | np.ndarray)


def _is_builder_module(x: Any, key_impl: Any = None) -> bool:
    """Whether the Equinox module `x` is a function that builds a model rather than a model: an
    `eqx.Partial` (a function with some arguments bound, arrays among them maybe), or a module
    whose `__call__` requires `key` and nothing else (`__call__(self, key)`), unless what it
    returns is arrays only (an array, or a tuple of arrays): that is a generative model drawing
    a sample. A model's `__call__` requires its input (`__call__(self, x, *, key=None)`, or
    `key` required too). The return is found by tracing the call as the build would make it
    (`jax.eval_shape`, with a key of `key_impl`; nothing computed, though a builder's Python
    code runs once more); a call that fails there is taken for a builder's, whose own error the
    build then raises."""
    if isinstance(x, eqx.Partial):
        return True
    try:
        params = inspect.signature(x).parameters
    except (TypeError, ValueError):
        return False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    required = [name for name, p in params.items() if p.default is inspect.Parameter.empty and p.kind not in variadic]
    if required != ["key"]:
        return False
    call = (lambda k: x(key=k)) if _key_by_name(x) else x
    try:
        out = eqx.filter_eval_shape(call, jax.random.key(0, impl=key_impl))
    except Exception:
        return True
    sample = isinstance(out, jax.ShapeDtypeStruct) or (
        isinstance(out, tuple) and len(out) > 0 and all(isinstance(o, jax.ShapeDtypeStruct) for o in out)
    )
    return not sample


def _is_model(x: Any, key_impl: Any = None) -> bool:
    """Whether `x` is a model rather than a function that builds one: an Equinox module holding
    arrays (real or `jax.ShapeDtypeStruct`s) that is not a builder (`_is_builder_module`). A
    module is callable, so without this test a model passed where a builder belongs would be
    called with the key as its input."""
    return (
        isinstance(x, eqx.Module)
        and any(_is_leaf_array(leaf) for leaf in jax.tree.leaves(x))
        and not _is_builder_module(x, key_impl)
    )


def _key_by_name(fn: Callable[..., Any]) -> bool:
    """Whether `fn` takes its key as the keyword-only `key=` (Equinox's convention for a
    module's constructor: `abstract_state(MyModel, optimizer)`) rather than positionally. An
    `eqx.Partial` is asked about the function it wraps (its own signature is `*args, **kwargs`)."""
    if isinstance(fn, eqx.Partial):
        fn = fn.func
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
      arrays' shapes, dtypes and shardings are used (nothing is copied). An Equinox module
      holding arrays is read as a model, unless it is an `eqx.Partial` or its `__call__`
      requires `key` and nothing else (`__call__(self, key)`): those are builders, called with
      the key, whatever arrays they hold; but a `__call__(self, key)` that returns arrays only
      (an array or a tuple of arrays: a generative model's sample) leaves the module a model.
    - `optimizer`: the optax transformation of the run.
    - `trainable`, `precision`: as in [`eqzoo.train.TrainState.create`][].
    - `key_impl`: the PRNG implementation of the run's key (default JAX's default).
    - `**overrides`: config fields to replace, with a config or preset name only.

    **Returns:** an abstract `TrainState`, ready for [`eqzoo.checkpoint.Checkpointer.restore`][].
    From a model whose arrays carry shardings (a sharded model, or `jax.ShapeDtypeStruct`s
    with `sharding=`), its leaves carry them too, so the restore places each array as the
    model had it: the model's own leaves as they were, an optimizer-state leaf as its
    parameter (Adam's moments), the step, the key and the other leaves replicated over the
    first sharded array's mesh. Otherwise give its leaves shardings
    (`jax.ShapeDtypeStruct(..., sharding=...)`) or pass `shardings=` to `restore` to restore
    onto a mesh.
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
                f"with a {'model' if _is_model(model, key_impl) else 'function'} build the model you want instead."
            )
        if _is_model(model, key_impl) or (isinstance(model, tuple) and len(model) == 2 and _is_model(model[0], key_impl)):
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
    shapes only, so neither they nor the optimizer state are computed or copied. The shardings
    its arrays carry are kept (`_with_shardings`)."""
    dynamic, static = eqx.partition(given, _is_leaf_array, is_leaf=_is_leaf_array)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dynamic)

    def build(arrays, k) -> TrainState:
        out = eqx.combine(arrays, static)
        m, model_state = out if isinstance(out, tuple) else (out, None)
        return TrainState.create(m, optimizer, key=k, model_state=model_state, trainable=trainable, precision=precision)

    state = jax.eval_shape(build, shapes, jax.random.key(0, impl=key_impl))
    return _with_shardings(state, given, dynamic)


def _sharding_of(x: Any) -> Sharding | None:
    """The sharding `x` carries: a concrete `jax.Array`'s, a `jax.ShapeDtypeStruct`'s (or `None`);
    a NumPy array or a traced value has none."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array | jax.ShapeDtypeStruct):
        return None
    return x.sharding


def _replicated(sharding: Sharding) -> Sharding | None:
    """A sharding that places a whole array on `sharding`'s devices, in their default memory (for
    the step, the key and optimizer scalars: a first leaf offloaded to host memory does not take
    them along), or `None` when there is no such obvious choice."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if len(sharding.device_set) == 1:
        return SingleDeviceSharding(next(iter(sharding.device_set)))
    return None


def _with_shardings(state: TrainState, given: Any, dynamic: Any) -> TrainState:
    """`state` (abstract) with the shardings of `given`'s arrays (a model or `(model,
    model_state)`), so that a checkpoint restores into the layout the model had: each model
    (and model state) leaf gets its own array's; an optimizer-state leaf, the sharding of the
    parameter whose path ends its own and whose shape it has (Adam's `mu` and `nu`); the step,
    the key, the other optimizer leaves and any model leaf without a sharding of its own (a
    NumPy array), the first sharded leaf's devices, replicated. Unchanged when no array of
    `given` carries a sharding."""
    flat = jax.tree_util.tree_flatten_with_path(dynamic)[0]
    own = {}  # (part, key path) -> sharding
    for path, leaf in flat:
        part, rest = ("model", path) if not isinstance(given, tuple) else (("model", "model_state")[path[0].idx], path[1:])
        own[part, keystr(rest)] = _sharding_of(leaf)
    first = next((s for s in own.values() if s is not None), None)
    if first is None:
        return state
    default = _replicated(first)
    parts = eqx.filter(state.parts(), lambda x: isinstance(x, jax.ShapeDtypeStruct))
    leaves = jax.tree_util.tree_flatten_with_path(parts)[0]
    params = {  # a parameter's path -> (shape, sharding)
        keystr(path[1:]): (leaf.shape, own.get(("model", keystr(path[1:]))))
        for path, leaf in leaves if path[0].name == "model"
    }
    out = []
    for path, leaf in leaves:
        part, rest = path[0].name, path[1:]
        sharding = own.get((part, keystr(rest))) if part in ("model", "model_state") else None
        if part == "opt_state":
            for i in range(len(rest)):
                shape, found = params.get(keystr(rest[i:]), (None, None))
                if found is not None and shape == leaf.shape:
                    sharding = found
                    break
        sharding = sharding or default
        out.append(leaf if sharding is None else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return jax.tree.unflatten(jax.tree.structure(state), out)  # the parts' leaves are its arrays, in order
