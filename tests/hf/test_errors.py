"""Bad checkpoints and arguments raise `HFFormatError` / `ConfigError` with messages that teach."""

import json
import shutil
import warnings

import equinox as eqx
import jax
import numpy as np
import pytest

import eqzoo.hf
from eqzoo._errors import ConfigError, EqzooError
from eqzoo.hf import HFFormatError
from eqzoo.models import MLP, MLPConfig

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _copy(folder, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(folder, out)
    return out


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    file = str(folder / "model.safetensors")
    tensors = safetensors_numpy.load_file(file)
    edit(tensors)
    safetensors_numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_error_type_is_an_eqzoo_error():
    assert issubclass(HFFormatError, EqzooError) and issubclass(HFFormatError, ValueError)


def test_unsupported_architecture_lists_the_supported_ones(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("gpt2")[1], tmp_path)
    _edit_config(folder, architectures=["BertForMaskedLM"], model_type="bert")
    with pytest.raises(HFFormatError, match=r"unsupported architectures \['BertForMaskedLM'\].*supports GPT2LMHeadModel \(model_type 'gpt2'\), LlamaForCausalLM.*MixtralForCausalLM \(model_type 'mixtral'\)"):
        eqzoo.hf.load_pretrained(folder)
    with pytest.raises(HFFormatError, match=r"unsupported model_type 'phi3'.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        eqzoo.hf.config_from_hf({"model_type": "phi3"})
    with pytest.raises(HFFormatError, match=r"architectures \['LlamaForCausalLM'\] but model_type 'gpt2'"):
        eqzoo.hf.config_from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "gpt2"})


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path)
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(HFFormatError, match=r"missing tensor\(s\) 'model.layers.1.mlp.up_proj.weight'"):
        eqzoo.hf.load_pretrained(folder)


def test_untied_llama_without_head_is_missing_lm_head(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path)
    _edit_tensors(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(HFFormatError, match=r"missing tensor\(s\) 'lm_head.weight'"):
        eqzoo.hf.load_pretrained(folder)


def test_unexpected_tensor_is_named(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path)
    extra = "model.layers.0.self_attn.q_norm.weight"
    _edit_tensors(folder, lambda t: t.__setitem__(extra, np.ones(16, np.float32)))
    with pytest.raises(HFFormatError, match=r"unexpected tensor\(s\) 'model.layers.0.self_attn.q_norm.weight'"):
        eqzoo.hf.load_pretrained(folder)


def test_shape_mismatch_names_expected_and_found(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path)
    _edit_config(folder, intermediate_size=128)
    with pytest.raises(HFFormatError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(176, 64\) but config.json implies \(128, 64\)"):
        eqzoo.hf.load_pretrained(folder)


def test_missing_mixtral_expert_is_named(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("mixtral")[1], tmp_path)
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(HFFormatError, match=r"missing tensor\(s\) 'model.layers.1.block_sparse_moe.experts.2.w3.weight'"):
        eqzoo.hf.load_pretrained(folder)


def test_mixtral_expert_count_mismatch_names_the_extra_experts(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("mixtral")[1], tmp_path)
    _edit_config(folder, num_local_experts=3)
    with pytest.raises(HFFormatError, match=r"unexpected tensor\(s\) 'model.layers.0.block_sparse_moe.experts.3.w1.weight'"):
        eqzoo.hf.load_pretrained(folder)


def test_fused_mixtral_experts_are_refused_with_the_fix(hf_checkpoints, tmp_path):
    """transformers 5 fuses experts in memory (`mlp.experts.gate_up_proj`); a file saved from
    that state dict directly, bypassing save_pretrained, is refused with the way out."""

    def fuse(tensors):
        for i in range(2):
            moe = f"model.layers.{i}.block_sparse_moe."
            tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack([
                np.concatenate([tensors.pop(f"{moe}experts.{j}.w1.weight"), tensors.pop(f"{moe}experts.{j}.w3.weight")])
                for j in range(4)
            ])
            tensors[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack([tensors.pop(f"{moe}experts.{j}.w2.weight") for j in range(4)])

    folder = _copy(hf_checkpoints("mixtral")[1], tmp_path)
    _edit_tensors(folder, fuse)
    with pytest.raises(HFFormatError, match=r"(?s)stores its experts fused \(for example 'model.layers.0.mlp.experts.down_proj'\).*experts.\{j\}.w1.weight.*from_pretrained\(...\).save_pretrained\(...\)"):
        eqzoo.hf.load_pretrained(folder)


def test_bad_sliding_window_is_refused(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("mistral")[1], tmp_path)
    _edit_config(folder, sliding_window=0)
    with pytest.raises(HFFormatError, match=r"sliding_window=0, which eqzoo does not support: it must be a positive integer or null"):
        eqzoo.hf.load_pretrained(folder)


def test_quantized_checkpoints_are_refused_by_their_method(hf_checkpoints, tmp_path):
    # A GPTQ/AWQ/bitsandbytes/FP8 folder's tensors are packed integers or scaled 8-bit floats
    # under other names: refused up front by the config key, not by a tensor-name mismatch.
    folder = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path)
    _edit_config(folder, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(HFFormatError, match=r"quantization_config=\{'quant_method': 'fp8'\}, which eqzoo does not support: .*unquantized.*eqzoo.quant.quantize"):
        eqzoo.hf.load_pretrained(folder)
    with pytest.raises(HFFormatError, match=r"quantization_config=\{'quant_method': 'gptq'\}"):
        eqzoo.hf.config_from_hf(json.loads((folder / "config.json").read_text()) | {"quantization_config": {"quant_method": "gptq", "bits": 4}})


def test_pickle_checkpoints_are_refused_with_a_conversion_command(hf_checkpoints, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(hf_checkpoints("gpt2")[1] / "config.json", folder)
    # Not a real pickle: eqzoo must refuse on the file name, never open it.
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFFormatError, match=r"(?s)only pickle-based weights \(\['pytorch_model.bin'\]\).*never loads pickle.*from_pretrained\(.*\).save_pretrained\("):
        eqzoo.hf.load_pretrained(folder)


def test_missing_files(hf_checkpoints, tmp_path):
    with pytest.raises(HFFormatError, match="is nothing; pass the folder of a Hugging Face checkpoint"):
        eqzoo.hf.load_pretrained(tmp_path / "nowhere")
    folder = _copy(hf_checkpoints("gpt2")[1], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(HFFormatError, match=r"no config.json in .*model.safetensors"):
        eqzoo.hf.load_pretrained(folder)
    shutil.copy(hf_checkpoints("gpt2")[1] / "config.json", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match=r"no model.safetensors or model.safetensors.index.json"):
        eqzoo.hf.load_pretrained(folder)


def test_bad_index_and_corrupt_file(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("gpt2")[1], tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(HFFormatError, match=r"names shard files that are missing: \['model-00001-of-00002.safetensors'\]"):
        eqzoo.hf.load_pretrained(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(HFFormatError, match="cannot read .* as safetensors"):
        eqzoo.hf.load_pretrained(folder)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"model_type": "llama", "hidden_act": "gelu"}, r"hidden_act='gelu'.*SwiGLU with silu"),
        ({"model_type": "llama", "attention_bias": True}, r"attention_bias=True.*no biases"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn'.*'default', 'linear' and 'llama3'"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"llama3 rope scaling lacks 'low_freq_factor'"),
        # transformers' linear / llama3 rotary embeddings read partial_rotary_factor (from the rope
        # parameters, or else the top level) and rotate only that fraction of each head.
        (
            {"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
            r"partial_rotary_factor=0.5.*rope_type 'linear' transformers rotates only that fraction.*eqzoo rotates the whole head",
        ),
        (
            {"model_type": "mistral", "partial_rotary_factor": 0.25, "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }},
            r"partial_rotary_factor=0.25.*rope_type 'llama3'",
        ),
        (
            {"model_type": "gemma3_text", "partial_rotary_factor": 0.5, "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }},
            r"partial_rotary_factor=0.5.*rope_type 'linear'",
        ),
        ({"model_type": "llama", "partial_rotary_factor": "half"}, r"partial_rotary_factor='half'; it must be a finite number"),
        ({"model_type": "mixtral", "hidden_act": "gelu"}, r"hidden_act='gelu'.*SwiGLU with silu"),
        ({"model_type": "mixtral", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn'.*'default', 'linear' and 'llama3'"),
        ({"model_type": "gpt2", "activation_function": "relu"}, r"activation_function='relu'.*tanh GELU"),
        ({"model_type": "gpt2", "tie_word_embeddings": False}, r"tie_word_embeddings=False.*always ties"),
        ({"model_type": "gpt2", "n_inner": 100}, r"n_inner=100.*multiple of n_embd=64"),
    ],
)
def test_unsupported_options(config, match):
    base = {
        "llama": dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4),
        "mixtral": dict(
            vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_local_experts=4, num_experts_per_tok=2,
        ),
        "gpt2": dict(vocab_size=100, n_positions=32, n_layer=1, n_head=4, n_embd=64),
    }[{"mistral": "llama", "gemma3_text": "llama"}.get(config["model_type"], config["model_type"])]
    with pytest.raises(HFFormatError, match=match):
        eqzoo.hf.config_from_hf(base | config)


def test_partial_rotary_factor_with_default_rope_is_accepted():
    # transformers' default rotary embedding for these families ignores it (parity: test_load.py).
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    plain = eqzoo.hf.config_from_hf({"model_type": "qwen2", **base})
    assert eqzoo.hf.config_from_hf({"model_type": "qwen2", "partial_rotary_factor": 0.5, **base}) == plain
    gemma3 = {"model_type": "gemma3_text", "sliding_window": 8, **base}
    local = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    nested = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": local}
    assert eqzoo.hf.config_from_hf(gemma3 | {"rope_parameters": nested}).local_rope_theta == 1e4


def test_incomplete_config_names_missing_keys():
    with pytest.raises(HFFormatError, match=r"lacks \['n_positions', 'n_layer'\]"):
        eqzoo.hf.config_from_hf({"model_type": "gpt2", "vocab_size": 10, "n_head": 2, "n_embd": 8})
    with pytest.raises(HFFormatError, match=r"model_type 'mixtral' lacks \['num_local_experts', 'num_experts_per_tok'\]"):
        eqzoo.hf.config_from_hf({
            "model_type": "mixtral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4,
        })


def test_bad_arguments(hf_checkpoints, loaded, tmp_path):
    folder = hf_checkpoints("gpt2")[1]
    with pytest.raises(ConfigError, match="GPT2Config has no fields \\['num_kv_heads'\\]"):
        eqzoo.hf.load_pretrained(folder, config_overrides={"num_kv_heads": 2})
    with pytest.raises(ConfigError, match="sharding must be a jax.sharding.Sharding, a callable"):
        eqzoo.hf.load_pretrained(folder, sharding="fsdp")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"the sharding for 'embed.weight' is a str"):
        eqzoo.hf.load_pretrained(folder, sharding=lambda path, leaf: "replicated")  # type: ignore[arg-type,return-value]
    # an integer dtype rounded every weight away (int8 gave an all-zero model and an int8
    # export) instead of quantizing; transformers' "auto" is the default, and a torch dtype is named
    with pytest.raises(ConfigError, match=r"load_pretrained: dtype=int8 is not a floating-point dtype.*eqzoo.quant.quantize"):
        eqzoo.hf.load_pretrained(folder, dtype=np.int8)
    with pytest.raises(ConfigError, match=r"save_pretrained: dtype=int32 is not a floating-point dtype"):
        eqzoo.hf.save_pretrained(loaded("gpt2"), tmp_path / "int", dtype="int32")
    assert not (tmp_path / "int").exists()
    with pytest.raises(ConfigError, match=r"dtype='torch.bfloat16' is not a JAX or NumPy dtype"):
        eqzoo.hf.load_pretrained(folder, dtype="torch.bfloat16")
    assert eqzoo.hf.load_pretrained(folder, dtype="auto").embed.weight.dtype == np.float32
    mlp = eqx.filter_eval_shape(MLP, MLPConfig(), key=jax.random.key(0))
    with pytest.raises(HFFormatError, match="save_pretrained exports eqzoo GPT2, Llama, Mixtral, Gemma and ViT models; got MLP"):
        eqzoo.hf.save_pretrained(mlp, tmp_path)  # type: ignore[arg-type]


def test_a_tied_config_with_a_different_stored_head_loads_untied_as_transformers_does(hf_checkpoints, tmp_path, hft):
    # config.json says tie_word_embeddings, but the file holds an lm_head.weight unlike the
    # embedding: transformers computes with the stored head (and warns), so eqzoo does too
    # (fp32, tolerance 1e-5). Tying it silently gave logits up to ~1.4 away.
    folder = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path)
    _edit_config(folder, tie_word_embeddings=True)
    with pytest.warns(UserWarning, match=r"ties the output head .* separate lm_head.weight that differs from it; loading it untied"):
        model = eqzoo.hf.load_pretrained(folder)
    assert not model.config.tie_embeddings
    tokens = hft.random_tokens(0)
    want = hft.hf_logits(hf_checkpoints("llama-gqa-untied")[0], tokens)
    np.testing.assert_allclose(np.asarray(jax.vmap(model)(tokens)), want, rtol=1e-5, atol=1e-5)
    forced = eqzoo.hf.load_pretrained(folder, config_overrides={"tie_embeddings": True})  # the override wins
    assert forced.config.tie_embeddings
    # a stored head equal to the embedding stays tied, without a warning
    _edit_tensors(folder, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eqzoo.hf.load_pretrained(folder).config.tie_embeddings
    # GPT-2 always ties: a different stored head is refused
    gpt2 = _copy(hf_checkpoints("gpt2")[1], tmp_path / "g")
    _edit_tensors(gpt2, lambda t: t.__setitem__("lm_head.weight", t["transformer.wte.weight"] + 1))
    with pytest.raises(HFFormatError, match=r"lm_head.weight that differs from the token embedding.*GPT-2 ties"):
        eqzoo.hf.load_pretrained(gpt2)


def test_duplicated_tensors_both_weight_files_and_integer_weights(hf_checkpoints, tmp_path):
    folder = _copy(hf_checkpoints("gpt2")[1], tmp_path)
    tensors = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    # a tensor stored in two shards: which copy is meant is never guessed
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2] + [names[-1]], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in shards.items():
        safetensors_numpy.save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # both a single file and an index: the single file is read, as transformers reads it
    with pytest.warns(UserWarning, match=r"holds both model.safetensors and model.safetensors.index.json; reading model.safetensors"):
        eqzoo.hf.load_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match=rf"the tensor '{names[-1]}' is stored twice, in 'model-00001-of-00002.safetensors' and 'model-00002-of-00002.safetensors'"):
        eqzoo.hf.load_pretrained(folder)

    folder = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path / "int")
    _edit_tensors(folder, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.int32)))
    with pytest.raises(HFFormatError, match=r"tensor 'model.norm.weight' is stored as I32, not floating point"):
        eqzoo.hf.load_pretrained(folder, dtype=np.float32)
    # 8-bit floats without a quantization_config: a quantized file all the same, never loaded as weights
    import safetensors.torch
    import torch

    fp8 = _copy(hf_checkpoints("llama-gqa-untied")[1], tmp_path / "fp8")
    tensors = safetensors.torch.load_file(str(fp8 / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    safetensors.torch.save_file(tensors, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"tensor 'model.norm.weight' is stored as F8_E4M3, an 8-bit float: the checkpoint is quantized"):
        eqzoo.hf.load_pretrained(fp8)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("rms_norm_eps", None, r"rms_norm_eps=None; it must be a finite number"),
        ("max_position_embeddings", None, r"max_position_embeddings=None; it must be an integer"),
        ("num_hidden_layers", "2", r"num_hidden_layers='2'; it must be an integer"),
        ("hidden_size", 64.5, r"hidden_size=64.5; it must be an integer"),
        ("head_dim", "wide", r"wrong type"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(key, value, match):
    base = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    assert eqzoo.hf.config_from_hf(base | {"num_hidden_layers": 2.0}).num_layers == 2  # an integral float is an integer
    with pytest.raises(HFFormatError, match=match):
        eqzoo.hf.config_from_hf(base | {key: value})
