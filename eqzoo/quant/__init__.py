"""Int8 and int4 weight-only quantization: post-training ([`eqzoo.quant.quantize`][]) and
quantization-aware training with fake quantization ([`eqzoo.quant.prepare_qat`][]).

Every selected `equinox.nn.Linear` becomes an [`eqzoo.quant.QuantizedLinear`][]: int8 codes
with one float scale per output channel, about 4x smaller than float32 (2x than bfloat16), or
int4 codes packed two to a byte with group-wise scales (`quantize(model, bits=4,
group_size=128)`); the experts of mixture-of-experts layers become
[`eqzoo.quant.QuantizedWeight`][]s.
Activations, embeddings, norms and eqzoo models' output heads (not linear layers) stay floating
(a head of your own that is an `equinox.nn.Linear` is quantized unless `targets` leave it out); the quantized model runs
anywhere the float one does (`jax.jit`, `jax.vmap`, `eqzoo.generate`, sharded meshes,
`eqzoo.checkpoint.save_weights`). A quantized base can carry LoRA adapters (`eqzoo.peft`).

Training matmuls in fp8 are [`eqzoo.quant.prepare_fp8`][]: the float weights stay the
parameters, and each selected linear layer's products (and the mixture-of-experts layers'
expert products) take e4m3 operands forward and e5m2 gradients backward, with per-tensor
scales recomputed at every call.
"""

from ._fp8 import (
    E4M3_MAX as E4M3_MAX,
    E5M2_MAX as E5M2_MAX,
    Fp8Linear as Fp8Linear,
    fp8_matmul as fp8_matmul,
)
from ._fp8_experts import Fp8Weight as Fp8Weight, fp8_einsum as fp8_einsum
from ._fp8_model import prepare_fp8 as prepare_fp8, unwrap_fp8 as unwrap_fp8
from ._int4 import (
    QMAX4 as QMAX4,
    dequantize_int4 as dequantize_int4,
    pack_int4 as pack_int4,
    quantize_int4 as quantize_int4,
    unpack_int4 as unpack_int4,
)
from ._int8 import (
    QMAX as QMAX,
    dequantize_int8 as dequantize_int8,
    quantize_int8 as quantize_int8,
)
from ._linear import QuantizedLinear as QuantizedLinear
from ._model import dequantize as dequantize, quantize as quantize
from ._qat import (
    FakeQuantLinear as FakeQuantLinear,
    FakeQuantWeight as FakeQuantWeight,
    fake_quantize as fake_quantize,
    prepare_qat as prepare_qat,
)
from ._size import size_report as size_report
from ._weight import QuantizedWeight as QuantizedWeight

__all__ = [
    "E4M3_MAX",
    "E5M2_MAX",
    "QMAX",
    "QMAX4",
    "FakeQuantLinear",
    "FakeQuantWeight",
    "Fp8Linear",
    "Fp8Weight",
    "QuantizedLinear",
    "QuantizedWeight",
    "dequantize",
    "dequantize_int4",
    "dequantize_int8",
    "fake_quantize",
    "fp8_einsum",
    "fp8_matmul",
    "pack_int4",
    "prepare_fp8",
    "prepare_qat",
    "quantize",
    "quantize_int4",
    "quantize_int8",
    "size_report",
    "unpack_int4",
    "unwrap_fp8",
]
