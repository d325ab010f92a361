"""Weights-only safetensors files and the parameter fingerprint."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
import safetensors.numpy

from eqzoo import checkpoint, models
from eqzoo._errors import ConfigError

CONFIG = models.GPT2Config(vocab_size=16, max_seq=8, num_layers=1, num_heads=2, embed_dim=8)


@pytest.fixture(scope="module")
def model():
    # Random values drawn on the host: a real GPT-2 without compiling its initialisation.
    abstract = eqx.filter_eval_shape(lambda k: models.create(CONFIG, key=k), jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)) if isinstance(x, jax.ShapeDtypeStruct) else x,
        abstract,
    )


def _bf16(m):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, m)


def test_round_trip_keys_are_leaf_paths(model, tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(model, path)
    tensors = safetensors.numpy.load_file(str(path))
    assert "blocks.layers.attn.q_proj.weight" in tensors and "embed.weight" in tensors
    like = eqx.filter_eval_shape(lambda k: models.create(CONFIG, key=k), jax.random.key(1))
    loaded = checkpoint.load_weights(like, path)
    assert checkpoint.params_sha256(loaded) == checkpoint.params_sha256(model)
    assert jax.tree.structure(loaded) == jax.tree.structure(model)
    from_config = checkpoint.load_weights(CONFIG, path)
    assert checkpoint.params_sha256(from_config) == checkpoint.params_sha256(model)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_bf16_and_cast(model, tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(_bf16(model), path)
    loaded = checkpoint.load_weights(_bf16(model), path)
    assert loaded.embed.weight.dtype == jnp.bfloat16
    assert checkpoint.params_sha256(loaded) == checkpoint.params_sha256(_bf16(model))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"embed.weight: expected float32\(16, 8\), found bfloat16\(16, 8\)\n(.*\n)*Pass cast=True"):
        checkpoint.load_weights(model, path)
    upcast = checkpoint.load_weights(model, path, cast=True)
    assert upcast.embed.weight.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(upcast.embed.weight), np.asarray(_bf16(model).embed.weight.astype(jnp.float32)))


def test_load_onto_a_sharding(model, tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(model, path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.P())
    like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) if eqx.is_array(x) else x, model
    )
    loaded = checkpoint.load_weights(like, path)
    assert loaded.embed.weight.sharding == sharding


def test_mismatch_and_missing(model, tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(model, path)
    other = models.GPT2Config(vocab_size=16, max_seq=8, num_layers=1, num_heads=2, embed_dim=8, mlp_ratio=2)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"weights file .* does not fit the model:\n  blocks.layers.mlp.up.weight: expected float32\(1, 16, 8\), found float32\(1, 32, 8\)"):
        checkpoint.load_weights(other, path)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"extra: found float32\(3,\), not in the model"):
        safetensors.numpy.save_file({**safetensors.numpy.load_file(str(path)), "extra": np.zeros(3, np.float32)}, str(path))
        checkpoint.load_weights(model, path)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"a: expected float32\(2,\), not in the file"):
        checkpoint.load_weights({"a": jnp.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="no weights file at .*nope.safetensors"):
        checkpoint.load_weights(model, tmp_path / "nope.safetensors")


def test_corrupt_and_truncated_files(model, tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(model, path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointCorruptError, match=r"weights file .*: tensor \S+ fails its CRC-32 check") as info:
        checkpoint.load_weights(model, path)
    assert info.value.step is None and len(info.value.parameters) == 1
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="weights file .* is corrupt or truncated"):
        checkpoint.load_weights(model, path)


def test_keys_are_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"the model holds PRNG keys at \['key'\]"):
        checkpoint.save_weights({"w": jnp.ones(2), "key": jax.random.key(0)}, tmp_path / "w.safetensors")


def test_params_sha256(model):
    digest = checkpoint.params_sha256(model)
    assert len(digest) == 64 and digest == checkpoint.params_sha256(model)
    nudged = eqx.tree_at(lambda m: m.final_norm.weight, model, model.final_norm.weight.at[0].add(1e-7))
    assert checkpoint.params_sha256(nudged) != digest
    # Bytes in tree order: the same as hashing the leaves by hand.
    import hashlib

    by_hand = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))))
    assert by_hand.hexdigest() == digest


def test_a_file_saved_from_another_config_of_the_same_shapes_is_refused(tmp_path):
    # Routing that differs (experts per token) changes a Mixtral without changing a shape: it loaded.
    model = models.create("tiny-mixtral", key=jax.random.key(0))
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(model, path)
    other = models.create("tiny-mixtral", key=jax.random.key(1), experts_per_token=1)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"(?s)saved from a model whose config differs.*experts_per_token: file 2, model 1.*allow_config_change=True"):
        checkpoint.load_weights(other, path)
    loaded = checkpoint.load_weights(other, path, allow_config_change=True)
    np.testing.assert_array_equal(loaded.embed.weight, model.embed.weight)
    # how it runs may differ (RESTORE_MAY_CHANGE): another MoE implementation loads silently
    checkpoint.load_weights(models.create("tiny-mixtral", key=jax.random.key(1), moe_implementation="dense"), path)


class _OwnNet(eqx.Module):
    """A model of the user's own, with its own config dataclass (not an eqzoo family)."""

    config: "_OwnConfig" = eqx.field(static=True)
    lin: eqx.nn.Linear

    def __init__(self, config, *, key):
        self.config = config
        self.lin = eqx.nn.Linear(4, config.width, key=key)


@dataclasses.dataclass(frozen=True)
class _OwnConfig:
    width: int = 3


def test_own_model_shape_mismatch_and_own_config(tmp_path, unchecked):
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(_OwnNet(_OwnConfig(), key=jax.random.key(0)), path)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"lin.weight: expected float32\(5, 4\), found float32\(3, 4\)") as err:
        checkpoint.load_weights(_OwnNet(_OwnConfig(width=5), key=jax.random.key(0)), path)
    assert "cast=True" not in str(err.value)  # shapes differ, not dtypes: casting would not help
    # a config eqzoo cannot build a model from says to pass the model instead
    with pytest.raises(ConfigError, match="_OwnConfig is not one of eqzoo's model configs .*pass the model itself"):
        checkpoint.load_weights(_OwnConfig(), path)
    with pytest.raises(ConfigError, match="_OwnConfig is not one of eqzoo's model configs .*abstract_state\\(lambda k"):
        checkpoint.abstract_state(_OwnConfig(), optax.sgd(0.1))
    with unchecked(), pytest.raises(ConfigError, match="_OwnConfig is not one of eqzoo's model configs"):
        models.model_class(_OwnConfig())  # a KeyError before; with checking on, its annotation refuses it
    loaded = checkpoint.load_weights(eqx.filter_eval_shape(_OwnNet, _OwnConfig(), key=jax.random.key(1)), path)
    assert loaded.lin.weight.shape == (3, 4)


class _Scaled(eqx.Module):
    """A layer of the user's own whose output scale is a static field (no config to compare)."""

    lin: eqx.nn.Linear
    scale: float = eqx.field(static=True)

    def __init__(self, scale, *, key):
        self.lin = eqx.nn.Linear(4, 3, key=key)
        self.scale = scale


def test_a_file_saved_with_other_non_array_settings_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(_Scaled(0.5, key=jax.random.key(0)), path)
    other = eqx.filter_eval_shape(lambda k: _Scaled(2.0, key=k), jax.random.key(1))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"(?s)whose non-array settings differ from this one's:\n  model.scale: file 0.5, model 2.0\n.*allow_config_change=True"):
        checkpoint.load_weights(other, path)
    assert checkpoint.load_weights(other, path, allow_config_change=True).scale == 2.0
    assert checkpoint.load_weights(_Scaled(0.5, key=jax.random.key(1)), path).scale == 0.5
    # a file written before the settings were recorded loads as before
    tensors = safetensors.numpy.load_file(str(path))
    with safetensors.safe_open(str(path), framework="numpy") as f:
        header = {k: v for k, v in f.metadata().items() if k != "eqzoo.statics"}
    safetensors.numpy.save_file(tensors, str(path), metadata=header)
    assert checkpoint.load_weights(other, path).scale == 2.0


class _Codes(eqx.Module):
    """Integer codes beside a floating scale, as a quantized layer holds them."""

    codes: jax.Array
    scale: jax.Array


def test_cast_converts_floating_dtypes_only(tmp_path):
    path = tmp_path / "w.safetensors"
    saved = _Codes(jnp.arange(-3, 3, dtype=jnp.int8).reshape(2, 3), jnp.ones((2,), jnp.float32))
    checkpoint.save_weights(saved, path)
    # the floating scale casts; the integer codes would turn into other values (uint8 wraps -3 to 253)
    for codes in (jnp.zeros((2, 3), jnp.uint8), jnp.zeros((2, 3), jnp.float32)):
        with pytest.raises(checkpoint.CheckpointMismatchError, match=r"codes: expected \w+\(2, 3\), found int8\(2, 3\) \(cast=True converts floating dtypes only\)"):
            checkpoint.load_weights(_Codes(codes, jnp.ones((2,), jnp.bfloat16)), path, cast=True)
    loaded = checkpoint.load_weights(_Codes(jnp.zeros((2, 3), jnp.int8), jnp.ones((2,), jnp.bfloat16)), path, cast=True)
    assert loaded.scale.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(loaded.codes), np.asarray(saved.codes))
