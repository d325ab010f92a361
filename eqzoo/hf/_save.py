"""Writing an eqzoo model as a Hugging Face checkpoint folder that transformers loads."""

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from .._errors import ConfigError, EqzooError, require
from ..models import GPT2, Gemma, Llama, Mixtral, ViT
from ..nn import AbstractLinear, AbstractWeight, select_linears
from ..sharding import path_str
from ._config import as_architecture_of, config_to_hf
from ._errors import HFFormatError
from ._files import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    as_folder,
    float_dtype,
    read_config,
)
from ._layout import TensorRule, get_path, rules_for

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What `like=` copies from the original folder besides its token ids: the generation settings
# and the tokenizer, whichever of these files it has.
_CARRIED = (
    GENERATION_CONFIG_NAME, TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "preprocessor_config.json",
)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)\s*", size, flags=re.I)
        if m is None:
            raise ConfigError(f"max_shard_size must be bytes or a string like '5GB' or '500MiB'; got {size!r}.")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {size!r}.")
    return n


def _tensor_table(model, rules: list[TensorRule], dtype) -> dict[str, tuple[list[tuple[TensorRule, tuple[int, ...]]], tuple[int, ...], np.dtype]]:
    """HF tensor name -> (the eqzoo leaves that make it up, each with the index of its slice
    along the layer/expert axes; shape; dtype)."""
    table: dict[str, Any] = {}
    for rule in rules:
        leaf = get_path(model, rule.path)
        shape = tuple(leaf.shape)
        out_dtype = np.dtype(leaf.dtype if dtype is None or not jnp.issubdtype(leaf.dtype, jnp.floating) else dtype)
        for index, name in rule.hf_names(shape):
            entry = table.setdefault(name, ([], rule.hf_shape(shape), out_dtype))
            entry[0].append((rule, index))
    return table


def _host(model, rule: TensorRule, cache: dict[tuple[str, ...], np.ndarray]) -> np.ndarray:
    if rule.path not in cache:
        leaf = get_path(model, rule.path)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise EqzooError(
                f"parameter {rule.dotted!r} is sharded across hosts; gather it first (for example "
                "with jax.experimental.multihost_utils.process_allgather) and save from one process."
            )
        cache[rule.path] = np.asarray(leaf)
    return cache[rule.path]


def _materialise(model, parts, dtype: np.dtype, cache) -> np.ndarray:
    pieces = []
    for rule, i in sorted(parts, key=lambda p: p[0].part[0] if p[0].part else 0):
        x = _host(model, rule, cache)
        x = x[i] if i else x  # this layer's (and expert's) slice of a stacked leaf
        x = x.T if rule.transpose else x
        pieces.append(x.reshape((1,) * rule.hf_leading + x.shape))
    x = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)  # GPT-2's fused c_attn
    return np.ascontiguousarray(x.astype(dtype, copy=False))


def _write_json(file: Path, data: Mapping[str, Any]) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)


def _check_model(model) -> None:
    if not isinstance(model, GPT2 | Llama | Mixtral | Gemma | ViT):
        raise HFFormatError(
            f"save_pretrained exports eqzoo GPT2, Llama, Mixtral, Gemma and ViT models; got {type(model).__name__}."
        )
    # The Hugging Face layout has one dense weight per projection: a LoRA adapter or an int8
    # weight would be dropped or misread, so refuse with the fix instead.
    found = [(path, x) for path, x in select_linears(model) if isinstance(x, AbstractLinear)]
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda x: isinstance(x, AbstractWeight))[0]
    found += [(path_str(p), x) for p, x in leaves if isinstance(x, AbstractWeight)]
    if found:
        kinds = {type(x).__name__ for _, x in found}
        fixes = "; ".join([fix for names, fix in _UNWRAP_FIXES if kinds & names] or [fix for _, fix in _UNWRAP_FIXES])
        raise HFFormatError(
            "save_pretrained writes dense weights, but these layers are not plain linear layers: "
            f"{[f'{path} ({type(x).__name__})' for path, x in found]}. {fixes[0].upper()}{fixes[1:]}; then save."
        )


# The layer kinds save_pretrained refuses, and the call that turns each back into dense weights.
_UNWRAP_FIXES = (
    ({"LoRALinear", "LoRAWeight"}, "fold LoRA adapters in with eqzoo.peft.merge(model) (or save them alone with "
     "eqzoo.peft.save_adapters)"),
    ({"QuantizedLinear", "QuantizedWeight", "FakeQuantLinear", "FakeQuantWeight"},
     "turn int8/int4 and quantization-aware layers back into dense ones with eqzoo.quant.dequantize(model)"),
    ({"Fp8Linear", "Fp8Weight"}, "unwrap fp8 training layers with eqzoo.quant.unwrap_fp8(model) (their weights are the float ones)"),
)


@no_type_check  # arguments are validated inside, with messages that say what is supported
def save_pretrained(
    model: GPT2 | Llama | Mixtral | Gemma | ViT,
    path: str | os.PathLike[str],
    *,
    dtype: DTypeLike | None = None,
    max_shard_size: int | str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    like: str | os.PathLike[str] | None = None,
) -> Path:
    """Write `model` as a Hugging Face checkpoint folder: `config.json`, `generation_config.json`
    (language models) and `model.safetensors` (or shards plus `model.safetensors.index.json`).

    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads the folder with no missing or
    unexpected weights: Llama tensors keep their names and layout; GPT-2's are transposed into
    `Conv1D`'s (in, out) layout and q/k/v fused into `c_attn`; Mixtral's stacked (in, out) expert
    arrays become one transposed `w1` (gate) / `w3` (up) / `w2` (down) tensor per expert, the
    layout `MixtralForCausalLM.save_pretrained` writes (a Mixtral with `qk_norm` is written as
    `Qwen3MoeForCausalLM`, experts as `mlp.experts.{j}.gate_proj/up_proj/down_proj`; a Llama
    with `qk_norm` as `Qwen3ForCausalLM`, with `qkv_bias` as `Qwen2ForCausalLM`, with only a
    window as `MistralForCausalLM`). A Gemma is written as `GemmaForCausalLM`,
    `Gemma2ForCausalLM` or `Gemma3ForCausalLM` (see [`eqzoo.hf.config_to_hf`][]), its norm
    weights as they are (both sides scale by `1 + weight`). A tied head is not written (HF ties it on load). Per-layer parameters are split out of `Stacked.layers`. A ViT is written
    for `transformers.AutoModelForImageClassification` (`ViTForImageClassification`).

    **Arguments:**

    - `model`: a [`eqzoo.models.GPT2`][], [`eqzoo.models.Llama`][], [`eqzoo.models.Mixtral`][],
      [`eqzoo.models.Gemma`][] or [`eqzoo.models.ViT`][] (`pool="cls"`).
    - `path`: the folder to write (created if needed; earlier weight files in it are replaced).
    - `dtype`: cast floating-point tensors on export (e.g. `jnp.bfloat16`); `None` (or `"auto"`)
      keeps them. Integer dtypes are refused (they would round the weights away).
      `config.json` names the result as both `dtype` (transformers 5) and `torch_dtype` (4.x).
    - `max_shard_size`: split the weights into shards of at most this many bytes (an int, or a
      string such as `"2GB"` / `"500MiB"`); `None` writes one file.
    - `extra_config`: more `config.json` keys, e.g. `{"eos_token_id": 2}`; they may not change
      the architecture.
    - `like`: the Hugging Face folder the model came from (before fine-tuning). Its token ids
      (`bos_token_id`, `eos_token_id`, `pad_token_id` in `config.json`, where `extra_config`
      does not set them), its `generation_config.json` and its tokenizer files
      (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, chat templates,
      ...) are carried over (token ids in `extra_config` win, in both JSON files), so the folder written decodes and stops as the original did. An
      eqzoo model holds no token ids: without `like` (or `extra_config`) they are written as
      null, and `transformers`' `generate` then never stops at an end-of-sequence token.
      Where `like`'s architecture holds the model exactly, it is kept: a Mistral checkpoint
      with `sliding_window: null` loads as a plain Llama and is written as
      `MistralForCausalLM` again (without `like`, as `LlamaForCausalLM`, which computes the
      same logits).

    **Returns:** the folder's path.

    **Raises:** `HFFormatError` for a model of another kind or one with adapters or int8
    layers; `ConfigError` for an `extra_config` that changes the architecture or a `like`
    folder whose vocabulary size differs from the model's.
    """
    _check_model(model)
    safetensors_numpy = require("safetensors.numpy", "hf")
    dtype = float_dtype(dtype, "save_pretrained")
    rules, _ = rules_for(model.config)
    table = _tensor_table(model, rules, dtype)
    hf = _hf_config(model, like, dtype, extra_config)
    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _write_weights(model, table, _plan_shards(table, limit), folder, safetensors_numpy)
    _write_json(folder / CONFIG_NAME, hf)
    _carry_over(model, hf, like, folder, extra_config)
    return folder


def _hf_config(
    model, like: str | os.PathLike[str] | None, dtype: np.dtype | None, extra_config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The `config.json` dict `save_pretrained` writes: the model's config, in the `like`
    folder's architecture where that holds it exactly, with the export dtype, `extra_config`,
    and `like`'s token ids where neither sets them."""
    hf = config_to_hf(model.config)
    source = None if like is None else as_folder(like)
    original = {} if source is None else read_config(source)
    if source is not None:
        vocab = original.get("vocab_size", original.get("text_config", {}).get("vocab_size"))
        if vocab is not None and vocab != hf.get("vocab_size", vocab):
            raise ConfigError(
                f"save_pretrained: like={str(source)!r} has vocab_size {vocab}, the model {hf['vocab_size']}; "
                "its token ids and tokenizer would not fit this model."
            )
        hf = as_architecture_of(hf, original)  # keep like's architecture where it is exact
    # The dtype from_pretrained(dtype="auto") loads the weights as: transformers 5 reads "dtype",
    # 4.x "torch_dtype" (without it, 4.x's torch_dtype="auto" loads float32). Where both are
    # present, transformers 5 keeps "dtype" and drops "torch_dtype" without a warning.
    written = str(np.dtype(model.final_norm.weight.dtype) if dtype is None else dtype)
    hf["dtype"] = hf["torch_dtype"] = written
    for key, value in dict(extra_config or {}).items():
        if hf.get(key) is not None and hf[key] != value:
            raise ConfigError(f"extra_config may not change {key!r} (the model has {hf[key]!r}, got {value!r}).")
        hf[key] = value
    for key in _TOKEN_IDS:
        if hf.get(key) is None and original.get(key) is not None:
            hf[key] = original[key]
    return hf


def _plan_shards(table: Mapping[str, tuple[Any, tuple[int, ...], np.dtype]], limit: int | None) -> list[list[str]]:
    """The tensor names of each shard, in name order, from shapes alone: a shard is closed when
    the next tensor would take it past `limit` bytes (`None`: one shard). A tensor bigger than
    `limit` gets a shard of its own; an empty table, one empty shard."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(table):
        _, shape, dt = table[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(model, table, shards: list[list[str]], folder: Path, safetensors_numpy) -> None:
    """Write `shards` (materialising one shard at a time) as `model.safetensors`, or as
    numbered shards with their index; remove weight files of an earlier save that these do not
    replace."""
    n = len(shards)
    files = [WEIGHTS_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for old in folder.iterdir():  # stale weights from an earlier save would shadow or mix in
        if (old.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_FILE.fullmatch(old.name)) and old.name not in files:
            old.unlink()

    total = 0
    weight_map: dict[str, str] = {}
    for file, names in zip(files, shards, strict=True):
        cache: dict[tuple[str, ...], np.ndarray] = {}
        tensors = {name: _materialise(model, table[name][0], table[name][2], cache) for name in names}
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        tmp = folder / (file + ".tmp")
        safetensors_numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / file)
        del tensors, cache
    if n > 1:
        _write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _carry_over(
    model, hf: Mapping[str, Any], like: str | os.PathLike[str] | None, folder: Path,
    extra_config: Mapping[str, Any] | None,
) -> None:
    """Copy the `like` folder's generation config and tokenizer files into `folder` (or, without
    a generation config, write one of `hf`'s token ids for a language model); token ids given in
    `extra_config` win in a carried `generation_config.json` too."""
    source = None if like is None else as_folder(like)
    carried = [] if source is None else [source / n for n in _CARRIED if (source / n).is_file()]
    if not isinstance(model, ViT) and not any(f.name == GENERATION_CONFIG_NAME for f in carried):
        generation = {"_from_model_config": True} | {k: hf[k] for k in _TOKEN_IDS if hf.get(k) is not None}
        _write_json(folder / GENERATION_CONFIG_NAME, generation)
    for file in carried:
        if not (folder / file.name).exists() or not (folder / file.name).samefile(file):
            shutil.copyfile(file, folder / file.name)
    given = {k: v for k, v in dict(extra_config or {}).items() if k in _TOKEN_IDS}
    if given and any(f.name == GENERATION_CONFIG_NAME for f in carried):
        # transformers' generate reads generation_config.json first: the ids given win there too
        generation = json.loads((folder / GENERATION_CONFIG_NAME).read_text())
        _write_json(folder / GENERATION_CONFIG_NAME, {**generation, **given})
