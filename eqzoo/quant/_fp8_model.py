"""`prepare_fp8` and `unwrap_fp8`: a model's linear layers and expert weights wrapped for fp8
training matmuls, and unwrapped again."""

import jax
import jax.numpy as jnp

from .._errors import ConfigError
from ..nn import Targets
from ..nn._replace import wrap_linears_and_experts
from ._fp8 import Fp8Linear
from ._fp8_experts import Fp8Weight


def prepare_fp8(model, *, targets: Targets = None, experts: bool | None = None):
    """A copy of `model` whose selected `equinox.nn.Linear` layers compute their products with
    fp8 operands in training: each becomes an [`eqzoo.quant.Fp8Linear`][]; and whose
    mixture-of-experts layers' expert weights do too, each an [`eqzoo.quant.Fp8Weight`][].

    Train it as usual (`TrainState.create(prepare_fp8(model), ...)`, `make_train_step`, any
    [`eqzoo.train.Precision`][]; bf16 compute is the usual partner): the float weights stay
    the trained and saved parameters, at paths such as `blocks.layers.attn.q_proj.base.weight`
    and `blocks.layers.mlp.gate_proj.base` (which the default sharding rules place like the
    unwrapped weights). Only the linear layers' and the experts' products are fp8; attention's
    score and value products, the embeddings, the norms, the (tied) output head and the loss
    stay in the compute dtype, and so do the routers of mixture-of-experts layers. The experts'
    products are fp8 under the `"dense"` and `"capacity"` implementations of
    [`eqzoo.nn.MoE`][] ([`eqzoo.quant.fp8_einsum`][]); `"ragged"`, whose grouped products
    take float arrays, refuses fp8 experts. [`eqzoo.quant.unwrap_fp8`][] gives back the plain
    model.

    **Arguments:**

    - `model`: any model whose linear layers are `equinox.nn.Linear`s applied through
      [`eqzoo.nn.apply_linear`][] (every eqzoo model) or called directly.
    - `targets`: which layers (see [`eqzoo.nn.Targets`][]): `None`, every plain
      `equinox.nn.Linear` but routers; or regexes searched in the dotted paths
      [`eqzoo.nn.linear_paths`][] lists, e.g. `"attn"` (a router is wrapped only when a target
      names `"router"`). As in [`eqzoo.quant.quantize`][], a mixture-of-experts layer's expert
      arrays count as the paths `<layer>.gate_proj`, `<layer>.up_proj` and `<layer>.down_proj`.
    - `experts`: also wrap the expert weights of every [`eqzoo.nn.MoE`][] layer. `None`
      (default): when `targets` is `None` or matches an expert array's path.

    **Returns:** the wrapped model. **Raises:** `ConfigError` if a target matches no linear
    layer and no expert weight, or a layer that is not a plain `equinox.nn.Linear` (already
    fp8, quantized or adapted), if an expert weight to wrap is not a float array, if a selected
    weight is not floating point, or if nothing is left to wrap.
    """

    def linear(path, layer):
        if not jnp.issubdtype(layer.weight.dtype, jnp.floating):
            raise ConfigError(
                f"prepare_fp8: {path} has a weight of dtype {layer.weight.dtype}; fp8 products need "
                "floating-point weights. Leave it out of the targets."
            )
        return Fp8Linear(layer)

    def expert(path, w):
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ConfigError(f"prepare_fp8: {path} has dtype {w.dtype}; fp8 products need floating-point weights. Pass experts=False.")
        return Fp8Weight(w)

    return wrap_linears_and_experts(
        model, targets=targets, experts=experts, linear=linear, expert=expert, what="prepare_fp8",
        unwrap_hint=lambda w: (
            ", or adapt after prepare_fp8: peft.lora(prepare_fp8(model), ...) keeps the experts' fp8 products"
            if type(w).__name__ == "LoRAWeight" else ", or unwrap_fp8 an fp8 model first"
        ),
        nothing=(
            "prepare_fp8: nothing to wrap: the selected layers are routers of mixture-of-experts layers "
            "(skipped unless a target names 'router'), or the model has no plain equinox.nn.Linear layer "
            "and no float expert weight to wrap (its linear layers are already fp8, quantized or adapted, or "
            "it has none). For a model that is already fp8, unwrap it with eqzoo.quant.unwrap_fp8 first to re-select."
        ),
    )


def _is_fp8(x) -> bool:
    return isinstance(x, Fp8Linear | Fp8Weight)


def unwrap_fp8(model):
    """A copy of `model` with every [`eqzoo.quant.Fp8Linear`][] replaced by the float
    `equinox.nn.Linear` it wraps and every [`eqzoo.quant.Fp8Weight`][] by its float array,
    weights unchanged: the plain model, for inference, export (`eqzoo.hf.save_pretrained`) or
    post-training quantization.

    **Raises:** `ConfigError` if the model has no `Fp8Linear` and no `Fp8Weight`.
    """
    if not any(_is_fp8(x) for x in jax.tree.leaves(model, is_leaf=_is_fp8)):
        raise ConfigError("unwrap_fp8: the model has no Fp8Linear layer and no Fp8Weight (nothing to unwrap).")
    return jax.tree.map(lambda x: x.base if isinstance(x, Fp8Weight) else x.as_linear() if _is_fp8(x) else x, model, is_leaf=_is_fp8)
