"""`weight_decay_mask`: matrices per layer decay; vectors per layer, biases and norms do not,
whether or not the layers are stacked."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

from eqzoo import models, train


def _named(model):
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = train.weight_decay_mask(params)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return dict(zip(names, jax.tree.leaves(mask), strict=True))


@pytest.mark.parametrize("scan", [True, False])
def test_gpt2_stacked_or_unrolled_decays_the_same_roles(scan):
    model = models.create(models.get_config("tiny-gpt2", scan_layers=scan), key=jax.random.key(0))
    named = _named(model)
    assert named[".embed.weight"] and named[".pos_embed.weight"]
    decayed = {n for n, d in named.items() if d}
    kept = {n for n, d in named.items() if not d}
    # Stacked: one leaf per role, with a leading layer axis; every matrix decays, no bias or norm.
    assert any("q_proj.weight" in n for n in decayed) and any("mlp.down.weight" in n for n in decayed)
    assert all(n.endswith(".bias") or "norm" in n for n in kept), kept
    assert all(not (n.endswith(".bias") or "norm" in n) for n in decayed), decayed
    assert any("q_proj.bias" in n for n in kept) and ".final_norm.weight" in kept


def test_mixtral_experts_and_router_decay():
    named = _named(models.create("tiny-mixtral", key=jax.random.key(0)))
    for role in ("router.weight", "gate_proj", "up_proj", "down_proj"):
        assert named[f".blocks.layers.mlp.{role}"], role
    assert not named[".blocks.layers.mlp_norm.weight"]


def test_conv_bias_is_not_decayed_although_3d():
    conv = eqx.nn.Conv2d(3, 4, 3, key=jax.random.key(0))
    assert conv.bias.ndim == 3
    mask = train.weight_decay_mask(conv)
    assert mask.weight is True and mask.bias is False


def test_decay_with_the_mask_leaves_norms_untouched_by_decay():
    model = models.create("tiny-llama", key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    opt = optax.add_decayed_weights(0.5, mask=train.weight_decay_mask)  # adamw's decay step
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    # Zero gradients: only decayed parameters move.
    assert float(jnp.max(jnp.abs(updates.final_norm.weight))) == 0.0
    assert float(jnp.max(jnp.abs(updates.blocks.layers.attn.q_proj.weight))) > 0.0


def test_unstacked_blocks_a_bare_stack_and_int8_scales():
    model = models.create("tiny-llama", key=jax.random.key(0))
    unstacked = eqx.tree_at(lambda m: m.blocks, model, model.blocks.unstacked())
    mask = train.weight_decay_mask(eqx.filter(unstacked, eqx.is_inexact_array))
    assert all(layer.attn.q_proj.weight for layer in mask.blocks.layers)
    assert not any(layer.attn_norm.weight for layer in mask.blocks.layers)
    bare = train.weight_decay_mask(model.blocks)  # a Stacked at the root
    assert bare.layers.attn.q_proj.weight is True and bare.layers.attn_norm.weight is False
    from eqzoo import quant

    int8 = quant.quantize(models.create("tiny-mixtral", key=jax.random.key(0)))
    mask = train.weight_decay_mask(eqx.filter(int8, eqx.is_inexact_array))
    assert mask.blocks.layers.mlp.up_proj.scale is False and mask.blocks.layers.attn.q_proj.scale is False
