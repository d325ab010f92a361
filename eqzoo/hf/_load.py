"""Loading a Hugging Face safetensors checkpoint into an eqzoo model, tensor by tensor."""

import dataclasses
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, Sharding
from jax.typing import DTypeLike

from .._errors import ConfigError, EqzooError, user_stacklevel
from ..models import GPT2, Gemma, GPT2Config, Llama, Mixtral, ViT, model_class
from ._config import config_from_hf
from ._errors import HFFormatError
from ._files import TensorReader, as_folder, float_dtype, read_config, weight_files
from ._layout import TensorRule, get_path, rules_for

ShardingSpec = Mesh | Sharding | Callable[[str, jax.ShapeDtypeStruct], Sharding | None] | eqx.Module | None
"""A `jax.sharding.Mesh` (each parameter placed by [`eqzoo.sharding.default_rules`][], as
[`eqzoo.sharding.shard`][] places it); a `Sharding` for every parameter; a callable
`(path, shape_dtype) -> Sharding | None`, where `path` is the parameter's dotted attribute path
such as `"blocks.layers.attn.q_proj.weight"`; or a pytree shaped like the model with a
`Sharding` (or `None`) per array; or `None` (default device)."""

_SHOWN = 8  # how many offending tensor names an error message lists


def _names_of(keypath) -> tuple[str, ...]:
    names = []
    for key in keypath:
        if not isinstance(key, jax.tree_util.GetAttrKey):
            raise EqzooError(f"eqzoo.hf cannot map a model leaf at {jax.tree_util.keystr(keypath)}.")
        names.append(key.name)
    return tuple(names)


def _listing(names: list[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def _target_sharding(sharding: Any, rule: TensorRule, leaf: jax.ShapeDtypeStruct) -> Sharding | None:
    if sharding is None or isinstance(sharding, Sharding):
        return sharding
    if isinstance(sharding, eqx.Module):  # a model-shaped pytree of shardings
        try:
            target = get_path(sharding, rule.path)
        except AttributeError:
            raise ConfigError(f"the sharding pytree has no entry at {rule.dotted!r}; give it the model's structure.") from None
    elif callable(sharding):
        target = sharding(rule.dotted, leaf)
    else:
        raise ConfigError(
            f"sharding must be a jax.sharding.Sharding, a callable (path, shape_dtype) -> Sharding, "
            f"or a model-shaped pytree of shardings; got {type(sharding).__name__}."
        )
    if target is not None and not isinstance(target, Sharding):
        raise ConfigError(f"the sharding for {rule.dotted!r} is a {type(target).__name__}, not a jax.sharding.Sharding.")
    return target


def _check_tensors(reader: TensorReader, rules: list[TensorRule], shapes: dict[tuple[str, ...], tuple[int, ...]], ignored, folder) -> None:
    present = reader.names()
    wanted: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        for _, name in rule.hf_names(shapes[rule.path]):
            wanted[name] = rule.hf_shape(shapes[rule.path])
    missing = [n for n in wanted if n not in present]
    if missing:
        raise HFFormatError(
            f"the checkpoint in {str(folder)!r} is missing tensor(s) {_listing(missing)} that its "
            "config.json implies; the weights and config.json do not belong together."
        )
    unexpected = [n for n in present - set(wanted) if not ignored.fullmatch(n)]
    if unexpected:
        raise HFFormatError(
            f"the checkpoint in {str(folder)!r} has unexpected tensor(s) {_listing(unexpected)} that an "
            "eqzoo model of its config.json has no place for (a different architecture, or extra heads)."
        )
    for name, expected in wanted.items():
        found = reader.shape(name)
        if found != expected:
            raise HFFormatError(
                f"tensor {name!r} has shape {found} but config.json implies {expected}; "
                "the weights and config.json do not belong together."
            )
        code = reader.dtype(name)
        if code.startswith("F8"):  # 8-bit floats are a quantized checkpoint's, with scales beside them
            raise HFFormatError(
                f"tensor {name!r} is stored as {code}, an 8-bit float: the checkpoint is quantized. "
                "eqzoo.hf reads F32, F16 and BF16 weights; load the unquantized checkpoint, then "
                "quantize in eqzoo with eqzoo.quant.quantize."
            )
        if code not in ("F16", "F32", "F64", "BF16"):  # every parameter eqzoo reads is floating point
            raise HFFormatError(
                f"tensor {name!r} is stored as {code}, not floating point; a model's weights are "
                "floats (F32, F16, BF16). The file is damaged or was not written as model weights."
            )


def _read_leaf(reader: TensorReader, rule: TensorRule, leaf_shape: tuple[int, ...], dtype) -> np.ndarray:
    index = rule.hf_index(leaf_shape)
    out = None
    for where, name in rule.hf_names(leaf_shape):
        x = reader.read(name, index)
        if rule.hf_leading:
            x = x.reshape(x.shape[rule.hf_leading:])
        if rule.transpose:
            x = x.T
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        if not rule.lead:
            return np.ascontiguousarray(x)
        if out is None:  # one host buffer per stacked parameter, filled layer (and expert) by layer
            out = np.empty(leaf_shape, dtype=x.dtype)
        out[where] = x
    assert out is not None
    return out


def _untie_a_separate_head(config, reader: TensorReader, folder, *, forced: bool):
    """`config`, untied when its config.json ties the head to the embedding but the weights hold
    an `lm_head.weight` that differs from it: transformers then computes with the stored head
    (and warns), so eqzoo does too. Equal copies stay tied; a `tie_embeddings` override wins."""
    names = reader.names()
    if isinstance(config, GPT2Config):
        table = next((n for n in ("transformer.wte.weight", "wte.weight") if n in names), None)
    else:
        table = "model.embed_tokens.weight" if getattr(config, "tie_embeddings", False) else None
    if forced or table is None or "lm_head.weight" not in names or table not in names:
        return config
    def equal() -> bool:  # block by block (a head is ~1 GB), stopping at the first difference
        shape = reader.shape(table)
        if shape != reader.shape("lm_head.weight"):
            return False
        rest = tuple(slice(None) for _ in shape[1:])
        for start in range(0, shape[0], 4096):
            rows = (slice(start, min(start + 4096, shape[0])), *rest)
            if not np.array_equal(reader.read(table, rows), reader.read("lm_head.weight", rows)):
                return False
        return True

    if equal():
        return config
    if isinstance(config, GPT2Config):
        raise HFFormatError(
            f"the checkpoint in {str(folder)!r} stores an lm_head.weight that differs from the token "
            "embedding, but eqzoo's GPT-2 ties its output head to the embedding (as GPT2LMHeadModel does)."
        )
    warnings.warn(
        f"config.json in {str(folder)!r} ties the output head to the token embedding, but the weights "
        "hold a separate lm_head.weight that differs from it; loading it untied (tie_embeddings=False), "
        "as transformers does. Pass config_overrides={'tie_embeddings': True} to tie it anyway.",
        stacklevel=user_stacklevel(),
    )
    return dataclasses.replace(config, tie_embeddings=False)


def _warn_meaning_overrides(base, config, overrides) -> None:
    """Warn when `config_overrides` change a field that says what the weights compute (routing,
    a rotary base, ...), not only how the model runs: the model then is not the checkpoint's."""
    from ..checkpoint import RESTORE_MAY_CHANGE  # here: eqzoo.checkpoint imports eqzoo.train

    changed = sorted(
        k for k in overrides
        if k not in RESTORE_MAY_CHANGE and k != "tie_embeddings" and hasattr(base, k) and getattr(base, k) != getattr(config, k)
    )
    if changed:
        warnings.warn(
            f"load_pretrained: config_overrides change {changed} from the checkpoint's "
            f"({', '.join(f'{k}={getattr(base, k)!r}' for k in changed)}): the weights were trained "
            "with those, so the model computes something other than the checkpoint. Fields that only "
            "say how it runs (eqzoo.checkpoint.RESTORE_MAY_CHANGE: remat, scan_layers, ...) are safe.",
            stacklevel=user_stacklevel(),
        )


@no_type_check  # arguments are validated inside, with messages that say what is supported
def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: DTypeLike | None = None,
    sharding: ShardingSpec = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> GPT2 | Llama | Mixtral | Gemma | ViT:
    """Load a local Hugging Face checkpoint folder as an eqzoo model.

    The folder holds `config.json` and `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`. Supported:
    `GPT2LMHeadModel`, `LlamaForCausalLM` (grouped-query attention, tied or untied head,
    `head_dim`, `rope_theta`, Llama-3 `rope_scaling`), `MistralForCausalLM` (Llama's tensors;
    its `sliding_window` into the config), `Qwen2ForCausalLM` (Llama's tensors plus q/k/v
    biases), `Qwen3ForCausalLM` (Llama's tensors plus the per-head `q_norm`/`k_norm`
    scales), `MixtralForCausalLM` (as Llama, with
    per-expert tensors `block_sparse_moe.experts.{j}.w1/w2/w3` stacked into
    [`eqzoo.nn.MoE`][]'s (in, out) expert arrays; see [`eqzoo.hf.config_from_hf`][] for
    `sliding_window` and `router_jitter_noise`), `Qwen3MoeForCausalLM` (Qwen3's attention,
    experts `mlp.experts.{j}.gate_proj/up_proj/down_proj` stacked the same way),
    `GemmaForCausalLM`, `Gemma2ForCausalLM` and `Gemma3ForCausalLM` (Llama's tensors plus
    Gemma 2's `pre_feedforward_layernorm` / `post_feedforward_layernorm` and Gemma 3's
    `q_norm` / `k_norm`; loaded as a [`eqzoo.models.Gemma`][]) and `ViTForImageClassification` (square
    images, exact GELU, q/k/v biases; loaded as a `pool="cls"` [`eqzoo.models.ViT`][]). The
    model's structure is built with `equinox.filter_eval_shape`, so no random initialisation is
    allocated; every tensor is then read from its memory-mapped file (only the part needed),
    cast, and placed with `jax.device_put` on its target sharding. Per-layer (and per-expert)
    tensors are stacked into `Stacked.layers` along the leading axes: host memory peaks at one
    stacked parameter.

    **Arguments:**

    - `path`: the checkpoint folder. Nothing is downloaded.
    - `dtype`: cast floating-point parameters to this dtype (e.g. `jnp.bfloat16`, or
      `jnp.float32` for fp32 master weights from a bf16 checkpoint); `None` (or transformers'
      `"auto"`) keeps the dtypes stored in the file. Integer dtypes are refused: quantize with
      [`eqzoo.quant.quantize`][] instead.
    - `sharding`: where parameters go: a `jax.sharding.Mesh` (from [`eqzoo.sharding.make_mesh`][]:
      each parameter in the layout [`eqzoo.sharding.default_rules`][] give it, checked before any
      tensor is read), a `jax.sharding.Sharding` for all of them, a callable
      `(path, shape_dtype) -> Sharding | None` given each parameter's dotted path (e.g.
      `"blocks.layers.attn.q_proj.weight"`, with the leading layer axis in `shape_dtype`), a
      model-shaped pytree of shardings, or `None` for the default device.
    - `config_overrides`: eqzoo config fields to set, e.g. `{"remat": "full"}`. Setting a
      field that changes what the weights compute (one outside
      [`eqzoo.checkpoint.RESTORE_MAY_CHANGE`][], such as `experts_per_token`) warns.

    **Returns:** a [`eqzoo.models.GPT2`][], [`eqzoo.models.Llama`][], [`eqzoo.models.Mixtral`][],
    [`eqzoo.models.Gemma`][] or [`eqzoo.models.ViT`][].

    **Raises:** `HFFormatError` for a missing `config.json`, an unsupported architecture,
    pickle-only weights (`.bin`; refused, with the command to convert them), a missing,
    unexpected or wrongly shaped tensor (named, with expected and found shapes).
    """
    folder = as_folder(path)
    dtype = float_dtype(dtype, "load_pretrained")
    overrides = dict(config_overrides or {})
    config = config_from_hf(read_config(folder), **overrides)
    _warn_meaning_overrides(config_from_hf(read_config(folder)), config, overrides)
    files = weight_files(folder)
    with TensorReader(files) as reader:
        config = _untie_a_separate_head(config, reader, folder, forced="tie_embeddings" in overrides)
        model_cls = model_class(config)
        skeleton = eqx.filter_eval_shape(model_cls, config, key=jax.random.key(0))
        if isinstance(sharding, Mesh):  # a Mesh is callable (a context manager): resolve it first
            from ..sharding import tree_shardings  # here: eqzoo.sharding imports eqzoo.train

            sharding = tree_shardings(skeleton, sharding)
        flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
        structs = {_names_of(kp): leaf for kp, leaf in flat}
        shapes = {p: tuple(s.shape) for p, s in structs.items()}
        rules, ignored = rules_for(config, reader.names())
        by_path = {r.path: r for r in rules}
        uncovered = sorted(".".join(p) for p in structs if p not in by_path)
        if uncovered:  # the model grew a parameter this table does not know about
            raise EqzooError(f"eqzoo.hf has no Hugging Face name for the {model_cls.__name__} parameter(s) {uncovered}.")
        _check_tensors(reader, rules, shapes, ignored, folder)
        leaves = []
        for kp, _ in flat:
            rule = by_path[_names_of(kp)]
            host = _read_leaf(reader, rule, shapes[rule.path], dtype)
            target = _target_sharding(sharding, rule, jax.ShapeDtypeStruct(host.shape, host.dtype))
            leaves.append(jax.device_put(host, target) if target is not None else jax.device_put(host))
            del host
    return jax.tree_util.tree_unflatten(treedef, leaves)
