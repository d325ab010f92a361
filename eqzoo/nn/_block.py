"""The pre-norm transformer block shared by GPT-2, Llama, Mixtral and Gemma."""

import equinox as eqx
from jaxtyping import Array, Bool, Float, Integer

from .._typing import PRNGKey
from ..sharding._activation import constrain
from ._attention import Attention, KVCache
from ._mlp import MLP, SwiGLU
from ._moe import MoE
from ._norm import LayerNorm, RMSNorm


class TransformerBlock(eqx.Module):
    """`x + attn(norm(x))`, then `x + mlp(norm(x))` (pre-norm residual block).

    With `post_attn_norm` / `post_mlp_norm` each branch's output is normalised again before it
    joins the residual stream, `x + post_norm(attn(norm(x)))` (the "sandwich" norms of
    Gemma 2 and 3).
    """

    attn_norm: LayerNorm | RMSNorm
    attn: Attention
    mlp_norm: LayerNorm | RMSNorm
    mlp: MLP | SwiGLU | MoE
    post_attn_norm: LayerNorm | RMSNorm | None = None
    post_mlp_norm: LayerNorm | RMSNorm | None = None

    def __init__(
        self,
        attn_norm: LayerNorm | RMSNorm,
        attn: Attention,
        mlp_norm: LayerNorm | RMSNorm,
        mlp: MLP | SwiGLU | MoE,
        *,
        post_attn_norm: LayerNorm | RMSNorm | None = None,
        post_mlp_norm: LayerNorm | RMSNorm | None = None,
    ):
        """**Arguments:** the four sub-layers, already built; optionally the norms applied to the
        attention's and the MLP's outputs before the residual additions."""
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.post_attn_norm = post_attn_norm
        self.post_mlp_norm = post_mlp_norm

    def _attend(self, x, positions, segment_ids, layer):
        h = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids, layer=layer)
        return h if self.post_attn_norm is None else self.post_attn_norm(h)

    def _post_mlp(self, h):
        return h if self.post_mlp_norm is None else self.post_mlp_norm(h)

    def __call__(
        self,
        x: Float[Array, "seq embed"],
        *,
        positions: Integer[Array, " seq"] | None = None,
        segment_ids: Integer[Array, " seq"] | None = None,
        layer: Integer[Array, ""] | int | None = None,
        key: PRNGKey | None = None,
    ) -> Float[Array, "seq embed"]:
        """**Arguments:** `x`, one sequence; `positions` and `segment_ids` as for
        [`eqzoo.nn.Attention`][] (packed documents); `layer`, this block's index in its stack
        (read only by attention built with `window_layers`). **Returns:** same shape and dtype."""
        # A no-op unless traced inside eqzoo.sharding.activation_sharding(mesh).
        x = x + self._attend(x, positions, segment_ids, layer)
        x = constrain(x, "residual")
        return constrain(x + self._post_mlp(self.mlp(self.mlp_norm(x))), "residual")

    def with_aux(
        self,
        x: Float[Array, "seq embed"],
        mask: Float[Array, " seq"] | Bool[Array, " seq"] | None = None,
        *,
        positions: Integer[Array, " seq"] | None = None,
        segment_ids: Integer[Array, " seq"] | None = None,
        layer: Integer[Array, ""] | int | None = None,
    ) -> tuple[Float[Array, "seq embed"], dict[str, Float[Array, ""]]]:
        """`__call__` plus the feed-forward layer's auxiliary statistics: the router losses of
        an [`eqzoo.nn.MoE`][] over the positions `mask` weights (see `MoE.with_aux`), an empty
        dict for a dense MLP."""
        if not isinstance(self.mlp, MoE):
            return self(x, positions=positions, segment_ids=segment_ids, layer=layer), {}
        x = x + self._attend(x, positions, segment_ids, layer)
        x = constrain(x, "residual")
        h, aux = self.mlp.with_aux(self.mlp_norm(x), mask)
        return constrain(x + self._post_mlp(h), "residual"), aux

    def decode(
        self,
        x: Float[Array, "seq embed"],
        cache: KVCache,
        index: Integer[Array, ""] | int,
        layer: Integer[Array, ""] | int | None = None,
        batch_size: int | None = None,
        valid_length: Integer[Array, ""] | int | None = None,
    ) -> tuple[Float[Array, "seq embed"], KVCache]:
        """Like `__call__` for new positions starting at `index`, reading and extending `cache`
        (this layer's, or slot `layer` of a stacked cache; `valid_length` as in
        [`eqzoo.nn.Attention.decode`][]). `batch_size`, the number of sequences decoded
        together, lets an [`eqzoo.nn.MoE`][] read only the chosen experts
        ([`eqzoo.nn.MoE.decode`][])."""
        h, cache = self.attn.decode(self.attn_norm(x), cache, index, layer, valid_length)
        return self._finish_cached(x, h, batch_size), cache

    def prefill(
        self,
        x: Float[Array, "seq embed"],
        cache: KVCache,
        layer: Integer[Array, ""] | int | None = None,
        batch_size: int | None = None,
        valid_length: Integer[Array, ""] | int | None = None,
    ) -> tuple[Float[Array, "seq embed"], KVCache]:
        """`decode` at index 0, with the attention among the new positions alone
        ([`eqzoo.nn.Attention.prefill`][]): the start of a sequence."""
        h, cache = self.attn.prefill(self.attn_norm(x), cache, layer, valid_length)
        return self._finish_cached(x, h, batch_size), cache

    def _finish_cached(self, x, h, batch_size):
        """The rest of the block after the cached attention's output `h`."""
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        if isinstance(self.mlp, MoE):
            return x + self._post_mlp(self.mlp.decode(self.mlp_norm(x), batch_size))
        return x + self._post_mlp(self.mlp(self.mlp_norm(x)))
