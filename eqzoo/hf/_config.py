"""Conversion between Hugging Face `config.json` dicts and eqzoo's frozen model configs.

This module holds `config_from_hf`, which picks the reader of the file's architecture
(`_read_*.py`); the writer, `config_to_hf`, is in `_config_to_hf.py`; both are re-exported here.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from .._errors import ConfigError
from ..models import GemmaConfig, GPT2Config, LlamaConfig, MixtralConfig, ViTConfig
from ._architectures import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES, _family
from ._config_to_hf import as_architecture_of as as_architecture_of, config_to_hf as config_to_hf
from ._config_values import _unsupported
from ._errors import HFFormatError
from ._read_gemma import _gemma_from_hf
from ._read_gpt2 import _gpt2_from_hf
from ._read_llama import _llama_from_hf, _mistral_from_hf, _qwen2_from_hf, _qwen3_from_hf
from ._read_moe import _mixtral_from_hf, _qwen3_moe_from_hf
from ._read_vit import _vit_from_hf

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
