"""ViT under the default sharding rules: its blocks get GPT-2's layout, and a sharded train step on
a data x fsdp x tensor mesh computes the single-device losses within 1e-5 (fp32)."""

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from eqzoo import models, sharding as sh
from eqzoo.train import TrainState, classification_loss, make_train_step

TOL = 1e-5  # fp32: the sharded program sums in a different order, nothing more
STEPS = 3


def _model(key):
    return models.create("tiny-vit", key=key)  # 4 heads, embed 64, MLP 128: divisible by 8 and 4


def _batch():
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(8, 1, 8, 8)).astype(np.float32),
        "y": rng.integers(0, 10, size=8).astype(np.int32),
    }


def test_vit_parameters_get_transformer_specs():
    model = eqx.filter_eval_shape(_model, jax.random.key(0))
    assert sh.default_rules(model) is sh.VIT_RULES
    specs = sh.partition_specs(model, sh.VIT_RULES, mesh=sh.make_mesh("data=2,fsdp=2,tensor=2"))
    blocks = specs.blocks.layers
    assert blocks.attn.q_proj.weight == P(None, "tensor", "fsdp")  # column-parallel, as GPT-2
    assert blocks.attn.o_proj.weight == P(None, "fsdp", "tensor")  # row-parallel
    assert blocks.mlp.up.weight == P(None, "tensor", "fsdp")
    assert blocks.mlp.down.weight == P(None, "fsdp", "tensor")
    assert blocks.attn_norm.weight == P()
    assert specs.patch_embed.weight == P("fsdp")
    assert specs.pos_embed.weight == P(None, "fsdp")
    assert specs.head.weight == P(None, "fsdp")
    assert specs.cls_token == P() and specs.head.bias == P()


def _losses(step, state, batch):
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_sharded_vit_train_step_matches_one_device():
    optimizer = optax.sgd(0.1, momentum=0.9)
    # Initialised under one jit (eagerly, each initialiser op would be compiled on its own).
    state = eqx.filter_jit(lambda k: TrainState.create(_model(k), optimizer, key=k))(jax.random.key(1))
    # One mesh with every axis, FSDP and tensor parallelism at once: one more compile, not two.
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = sh.shard_state(state, mesh)
    ref, _ = _losses(make_train_step(classification_loss, optimizer, donate=False), state, _batch())
    step = make_train_step(classification_loss, optimizer, mesh=mesh)
    losses, state = _losses(step, sharded, sh.shard_batch(_batch(), mesh))
    np.testing.assert_allclose(losses, ref, rtol=0, atol=TOL)
    assert ref[-1] < ref[0]  # the steps do train
    q = state.model.blocks.layers.attn.q_proj.weight
    assert not q.sharding.is_fully_replicated  # really sharded, not silently replicated
