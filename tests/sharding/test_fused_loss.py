"""The fused LM loss under a mesh: the same numbers as on one device, and no communication inside
its chunk loop beyond what vocab-parallel logits need (structural checks on the compiled HLO)."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eqzoo import sharding as sh, train

B, T, E, V, CHUNK = 8, 32, 16, 64, 8  # 4 chunks
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(B, T, E)).astype(np.float32)
    h = (0.3 * rng.normal(size=(V, E))).astype(np.float32)
    t = rng.integers(0, V, (B, T)).astype(np.int32)
    w = (rng.uniform(size=(B, T)) > 0.2).astype(np.float32)
    return f, h, t, w


def _grad_fn(mesh):
    def loss(f, h, t, w):
        return train.fused_cross_entropy(f, h, t, w, chunk_size=CHUNK) / B

    @jax.jit
    def g(f, h, t, w):
        with sh.activation_sharding(mesh):
            return jax.value_and_grad(loss, argnums=(0, 1))(f, h, t, w)

    return g


def _placed(mesh, f, h, t, w):
    rows = NamedSharding(mesh, sh.BATCH_SPEC)
    head = NamedSharding(mesh, P("tensor", "fsdp"))  # the default rules for embed / lm_head
    return jax.device_put(f, rows), jax.device_put(h, head), jax.device_put(t, rows), jax.device_put(w, rows)


def _loop_collectives(hlo: str) -> list[tuple[str, str]]:
    """(kind, result shape) of every collective inside a while-loop body."""
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo))
    assert bodies, "expected the chunk loop in the compiled program"
    found = []
    for comp in re.split(r"\n(?=\S.*\{\s*$)", hlo, flags=re.M):
        if comp.split("\n", 1)[0].split(" ")[0] in bodies:
            found += [(m.group(2), m.group(1)) for m in _COLLECTIVE.finditer(comp)]
    return found


@pytest.mark.parametrize("mesh_spec", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_fused_loss_under_a_mesh_equals_one_device(mesh_spec):
    # Tolerance 1e-5 (float32): sharding only splits and reorders the sums.
    args = _inputs()
    ref_loss, (ref_df, ref_dh) = _grad_fn(None)(*args)
    mesh = sh.make_mesh(mesh_spec)
    loss, (df, dh) = _grad_fn(mesh)(*_placed(mesh, *args))
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    np.testing.assert_allclose(np.asarray(df), np.asarray(ref_df), atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(ref_dh), atol=1e-5)


@pytest.mark.parametrize("mesh_spec", ["data=8", "fsdp=8"])
def test_fused_loss_chunk_loop_has_no_collectives_under_data_parallelism(mesh_spec):
    # Each device sums its own rows' head gradient and loss; the one reduction over the batch
    # axes comes after the loop (a replicated accumulator would all-reduce (vocab, embed) per
    # chunk), and the fsdp-sharded head is gathered before it.
    mesh = sh.make_mesh(mesh_spec)
    hlo = _grad_fn(mesh).lower(*_placed(mesh, *_inputs())).compile().as_text()
    assert _loop_collectives(hlo) == []
    assert re.search(r"all-reduce(?:-start)?\(", hlo)  # the reduction is still there, outside


def test_fused_loss_under_tensor_parallelism_communicates_rows_only():
    # Vocab-parallel logits need per-row maxima / sums and the rows' feature gradient summed over
    # `tensor`; nothing the size of the head ((vocab / 2) x embed) crosses devices per chunk.
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    hlo = _grad_fn(mesh).lower(*_placed(mesh, *_inputs())).compile().as_text()
    found = _loop_collectives(hlo)
    assert found and all(kind == "all-reduce" for kind, _ in found)
    head_shard = f"{V // 2},{E}]"
    assert not any(head_shard in shape for _, shape in found), found


def test_active_mesh_is_read_from_the_activation_sharding_context():
    mesh = sh.make_mesh("data=8")
    assert sh.active_mesh() is None
    with sh.activation_sharding(mesh):
        assert sh.active_mesh() is mesh
        with sh.activation_sharding(None):
            assert sh.active_mesh() is None
    assert sh.active_mesh() is None


def test_auto_chunk_size_counts_the_rows_one_device_holds():
    # GPT-2 124M's loss at batch 16 x 1024: on one device, chunks of 128 positions (a loop of 8);
    # under data=8 each device holds 2 sequences, so one chunk of 1024 fits the same 512 MiB.
    assert train.auto_chunk_size(16, 1024, 50304) == 128
    assert train.auto_chunk_size(16 // 8, 1024, 50304) == 1024

    def compiled(mesh):
        rows = None if mesh is None else NamedSharding(mesh, sh.BATCH_SPEC)
        f = jax.ShapeDtypeStruct((16, 1024, 768), jnp.bfloat16, sharding=rows)
        h = jax.ShapeDtypeStruct((50304, 768), jnp.bfloat16)
        t = jax.ShapeDtypeStruct((16, 1024), jnp.int32, sharding=rows)

        @jax.jit
        def g(f, h, t):
            with sh.activation_sharding(mesh):
                return jax.grad(train.fused_cross_entropy, argnums=(0, 1))(f, h, t)

        return g.lower(f, h, t).compile().as_text()

    assert re.search(r"known_trip_count\W+n\W+8\b", compiled(None))
    assert " while(" not in compiled(sh.make_mesh("data=8"))


def test_chunked_loss_keeps_forward_mode_under_a_mesh(lab):
    # lm_loss(implementation="chunked") supports jax.jvp; the token lookup's layout constraint
    # must not take that away under a mesh.
    from eqzoo.train import lm_loss

    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    model = sh.shard(lab.make_model("gpt2"), mesh)
    batch = sh.shard_batch(lab.make_batch(), mesh)
    x = model.final_norm.weight

    def loss(w):
        m = eqx.tree_at(lambda m: m.final_norm.weight, model, w)
        return lm_loss(m, batch, implementation="chunked")[0]

    with sh.activation_sharding(mesh):
        value, tangent = jax.jvp(loss, (x,), (jnp.ones_like(x),))
    ref_value, ref_tangent = jax.jvp(loss, (x,), (jnp.ones_like(x),))  # no mesh context
    assert abs(float(value) - float(ref_value)) < 1e-5
    assert abs(float(tangent) - float(ref_tangent)) < 1e-4


class _Lookup(eqx.Module):
    """The least a model needs for lm_loss: features from a table, and a separate head."""

    rows: jax.Array
    head: jax.Array

    def features(self, tokens):
        # laid out like a real model's hidden states (batch-split, embed whole)
        return sh.constrain(jnp.tanh(jnp.take(self.rows, tokens, axis=0)), "residual")

    def head_weight(self):
        return self.head


def _lm_grad_fn(mesh, implementation):
    def loss(model, batch):
        return train.lm_loss(model, batch, implementation=implementation, chunk_size=CHUNK)[0]

    @jax.jit
    def g(model, batch):
        with sh.activation_sharding(mesh):
            return eqx.filter_value_and_grad(loss)(model, batch)

    return g


def _lm_inputs(mesh):
    f, h, t, _ = _inputs(1)
    model = _Lookup(jnp.asarray(np.random.default_rng(2).normal(size=(V, E)).astype(np.float32)), jnp.asarray(h))
    batch = {"tokens": t, "targets": np.roll(t, -1, axis=1)}
    if mesh is not None:
        model = _Lookup(*(jax.device_put(x, NamedSharding(mesh, P("tensor", "fsdp"))) for x in (model.rows, model.head)))
        batch = sh.shard_batch(batch, mesh)
    return model, batch


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
def test_lm_loss_chunk_loops_sum_the_head_gradient_once_under_a_mesh(implementation):
    # Tolerance 1e-5 (float32) against one device; and under data / fsdp parallelism no
    # collective inside the chunk loops (the "chunked" path used to all-reduce the whole head
    # gradient in every chunk of its backward pass).
    ref_loss, ref_g = _lm_grad_fn(None, implementation)(*_lm_inputs(None))
    for spec in ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"]:
        mesh = sh.make_mesh(spec)
        fn = _lm_grad_fn(mesh, implementation)
        loss, g = fn(*_lm_inputs(mesh))
        assert abs(float(loss) - float(ref_loss)) < 1e-5
        np.testing.assert_allclose(np.asarray(g.head), np.asarray(ref_g.head), atol=1e-5)
        np.testing.assert_allclose(np.asarray(g.rows), np.asarray(ref_g.rows), atol=1e-5)
        if "tensor" not in spec:
            assert _loop_collectives(fn.lower(*_lm_inputs(mesh)).compile().as_text()) == [], spec
