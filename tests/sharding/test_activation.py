"""Activation constraints: mesh-agnostic model code, constrained only inside activation_sharding."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eqzoo import sharding as sh


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 8))
    assert sh.constrain(x, "residual") is x
    mesh = sh.make_mesh("data=8")
    with sh.activation_sharding(mesh), sh.activation_sharding(None):
        assert sh.constrain(x, "residual") is x
    with sh.activation_sharding(mesh):
        assert sh.constrain(x, "not-a-rule") is x


def test_constraint_applies_at_trace_time_and_leaves_the_vmapped_batch_axis_free():
    mesh = sh.make_mesh("data=2,tensor=4")
    x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P(None, "tensor")))

    def f(x):
        return sh.constrain(x * 2.0, "residual")

    assert jax.jit(f)(x).sharding.spec == P(None, "tensor")  # no context: propagated as is
    with sh.activation_sharding(mesh):
        # Read while tracing: a function already compiled keeps what it was traced with.
        assert jax.jit(f)(x).sharding.spec == P(None, "tensor")
        out = jax.jit(lambda x: f(x))(x)
        assert out.sharding.is_fully_replicated  # "residual" is (seq, embed) -> P(None, None)
        batched = jax.device_put(jnp.ones((4, 8, 8)), NamedSharding(mesh, P("data", None, "tensor")))
        y = jax.jit(jax.vmap(f))(batched)
    assert y.sharding.spec[0] == "data" and y.sharding.spec[1:] in ((), (None,), (None, None))
    with sh.activation_sharding(mesh, {"residual": P(None, "tensor")}):
        assert jax.jit(lambda x: f(x))(jnp.ones((8, 8))).sharding.spec == P(None, "tensor")


def test_bad_activation_rules():
    mesh = sh.make_mesh("data=8")
    with pytest.raises(sh.ShardingError, match=r"activation rule 'residual' uses mesh axis 'model'"):
        with sh.activation_sharding(mesh, {"residual": P(None, "model")}):
            pass
