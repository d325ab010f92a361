"""Conversion between Hugging Face `config.json` dicts and eqzoo's frozen model configs."""

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

from .._errors import ConfigError, user_stacklevel
from ..models import GemmaConfig, GPT2Config, LlamaConfig, MixtralConfig, ViTConfig
from ..models._llama import LAYER_TYPES
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
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
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


_MISSING = object()


def _number(d: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    # d[key] (or d.get(key, default)) as `kind`; a null, a string or a fraction where an integer
    # belongs is a damaged config.json, named as such rather than failing inside int()/float().
    value = d[key] if default is _MISSING else d.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is int and value != int(value)):
        raise HFFormatError(
            f"config.json has {key}={value!r}; it must be {'an integer' if kind is int else 'a finite number'}."
        )
    return kind(value)


def _int(d: Mapping[str, Any], key: str, default: Any = _MISSING) -> int:
    return _number(d, key, int, default)


def _float(d: Mapping[str, Any], key: str, default: Any = _MISSING) -> float:
    return _number(d, key, float, default)


def _unsupported(d: Mapping[str, Any], key: str, value: Any, why: str) -> HFFormatError:
    return HFFormatError(f"config.json has {key}={value!r}, which eqzoo does not support: {why}.")


def _gpt2_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    _require(d, "vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
    embed = _int(d, "n_embd")
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
        vocab_size=_int(d, "vocab_size"), max_seq=_int(d, "n_positions"), num_layers=_int(d, "n_layer"),
        num_heads=_int(d, "n_head"), embed_dim=embed, mlp_ratio=inner // embed,
        layer_norm_eps=_float(d, "layer_norm_epsilon", 1e-5),
    )


def _check_partial_rotary(d: Mapping[str, Any], merged: Mapping[str, Any], rope_type: str) -> None:
    # `partial_rotary_factor` (in the rotary parameters, or else at the top level, as transformers
    # takes it) asks to rotate only the first fraction of each head; eqzoo rotates the whole head.
    factor = merged.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if factor is None or factor == 1:
        return
    factor = _float({"partial_rotary_factor": factor}, "partial_rotary_factor")
    if rope_type == "default":
        # Accepted: for every family read here, transformers 5's default rotary embedding is the
        # model's own `compute_default_rope_parameters`, which never reads the factor and
        # rotates the whole head, as eqzoo does (the logits agree; tests/hf/test_load.py).
        return
    # transformers' linear and llama3 rotary functions do read it and compute frequencies for the
    # first fraction of the head only; these models' attention then applies them to the whole
    # head and fails at the first forward pass. Refused: rotating the whole head would compute
    # something the file does not describe.
    raise _unsupported(
        d, "partial_rotary_factor", factor,
        f"with rope_type {rope_type!r} transformers rotates only that fraction of each head (and "
        "this architecture's attention cannot apply it), while eqzoo rotates the whole head. Only "
        "partial_rotary_factor=1.0 (or any value with rope_type 'default', which transformers ignores "
        "for this architecture) is supported",
    )


def _rope_from_hf(d: Mapping[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (holding rope_theta); 4.x wrote `rope_theta` and
    # `rope_scaling` (with "type" in the oldest files, "rope_type" later).
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta", default_theta))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    _check_partial_rotary(d, merged, rope_type)
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        if "factor" not in merged:
            raise HFFormatError("config.json's linear rope scaling lacks 'factor'.")
        return float(theta), RopeScaling(factor=_float(merged, "factor"), rope_type="linear")
    if rope_type != "llama3":
        raise _unsupported(
            d, "rope_type", rope_type, "only 'default', 'linear' and 'llama3' rotary embeddings are implemented"
        )
    try:
        scaling_obj = RopeScaling(
            factor=_float(merged, "factor"),
            low_freq_factor=_float(merged, "low_freq_factor"),
            high_freq_factor=_float(merged, "high_freq_factor"),
            original_max_position_embeddings=_int(merged, "original_max_position_embeddings"),
        )
    except KeyError as err:
        raise HFFormatError(f"config.json's llama3 rope scaling lacks {err.args[0]!r}.") from None
    return float(theta), scaling_obj


def _llama_from_hf(
    d: Mapping[str, Any], *, theta: float = 10000.0, eps: float = 1e-6, max_seq: int = 2048, kv_default: int | None = None
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
    heads = _int(d, "num_attention_heads")
    embed = _int(d, "hidden_size")
    head_dim = d.get("head_dim")
    if head_dim is not None and int(head_dim) == embed // heads and embed % heads == 0:
        head_dim = None  # the default: keep eqzoo configs equal whichever way HF spelled it
    theta, scaling = _rope_from_hf(d, theta)
    # A key left out takes the family's transformers default (`kv_default`: Mistral's and
    # Mixtral's 8, Qwen2's and Qwen3's 32) where that divides the heads; an explicit null, or
    # a default that cannot fit (tiny test configs), means one per head, as Llama's default.
    default_kv = kv_default if kv_default is not None and heads % kv_default == 0 else None
    kv_heads = d.get("num_key_value_heads", default_kv)
    return dict(
        vocab_size=_int(d, "vocab_size"), max_seq=_int(d, "max_position_embeddings", max_seq),
        num_layers=_int(d, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=heads if kv_heads is None else int(kv_heads), embed_dim=embed,
        hidden_dim=_int(d, "intermediate_size"), head_dim=None if head_dim is None else int(head_dim),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=_float(d, "rms_norm_eps", eps),
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
    fields = _llama_from_hf(d, theta=10000.0, eps=1e-6, max_seq=4096 * 32, kv_default=8)
    return fields | dict(sliding_window=_sliding_window(d, 4096))


def _qwen_window(d: Mapping[str, Any], layers: int) -> dict[str, Any]:
    # Qwen2's and Qwen3's window, as transformers reads it: the window only with
    # use_sliding_window; then on the layers layer_types names (transformers 5 writes it), or
    # else on those from max_window_layers on.
    window = _sliding_window(d, 4096) if bool(d.get("use_sliding_window", False)) else None
    types = d.get("layer_types")
    if types is None:
        if window is None:
            return dict(sliding_window=None, layer_types=None)
        first = d.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise _unsupported(d, "max_window_layers", first, "it must be a non-negative integer")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list | tuple) or len(types) != layers or not set(types) <= set(LAYER_TYPES):
        raise _unsupported(d, "layer_types", types, f"one of 'sliding_attention' / 'full_attention' per layer ({layers})")
    if window is None or "sliding_attention" not in types:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=None if "full_attention" not in types else tuple(types))


def _qwen2_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    # Qwen2 is Llama's architecture with biases on the query, key and value projections.
    # Qwen2 has no attention_bias option (its q/k/v always have biases, o never): ignored.
    fields = _llama_from_hf({k: v for k, v in d.items() if k != "attention_bias"}, theta=10000.0, eps=1e-6, max_seq=32768, kv_default=32)
    return fields | dict(qkv_bias=True, **_qwen_window(d, fields["num_layers"]))


def _qwen3_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    # Qwen3 is Llama's architecture with an RMSNorm over each head's queries and keys (no
    # biases unless attention_bias, which _llama_from_hf refuses).
    # transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads.
    fields = _llama_from_hf({"head_dim": 128} | dict(d), theta=10000.0, eps=1e-6, max_seq=32768, kv_default=32)
    return fields | dict(qk_norm=True, **_qwen_window(d, fields["num_layers"]))


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
    # transformers' rule (Qwen3MoeDecoderLayer): layer i has experts unless i is in
    # mlp_only_layers, num_experts is 0 or (i + 1) is not a multiple of decoder_sparse_step.
    # Entries of mlp_only_layers naming no layer (past the last, negative) match none, as there.
    layers = fields["num_layers"]
    step = d.get("decoder_sparse_step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise _unsupported(d, "decoder_sparse_step", step, "it must be a positive integer")
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list | tuple) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise _unsupported(d, "mlp_only_layers", only, "it must be a list of layer indices")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 0:
        raise _unsupported(d, "num_experts", experts, "it must be a non-negative integer")
    dense = [i for i in range(layers) if i in only or experts == 0 or (i + 1) % step]
    if len(dense) == layers:
        raise _unsupported(
            d, "num_experts" if experts == 0 else ("mlp_only_layers" if only else "decoder_sparse_step"),
            experts if experts == 0 else (only if only else step),
            "it leaves no layer with experts: the model is a dense Qwen3 (SwiGLU of intermediate_size in "
            "every layer), which eqzoo reads as a LlamaConfig with qk_norm=True from a config.json of "
            "model_type 'qwen3' (architectures ['Qwen3ForCausalLM'], head_dim written out as Qwen3's default is "
            "128; the weights keep their names)",
        )
    if dense:
        key, value = ("mlp_only_layers", only) if any(i in only for i in dense) else ("decoder_sparse_step", step)
        raise _unsupported(
            d, key, value,
            f"it makes layers {dense} of {layers} dense, and eqzoo's Mixtral has experts in every layer "
            "(mlp_only_layers=[] and decoder_sparse_step=1)",
        )
    window = _sliding_window(d, 4096) if d.get("use_sliding_window", False) else None
    return fields | dict(
        hidden_dim=_int(d, "moe_intermediate_size"), num_experts=experts,
        experts_per_token=_int(d, "num_experts_per_tok"),
        normalize_router_weights=bool(d.get("norm_topk_prob", False)),
        router_aux_loss_coef=_float(d, "router_aux_loss_coef", 0.001),
        qk_norm=True, sliding_window=window,
    )


def _mixtral_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    _require(d, "num_local_experts", "num_experts_per_tok")
    fields = _llama_from_hf(d, theta=1e6, eps=1e-5, max_seq=4096 * 32, kv_default=8)
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
        num_experts=_int(d, "num_local_experts"), experts_per_token=_int(d, "num_experts_per_tok"),
        router_aux_loss_coef=_float(d, "router_aux_loss_coef", 0.001),
    )


_GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # transformers' defaults: every n-th layer full


def _gemma_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma, Gemma 2 and Gemma 3 (text) into one `GemmaConfig`; keys a file leaves out take
    transformers' defaults for its generation."""
    family = _family(d)
    _require(d, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if d.get(key):
            why = "Gemma's projections have no biases" if key == "attention_bias" else "eqzoo's Gemma is a causal decoder"
            raise _unsupported(d, key, d[key], why)
    act_key = "hidden_act" if family == "gemma" else "hidden_activation"
    act = d.get(act_key) or "gelu_pytorch_tanh"
    if family == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers reads Gemma's legacy "gelu" as the tanh GELU
    if act not in _GELU_TANH + ("gelu",):
        raise _unsupported(d, act_key, act, f"eqzoo's Gemma gates with the tanh GELU {_GELU_TANH} or 'gelu'")
    layers = _int(d, "num_hidden_layers")
    head_dim = int(d.get("head_dim") or 256)
    scalar = None if family == "gemma" else d.get("query_pre_attn_scalar", 256)  # Gemma: head_dim
    fields: dict[str, Any] = dict(
        vocab_size=_int(d, "vocab_size"),
        max_seq=_int(d, "max_position_embeddings", 131072 if family == "gemma3_text" else 8192),
        num_layers=layers, num_heads=_int(d, "num_attention_heads"),
        num_kv_heads=int(d.get("num_key_value_heads") or (16 if family == "gemma" else 4)),
        embed_dim=_int(d, "hidden_size"), hidden_dim=_int(d, "intermediate_size"), head_dim=head_dim,
        query_pre_attn_scalar=None if scalar is None else float(scalar),
        rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        activation="gelu" if act == "gelu" else "gelu_tanh",
        post_norms=family != "gemma", qk_norm=family == "gemma3_text",
    )
    if family == "gemma":
        theta, scaling = _rope_from_hf(d, 10000.0)
        # No windows; the pattern only if eqzoo wrote one (else GemmaConfig's default).
        return fields | dict(
            rope_theta=theta, rope_scaling=scaling, sliding_window=None,
            sliding_window_pattern=d.get("sliding_window_pattern", GemmaConfig.sliding_window_pattern),
            attn_logit_softcap=None, final_logit_softcap=None,
        )
    caps = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None)}[family]
    attn_cap = d.get("attn_logit_softcapping", caps[0])
    final_cap = d.get("final_logit_softcapping", caps[1])
    if family == "gemma3_text" and attn_cap is not None:
        warnings.warn(
            f"config.json has attn_logit_softcapping={attn_cap}, which transformers' Gemma 3 reads but "
            "never applies; eqzoo ignores it too, so the loaded model computes what transformers does.",
            stacklevel=user_stacklevel(),
        )
        attn_cap = None
    if family == "gemma2":
        theta, scaling = _rope_from_hf(d, 10000.0)
        local_theta = None
    else:
        theta, scaling, local_theta = _gemma3_rope_from_hf(d)
    window = _sliding_window(d, 4096)
    pattern = d.get("sliding_window_pattern", _GEMMA_PATTERN[family])  # eqzoo writes it too (or null)
    if pattern is not None and (isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1):
        raise _unsupported(d, "sliding_window_pattern", pattern, "it must be a positive integer or null")
    patterned = ["full_attention" if pattern is not None and (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    types = list(d.get("layer_types") or patterned)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise _unsupported(d, "layer_types", types, f"one of 'sliding_attention' / 'full_attention' per layer ({layers})")
    if "sliding_attention" not in types:
        window = None  # every layer full (eqzoo writes max_seq as the unused window then)
    if window is None:
        local_theta = None  # no sliding layers
    # Kinds the file's pattern gives keep that pattern; other kinds stay explicit (GemmaConfig
    # turns them into a pattern if one gives them).
    explicit = window is not None and types != patterned
    return fields | dict(
        rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta,
        sliding_window=window, layer_types=tuple(types) if explicit else None,
        sliding_window_pattern=None if explicit else pattern,
        attn_logit_softcap=None if attn_cap is None else float(attn_cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
    )


def _gemma3_rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None, float | None]:
    # transformers 5: rope_parameters keyed by layer type; 4.x: rope_theta and rope_scaling for the
    # full layers, rope_local_base_freq for the sliding ones.
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        # A top-level partial_rotary_factor applies to each layer type (transformers copies it in).
        partial = {"partial_rotary_factor": d["partial_rotary_factor"]} if "partial_rotary_factor" in d else {}
        theta, scaling = _rope_from_hf({"rope_parameters": full, **partial}, 1e6)
        local_theta, local_scaling = _rope_from_hf({"rope_parameters": local, **partial}, 10000.0)
        if (local_theta, local_scaling) == (theta, scaling):
            return theta, scaling, None  # the sliding layers rotate as the full ones do
        if local_scaling is not None:
            raise _unsupported(
                d, "rope_parameters.sliding_attention", local,
                "the sliding layers' rotary embedding is either the full layers' or an unscaled one",
            )
    else:
        theta, scaling = _rope_from_hf(d, 1e6)
        local_theta = _float(d, "rope_local_base_freq", 10000.0)
    return theta, scaling, local_theta


def _square(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise _unsupported(d, key, value, "eqzoo's ViT takes square images and patches")
        value = value[0]
    return int(value)


def _vit_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    _require(d, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    embed = _int(d, "hidden_size")
    inner = _int(d, "intermediate_size")
    if inner % embed:
        raise _unsupported(d, "intermediate_size", inner, f"the MLP width must be a multiple of hidden_size={embed}")
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise _unsupported(d, "hidden_act", act, "eqzoo's ViT uses the exact (erf) GELU, 'gelu'")
    if not d.get("qkv_bias", True):
        raise _unsupported(d, "qkv_bias", False, "eqzoo's ViT has biases on every projection")
    labels = d.get("id2label")
    num_classes = len(labels) if labels else _int(d, "num_labels", 2)
    return dict(
        image_size=_square(d, "image_size") if "image_size" in d else 224,
        patch_size=_square(d, "patch_size") if "patch_size" in d else 16,
        in_channels=_int(d, "num_channels", 3), num_classes=num_classes,
        num_layers=_int(d, "num_hidden_layers"), num_heads=_int(d, "num_attention_heads"),
        embed_dim=embed, mlp_ratio=inner // embed, pool="cls",
        layer_norm_eps=_float(d, "layer_norm_eps", 1e-12),
    )


_FROM_HF = {
    "gpt2": (GPT2Config, _gpt2_from_hf),
    "llama": (LlamaConfig, _llama_from_hf),
    "mistral": (LlamaConfig, _mistral_from_hf),
    "qwen2": (LlamaConfig, _qwen2_from_hf),
    "qwen3": (LlamaConfig, _qwen3_from_hf),
    "mixtral": (MixtralConfig, _mixtral_from_hf),
    "qwen3_moe": (MixtralConfig, _qwen3_moe_from_hf),
    "gemma": (GemmaConfig, _gemma_from_hf),
    "gemma2": (GemmaConfig, _gemma_from_hf),
    "gemma3_text": (GemmaConfig, _gemma_from_hf),
    "vit": (ViTConfig, _vit_from_hf),
}


def config_from_hf(
    hf_config: Mapping[str, Any], **overrides: Any
) -> GPT2Config | LlamaConfig | MixtralConfig | GemmaConfig | ViTConfig:
    """The eqzoo config described by a Hugging Face `config.json` dict.

    Reads `GPT2LMHeadModel` and `LlamaForCausalLM` configs, including grouped-query attention
    (`num_key_value_heads`), `head_dim`, `rope_theta`, Llama-3 `rope_scaling` (in both the
    transformers 4 `rope_theta`/`rope_scaling` and the transformers 5 `rope_parameters`
    spellings), `rms_norm_eps` / `layer_norm_epsilon` and `tie_word_embeddings`;
    `MistralForCausalLM` configs (Llama's with `sliding_window`, into a
    [`eqzoo.models.LlamaConfig`][] with `sliding_window`); `Qwen2ForCausalLM` configs (a
    `LlamaConfig` with `qkv_bias=True`; with `use_sliding_window`, the window on the layers
    `layer_types` names, or else on those from `max_window_layers` on);
    `Qwen3ForCausalLM` configs (a `LlamaConfig` with `qk_norm=True`, the window read as
    Qwen2's); `Qwen3MoeForCausalLM` configs (a [`eqzoo.models.MixtralConfig`][] with
    `qk_norm=True`, `moe_intermediate_size` as `hidden_dim`, `norm_topk_prob` as
    `normalize_router_weights`; experts in every layer); `MixtralForCausalLM` configs (as
    Llama's, plus `sliding_window`, `num_local_experts`, `num_experts_per_tok` and
    `router_aux_loss_coef`; `router_jitter_noise`, noise transformers adds only in training,
    is ignored with a warning); `GemmaForCausalLM`, `Gemma2ForCausalLM` and
    `Gemma3ForCausalLM` (`model_type` `"gemma3_text"`) configs (a [`eqzoo.models.GemmaConfig`][]:
    `query_pre_attn_scalar`, `layer_types` or `sliding_window_pattern`, the soft caps, and
    Gemma 3's per-layer-type `rope_parameters` or the older `rope_local_base_freq`; linear
    rope scaling; `use_bidirectional_attention` is refused); and
    `ViTForImageClassification` configs (the number of classes from `id2label`, square
    `image_size` and `patch_size`, `layer_norm_eps`).

    **Arguments:**

    - `hf_config`: the parsed `config.json`.
    - `overrides`: fields of the eqzoo config to replace, typically the ones HF does not know
      about: `remat`, `scan_layers`, `attention_backend`, Mixtral's `router_z_loss_coef` and
      `moe_implementation`.

    **Returns:** a [`eqzoo.models.GPT2Config`][], [`eqzoo.models.LlamaConfig`][],
    [`eqzoo.models.MixtralConfig`][], [`eqzoo.models.GemmaConfig`][] or
    [`eqzoo.models.ViTConfig`][].

    **Raises:** `HFFormatError` for an unsupported architecture (the message lists the supported
    ones) or option (for example a `partial_rotary_factor` below 1 with a `linear` or `llama3`
    rotary embedding: eqzoo rotates the whole head), or a quantized checkpoint (`quantization_config`: GPTQ, AWQ, bitsandbytes,
    FP8, ...); `ConfigError` for an unknown override.
    """
    cls, read = _FROM_HF[_family(hf_config)]
    quantization = hf_config.get("quantization_config")
    if quantization:
        # GPTQ/AWQ/bitsandbytes/FP8 files hold packed integers or scaled 8-bit floats under
        # their own tensor names: never plain weights, whatever the tensor checks would say.
        method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
        raise _unsupported(
            hf_config, "quantization_config", {"quant_method": method},
            "eqzoo.hf reads unquantized float32/float16/bfloat16 checkpoints only. Load the "
            "original (unquantized) checkpoint, then quantize in eqzoo with eqzoo.quant.quantize",
        )
    try:
        fields = read(hf_config)
    except HFFormatError:
        raise
    except (TypeError, ValueError) as err:  # a value of the wrong type where _int/_float do not look
        raise HFFormatError(f"config.json holds a value of the wrong type ({err}); compare it with the model's original.") from None
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"config_from_hf: {cls.__name__} has no fields {unknown}; valid fields: {sorted(names)}.")
    return cls(**{**fields, **overrides})


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


def _rope_to_hf(c: LlamaConfig | MixtralConfig | GemmaConfig) -> dict[str, Any]:
    scaling = None
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None and c.rope_scaling.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": c.rope_scaling.factor}
        rope_parameters = {**scaling, "rope_theta": c.rope_theta}
    elif c.rope_scaling is not None:
        scaling = {
            "rope_type": "llama3",
            "factor": c.rope_scaling.factor,
            "low_freq_factor": c.rope_scaling.low_freq_factor,
            "high_freq_factor": c.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings,
        }
        rope_parameters = {**scaling, "rope_theta": c.rope_theta}
    return {"rope_theta": c.rope_theta, "rope_scaling": scaling, "rope_parameters": rope_parameters}


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
