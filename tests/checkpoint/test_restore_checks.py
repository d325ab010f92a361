"""What `Checkpointer.restore` checks before it reads arrays, and the messages of what it refuses:
shapes and dtypes, the model config and class, non-array settings, format versions, targets
and shardings."""

import dataclasses
import inspect
import json
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

from eqzoo import checkpoint, models, train


def test_mismatch_lists_each_path_with_expected_and_found(ckpt_dir, open_checkpointer, state_factory, mlp_config):
    opt = optax.adamw(1e-2)
    state = state_factory(opt)
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state)
    ckpt.wait()
    wider = checkpoint.abstract_state(mlp_config, opt, width=10)
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        ckpt.restore(wider)
    message = str(info.value)
    assert "model.net.layers.0.weight: expected float32(10, 6), found float32(8, 6)" in message
    assert "opt_state.0.mu.net.layers.1.weight: expected float32(3, 10), found float32(3, 8)" in message
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"opt_state.1.0.nu.net.layers.0.weight: expected float32\(8, 6\), not in the checkpoint"):
        ckpt.restore(_plus_extra_adam(mlp_config))
    assert "Every difference is in the optimizer state" not in message  # the model differs too
    assert "Only dtypes differ" not in message  # shapes do: casting would not help
    bf16 = checkpoint.abstract_state(lambda k: _cast(models.create(mlp_config, key=k)), opt)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"(?s)model.net.layers.0.bias: expected bfloat16\(8,\), found float32\(8,\).*Only dtypes differ: restore does not cast"):
        ckpt.restore(bf16)
    sgd = checkpoint.abstract_state(mlp_config, optax.sgd(1e-2))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"opt_state.0.mu.net.layers.0.weight: found float32\(8, 6\), not in the target(.|\n)*Every difference is in the optimizer state: .*Precision"):
        ckpt.restore(sgd)



def test_a_target_config_that_changes_the_weights_meaning_is_refused_even_where_shapes_fit(ckpt_dir, open_checkpointer):
    # 4 heads of width 16 and 8 of width 8 store the same shapes, as do two RoPE bases: only the
    # saved config tells them apart. How the model runs (remat, scan, max_seq) may change.
    opt = optax.adamw(1e-2)
    config = models.get_config("tiny-llama", num_layers=1, num_heads=4, num_kv_heads=2)
    state = train.TrainState.create(models.create(config, key=jax.random.key(0)), opt, key=jax.random.key(1))
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state)
    ckpt.wait()
    rewired = checkpoint.abstract_state(models.get_config(config, num_heads=8, num_kv_heads=4, rope_theta=5e5), opt)
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        ckpt.restore(rewired)
    message = str(info.value)
    assert "differs from the restore target's in 3 field(s)" in message
    for line in ("num_heads: saved 4, target 8", "num_kv_heads: saved 2, target 4", "rope_theta: saved 10000.0, target 500000.0"):
        assert line in message
    assert "allow_config_change=True" in message
    forced = ckpt.restore(rewired, allow_config_change=True)  # on purpose: the arrays fit
    assert forced.state.model.config.num_heads == 8
    how = checkpoint.abstract_state(models.get_config(config, remat="full", scan_layers=False, max_seq=config.max_seq * 2), opt)
    restored = ckpt.restore(how)
    assert checkpoint.params_sha256(restored.state.model) == checkpoint.params_sha256(state.model)
    assert {"remat", "scan_layers", "max_seq"} <= checkpoint.RESTORE_MAY_CHANGE
    # A checkpoint written before a config field existed (here: its qk_norm and layer_types
    # removed from the stored config) restores into the same model: the field takes its default.
    from eqzoo.checkpoint._integrity import with_crc

    path = ckpt_dir / "0" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    for field in ("qk_norm", "layer_types"):
        del meta["config"]["fields"][field]
    path.write_text(json.dumps(with_crc(meta)))
    older = open_checkpointer(ckpt_dir)
    assert checkpoint.params_sha256(older.restore(how).state.model) == checkpoint.params_sha256(state.model)


def test_a_checkpoint_of_another_architecture_is_refused_by_name(ckpt_dir, open_checkpointer):
    opt = optax.adamw(1e-2)
    config = models.get_config("tiny-llama", num_layers=1)
    state = train.TrainState.create(models.create(config, key=jax.random.key(0)), opt, key=jax.random.key(1))
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state)
    ckpt.wait()
    other = checkpoint.abstract_state(models.get_config("tiny-gpt2", num_layers=1), opt)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"step 0 in .* holds a LlamaConfig model, but the restore target is a GPT2Config model: another architecture"):
        ckpt.restore(other)


def _cast(model):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, model)


def _plus_extra_adam(config):
    # The saved run used a bare adamw; a chain of two adams has every name under opt_state.1 too.
    return checkpoint.abstract_state(config, optax.chain(optax.scale_by_adam(), optax.adamw(1e-2)))


def test_restore_target_and_sharding_errors(ckpt_dir, open_checkpointer, state_factory):
    state = state_factory()
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state)
    ckpt.wait()
    unchecked_restore = inspect.unwrap(checkpoint.Checkpointer.restore)
    with pytest.raises(checkpoint.CheckpointError, match="needs a TrainState target .*; got MLP"):
        unchecked_restore(ckpt, state.model)
    mesh = jax.sharding.Mesh(jax.devices()[:8], ("data",))
    bad = jax.sharding.NamedSharding(mesh, jax.P("data"))
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot place model.net.layers.1.weight of shape \(3, 8\) with sharding .*axis 0 is partitioned 8 times"):
        ckpt.restore(state, shardings=bad)


def test_newer_format_version_is_refused(ckpt_dir, open_checkpointer, state_factory):
    from eqzoo.checkpoint._integrity import with_crc

    state = state_factory()
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state)
    ckpt.wait()
    path = ckpt_dir / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["format_version"] = checkpoint.FORMAT_VERSION + 98
    path.write_text(json.dumps(with_crc(meta)))
    with pytest.raises(checkpoint.CheckpointVersionError, match=r"written in eqzoo checkpoint format 99 .*reads formats up to 1. Upgrade eqzoo"):
        ckpt.restore(state)


def test_config_is_optional_and_explicit_config_wins(ckpt_dir, open_checkpointer, state_factory):
    state = state_factory()
    ckpt = open_checkpointer(ckpt_dir, config=models.MLPConfig(width=99))
    ckpt.save(state)
    ckpt.wait()
    assert ckpt.meta().config.width == 99
    plain = train.TrainState.create({"w": jnp.ones(3)}, optax.sgd(0.1), key=jax.random.key(0))
    other = open_checkpointer(ckpt_dir.with_name("plain"))
    other.save(plain)
    other.wait()
    assert other.meta().config is None
    restored = other.restore(plain)
    assert restored.state.model["w"].tolist() == [1.0, 1.0, 1.0]


def test_meta_crc_covers_every_field():
    from eqzoo.checkpoint._integrity import crc_ok, with_crc

    meta = with_crc({"format": "eqzoo.checkpoint", "data_state": {"step": 12}})
    assert crc_ok(meta)
    flipped = {**meta, "data_state": {"step": 13}}
    assert not crc_ok(flipped)
    assert meta["crc32"] == zlib.crc32(json.dumps({"data_state": {"step": 12}, "format": "eqzoo.checkpoint"}, sort_keys=True).encode())


class _Tempered(eqx.Module):
    """A layer whose softmax temperature is a static field: no array shape records it."""

    weight: jax.Array
    temp: float = eqx.field(static=True)
    activation: str = eqx.field(static=True, default="relu")

    def __init__(self, temp, *, key, activation="relu"):
        self.weight = jax.random.normal(key, (3, 4))
        self.temp = temp
        self.activation = activation


def test_non_array_settings_are_recorded_and_a_target_that_differs_is_refused(ckpt_dir, open_checkpointer, monkeypatch):
    opt = optax.sgd(0.1)
    state = train.TrainState.create({"head": _Tempered(2.0, key=jax.random.key(0))}, opt, key=jax.random.key(1))
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state)
    ckpt.wait()
    hotter = checkpoint.abstract_state(lambda k: {"head": _Tempered(3.0, key=k, activation="gelu")}, opt)
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match=r"(?s)non-array settings differ from the restore target's in 2 field\(s\).*"
        r"model.head.temp: saved 2.0, target 3.0\n  model.head.activation: saved 'relu', target 'gelu'\n.*allow_config_change=True",
    ):
        ckpt.restore(hotter)
    assert ckpt.restore(hotter, allow_config_change=True).state.model["head"].temp == 3.0  # on purpose
    same = ckpt.restore(checkpoint.abstract_state(lambda k: {"head": _Tempered(2.0, key=k)}, opt))
    assert same.state.model["head"].temp == 2.0
    # how it runs or trains may differ: a target in inference mode (dropout off) or with another
    # dropout rate (fine-tuning) restores
    with_dropout = train.TrainState.create({"drop": eqx.nn.Dropout(0.1)}, opt, key=jax.random.key(1))
    other = open_checkpointer(ckpt_dir.with_name("dropout"))
    other.save(with_dropout)
    other.wait()
    target = with_dropout.replace(model=eqx.nn.inference_mode(with_dropout.model))
    assert other.restore(target).state.model["drop"].inference
    assert other.restore(train.TrainState.create({"drop": eqx.nn.Dropout(0.5)}, opt, key=jax.random.key(1))).state.model["drop"].p == 0.5
    # a step written before settings were recorded restores as before
    from eqzoo.checkpoint._integrity import with_crc

    path = ckpt_dir / "0" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    assert meta["statics"] == {"fields": {"model.head.activation": "relu", "model.head.temp": 2.0}, "truncated": False}
    del meta["statics"]
    path.write_text(json.dumps(with_crc(meta)))
    assert open_checkpointer(ckpt_dir).restore(hotter).state.model["head"].temp == 3.0
    # the record is capped
    from eqzoo.checkpoint import _statics

    monkeypatch.setattr(_statics, "MAX_STATICS", 1)
    assert _statics.describe_statics({"head": _Tempered(2.0, key=jax.random.key(0))}) == {
        "fields": {"model.head.temp": 2.0}, "truncated": True
    }


def test_a_target_with_another_optimizer_is_refused_even_where_every_array_fits(ckpt_dir, open_checkpointer, state_factory, mlp_config):
    # adamw's weight decay holds no state: adam and adamw states hold the same arrays, and only
    # the recorded structure of the optimizer state tells them apart.
    state = state_factory(optax.adamw(1e-2))
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state)
    ckpt.wait()
    assert ckpt.meta().optimizer == "(ScaleByAdamState, EmptyState, EmptyState)"
    adam = checkpoint.abstract_state(mlp_config, optax.adam(1e-2))
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match=r"(?s)saved with another optimizer than the restore target's.*"
        r"saved:  \(ScaleByAdamState, EmptyState, EmptyState\) \(holds the state optax.adamw makes\)\n"
        r"  target: \(ScaleByAdamState, EmptyState\) \(holds the state optax.adam makes\)\n.*allow_optimizer_change=True",
    ):
        ckpt.restore(adam)
    forced = ckpt.restore(adam, allow_optimizer_change=True)  # on purpose: the moments carry over
    for saved, restored in zip(jax.tree.leaves(state.opt_state[0]), jax.tree.leaves(forced.state.opt_state[0]), strict=True):
        assert jnp.array_equal(saved, restored)
    assert jax.tree.structure(forced.state.opt_state) == jax.tree.structure(adam.opt_state)
    # the same optimizer with other (non-array) hyperparameters is not told apart, and restores
    ckpt.restore(checkpoint.abstract_state(mlp_config, optax.adamw(1e-3, weight_decay=0.5)))
    # the reverse, and a masked weight decay: the structure shows the mask
    other = open_checkpointer(ckpt_dir.with_name("adam"))
    other.save(state_factory(optax.adam(1e-2)))
    other.wait()
    for target in (optax.adamw(1e-2), optax.adamw(1e-2, mask=lambda t: jax.tree.map(lambda x: x.ndim > 1, t))):
        with pytest.raises(checkpoint.CheckpointMismatchError, match=r"saved:  \(ScaleByAdamState, EmptyState\)"):
            other.restore(checkpoint.abstract_state(mlp_config, target))
    # a step written before the optimizer was recorded restores as before
    from eqzoo.checkpoint._integrity import with_crc

    path = ckpt_dir / str(ckpt.latest_step()) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    del meta["optimizer"]
    path.write_text(json.dumps(with_crc(meta)))
    older = open_checkpointer(ckpt_dir)
    assert older.meta().optimizer is None
    assert checkpoint.params_sha256(older.restore(adam).state.model) == checkpoint.params_sha256(state.model)


def test_a_target_whose_optimizer_covers_other_parameters_names_the_trainable_filter(ckpt_dir, open_checkpointer, mlp_config):
    # A LoRA run (trainable=peft.adapter_filter) restored into abstract_state(model, optimizer)
    # without the filter was told only "build the target with the saved run's optimizer", which
    # it had done: the target's optimizer state covered the frozen weights too.
    opt = optax.adam(1e-2)
    model = models.create(mlp_config, key=jax.random.key(0))
    head_only = eqx.tree_at(lambda m: m.net.layers[0], jax.tree.map(eqx.is_inexact_array, model), replace_fn=lambda t: jax.tree.map(lambda _: False, t))
    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(train.TrainState.create(model, opt, key=jax.random.key(1), trainable=head_only))
    ckpt.wait()
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"(?s)opt_state\.0\.mu\.net\.layers\.0\.weight: expected float32\(8, 6\), not in the checkpoint.*"
                       r"The optimizer states cover other parameters: the target's optimizer holds state for 2 parameter array\(s\) the saved run did not train \(net\.layers\.0\.bias, net\.layers\.0\.weight\)\. "
                       r"Build the target with the saved run's trainable filter.*trainable=eqzoo\.peft\.adapter_filter\(model\)"):
        ckpt.restore(checkpoint.abstract_state(mlp_config, opt))
    restored = ckpt.restore(checkpoint.abstract_state(mlp_config, opt, trainable=head_only))
    assert (restored.state.model.net.layers[0].weight == model.net.layers[0].weight).all()  # restored with the filter
    # the other way round: the saved run trained everything, the target only the head
    ckpt.save(train.TrainState.create(model, opt, key=jax.random.key(1)), step=3)
    ckpt.wait()
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"the saved run trained 2 parameter array\(s\) the target's optimizer leaves out \(net\.layers\.0\.bias, net\.layers\.0\.weight\)"):
        ckpt.restore(checkpoint.abstract_state(mlp_config, opt, trainable=head_only), step=3)


def test_lora_adapters_of_another_rank_name_the_rank(ckpt_dir, open_checkpointer, mlp_config, tmp_path):
    # A LoRA run resumed with another peft.lora(rank=...) was shown only the factors' shapes.
    from eqzoo import peft

    opt = optax.adam(1e-2)
    model = models.create(mlp_config, key=jax.random.key(0))

    def adapted(rank):
        return peft.lora(model, rank=rank, targets=r"layers\.0", key=jax.random.key(1))

    def state(rank):
        return train.TrainState.create(adapted(rank), opt, key=jax.random.key(2), trainable=peft.adapter_filter(adapted(rank)))

    ckpt = open_checkpointer(ckpt_dir)
    ckpt.save(state(2))
    ckpt.wait()
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"(?s)net\.layers\.0\.lora_a: expected float32\(3, 6\), found float32\(2, 6\).*"
                       r"The LoRA adapters differ in rank: the checkpoint holds rank 2, the target rank 3\. Build the target with eqzoo\.peft\.lora\(\.\.\., rank=2\)"):
        ckpt.restore(state(3))
    peft.save_adapters(adapted(2), tmp_path / "a.safetensors")
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"The LoRA adapters differ in rank: the file holds rank 2, the target rank 3"):
        peft.load_adapters(adapted(3), tmp_path / "a.safetensors")
    # Adapters of a wider base differ in the factors' input axis (lora_a (rank, in)), not in
    # their rank: no rank hint (it named the widths 8 and 16 as ranks).
    wide = models.create(dataclasses.replace(mlp_config, width=16), key=jax.random.key(0))
    peft.save_adapters(peft.lora(model, rank=2, targets=r"layers\.1", key=jax.random.key(1)), tmp_path / "b.safetensors")
    with pytest.raises(checkpoint.CheckpointMismatchError) as caught:
        peft.load_adapters(peft.lora(wide, rank=2, targets=r"layers\.1", key=jax.random.key(1)), tmp_path / "b.safetensors")
    assert "lora_a" in str(caught.value) and "differ in rank" not in str(caught.value)
