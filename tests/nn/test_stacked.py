"""`Stacked`: scan equals the unrolled loop and a Python loop over its layers; every remat policy
gives the loss and gradients of no remat."""

import functools
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError
from eqzoo.nn import (
    MLP,
    REMAT_POLICIES,
    Attention,
    RMSNorm,
    Stacked,
    TransformerBlock,
    remat_policy,
)
from eqzoo.nn._stacked import eager_mode

LAYER_TOL = 1e-5  # fp32
EMBED, SEQ, DEPTH = 32, 8, 3


def _block(key):
    ka, km = jax.random.split(key)
    return TransformerBlock(
        RMSNorm(EMBED), Attention(EMBED, 4, num_kv_heads=2, init_std=0.2, key=ka),
        RMSNorm(EMBED), MLP(EMBED, 2 * EMBED, init_std=0.2, key=km),
    )


@functools.cache  # modules are immutable values: build each variant once
def _stack(remat="none", scan=True):
    return Stacked(_block, DEPTH, remat=remat, scan=scan, key=jax.random.key(0))


X = jax.random.normal(jax.random.key(1), (SEQ, EMBED))
call = eqx.filter_jit(lambda m, x: m(x))


@pytest.fixture(scope="module")
def scanned_output():
    return call(_stack(), X)


def test_scan_equals_unrolled_and_python_loop(scanned_output):
    stack = _stack()
    assert len(stack) == DEPTH
    unrolled = call(_stack(scan=False), X)
    np.testing.assert_allclose(scanned_output, unrolled, atol=LAYER_TOL, rtol=LAYER_TOL)

    @eqx.filter_jit
    def loop(stack, x):
        for i in range(len(stack)):
            x = stack[i](x)
        return x

    np.testing.assert_allclose(scanned_output, loop(stack, X), atol=LAYER_TOL, rtol=LAYER_TOL)
    # the layers really differ (distinct keys), so the order matters
    assert not np.allclose(stack[0].attn.q_proj.weight, stack[1].attn.q_proj.weight)


def test_from_layers_stacks_separate_layers(scanned_output):
    stack = _stack()
    rebuilt = Stacked.from_layers([stack[i] for i in range(DEPTH)])
    np.testing.assert_array_equal(call(rebuilt, X), scanned_output)


def test_from_layers_rejects_different_structures():
    small = TransformerBlock(
        RMSNorm(EMBED), Attention(EMBED, 2, key=jax.random.key(0)), RMSNorm(EMBED),
        MLP(EMBED, EMBED, key=jax.random.key(1)),
    )
    with pytest.raises(ConfigError, match="layers must share structure and static fields"):
        Stacked.from_layers([_block(jax.random.key(0)), small])


def _loss(stack, x):
    return jnp.mean(jnp.square(stack(x)))


loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss))


@pytest.fixture(scope="module")
def no_remat():
    return loss_and_grad(_stack(), X)


def _has_remat(stack) -> bool:
    jaxpr = jax.make_jaxpr(lambda s, x: eqx.filter_grad(_loss)(s, x))(stack, X)
    return "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_gives_identical_loss_and_grads(policy, no_remat):
    loss0, grads0 = no_remat
    stack = _stack(remat=policy)
    loss, grads = loss_and_grad(stack, X)
    # Rematerialisation recomputes the same operations; only fp32 rounding (fused differently)
    # may differ: 1e-6 on the loss, 1e-5 of each gradient leaf's largest entry.
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(g, g0, rtol=0, atol=LAYER_TOL * float(jnp.max(jnp.abs(g0))))


def test_remat_is_applied_only_when_asked():
    assert not _has_remat(_stack("none"))
    assert _has_remat(_stack("full"))
    # unrolled layers with remat (prevent_cse path) agree with the scanned ones
    loss_u, _ = loss_and_grad(_stack(remat="full", scan=False), X)
    loss_s, _ = loss_and_grad(_stack(remat="none"), X)
    np.testing.assert_allclose(loss_u, loss_s, rtol=1e-6)


def test_stacked_config_errors():
    with pytest.raises(ConfigError, match=r"unknown remat policy 'most'; choose one of \['dots'"):
        remat_policy("most")
    with pytest.raises(ConfigError, match="Stacked: num_layers must be a positive integer; got num_layers=0"):
        Stacked(_block, 0, key=jax.random.key(0))


def test_scan_auto_resolves_per_backend(scanned_output):
    from eqzoo.nn import SCAN_DEFAULTS, resolve_scan

    assert resolve_scan(True, "gpu") is True and resolve_scan(False, "cpu") is False
    for backend, want in SCAN_DEFAULTS.items():
        assert resolve_scan("auto", backend) is want
    assert resolve_scan("auto", "some-new-backend") is True
    # "auto" builds the same parameters and computes the same function
    np.testing.assert_allclose(call(_stack(scan="auto"), X), scanned_output, atol=LAYER_TOL, rtol=LAYER_TOL)
    with pytest.raises(ConfigError, match="scan must be True, False or 'auto', got 'yes'"):
        _stack(scan="yes")


def test_model_configs_reject_bad_scan_layers():
    from eqzoo import models

    with pytest.raises(ConfigError, match="GPT2Config: scan_layers must be True, False or 'auto', got 'sometimes'"):
        models.get_config("tiny-gpt2", scan_layers="sometimes")
    with pytest.raises(ConfigError, match="LlamaConfig: scan_layers must be True, False or 'auto', got 'never'"):
        models.get_config("tiny-llama", scan_layers="never")


def test_unstacked_holds_each_layer_and_computes_the_same(scanned_output):
    stack = _stack()
    flat = stack.unstacked()
    assert isinstance(flat.layers, tuple) and len(flat.layers) == len(stack) == DEPTH
    assert flat.unstacked() is flat
    for i in range(DEPTH):
        for a, b in zip(jax.tree.leaves(flat[i]), jax.tree.leaves(stack[i]), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(call(flat, X), scanned_output, atol=LAYER_TOL, rtol=LAYER_TOL)
    # and under remat, through the same checkpointed layer body as the stacked layers
    remat_flat = _stack(remat="full").unstacked()
    np.testing.assert_allclose(call(remat_flat, X), scanned_output, atol=LAYER_TOL, rtol=LAYER_TOL)


def _dense_stack(stack, x):
    # a new closure on every call, as a model's forward passes one to `apply`
    return stack.apply(lambda layer, h, _: (jnp.tanh(h @ layer.weight.T + layer.bias), None), x)[0]


def test_eager_calls_loop_over_layers_and_compile_nothing_new(compile_log):
    # Eagerly, a scan of each call's new closure compiled again on every call; the stack now loops
    # over its layers op by op, so a second call reuses every program: forward (remat "full"
    # dropped) and eager grad (remat kept). Under jit it still scans. Tolerance LAYER_TOL (fp32):
    # op-by-op rounding against the fused, jitted scan. (Linear layers: few ops to compile.)
    stack = Stacked(lambda k: eqx.nn.Linear(EMBED, EMBED, key=k), DEPTH, remat="full", key=jax.random.key(2))
    assert "scan" in str(jax.make_jaxpr(_dense_stack)(stack, X))
    loss = lambda s, x: jnp.mean(jnp.square(_dense_stack(s, x)))  # noqa: E731
    value_and_grad = eqx.filter_value_and_grad(loss)
    _dense_stack(stack, X), value_and_grad(stack, X)  # first eager calls: compile each operation once
    with compile_log() as log:
        out = _dense_stack(stack, X)
        value, grads = value_and_grad(stack, X)
    assert log.compiled == []
    np.testing.assert_allclose(out, eqx.filter_jit(_dense_stack)(stack, X), atol=LAYER_TOL, rtol=LAYER_TOL)
    value0, grads0 = eqx.filter_jit(value_and_grad)(stack, X)
    np.testing.assert_allclose(value, value0, rtol=LAYER_TOL)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(g, g0, rtol=0, atol=LAYER_TOL * float(jnp.max(jnp.abs(g0))))


def test_eager_mode_reads_the_transformations_in_progress(compile_log):
    # The classification itself (the compile-count test above cannot see eager_grad vs eager:
    # an eager checkpoint compiles nothing either way), and a layer with a lax.cond keeps the
    # scan eagerly: one compile per call, where op by op its cond compiled once per layer.
    seen = []

    def probe(x):
        seen.append(eager_mode(x))
        return x

    x = jnp.ones(2)
    probe(x)
    jax.vmap(probe)(jnp.ones((2, 2)))
    jax.grad(lambda v: probe(v).sum())(x)
    jax.jvp(probe, (x,), (x,))
    jax.linearize(probe, x)
    assert seen == ["eager", "eager", "eager_grad", "eager_grad", "eager_grad"]
    seen.clear()
    jax.make_jaxpr(probe)(x)
    jax.make_jaxpr(jax.vmap(probe))(jnp.ones((2, 2)))
    jax.make_jaxpr(jax.grad(lambda v: probe(v).sum()))(x)
    jax.make_jaxpr(lambda v: jax.checkpoint(probe)(v))(x)
    jax.lax.cond(True, probe, lambda v: v, x)
    eqx.filter_eval_shape(probe, x)
    assert seen == ["staged"] * 6

    def branchy(stack, h):
        step = lambda layer, c, _: (jax.lax.cond(c[0] > 0, lambda: layer(c), lambda: -layer(c)), None)  # noqa: E731
        return stack.apply(step, h)[0]

    stack = Stacked(lambda k: eqx.nn.Linear(EMBED, EMBED, key=k), DEPTH, key=jax.random.key(3))
    assert "scan" in str(jax.make_jaxpr(branchy)(stack, X[0]))
    branchy(stack, X[0])
    with compile_log() as log:
        out = branchy(stack, X[0])
    assert len(log.compiled) == 1  # the eager scan; op by op it would be DEPTH conds
    np.testing.assert_allclose(out, eqx.filter_jit(branchy)(stack, X[0]), atol=LAYER_TOL, rtol=LAYER_TOL)


def test_indexing_past_the_end_raises_and_iteration_stops():
    # JAX clamps an index past the end: stack[5] was the last layer, and `for layer in stack`
    # (Python iterates by __getitem__ until IndexError) never ended.
    stack = _stack()
    for s in (stack, stack.unstacked()):
        layers = list(itertools.islice(s, DEPTH + 1))  # islice: without the fix, no end
        assert len(layers) == DEPTH
        for i, layer in enumerate(layers):
            assert eqx.tree_equal(layer, stack[i])
        assert eqx.tree_equal(s[-1], stack[DEPTH - 1])
        for i in (DEPTH, -DEPTH - 1):
            with pytest.raises(IndexError, match=rf"Stacked index {i} is out of range for a stack of {DEPTH} layers"):
                s[i]
