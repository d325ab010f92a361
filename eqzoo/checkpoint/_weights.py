"""Weights-only files for inference (safetensors), and a fingerprint of a model's parameters."""

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from .._errors import require
from ._config import config_to_dict, is_config, model_config
from ._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    list_items,
)
from ._meta import config_differences, lora_hint, quant_hint, renamed_codes
from ._statics import describe_statics, statics_differences
from ._tree import is_array_like, is_key, leaf_names

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def _host(leaf: Any) -> np.ndarray:
    if is_key(leaf):
        leaf = jax.random.key_data(leaf)
    return np.ascontiguousarray(jax.device_get(leaf))


def _raw(a: np.ndarray) -> np.ndarray:
    # The bytes of an array as a flat uint8 view (works for bfloat16 and 0-d arrays too).
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def params_sha256(model: Any) -> str:
    """SHA-256 over the raw bytes of every array leaf of `model`, in `jax.tree.leaves` order.

    Two runs that produce bitwise-identical parameters give the same hex digest (typed keys
    contribute their key data). Only bytes are hashed, not shapes or dtypes.

    **Arguments:** `model`, any pytree (a model, or a `TrainState`'s `model`).

    **Returns:** the 64-character hex digest.
    """
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
        digest.update(_raw(_host(leaf)))
    return digest.hexdigest()


def _named_arrays(tree: Any) -> tuple[list[str], list[Any]]:
    arrays = eqx.filter(tree, is_array_like, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    leaves = jax.tree.leaves(arrays, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return leaf_names(arrays, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)), leaves


def _header_json(header: dict[str, str], key: str) -> Any:
    try:
        return json.loads(header[key]) if key in header else None
    except ValueError:
        return None


def save_weights(model: Any, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """Write every array of `model` to a safetensors file, keyed by leaf path
    (`blocks.attn.qkv.weight`), for inference or sharing. Not a training checkpoint (no optimizer
    state, step or key; use [`eqzoo.checkpoint.Checkpointer`][] for that).

    The header's metadata holds the model `config` as JSON (when the model has one), its
    JSON-able non-array settings (static fields, by path) and a CRC-32 per tensor, which [`eqzoo.checkpoint.load_weights`][] checks. The file is written beside its
    destination and renamed into place, so `path` is never half-written.

    **Arguments:** `model`; `path` of the `.safetensors` file; `metadata`, extra string pairs for
    the header.
    """
    st = require("safetensors.numpy", "hf")
    names, leaves = _named_arrays(model)
    keys = [n for n, leaf in zip(names, leaves, strict=True) if is_key(leaf)]
    if keys:
        raise CheckpointError(
            f"save_weights stores parameters, but the model holds PRNG keys at {keys}; "
            "remove them (eqx.tree_at) or save a training checkpoint with Checkpointer."
        )
    tensors = {name: _host(leaf) for name, leaf in zip(names, leaves, strict=True)}
    header = {
        "format": "eqzoo.weights",
        "eqzoo.crc32": json.dumps({n: zlib.crc32(_raw(a)) for n, a in tensors.items()}),
        **(metadata or {}),
    }
    config = getattr(model, "config", None)
    if is_config(config):
        header["eqzoo.config"] = json.dumps(config_to_dict(config))
    header["eqzoo.statics"] = json.dumps(describe_statics(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        st.save_file(tensors, str(tmp), metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _floating(dtype_name: str) -> bool:
    """Whether a dtype name (a safetensors or NumPy one, as `load_weights` reads them) is floating."""
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype_name), jnp.floating))
    except TypeError:
        return False


def load_weights(like: Any, path: str | os.PathLike, *, cast: bool = False, allow_config_change: bool = False) -> Any:
    """Load a safetensors file written by [`eqzoo.checkpoint.save_weights`][] into the structure
    of `like`.

    **Arguments:**

    - `like`: a model, an abstract model (`eqx.filter_eval_shape(...)`), or a model config /
      preset name (the abstract model is built from it). Each leaf's sharding is kept (arrays
      and `ShapeDtypeStruct(..., sharding=...)`); otherwise arrays go to the first local device.
    - `path`: the `.safetensors` file.
    - `cast`: allow floating dtypes to differ and cast to `like`'s (e.g. fp32 weights into a
      bf16 model). Integer arrays (quantized codes) are never cast: a dtype that differs there
      is refused.
    - `allow_config_change`: load even where `like`'s model config differs from the one the
      file records (beyond [`eqzoo.checkpoint.RESTORE_MAY_CHANGE`][]): a Mixtral's routing
      (`experts_per_token`, say) or a rotary base changes the model without changing a shape;
      likewise where a recorded non-array setting of its layers (a static `temp`, say) differs.

    **Returns:** the model with the file's weights.

    **Raises:** `CheckpointNotFoundError` (no file), `CheckpointMismatchError` (names, shapes or
    dtypes do not fit, or the recorded model config differs; lists each),
    `CheckpointCorruptError` (unreadable file or a tensor whose CRC-32 does not match).
    """
    safetensors = require("safetensors", "hf")
    if isinstance(like, str) or is_config(like):
        from ..models import create
        from ..models._registry import check_buildable

        check_buildable(like)

        config = like
        like = eqx.filter_eval_shape(lambda k: create(config, key=k), jax.random.key(0))
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no weights file at {path}.")
    names, leaves = _named_arrays(like)
    try:
        f = safetensors.safe_open(str(path), framework="numpy")
    except Exception as err:
        raise CheckpointCorruptError(f"weights file {path} is corrupt or truncated: {err}", step=None) from err
    with f:
        header = f.metadata() or {}
        expected = {n: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for n, leaf in zip(names, leaves, strict=True)}
        found, stored_as = _file_specs(f, expected)
        _check_fit(path, expected, found, cast=cast)
        if not allow_config_change:
            _check_recorded(path, header, like)
        loaded = _read_tensors(f, path, [stored_as.get(n, n) for n in names], leaves, header)
    it = iter(loaded)
    return jax.tree.map(
        lambda x: next(it) if is_array_like(x) else x, like, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )


_Specs = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype name)


def _as_specs(specs: _Specs) -> dict[str, dict[str, Any]]:
    return {n: {"shape": v[0], "dtype": v[1]} for n, v in specs.items()}


def _file_specs(f: Any, expected: _Specs) -> tuple[_Specs, dict[str, str]]:
    """The shape and dtype of each tensor in the open file `f`, under the names of `expected`
    where older eqzoo stored int8 codes as a QuantizedLinear `weight`, and those renames
    (model name -> name in the file)."""
    found = {}
    for name in f.keys():
        sl = f.get_slice(name)
        found[name] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
    # int8 codes that older eqzoo saved as a QuantizedLinear `weight`: read under that name
    stored_as = renamed_codes(_as_specs(expected), _as_specs(found))
    found = {n: v for n, v in found.items() if n not in stored_as.values()} | {n: found[old] for n, old in stored_as.items()}
    return found, stored_as


def _check_fit(path: Path, expected: _Specs, found: _Specs, *, cast: bool) -> None:
    """Raise `CheckpointMismatchError` listing every array missing from the file, not in the
    model, or of another shape or (without `cast`, or for integers) dtype."""
    problems = [f"{n}: expected {e[1]}{e[0]}, not in the file" for n, e in expected.items() if n not in found]
    problems += [f"{n}: found {v[1]}{v[0]}, not in the model" for n, v in found.items() if n not in expected]
    dtypes_differ = False
    for n, (shape, dtype) in expected.items():
        # cast=True converts between floating dtypes only: integer arrays (quantized codes,
        # counters) hold values a cast would change into other values, not rounder ones
        castable = cast and _floating(found[n][1]) and _floating(dtype) if n in found else False
        if n in found and (found[n][0] != shape or (found[n][1] != dtype and not castable)):
            problems.append(
                f"{n}: expected {dtype}{shape}, found {found[n][1]}{found[n][0]}"
                + (" (cast=True converts floating dtypes only)" if cast and found[n][0] == shape else "")
            )
            dtypes_differ = dtypes_differ or (found[n][0] == shape and found[n][1] != dtype)
    if problems:
        # cast=True converts dtypes only: suggesting it for a shape mismatch would mislead.
        raise CheckpointMismatchError(
            f"weights file {path} does not fit the model:\n" + list_items(problems)
            + ("\nPass cast=True to convert dtypes." if dtypes_differ and not cast else "")
            + quant_hint(_as_specs(expected), _as_specs(found), "file")
            + lora_hint(_as_specs(expected), _as_specs(found), "file")
        )


def _check_recorded(path: Path, header: dict[str, str], like: Any) -> None:
    """The arrays fit: raise `CheckpointMismatchError` unless `like` is the model they were
    saved from, by the config the file records, then by the non-array settings of its layers
    (which repeat the config's where it has one)."""
    what, verb = "config", "differs"
    differ = config_differences(_header_json(header, "eqzoo.config"), model_config(like), ("file", "model"))
    if not differ:
        what, verb = "non-array settings", "differ"
        differ = statics_differences(_header_json(header, "eqzoo.statics"), describe_statics(like), ("file", "model"))
    if differ:
        raise CheckpointMismatchError(
            f"weights file {path} was saved from a model whose {what} {verb} from this one's:\n"
            + list_items(differ)
            + f"\nLoad it into a model built with the same {what}, or pass allow_config_change=True to do it on purpose."
        )


def _read_tensors(f: Any, path: Path, names: list[str], leaves: list[Any], header: dict[str, str]) -> list[jax.Array]:
    """Read the tensor `names[i]` of the open file `f` for each leaf, check its CRC-32 where the
    header records one, and put it on the leaf's sharding (else the first local device) in the
    leaf's dtype."""
    try:
        crcs = json.loads(header.get("eqzoo.crc32", "{}"))
    except ValueError:
        crcs = {}
    loaded = []
    for name, leaf in zip(names, leaves, strict=True):
        try:
            value = f.get_tensor(name)
        except Exception as err:
            raise CheckpointCorruptError(f"weights file {path}: tensor {name} cannot be read: {err}", step=None, parameters=(name,)) from err
        if name in crcs and zlib.crc32(_raw(value)) != crcs[name]:
            raise CheckpointCorruptError(
                f"weights file {path}: tensor {name} fails its CRC-32 check (the file was altered).",
                step=None, parameters=(name,),
            )
        sharding = getattr(leaf, "sharding", None) or SingleDeviceSharding(jax.local_devices()[0])
        loaded.append(jax.device_put(value.astype(leaf.dtype, copy=False), sharding))
    return loaded
