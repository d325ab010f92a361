"""Layers: attention with GQA, RoPE and a KV cache; MLPs; mixture-of-experts; norms; embeddings;
patch embedding; `Stacked`; conv blocks.

Every layer is a final `equinox.Module` whose `__call__` takes one unbatched example.
"""

from ._attention import (
    Attention as Attention,
    AttentionBackend as AttentionBackend,
    KVCache as KVCache,
    QuantizedKV as QuantizedKV,
    resolve_backend as resolve_backend,
)
from ._block import TransformerBlock as TransformerBlock
from ._conv import ConvBlock as ConvBlock, ResidualBlock as ResidualBlock
from ._embedding import Embedding as Embedding
from ._grouped import summed_weight_gradients as summed_weight_gradients
from ._linear import (
    AbstractLinear as AbstractLinear,
    apply_linear as apply_linear,
    init_linear as init_linear,
    linear_dtype as linear_dtype,
)
from ._mlp import GLU_ACTIVATIONS as GLU_ACTIVATIONS, MLP as MLP, SwiGLU as SwiGLU
from ._moe import MoE as MoE, MoEImplementation as MoEImplementation
from ._norm import LayerNorm as LayerNorm, RMSNorm as RMSNorm
from ._patch import PatchEmbed as PatchEmbed
from ._replace import (
    Targets as Targets,
    linear_paths as linear_paths,
    replace_linears as replace_linears,
    select_linears as select_linears,
)
from ._rope import RopeScaling as RopeScaling, RotaryEmbedding as RotaryEmbedding
from ._stacked import (
    REMAT_POLICIES as REMAT_POLICIES,
    SCAN_DEFAULTS as SCAN_DEFAULTS,
    RematPolicy as RematPolicy,
    ScanMode as ScanMode,
    Stacked as Stacked,
    remat_policy as remat_policy,
    resolve_scan as resolve_scan,
)
from ._weight import (
    AbstractWeight as AbstractWeight,
    weight_einsum as weight_einsum,
    weight_take as weight_take,
    weight_take_matmul as weight_take_matmul,
    weight_value as weight_value,
)

__all__ = [
    "AbstractLinear",
    "AbstractWeight",
    "Attention",
    "AttentionBackend",
    "ConvBlock",
    "Embedding",
    "KVCache",
    "QuantizedKV",
    "LayerNorm",
    "MLP",
    "MoE",
    "MoEImplementation",
    "PatchEmbed",
    "REMAT_POLICIES",
    "RMSNorm",
    "RematPolicy",
    "SCAN_DEFAULTS",
    "ScanMode",
    "ResidualBlock",
    "RopeScaling",
    "RotaryEmbedding",
    "Stacked",
    "SwiGLU",
    "GLU_ACTIVATIONS",
    "Targets",
    "TransformerBlock",
    "apply_linear",
    "init_linear",
    "linear_dtype",
    "linear_paths",
    "remat_policy",
    "replace_linears",
    "resolve_backend",
    "resolve_scan",
    "select_linears",
    "summed_weight_gradients",
    "weight_einsum",
    "weight_take",
    "weight_take_matmul",
    "weight_value",
]
