"""Hugging Face interoperability: load and save GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral,
Qwen3-MoE, Gemma (1, 2 and 3) and ViT checkpoints as safetensors, read their configs and `generation_config.json`, read their fast
tokenizers (and chat templates), and read and write PEFT LoRA adapters.

Imported explicitly (`import eqzoo.hf`); needs the `hf` extra (`pip install 'eqzoo[hf]'`) for
`safetensors` and `tokenizers`. Nothing is downloaded and no pickle is ever loaded.
"""

from .._errors import require as _require

_require("safetensors", "hf")

from ._config import (  # noqa: E402
    SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES,
    config_from_hf as config_from_hf,
    config_to_hf as config_to_hf,
)
from ._errors import HFFormatError as HFFormatError  # noqa: E402
from ._generation import (  # noqa: E402
    GenerationConfig as GenerationConfig,
    load_generation_config as load_generation_config,
)
from ._load import ShardingSpec as ShardingSpec, load_pretrained as load_pretrained  # noqa: E402
from ._peft import load_peft as load_peft, save_peft as save_peft  # noqa: E402
from ._save import save_pretrained as save_pretrained  # noqa: E402
from ._tokenizer import HFTokenizer as HFTokenizer, load_tokenizer as load_tokenizer  # noqa: E402

__all__ = [
    "GenerationConfig",
    "HFFormatError",
    "HFTokenizer",
    "SUPPORTED_ARCHITECTURES",
    "ShardingSpec",
    "config_from_hf",
    "config_to_hf",
    "load_generation_config",
    "load_peft",
    "load_pretrained",
    "load_tokenizer",
    "save_peft",
    "save_pretrained",
]
