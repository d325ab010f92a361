"""eqzoo configs into Hugging Face `config.json` dicts: `config_to_hf` and the architecture
each eqzoo config is written as."""

from collections.abc import Mapping
from typing import Any

from ..models import GemmaConfig, GPT2Config, LlamaConfig, MixtralConfig, ViTConfig
from ._errors import HFFormatError
from ._rope_config import _rope_to_hf


def config_to_hf(config: GPT2Config | LlamaConfig | MixtralConfig | GemmaConfig | ViTConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of an eqzoo config (inverse of [`eqzoo.hf.config_from_hf`][]).

    eqzoo-only fields (`remat`, `scan_layers`, `attention_backend`; Mixtral's
    `router_z_loss_coef` and `moe_implementation`) are not written. A `LlamaConfig` with
    `qk_norm` is written as `Qwen3ForCausalLM`, one with `qkv_bias` as `Qwen2ForCausalLM`, one
    with only a `sliding_window` as `MistralForCausalLM` (transformers' Llama has none of
    them), one with none of them as `LlamaForCausalLM` (a Mistral checkpoint with
    `sliding_window: null` loads as such a config; [`eqzoo.hf.save_pretrained`][] with `like=`
    that checkpoint writes it as Mistral again); a `MixtralConfig` with `qk_norm` as `Qwen3MoeForCausalLM`. A `GemmaConfig` is
    written as the oldest generation that holds it: `Gemma3ForCausalLM` with `qk_norm` or
    `local_rope_theta`, `Gemma2ForCausalLM` with `post_norms`, else `GemmaForCausalLM`; its
    `layer_types` are written out per layer. Llama and Mixtral rotary
    settings are written both as transformers 5 `rope_parameters` and as the older
    `rope_theta` / `rope_scaling` keys, so either major version reads them.

    **Arguments:** `config`, a [`eqzoo.models.GPT2Config`][], [`eqzoo.models.LlamaConfig`][],
    [`eqzoo.models.MixtralConfig`][], [`eqzoo.models.GemmaConfig`][] or
    [`eqzoo.models.ViTConfig`][] (with `pool="cls"`: Hugging
    Face's ViT has a class token).

    **Returns:** a JSON-able dict with `architectures` and `model_type`.

    **Raises:** `HFFormatError` for a `pool="mean"` ViT, which Hugging Face has no layout for,
    and for combinations no Hugging Face architecture has (`qk_norm` with `qkv_bias`; a
    Mixtral without renormalised router weights and without `qk_norm`; a Gemma with `qk_norm`
    but no `post_norms`, with Gemma 2's extras but no `post_norms`, or gated by silu).
    """
    if isinstance(config, ViTConfig):
        return _vit_to_hf(config)
    if isinstance(config, GemmaConfig):
        return _gemma_to_hf(config)
    if isinstance(config, MixtralConfig) and config.qk_norm:
        return _qwen3_moe_to_hf(config)
    if isinstance(config, MixtralConfig):
        return _mixtral_to_hf(config)
    if isinstance(config, LlamaConfig) and config.qk_norm:
        if config.qkv_bias:
            raise HFFormatError(
                "a LlamaConfig with both qk_norm and qkv_bias has no Hugging Face equivalent: "
                "Qwen3ForCausalLM normalises queries and keys but has no query/key/value-only "
                "biases, Qwen2ForCausalLM the reverse. Export a model with one of them."
            )
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            **_decoder_to_hf(config),
            **_qwen_window_to_hf(config),
            "attention_bias": False,
        }
    if isinstance(config, LlamaConfig) and config.qkv_bias:
        # Qwen2 is the Llama with query/key/value biases; its window, if any, on every layer.
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **_decoder_to_hf(config),
            **_qwen_window_to_hf(config),
        }
    if isinstance(config, LlamaConfig) and config.sliding_window is not None:
        # transformers' Llama has no sliding window; Mistral is the same model with one.
        if config.layer_types is not None:
            raise HFFormatError(
                "a LlamaConfig whose sliding_window is on some layers only (layer_types) is written "
                "as Qwen2 or Qwen3, the Llama layouts with per-layer windows: this one has neither "
                "qkv_bias nor qk_norm, and MistralForCausalLM's window is on every layer. Export "
                "with the window on every layer (layer_types=None) or none."
            )
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            **_decoder_to_hf(config),
            "sliding_window": config.sliding_window,
        }
    if isinstance(config, LlamaConfig):
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **_decoder_to_hf(config),
            "attention_bias": False,
            "mlp_bias": False,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_embd": config.embed_dim,
        "n_inner": config.hidden_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def as_architecture_of(hf: dict[str, Any], original: Mapping[str, Any]) -> dict[str, Any]:
    """`hf` (from `config_to_hf`) rewritten as `original`'s architecture where that architecture
    computes the same model exactly, else `hf` unchanged.

    The one such pair among the architectures read here: a Llama without a window is a
    `MistralForCausalLM` with `sliding_window: null` (same tensors, same computation; loading
    such a Mistral gives a plain `LlamaConfig`, so without this it would come back as Llama).
    Qwen2 always has query/key/value biases and Qwen3 query/key norms, which a Llama lacks, and
    every other family loads back into the architecture it came from.
    """
    architectures = original.get("architectures") or []
    architectures = [architectures] if isinstance(architectures, str) else list(architectures)
    mistral = "MistralForCausalLM" in architectures or (not architectures and original.get("model_type") == "mistral")
    if hf.get("architectures") == ["LlamaForCausalLM"] and mistral:
        # Mistral's projections never have biases: it has no attention_bias / mlp_bias keys.
        out = {k: v for k, v in hf.items() if k not in ("attention_bias", "mlp_bias")}
        return out | {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None}
    return hf


def _decoder_to_hf(c: LlamaConfig | MixtralConfig | GemmaConfig) -> dict[str, Any]:
    """The keys Llama, Mixtral and Gemma configs share."""
    return {
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "hidden_size": c.embed_dim,
        "intermediate_size": c.hidden_dim,
        "head_dim": c.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        **_rope_to_hf(c),
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _qwen_window_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """Qwen2's and Qwen3's window keys: the window and the layers it is on."""
    window = c.sliding_window
    types = c.layer_types or ("sliding_attention" if window is not None else "full_attention",) * c.num_layers
    return {
        "use_sliding_window": window is not None,
        "sliding_window": window,
        # Not read by transformers when layer_types is given: the first windowed layer, which
        # is what it means when the windowed layers are the last ones.
        "max_window_layers": types.index("sliding_attention") if window is not None else c.num_layers,
        "layer_types": list(types),
    }


def _qwen3_moe_to_hf(c: MixtralConfig) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **_decoder_to_hf(c),
        # Every layer is sparse (decoder_sparse_step 1, no mlp_only_layers), so transformers
        # builds no dense MLP of this width; Qwen's releases set it to the experts' width a
        # token uses (30B-A3B: 8 x 768 = 6144), which tools read as the active MLP width.
        "intermediate_size": c.experts_per_token * c.hidden_dim,
        "moe_intermediate_size": c.hidden_dim,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.experts_per_token,
        "norm_topk_prob": c.normalize_router_weights,
        "router_aux_loss_coef": c.router_aux_loss_coef,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": c.sliding_window is not None,
        "sliding_window": c.sliding_window,
        "attention_bias": False,
    }


def _mixtral_to_hf(c: MixtralConfig) -> dict[str, Any]:
    if not c.normalize_router_weights:
        raise HFFormatError(
            "MixtralConfig(normalize_router_weights=False) has no Hugging Face equivalent: "
            "MixtralForCausalLM always renormalises the chosen experts' weights, so the exported "
            "model would compute something else. Export a model trained with "
            "normalize_router_weights=True."
        )
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **_decoder_to_hf(c),
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.experts_per_token,
        "router_aux_loss_coef": c.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "sliding_window": c.sliding_window,
    }


def _gemma_to_hf(c: GemmaConfig) -> dict[str, Any]:
    # The oldest generation that holds the config: Gemma 3 for query/key norms or a separate
    # local rotary base, Gemma 2 for sandwich norms, else Gemma.
    if c.activation == "silu":
        raise HFFormatError("Hugging Face's Gemma gates with GELU; a GemmaConfig(activation='silu') has no equivalent.")
    if c.qk_norm or c.local_rope_theta is not None:
        family, arch = "gemma3_text", "Gemma3ForCausalLM"
        if not (c.qk_norm and c.post_norms):
            raise HFFormatError(
                "a GemmaConfig with qk_norm or local_rope_theta is a Gemma 3, whose layers always "
                "have query/key norms and sandwich norms (qk_norm=True, post_norms=True); this one "
                f"has qk_norm={c.qk_norm}, post_norms={c.post_norms}, which no Hugging Face Gemma has."
            )
    elif c.post_norms:
        family, arch = "gemma2", "Gemma2ForCausalLM"
    else:
        family, arch = "gemma", "GemmaForCausalLM"
        extras = {
            "sliding_window": c.sliding_window, "attn_logit_softcap": c.attn_logit_softcap,
            "final_logit_softcap": c.final_logit_softcap,
            "query_pre_attn_scalar": None if c.query_pre_attn_scalar in (None, float(c.head_dim)) else c.query_pre_attn_scalar,
            # transformers reads Gemma's hidden_act "gelu" as the tanh GELU
            "activation": None if c.activation == "gelu_tanh" else c.activation,
        }
        extras = {k: v for k, v in extras.items() if v is not None}
        if extras:
            raise HFFormatError(
                "a GemmaConfig without post_norms is written as GemmaForCausalLM, which has no "
                "sliding window, soft caps, query_pre_attn_scalar other than head_dim, or exact "
                f"GELU; this one sets {extras}. Set post_norms=True (Gemma 2) or drop them."
            )
    # Llama's keys, with Gemma's activation key and (Gemma 3) rotary settings per layer type.
    shared = {k: v for k, v in _decoder_to_hf(c).items() if k != "hidden_act"}
    act = "gelu" if c.activation == "gelu" else "gelu_pytorch_tanh"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": family,
        **shared,
        ("hidden_act" if family == "gemma" else "hidden_activation"): act,
        "attention_bias": False,
        "pad_token_id": None,
    }
    if family == "gemma3_text":
        if c.attn_logit_softcap is not None:
            raise HFFormatError(
                f"GemmaConfig(attn_logit_softcap={c.attn_logit_softcap}) with Gemma 3's query/key norms has no "
                "Hugging Face equivalent: transformers' Gemma 3 never applies attn_logit_softcapping."
            )
        full = out.pop("rope_parameters")
        del out["rope_theta"], out["rope_scaling"]
        # Without a local base the sliding layers rotate as the full ones, scaling included.
        local = dict(full) if c.local_rope_theta is None else {"rope_type": "default", "rope_theta": c.local_rope_theta}
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    # Not read by transformers when layer_types is given; kept so the config reads back equal.
    out["sliding_window_pattern"] = c.sliding_window_pattern
    if family == "gemma":
        return out
    scalar = c.query_pre_attn_scalar  # never None: GemmaConfig stores head_dim there
    if float(scalar) != int(scalar):
        raise HFFormatError(
            f"GemmaConfig(query_pre_attn_scalar={scalar}) has no Hugging Face equivalent: "
            "transformers' Gemma configs take an integer there."
        )
    return out | {
        "query_pre_attn_scalar": int(scalar),
        # transformers builds the sliding mask whatever the layer kinds, so a model without a
        # window gets max_seq there (unused: every layer is full_attention).
        "sliding_window": c.max_seq if c.sliding_window is None else c.sliding_window,
        "layer_types": list(c.resolved_layer_types),
        "attn_logit_softcapping": c.attn_logit_softcap,
        "final_logit_softcapping": c.final_logit_softcap,
    }


def _vit_to_hf(c: ViTConfig) -> dict[str, Any]:
    if c.pool != "cls":
        raise HFFormatError(
            f"ViTConfig(pool={c.pool!r}) has no Hugging Face equivalent: ViTForImageClassification "
            "classifies its class token. Export a pool='cls' model."
        )
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.in_channels,
        "hidden_size": c.embed_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.hidden_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": c.layer_norm_eps,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "id2label": {str(i): f"LABEL_{i}" for i in range(c.num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(c.num_classes)},
    }
