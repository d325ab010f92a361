"""Which Hugging Face architecture a `config.json` describes: the ones eqzoo reads and writes."""

from collections.abc import Mapping
from typing import Any

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
