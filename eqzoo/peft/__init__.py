"""Parameter-efficient fine-tuning: LoRA adapters on any linear layer of any eqzoo model, and on
the expert weights of mixture-of-experts layers.

Wrap layers by path with [`eqzoo.peft.lora`][], train only the adapters (pass
[`eqzoo.peft.adapter_filter`][] as `TrainState.create(..., trainable=...)`), then fold them into
the base weights with [`eqzoo.peft.merge`][] or keep them in a small file with
[`eqzoo.peft.save_adapters`][]. A quantized base (`eqzoo.quant`) can be adapted too.
"""

from ._io import load_adapters as load_adapters, save_adapters as save_adapters
from ._lora import (
    LoRALinear as LoRALinear,
    LoRAWeight as LoRAWeight,
    adapter_count as adapter_count,
    adapter_filter as adapter_filter,
    lora as lora,
    merge as merge,
    unwrap as unwrap,
)

__all__ = [
    "LoRALinear",
    "LoRAWeight",
    "adapter_count",
    "adapter_filter",
    "load_adapters",
    "lora",
    "merge",
    "save_adapters",
    "unwrap",
]
