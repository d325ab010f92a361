"""Finding and reading the files of a Hugging Face checkpoint folder (safetensors only)."""

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError, require, user_stacklevel
from ._errors import HFFormatError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_NAME = "tokenizer.json"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def as_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        what = "a file" if folder.exists() else "nothing"
        raise HFFormatError(
            f"{str(folder)!r} is {what}; pass the folder of a Hugging Face checkpoint (holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}). eqzoo.hf never downloads: fetch the model first, "
            "for example with `huggingface-cli download NAME --local-dir DIR`."
        )
    return folder


def float_dtype(dtype: Any, caller: str) -> np.dtype | None:
    """`load_pretrained`'s and `save_pretrained`'s `dtype` argument as a floating NumPy dtype,
    or `None` (also for transformers' `"auto"`) to keep the file's or the model's dtypes."""
    import jax.numpy as jnp

    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    try:
        out = np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise ConfigError(
            f"{caller}: dtype={dtype!r} is not a JAX or NumPy dtype; pass one such as jnp.bfloat16 or "
            "'float32' (a torch dtype is not one), or None (or 'auto') to keep the stored dtypes."
        ) from None
    if not jnp.issubdtype(out, jnp.floating):
        raise ConfigError(
            f"{caller}: dtype={out.name} is not a floating-point dtype: it would cast every weight to "
            f"{out.name} (rounding it away), not quantize it. Pass a float dtype (jnp.bfloat16, "
            "jnp.float32) and quantize the loaded model with eqzoo.quant.quantize(model) (int8) or "
            "eqzoo.quant.quantize(model, bits=4)."
        )
    return out


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed `config.json` of `folder`."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise HFFormatError(
            f"no {CONFIG_NAME} in {str(folder)!r} (found: {sorted(p.name for p in folder.iterdir())}); "
            "a Hugging Face checkpoint folder needs the model's config.json beside its weights."
        )
    return read_json_object(file)


def read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in `file` (config.json, generation_config.json, tokenizer_config.json,
    ...); `HFFormatError` if it is not valid JSON or holds something else than an object."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HFFormatError(f"{str(file)!r} is not valid JSON: {err}.") from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{str(file)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def _refuse_pickle(folder: Path, found: list[str]) -> HFFormatError:
    return HFFormatError(
        f"{str(folder)!r} holds only pickle-based weights ({found}) and no {WEIGHTS_NAME}. eqzoo "
        "never loads pickle: unpickling can run arbitrary code. Convert the checkpoint once, in a "
        "trusted environment and only if you trust its source, with\n"
        f"    python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\"\n"
        "then load the new folder (copy its tokenizer files too)."
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint in `folder`: one file, or the shards of an index.

    Where a folder holds both, the single file is read, as `transformers` reads it, with a
    warning (one of them is probably left over from an earlier save).
    """
    index = folder / INDEX_NAME
    single = folder / WEIGHTS_NAME
    if index.is_file() and single.is_file():
        warnings.warn(
            f"{str(folder)!r} holds both {WEIGHTS_NAME} and {INDEX_NAME}; reading {WEIGHTS_NAME}, as "
            "transformers does. Delete the one left over from an earlier save to silence this.",
            stacklevel=user_stacklevel(),
        )
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HFFormatError(f"{str(index)!r} is not a safetensors index (a JSON object with a 'weight_map').") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise HFFormatError(f"{INDEX_NAME} in {str(folder)!r} names shard files that are missing: {missing}.")
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise _refuse_pickle(folder, pickled)
    raise HFFormatError(
        f"no {WEIGHTS_NAME} or {INDEX_NAME} in {str(folder)!r} "
        f"(found: {sorted(p.name for p in folder.iterdir())})."
    )


class TensorReader(contextlib.ExitStack):
    """Reads tensors one at a time (or parts of them) from a set of safetensors files.

    Use as a context manager; the files are memory-mapped and closed on exit.
    """

    def __init__(self, files: list[Path]):
        super().__init__()
        self.files = files
        self._where: dict[str, Any] = {}

    def __enter__(self) -> "TensorReader":
        super().__enter__()
        safetensors = require("safetensors", "hf")
        for file in self.files:
            try:
                handle = self.enter_context(safetensors.safe_open(str(file), framework="numpy"))
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                self.close()
                raise HFFormatError(f"cannot read {str(file)!r} as safetensors: {err}") from None
            for name in handle.keys():
                if name in self._where:  # which copy is meant? never pick one silently
                    first = self._where[name][1]
                    self.close()
                    raise HFFormatError(
                        f"the tensor {name!r} is stored twice, in {first.name!r} and {file.name!r}; a checkpoint "
                        "holds each tensor once. Re-save the checkpoint, or remove the stray shard."
                    )
                self._where[name] = (handle, file)
        return self

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._where[name][0].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of the tensor `name` (`"F32"`, `"BF16"`, `"I64"`, ...)."""
        return str(self._where[name][0].get_slice(name).get_dtype())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` of the tensor `name`, reading only that part from disk."""
        return np.asarray(self._where[name][0].get_slice(name)[index])
