"""`config_from_hf` / `config_to_hf` against transformers' own config classes."""

import json

import pytest
from jaxtyping import TypeCheckError

from eqzoo._errors import ConfigError
from eqzoo.hf import SUPPORTED_ARCHITECTURES, HFFormatError, config_from_hf, config_to_hf
from eqzoo.models import GPT2Config, LlamaConfig, MixtralConfig
from eqzoo.nn import RopeScaling

LLAMA3 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize(
    "config",
    [
        GPT2Config(vocab_size=160, max_seq=64, num_layers=2, num_heads=4, embed_dim=64, mlp_ratio=2, layer_norm_eps=1e-6),
        LlamaConfig(vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=176),
        LlamaConfig(
            vocab_size=160, max_seq=256, num_layers=2, num_heads=4, num_kv_heads=1, embed_dim=64,
            hidden_dim=96, head_dim=32, rope_theta=500000.0, rope_scaling=LLAMA3, rms_norm_eps=1e-5,
            tie_embeddings=True,
        ),
        MixtralConfig(
            vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
            hidden_dim=96, num_experts=4, experts_per_token=2, router_aux_loss_coef=0.05,
        ),
        MixtralConfig(
            vocab_size=160, max_seq=256, num_layers=1, num_heads=4, num_kv_heads=1, embed_dim=64,
            hidden_dim=48, num_experts=8, experts_per_token=1, head_dim=32, rope_scaling=LLAMA3,
            tie_embeddings=True, router_aux_loss_coef=0.0,
        ),
        LlamaConfig(vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=176, sliding_window=16),
        MixtralConfig(
            vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
            hidden_dim=96, num_experts=4, experts_per_token=2, sliding_window=16,
        ),
        LlamaConfig(vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=176, qkv_bias=True, tie_embeddings=True),
        LlamaConfig(vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=176, qkv_bias=True, sliding_window=16),
        LlamaConfig(
            vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
            hidden_dim=176, head_dim=32, qk_norm=True, tie_embeddings=True, sliding_window=16,
        ),
        MixtralConfig(
            vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
            hidden_dim=48, num_experts=8, experts_per_token=2, qk_norm=True,
            normalize_router_weights=False, router_aux_loss_coef=0.001,
        ),
        MixtralConfig(
            vocab_size=160, max_seq=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
            hidden_dim=48, num_experts=8, experts_per_token=2, qk_norm=True, sliding_window=16,
        ),
    ],
    ids=[
        "gpt2", "llama", "llama3-scaled-tied", "mixtral", "mixtral-top1-scaled-tied", "mistral-windowed",
        "mixtral-windowed", "qwen2", "qwen2-windowed", "qwen3-windowed-tied", "qwen3-moe", "qwen3-moe-windowed-normalised",
    ],
)
def test_round_trip_through_transformers_config(config, tmp_path, hft):
    hf = config_to_hf(config)
    assert hf["architectures"][0] in SUPPORTED_ARCHITECTURES
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with hft.transformers_messages() as messages:
        hf_config = hft.transformers.AutoConfig.from_pretrained(tmp_path)
    assert not messages, messages
    # transformers' own reading of what we wrote gives back the same eqzoo config ...
    assert config_from_hf(hf_config.to_dict()) == config
    # ... and so does ours.
    assert config_from_hf(hf) == config
    if isinstance(config, MixtralConfig) and config.qk_norm:
        assert type(hf_config).__name__ == "Qwen3MoeConfig"
        assert hf_config.num_experts == config.num_experts
        assert hf_config.norm_topk_prob == config.normalize_router_weights
        assert hf_config.moe_intermediate_size == config.hidden_dim
    elif isinstance(config, MixtralConfig):
        assert type(hf_config).__name__ == "MixtralConfig"
        assert hf_config.num_local_experts == config.num_experts
        assert hf_config.num_experts_per_tok == config.experts_per_token
        assert hf_config.router_aux_loss_coef == config.router_aux_loss_coef
        assert hf_config.router_jitter_noise == 0.0
    if isinstance(config, LlamaConfig | MixtralConfig):
        assert getattr(hf_config, "sliding_window", None) == config.sliding_window  # HF Llama has none
        if isinstance(config, LlamaConfig):
            expected = (
                "Qwen3Config" if config.qk_norm else "Qwen2Config" if config.qkv_bias
                else "LlamaConfig" if config.sliding_window is None else "MistralConfig"
            )
            assert type(hf_config).__name__ == expected
        assert hf_config.num_key_value_heads == config.num_kv_heads
        assert hf_config.head_dim == config.resolved_head_dim
        assert hf_config.rope_parameters["rope_theta"] == config.rope_theta
        assert hf_config.tie_word_embeddings == config.tie_embeddings


def test_rope_spellings_of_transformers_4_and_5_agree():
    base = dict(
        model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=4,
    )
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    v5 = config_from_hf(base | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    v4 = config_from_hf(base | {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
    oldest = config_from_hf(base | {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    assert v5 == v4 == oldest
    assert v5.rope_theta == 5e5 and v5.rope_scaling == RopeScaling(**scaling)
    assert config_from_hf(base | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}).rope_scaling is None

    # Both spellings, as eqzoo's exports write them (the same rotation): read as before.
    both = base | {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling},
                   "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    assert config_from_hf(both) == v5
    linear = {"rope_type": "linear", "factor": 4.0}
    assert config_from_hf(base | {"rope_theta": 5e5, "rope_scaling": linear, "rope_parameters": {**linear, "rope_theta": 5e5}}).rope_scaling == RopeScaling(factor=4.0, rope_type="linear")


@pytest.mark.parametrize(
    "scaling, match",
    [
        # transformers 5 reads rope_scaling instead of rope_parameters: linear, at its default theta
        ({"rope_type": "linear", "factor": 4.0}, r"rope_scaling=\{'rope_type': 'linear', 'factor': 4.0\} and rope_parameters=.*describe different rotary embeddings \(theta 10000, .*linear.* against theta 500000, None\).*transformers 5 reads rope_scaling and ignores rope_parameters.*Keep the one you mean"),
        # ... which may be one eqzoo does not implement
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, r"rope_type='yarn'.*only 'default', 'linear' and 'llama3'"),
    ],
)
def test_rope_scaling_that_contradicts_rope_parameters_is_refused(scaling, match):
    # A rope_scaling added to a transformers 5 config.json: transformers computes with it, eqzoo
    # used to read rope_parameters (here plain rotary at theta 5e5) and gave other logits silently.
    d = dict(
        model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_scaling=scaling,
    )
    with pytest.raises(HFFormatError, match=match):
        config_from_hf(d)


def test_defaults_and_overrides():
    llama = config_from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 16,
    })
    assert llama.num_kv_heads == 4 and llama.head_dim is None and not llama.tie_embeddings
    gpt2 = config_from_hf(
        {"model_type": "gpt2", "vocab_size": 100, "n_positions": 32, "n_layer": 1, "n_head": 4, "n_embd": 64},
        remat="full", scan_layers=False,
    )
    assert gpt2.hidden_dim == 256 and gpt2.remat == "full" and not gpt2.scan_layers


def test_mixtral_defaults_are_transformers_defaults():
    """Keys a Mixtral config.json leaves out take transformers' MixtralConfig defaults, which
    differ from Llama's; eqzoo-only fields keep eqzoo's defaults or take overrides."""
    mixtral = config_from_hf(
        {
            "model_type": "mixtral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
        router_z_loss_coef=0.0, moe_implementation="dense",
    )
    assert (mixtral.rope_theta, mixtral.rms_norm_eps, mixtral.max_seq) == (1e6, 1e-5, 4096 * 32)
    assert mixtral.router_aux_loss_coef == 0.001  # transformers' default; eqzoo's own is 0.02
    assert (mixtral.router_z_loss_coef, mixtral.moe_implementation) == (0.0, "dense")
    assert mixtral.num_kv_heads == 4 and not mixtral.tie_embeddings


def test_mixtral_router_jitter_is_ignored_with_a_warning():
    base = {
        "model_type": "mixtral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    with pytest.warns(UserWarning, match=r"router_jitter_noise=0.01.*ignored.*only in training"):
        jittered = config_from_hf(base | {"router_jitter_noise": 0.01})
    assert jittered == config_from_hf(base | {"router_jitter_noise": 0.0})
    assert config_to_hf(jittered)["router_jitter_noise"] == 0.0


def test_sliding_windows_map_both_ways():
    mixtral = {
        "model_type": "mixtral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 64,
    }
    assert config_from_hf(mixtral).sliding_window is None  # Mixtral's default: no window
    assert config_from_hf(mixtral | {"sliding_window": 16}).sliding_window == 16
    mistral = {k: v for k, v in mixtral.items() if not k.startswith("num_experts") and k != "num_local_experts"}
    mistral["model_type"] = "mistral"
    assert config_from_hf(mistral).sliding_window == 4096  # Mistral's default when the key is absent
    assert config_from_hf(mistral | {"sliding_window": None}).sliding_window is None
    windowed = config_from_hf(mistral | {"sliding_window": 32})
    assert isinstance(windowed, LlamaConfig) and windowed.sliding_window == 32
    # A windowed Llama is written as Mistral (transformers' Llama has no window), a plain one as Llama.
    out = config_to_hf(windowed)
    assert out["architectures"] == ["MistralForCausalLM"] and out["sliding_window"] == 32
    assert config_from_hf(out) == windowed
    assert config_to_hf(LlamaConfig())["architectures"] == ["LlamaForCausalLM"]
    assert config_to_hf(MixtralConfig(sliding_window=128))["sliding_window"] == 128


def test_qwen2_windows_read_as_transformers_does():
    qwen2 = {
        "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4,
    }
    assert config_from_hf(qwen2).qkv_bias and config_from_hf(qwen2).sliding_window is None
    assert config_from_hf(qwen2 | {"use_sliding_window": True, "max_window_layers": 0, "sliding_window": 32}).sliding_window == 32
    assert config_from_hf(qwen2 | {"use_sliding_window": True, "max_window_layers": 4, "sliding_window": 32}).sliding_window is None
    # the window from layer max_window_layers on
    some = config_from_hf(qwen2 | {"use_sliding_window": True, "max_window_layers": 3, "sliding_window": 32})
    assert some.sliding_window == 32 and some.window_layers == (False, False, False, True)
    assert config_from_hf(config_to_hf(some)) == some
    odd = ("full_attention", "sliding_attention") * 2
    explicit = config_from_hf(qwen2 | {"use_sliding_window": True, "layer_types": list(odd), "sliding_window": 32})
    assert explicit.layer_types == odd and config_to_hf(explicit)["layer_types"] == list(odd)
    # transformers drops the window without use_sliding_window, whatever layer_types says
    assert config_from_hf(qwen2 | {"layer_types": list(odd), "sliding_window": 32}).sliding_window is None
    with pytest.raises(HFFormatError, match=r"layer_types.*one of 'sliding_attention' / 'full_attention' per layer \(4\)"):
        config_from_hf(qwen2 | {"use_sliding_window": True, "layer_types": ["sliding_attention"] * 3, "sliding_window": 32})
    # As transformers reads them: a null window or max_window_layers with sliding off is no window.
    assert config_from_hf(qwen2 | {"use_sliding_window": True, "sliding_window": None, "max_window_layers": 2}).sliding_window is None
    assert config_from_hf(qwen2 | {"max_window_layers": None}).sliding_window is None
    with pytest.raises(HFFormatError, match=r"max_window_layers=None.*non-negative integer"):
        config_from_hf(qwen2 | {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": None})
    assert config_from_hf(qwen2 | {"attention_bias": True}).qkv_bias  # a key Qwen2 does not read
    # Mistral's window is on every layer: a plain Llama with windows on some layers has no format
    with pytest.raises(HFFormatError, match="neither qkv_bias nor qk_norm"):
        config_to_hf(LlamaConfig(num_layers=2, sliding_window=8, layer_types=("full_attention", "sliding_attention")))


def test_llama_layer_types_are_checked_and_stored_one_way():
    kinds = ("full_attention", "sliding_attention")
    assert LlamaConfig(num_layers=2, sliding_window=8, layer_types=kinds).window_layers == (False, True)
    alike = LlamaConfig(num_layers=2, sliding_window=8, layer_types=("sliding_attention",) * 2)
    assert alike.layer_types is None and alike == LlamaConfig(num_layers=2, sliding_window=8)
    full = LlamaConfig(num_layers=2, sliding_window=8, layer_types=("full_attention",) * 2)
    assert full.sliding_window is None and full == LlamaConfig(num_layers=2)
    with pytest.raises((ConfigError, TypeCheckError), match="layer_types"):
        LlamaConfig(num_layers=2, sliding_window=8, layer_types=kinds[:1])
    with pytest.raises(ConfigError, match="sliding_window is None"):
        LlamaConfig(num_layers=2, layer_types=kinds)
    with pytest.raises((ConfigError, TypeCheckError), match="layer_types"):
        LlamaConfig(num_layers=2, sliding_window=8, layer_types=["full_attention", "sliding_attention"])


def test_mixtral_without_renormalised_router_weights_is_not_exported():
    config = MixtralConfig(normalize_router_weights=False)
    with pytest.raises(HFFormatError, match=r"normalize_router_weights=False\) has no Hugging Face equivalent"):
        config_to_hf(config)


def test_qwen3_families_read_as_transformers_does():
    qwen3 = {
        "model_type": "qwen3", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 32,
    }
    c = config_from_hf(qwen3)
    assert isinstance(c, LlamaConfig) and c.qk_norm and not c.qkv_bias and c.sliding_window is None
    assert c.rms_norm_eps == 1e-6 and c.max_seq == 32768 and c.head_dim == 32
    assert config_from_hf(qwen3 | {"use_sliding_window": True, "max_window_layers": 0, "sliding_window": 32}).sliding_window == 32
    assert config_from_hf(qwen3 | {"use_sliding_window": True, "max_window_layers": 2, "sliding_window": 32}).window_layers == (
        False, False, True, True)
    with pytest.raises(HFFormatError, match=r"attention_bias=True.*no biases"):
        config_from_hf(qwen3 | {"attention_bias": True})
    moe = {k: v for k, v in qwen3.items() if k != "head_dim"} | {
        "model_type": "qwen3_moe", "moe_intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2,
    }
    m = config_from_hf(moe)
    assert isinstance(m, MixtralConfig) and m.qk_norm and m.hidden_dim == 48 and m.num_experts == 8
    assert not m.normalize_router_weights and m.router_aux_loss_coef == 0.001 and m.sliding_window is None
    assert config_from_hf(moe | {"norm_topk_prob": True}).normalize_router_weights
    # transformers 5 writes num_local_experts; a window only with use_sliding_window.
    assert config_from_hf({k: v for k, v in moe.items() if k != "num_experts"} | {"num_local_experts": 4}).num_experts == 4
    assert config_from_hf(moe | {"sliding_window": 32}).sliding_window is None
    assert config_from_hf(moe | {"sliding_window": 32, "use_sliding_window": True}).sliding_window == 32
    with pytest.raises(HFFormatError, match=r"mlp_only_layers=\[1\].*layers \[1\] of 4 dense.*experts in every layer"):
        config_from_hf(moe | {"mlp_only_layers": [1]})
    with pytest.raises(HFFormatError, match=r"decoder_sparse_step=2.*experts in every layer"):
        config_from_hf(moe | {"decoder_sparse_step": 2})
    with pytest.raises(HFFormatError, match=r"lacks \['num_experts'\]"):
        config_from_hf({k: v for k, v in moe.items() if k != "num_experts"})
    with pytest.raises(HFFormatError, match=r"num_experts=0.*no layer with experts.*dense Qwen3.*LlamaConfig with qk_norm=True"):
        config_from_hf(moe | {"num_experts": 0})
    with pytest.raises(HFFormatError, match=r"mlp_only_layers=\[0, 1, 2, 3\].*no layer with experts.*model_type 'qwen3'"):
        config_from_hf(moe | {"mlp_only_layers": [0, 1, 2, 3]})
    with pytest.raises(HFFormatError, match=r"decoder_sparse_step=0.*positive integer"):
        config_from_hf(moe | {"decoder_sparse_step": 0})
    with pytest.raises(HFFormatError, match=r"mlp_only_layers='1'.*must be a list of layer indices"):
        config_from_hf(moe | {"mlp_only_layers": "1"})
    with pytest.raises(HFFormatError, match=r"num_experts=-1.*non-negative integer"):
        config_from_hf(moe | {"num_experts": -1})


@pytest.mark.parametrize("only", [[5], [-1], [2, 7]])
def test_qwen3_moe_mlp_only_layers_past_the_model_are_ignored_as_transformers_does(only, hft):
    # transformers makes layer i dense only when i is in mlp_only_layers: indices naming no
    # layer of this 2-layer model leave every layer sparse.
    hf_model = hft.make_qwen3_moe(0, num_hidden_layers=2, mlp_only_layers=only)
    assert [type(layer.mlp).__name__ for layer in hf_model.model.layers] == ["Qwen3MoeSparseMoeBlock"] * 2
    d = hf_model.config.to_dict()
    assert config_from_hf(d) == config_from_hf(d | {"mlp_only_layers": []})
    # and a step past the last layer leaves none sparse, as there
    hf_dense = hft.make_qwen3_moe(0, num_hidden_layers=2, decoder_sparse_step=3)
    assert all(type(layer.mlp).__name__ == "Qwen3MoeMLP" for layer in hf_dense.model.layers)
    with pytest.raises(HFFormatError, match=r"decoder_sparse_step=3.*no layer with experts"):
        config_from_hf(hf_dense.config.to_dict())
    with pytest.raises(HFFormatError, match=r"both qk_norm and qkv_bias has no Hugging Face equivalent"):
        config_to_hf(LlamaConfig(qk_norm=True, qkv_bias=True))


def test_qwen3_keys_left_out_take_transformers_defaults(hft):
    base = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    dense = config_from_hf(base | {"model_type": "qwen3", "intermediate_size": 96})
    assert dense.resolved_head_dim == hft.transformers.Qwen3Config(**base).head_dim == 128
    # (transformers' dense default of 32 key/value heads would exceed these 4 heads: eqzoo keeps
    # one per head there, as Llama's default.)
    moe_keys = {"moe_intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2}
    moe = config_from_hf(base | moe_keys | {"model_type": "qwen3_moe"})  # no intermediate_size either
    theirs = hft.transformers.Qwen3MoeConfig(**base, **moe_keys)
    assert moe.num_kv_heads == theirs.num_key_value_heads == 4
    assert moe.resolved_head_dim == 64 // 4
    # No layer is dense, so transformers builds nothing of `intermediate_size` (its default is
    # 6144): eqzoo writes the experts' width a token uses, 2 x 48, as Qwen's releases do.
    assert config_to_hf(moe)["intermediate_size"] == 96 != theirs.intermediate_size


@pytest.mark.parametrize("model_type", ["mistral", "mixtral", "qwen2", "qwen3"])
def test_key_value_heads_left_out_take_transformers_defaults(model_type, hft):
    # transformers' default (8 for Mistral and Mixtral, 32 for Qwen2 and Qwen3) where it fits
    # the heads; an explicit null means one per head (as Qwen's configs read it; transformers 5
    # refuses a null for Mistral and Mixtral).
    base = {"vocab_size": 100, "hidden_size": 256, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 64}
    extra = {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else {}
    cls = {"mistral": "MistralConfig", "mixtral": "MixtralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[model_type]
    theirs = getattr(hft.transformers, cls)
    ours = config_from_hf(base | extra | {"model_type": model_type})
    assert ours.num_kv_heads == theirs(**base, **extra).num_key_value_heads in (8, 32)
    explicit_null = config_from_hf(base | extra | {"model_type": model_type, "num_key_value_heads": None})
    assert explicit_null.num_kv_heads == 64
    if model_type.startswith("qwen"):
        assert theirs(**base, num_key_value_heads=None).num_key_value_heads == 64


# The published configs of Gemma 2 2B (transformers 4 spelling) and Gemma 3 1B (its text config,
# with transformers 4's sliding_window_pattern and rope_local_base_freq), as far as eqzoo reads them.
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
    "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "attention_bias": False, "tie_word_embeddings": True,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rope_scaling": None, "query_pre_attn_scalar": 256,
    "sliding_window": 512, "sliding_window_pattern": 6, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "attention_bias": False,
}


def test_published_gemma_configs_are_the_presets(hft):
    from eqzoo.models import get_config

    assert config_from_hf(GEMMA2_2B, remat="full") == get_config("gemma2-2b")
    assert config_from_hf(GEMMA3_1B, remat="dots_no_batch") == get_config("gemma3-1b")
    # transformers 5's reading (layer_types and per-type rope_parameters written out) agrees.
    for published in (GEMMA2_2B, GEMMA3_1B):
        cls = {"gemma2": hft.transformers.Gemma2Config, "gemma3_text": hft.transformers.Gemma3TextConfig}[published["model_type"]]
        keys = {k: v for k, v in published.items() if k not in ("architectures", "model_type")}
        assert config_from_hf(cls(**keys).to_dict()) == config_from_hf(published)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(post_norms=False, sliding_window=None, sliding_window_pattern=None, attn_logit_softcap=None,
             final_logit_softcap=None, query_pre_attn_scalar=None),
        dict(),
        dict(layer_types=("full_attention", "sliding_attention", "sliding_attention", "full_attention"), tie_embeddings=False),
        dict(qk_norm=True, local_rope_theta=10000.0, rope_theta=1e6, rope_scaling=RopeScaling(factor=8.0, rope_type="linear"),
             sliding_window_pattern=3, attn_logit_softcap=None, final_logit_softcap=None),
        dict(sliding_window_pattern=None),
        # no local base: the sliding layers rotate as the full ones, scaling included
        dict(qk_norm=True, rope_scaling=RopeScaling(factor=4.0, rope_type="linear"), attn_logit_softcap=None),
        # a pattern longer than the stack (every layer slides), kept as given
        dict(qk_norm=True, local_rope_theta=1e4, rope_theta=1e6, sliding_window_pattern=6, attn_logit_softcap=None),
        dict(query_pre_attn_scalar=None),
        dict(sliding_window=None, sliding_window_pattern=None),
        dict(sliding_window=None),  # pattern 2 kept, unused
        dict(post_norms=False, sliding_window=None, attn_logit_softcap=None, final_logit_softcap=None,
             query_pre_attn_scalar=16.0),  # Gemma-shaped, pattern left at its default
        dict(qk_norm=True, local_rope_theta=1e4, rope_theta=1e4, attn_logit_softcap=None),  # one base
    ],
    ids=[
        "gemma", "gemma2", "gemma2-explicit-layers-untied", "gemma3-linear-rope", "gemma2-all-sliding",
        "gemma3-one-rope", "gemma3-long-pattern", "gemma2-scalar-none", "gemma2-no-window-no-pattern",
        "gemma2-no-window", "gemma-defaults", "gemma3-equal-bases",
    ],
)
def test_gemma_round_trip_through_transformers_config(overrides, tmp_path, hft):
    from eqzoo.models import get_config

    config = get_config("tiny-gemma2", **overrides)
    hf = config_to_hf(config)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with hft.transformers_messages() as messages:
        hf_config = hft.transformers.AutoConfig.from_pretrained(tmp_path)
    assert not messages, messages
    expected = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig"}[hf["model_type"]]
    assert type(hf_config).__name__ == expected
    assert hf["model_type"] == ("gemma3_text" if config.qk_norm else "gemma2" if config.post_norms else "gemma")
    assert config_from_hf(hf_config.to_dict()) == config
    assert config_from_hf(hf) == config
    if config.post_norms:
        assert list(hf_config.layer_types) == list(config.resolved_layer_types)


def test_gemma_options_without_a_hugging_face_form_are_refused():
    from eqzoo.models import get_config

    with pytest.raises(HFFormatError, match="without post_norms is written as GemmaForCausalLM"):
        config_to_hf(get_config("tiny-gemma2", post_norms=False))
    with pytest.raises(HFFormatError, match="is a Gemma 3"):
        config_to_hf(get_config("tiny-gemma2", qk_norm=True, post_norms=False))
    with pytest.raises(HFFormatError, match="activation='silu'"):
        config_to_hf(get_config("tiny-gemma2", activation="silu"))
    with pytest.raises(HFFormatError, match="transformers' Gemma 3 never applies attn_logit_softcapping"):
        config_to_hf(get_config("tiny-gemma2", qk_norm=True))
    with pytest.warns(UserWarning, match="reads but never applies; eqzoo ignores it too"):
        assert config_from_hf(GEMMA3_1B | {"attn_logit_softcapping": 50.0}).attn_logit_softcap is None
    with pytest.raises(HFFormatError, match="use_bidirectional_attention"):
        config_from_hf(GEMMA3_1B | {"use_bidirectional_attention": True})
    with pytest.raises(HFFormatError, match="layer_types"):
        config_from_hf(GEMMA2_2B | {"layer_types": ["sliding_attention"] * 3})
    # Gemma's legacy hidden_act "gelu" means the tanh GELU, as transformers reads it.
    gemma = {k: v for k, v in GEMMA2_2B.items() if k not in ("architectures", "hidden_activation")}
    assert config_from_hf(gemma | {"model_type": "gemma", "hidden_act": "gelu"}).activation == "gelu_tanh"


def test_gemma_files_and_exports_without_an_equivalent_are_refused():
    from eqzoo.models import get_config

    with pytest.raises(HFFormatError, match=r"query_pre_attn_scalar=24.5\) has no Hugging Face equivalent"):
        config_to_hf(get_config("tiny-gemma2", query_pre_attn_scalar=24.5))
    with pytest.raises(HFFormatError, match="linear rope scaling lacks 'factor'"):
        config_from_hf(GEMMA2_2B | {"rope_scaling": {"rope_type": "linear"}})
    scaled_local = {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    }
    with pytest.raises(HFFormatError, match="either the full layers' or an unscaled one"):
        config_from_hf(GEMMA3_1B | {"rope_parameters": scaled_local})
    with pytest.raises(HFFormatError, match="sliding_window_pattern='x'.*positive integer or null"):
        config_from_hf(GEMMA3_1B | {"sliding_window_pattern": "x"})
