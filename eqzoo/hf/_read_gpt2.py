"""`GPT2LMHeadModel` configs into the fields of a `GPT2Config`."""

from collections.abc import Mapping
from typing import Any

from ._config_values import _GELU_TANH, _float, _int, _require, _unsupported


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
