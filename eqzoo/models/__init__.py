"""Model families with frozen configs, and a registry of named presets."""

from ._cnn import CNN as CNN, CNNConfig as CNNConfig
from ._gpt2 import GPT2 as GPT2, GPT2Config as GPT2Config
from ._llama import Llama as Llama, LlamaConfig as LlamaConfig
from ._lm import AbstractLM as AbstractLM
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

__all__ = [
    "AbstractLM",
    "CNN",
    "CNNConfig",
    "GPT2",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "MLP",
    "MLPConfig",
    "ModelConfig",
    "create",
    "get_config",
    "is_stateful",
    "list_presets",
    "model_class",
    "register_preset",
]
