"""`GemmaForCausalLM`, `Gemma2ForCausalLM` and `Gemma3ForCausalLM` configs into the fields of a
`GemmaConfig`."""

import warnings
from collections.abc import Mapping
from typing import Any

from .._errors import user_stacklevel
from ..models import GemmaConfig
from ..nn import RopeScaling
from ._architectures import _family
from ._config_values import _GELU_TANH, _float, _int, _require, _sliding_window, _unsupported
from ._rope_config import _rope_from_hf

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
