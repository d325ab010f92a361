"""`ViTForImageClassification` configs into the fields of a `ViTConfig`."""

from collections.abc import Mapping
from typing import Any

from ._config_values import _float, _int, _require, _unsupported


def _square(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise _unsupported(d, key, value, "eqzoo's ViT takes square images and patches")
        value = value[0]
    return int(value)


def _vit_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    _require(d, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    embed = _int(d, "hidden_size")
    inner = _int(d, "intermediate_size")
    if inner % embed:
        raise _unsupported(d, "intermediate_size", inner, f"the MLP width must be a multiple of hidden_size={embed}")
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise _unsupported(d, "hidden_act", act, "eqzoo's ViT uses the exact (erf) GELU, 'gelu'")
    if not d.get("qkv_bias", True):
        raise _unsupported(d, "qkv_bias", False, "eqzoo's ViT has biases on every projection")
    labels = d.get("id2label")
    num_classes = len(labels) if labels else _int(d, "num_labels", 2)
    return dict(
        image_size=_square(d, "image_size") if "image_size" in d else 224,
        patch_size=_square(d, "patch_size") if "patch_size" in d else 16,
        in_channels=_int(d, "num_channels", 3), num_classes=num_classes,
        num_layers=_int(d, "num_hidden_layers"), num_heads=_int(d, "num_attention_heads"),
        embed_dim=embed, mlp_ratio=inner // embed, pool="cls",
        layer_norm_eps=_float(d, "layer_norm_eps", 1e-12),
    )
