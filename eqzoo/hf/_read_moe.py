"""`MixtralForCausalLM` and `Qwen3MoeForCausalLM` configs into the fields of a `MixtralConfig`."""

import warnings
from collections.abc import Mapping
from typing import Any

from .._errors import user_stacklevel
from ._config_values import _float, _int, _require, _sliding_window, _unsupported
from ._errors import HFFormatError
from ._read_llama import _llama_from_hf


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
