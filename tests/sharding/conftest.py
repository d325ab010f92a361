"""Shared pieces of the sharding tests: tiny models whose sizes divide every mesh axis used,
a fixed batch, and a cache of single-device / sharded losses and gradients so that each
(model, mesh, remat) combination is compiled once per session."""

import contextlib
import functools
import types

import equinox as eqx
import jax
import numpy as np
import pytest

import eqzoo
from eqzoo import sharding as sh
from eqzoo.nn import summed_weight_gradients
from eqzoo.train import lm_loss

# tiny-llama has 4 query / 2 key-value heads; 8 / 4 lets tensor=4 split whole heads, GQA kept.
MODELS = {
    "gpt2": ("tiny-gpt2", {}),
    "llama": ("tiny-llama", {"num_heads": 8, "num_kv_heads": 4}),
    "mixtral": ("tiny-mixtral", {"num_heads": 8, "num_kv_heads": 4}),
    # Gemma 2's layout: windows of 8 on alternate layers (shorter than SEQ), soft caps, sandwich norms.
    "gemma": ("tiny-gemma2", {"num_heads": 8, "num_kv_heads": 4}),
    # The sparse expert implementations; capacity 2.0 = experts / k: nothing dropped.
    "mixtral-ragged": ("tiny-mixtral", {"num_heads": 8, "num_kv_heads": 4, "moe_implementation": "ragged"}),
    "mixtral-capacity": (
        "tiny-mixtral",
        {"num_heads": 8, "num_kv_heads": 4, "moe_implementation": "capacity", "moe_capacity_factor": 2.0},
    ),
}
BATCH, SEQ = 8, 16


def make_model(name: str, **overrides):
    """The tiny model `name` (cached: models are immutable, but do not donate its buffers).

    Not for use inside a trace (`eval_shape`, `jit`): the cache would keep its tracers; use
    `build_model` there."""
    model = _make_model(name, tuple(sorted(overrides.items())))
    assert not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(model)), (
        "make_model was cached under a trace; call build_model inside eval_shape/jit"
    )
    return model


@functools.cache
def _make_model(name: str, overrides: tuple):
    return build_model(name, jax.random.key(0), **dict(overrides))


def build_model(name: str, key, **overrides):
    """A fresh tiny model `name` from `key` (traceable: usable inside `sharded_init`)."""
    preset, base = MODELS[name]
    return eqzoo.models.create(preset, key=key, **{**base, **overrides})


def make_batch(batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(seed).integers(0, 256, (batch, seq + 1)).astype(np.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:]}


def packed_batch() -> dict[str, np.ndarray]:
    """`make_batch()` with three packed documents per row, then padding (segment 0): a document
    that starts inside one context piece ends in another."""
    seg = np.zeros((BATCH, SEQ), np.int32)
    seg[:, :5], seg[:, 5:11], seg[:, 11:14] = 1, 2, 3
    return {**make_batch(), "segment_ids": seg}


def _loss(model, batch):
    return lm_loss(model, batch)[0]


_CACHE: dict = {}
_COMPILED: dict = {}


def _key(name, mesh_spec, remat="none", precision="float32", summed=False, context_attention="gather", packed=False):
    return (name, mesh_spec, remat, precision, summed, context_attention, packed)


def loss_and_grads(
    name: str, mesh_spec: str | None, remat: str = "none", precision: str = "float32", summed: bool = False,
    context_attention: str = "gather", packed: bool = False,
):
    """`(loss, grads, model)` of `lm_loss` on the fixed batch: on one device (`mesh_spec=None`)
    or sharded by the default rules on `make_mesh(mesh_spec)`, with activation constraints.
    `summed`: traced as eqzoo's train step traces its gradient (dropless experts sum their
    weight gradients over the batch in one pass). `context_attention`: as for
    `activation_sharding`; `packed`: the batch of `packed_batch` (documents packed in rows)."""
    key = _key(name, mesh_spec, remat, precision, summed, context_attention, packed)
    if key not in _CACHE:
        model = make_model(name, remat=remat)
        batch = packed_batch() if packed else make_batch()
        mesh = None
        if mesh_spec is not None:
            mesh = sh.make_mesh(mesh_spec)
            model = sh.shard(model, mesh)
            batch = sh.shard_batch(batch, mesh)

        # Optimisation level 0 halves XLA:CPU compile time here; the HLO (and so the order of
        # every sum) is the same.
        @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
        def f(model, batch):
            with sh.activation_sharding(mesh, context_attention=context_attention), (summed_weight_gradients() if summed else contextlib.nullcontext()):
                return eqx.filter_value_and_grad(_loss)(model, batch)

        compiled = f.lower(model, batch).compile()
        loss, grads = compiled(model, batch)
        _CACHE[key] = (loss, grads, model)
        _COMPILED[key] = compiled
    return _CACHE[key]


def compiled_loss_and_grads(name: str, mesh_spec: str | None, **kwargs):
    """The compiled program behind `loss_and_grads(name, mesh_spec, **kwargs)` (to read its HLO,
    e.g. with `eqzoo.perf.collectives`), compiled once with it."""
    loss_and_grads(name, mesh_spec, **kwargs)
    return _COMPILED[_key(name, mesh_spec, **kwargs)]


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of arrays (gathered to the host)."""

    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x, np.float64)

    la, lb = jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(host(x) - host(y)), initial=0.0)) for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="session")
def lab():
    """The helpers above, as one namespace."""
    return types.SimpleNamespace(
        make_model=make_model,
        build_model=build_model,
        make_batch=make_batch,
        packed_batch=packed_batch,
        loss_and_grads=loss_and_grads,
        compiled_loss_and_grads=compiled_loss_and_grads,
        max_abs_diff=max_abs_diff,
        BATCH=BATCH,
        SEQ=SEQ,
    )
