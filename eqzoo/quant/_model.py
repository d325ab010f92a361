"""Whole-model int8 / int4 post-training quantization, and its inverse."""

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import ConfigError
from ..nn import (
    AbstractLinear,
    AbstractWeight,
    MoE,
    Targets,
    linear_paths,
    replace_linears,
    select_linears,
)
from ..nn._replace import EXPERT_FIELDS, choose_expert_targets
from ..sharding import path_str
from ._fp8 import Fp8Linear
from ._fp8_experts import Fp8Weight
from ._int4 import check_bits_and_groups
from ._linear import QuantizedLinear
from ._qat import FakeQuantLinear, FakeQuantWeight, grid_str
from ._weight import QuantizedWeight


def _is_quant(x) -> bool:
    return isinstance(x, QuantizedLinear | FakeQuantLinear)


def quantize(
    model, *, targets: Targets = None, experts: bool | None = None, bits: int = 8, group_size: int | None = None
):
    """A copy of `model` with each selected linear layer replaced by an int8 (or int4)
    [`eqzoo.quant.QuantizedLinear`][] (weight-only post-training quantization).

    Each `equinox.nn.Linear`'s weight is rounded to the nearest int8 code with one symmetric
    scale per output channel, `scale = max|w| / 127` over the input axis (an all-zero row gets
    scale 0). With `bits=4` the codes lie in `[-7, 7]` (`scale = max|w| / 7`) and are packed two
    to a byte; with a `group_size`, each output channel gets one scale per group of
    `group_size` consecutive inputs (int4 usually wants groups: `bits=4, group_size=128`). A
    [`eqzoo.quant.FakeQuantLinear`][] from [`eqzoo.quant.prepare_qat`][] becomes the
    `QuantizedLinear` computing what it computed; pass the `bits` and `group_size` it was
    trained for (another grid is refused). Biases stay floating, and so does
    everything that is not a linear layer: the token and position embeddings, the norms, and
    the language models' output heads (GPT-2's head is tied to the embedding; Llama's `lm_head`
    is an embedding-shaped matrix too), which keep their dtype. A head that is an
    `equinox.nn.Linear` is quantized with the rest unless `targets` leave it out: ViT's
    classifier `head`, DiT's `final_linear` (and its `patch_embed` and modulation layers), and a
    model of your own's (see [`eqzoo.nn.linear_paths`][] for the names). Activations are not quantized: every product
    runs in the input's floating dtype.

    Works on stacked layers (one scale per layer and channel), under `jax.jit`, and on an
    abstract model (`eqx.filter_eval_shape`), e.g. to size a quantized model without building
    it ([`eqzoo.quant.size_report`][]).

    **Arguments:**

    - `model`: any model whose linear layers are `equinox.nn.Linear`s applied through
      [`eqzoo.nn.apply_linear`][] (every eqzoo model) or called directly (`equinox.nn.MLP`).
    - `targets`: which layers (see [`eqzoo.nn.Targets`][]): `None`, every float linear layer
      but the routers of mixture-of-experts layers (small, and a rounded router can change
      which experts a token picks), or regexes searched in the dotted paths
      [`eqzoo.nn.linear_paths`][] lists, e.g. `"mlp"`. A mixture-of-experts layer's expert
      arrays count as the paths `<layer>.gate_proj`, `<layer>.up_proj` and `<layer>.down_proj`,
      quantized together (so `"mlp"` reaches a Mixtral's experts); its router is quantized only
      when a target names `"router"`.
    - `experts`: also quantize the expert weights of every [`eqzoo.nn.MoE`][] layer (stacked
      arrays, not linear layers) into [`eqzoo.quant.QuantizedWeight`][]s, one scale per
      expert and output column; they are most of a Mixtral's parameters. `None` (default):
      when `targets` is `None` (quantize everything) or matches an expert array's path.
    - `bits`: 8 (int8 codes, the default) or 4 (int4 codes in `[-7, 7]`, packed two to a byte:
      half the bytes of int8). Experts are quantized alike, packed along their contracted axis.
    - `group_size`: `None` (default), one scale per output channel; or how many consecutive
      inputs (contracted rows, for experts) share a scale. It must divide every selected
      layer's input size.

    **Returns:** the quantized model. **Raises:** `ConfigError` if a target matches no linear
    layer or a layer that is already quantized, if a selected layer is wrapped (a LoRA
    adapter, an fp8 training layer: it would stay float beside the quantized rest; merge LoRA
    first, or quantize before adding it), if
    the model is already quantized, if a selected weight is not floating point, if `bits` is
    not 4 or 8, if `group_size` does not divide a selected layer's input size (naming the
    layer), or if a layer of a QAT model is asked for another grid than `prepare_qat` trained
    it for (naming both and the call that converts it).
    """
    check_bits_and_groups(bits, group_size, 2 * (group_size or 1), "quantize")  # bits, and group_size's type
    # A router is quantized only when a target names it ("mlp" on a Mixtral means its experts,
    # not its router): `skipped`.
    linear_targets, hits_experts, linears, experts, skipped = choose_expert_targets(model, targets, experts, what="quantize")
    if not linears:  # the targets name expert weights only (and experts is not False)
        return _quantize_experts(model, refuse_quantized=True, bits=bits, group_size=group_size)
    selected = select_linears(model, linear_targets, what="quantize")
    already = [p for p, x in selected if isinstance(x, QuantizedLinear)]
    todo = [p for p, x in selected if isinstance(x, eqx.nn.Linear | FakeQuantLinear) and not skipped(p)]
    if not todo and experts and hits_experts:  # "mlp" on a Mixtral: its router, left float, and its experts
        return _quantize_experts(model, refuse_quantized=True, bits=bits, group_size=group_size)
    if already and (targets is not None or not todo):
        raise ConfigError(
            f"quantize: {already} are already quantized; quantizing twice would only lose "
            "precision. Narrow the targets, or call eqzoo.quant.dequantize first."
        )
    if not todo:
        raise ConfigError(
            "quantize: the model has no float linear layer to quantize; its linear layers are "
            f"{[f'{p} ({type(x).__name__})' for p, x in selected] or 'none'}.{_wrapped_hint(selected)}"
        )
    # Wrapped layers (LoRA adapters, fp8 training layers) would stay float beside the quantized
    # rest: a model that looks quantized and is not, where the layers were fine-tuned.
    wrapped = [(p, x) for p, x in selected if not skipped(p) and isinstance(x, AbstractLinear)
               and not isinstance(x, QuantizedLinear | FakeQuantLinear)]
    if wrapped:
        names = [f"{p} ({type(x).__name__})" for p, x in wrapped]
        raise ConfigError(
            f"quantize: {names[:4]}{' ...' if len(names) > 4 else ''} ({len(names)} layer(s)) wrap their linear "
            "layers and would stay float while the rest is quantized. To deploy a LoRA fine-tune, merge the "
            "adapters first: eqzoo.quant.quantize(eqzoo.peft.merge(model)); to fine-tune on an int8 base (QLoRA), "
            f"quantize before adding them; or name the other layers in targets.{_wrapped_hint(wrapped)}"
        )

    def one(path, layer):
        if skipped(path):
            return layer
        if isinstance(layer, FakeQuantLinear):
            _refuse_qat_regrid(path, layer, bits, group_size)
        base = layer.base if isinstance(layer, FakeQuantLinear) else layer
        if not jnp.issubdtype(base.weight.dtype, jnp.floating):
            raise ConfigError(
                f"quantize: {path} has a weight of dtype {base.weight.dtype}; only floating-point weights "
                "are quantized. Leave it out of the targets."
            )
        check_bits_and_groups(bits, group_size, base.in_features, f"quantize: {path} {type(base).__name__}({base.in_features} -> {base.out_features})")
        return QuantizedLinear(base, bits=bits, group_size=group_size)

    out = replace_linears(model, one, targets=linear_targets, kinds=(eqx.nn.Linear, FakeQuantLinear), what="quantize")
    return _quantize_experts(out, bits=bits, group_size=group_size) if experts else out


def _wrapped_hint(selected) -> str:
    """The fix `quantize` suggests when every selected linear layer is wrapped already."""
    hint = (
        " Quantize before wrapping layers (for LoRA on an int8 base: "
        "eqzoo.peft.lora(eqzoo.quant.quantize(model), ...))." if any(isinstance(x, AbstractLinear) for _, x in selected) else ""
    )
    if any(isinstance(x, Fp8Linear) for _, x in selected):  # fp8 training layers hold float weights
        hint += " Unwrap fp8 training layers first: eqzoo.quant.quantize(eqzoo.quant.unwrap_fp8(model))."
    return hint


def _refuse_qat_regrid(path: str, layer: FakeQuantLinear | FakeQuantWeight, bits: int, group_size: int | None) -> None:
    # Refused, not converted: the QAT layer's outputs are what was trained and evaluated, and
    # another grid would deploy a model nobody measured.
    trained = (layer.bits, layer.group_size)
    if (bits, group_size) != trained:
        inputs = "contracted rows" if isinstance(layer, FakeQuantWeight) else "inputs"
        raise ConfigError(
            f"quantize: {path} was trained by prepare_qat for {grid_str(*trained, inputs)} (bits={trained[0]}, "
            f"group_size={trained[1]}); quantizing it with bits={bits}, group_size={group_size} would not compute "
            f"what it trained. Convert it with quantize(model, bits={trained[0]}, group_size={trained[1]}) "
            "(with the same targets), or round the QAT weights again on purpose: "
            f"quantize(eqzoo.quant.dequantize(model), bits={bits}, group_size={group_size})."
        )


def _is_moe(x) -> bool:
    return isinstance(x, MoE)


def _quantize_experts(model, *, refuse_quantized: bool = False, bits: int = 8, group_size: int | None = None):
    """Every float expert array of every MoE layer as a `QuantizedWeight`; with
    `refuse_quantized` (the targets named only experts), `ConfigError` when none is float."""
    moes = [x for x in jax.tree.leaves(model, is_leaf=_is_moe) if _is_moe(x)]
    if refuse_quantized and moes and all(isinstance(getattr(m, n), QuantizedWeight) for m in moes for n in EXPERT_FIELDS):
        raise ConfigError(
            "quantize: the targeted expert weights are already quantized; quantizing twice would only "
            "lose precision. Call eqzoo.quant.dequantize first."
        )

    def one(path, layer):
        if not _is_moe(layer):
            return layer
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(layer, name)
            where = f"{path_str(path)}.{name}"
            if isinstance(w, FakeQuantWeight):  # from prepare_qat: the quantized weight it trained as
                _refuse_qat_regrid(where, w, bits, group_size)
                w = w.base
            if isinstance(w, AbstractWeight) and not isinstance(w, QuantizedWeight):
                fix = (
                    "unwrap the fp8 training weights first: eqzoo.quant.quantize(eqzoo.quant.unwrap_fp8(model))"
                    if isinstance(w, Fp8Weight) else
                    "quantize before adding LoRA (eqzoo.peft.lora(eqzoo.quant.quantize(model), ...))"
                )
                raise ConfigError(
                    f"quantize: the experts' {name} is a {type(w).__name__}, not a float array; {fix}, "
                    "or pass experts=False."
                )
            if not isinstance(w, QuantizedWeight):
                contract = w.shape[-2]
                check_bits_and_groups(bits, group_size, contract, f"quantize: {where} (experts' weight {tuple(w.shape)}, contracting {contract})")
                q = QuantizedWeight(w, bits=bits, group_size=group_size)
                layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, q)
        return layer

    return jax.tree_util.tree_map_with_path(one, model, is_leaf=_is_moe)


def dequantize(model):
    """A copy of `model` (or of one layer) with every [`eqzoo.quant.QuantizedLinear`][] turned
    back into a float `equinox.nn.Linear` (`codes * scale`, in the original dtype), every
    [`eqzoo.quant.QuantizedWeight`][] (mixture-of-experts weights) into its float array, every
    [`eqzoo.quant.FakeQuantLinear`][] into an `equinox.nn.Linear` holding its fake-quantized
    weight, and every [`eqzoo.quant.FakeQuantWeight`][] into its fake-quantized array: in all
    cases the dense layer computing the same map. Use it to export a quantized
    model (e.g. `eqzoo.hf.save_pretrained`, which writes dense weights) or to quantize again
    differently; the rounding itself is not undone.

    **Raises:** `ConfigError` if there is nothing to dequantize.
    """
    if not any(_is_any_quant(x) for x in jax.tree.leaves(model, is_leaf=_is_any_quant)):
        paths = linear_paths(model)
        raise ConfigError(
            "dequantize: the model has no QuantizedLinear, FakeQuantLinear, QuantizedWeight or FakeQuantWeight "
            f"(nothing to dequantize); its linear layers are {paths or 'none'}."
        )

    def one(x):
        if isinstance(x, QuantizedWeight | FakeQuantWeight):
            return x.materialize(x.dtype)
        return x.as_linear() if _is_quant(x) else x

    return jax.tree.map(one, model, is_leaf=_is_any_quant)


def _is_any_quant(x) -> bool:
    return _is_quant(x) or isinstance(x, QuantizedWeight | FakeQuantWeight)
