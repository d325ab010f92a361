"""DiT under the default sharding rules: its attention and MLP get GPT-2's layout, the adaLN
projections are split over `fsdp`, and a sharded diffusion train step on a data x fsdp x tensor
mesh computes the single-device losses within 1e-5 (fp32)."""

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from eqzoo import diffusion, models, sharding as sh
from eqzoo.train import TrainState, make_train_step

TOL = 1e-5  # fp32: the sharded program sums in a different order, nothing more
STEPS = 3


def _model(key):
    return models.create("tiny-dit", key=key)  # 4 heads, embed 64, MLP 256: divisible by 8 and 4


def _batch():
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(8, 1, 8, 8)).astype(np.float32),
        "y": rng.integers(0, 10, size=8).astype(np.int32),
    }


def test_dit_parameters_get_transformer_specs():
    model = eqx.filter_eval_shape(_model, jax.random.key(0))
    assert sh.default_rules(model) is sh.DIT_RULES
    assert sh.default_rules(model.config) is sh.DIT_RULES
    specs = sh.partition_specs(model, sh.DIT_RULES, mesh=sh.make_mesh("data=2,fsdp=2,tensor=2"))
    blocks = specs.blocks.layers
    assert blocks.attn.q_proj.weight == P(None, "tensor", "fsdp")  # column-parallel, as GPT-2
    assert blocks.attn.o_proj.weight == P(None, "fsdp", "tensor")  # row-parallel
    assert blocks.mlp.up.weight == P(None, "tensor", "fsdp")
    assert blocks.mlp.down.weight == P(None, "fsdp", "tensor")
    assert blocks.modulation.weight == P(None, None, "fsdp")
    assert blocks.modulation.bias == P()
    assert specs.final_modulation.weight == P(None, "fsdp")
    assert specs.patch_embed.weight == P("fsdp")
    assert specs.final_linear.weight == P(None, "fsdp")
    assert specs.label_embed.weight == P(None, "fsdp")
    assert specs.time_embed.second.weight == P("fsdp")
    assert specs.time_embed.first.weight == P()


def _losses(step, state, batch):
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_sharded_dit_train_step_matches_one_device():
    optimizer = optax.sgd(0.5, momentum=0.9)
    loss_fn = diffusion.make_diffusion_loss(diffusion.NoiseSchedule.linear(100))
    # Initialised under one jit (eagerly, each initialiser op would be compiled on its own).
    state = eqx.filter_jit(lambda k: TrainState.create(_model(k), optimizer, key=k))(jax.random.key(1))
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = sh.shard_state(state, mesh)
    ref, _ = _losses(make_train_step(loss_fn, optimizer, donate=False), state, _batch())
    step = make_train_step(loss_fn, optimizer, mesh=mesh)
    losses, state = _losses(step, sharded, sh.shard_batch(_batch(), mesh))
    np.testing.assert_allclose(losses, ref, rtol=0, atol=TOL)
    assert len(set(ref)) == STEPS  # the weights (and the drawn timesteps) change step to step
    modulation = state.model.blocks.layers.modulation.weight
    assert not modulation.sharding.is_fully_replicated  # really sharded, not silently replicated
    assert float(np.abs(np.asarray(modulation)).max()) > 0  # adaLN-Zero has started to train
