"""Building a model in one compiled program that draws exactly the eager initialisation's bits."""

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ..perf._xla_flags import EAGER_EXACT_OPTIONS
from ._cnn import CNNConfig
from ._dit import DiTConfig
from ._gemma import GemmaConfig
from ._gpt2 import GPT2Config
from ._llama import LlamaConfig
from ._mixtral import MixtralConfig
from ._mlp import MLPConfig
from ._unet import UNetConfig
from ._vit import ViTConfig

_SCHEDULE = ("remat", "attention_backend")
_INIT_FREE: dict[type, frozenset[str]] = {
    GPT2Config: frozenset({*_SCHEDULE, "layer_norm_eps"}),
    LlamaConfig: frozenset({*_SCHEDULE, "rms_norm_eps", "rope_theta", "rope_scaling", "sliding_window"}),
    GemmaConfig: frozenset({
        *_SCHEDULE, "rms_norm_eps", "rope_theta", "rope_scaling", "local_rope_theta", "sliding_window",
        "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "activation",
    }),
    MixtralConfig: frozenset({
        *_SCHEDULE, "rms_norm_eps", "rope_theta", "rope_scaling", "sliding_window", "router_aux_loss_coef",
        "router_z_loss_coef", "moe_implementation", "moe_capacity_factor", "normalize_router_weights",
    }),
    MLPConfig: frozenset({"activation"}),
    CNNConfig: frozenset(),
    ViTConfig: frozenset({*_SCHEDULE, "layer_norm_eps"}),
    DiTConfig: frozenset({*_SCHEDULE, "layer_norm_eps"}),
    UNetConfig: frozenset({"attention_backend"}),
}
"""Per config class, the fields that cannot change a model's arrays (norm epsilons, rotary
bases, remat policy, attention backend, ...): configs that differ only in these share one
compiled program. tests/models/test_presets_contract.py checks each declared field by tracing
the build with two values and comparing the programs; a field not declared here is assumed to
matter (costing at worst a compile)."""

CACHE_SIZE = 16
"""How many compiled build programs `compiled_build` keeps (least recently used dropped first).
They hold programs only, never arrays."""

_PROGRAMS: collections.OrderedDict[Any, Callable] = collections.OrderedDict()


def _hashable(value: Any) -> Any:
    """`value` with its lists (a config may hold `widths=[16, 32]`) as tuples, for a cache key."""
    if isinstance(value, list | tuple):
        return tuple(map(_hashable, value))
    return value


def _init_key(construct: Callable, config: Any, exact: bool) -> tuple | None:
    """What determines a config's arrays: the constructor, the config's class and every field
    not declared init-free; `None` if a field's value cannot be hashed (no program is kept)."""
    free = frozenset() if exact else _INIT_FREE.get(type(config), frozenset())
    fields = tuple((f.name, _hashable(getattr(config, f.name))) for f in dataclasses.fields(config) if f.name not in free)
    key = (construct, type(config), exact, fields)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _program(construct: Callable[[Any, Any], Any], config: Any, *, exact: bool = False) -> Callable:
    """The cached compiled build of `config` (built from the first config seen with the same
    init key): a function from the key to the list of the model's array leaves. A config with
    an unhashable field gets a program of its own, not kept."""
    cache_key = _init_key(construct, config, exact)
    program = None if cache_key is None else _PROGRAMS.get(cache_key)
    if program is None:
        def arrays(key):
            return [x for x in jax.tree.leaves(construct(config, key)) if eqx.is_array(x)]

        arrays.__name__ = f"create_{type(config).__name__}"
        program = jax.jit(arrays, compiler_options=EAGER_EXACT_OPTIONS)
        if cache_key is None:
            return program
        _PROGRAMS[cache_key] = program
        while len(_PROGRAMS) > CACHE_SIZE:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(cache_key)
    return program


def _typed(key: Any) -> Any:
    """A raw `uint32` key as the typed key it stands for (the same draws), so that both kinds
    share one program; anything else as it is (eager building reports what is wrong with it)."""
    dtype = getattr(key, "dtype", None)
    if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    try:
        return jax.random.wrap_key_data(key)
    except (TypeError, ValueError):
        return key


def compiled_build(construct: Callable[[Any, Any], Any], config: Any, key: Any) -> Any:
    """`construct(config, key)` computed by one compiled program, with the same arrays, bit for
    bit, as calling it eagerly.

    The pytree (static fields, non-array leaves) comes from tracing `construct` for shapes only;
    the arrays from a cached program shared by every config that differs only in init-free
    fields. Should a shared program's outputs not fit this config's shapes, the config gets a
    program of its own.
    """
    key = _typed(key)
    abstract = eqx.filter_eval_shape(construct, config, key)
    leaves, treedef = jax.tree.flatten(abstract)
    where = [i for i, x in enumerate(leaves) if isinstance(x, jax.ShapeDtypeStruct)]
    want = [(leaves[i].shape, leaves[i].dtype) for i in where]
    arrays = _program(construct, config)(key)
    if [(a.shape, a.dtype) for a in arrays] != want:  # an init-free declaration too wide
        arrays = _program(construct, config, exact=True)(key)
    for i, a in zip(where, arrays, strict=True):
        leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)
