"""`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM` configs
into the fields of a `LlamaConfig`."""

from collections.abc import Mapping
from typing import Any

from ..models._llama import LAYER_TYPES
from ._config_values import _float, _int, _require, _sliding_window, _unsupported
from ._rope_config import _rope_from_hf


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
