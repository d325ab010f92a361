"""Activation constraints: mesh-agnostic model code, constrained only inside activation_sharding."""

import jax
import jax.numpy as jnp
import numpy as np
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


def _lead(x):
    spec = x.sharding.spec
    return spec[0] if len(spec) else None


def test_batch_vmap_pins_the_batch_axis_to_the_mesh_batch_axes():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    x = jax.device_put(jnp.arange(512.0).reshape(8, 8, 8), NamedSharding(mesh, P(None, None, "tensor")))

    def f(x):
        return sh.constrain(x * 2.0, "residual")

    with sh.activation_sharding(mesh):
        pinned = jax.jit(sh.batch_vmap(f))(x)
        free = jax.jit(jax.vmap(f))(x)
    assert _lead(pinned) == ("data", "fsdp")  # the constraint now covers the batch
    assert (pinned == free).all() and (pinned == 2.0 * x).all()
    # Outside activation_sharding, or on a mesh with no batch axis, it is plain jax.vmap.
    assert (jax.jit(sh.batch_vmap(f))(x) == 2.0 * x).all()
    with sh.activation_sharding(sh.make_mesh("tensor=8")):
        assert _lead(jax.jit(sh.batch_vmap(f))(x)) is None
    assert sh.batch_axes(mesh) == ("data", "fsdp") and sh.batch_axes(sh.make_mesh("fsdp=8")) == ("fsdp",)


def test_batch_vmap_takes_vmap_axes():
    mesh = sh.make_mesh("data=8")
    w, xs = jnp.arange(4.0), jnp.ones((8, 4))
    with sh.activation_sharding(mesh):
        out = jax.jit(sh.batch_vmap(lambda w, x: (w * x).sum(), in_axes=(None, 0)))(w, xs)
    assert out.shape == (8,) and (out == 6.0).all()


def test_a_rule_that_does_not_divide_a_dimension_leaves_it_to_xla():
    from eqzoo.sharding._activation import _fitting

    mesh = sh.make_mesh("data=2,tensor=4")
    assert _fitting(P("tensor", None), (8, 4), mesh) == P("tensor", None)
    assert _fitting(P("tensor", None), (6, 4), mesh) == P(P.UNCONSTRAINED, None)  # 6 % 4 != 0
    assert _fitting(P(("data", "tensor")), (4, 3), mesh) == P(P.UNCONSTRAINED, None)
    with sh.activation_sharding(mesh, {"vocab_table": P("tensor", None)}):
        odd = jax.jit(lambda t: sh.constrain(t * 1.0, "vocab_table"))(jnp.ones((6, 4)))
    assert odd.shape == (6, 4) and (odd == 1.0).all()


def _constraints(jaxpr) -> int:
    return str(jaxpr).count("sharding_constraint")


def test_forward_only_constraint_constrains_the_value_not_its_tangent():
    from eqzoo.sharding._activation import constrain_forward

    mesh = sh.make_mesh("tensor=8")
    table = jnp.arange(64.0).reshape(8, 8)

    def loss(constrain_fn):
        return lambda t: (constrain_fn(t, "vocab_table") ** 2).sum()

    with sh.activation_sharding(mesh):
        # A plain constraint also constrains the gradient (its transpose); the forward-only one
        # leaves only the forward constraint in the gradient's program.
        both = _constraints(jax.make_jaxpr(jax.grad(loss(sh.constrain)))(table))
        forward = _constraints(jax.make_jaxpr(jax.grad(loss(constrain_forward)))(table))
        value, grad = jax.jit(jax.value_and_grad(loss(constrain_forward)))(table)
        _, tangent = jax.jvp(loss(constrain_forward), (table,), (jnp.ones_like(table),))  # forward mode works
    assert both == 2 and forward == 1
    assert float(value) == float((table**2).sum()) and (grad == 2.0 * table).all()
    assert float(tangent) == float(2.0 * table.sum())
    assert constrain_forward(table, "vocab_table") is table  # no mesh: untouched


def test_default_rules_fit_a_mesh_without_a_tensor_axis():
    # eqzoo's own defaults name `tensor`; on a user's mesh without it they drop that axis
    # (rules the user passes are still checked strictly: test_bad_activation_rules).
    devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp"))
    x = jnp.ones((8, 4))
    with sh.activation_sharding(mesh):
        assert sh.active_mesh() is mesh
        out = jax.jit(lambda t: sh.constrain(t * 2.0, "vocab_table"))(x)
    assert (out == 2.0).all()
