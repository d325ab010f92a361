"""Hugging Face PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`): read
onto an eqzoo model, written from one.

PEFT keeps `lora_A` `(r, in)` and `lora_B` `(out, r)` per Hugging Face module and adds
`scaling * B @ A` to the module's `(out, in)` weight (its transpose for GPT-2's `Conv1D`, whose
weight is `(in, out)`: the factors keep their orientation), with `scaling = lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora`. eqzoo's [`eqzoo.peft.LoRALinear`][] holds the same
factors in the same orientation, stacked over layers; the module names come from the tables
`load_pretrained` uses.
"""

import collections
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import require
from ..models import GPT2, Gemma, GPT2Config, Llama, Mixtral, ViT
from ..nn import AbstractLinear
from ..peft import LoRALinear, LoRAWeight, lora
from ..sharding import path_str
from ._errors import HFFormatError
from ._layout import get_path, rules_for

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TENSOR = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight")
_MERGE_ROUTE = (
    "merge it into its base model with PEFT instead "
    "(PeftModel.from_pretrained(base, ADAPTER).merge_and_unload().save_pretrained(OUT)) and load OUT "
    "with eqzoo.hf.load_pretrained"
)


@dataclasses.dataclass(frozen=True)
class _Site:
    """An eqzoo linear layer and the Hugging Face module (or part of one) it is."""

    path: str  # eqzoo's dotted path, e.g. "blocks.layers.attn.q_proj"
    module: str  # HF module name, "{i}" for the layer: "model.layers.{i}.self_attn.q_proj"
    part: tuple[int, int] | None  # (k, n): rows k of n of the HF module's output (GPT-2's c_attn)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.module

    def pattern(self) -> re.Pattern[str]:
        return re.compile(r"(\d+)".join(re.escape(s) for s in self.module.split("{i}")))


def _check_model(model, caller: str) -> None:
    if not isinstance(model, GPT2 | Llama | Mixtral | Gemma | ViT):
        raise HFFormatError(
            f"{caller} maps adapters of the models eqzoo.hf loads (GPT2, Llama, Mixtral, Gemma, ViT); "
            f"got {type(model).__name__}."
        )


def _sites(model) -> tuple[list[_Site], list[str]]:
    """The linear layers of `model` that a PEFT adapter can reach, and every HF module name of
    the model (linear or not, e.g. the embedding), for messages and for `target_modules`."""
    rules, _ = rules_for(model.config)
    sites, modules = [], []
    for rule in rules:
        module = rule.hf_name.rsplit(".", 1)[0] if rule.path[-1] in ("weight", "bias") else rule.hf_name
        modules.append(module)
        if rule.path[-1] != "weight" or rule.indices not in ((), ("i",)):
            continue
        if isinstance(get_path(model, rule.path[:-1]), eqx.nn.Linear | AbstractLinear):
            sites.append(_Site(".".join(rule.path[:-1]), module, rule.part))
    return sites, sorted(set(modules))


def _pattern_value(patterns: dict[str, Any] | None, module: str, default):
    # PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the module name's
    # end, at a dot, as a regex.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---------------------------------------------------------------------------------------- reading


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise HFFormatError(f"{str(folder)!r} has no {ADAPTER_CONFIG}; pass the folder PEFT's save_pretrained wrote.")
    config = json.loads(file.read_text())
    refusals = [
        (config.get("peft_type") != "LORA", f"peft_type {config.get('peft_type')!r} (eqzoo reads LoRA, 'LORA')"),
        (bool(config.get("use_dora")), "use_dora=true (DoRA's magnitude vectors have no eqzoo layer)"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} (eqzoo's adapters train no biases)"),
        (bool(config.get("modules_to_save")), f"modules_to_save={config.get('modules_to_save')} (whole modules trained beside the adapters)"),
        (bool(config.get("target_parameters")), "target_parameters (LoRA on raw parameters such as fused experts)"),
        (bool(config.get("trainable_token_indices")), "trainable_token_indices (trained embedding rows)"),
    ]
    found = [what for bad, what in refusals if bad]
    if found:
        raise HFFormatError(f"the PEFT adapter in {str(folder)!r} has {'; '.join(found)}, which eqzoo does not support: {_MERGE_ROUTE}.")
    if not (isinstance(config.get("r"), int) and config.get("lora_alpha") is not None):
        raise HFFormatError(f"{str(folder / ADAPTER_CONFIG)!r} lacks an integer 'r' or a 'lora_alpha'; it is not a PEFT LoRA config.")
    return config


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        pickled = " (only adapter_model.bin, a pickle, which eqzoo never loads: re-save it with save_pretrained(..., safe_serialization=True))"
        raise HFFormatError(f"{str(folder)!r} has no {ADAPTER_WEIGHTS}{pickled if (folder / 'adapter_model.bin').exists() else ''}.")
    safetensors_numpy = require("safetensors.numpy", "hf")
    return safetensors_numpy.load_file(str(file))


def _factors_by_module(tensors: dict[str, np.ndarray], folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """HF module name -> {"A": (r, in), "B": (out, r)}."""
    out: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    odd = []
    for name, x in tensors.items():
        m = _TENSOR.fullmatch(name)
        if m is None:
            odd.append(name)
        else:
            out[m.group(1)][m.group(2)] = x
    if odd:
        embedding = any("lora_embedding_" in n for n in odd)
        what = "LoRA on an embedding (lora_embedding_A/B), which eqzoo does not adapt" if embedding else (
            "tensors that are not lora_A / lora_B factors (trained biases or saved modules)")
        raise HFFormatError(f"the PEFT adapter in {str(folder)!r} holds {what}: {sorted(odd)[:4]}; {_MERGE_ROUTE}.")
    half = sorted(k for k, v in out.items() if len(v) != 2)
    if half:
        raise HFFormatError(f"the PEFT adapter in {str(folder)!r} has lora_A without lora_B (or the reverse) for {half[:4]}.")
    return dict(out)


@dataclasses.dataclass
class _Plan:
    """What one eqzoo linear layer gets: its rank and alpha, and per layer index its factors."""

    site: _Site
    rank: int
    alpha: float
    factors: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


def _place(model, modules: dict[str, dict[str, np.ndarray]], sites: list[_Site], config, folder) -> dict[str, _Plan]:
    """Each file module matched to the eqzoo layer(s) it adapts, with the config's rank and alpha
    for it; refuses what does not map."""
    patterns = [(site, site.pattern()) for site in sites]
    plans: dict[str, _Plan] = {}
    unmapped, conflicts = [], []
    for module, ab in sorted(modules.items()):
        hits = [(site, m) for site, pat in patterns if (m := pat.fullmatch(module))]
        if not hits:
            unmapped.append(module)
            continue
        rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        if ab["A"].ndim != 2 or ab["A"].shape[0] != rank or ab["B"].shape[-1:] != (rank,):
            raise HFFormatError(
                f"{module}: lora_A {ab['A'].shape} and lora_B {ab['B'].shape} do not have the rank {rank} that "
                f"{ADAPTER_CONFIG} gives it (r / rank_pattern); the weights and config do not belong together."
            )
        for site, m in hits:
            plan = plans.setdefault(site.path, _Plan(site, rank, alpha))
            if (plan.rank, plan.alpha) != (rank, alpha):
                conflicts.append(site.module)
            plan.factors[int(m.group(1)) if site.stacked else 0] = (ab["A"], ab["B"])
    if unmapped:
        known = sorted({s.module for s in sites})
        raise HFFormatError(
            f"the PEFT adapter in {str(folder)!r} adapts module(s) {unmapped[:4]} that have no linear layer in "
            f"this eqzoo {type(model).__name__} (an embedding, a tied head, expert weights, or another "
            f"architecture's names). eqzoo maps LoRA on {known}. Train the adapter without those targets, or "
            f"{_MERGE_ROUTE}."
        )
    if conflicts:
        raise HFFormatError(
            f"the PEFT adapter in {str(folder)!r} gives {sorted(set(conflicts))} different ranks or alphas in "
            "different layers (rank_pattern / alpha_pattern per layer); eqzoo stacks layers and needs one "
            f"rank and alpha per projection across them: {_MERGE_ROUTE}."
        )
    return plans


def _layers_to_transform(config) -> set[int] | None:
    layers = config.get("layers_to_transform")
    return None if layers is None else ({layers} if isinstance(layers, int) else set(layers))


def _stack(plan: _Plan, target: LoRALinear, only: set[int] | None, folder) -> tuple[np.ndarray, np.ndarray]:
    """The plan's factors as `target`'s `(layers, r, in)` / `(layers, out, r)` arrays (rows `part`
    of a fused module's `lora_B`); layers the adapter leaves out (`layers_to_transform`) get zeros."""
    a_shape, b_shape = tuple(target.lora_a.shape), tuple(target.lora_b.shape)
    depth = a_shape[0] if plan.site.stacked else 1
    a = np.zeros((depth, *a_shape[-2:]), np.float32)
    b = np.zeros((depth, *b_shape[-2:]), np.float32)
    out = target.out_features
    for i, (fa, fb) in plan.factors.items():
        k, n = plan.site.part or (0, 1)
        if i >= depth or fa.shape[1] != target.in_features or fb.shape[0] != out * n:
            raise HFFormatError(
                f"the PEFT adapter in {str(folder)!r} does not fit this model at {plan.site.module.format(i=i)}: "
                f"lora_A {fa.shape}, lora_B {fb.shape}, for a layer of in={target.in_features}, out={out * n} in a "
                f"model of {depth} layer(s). Load it onto the base model it was trained on."
            )
        a[i], b[i] = fa, fb[k * out : (k + 1) * out]
    missing = sorted(set(range(depth)) - set(plan.factors) - (set() if only is None else set(range(depth)) - only))
    if missing:
        raise HFFormatError(
            f"the PEFT adapter in {str(folder)!r} has no factors for {plan.site.module} in layer(s) {missing} "
            "(and its layers_to_transform does not leave them out); the file is incomplete."
        )
    if not plan.site.stacked:
        a, b = a[0], b[0]
    return a, b


@no_type_check  # arguments are validated inside, with messages that say what is supported
def load_peft(model, path: str | os.PathLike[str]):
    """`model` with Hugging Face PEFT LoRA adapters on it, read from the folder PEFT's
    `save_pretrained` writes (`adapter_config.json` + `adapter_model.safetensors`).

    The adapters are built from the file: each adapted module becomes a
    [`eqzoo.peft.LoRALinear`][] with the config's `r` and `lora_alpha` (and `rank_pattern` /
    `alpha_pattern`, `use_rslora`), and its `lora_A` `(r, in)` and `lora_B` `(out, r)` fill the
    layer's stacked `lora_a` and `lora_b` as they are (PEFT and eqzoo share the orientation,
    GPT-2's `fan_in_fan_out` `Conv1D` layers too). GPT-2's fused `c_attn` adapter (one `A`,
    `B` for q, k and v stacked by rows) becomes q, k and v adapters that each hold a copy of
    `A` and their rows of `B`: the same update. Layers that `layers_to_transform` leaves out get
    zero factors. The result trains, merges ([`eqzoo.peft.merge`][]) and saves like any adapted
    model.

    **Arguments:**

    - `model`: the base model, as [`eqzoo.hf.load_pretrained`][] gives it (a GPT-2, Llama,
      Mistral, Qwen2/3, Gemma, Mixtral or ViT; its linear layers plain, or int8 with
      `eqzoo.quant`).
    - `path`: the adapter folder (or its `adapter_model.safetensors`). Nothing is downloaded.

    **Returns:** the adapted model; factors in float32 (or the base's dtype if wider).

    **Raises:** `HFFormatError`, naming the fix, for what has no exact eqzoo equivalent: another
    `peft_type`, DoRA, `bias` other than `"none"`, `modules_to_save`, LoRA on embeddings or on
    modules with no linear eqzoo layer (a tied `lm_head`, mixture-of-experts experts), ranks
    or alphas that differ between the layers of one projection, and factors whose shapes do
    not fit the model.
    """
    _check_model(model, "load_peft")
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    config = _read_config(folder)
    modules = _factors_by_module(_read_tensors(folder), folder)
    sites, _ = _sites(model)
    plans = _place(model, modules, sites, config, folder)
    if not plans:
        raise HFFormatError(f"the PEFT adapter in {str(folder)!r} holds no LoRA factors.")
    groups: dict[tuple[int, float], list[str]] = collections.defaultdict(list)
    for path_, plan in plans.items():
        groups[(plan.rank, plan.alpha)].append(f"^{re.escape(path_)}$")
    rslora = bool(config.get("use_rslora", False))
    adapted = model
    for (rank, alpha), targets in groups.items():
        adapted = lora(adapted, rank=rank, alpha=alpha, use_rslora=rslora, targets=targets, experts=False, key=jax.random.key(0))
    only = _layers_to_transform(config)
    for path_, plan in plans.items():
        names = tuple(path_.split("."))
        target = get_path(adapted, names)
        a, b = _stack(plan, target, only, folder)
        adapted = eqx.tree_at(
            lambda m, names=names: (get_path(m, names).lora_a, get_path(m, names).lora_b),
            adapted,
            (jnp.asarray(a, target.lora_a.dtype), jnp.asarray(b, target.lora_b.dtype)),
        )
    return adapted


# ---------------------------------------------------------------------------------------- writing


def _modules_to_write(model, sites: list[_Site]) -> dict[str, list[tuple[_Site, LoRALinear]]]:
    """HF module name -> (its adapted eqzoo layers, each with its site), for every adapter."""
    by_path = {s.path: s for s in sites}
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda x: isinstance(x, LoRALinear | LoRAWeight))[0]
    found = [(path_str(p), x) for p, x in leaves if isinstance(x, LoRALinear | LoRAWeight)]
    experts = [p for p, x in found if isinstance(x, LoRAWeight)]
    if experts:
        raise HFFormatError(
            f"save_peft: the expert weights {experts} have adapters (eqzoo.peft.LoRAWeight); PEFT's per-expert "
            "layout is not written by eqzoo. Adapt the attention only, eqzoo.peft.lora(base, targets='attn', ...) "
            "(the routers cannot be written either), or merge (eqzoo.peft.merge) and save the whole model with "
            "eqzoo.hf.save_pretrained."
        )
    routers = [p for p, _ in found if p.rsplit(".", 1)[-1] == "router"]
    if routers:
        # transformers 5 holds a router as its own module (MixtralTopKRouter), not an nn.Linear that
        # PEFT adapts, under another name than the checkpoint's `block_sparse_moe.gate`: PEFT
        # could not load the adapter. Refused rather than written.
        raise HFFormatError(
            f"save_peft: the mixture-of-experts routers {routers} have adapters, which PEFT cannot load onto "
            "transformers' routers (not linear layers there). Adapt the attention only, "
            "eqzoo.peft.lora(base, targets='attn', ...), or merge (eqzoo.peft.merge) and save the whole model "
            "with eqzoo.hf.save_pretrained."
        )
    unmapped = [p for p, _ in found if p not in by_path]
    if unmapped:
        raise HFFormatError(f"save_peft: the adapted layers {unmapped} have no Hugging Face module to write them as.")
    if not found:
        raise HFFormatError("save_peft: the model has no LoRA adapters; add them with eqzoo.peft.lora.")
    out: dict[str, list[tuple[_Site, LoRALinear]]] = collections.defaultdict(list)
    for p, x in found:
        out[by_path[p].module].append((by_path[p], x))
    return dict(out)


def _host(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x)


def _fuse(parts: list[tuple[_Site, LoRALinear]]) -> tuple[np.ndarray, np.ndarray, int, float]:
    """One HF module's `(..., r, in)` A and `(..., out, r)` B, rank and scaling from its eqzoo
    layers. A module of parts (GPT-2's c_attn): with one shared A (as `load_peft` builds them)
    B's rows are stacked; otherwise the parts' A's are stacked and B is block diagonal, rank the
    sum of theirs. Parts without an adapter get zero rows of B."""
    if parts[0][0].part is None:
        (_, x), = parts
        return _host(x.lora_a), _host(x.lora_b), x.rank, x.scaling
    n, out = parts[0][0].part[1], parts[0][1].out_features
    a0, scaling = _host(parts[0][1].lora_a), parts[0][1].scaling
    shared = all(x.scaling == scaling and np.array_equal(_host(x.lora_a), a0) for _, x in parts)
    rank = parts[0][1].rank if shared else sum(x.rank for _, x in parts)
    a = a0 if shared else np.concatenate([_host(x.lora_a) for _, x in parts], axis=-2)
    b = np.zeros((*a0.shape[:-2], n * out, rank), np.float32)
    col = 0
    for site, x in parts:
        k = site.part[0]
        cols = slice(0, rank) if shared else slice(col, col + x.rank)
        b[..., k * out : (k + 1) * out, cols] = _host(x.lora_b) * np.float32(x.scaling / scaling)
        col += 0 if shared else x.rank
    return a, b, rank, scaling


def _own_end(module: str, hf_modules: list[str]) -> str | None:
    """The shortest dotted end of `module` that ends no other Hugging Face module's name (PEFT
    matches a `target_modules` entry against the ends of module names, and a `rank_pattern` /
    `alpha_pattern` key too, so a key shared by two modules would give both one setting), or
    `None` when every such end holds the layer index."""
    words = module.split(".")
    for k in range(1, len(words) + 1):
        end = ".".join(words[-k:])
        if "{" in end:
            return None
        if not any(m != module and (m == end or m.endswith("." + end)) for m in hf_modules):
            return end
    return None


def _module_regex(module: str) -> str:
    """`module` (with `{i}` for the layer) as a regex of its full names."""
    return re.escape(module).replace(re.escape("{i}"), r"\d+")


def _target_keys(modules: list[str], hf_modules: list[str]) -> tuple[dict[str, str], list[str] | str]:
    """Each written module's key for `rank_pattern` / `alpha_pattern`, and `target_modules`: the
    modules' own ends (GPT-2's `attn.c_proj` against `mlp.c_proj`) as a list where each has one;
    otherwise (ViT's `layer.{i}.output.dense` against `layer.{i}.attention.output.dense`) every
    key is its module's full-name regex and `target_modules` one regex string of them all,
    which PEFT matches against whole module names."""
    ends = {m: _own_end(m, hf_modules) for m in modules}
    if all(ends.values()):
        return ends, sorted(ends.values())
    keys = {m: _module_regex(m) for m in modules}
    return keys, "(" + "|".join(sorted(keys.values())) + ")"


def _alpha(scaling: float, rank: int) -> int | float:
    alpha = scaling * rank
    return int(alpha) if float(alpha).is_integer() else alpha


@no_type_check  # arguments are validated inside, with messages that say what is supported
def save_peft(model, path: str | os.PathLike[str], *, base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA adapters of `model` as a Hugging Face PEFT adapter folder
    (`adapter_config.json` + `adapter_model.safetensors`), which
    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), path)` loads.

    Each [`eqzoo.peft.LoRALinear`][] is written per layer as
    `base_model.model.<module>.lora_A.weight` `(r, in)` and `...lora_B.weight` `(out, r)`
    under its Hugging Face module name (`model.layers.3.self_attn.q_proj`,
    `transformer.h.3.attn.c_attn`). `r` and `lora_alpha = scaling * r` are the most common
    ones, with `rank_pattern` / `alpha_pattern` for the others; `target_modules` names each
    adapted module by the shortest end of its name that no other module shares (GPT-2's
    `attn.c_proj` against `mlp.c_proj`), and where a module has no such end (ViT's
    `output.dense` against `attention.output.dense`) it is one regex of the adapted modules'
    full names, the patterns' keys theirs; `fan_in_fan_out` is true for GPT-2. GPT-2's q, k and
    v adapters are written as one `c_attn` adapter: rank `r` when they share one `A` (as
    [`eqzoo.hf.load_peft`][] builds them), otherwise `A`s stacked and a block-diagonal `B` of
    rank the sum of theirs, the same update exactly. Factors are written in float32 (or their
    own wider dtype).

    Only the factors are written: parameters trained beside them (`adapter_filter(also=...)`)
    are not (PEFT would need them as `modules_to_save`).

    **Arguments:**

    - `model`: an adapted GPT-2, Llama-family, Gemma, Mixtral (adapters on its linear layers,
      not its experts or routers) or ViT.
    - `path`: the folder to write (created if needed).
    - `base_model_name_or_path`: recorded in `adapter_config.json`, where
      `AutoPeftModelForCausalLM` reads which base to load (a hub name or a folder).

    **Returns:** the folder's path.

    **Raises:** `HFFormatError` for a model with no adapters, adapters on expert weights
    (`eqzoo.peft.LoRAWeight`) or on mixture-of-experts routers (transformers' routers are not
    linear layers PEFT adapts), or a model kind `eqzoo.hf` does not export.
    """
    _check_model(model, "save_peft")
    safetensors_numpy = require("safetensors.numpy", "hf")
    sites, hf_modules = _sites(model)
    modules = _modules_to_write(model, sites)
    tensors: dict[str, np.ndarray] = {}
    settings: dict[str, tuple[int, float]] = {}
    for module, parts in sorted(modules.items()):
        a, b, rank, scaling = _fuse(parts)
        settings[module] = (rank, scaling)
        stacked = "{i}" in module
        for i in range(a.shape[0]) if stacked else [None]:
            name = _PREFIX + (module.format(i=i) if stacked else module)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i] if stacked else a)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i] if stacked else b)
    keys, targets = _target_keys(sorted(modules), hf_modules)
    (rank, scaling), _ = collections.Counter(settings.values()).most_common(1)[0]
    config = {
        "peft_type": "LORA", "task_type": None if isinstance(model, ViT) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "r": rank, "lora_alpha": _alpha(scaling, rank),
        "target_modules": targets, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": isinstance(model.config, GPT2Config), "bias": "none", "lora_dropout": 0.0,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {keys[m]: r for m, (r, _) in settings.items() if r != rank},
        "alpha_pattern": {keys[m]: _alpha(s, r) for m, (r, s) in settings.items() if _alpha(s, r) != _alpha(scaling, rank)},
        "init_lora_weights": True, "inference_mode": True, "revision": None,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    safetensors_numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS)
    tmp = folder / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / ADAPTER_CONFIG)
    return folder
