"""Path-based rules: first match wins, default GPT-2 / Llama layouts, per-device shard shapes,
optimizer state following its parameters, and errors that name parameter, shape and axis."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import eqzoo
from eqzoo import sharding as sh
from eqzoo.train import Precision, TrainState


def _shard_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return {sh.path_str(p): tuple(x.addressable_shards[0].data.shape) for p, x in flat}


def test_path_str_and_first_match_wins():
    model = eqzoo.models.create("tiny-gpt2", key=jax.random.key(0))
    paths = [sh.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(model)[0]]
    assert "blocks.layers.attn.q_proj.weight" in paths
    assert sh.path_str(jax.tree_util.tree_flatten_with_path({"a": [0, {"b": 1}]})[0][1][0]) == "a.1.b"
    rules = [(r"q_proj\.weight$", P(None, "tensor")), (r"proj\.weight$", P(None, None, "fsdp"))]
    assert sh.spec_for("blocks.layers.attn.q_proj.weight", rules) == P(None, "tensor")
    assert sh.spec_for("blocks.layers.attn.k_proj.weight", rules) == P(None, None, "fsdp")
    assert sh.spec_for("final_norm.weight", rules) == P()


def test_default_rules_dispatch(lab):
    assert sh.default_rules(lab.make_model("gpt2")) is sh.GPT2_RULES
    assert sh.default_rules(lab.make_model("llama").config) is sh.LLAMA_RULES
    assert sh.default_rules(lab.make_model("gemma")) is sh.LLAMA_RULES
    assert sh.default_rules(eqzoo.models.create("mlp-small", key=jax.random.key(0))) == ()


def test_gpt2_shard_shapes_on_three_axis_mesh(lab):
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    shapes = _shard_shapes(sh.shard(lab.make_model("gpt2"), mesh))
    # (layers, out, in): the stacked layer axis is never sharded; out over tensor, in over fsdp.
    assert shapes["embed.weight"] == (256 // 2, 64 // 2)  # (vocab/tensor, embed/fsdp)
    assert shapes["pos_embed.weight"] == (128, 64 // 2)
    assert shapes["blocks.layers.attn.q_proj.weight"] == (2, 64 // 2, 64 // 2)
    assert shapes["blocks.layers.attn.q_proj.bias"] == (2, 64 // 2)
    assert shapes["blocks.layers.attn.o_proj.weight"] == (2, 64 // 2, 64 // 2)
    assert shapes["blocks.layers.attn.o_proj.bias"] == (2, 64)
    assert shapes["blocks.layers.mlp.up.weight"] == (2, 256 // 2, 64 // 2)
    assert shapes["blocks.layers.mlp.down.weight"] == (2, 64 // 2, 256 // 2)
    assert shapes["blocks.layers.attn_norm.weight"] == (2, 64)
    assert shapes["final_norm.weight"] == (64,)


def test_llama_shard_shapes_fsdp_times_tensor(lab):
    mesh = sh.make_mesh("fsdp=2,tensor=4")
    model = lab.make_model("llama")  # 8 heads, 4 kv heads of 8: q out 64, k/v out 32
    shapes = _shard_shapes(sh.shard(model, mesh))
    assert shapes["embed.weight"] == (256 // 4, 64 // 2)
    assert shapes["lm_head.weight"] == (256 // 4, 64 // 2)
    assert shapes["blocks.layers.attn.q_proj.weight"] == (2, 64 // 4, 64 // 2)
    assert shapes["blocks.layers.attn.k_proj.weight"] == (2, 32 // 4, 64 // 2)
    assert shapes["blocks.layers.attn.o_proj.weight"] == (2, 64 // 2, 64 // 4)
    assert shapes["blocks.layers.mlp.gate.weight"] == (2, 176 // 4, 64 // 2)
    assert shapes["blocks.layers.mlp.down.weight"] == (2, 64 // 2, 176 // 4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fsdp_divides_parameter_memory(lab, name):
    model = lab.make_model(name)
    total = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    mesh = sh.make_mesh("fsdp=8")
    sharded = sh.shard(model, mesh)
    dev0 = jax.devices()[0]
    on_dev0 = sum(
        s.data.nbytes
        for x in jax.tree.leaves(eqx.filter(sharded, eqx.is_array))
        for s in x.addressable_shards
        if s.device == dev0
    )
    # Everything but the small replicated norms and biases is split 8 ways.
    assert on_dev0 < 0.15 * total, (on_dev0, total)
    replicated = sh.shard(model, sh.make_mesh("data=8"))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(eqx.filter(replicated, eqx.is_array)))


def test_optimizer_state_follows_parameters(lab):
    model = lab.make_model("llama")
    state = TrainState.create(
        model, optax.adamw(1e-3), key=jax.random.key(1), precision=Precision.fp16()
    )
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = sh.shard_state(state, mesh)
    assert sharded.structure is state.structure
    parts = sharded.parts()
    (adam, *_), loss_scale = parts.opt_state
    params = jax.tree_util.tree_flatten_with_path(eqx.filter(parts.model, eqx.is_array))[0]
    for moments in (adam.mu, adam.nu):
        flat = jax.tree_util.tree_flatten_with_path(moments)[0]
        assert len(flat) == len(params)
        for (pp, p), (mp, m) in zip(params, flat, strict=True):
            assert sh.path_str(pp) == sh.path_str(mp)
            assert m.sharding == p.sharding, sh.path_str(pp)
    for scalar in (adam.count, loss_scale.scale, loss_scale.good_steps, parts.step, parts.key):
        assert scalar.sharding.is_fully_replicated
    np.testing.assert_array_equal(
        np.asarray(parts.model.embed.weight), np.asarray(state.model.embed.weight)
    )
    # Unmatched optimizer leaves (here: a factored second moment with reduced shapes) are replicated.
    fact = sh.tree_shardings(TrainState.create(model, optax.adafactor(1e-3), key=jax.random.key(1)), mesh)
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in fact.arrays)


@pytest.mark.filterwarnings("ignore:tensor=8 does not divide num_heads")  # tested below
def test_non_dividing_dimension_names_parameter_shape_and_axis(lab):
    # GPT-2's real vocabulary (50257) does not divide a tensor axis; the same on a tiny scale:
    model = lab.make_model("gpt2", vocab_size=100)
    with pytest.raises(
        sh.ShardingError,
        match=r"parameter 'embed.weight' of shape \(100, 64\): dimension 0 \(size 100\) is "
        r"assigned to mesh axis tensor=8 \(8 devices\), which does not divide it",
    ):
        sh.shard(model, sh.make_mesh("tensor=8"))
    abstract = eqx.filter_eval_shape(lambda: lab.build_model("llama", jax.random.key(0), hidden_dim=90))
    with pytest.raises(
        sh.ShardingError,
        match=r"'blocks.layers.mlp.gate.weight' of shape \(2, 90, 64\): dimension 1 \(size 90\) "
        r"is assigned to mesh axis tensor=4",
    ):
        sh.tree_shardings(abstract, sh.make_mesh("data=2,tensor=4"))


def test_bad_rules():
    x = jnp.zeros((4, 6))
    mesh = sh.make_mesh("data=2,tensor=4")
    with pytest.raises(sh.ShardingError, match=r"names mesh axis 'model', but the mesh has the axes"):
        sh.shard({"w": x}, mesh, [(r"w", P("model"))])
    with pytest.raises(sh.ShardingError, match=r"parameter 'w' of shape \(4, 6\) has 2 dimension\(s\) but .* 3 entries"):
        sh.shard({"w": x}, mesh, [(r"w", P(None, None, "data"))])
    with pytest.raises(sh.ShardingError, match=r"uses mesh axis 'data' twice"):
        sh.shard({"w": x}, mesh, [(r"w", P("data", "data"))])
    with pytest.raises(sh.ShardingError, match=r"dimension 0 \(size 4\) is assigned to mesh axis data=2xtensor=4"):
        sh.shard({"w": x}, mesh, [(r"w", P(("data", "tensor")))])
    with pytest.raises(sh.ShardingError, match=r"does not compile"):
        sh.shard({"w": x}, mesh, [(r"w(", P())])


def test_custom_rules_and_abstract_trees(lab):
    mesh = sh.make_mesh("fsdp=8")
    rules = [(r"^(embed|final_norm)\.weight$", P("fsdp"))]
    abstract = eqx.filter_eval_shape(lambda: lab.build_model("gpt2", jax.random.key(0)))
    target = sh.abstract_sharded(abstract, mesh, rules)
    assert target.embed.weight.sharding.spec == P("fsdp")
    assert target.final_norm.weight.sharding.spec == P("fsdp")
    assert isinstance(target.embed.weight, jax.ShapeDtypeStruct)
    assert target.blocks.layers.attn.q_proj.weight.sharding.spec == P()  # no rule: replicated
    specs = sh.partition_specs(abstract, sh.GPT2_RULES)
    assert specs.blocks.layers.attn.q_proj.weight == P(None, "tensor", "fsdp")


def test_batches(lab):
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    batch = sh.shard_batch(lab.make_batch(), mesh)
    assert batch["tokens"].sharding.spec == sh.BATCH_SPEC
    assert batch["tokens"].addressable_shards[0].data.shape == (lab.BATCH // 4, lab.SEQ)
    with pytest.raises(
        sh.ShardingError,
        match=r"shard_batch: batch\['t\w+'\] of shape \(6, 16\): dimension 0 \(size 6\) is split "
        r"over mesh axis data=2xfsdp=2 \(4 devices\).*global batch size divisible by 4",
    ):
        sh.shard_batch(lab.make_batch(batch=6), mesh)
    with pytest.raises(sh.ShardingError, match=r"make_global_batch .*size 6"):
        sh.make_global_batch(lab.make_batch(batch=6), mesh)


def test_tensor_size_that_cuts_heads_warns_with_the_sizes_that_do_not(lab):
    import warnings

    abstract = eqx.filter_eval_shape(lambda: lab.build_model("llama", jax.random.key(0)))  # 8 / 4 heads
    with pytest.warns(UserWarning, match=r"tensor=8 does not divide num_kv_heads=4.*divides every head count \(\[2, 4\]\)"):
        sh.abstract_sharded(abstract, sh.make_mesh("tensor=8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sh.abstract_sharded(abstract, sh.make_mesh("data=2,tensor=4"))  # whole heads: silent
        sh.abstract_sharded(abstract, sh.make_mesh("tensor=8"), rules=sh.LLAMA_RULES)  # own rules: silent


def test_a_model_without_rules_on_an_fsdp_or_tensor_mesh_warns():
    import warnings

    mlp = eqx.filter_eval_shape(lambda: eqx.nn.MLP(16, 16, 32, 2, key=jax.random.key(0)))  # a user's own model
    with pytest.warns(UserWarning, match=r"no default sharding rules for MLP: every parameter is replicated, and the mesh's fsdp=4, tensor=2 splits only the batch"):
        sh.abstract_sharded(mlp, sh.make_mesh("fsdp=4,tensor=2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sh.abstract_sharded(mlp, sh.make_mesh("data=8"))  # data parallelism replicates anyway: silent
        sh.abstract_sharded(mlp, sh.make_mesh("fsdp=8"), rules=((r".*weight", jax.sharding.PartitionSpec("fsdp")),))  # own rules: silent
    # an own rule that matches nothing (a typo) would leave what it meant to split replicated: named
    typo = ((r".*weight", jax.sharding.PartitionSpec("fsdp")), (r"layers\.0\.bais", jax.sharding.PartitionSpec("fsdp")))
    with pytest.warns(UserWarning, match=r"rule\(s\) 'layers\\\.0\\\.bais' match no parameter of MLP.*model's are: layers\.0\.weight, layers\.0\.bias"):
        sh.abstract_sharded(mlp, sh.make_mesh("fsdp=8"), typo)
