"""Conversion between Hugging Face `config.json` dicts and eqzoo's frozen model configs."""

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from .._errors import ConfigError, user_stacklevel
from ..models import GPT2Config, LlamaConfig, MixtralConfig, ViTConfig
from ..nn import RopeScaling
from ._errors import HFFormatError

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "ViTForImageClassification": "vit",
}
"""The Hugging Face `architectures` eqzoo reads and writes, with their `model_type`."""

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _supported() -> str:
    return ", ".join(f"{a} (model_type {t!r})" for a, t in SUPPORTED_ARCHITECTURES.items())


def _family(d: Mapping[str, Any]) -> str:
    model_type = d.get("model_type")
    architectures = d.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if architectures and not known:
        raise HFFormatError(
            f"unsupported architectures {list(architectures)} (model_type {model_type!r}); "
            f"eqzoo.hf supports {_supported()}."
        )
    if known:
        family = SUPPORTED_ARCHITECTURES[known[0]]
        if model_type is not None and model_type != family:
            raise HFFormatError(
                f"config.json says architectures {list(architectures)} but model_type "
                f"{model_type!r}; expected model_type {family!r} for {known[0]}."
            )
        return family
    if model_type in SUPPORTED_ARCHITECTURES.values():
        return model_type
    raise HFFormatError(
        f"unsupported model_type {model_type!r} (architectures {list(architectures)}); "
        f"eqzoo.hf supports {_supported()}."
    )


def _require(d: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise HFFormatError(f"config.json of model_type {d.get('model_type')!r} lacks {missing}.")


def _unsupported(d: Mapping[str, Any], key: str, value: Any, why: str) -> HFFormatError:
    return HFFormatError(f"config.json has {key}={value!r}, which eqzoo does not support: {why}.")


def _gpt2_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    _require(d, "vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
    embed = int(d["n_embd"])
    inner = d.get("n_inner")
    inner = 4 * embed if inner is None else int(inner)
    if inner % embed:
        raise _unsupported(d, "n_inner", inner, f"the MLP width must be a multiple of n_embd={embed}")
    act = d.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise _unsupported(d, "activation_function", act, f"eqzoo's GPT-2 uses the tanh GELU ({_GELU_TANH})")
    if not d.get("tie_word_embeddings", True):
        raise _unsupported(d, "tie_word_embeddings", False, "eqzoo's GPT-2 always ties its output head")
    if not d.get("scale_attn_weights", True):
        raise _unsupported(d, "scale_attn_weights", False, "attention is always scaled by 1/sqrt(head_dim)")
    if d.get("scale_attn_by_inverse_layer_idx", False):
        raise _unsupported(d, "scale_attn_by_inverse_layer_idx", True, "not implemented")
    if d.get("add_cross_attention", False):
        raise _unsupported(d, "add_cross_attention", True, "eqzoo's GPT-2 is decoder-only")
    return dict(
        vocab_size=int(d["vocab_size"]), max_seq=int(d["n_positions"]), num_layers=int(d["n_layer"]),
        num_heads=int(d["n_head"]), embed_dim=embed, mlp_ratio=inner // embed,
        layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
    )


def _rope_from_hf(d: Mapping[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (holding rope_theta); 4.x wrote `rope_theta` and
    # `rope_scaling` (with "type" in the oldest files, "rope_type" later).
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta", default_theta))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise _unsupported(d, "rope_type", rope_type, "only 'default' and 'llama3' rotary embeddings are implemented")
    try:
        scaling_obj = RopeScaling(
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    except KeyError as err:
        raise HFFormatError(f"config.json's llama3 rope scaling lacks {err.args[0]!r}.") from None
    return float(theta), scaling_obj


def _llama_from_hf(
    d: Mapping[str, Any], *, theta: float = 10000.0, eps: float = 1e-6, max_seq: int = 2048
) -> dict[str, Any]:
    # The keyword defaults are transformers' for keys a config.json leaves out (LlamaConfig's;
    # Mixtral passes its own).
    _require(d, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(d, "hidden_act", act, "eqzoo's Llama and Mixtral use SwiGLU with silu")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key, False):
            raise _unsupported(d, key, True, "eqzoo's Llama and Mixtral have no biases")
    heads = int(d["num_attention_heads"])
    embed = int(d["hidden_size"])
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) == embed // heads and embed % heads == 0:
        head_dim = None  # the default: keep eqzoo configs equal whichever way HF spelled it
    theta, scaling = _rope_from_hf(d, theta)
    kv_heads = d.get("num_key_value_heads")
    return dict(
        vocab_size=int(d["vocab_size"]), max_seq=int(d.get("max_position_embeddings", max_seq)),
        num_layers=int(d["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=heads if kv_heads is None else int(kv_heads), embed_dim=embed,
        hidden_dim=int(d["intermediate_size"]), head_dim=None if head_dim is None else int(head_dim),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(d.get("rms_norm_eps", eps)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def _sliding_window(d: Mapping[str, Any], default: int | None) -> int | None:
    # A key left out means transformers' default (4096 for Mistral, none for Mixtral); an
    # explicit null means full causal attention.
    window = d.get("sliding_window", default)
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise _unsupported(d, "sliding_window", window, "it must be a positive integer or null")
    return int(window)


def _mistral_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    # Mistral is Llama's architecture with sliding-window attention; its defaults differ.
    fields = _llama_from_hf(d, theta=10000.0, eps=1e-6, max_seq=4096 * 32)
    return fields | dict(sliding_window=_sliding_window(d, 4096))


def _qwen_window(d: Mapping[str, Any], layers: int) -> int | None:
    # Qwen2's and Qwen3's sliding window is per layer: layer_types (transformers 5), or
    # use_sliding_window with the layers from max_window_layers on. eqzoo's layers share one
    # window, so it is all or none.
    types = d.get("layer_types")
    if types is None:
        # As transformers: no window unless use_sliding_window and a sliding_window are given.
        sliding = bool(d.get("use_sliding_window", False)) and d.get("sliding_window", 4096) is not None
        first = d.get("max_window_layers", 28)
        if sliding and (isinstance(first, bool) or not isinstance(first, int) or first < 0):
            raise _unsupported(d, "max_window_layers", first, "it must be a non-negative integer")
        types = ["sliding_attention" if sliding and i >= first else "full_attention" for i in range(layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise _unsupported(d, "layer_types", unknown, "only 'full_attention' and 'sliding_attention' layers exist here")
    if "sliding_attention" not in types:
        return None
    if "full_attention" in types:
        raise _unsupported(
            d, "layer_types", types,
            "eqzoo's layers share one attention pattern, so sliding-window attention must be on "
            "in every layer (max_window_layers=0) or in none (use_sliding_window=false)",
        )
    return _sliding_window(d, 4096)


def _qwen2_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    # Qwen2 is Llama's architecture with biases on the query, key and value projections.
    # Qwen2 has no attention_bias option (its q/k/v always have biases, o never): ignored.
    fields = _llama_from_hf({k: v for k, v in d.items() if k != "attention_bias"}, theta=10000.0, eps=1e-6, max_seq=32768)
    return fields | dict(qkv_bias=True, sliding_window=_qwen_window(d, fields["num_layers"]))


def _qwen3_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    # Qwen3 is Llama's architecture with an RMSNorm over each head's queries and keys (no
    # biases unless attention_bias, which _llama_from_hf refuses).
    # transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads.
    fields = _llama_from_hf({"head_dim": 128} | dict(d), theta=10000.0, eps=1e-6, max_seq=32768)
    return fields | dict(qk_norm=True, sliding_window=_qwen_window(d, fields["num_layers"]))


def _qwen3_moe_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    # Qwen3-MoE: Qwen3's attention and Mixtral's routed SwiGLU experts (no shared expert), the
    # chosen experts' weights renormalised only with norm_topk_prob. Its window, if any, is on
    # every layer (use_sliding_window).
    experts = d.get("num_experts", d.get("num_local_experts"))
    if experts is None:
        raise HFFormatError("config.json of model_type 'qwen3_moe' lacks ['num_experts'].")
    _require(d, "num_experts_per_tok", "moe_intermediate_size")
    # transformers' defaults for keys a file may leave out: 4 key/value heads, and the width of
    # dense layers (unused: every layer has experts).
    defaults = {"num_key_value_heads": 4, "intermediate_size": 6144}
    fields = _llama_from_hf(defaults | {k: v for k, v in d.items() if v is not None or k not in defaults}, theta=10000.0, eps=1e-6, max_seq=32768)
    step = d.get("decoder_sparse_step", 1)
    dense_layers = list(d.get("mlp_only_layers") or [])
    if dense_layers or step != 1:
        key, value = ("mlp_only_layers", dense_layers) if dense_layers else ("decoder_sparse_step", step)
        raise _unsupported(
            d, key, value,
            "eqzoo's Mixtral has experts in every layer (mlp_only_layers=[] and decoder_sparse_step=1)",
        )
    window = _sliding_window(d, 4096) if d.get("use_sliding_window", False) else None
    return fields | dict(
        hidden_dim=int(d["moe_intermediate_size"]), num_experts=int(experts),
        experts_per_token=int(d["num_experts_per_tok"]),
        normalize_router_weights=bool(d.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
        qk_norm=True, sliding_window=window,
    )


def _mixtral_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    _require(d, "num_local_experts", "num_experts_per_tok")
    fields = _llama_from_hf(d, theta=1e6, eps=1e-5, max_seq=4096 * 32)
    fields["sliding_window"] = _sliding_window(d, None)
    jitter = float(d.get("router_jitter_noise") or 0.0)
    if jitter:
        # Multiplicative noise on the router's input, which transformers applies only in
        # training mode: the loaded model computes exactly what transformers' eval model does.
        warnings.warn(
            f"config.json has router_jitter_noise={jitter}, which eqzoo does not implement; it is "
            "ignored. Inference is unchanged (transformers applies the jitter only in training); "
            "fine-tuning in eqzoo runs without it, and save_pretrained writes router_jitter_noise=0.",
            stacklevel=user_stacklevel(),
        )
    return fields | dict(
        num_experts=int(d["num_local_experts"]), experts_per_token=int(d["num_experts_per_tok"]),
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
    )


def _square(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise _unsupported(d, key, value, "eqzoo's ViT takes square images and patches")
        value = value[0]
    return int(value)


def _vit_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    _require(d, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    embed = int(d["hidden_size"])
    inner = int(d["intermediate_size"])
    if inner % embed:
        raise _unsupported(d, "intermediate_size", inner, f"the MLP width must be a multiple of hidden_size={embed}")
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise _unsupported(d, "hidden_act", act, "eqzoo's ViT uses the exact (erf) GELU, 'gelu'")
    if not d.get("qkv_bias", True):
        raise _unsupported(d, "qkv_bias", False, "eqzoo's ViT has biases on every projection")
    labels = d.get("id2label")
    num_classes = len(labels) if labels else int(d.get("num_labels", 2))
    return dict(
        image_size=_square(d, "image_size") if "image_size" in d else 224,
        patch_size=_square(d, "patch_size") if "patch_size" in d else 16,
        in_channels=int(d.get("num_channels", 3)), num_classes=num_classes,
        num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
        embed_dim=embed, mlp_ratio=inner // embed, pool="cls",
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
    )


_FROM_HF = {
    "gpt2": (GPT2Config, _gpt2_from_hf),
    "llama": (LlamaConfig, _llama_from_hf),
    "mistral": (LlamaConfig, _mistral_from_hf),
    "qwen2": (LlamaConfig, _qwen2_from_hf),
    "qwen3": (LlamaConfig, _qwen3_from_hf),
    "mixtral": (MixtralConfig, _mixtral_from_hf),
    "qwen3_moe": (MixtralConfig, _qwen3_moe_from_hf),
    "vit": (ViTConfig, _vit_from_hf),
}


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> GPT2Config | LlamaConfig | MixtralConfig | ViTConfig:
    """The eqzoo config described by a Hugging Face `config.json` dict.

    Reads `GPT2LMHeadModel` and `LlamaForCausalLM` configs, including grouped-query attention
    (`num_key_value_heads`), `head_dim`, `rope_theta`, Llama-3 `rope_scaling` (in both the
    transformers 4 `rope_theta`/`rope_scaling` and the transformers 5 `rope_parameters`
    spellings), `rms_norm_eps` / `layer_norm_epsilon` and `tie_word_embeddings`;
    `MistralForCausalLM` configs (Llama's with `sliding_window`, into a
    [`eqzoo.models.LlamaConfig`][] with `sliding_window`); `Qwen2ForCausalLM` configs (a
    `LlamaConfig` with `qkv_bias=True`; a sliding window only if every layer has it);
    `Qwen3ForCausalLM` configs (a `LlamaConfig` with `qk_norm=True`, the window read as
    Qwen2's); `Qwen3MoeForCausalLM` configs (a [`eqzoo.models.MixtralConfig`][] with
    `qk_norm=True`, `moe_intermediate_size` as `hidden_dim`, `norm_topk_prob` as
    `normalize_router_weights`; experts in every layer); `MixtralForCausalLM` configs (as
    Llama's, plus `sliding_window`, `num_local_experts`, `num_experts_per_tok` and
    `router_aux_loss_coef`; `router_jitter_noise`, noise transformers adds only in training,
    is ignored with a warning); and
    `ViTForImageClassification` configs (the number of classes from `id2label`, square
    `image_size` and `patch_size`, `layer_norm_eps`).

    **Arguments:**

    - `hf_config`: the parsed `config.json`.
    - `overrides`: fields of the eqzoo config to replace, typically the ones HF does not know
      about: `remat`, `scan_layers`, `attention_backend`, Mixtral's `router_z_loss_coef` and
      `moe_implementation`.

    **Returns:** a [`eqzoo.models.GPT2Config`][], [`eqzoo.models.LlamaConfig`][],
    [`eqzoo.models.MixtralConfig`][] or [`eqzoo.models.ViTConfig`][].

    **Raises:** `HFFormatError` for an unsupported architecture (the message lists the supported
    ones) or option; `ConfigError` for an unknown override.
    """
    cls, read = _FROM_HF[_family(hf_config)]
    fields = read(hf_config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"config_from_hf: {cls.__name__} has no fields {unknown}; valid fields: {sorted(names)}.")
    return cls(**{**fields, **overrides})


def config_to_hf(config: GPT2Config | LlamaConfig | MixtralConfig | ViTConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of an eqzoo config (inverse of [`eqzoo.hf.config_from_hf`][]).

    eqzoo-only fields (`remat`, `scan_layers`, `attention_backend`; Mixtral's
    `router_z_loss_coef` and `moe_implementation`) are not written. A `LlamaConfig` with
    `qk_norm` is written as `Qwen3ForCausalLM`, one with `qkv_bias` as `Qwen2ForCausalLM`, one
    with only a `sliding_window` as `MistralForCausalLM` (transformers' Llama has none of
    them); a `MixtralConfig` with `qk_norm` as `Qwen3MoeForCausalLM`. Llama and Mixtral rotary
    settings are written both as transformers 5 `rope_parameters` and as the older
    `rope_theta` / `rope_scaling` keys, so either major version reads them.

    **Arguments:** `config`, a [`eqzoo.models.GPT2Config`][], [`eqzoo.models.LlamaConfig`][],
    [`eqzoo.models.MixtralConfig`][] or [`eqzoo.models.ViTConfig`][] (with `pool="cls"`: Hugging
    Face's ViT has a class token).

    **Returns:** a JSON-able dict with `architectures` and `model_type`.

    **Raises:** `HFFormatError` for a `pool="mean"` ViT, which Hugging Face has no layout for,
    and for combinations no Hugging Face architecture has (`qk_norm` with `qkv_bias`; a
    Mixtral without renormalised router weights and without `qk_norm`).
    """
    if isinstance(config, ViTConfig):
        return _vit_to_hf(config)
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


def _rope_to_hf(c: LlamaConfig | MixtralConfig) -> dict[str, Any]:
    scaling = None
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        scaling = {
            "rope_type": "llama3",
            "factor": c.rope_scaling.factor,
            "low_freq_factor": c.rope_scaling.low_freq_factor,
            "high_freq_factor": c.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings,
        }
        rope_parameters = {**scaling, "rope_theta": c.rope_theta}
    return {"rope_theta": c.rope_theta, "rope_scaling": scaling, "rope_parameters": rope_parameters}


def _decoder_to_hf(c: LlamaConfig | MixtralConfig) -> dict[str, Any]:
    """The keys Llama and Mixtral configs share."""
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
    """Qwen2's and Qwen3's window keys: the window, if any, on every layer."""
    window = c.sliding_window
    return {
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": 0 if window is not None else c.num_layers,
        "layer_types": ["sliding_attention" if window is not None else "full_attention"] * c.num_layers,
    }


def _qwen3_moe_to_hf(c: MixtralConfig) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **_decoder_to_hf(c),
        "intermediate_size": 6144,  # transformers' default; no layer is dense
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
