"""Exporting eqzoo models: transformers loads them with no warnings and computes the same logits."""

import dataclasses
import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo.hf
from eqzoo._errors import ConfigError
from eqzoo.models import GemmaConfig, GPT2Config, LlamaConfig, MixtralConfig, model_class
from eqzoo.nn import RopeScaling

ATOL = 1e-4  # fp32, whole model (STYLE.md rule 11)

CONFIGS = {
    "gpt2": GPT2Config(vocab_size=160, max_seq=64, num_layers=2, num_heads=4, embed_dim=64),
    "llama-gqa-untied": LlamaConfig(
        vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=176, tie_embeddings=False,
    ),
    "llama-gqa-tied": LlamaConfig(
        vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=176, head_dim=32, rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=True,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16),
    ),
    "mixtral": MixtralConfig(
        vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=96, num_experts=4, experts_per_token=2, router_aux_loss_coef=0.05,
    ),
    "qwen3": LlamaConfig(
        vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=176, head_dim=32, rms_norm_eps=1e-6, tie_embeddings=True, qk_norm=True,
    ),
    "qwen3-moe": MixtralConfig(
        vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=48, num_experts=4, experts_per_token=2, normalize_router_weights=False,
        rms_norm_eps=1e-6, qk_norm=True,
    ),
    # Gemma 3: windows on layers 0 and 2 of 3, query/key norms, untied head, one linearly scaled
    # rotary embedding for every layer (no local base: written as the sliding layers' too; the
    # loading tests cover two bases); Gemma (the first): no sandwich norms, windows or caps.
    "gemma3": GemmaConfig(
        vocab_size=160, max_seq=64, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=96, head_dim=32, query_pre_attn_scalar=24.0, rope_theta=1e4,
        rope_scaling=RopeScaling(factor=2.0, rope_type="linear"),
        sliding_window=8, sliding_window_pattern=2, qk_norm=True, attn_logit_softcap=None,
        final_logit_softcap=None, tie_embeddings=False,
    ),
    # Gemma 2 without a window (transformers still builds its sliding mask: max_seq is written).
    "gemma2-full": GemmaConfig(
        vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=96, head_dim=32, sliding_window=None,
    ),
    "gemma": GemmaConfig(
        vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        hidden_dim=96, head_dim=32, sliding_window=None, post_norms=False, attn_logit_softcap=None,
        final_logit_softcap=None, query_pre_attn_scalar=None, sliding_window_pattern=None,
    ),
}
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "qwen3-moe": "Qwen3MoeForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2-full": "Gemma2ForCausalLM",
}


def _random_model(family: str, seed: int = 0):
    """A model of `family` whose every parameter (norm scales and biases too) is random, so a
    misplaced or mis-transposed tensor cannot go unnoticed. Built from the model's shape
    skeleton with numpy draws, which is much faster on CPU than eager initialisation."""
    config = CONFIGS[family]
    skeleton = eqx.filter_eval_shape(model_class(config), config, key=jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape, dtype=np.float32)), skeleton
    )


@eqx.filter_jit
def _batched(model, tokens):
    return jax.vmap(model)(tokens)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_export_loads_in_transformers_with_equal_logits(family, tmp_path, hft):
    model = _random_model(family)
    eqzoo.hf.save_pretrained(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    hf_model = hft.load_with_transformers(tmp_path)  # asserts: no missing/unexpected keys, no warnings
    assert type(hf_model).__name__ == ARCHITECTURES.get(family, "LlamaForCausalLM")
    tokens = hft.random_tokens(5, shape=(2, 40))
    ours = np.asarray(_batched(model, jnp.asarray(tokens)))
    err = np.abs(ours - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"{family}: max |eqzoo - transformers| logit = {err:.2e} >= {ATOL}"
    # ... and eqzoo reads its own export back exactly.
    assert bool(eqx.tree_equal(eqzoo.hf.load_pretrained(tmp_path), model))


def test_qwen3_moe_export_writes_the_model_s_widths(tmp_path, hft):
    # intermediate_size was transformers' default 6144 whatever the model; it is now the expert
    # width a token uses (Qwen's convention), and the sparse-layer keys say every layer is sparse.
    config = dataclasses.replace(CONFIGS["qwen3-moe"], experts_per_token=3)
    skeleton = eqx.filter_eval_shape(model_class(config), config, key=jax.random.key(0))
    rng = np.random.default_rng(3)
    model = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape, dtype=np.float32)), skeleton)
    eqzoo.hf.save_pretrained(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["intermediate_size"] == 3 * 48 and written["moe_intermediate_size"] == 48
    assert (written["decoder_sparse_step"], written["mlp_only_layers"], written["num_experts"], written["num_experts_per_tok"]) == (1, [], 4, 3)
    hf_model = hft.load_with_transformers(tmp_path)
    assert hf_model.config.intermediate_size == 144
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf_model.model.layers)
    tokens = hft.random_tokens(7, shape=(2, 24))
    err = np.abs(np.asarray(_batched(model, jnp.asarray(tokens))) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"max |eqzoo - transformers| logit = {err:.2e} >= {ATOL}"  # fp32 whole model: 1e-4
    assert eqzoo.hf.config_from_hf(written) == config
    with pytest.raises(ConfigError, match=r"extra_config may not change 'mlp_only_layers' \(the model has \[\], got \[0\]\)"):
        eqzoo.hf.save_pretrained(model, tmp_path, extra_config={"mlp_only_layers": [0]})


def test_sharded_export(tmp_path, hft):
    model = _random_model("llama-gqa-untied", seed=1)
    eqzoo.hf.save_pretrained(model, tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    hft.load_with_transformers(tmp_path)
    assert bool(eqx.tree_equal(eqzoo.hf.load_pretrained(tmp_path), model))

    # Saving again as one file removes the stale shards and index.
    eqzoo.hf.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_plan_shards_edge_cases():
    from eqzoo.hf._save import _plan_shards

    f32, i8 = np.dtype(np.float32), np.dtype(np.int8)
    table = {"c": (None, (2,), f32), "a": (None, (2, 2), f32), "b": (None, (16,), i8)}  # 8, 16, 16 bytes
    assert _plan_shards(table, None) == [["a", "b", "c"]]  # no limit: one shard, in name order
    assert _plan_shards(table, 40) == [["a", "b", "c"]]  # exact fit: 16 + 16 + 8 == 40
    assert _plan_shards(table, 39) == [["a", "b"], ["c"]]
    assert _plan_shards(table, 32) == [["a", "b"], ["c"]]
    assert _plan_shards(table, 31) == [["a"], ["b", "c"]]
    # a tensor bigger than the limit gets a shard of its own rather than being split or refused
    big = {**table, "bb": (None, (100,), f32)}
    assert _plan_shards(big, 16) == [["a"], ["b"], ["bb"], ["c"]]
    assert _plan_shards({"x": (None, (3, 5), f32)}, 1) == [["x"]]
    # an empty table: one empty shard (save_pretrained writes one model.safetensors)
    assert _plan_shards({}, None) == [[]] and _plan_shards({}, 10) == [[]]


def test_bf16_export(tmp_path, hft):
    model = _random_model("gpt2", seed=2)
    eqzoo.hf.save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    written = json.loads((tmp_path / "config.json").read_text())
    # "dtype" for transformers 5, "torch_dtype" for 4.x (whose torch_dtype="auto" reads only it)
    assert (written["dtype"], written["torch_dtype"]) == ("bfloat16", "bfloat16")
    hf_model = hft.load_with_transformers(tmp_path)  # asserts: no warning about either key
    assert hf_model.dtype == hft.torch.bfloat16
    with hft.transformers_messages() as messages:
        auto = hft.transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert auto.dtype == hft.torch.bfloat16 and auto.config.dtype == hft.torch.bfloat16 and not messages, messages
    with pytest.raises(ConfigError, match="extra_config may not change 'torch_dtype' \\(the model has 'bfloat16', got 'float32'\\)"):
        eqzoo.hf.save_pretrained(model, tmp_path, dtype=jnp.bfloat16, extra_config={"torch_dtype": "float32"})
    back = eqzoo.hf.load_pretrained(tmp_path)
    expected = np.asarray(model.embed.weight.astype(jnp.bfloat16))
    assert np.asarray(back.embed.weight).tobytes() == expected.tobytes()


def test_extra_config_and_generation_config(tmp_path, hft):
    model = _random_model("llama-gqa-untied")
    eqzoo.hf.save_pretrained(model, tmp_path, extra_config={"eos_token_id": 3, "bos_token_id": 1})
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 3 and generation["bos_token_id"] == 1
    hf_model = hft.load_with_transformers(tmp_path)
    assert hf_model.generation_config.eos_token_id == 3
    with pytest.raises(ConfigError, match="extra_config may not change 'num_hidden_layers'"):
        eqzoo.hf.save_pretrained(model, tmp_path, extra_config={"num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="max_shard_size must be bytes or a string like '5GB'"):
        eqzoo.hf.save_pretrained(model, tmp_path, max_shard_size="lots")


def test_like_carries_token_ids_generation_config_and_tokenizer(hf_checkpoints, tmp_path, hft):
    # Load, (fine-tune,) export with like=the original: the token ids, the generation settings
    # (here two eos ids, as instruction-tuned models list them) and the tokenizer files come
    # along, so transformers decodes and stops as with the original. Without like they are null.
    source = tmp_path / "source"
    shutil.copytree(hf_checkpoints("llama-gqa-untied")[1], source)
    config = json.loads((source / "config.json").read_text())
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    (source / "config.json").write_text(json.dumps(config))
    generation = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": False, "max_new_tokens": 5}
    (source / "generation_config.json").write_text(json.dumps(generation))
    (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    model = eqzoo.hf.load_pretrained(source)

    plain = eqzoo.hf.save_pretrained(model, tmp_path / "plain")
    assert json.loads((plain / "config.json").read_text())["eos_token_id"] is None
    assert not (plain / "tokenizer_config.json").exists()

    out = eqzoo.hf.save_pretrained(model, tmp_path / "out", like=source)
    written = json.loads((out / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, 2, 0)
    assert json.loads((out / "generation_config.json").read_text()) == generation
    assert (out / "tokenizer_config.json").read_text() == (source / "tokenizer_config.json").read_text()
    hf_model = hft.load_with_transformers(out)
    assert hf_model.generation_config.eos_token_id == [2, 7]
    np.testing.assert_allclose(  # fp32; tolerance 1e-5: the same weights in both
        hft.hf_logits(hf_model, hft.random_tokens(0)), np.asarray(jax.vmap(model)(hft.random_tokens(0))), rtol=1e-5, atol=1e-5
    )
    again = eqzoo.hf.save_pretrained(model, out, like=out)  # exporting over the folder it came from
    assert json.loads((again / "generation_config.json").read_text()) == generation
    # extra_config wins over like
    eqzoo.hf.save_pretrained(model, tmp_path / "eos5", like=source, extra_config={"eos_token_id": 5})
    assert json.loads((tmp_path / "eos5" / "config.json").read_text())["eos_token_id"] == 5
    assert json.loads((tmp_path / "eos5" / "generation_config.json").read_text()) == {**generation, "eos_token_id": 5}

    other = tmp_path / "other"
    shutil.copytree(source, other)
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 999}))
    with pytest.raises(ConfigError, match=r"like=.* has vocab_size 999, the model 160"):
        eqzoo.hf.save_pretrained(model, tmp_path / "bad", like=other)


def test_like_keeps_mistral_without_a_window(tmp_path, hft):
    # A Mistral with sliding_window null is a Llama exactly, and loads as a plain LlamaConfig.
    # Exported with like= the original it is a MistralForCausalLM again; without like, Llama.
    source = tmp_path / "source"
    hft.make_mistral(11, sliding_window=None).save_pretrained(source)
    model = eqzoo.hf.load_pretrained(source)
    assert isinstance(model.config, LlamaConfig) and model.config.sliding_window is None

    plain = json.loads((eqzoo.hf.save_pretrained(model, tmp_path / "plain") / "config.json").read_text())
    assert (plain["architectures"], plain["model_type"]) == (["LlamaForCausalLM"], "llama")

    out = eqzoo.hf.save_pretrained(model, tmp_path / "out", like=source)
    written = json.loads((out / "config.json").read_text())
    assert (written["architectures"], written["model_type"]) == (["MistralForCausalLM"], "mistral")
    assert written["sliding_window"] is None and "attention_bias" not in written
    hf_model = hft.load_with_transformers(out)  # asserts: no missing/unexpected keys, no warnings
    assert type(hf_model).__name__ == "MistralForCausalLM" and hf_model.config.sliding_window is None
    tokens = hft.random_tokens(6, shape=(2, 40))
    err = np.abs(np.asarray(_batched(model, jnp.asarray(tokens))) - hft.hf_logits(hf_model, tokens)).max()
    assert err < ATOL, f"Mistral without a window: max |eqzoo - transformers| logit = {err:.2e} >= {ATOL}"
    assert bool(eqx.tree_equal(eqzoo.hf.load_pretrained(out), model))

    # like= keeps an architecture only where it is exact: a windowed Llama stays Mistral next to
    # a Llama folder, and a Llama with query/key/value biases stays Qwen2 next to a Mistral one.
    llama_folder = tmp_path / "plain"
    for changes, like, expected in [
        ({"sliding_window": 8}, llama_folder, "MistralForCausalLM"),
        ({"qkv_bias": True}, source, "Qwen2ForCausalLM"),
    ]:
        config = dataclasses.replace(CONFIGS["llama-gqa-untied"], **changes)
        other = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), eqx.filter_eval_shape(model_class(config), config, key=jax.random.key(0)))
        eqzoo.hf.save_pretrained(other, tmp_path / "other", like=like)
        assert json.loads((tmp_path / "other" / "config.json").read_text())["architectures"] == [expected]
