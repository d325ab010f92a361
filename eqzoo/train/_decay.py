"""Which parameters weight decay applies to."""

import equinox as eqx
import jax
from jaxtyping import PyTree


def weight_decay_mask(params: PyTree) -> PyTree:
    """`True` for the parameters weight decay should shrink, `False` for the rest: pass it as
    `optax.adamw(..., mask=eqzoo.train.weight_decay_mask)`.

    Decayed: every floating-point array that is a matrix or more *per layer* — embedding
    tables, linear and convolution weights, LoRA factors, mixture-of-experts expert arrays and
    routers. Not decayed: vectors per layer (norm scales and offsets, biases: any field named
    `bias`, whatever its shape, since convolution biases are `(channels, 1, 1)`), int8
    quantization scales (fields named `scale`), integer arrays, and non-array leaves. The leading layer axis of [`eqzoo.nn.Stacked`][] does not
    count, so a stack of 12 biases `(12, 768)` is not decayed while a stack of weights
    `(12, 768, 768)` is (deciding by `ndim` alone gets stacked models wrong).

    **Arguments:** `params`, a model or the parameter tree an optax optimizer sees (a model
    filtered with `eqx.filter(model, eqx.is_inexact_array)`).

    **Returns:** a tree of the same structure with a bool in place of each leaf.
    """
    from ..nn import Stacked  # here: eqzoo.nn imports eqzoo.sharding, which imports eqzoo.train

    def axes(stacked) -> int:
        # `Stacked.unstacked()` holds a tuple of per-layer modules: no stacked axis.
        return 0 if isinstance(stacked.layers, tuple) else 1

    def mask(node: PyTree, stacked_axes: int) -> PyTree:
        def one(path, leaf):
            if isinstance(leaf, Stacked) and leaf is not node:
                return mask(leaf, stacked_axes + axes(leaf))
            if not eqx.is_inexact_array(leaf):
                return False
            name = getattr(path[-1], "name", None) if path else None
            return leaf.ndim - stacked_axes >= 2 and name not in ("bias", "scale")

        return jax.tree_util.tree_map_with_path(
            one, node, is_leaf=lambda x: isinstance(x, Stacked) and x is not node
        )

    return mask(params, axes(params) if isinstance(params, Stacked) else 0)
