"""Mixture-of-experts layers under a mesh: the sparse implementations ("ragged", a shard_map over
the batch axes; "capacity", plain batched products) give one device's loss and gradients, and
tokens never cross devices: data parallelism moves only the gradient all-reduce, FSDP gathers
weights whose size does not grow with the sequence (structural checks on the compiled HLO)."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import perf, quant, sharding as sh
from eqzoo._errors import ConfigError
from eqzoo.nn import summed_weight_gradients
from eqzoo.train import TrainState, lm_loss, make_train_step

TOL = 1e-5  # fp32: sharding only splits and reorders the sums
IMPLEMENTATIONS = ["mixtral", "mixtral-ragged", "mixtral-capacity"]  # dense, ragged, capacity


@pytest.mark.parametrize("mesh_spec", ["data=8", "data=2,fsdp=2,tensor=2"])
@pytest.mark.parametrize("name", ["mixtral-ragged", "mixtral-capacity"])
def test_sparse_experts_match_single_device(lab, name, mesh_spec):
    ref_loss, ref_grads, _ = lab.loss_and_grads(name, None)
    loss, grads, _ = lab.loss_and_grads(name, mesh_spec)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL


@pytest.mark.parametrize("mesh_spec", [None, "data=2,fsdp=2,tensor=2"])
def test_ragged_summed_weight_gradients_match_per_member(lab, mesh_spec):
    # The train step's one-pass backward pass (weight gradients summed over the batch, and over
    # the batch devices by a psum in the shard_map) gives the per-member path's gradients.
    ref_loss, ref_grads, _ = lab.loss_and_grads("mixtral-ragged", None)
    loss, grads, _ = lab.loss_and_grads("mixtral-ragged", mesh_spec, summed=True)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL


_COLLECTIVES: dict = {}  # compiled once per session for the tests that share a mesh


def _collectives(lab, name: str, mesh_spec: str, seq: int):
    key = (name, mesh_spec, seq)
    if key not in _COLLECTIVES:
        _COLLECTIVES[key] = _compile_collectives(lab, name, mesh_spec, seq)
    return _COLLECTIVES[key]


def _compile_collectives(lab, name: str, mesh_spec: str, seq: int):
    mesh = sh.make_mesh(mesh_spec)
    optimizer = optax.sgd(1e-3)
    state = sh.abstract_sharded(
        eqx.filter_eval_shape(
            lambda: TrainState.create(lab.build_model(name, jax.random.key(0), max_seq=seq), optimizer, key=jax.random.key(1))
        ),
        mesh,
    )
    tok = jax.ShapeDtypeStruct((8, seq), jnp.int32, sharding=jax.NamedSharding(mesh, sh.BATCH_SPEC))
    compiled = make_train_step(lm_loss, optimizer, mesh=mesh).lower(state, {"tokens": tok, "targets": tok}).compile()
    return perf.collectives(compiled)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_data_parallel_moves_only_gradients(lab, name):
    # Every token is routed and computed on the device that holds it: the only collectives are
    # the gradient all-reduces (no all-gather, all-to-all or permute of tokens or router outputs).
    found = _collectives(lab, name, "data=8", 32)
    assert found and {c.kind for c in found} == {"all-reduce"}, sorted({(c.kind, c.shape) for c in found})


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_fsdp_gathers_weights_not_tokens(lab, name):
    # The bytes gathered inside the layer loop are the same at seq 32 and 64: weights only.
    gathered = []
    for seq in (32, 64):
        found = _collectives(lab, name, "fsdp=8", seq)
        gathered.append(sum(c.bytes * c.count for c in found if c.kind == "all-gather" and c.in_loop))
    assert gathered[0] > 0 and gathered[0] == gathered[1], gathered


@pytest.mark.parametrize(
    "name, mesh_spec", [(name, "data=8") for name in IMPLEMENTATIONS] + [("mixtral-capacity", "data=2,expert=4")]
)
def test_odd_token_counts_and_nested_vmaps_under_a_mesh(lab, name, mesh_spec):
    # 3 x 5 tokens do not split over 8 devices ("ragged" then runs without its shard_map; under
    # `expert` no exchange runs), and a vmap around the batched model (stacked batches) nests
    # the batching rules (the expert exchange runs at the inner level only).
    model = lab.make_model(name)
    mesh = sh.make_mesh(mesh_spec)
    forward = eqx.filter_jit(lambda m, t, mesh: _under(mesh, lambda: sh.batch_vmap(m)(t)))
    nested = eqx.filter_jit(lambda m, t, mesh: _under(mesh, lambda: jax.vmap(sh.batch_vmap(m))(t)))
    tokens = jnp.asarray(lab.make_batch(3, 5)["tokens"])
    np.testing.assert_allclose(forward(model, tokens, mesh), forward(model, tokens, None), atol=TOL, rtol=TOL)
    stacked = jnp.asarray(lab.make_batch(16, 8)["tokens"]).reshape(2, 8, 8)
    np.testing.assert_allclose(nested(model, stacked, mesh), nested(model, stacked, None), atol=TOL, rtol=TOL)


def _under(mesh, fn):
    with sh.activation_sharding(mesh):
        return fn()


# Expert parallelism: experts split over the mesh's `expert` axis (tiny-mixtral has 4 experts).
@pytest.mark.parametrize(
    "name, mesh_spec",
    [
        ("mixtral-capacity", "data=2,expert=4"),
        ("mixtral-capacity", "fsdp=2,expert=2,tensor=2"),
        ("mixtral", "data=2,expert=4"),
        ("mixtral-ragged", "data=2,expert=4"),
    ],
)
def test_expert_parallel_matches_single_device(lab, name, mesh_spec):
    ref_loss, ref_grads, _ = lab.loss_and_grads(name, None)
    loss, grads, _ = lab.loss_and_grads(name, mesh_spec)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert lab.max_abs_diff(grads, ref_grads) < TOL


def test_expert_parallel_holds_whole_experts_per_device(lab):
    mesh = sh.make_mesh("data=2,expert=4")
    model = sh.shard(lab.make_model("mixtral"), mesh)
    mlp = model.blocks.layers.mlp
    for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):  # (layers, experts, ...)
        assert w.addressable_shards[0].data.shape == (w.shape[0], 1, *w.shape[2:])
    with pytest.raises(sh.ShardingError, match=r"expert=8 \(8 devices\).*num_experts"):
        sh.shard(lab.make_model("mixtral"), sh.make_mesh("expert=8"))


@pytest.mark.parametrize("name", ["mixtral-capacity", "mixtral"])
def test_expert_parallel_exchanges_tokens_not_experts(lab, name):
    # Tokens go to their experts by all-to-all; no expert weight is gathered, and the gradient
    # all-reduces leave the experts out (each device owns its experts' gradients): well under
    # half of what pure data parallelism reduces.
    found = _collectives(lab, name, "data=2,expert=4", 32)
    in_loop = {c.kind for c in found if c.in_loop}
    assert "all-to-all" in in_loop and "all-gather" not in in_loop, sorted({(c.kind, c.shape) for c in found})
    reduced = sum(c.bytes * c.count for c in found if c.kind == "all-reduce")
    data_parallel = sum(c.bytes * c.count for c in _collectives(lab, name, "data=8", 32) if c.kind == "all-reduce")
    assert reduced < 0.5 * data_parallel, (reduced, data_parallel)


def test_expert_parallel_is_reverse_mode_only_and_says_so(lab):
    layer = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, lab.make_model("mixtral-capacity").blocks.layers.mlp)
    x = jax.random.normal(jax.random.key(0), (8, 4, layer.router.weight.shape[1]))
    mesh = sh.make_mesh("data=2,expert=4")

    def f(scale, mesh):
        with sh.activation_sharding(mesh):
            return jnp.sum(sh.batch_vmap(layer)(x * scale) ** 2)

    # Both compiled: eagerly, the reference gradient ran op by op (~220 small programs compiled).
    reference = jax.jit(jax.grad(lambda s: f(s, None)))(1.0)
    np.testing.assert_allclose(jax.jit(jax.grad(lambda s: f(s, mesh)))(1.0), reference, rtol=TOL)
    with pytest.raises(ConfigError, match=r"expert parallelism .* supports reverse-mode gradients .* without an `expert` axis"):
        jax.jit(jax.hessian(lambda s: f(s, mesh)))(1.0)  # refused while tracing: nothing compiled


def test_default_layouts_fit_a_mesh_built_without_an_expert_axis(lab):
    # BATCH_SPEC and MIXTRAL_RULES name `expert`; a hand-built mesh without it drops the axis
    # (a spec the user passes is still checked strictly).
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    batch = sh.shard_batch(lab.make_batch(), mesh)
    assert batch["tokens"].sharding.spec == jax.P(("data", "fsdp"))
    gate = sh.shard(lab.make_model("mixtral"), mesh).blocks.layers.mlp.gate_proj
    assert gate.sharding.spec == jax.P(None, None, "fsdp", "tensor")
    with pytest.raises(sh.ShardingError, match=r"names mesh axis 'expert'"):
        sh.shard_batch(lab.make_batch(), mesh, spec=jax.P(("data", "expert")))


def test_fp8_experts_on_an_expert_and_fsdp_mesh_match_one_device(lab):  # ~3 s
    # prepare_fp8 on tiny-mixtral (experts Fp8Weight, "dense" with the expert exchange;
    # attention Fp8Linear), traced as the train step traces it (whole-batch scales): a sharded
    # operand's amax is the whole tensor's, so the mesh computes one device's fp8 products.
    # The loss only: its gradient compiles for ~10 s more here.
    model = quant.prepare_fp8(lab.make_model("mixtral"))
    batch = lab.make_batch()
    mesh = sh.make_mesh("data=2,fsdp=2,expert=2")

    @functools.partial(jax.jit, static_argnums=2)
    def loss(model, batch, mesh):
        with sh.activation_sharding(mesh), summed_weight_gradients():
            return lm_loss(model, batch)[0]

    ref = loss(model, batch, None)
    sharded = sh.shard(model, mesh)
    assert sharded.blocks.layers.mlp.gate_proj.base.sharding.spec == jax.P(None, "expert", "fsdp", "tensor")
    lowered = loss.lower(sharded, sh.shard_batch(batch, mesh), mesh)
    compiled = lowered.compile()
    # The experts' weights (experts, embed, hidden) and the batch's expert slots (batch,
    # experts, slots, embed) in e4m3; the tokens sent to their experts' devices.
    text = lowered.as_text()
    assert "tensor<4x64x128xf8E4M3FN>" in text and "tensor<8x4x16x64xf8E4M3FN>" in text
    assert "all-to-all" in compiled.as_text()
    # fp32: sharding only splits and reorders the sums (measured 1.4e-6); the float model's loss
    # is 5.4e-4 away
    assert abs(float(compiled(sharded, sh.shard_batch(batch, mesh))) - float(ref)) < TOL
