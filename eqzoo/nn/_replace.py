"""Find the linear layers of a model by path and swap them: what LoRA and quantization build on."""

import re
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
from jaxtyping import Array

from .._errors import ConfigError
from ._linear import AbstractLinear
from ._weight import AbstractWeight

Targets = str | Sequence[str] | None
"""Which linear layers to touch: `None` (all of them), or one or more regexes searched
(`re.search`) in each layer's dotted path, e.g. `"q_proj|v_proj"` or `["attn", r"mlp\\.up$"]`."""


def _is_linear(x) -> bool:
    return isinstance(x, eqx.nn.Linear | AbstractLinear)


def _path_str(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


def linear_paths(model) -> list[str]:
    """The dotted paths of every linear layer in `model` (`equinox.nn.Linear`s and
    [`eqzoo.nn.AbstractLinear`][]s, outermost only), in tree order:
    `blocks.layers.attn.q_proj`, ... A layer inside a [`eqzoo.nn.Stacked`][] appears once, for
    all its stacked copies."""
    leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_linear)[0]
    return [_path_str(p) for p, leaf in leaves if _is_linear(leaf)]


# Hugging Face / PEFT module names (as in `target_modules`) whose eqzoo layer has another name:
# named in the error when such a target matches nothing.
_HF_NAMES = {
    "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down",
    "w1": "mlp.gate", "w3": "mlp.up", "w2": "mlp.down",
}


def _compile_targets(targets: Targets, what: str) -> list[re.Pattern] | None:
    if targets is None:
        return None
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(t, str) for t in patterns):
        raise ConfigError(f"{what}: targets must be None, a regex string or a list of them; got {targets!r}.")
    compiled = []
    for t in patterns:
        try:
            compiled.append(re.compile(t))
        except re.error as err:
            raise ConfigError(f"{what}: target regex {t!r} does not compile: {err}.") from err
    return compiled


def replace_linears(
    model,
    fn: Callable[[str, eqx.nn.Linear | AbstractLinear], eqx.Module],
    *,
    targets: Targets = None,
    kinds: tuple[type, ...] = (eqx.nn.Linear,),
    what: str = "replace_linears",
):
    """A copy of `model` with `fn(path, layer)` in place of each selected linear layer.

    **Arguments:**

    - `model`: any pytree of Equinox modules.
    - `fn`: called with the layer's dotted path and the layer; returns its replacement. Inside a
      [`eqzoo.nn.Stacked`][] the layer's arrays carry the stacked layer axis first
      (`weight` is `(layers, out, in)`), and so must the replacement's.
    - `targets`: `None` (every layer of the given `kinds`) or regexes searched in the paths.
    - `kinds`: the layer types that may be replaced; selected layers of another type are an
      error (e.g. LoRA on a layer that already has an adapter).
    - `what`: the name errors use.

    **Returns:** the new model. **Raises:** `ConfigError` if a target regex matches no linear
    layer (the message lists the paths there are) or matches a layer not in `kinds`.
    """
    compiled = _compile_targets(targets, what)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_linear)
    paths = [_path_str(p) if _is_linear(leaf) else None for p, leaf in leaves]
    linear = [p for p in paths if p is not None]
    if compiled is not None:
        unused = [c.pattern for c in compiled if not any(c.search(p) for p in linear)]
        if unused:
            names = {t: _HF_NAMES[t] for t in unused if t in _HF_NAMES and any(_HF_NAMES[t] in p for p in linear)}
            hint = "".join(f" Hugging Face's {t!r} is eqzoo's {n!r}." for t, n in names.items())
            raise ConfigError(
                f"{what}: target(s) {unused} match no linear layer; the model's linear layers are "
                f"{linear or 'none'}.{hint}"
            )
    new = []
    for (_, leaf), path in zip(leaves, paths, strict=True):
        chosen = path is not None and (compiled is None or any(c.search(path) for c in compiled))
        if chosen and not isinstance(leaf, kinds):
            if compiled is None:
                new.append(leaf)  # "all layers" skips the ones of other kinds
                continue
            raise ConfigError(
                f"{what}: {path} is a {type(leaf).__name__}, not one of "
                f"{[k.__name__ for k in kinds]}; narrow the targets or undo the earlier change first."
            )
        new.append(fn(path, leaf) if chosen else leaf)
    return jax.tree_util.tree_unflatten(treedef, new)


EXPERT_FIELDS = ("gate_proj", "up_proj", "down_proj")  # a MoE layer's expert arrays, as targets see them


def choose_expert_targets(
    model, targets: Targets, experts: bool | None, *, what: str
) -> tuple[Targets, bool, bool, bool, Callable[[str], bool]]:
    """`split_expert_targets` and the choices shared by the functions that wrap linear layers
    and expert weights alike (`quantize`, `prepare_qat`, `prepare_fp8`): whether to treat the
    experts (`experts=None`: when `targets` is `None` or matches an expert array), and which
    linear layers to leave alone (a mixture-of-experts router, unless a target names
    `"router"`: rounding it can change which experts a token picks).

    **Returns:** `(linear_targets, hits_experts, linears, experts, skipped)`, the first three as
    `split_expert_targets` gives them, `skipped(path)` true for a router to leave alone.

    **Raises:** `ConfigError` as `split_expert_targets` does, and when the targets name only
    expert weights but `experts=False`.
    """
    linear_targets, hits_experts, linears = split_expert_targets(model, targets, what=what)
    if experts is None:
        experts = targets is None or hits_experts
    if hits_experts and not linears and not experts:
        raise ConfigError(f"{what}: targets {targets!r} name only expert weights, but experts=False.")
    names_router = targets is not None and any("router" in t for t in ([targets] if isinstance(targets, str) else targets))

    def skipped(path: str) -> bool:
        return path.split(".")[-1] == "router" and not names_router

    return linear_targets, hits_experts, linears, experts, skipped


def wrap_linears_and_experts(
    model,
    *,
    targets: Targets,
    experts: bool | None,
    linear: Callable[[str, eqx.nn.Linear], eqx.Module],
    expert: Callable[[str, Array], eqx.Module],
    what: str,
    unwrap_hint: str | Callable[[AbstractWeight], str] = "",
    nothing: str,
):
    """The selection the functions that wrap a model for training share (`prepare_fp8`,
    `prepare_qat`): `linear(path, layer)` in place of each plain `equinox.nn.Linear` that
    `targets` selects, but the routers of mixture-of-experts layers unless a target names
    `"router"`; and, when `experts` (or `experts=None` and `targets` is `None` or names an
    expert array: `choose_expert_targets`),
    `expert(path, w)` in place of each expert array `w` of every [`eqzoo.nn.MoE`][], `path`
    its dotted path (`blocks.layers.mlp.gate_proj`).

    **Returns:** the new model. **Raises:** `ConfigError` as `choose_expert_targets` and
    [`eqzoo.nn.replace_linears`][] do (a selected layer that is not a plain `equinox.nn.Linear`),
    for an expert weight that is already an [`eqzoo.nn.AbstractWeight`][] (naming it, then
    `unwrap_hint`), and `ConfigError(nothing)` when nothing was wrapped.
    """
    linear_targets, _, linears, experts, skipped = choose_expert_targets(model, targets, experts, what=what)
    wrapped = []

    def one_linear(path, layer):
        if skipped(path):
            return layer  # picks experts: rounding it can change the routing, as quantize keeps it float
        out = linear(path, layer)
        wrapped.append(path)
        return out

    def one_moe(path, layer):
        if not isinstance(layer, MoE):
            return layer
        for name in EXPERT_FIELDS:
            w, where = getattr(layer, name), f"{_path_str(path)}.{name}"
            if isinstance(w, AbstractWeight):
                raise ConfigError(
                    f"{what}: {where} is a {type(w).__name__}, not a float array (already wrapped, quantized or "
                    f"adapted); pass experts=False to leave the experts alone"
                    f"{unwrap_hint(w) if callable(unwrap_hint) else unwrap_hint}."
                )
            layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, expert(where, w))
            wrapped.append(where)
        return layer

    from ._moe import MoE  # here: _moe imports this package's linear helpers

    out = model
    if linears:
        out = replace_linears(out, one_linear, targets=linear_targets, kinds=(eqx.nn.Linear,), what=what)
    if experts:
        out = jax.tree_util.tree_map_with_path(one_moe, out, is_leaf=lambda x: isinstance(x, MoE))
    if not wrapped:
        raise ConfigError(nothing)
    return out


def split_expert_targets(model, targets: Targets, *, what: str) -> tuple[Targets, bool, bool]:
    """Which linear layers and whether the expert weights `targets` selects, for the functions
    that treat a mixture-of-experts layer's expert arrays beside its linear layers (quantize,
    LoRA): an expert array counts as the path `<MoE layer path>.gate_proj` (and `up_proj`,
    `down_proj`), so `"mlp"` or `"gate_proj"` reaches a Mixtral's experts, not only its router.

    **Returns:** `(linear_targets, experts, linears)`: the targets to pass on for linear layers
    (the patterns that match one), whether some pattern matches an expert array, and whether
    any linear layer is to be touched. `targets=None` gives `(None, False, True)`.

    **Raises:** `ConfigError` for a pattern that matches neither (naming the paths there are).
    """
    compiled = _compile_targets(targets, what)
    if compiled is None:
        return None, False, True
    from ._moe import MoE  # here: _moe imports this package's linear helpers

    moe_paths = [_path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda x: isinstance(x, MoE))[0] if isinstance(x, MoE)]
    expert_paths = [f"{p}.{f}" for p in moe_paths for f in EXPERT_FIELDS]
    linear = linear_paths(model)
    on_linear = [c.pattern for c in compiled if any(c.search(p) for p in linear)]
    on_experts = [c.pattern for c in compiled if any(c.search(p) for p in expert_paths)]
    unused = [c.pattern for c in compiled if c.pattern not in on_linear and c.pattern not in on_experts]
    if unused and not expert_paths:  # the plain message, with its Hugging Face name hints
        replace_linears(model, lambda path, x: x, targets=unused, kinds=(eqx.nn.Linear, AbstractLinear), what=what)
    if unused:
        raise ConfigError(
            f"{what}: target(s) {unused} match no linear layer and no expert weights; the model's linear "
            f"layers are {linear or 'none'}" + (f" and its expert weights {expert_paths}" if expert_paths else "") + "."
        )
    return (on_linear or None), bool(on_experts), bool(on_linear)


def select_linears(model, targets: Targets = None, *, what: str = "select_linears") -> list[tuple[str, eqx.Module]]:
    """`(path, layer)` of every linear layer `targets` selects (of any kind: `equinox.nn.Linear`
    or [`eqzoo.nn.AbstractLinear`][]), outermost only, in tree order; nothing is changed.

    **Raises:** `ConfigError`, as [`eqzoo.nn.replace_linears`][] does, if a target regex matches
    no linear layer (the message names `what` and lists the paths there are).
    """
    found: list[tuple[str, eqx.Module]] = []

    def record(path, layer):
        found.append((path, layer))
        return layer

    replace_linears(model, record, targets=targets, kinds=(eqx.nn.Linear, AbstractLinear), what=what)
    return found
