"""Saving and loading LoRA adapters alone: a file of megabytes beside a base model of gigabytes."""

import json
import os
import re
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError, require
from ..checkpoint import CheckpointMismatchError, config_to_dict, load_weights, save_weights
from ..checkpoint._config import model_config
from ..checkpoint._meta import config_differences
from ..nn import Targets
from ..quant import QuantizedLinear, QuantizedWeight
from ..sharding import path_str
from ._lora import _is_lora, adapter_filter

_KEY = "eqzoo.peft"


def _scalings(model) -> dict[str, float]:
    # Each adapter's static scaling (alpha / rank), by layer path: not an array, so not in the
    # tensors, but loading adapters under another scaling would change the model silently.
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_lora)[0]
    return {path_str(path): x.scaling for path, x in leaves if _is_lora(x)}


_SAMPLED_ARRAYS = 8
_SAMPLED_VALUES = 16


def _is_int8(x) -> bool:
    return isinstance(x, QuantizedLinear | QuantizedWeight)


def _row(x) -> np.ndarray:
    # The first `_SAMPLED_VALUES` values along the last axis, at index 0 of every other axis.
    return np.asarray(x[(0,) * (x.ndim - 1)][:_SAMPLED_VALUES] if x.ndim else x, np.float64).reshape(-1)


def _base_sample(base) -> dict[str, dict[str, Any]] | None:
    # A few values of the frozen base weights (the first row of the first arrays by path), to
    # tell a base from another of the same config: a pretrained model and its instruct-tuned
    # sibling share every shape. An int8 weight is sampled under its float weight's name
    # (`q_proj.base.weight` of a QuantizedLinear, the expert array's own path for a
    # QuantizedWeight) as its codes with each code's scale, so it is compared with the float
    # base it was quantized from as well as with another int8 copy. None when an array is not
    # readable from this process.
    entries = []  # (name, arrays to read, how to sample them)
    for path, x in jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_int8)[0]:
        name = path_str(path)
        if isinstance(x, QuantizedLinear):
            entries.append((f"{name}.weight", x))
            if eqx.is_inexact_array(x.bias) and x.bias.size:
                entries.append((f"{name}.bias", x.bias))
        elif isinstance(x, QuantizedWeight) or (eqx.is_inexact_array(x) and x.size):
            entries.append((name, x))
    sample = {}
    for name, x in sorted(entries, key=lambda item: item[0])[:_SAMPLED_ARRAYS]:
        arrays = (x.codes, x.scale) if _is_int8(x) else (x,)
        if not all(getattr(a, "is_fully_addressable", True) for a in arrays):
            return None
        if isinstance(x, QuantizedLinear):  # one scale per output row (and group): the sampled row's
            codes = _row(x.int_codes())
            lead = (0,) * (x.codes.ndim - 1)
            if x.group_size is None:
                scale = np.full(codes.shape, float(x.scale[lead]))
            else:  # (*layers, out, groups): the row's scales, each repeated over its group
                scale = np.repeat(np.asarray(x.scale[lead], np.float64), x.group_size)[: codes.size]
        elif isinstance(x, QuantizedWeight):  # one scale per output column (and group): the sampled row's columns
            codes = _row(x.int_codes())
            scale = _row(x.scale) if x.group_size is None else _row(x.scale[..., 0])  # row 0 is in group 0
        else:
            sample[name] = {"dtype": jnp.dtype(x.dtype).name, "values": _row(x).tolist()}
            continue
        sample[name] = {
            "dtype": f"int{x.bits}", "values": codes.tolist(),
            "scale": scale.tolist(), "scale_dtype": jnp.dtype(x.scale.dtype).name, "group_size": x.group_size,
        }
    return sample


def _same_floats(a: np.ndarray, b: np.ndarray, da, db) -> bool:
    if da.itemsize != db.itemsize:  # compare in the narrower dtype: a bf16 base upcast to float32 is the same base
        narrow = da if da.itemsize < db.itemsize else db
        a, b = a.astype(narrow), b.astype(narrow)
    elif da != db:  # float16 against bfloat16: neither holds the other
        eps = max(float(jnp.finfo(da).eps), float(jnp.finfo(db).eps))
        tiny = max(float(jnp.finfo(da).tiny), float(jnp.finfo(db).tiny))  # float16's subnormals
        return bool(np.allclose(a, b, rtol=eps, atol=tiny, equal_nan=True))
    return bool(np.array_equal(a, b, equal_nan=True))


def _interval(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    # The float weights an entry is consistent with, as centre and half-width: an int8 code
    # stands for every weight within half a step of `code * scale` (plus the scale's own
    # rounding, for a bfloat16 scale); a float value for those within its dtype's rounding.
    values = np.asarray(entry["values"], np.float64)
    if "scale" in entry:
        scale = np.asarray(entry["scale"], np.float64)
        centre = values * scale
        return centre, scale / 2 + float(jnp.finfo(jnp.dtype(entry["scale_dtype"])).eps) * np.abs(centre)
    finfo = jnp.finfo(jnp.dtype(entry["dtype"]))
    return values, float(finfo.eps) * np.abs(values) + float(finfo.tiny)


def _same_grid(saved: dict[str, Any], ours: dict[str, Any]) -> bool:
    # The same codes dtype, scale dtype and group size: two copies of one base are then equal bit
    # for bit. A sample written before the group size was recorded has the same grid as ours
    # where its scales are ours.
    if saved["dtype"] != ours["dtype"] or saved["scale_dtype"] != ours["scale_dtype"]:
        return False
    if "group_size" in saved and "group_size" in ours:
        return saved["group_size"] == ours["group_size"]
    return bool(np.array_equal(np.asarray(saved["scale"], np.float64), np.asarray(ours["scale"], np.float64)))


def _same_values(saved: dict[str, Any], ours: dict[str, Any]) -> bool:
    a, b = np.asarray(saved["values"], np.float64), np.asarray(ours["values"], np.float64)
    if a.shape != b.shape:
        return False
    int8 = ("scale" in saved, "scale" in ours)
    if not any(int8):
        return _same_floats(a, b, jnp.dtype(saved["dtype"]), jnp.dtype(ours["dtype"]))
    if all(int8) and _same_grid(saved, ours):  # the same int8 (int4) copy: bit for bit
        return bool(np.array_equal(a, b)) and bool(
            np.array_equal(np.asarray(saved["scale"], np.float64), np.asarray(ours["scale"], np.float64))
        )
    # Quantized against the float base it may come from, or two copies of one float base on
    # different grids (int8 and int4, another group size or scale dtype): each dequantized value
    # `code * scale` is within half its grid's step of the float weight (plus its scale's dtype
    # rounding), so the two agree within the sum of both half-widths, at most one step of the
    # coarser grid; a float value within its dtype's rounding. Every value within that.
    (ca, ha), (cb, hb) = _interval(saved), _interval(ours)
    if ca.shape != cb.shape:
        return False
    return bool(np.all(np.abs(ca - cb) <= (ha + hb) * (1 + 1e-6)))


def _base_differences(saved: Any, ours: dict[str, dict[str, Any]] | None) -> list[str]:
    if not isinstance(saved, dict) or ours is None:
        return []  # written before the sample was recorded, or not readable here
    return [name for name in saved if name in ours and not _same_values(saved[name], ours[name])]


def save_adapters(
    model, path: str | os.PathLike, *, also: Targets = None, metadata: dict[str, str] | None = None
) -> None:
    """Write only the LoRA factors of `model` (and nothing of the base model) to a safetensors
    file, with each adapter's scaling in the header; see [`eqzoo.checkpoint.save_weights`][] for
    the file format (per-tensor CRC-32, written atomically). The model's config is recorded
    too, so that adapters are not loaded onto a base of another architecture whose shapes
    happen to fit, and so are a few values of the frozen base weights (the first row of the
    first 8 arrays by path), so that they are not loaded onto another model of the same config.

    **Arguments:**

    - `model`: an adapted model.
    - `path`: the `.safetensors` file.
    - `also`: the same `also` regexes the model was trained with (see
      [`eqzoo.peft.adapter_filter`][]), so parameters trained beside the adapters (norms, say)
      are saved with them; recorded in the header, and [`eqzoo.peft.load_adapters`][] reads them.
    - `metadata`: extra string pairs for the header.
    """
    if metadata and _KEY in metadata:
        raise ConfigError(f"save_adapters: the metadata key {_KEY!r} is eqzoo's own (the adapters' scalings); use another name.")
    spec = adapter_filter(model, also=also)
    adapters = eqx.filter(model, spec)
    also_list = None if also is None else ([also] if isinstance(also, str) else list(also))
    base = model_config(model)
    info = {
        "scaling": _scalings(model),
        "also": also_list,
        "base_config": None if base is None else config_to_dict(base),
        "base_sample": _base_sample(eqx.filter(model, spec, inverse=True)),
    }
    header = {_KEY: json.dumps(info), **(metadata or {})}
    save_weights(adapters, path, metadata=header)


def _header(path) -> dict:
    safetensors = require("safetensors", "hf")
    try:
        with safetensors.safe_open(str(Path(path)), framework="numpy") as f:
            header = f.metadata() or {}
    except Exception:
        return {}  # load_weights reports the missing or corrupt file
    try:
        info = json.loads(header[_KEY])
        return info if isinstance(info, dict) and isinstance(info.get("scaling"), dict) else {"bad": True}
    except (KeyError, ValueError):
        return {"bad": True}


def _refuse_hf_peft(path) -> None:
    """A Hugging Face PEFT adapter (its folder, with `adapter_config.json`, or its
    `adapter_model.safetensors`, whose names end in `lora_A.weight`) is refused with the way to
    use it, rather than as a file of unknown origin or a missing one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    found = path.is_dir() and (path / "adapter_config.json").is_file()
    if not found and path.is_file():
        safetensors = require("safetensors", "hf")
        try:
            with safetensors.safe_open(str(path), framework="numpy") as f:
                found = any(re.search(r"\.lora_[AB]\.(default\.)?weight$", name) for name in f.keys())
        except Exception:
            return  # load_weights reports the missing or corrupt file
    if found:
        raise CheckpointMismatchError(
            f"{path} is a Hugging Face PEFT adapter (adapter_config.json, lora_A/lora_B tensors); "
            "eqzoo.peft.load_adapters reads only the files eqzoo.peft.save_adapters writes. Read it onto "
            f"the base model with eqzoo.hf.load_peft(eqzoo.hf.load_pretrained(BASE), {str(folder)!r}), "
            "which builds the adapters from its adapter_config.json."
        )


def _shape_differs(message: str) -> bool:
    # load_weights lists "name: expected <dtype><shape>, found <dtype><shape>" for each misfit.
    return any(a != b for a, b in re.findall(r"expected \w+(\([^)]*\)), found \w+(\([^)]*\))", message))


def load_adapters(model, path: str | os.PathLike, *, cast: bool = False, allow_base_change: bool = False) -> Any:
    """`model` with its LoRA factors (and any parameters saved with them through `also`) read
    from a file written by [`eqzoo.peft.save_adapters`][].

    `model` must be adapted the same way as the saved one (same targets, rank and alpha:
    `eqzoo.peft.lora(base, rank=..., alpha=..., targets=..., key=...)`); its base weights are kept.
    With `cast=True` the file's dtypes may differ from the model's and are cast to the model's
    (e.g. adapters trained in bfloat16 loaded into float32 factors). The model's config must
    equal the one the adapters were trained on (up to how it runs: see
    [`eqzoo.checkpoint.RESTORE_MAY_CHANGE`][]), and so must the sampled values of its frozen
    base weights (compared in the narrower dtype, so a base cast from bfloat16 to float32 is the
    same base; int8 codes and scales exactly against another int8 copy, and against a float
    base to within half a quantization step, so adapters trained on `eqzoo.quant.quantize(base)`
    load onto `base` and the other way round); `allow_base_change=True` loads them onto
    another on purpose (adapters trained on a base model applied to its instruct-tuned
    sibling, say). Files written before the config or the sample was recorded are not checked
    for them.

    **Raises:** `CheckpointMismatchError` if the adapters' layers, shapes or scalings, or the
    base model's config, differ (the message lists each), or the file was not written by
    `save_adapters`;
    `CheckpointNotFoundError` / `CheckpointCorruptError` as [`eqzoo.checkpoint.load_weights`][]
    does.
    """
    _refuse_hf_peft(path)
    info = _header(path)
    if info.get("bad"):
        raise CheckpointMismatchError(
            f"{path} has no LoRA scalings in its header; it was not written by eqzoo.peft.save_adapters."
        )
    if not _scalings(model):  # adapter_filter's own message would blame the file's `also`
        layers = sorted(info["scaling"])
        raise CheckpointMismatchError(
            f"load_adapters: the model has no LoRA adapters to load {path} into; the file adapts "
            f"{len(layers)} layer(s) ({', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}). Adapt the base "
            "model as it was adapted for training first, then load: "
            "load_adapters(eqzoo.peft.lora(base, rank=..., alpha=..., targets=..., key=...), path)."
        )
    try:
        spec = adapter_filter(model, also=info.get("also"))
    except ConfigError as err:
        raise CheckpointMismatchError(
            f"adapters in {path} were saved with also={info.get('also')}, which does not fit the model: {err}"
        ) from err
    adapters, rest = eqx.partition(model, spec)
    try:
        # checks names, shapes, dtypes and CRCs; the base config is compared below, with its own message
        loaded = load_weights(adapters, path, cast=cast, allow_config_change=True)
    except CheckpointMismatchError as err:
        message = str(err)
        if "not in the file" in message or "not in the model" in message or _shape_differs(message):
            message = message.replace("\nPass cast=True to convert dtypes.", "") + (
                "\nAdapt the model with the targets and rank the adapters were trained with "
                "(eqzoo.peft.lora(base, rank=..., targets=..., experts=...)); a mixture-of-experts "
                "model adapted without experts (before they were adapted by default) needs "
                "experts=False."
            )
        else:  # dtypes only
            message = message.replace("Pass cast=True", "Pass load_adapters(..., cast=True)")
        raise CheckpointMismatchError(message) from err
    # The arrays fit: is it the base they were trained on?
    differ = [] if allow_base_change else config_differences(info.get("base_config"), model_config(model), ("adapters' base", "this model"))
    if differ:
        raise CheckpointMismatchError(
            f"adapters in {path} were trained on a base model whose config differs from this model's:\n- "
            + "\n- ".join(differ)
            + "\nLoad them onto the model they were trained on, or pass allow_base_change=True to do it on purpose."
        )
    changed = [] if allow_base_change else _base_differences(info.get("base_sample"), _base_sample(rest))
    if changed:
        raise CheckpointMismatchError(
            f"adapters in {path} were trained on a base model of this config with other weights: the "
            f"sampled values of {len(changed)} frozen array(s) differ ({', '.join(changed[:3])}"
            + (", ..." if len(changed) > 3 else "")
            + "). Load them onto the weights they were trained on, or pass allow_base_change=True "
            "to apply them to another base on purpose."
        )
    saved, ours = info["scaling"], _scalings(model)
    problems = [
        f"{name}: the file's adapter has scaling {saved[name]}, the model's {ours[name]}"
        for name in ours
        if name in saved and abs(saved[name] - ours[name]) > 1e-12 * max(1.0, abs(ours[name]))
    ]
    if problems:
        raise CheckpointMismatchError(
            f"adapters in {path} do not fit the model:\n- " + "\n- ".join(problems)
            + "\nBuild the adapters with the alpha and rank they were trained with "
            "(eqzoo.peft.lora(..., rank=..., alpha=..., use_rslora=...))."
        )
    return eqx.combine(loaded, rest)
