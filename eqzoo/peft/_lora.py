"""LoRA: a frozen linear layer plus a trainable low-rank update, `W x + (alpha / r) B A x`.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). `A` is `(r, in)`, drawn
from N(0, 1/in); `B` is `(out, r)`, zero, so a freshly adapted model computes exactly what the
base model does. With `use_rslora=True` the update is scaled by `alpha / sqrt(r)` instead
(Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023).
"""

import math
import numbers
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._errors import ConfigError, int_hint, user_stacklevel
from .._typing import PRNGKey
from ..nn import (
    AbstractLinear,
    AbstractWeight,
    MoE,
    Targets,
    apply_linear,
    linear_dtype,
    replace_linears,
    select_linears,
    weight_einsum,
    weight_take,
    weight_take_matmul,
    weight_value,
)
from ..nn._replace import _compile_targets, split_expert_targets
from ..nn._weight import AbstractWrappedWeight, computes_own_products
from ..sharding import path_str


def _checked_rank(rank) -> int:
    """`rank` as a Python int (a NumPy integer is one), or `ConfigError` for anything but an
    integer >= 1 (a bool too: `rank=True` is a slip, not rank 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}.{int_hint(rank)}")
    return int(rank)


def _lead(layer: eqx.nn.Linear | AbstractLinear) -> tuple[int, ...]:
    # The stacked layer axes in front of (out, in): () for a plain layer, (layers,) in a Stacked.
    if isinstance(layer, eqx.nn.Linear):
        return tuple(layer.weight.shape[:-2])
    leaves = [x for x in jax.tree.leaves(layer) if eqx.is_array(x) and x.ndim >= 2]
    return tuple(leaves[0].shape[:-2]) if leaves else ()


class LoRALinear(AbstractLinear):
    """A linear layer with a low-rank adapter: `base(x) + scaling * (x @ lora_a.T) @ lora_b.T`.

    `base` is any linear layer (an `equinox.nn.Linear`, or e.g. an
    [`eqzoo.quant.QuantizedLinear`][] for int8 base weights) and is meant to stay frozen;
    `lora_a` `(rank, in)` and `lora_b` `(out, rank)` are the trainable factors. Inside a
    [`eqzoo.nn.Stacked`][] every array carries the stacked layer axis first. Build it with
    [`eqzoo.peft.lora`][] rather than by hand.
    """

    base: eqx.nn.Linear | AbstractLinear
    lora_a: Float[Array, "*layers rank in"]
    lora_b: Float[Array, "*layers out rank"]
    scaling: float = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        base: eqx.nn.Linear | AbstractLinear,
        *,
        rank: int,
        alpha: int | float | None = None,
        use_rslora: bool = False,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:**

        - `base`: the layer to adapt (its arrays may carry leading stacked-layer axes).
        - `rank`: the adapter's rank `r` (at least 1).
        - `alpha`: the update's scale numerator (default `rank`, i.e. scaling 1).
        - `use_rslora`: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        - `dtype`: the factors' dtype. Default: the base layer's floating dtype, but at least
          float32, so a bfloat16 or float16 base (as Hugging Face checkpoints often are) still
          gets factors whose small updates are not rounded away; `apply` casts them to the
          input's dtype.
        - `key`: draws `lora_a`.
        """
        rank = _checked_rank(rank)
        in_features, out_features = base.in_features, base.out_features
        if not (isinstance(in_features, int) and isinstance(out_features, int)):
            raise ConfigError(
                f"LoRA adapts layers with integer in/out features; got in_features={in_features!r}, "
                f"out_features={out_features!r} (equinox's 'scalar' features are not supported)."
            )
        alpha = float(rank if alpha is None else alpha)
        if dtype is None:
            base_dtype = jnp.dtype(linear_dtype(base))
            dtype = base_dtype if jnp.finfo(base_dtype).bits >= 32 else jnp.dtype(jnp.float32)
        lead = _lead(base)
        self.base = base
        std = 1.0 / math.sqrt(in_features)
        self.lora_a = std * jax.random.normal(key, (*lead, rank, in_features), dtype=dtype)
        self.lora_b = jnp.zeros((*lead, out_features, rank), dtype=dtype)
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def rank(self) -> int:
        """The adapter's rank `r`."""
        return self.lora_a.shape[-2]

    @property
    def dtype(self) -> jnp.dtype:
        """The base layer's floating dtype."""
        return linear_dtype(self.base)

    def apply(self, x: Float[Array, "*shape in"]) -> Float[Array, "*shape out"]:
        """`base(x)` plus the low-rank update, over the last axis of `x`, in `x`'s dtype."""
        h = x @ self.lora_a.T.astype(x.dtype)  # (*shape, rank)
        update = (h @ self.lora_b.T.astype(x.dtype)) * jnp.asarray(self.scaling, x.dtype)
        return apply_linear(self.base, x) + update

    def as_linear(self) -> eqx.nn.Linear:
        """The base layer with the update folded into its weight: `W + scaling * lora_b @ lora_a`
        (summed in float32, stored in the base weight's dtype). A base with no dense
        equivalent raises `ConfigError`."""
        base = _dense(self.base)
        weight = (base.weight.astype(jnp.float32) + self.delta()).astype(base.weight.dtype)
        return eqx.tree_at(lambda lin: lin.weight, base, weight)

    def delta(self) -> Float[Array, "*layers out in"]:
        """The dense update `scaling * lora_b @ lora_a` (float32), with any stacked axes."""
        a = self.lora_a.astype(jnp.float32)
        b = self.lora_b.astype(jnp.float32)
        return self.scaling * jnp.einsum("...or,...ri->...oi", b, a)


class LoRAWeight(AbstractWrappedWeight):
    """An expert weight of a mixture of experts with a low-rank adapter per expert:
    `W + scaling * lora_a @ lora_b`, for weights used as `x @ W`.

    `base` is the frozen `(*lead, in, out)` weight (a float array, or an
    [`eqzoo.quant.QuantizedWeight`][] for int8 experts); `lora_a` `(*lead, in, rank)` and
    `lora_b` `(*lead, rank, out)` are the trainable factors, one pair per expert (and per
    stacked layer: `lead` is `(layers, experts)` inside a [`eqzoo.nn.Stacked`][]). `lora_b`
    starts at zero. As for [`eqzoo.peft.LoRALinear`][], a product with it is the base's own
    product plus the low-rank term `scaling * (x @ lora_a) @ lora_b` (`einsum`, `take_matmul`:
    the `"dense"` and `"capacity"` implementations of [`eqzoo.nn.MoE`][] and decoding), so an
    [`eqzoo.quant.Fp8Weight`][] base keeps its fp8 products and an int4 base its packed ones;
    `"ragged"` materialises the adapted weight ([`eqzoo.nn.weight_value`][]), summing in
    float32, and refuses an fp8 base. Build it with `eqzoo.peft.lora(model, experts=True)`
    rather than by hand.
    """

    base: Float[Array, "*lead in out"] | AbstractWeight
    lora_a: Float[Array, "*lead in rank"]
    lora_b: Float[Array, "*lead rank out"]
    scaling: float = eqx.field(static=True)

    def __init__(
        self,
        base: Float[Array, "*lead in out"] | AbstractWeight,
        *,
        rank: int,
        alpha: int | float | None = None,
        use_rslora: bool = False,
        dtype=None,
        key: PRNGKey,
    ):
        """**Arguments:** `base`, the weight to adapt; `rank`, `alpha`, `use_rslora`, `dtype`,
        `key` as for [`eqzoo.peft.LoRALinear`][] (`lora_a` drawn from N(0, 1/in))."""
        rank = _checked_rank(rank)
        shape = tuple(base.shape)
        if len(shape) < 2:
            raise ConfigError(f"LoRAWeight adapts a (..., in, out) weight; got shape {shape}.")
        *lead, in_features, out_features = shape
        base_dtype = jnp.dtype(base.dtype)
        if dtype is None:
            dtype = base_dtype if jnp.finfo(base_dtype).bits >= 32 else jnp.dtype(jnp.float32)
        self.base = base
        std = 1.0 / math.sqrt(in_features)
        self.lora_a = std * jax.random.normal(key, (*lead, in_features, rank), dtype=dtype)
        self.lora_b = jnp.zeros((*lead, rank, out_features), dtype=dtype)
        alpha = float(rank if alpha is None else alpha)
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)

    @property
    def rank(self) -> int:
        """The adapter's rank `r`."""
        return self.lora_a.shape[-1]

    def delta(self) -> Float[Array, "*lead in out"]:
        """The dense update `scaling * lora_a @ lora_b` (float32)."""
        a = self.lora_a.astype(jnp.float32)
        b = self.lora_b.astype(jnp.float32)
        return self.scaling * jnp.einsum("...ir,...ro->...io", a, b)

    def materialize(self, dtype) -> Float[Array, "*lead in out"]:
        """The adapted weight `base + delta()`, summed in float32, in `dtype`."""
        return (weight_value(self.base, jnp.float32) + self.delta()).astype(dtype)

    def take(self, indices, dtype) -> Float[Array, "..."]:
        """The adapted entries at `indices` along the leading axis (an expert each): the base's
        entries (read alone, an int8 base's too) plus their own low-rank updates."""
        base = weight_take(self.base, indices, jnp.float32)
        a = jnp.take(self.lora_a, indices, axis=0).astype(jnp.float32)
        b = jnp.take(self.lora_b, indices, axis=0).astype(jnp.float32)
        return (base + self.scaling * jnp.einsum("...ir,...ro->...io", a, b)).astype(dtype)

    def einsum(self, spec: str, x: Float[Array, "..."]) -> Float[Array, "..."]:
        """`jnp.einsum(spec, x, W + delta)` in `x`'s dtype as LoRA computes it: the base's own
        product ([`eqzoo.nn.weight_einsum`][]: fp8 operands for an [`eqzoo.quant.Fp8Weight`][],
        the dequantized weight for int8 or int4, the rounded one for a
        [`eqzoo.quant.FakeQuantWeight`][]) plus the low-rank term `scaling * (x @ lora_a) @
        lora_b`, two products through rank `r` with the factors cast to `x`'s dtype (as
        [`eqzoo.peft.LoRALinear`][] does: a small update is never rounded into the base weight)."""
        return weight_einsum(spec, x, self.base) + self._low_rank(spec, x, self.lora_a, self.lora_b)

    def take_matmul(self, x: Float[Array, "*idx contract"], indices) -> Float[Array, "*idx out"]:
        """`x @ W[indices]` for each index, in `x`'s dtype: the base's own product with the
        entries at `indices` ([`eqzoo.nn.weight_take_matmul`][]: fp8, or int4 from the packed
        bytes on CPU) plus the low-rank term of those entries' factors."""
        a = jnp.take(self.lora_a, indices, axis=0)
        b = jnp.take(self.lora_b, indices, axis=0)
        return weight_take_matmul(self.base, x, indices) + self._low_rank("...d,...do->...o", x, a, b)

    def computes_own_products(self) -> bool:
        """Whether the base weight computes its own products (fp8 experts): then so does the
        adapted weight, and MoE's `"ragged"` implementation, which multiplies materialised
        arrays, refuses it rather than bypass the base's products."""
        return computes_own_products(self.base)

    def _low_rank(self, spec: str, x, a, b):
        """`scaling * einsum(spec, x, a @ b)` as `(x a) b`: the weight's operand of `spec` ends
        with its (contracted, output) indices, and the rank takes a letter of its own."""
        inputs, out = spec.replace(" ", "").split("->")
        xs, ws = inputs.split(",")
        r = next(c for c in "rzyxwvutsqponmlkjihgfedcba" if c not in spec)
        lead, contract, o = ws[:-2], ws[-2], ws[-1]
        three = f"{xs},{lead}{contract}{r},{lead}{r}{o}->{out}"
        dtype = x.dtype
        y = jnp.einsum(three, x, a.astype(dtype), b.astype(dtype), optimize=[(0, 1), (0, 1)])  # x with a first
        return y * jnp.asarray(self.scaling, dtype)

    def merged(self) -> Float[Array, "*lead in out"]:
        """The adapted weight as a plain array in the base's dtype (an int8 base is
        dequantized first)."""
        return self.materialize(self.dtype)


def lora(
    model,
    *,
    rank: int = 8,
    alpha: int | float | None = None,
    targets: Targets = None,
    experts: bool | None = None,
    use_rslora: bool = False,
    dtype=None,
    key: PRNGKey,
):
    """A copy of `model` with a [`eqzoo.peft.LoRALinear`][] adapter on each selected linear layer
    (and a [`eqzoo.peft.LoRAWeight`][] on each mixture-of-experts expert weight, with `experts`).

    The adapted model computes exactly what `model` does until the adapters are trained (`lora_b`
    starts at zero). Train only the adapters with
    `TrainState.create(adapted, optimizer, trainable=eqzoo.peft.adapter_filter(adapted), key=...)`,
    then fold them in with [`eqzoo.peft.merge`][] or save them alone with
    [`eqzoo.peft.save_adapters`][].

    **Arguments:**

    - `model`: any model whose linear layers are `equinox.nn.Linear`s or
      [`eqzoo.nn.AbstractLinear`][]s applied through [`eqzoo.nn.apply_linear`][] (every eqzoo
      model) or called directly (`equinox.nn.MLP`).
    - `rank`, `alpha`, `use_rslora`, `dtype`: see [`eqzoo.peft.LoRALinear`][]. Default scaling
      `alpha / rank = 1`.
    - `targets`: which layers (see [`eqzoo.nn.Targets`][]): `None`, every linear layer (as QLoRA
      recommends), or regexes searched in the dotted paths that
      [`eqzoo.nn.linear_paths`][] lists, e.g. `"q_proj|v_proj"` or `r"attn\\."`. A
      mixture-of-experts layer's expert arrays count as the paths `<layer>.gate_proj`,
      `<layer>.up_proj` and `<layer>.down_proj`, adapted together (so `"mlp"` reaches a
      Mixtral's experts and its router).
    - `experts`: also adapt the expert weights of every [`eqzoo.nn.MoE`][] layer (stacked
      arrays, not linear layers: most of a Mixtral's parameters), one low-rank pair per
      expert. `None` (default): when `targets` is `None` (adapt everything) or matches an
      expert array's path.
    - `key`: split into one key per adapted layer (stacked layers draw one factor per depth).

    **Returns:** the adapted model. **Raises:** `ConfigError` for a bad rank, a target that
    matches no linear layer, or a target layer that already has an adapter. **Warns** when
    `rank` exceeds `min(in, out)` of an adapted layer (the extra rank adds parameters, no
    capacity), a mixture-of-experts router aside.
    """
    kinds = (eqx.nn.Linear, AbstractLinear)
    linear_targets, hits_experts, linears = split_expert_targets(model, targets, what="lora")
    selected = select_linears(model, linear_targets, what="lora") if linears else []
    already = [path for path, layer in selected if isinstance(layer, LoRALinear)]
    if already:
        raise ConfigError(
            f"lora: {already} already have LoRA adapters; merge them first (eqzoo.peft.merge) or "
            "narrow the targets."
        )
    keys = iter(jax.random.split(key, max(len(selected), 1)))
    expert_key = jax.random.fold_in(key, 0x6578)  # the linear adapters' keys stay as they were
    options = dict(rank=rank, alpha=alpha, use_rslora=use_rslora, dtype=dtype)

    def adapt(path, layer):
        return LoRALinear(layer, **options, key=next(keys))

    out = replace_linears(model, adapt, targets=linear_targets, kinds=kinds, what="lora") if linears else model
    if experts is None:  # with everything adapted, or targets that name expert weights
        experts = (targets is None or hits_experts) and any(_is_moe(x) for x in jax.tree.leaves(out, is_leaf=_is_moe))
    out = _adapt_experts(out, options, expert_key) if experts else out
    _warn_rank_past_layers(out, _checked_rank(rank))
    if alpha is not None and not isinstance(alpha, bool) and isinstance(alpha, numbers.Real) and float(alpha) == 0:
        warnings.warn(
            "lora: alpha=0 scales every adapter's update by 0, so the adapted model computes the base "
            "model's outputs and the adapters' gradients are 0: training changes nothing. Leave alpha=None "
            "(alpha = rank) or pass alpha=rank or 2 * rank, as is usual.",
            stacklevel=user_stacklevel(),
        )
    return out


def _warn_rank_past_layers(model, rank: int) -> None:
    """Warn when `rank` exceeds a new adapter's `min(in, out)`: `B A` then has rank at most
    `min(in, out)`, so the extra rank adds parameters (and, in the factors, optimizer state)
    but no capacity to the update. A mixture-of-experts router (one output per expert) is
    left out: adapting every layer at the usual ranks reaches it, and its factors are small."""
    routers = {id(x.router) for x in jax.tree.leaves(model, is_leaf=_is_moe) if _is_moe(x)}
    flat = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_lora)[0]
    wide = []
    for path, x in flat:
        if not _is_lora(x) or x.rank != rank or id(x) in routers:
            continue
        n_in, n_out = (x.in_features, x.out_features) if isinstance(x, LoRALinear) else x.base.shape[-2:]
        if rank > min(n_in, n_out):
            wide.append((path_str(path), n_in, n_out))
    if wide:
        fits = min(min(n_in, n_out) for _, n_in, n_out in wide)
        shown = ", ".join(f"{p} ({n_out}x{n_in})" for p, n_in, n_out in wide[:8])
        more = f" and {len(wide) - 8} more" if len(wide) > 8 else ""
        warnings.warn(
            f"lora: rank={rank} exceeds the smaller side of {len(wide)} adapted layer(s): {shown}{more}. "
            "The update B @ A of a layer of (out, in) has rank at most min(in, out), so the extra rank adds "
            f"parameters and optimizer state but no capacity; pass rank <= {fits} (or narrow the targets).",
            stacklevel=user_stacklevel(),
        )


_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def _is_moe(x) -> bool:
    return isinstance(x, MoE)


def _adapt_experts(model, options, key):
    """Every expert weight of every MoE layer wrapped in a `LoRAWeight`."""
    layers = [x for x in jax.tree.leaves(model, is_leaf=_is_moe) if _is_moe(x)]
    if not layers:
        raise ConfigError("lora(experts=True): the model has no mixture-of-experts layer (eqzoo.nn.MoE).")
    keys = iter(jax.random.split(key, 3 * len(layers)))

    def one(layer):
        if not _is_moe(layer):
            return layer
        for name in _EXPERT_WEIGHTS:
            w = getattr(layer, name)
            if isinstance(w, LoRAWeight):
                raise ConfigError(
                    "lora: the experts already have LoRA adapters; merge them first "
                    "(eqzoo.peft.merge) or pass experts=False."
                )
            layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, LoRAWeight(w, **options, key=next(keys)))
        return layer

    return jax.tree.map(one, model, is_leaf=_is_moe)


def _is_lora(x) -> bool:
    return isinstance(x, LoRALinear | LoRAWeight)


def adapter_filter(model, *, also: Targets = None):
    """An `eqx.partition` filter spec (a pytree of bools like `model`) that is `True` on every
    LoRA factor (`lora_a`, `lora_b`) and `False` elsewhere: pass it as
    `TrainState.create(..., trainable=...)` so the optimizer holds state for the adapters only.

    **Arguments:** `model`, an adapted model; `also`, regexes searched in parameter paths
    (`final_norm.weight`, `blocks.layers.attn_norm.bias`, ...) whose floating-point leaves are trained
    too (e.g. `"norm"`). **Raises:** `ConfigError` if the model has no adapters or `also`
    matches no parameter.
    """
    if not any(_is_lora(x) for x in jax.tree.leaves(model, is_leaf=_is_lora)):
        raise ConfigError("adapter_filter: the model has no LoRA adapters; add them with eqzoo.peft.lora first.")

    def on_adapters(layer: LoRALinear | LoRAWeight):
        return jax.tree.map(lambda x: x is layer.lora_a or x is layer.lora_b, layer)

    spec = jax.tree.map(lambda x: on_adapters(x) if _is_lora(x) else False, model, is_leaf=_is_lora)
    if also is None:
        return spec
    compiled = _compile_targets(also, "adapter_filter(also=...)")
    flat, treedef = jax.tree_util.tree_flatten_with_path(model)
    used = set()
    out = []
    for (path, leaf), s in zip(flat, treedef.flatten_up_to(spec), strict=True):
        hit = [c.pattern for c in compiled if c.search(path_str(path))] if eqx.is_inexact_array(leaf) else []
        used.update(hit)
        out.append(s or bool(hit))
    unused = [c.pattern for c in compiled if c.pattern not in used]
    if unused:
        raise ConfigError(f"adapter_filter: also={unused} match no floating-point parameter path.")
    return jax.tree_util.tree_unflatten(treedef, out)


def _dense(layer: eqx.nn.Linear | AbstractLinear) -> eqx.nn.Linear:
    if isinstance(layer, eqx.nn.Linear):
        return layer
    try:
        return layer.as_linear()
    except NotImplementedError as err:
        raise ConfigError(
            f"merge: an adapter's base is a {type(layer).__name__}, which has no dense "
            "equinox.nn.Linear equivalent to fold the update into."
        ) from err


def merge(model):
    """A copy of `model` with every [`eqzoo.peft.LoRALinear`][] folded into a plain
    `equinox.nn.Linear` whose weight is `W + scaling * lora_b @ lora_a` (in the base weight's
    dtype; summed in float32), and every [`eqzoo.peft.LoRAWeight`][] into the plain expert
    array `W + scaling * lora_a @ lora_b`. The merged model computes what the adapted one does and runs at
    the base model's speed; it can be exported with `eqzoo.hf.save_pretrained`.

    A quantized base (`eqzoo.quant.QuantizedLinear`) is dequantized first, so the merged layer
    is floating point; quantize the merged model again with `eqzoo.quant.quantize` if wanted.
    An fp8 training base (`eqzoo.quant.Fp8Linear`) holds float weights: the merged layer is a
    plain `equinox.nn.Linear` (wrap the merged model with `eqzoo.quant.prepare_fp8` again to go on
    training with fp8 products).

    **Raises:** `ConfigError` if the model has no adapters.
    """
    if not any(_is_lora(x) for x in jax.tree.leaves(model, is_leaf=_is_lora)):
        raise ConfigError("merge: the model has no LoRA adapters (nothing to merge).")
    def one(x):
        if isinstance(x, LoRAWeight):
            return x.merged()
        return x.as_linear() if isinstance(x, LoRALinear) else x

    return jax.tree.map(one, model, is_leaf=_is_lora)


def unwrap(model):
    """A copy of `model` with every [`eqzoo.peft.LoRALinear`][] replaced by its base layer and
    every [`eqzoo.peft.LoRAWeight`][] by its base weight: the adapters are dropped (the base
    model back)."""
    return jax.tree.map(lambda x: x.base if _is_lora(x) else x, model, is_leaf=_is_lora)


def adapter_count(model) -> int:
    """The number of scalar parameters in the model's LoRA factors."""
    layers = [x for x in jax.tree.leaves(model, is_leaf=_is_lora) if _is_lora(x)]
    return sum(int(x.lora_a.size + x.lora_b.size) for x in layers)
