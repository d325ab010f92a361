"""Model families with frozen configs, and a registry of named presets."""

from ._cnn import CNN as CNN, CNNConfig as CNNConfig
from ._denoiser import AbstractDenoiser as AbstractDenoiser
from ._dit import DiT as DiT, DiTConfig as DiTConfig
from ._gemma import Gemma as Gemma, GemmaConfig as GemmaConfig
from ._gpt2 import GPT2 as GPT2, GPT2Config as GPT2Config
from ._llama import Llama as Llama, LlamaConfig as LlamaConfig
from ._lm import AbstractLM as AbstractLM
from ._mixtral import Mixtral as Mixtral, MixtralConfig as MixtralConfig
from ._mlp import MLP as MLP, MLPConfig as MLPConfig
from ._registry import (
    ModelConfig as ModelConfig,
    create as create,
    get_config as get_config,
    is_stateful as is_stateful,
    list_presets as list_presets,
    model_class as model_class,
    register_preset as register_preset,
)
from ._resize import resize_vocab as resize_vocab
from ._unet import UNet as UNet, UNetConfig as UNetConfig
from ._vit import ViT as ViT, ViTConfig as ViTConfig

__all__ = [
    "AbstractDenoiser",
    "AbstractLM",
    "CNN",
    "CNNConfig",
    "DiT",
    "DiTConfig",
    "Gemma",
    "GemmaConfig",
    "GPT2",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "MLP",
    "Mixtral",
    "MixtralConfig",
    "MLPConfig",
    "ModelConfig",
    "UNet",
    "UNetConfig",
    "ViT",
    "ViTConfig",
    "create",
    "get_config",
    "is_stateful",
    "list_presets",
    "model_class",
    "register_preset",
    "resize_vocab",
]
