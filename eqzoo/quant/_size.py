"""How many bytes a (quantized) model's arrays take."""

import equinox as eqx
import jax
import numpy as np

from ._linear import QuantizedLinear
from ._weight import QuantizedWeight


def _is_qlinear(x) -> bool:
    return isinstance(x, QuantizedLinear | QuantizedWeight)


def _is_sized(x) -> bool:
    return (eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)) and not jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def size_report(model) -> dict[str, int | float]:
    """The bytes a model's arrays take, split by kind, and what quantization saved.

    Works on a real model or an abstract one (leaves `jax.ShapeDtypeStruct`, e.g.
    `eqx.filter_eval_shape(lambda k: eqzoo.quant.quantize(eqzoo.models.create("llama-8b", key=k)),
    jax.random.key(0))`), so the size of a large quantized model can be read without building it.

    **Arguments:** `model`, any pytree (PRNG keys are not counted).

    **Returns:** a dict with

    - `"int8_bytes"`: the int8 weights of [`eqzoo.quant.QuantizedLinear`][] layers and
      [`eqzoo.quant.QuantizedWeight`][]s (and any other int8 array);
    - `"int4_bytes"`: the packed int4 codes of `bits=4` layers and weights (two codes a byte);
    - `"float_bytes"`: every floating array (embeddings, norms, biases, scales, float layers);
    - `"other_bytes"`: the remaining arrays (other integer arrays, boolean);
    - `"total_bytes"`: their sum;
    - `"dense_bytes"`: what the model would take with every `QuantizedLinear` and
      `QuantizedWeight` dequantized to a float weight of its original dtype (and no scale):
      the unquantized size;
    - `"ratio"`: `dense_bytes / total_bytes`, how many times smaller the model is (1.0 for a
      model with nothing quantized);
    - `"quantized_params"`: the number of weights stored as int8 or int4 codes.
    """
    arrays = [x for x in jax.tree.leaves(model) if _is_sized(x)]
    int8 = sum(_nbytes(x) for x in arrays if np.dtype(x.dtype) == np.int8)
    floating = sum(_nbytes(x) for x in arrays if jax.dtypes.issubdtype(x.dtype, np.floating))
    total = sum(_nbytes(x) for x in arrays)
    dense, params, int4 = total, 0, 0
    for layer in jax.tree.leaves(model, is_leaf=_is_qlinear):
        if _is_qlinear(layer):
            codes = layer.codes
            n = int(np.prod(codes.shape, dtype=np.int64)) * (2 if layer.bits == 4 else 1)
            params += n
            if layer.bits == 4:
                int4 += _nbytes(codes)
            # codes + scales  ->  a float weight of the scale's dtype
            dense += n * np.dtype(layer.scale.dtype).itemsize - _nbytes(codes) - _nbytes(layer.scale)
    return {
        "int8_bytes": int8,
        "int4_bytes": int4,
        "float_bytes": floating,
        "other_bytes": total - int8 - int4 - floating,
        "total_bytes": total,
        "dense_bytes": dense,
        "ratio": dense / total if total else 1.0,
        "quantized_params": params,
    }
