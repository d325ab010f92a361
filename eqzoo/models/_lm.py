"""What every eqzoo causal language model shares: features, logits, KV-cache decoding."""

from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Integer

from .._errors import ShapeError
from ..nn import Embedding, KVCache, LayerNorm, RMSNorm, Stacked, TransformerBlock
from ..nn._attention import check_per_position, softcap
from ..sharding._activation import check_context_split, constrain, constrain_forward
from ._validate import check_cache_span, check_tokens


def segment_positions(segment_ids: Integer[Array, " seq"]) -> Integer[Array, " seq"]:
    """Each position's offset from the start of its segment (a run of equal ids):
    `[1, 1, 1, 2, 2, 0]` gives `[0, 1, 2, 0, 1, 0]`."""
    seq = segment_ids.shape[0]
    index = jnp.arange(seq, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((1,), bool), segment_ids[1:] != segment_ids[:-1]])
    return index - jax.lax.cummax(jnp.where(starts, index, 0))


class AbstractLM(eqx.Module):
    """A decoder-only language model: token ids of one sequence in, next-token logits out.

    Subclasses (`GPT2`, `Llama`) provide the embedding of tokens at positions; this class gives
    the forward pass, the (tied or untied) output head and KV-cache decoding.

    A model of your own gets [`eqzoo.generate`][eqzoo.generation.generate] and
    [`eqzoo.train.lm_loss`][] by subclassing it with the fields `embed` (an
    [`eqzoo.nn.Embedding`][]), `blocks` (an [`eqzoo.nn.Stacked`][] of
    [`eqzoo.nn.TransformerBlock`][]s, or of blocks of your own with the same interface: an
    `attn` that is an [`eqzoo.nn.Attention`][], `__call__(x, *, positions, segment_ids,
    layer)`, and `decode` / `prefill` with `TransformerBlock`'s arguments, which decoding calls;
    docs/getting-started.md, "Your own model"), `final_norm`
    (an [`eqzoo.nn.RMSNorm`][] or [`eqzoo.nn.LayerNorm`][]), `lm_head` (an `Embedding`, or
    `None` to tie the head to `embed`) and `config`, a static field whose `vocab_size` and
    `max_seq` are integers; override `embed_tokens` to add position embeddings. (`lm_loss`
    alone needs only `features(tokens)` and `head_weight()`.)
    """

    embed: eqx.AbstractVar[Embedding]
    blocks: eqx.AbstractVar[Stacked[TransformerBlock]]
    final_norm: eqx.AbstractVar[LayerNorm | RMSNorm]
    lm_head: eqx.AbstractVar[Embedding | None]

    @property
    def max_seq(self) -> int:
        """The longest sequence the model accepts."""
        return self.config.max_seq  # type: ignore[attr-defined]

    def embed_tokens(
        self, tokens: Integer[Array, " seq"], positions: Integer[Array, " seq"]
    ) -> Float[Array, "seq embed"]:
        """Input embeddings of `tokens` at absolute `positions` (overridden by subclasses)."""
        return self.token_embeddings(tokens)

    def token_embeddings(self, tokens: Integer[Array, " seq"]) -> Float[Array, "seq embed"]:
        """Rows of the token embedding table. Under a mesh the table is laid out by the
        `"vocab_table"` activation rule first (gathered over `fsdp`, vocab-parallel over
        `tensor`; see [`eqzoo.sharding.ACTIVATION_RULES`][])."""
        rows = jnp.take(constrain_forward(self.embed.weight, "vocab_table"), tokens, axis=0)
        return constrain(rows, "residual")

    def head_weight(self) -> Float[Array, "vocab embed"]:
        """The output projection: the token embedding when tied, else the separate head."""
        return (self.embed if self.lm_head is None else self.lm_head).weight

    def features(
        self,
        tokens: Integer[Array, " seq"],
        *,
        segment_ids: Integer[Array, " seq"] | None = None,
        positions: Integer[Array, " seq"] | None = None,
    ) -> Float[Array, "seq embed"]:
        """The final normalised hidden states of one sequence (before the output head);
        `segment_ids` / `positions` as for `__call__`."""
        # Checked here too: lm_loss(chunk_size=...) calls features without going through __call__.
        check_tokens(tokens, max_seq=self.max_seq, model=type(self).__name__)
        positions, layer_positions = self._positions(tokens, segment_ids, positions)
        x = self.embed_tokens(tokens, positions)
        x, _ = self.blocks.apply(
            lambda block, h, layer: (block(h, positions=layer_positions, segment_ids=segment_ids, layer=layer), None),
            x, self._layer_indices(),
        )
        return self.final_norm(x)

    def features_and_aux(
        self,
        tokens: Integer[Array, " seq"],
        mask: Float[Array, " seq"] | Bool[Array, " seq"] | None = None,
        *,
        segment_ids: Integer[Array, " seq"] | None = None,
        positions: Integer[Array, " seq"] | None = None,
        per_layer: bool = False,
    ) -> tuple[Float[Array, "seq embed"], dict[str, Float[Array, "*layers"]]]:
        """`features(tokens)` and the blocks' auxiliary statistics over the positions `mask`
        weights, averaged over layers: the router losses of mixture-of-experts layers
        ([`eqzoo.nn.MoE.with_aux`][]); an empty dict for a dense model.
        [`eqzoo.train.lm_loss`][] adds them, weighted by `aux_loss_weights()`.

        With `per_layer=True` each statistic is a `(num_layers,)` array, one value per block in
        order, instead of their mean (which is bit-identical to the default's): to find the
        layers whose routing collapses. Scanned and unrolled layers give the same values."""
        check_tokens(tokens, max_seq=self.max_seq, model=type(self).__name__)
        positions, layer_positions = self._positions(tokens, segment_ids, positions)
        x = self.embed_tokens(tokens, positions)

        def layer(block, h, i):
            return block.with_aux(h, mask, positions=layer_positions, segment_ids=segment_ids, layer=i)

        x, aux = self.blocks.apply(layer, x, self._layer_indices())  # each (layers,)
        if per_layer:
            return self.final_norm(x), aux
        return self.final_norm(x), {name: jnp.mean(v) for name, v in aux.items()}

    def _layer_indices(self) -> Int[Array, " layers"]:
        """Each block's index, given to it as it runs (attention whose window differs by layer
        reads it: Gemma 2 and 3)."""
        self._check_window_layers()
        return jnp.arange(self.blocks.num_layers, dtype=jnp.int32)

    def _check_window_layers(self) -> None:
        # A traced index past the end of the pattern cannot raise inside the scan, so a stack
        # longer than its attention's window_layers is refused here, while shapes are static.
        layers = self.blocks.layers
        pattern = (layers[0] if isinstance(layers, tuple) else layers).attn.window_layers  # static: no slicing
        if pattern is not None and len(pattern) < self.blocks.num_layers:
            raise ShapeError(
                f"{type(self).__name__}: the stack has {self.blocks.num_layers} layers but its "
                f"attention's window_layers covers {len(pattern)}; build the layers with one "
                "window_layers entry per layer."
            )

    def _check_packing(self, tokens, segment_ids, positions) -> None:
        for name, value in (("segment_ids", segment_ids), ("positions", positions)):
            check_per_position(name, value, tokens.shape[0], type(self).__name__)

    def _positions(self, tokens, segment_ids, positions):
        """The positions to embed at, and those the layers need (`None`: `0..seq-1`)."""
        self._check_packing(tokens, segment_ids, positions)
        # Under context parallelism the positions are the sequence's global ones: the program is
        # written for the whole sequence and XLA splits it, iotas and masks included.
        check_context_split(tokens.shape[0], type(self).__name__)
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        if positions is None:
            return jnp.arange(tokens.shape[0], dtype=jnp.int32), None
        positions = positions.astype(jnp.int32)
        self._check_given_positions(positions)
        return positions, positions

    def _check_given_positions(self, positions) -> None:
        """Check positions the caller gave (not those counted from 0 or from a cache index);
        nothing here: a model with a learned position table refuses those it has no row for."""

    def aux_loss_weights(self) -> dict[str, float]:
        """The weight of each auxiliary loss in `features_and_aux` when training (none for a
        dense model)."""
        return {}

    @property
    def logit_softcap(self) -> float | None:
        """If set, the logits are `logit_softcap * tanh(raw / logit_softcap)` (Gemma 2's
        `final_logit_softcapping`); the losses of `eqzoo.train` (such as
        [`lm_loss`][eqzoo.train.lm_loss]) apply it too. `None` here."""
        return None

    def logits(self, features: Float[Array, "seq embed"]) -> Float[Array, "seq vocab"]:
        """Next-token logits from `features`, in the features' dtype (soft-capped in float32
        when the model has a `logit_softcap`)."""
        head = constrain_forward(self.head_weight(), "vocab_table")  # as the lookup reads it
        logits = features @ head.T.astype(features.dtype)
        cap = self.logit_softcap
        if cap is None:
            return logits
        return softcap(logits.astype(jnp.float32), cap).astype(features.dtype)

    @no_type_check  # our own checks below give clearer messages than a generic type error
    def __call__(
        self,
        tokens: Integer[Array, " seq"],
        *,
        segment_ids: Integer[Array, " seq"] | None = None,
        positions: Integer[Array, " seq"] | None = None,
        key=None,
    ) -> Float[Array, "seq vocab"]:
        """Next-token logits for every position of one sequence.

        **Arguments:**

        - `tokens`: integer token ids of one sequence, at most `config.max_seq` long. For a
          batch, `jax.vmap(model)(tokens)`.
        - `segment_ids`: for several documents packed into one row (see
          [`eqzoo.data.pack_documents`][]), the document of each position, as contiguous runs
          of equal integers. Each position then attends only within its own document, and
          positions count from 0 at the start of each run (unless `positions` is given), so
          every document's logits are those it would get alone.
        - `positions`: the position of each token (learned position embeddings, rotary
          angles), in `[0, max_seq)`: GPT-2 refuses concrete ones outside it (traced ones are
          data, not checked: GPT-2 gives NaN rows past its table); default `0, 1, ...`,
          or restarting per segment with `segment_ids`. By convention segment id 0 marks
          padding ([`eqzoo.train.lm_loss`][] does not count it when the batch has no mask).
        - `key`: unused (the models have no dropout); accepted for a uniform signature.

        **Returns:** logits of shape `(seq, vocab)` in the parameters' dtype.
        """
        check_tokens(tokens, max_seq=self.max_seq, model=type(self).__name__)
        # A NumPy array (what the tokenizers and loaders return) is accepted like a JAX one,
        # with type checking on or off: the annotated methods below take JAX arrays.
        tokens, segment_ids, positions = (
            None if a is None else jnp.asarray(a) for a in (tokens, segment_ids, positions)
        )
        if segment_ids is None and positions is None:
            return self._forward(tokens)
        # Checked before `features`, whose jaxtyping annotations would give a generic error.
        self._check_packing(tokens, segment_ids, positions)
        return self.logits(self.features(tokens, segment_ids=segment_ids, positions=positions))

    def _forward(self, tokens: Integer[Array, " seq"]) -> Float[Array, "seq vocab"]:
        return self.logits(self.features(tokens))

    def init_cache(self, max_seq: int | None = None, *, dtype=None, lookahead: int = 0) -> KVCache:
        """An empty KV cache for every layer (arrays with a leading layer axis).

        **Arguments:** `max_seq` positions (default `config.max_seq`); `dtype` (default the
        attention parameters' dtype; `jnp.int8` stores int8 codes with per-position scales,
        [`eqzoo.nn.QuantizedKV`][]); `lookahead`, for sliding-window layers, whose caches are
        rings of `min(max_seq, sliding_window + lookahead)` slots: how far past the next decode index a call
        may write positions that a later call rewrites (see [`eqzoo.nn.Attention.init_cache`][];
        [`eqzoo.generation.generate_speculative`][] sets it).
        """
        max_seq = self.max_seq if max_seq is None else max_seq
        if max_seq > self.max_seq:
            raise ShapeError(
                f"{type(self).__name__}.init_cache({max_seq}) exceeds the config's max_seq={self.max_seq}; "
                "positions past it are undefined. Ask for at most max_seq positions."
            )
        return self.blocks[0].attn.init_cache(max_seq, dtype=dtype, layers=self.blocks.num_layers, lookahead=lookahead)

    def decode(
        self,
        tokens: Integer[Array, " seq"],
        cache: KVCache,
        index: Integer[Array, ""] | int,
        *,
        batch_size: int | None = None,
        valid_length: Integer[Array, ""] | int | None = None,
    ) -> tuple[Float[Array, "seq vocab"], KVCache]:
        """Logits for `tokens` placed at positions `index, index+1, ...`, using and extending
        `cache` (from `init_cache`), which must hold those positions (`index + seq` at most
        its length; checked when `index` is concrete, outside `jit`). Start with the prompt
        (`prefill`, or `decode` at `index=0`), then feed one token at a time. `batch_size`: how many sequences are decoded
        together (the `jax.vmap` around the call), which lets mixture-of-experts layers read
        only the experts the step's tokens chose when they are few ([`eqzoo.nn.MoE.decode`][];
        [`eqzoo.generate`][] passes it). `valid_length`: how many of `tokens` are real, the rest
        right padding that a sliding-window layer's ring need not keep (default: all).

        In a hand-written loop of compiled steps, pass `index` as an array
        (`jnp.int32(i)`): `eqx.filter_jit` makes a Python int static, so every position would
        compile the step again.

        **Returns:** `(logits of shape (seq, vocab), updated cache)`.
        """
        x, cache = self._cached_features(tokens, cache, index, batch_size, valid_length, fresh=False)
        return self.logits(x), cache

    def prefill(
        self,
        tokens: Integer[Array, " seq"],
        cache: KVCache,
        *,
        batch_size: int | None = None,
        valid_length: Integer[Array, ""] | int | None = None,
    ) -> tuple[Float[Array, " vocab"], KVCache]:
        """Start a sequence: write the keys and values of the prompt `tokens` (positions
        `0 .. seq-1`) into `cache`, and return the next-token logits after its last real
        position.

        The same as `decode(tokens, cache, 0)` followed by `logits[valid_length - 1]` (to
        rounding; with a cache narrower than the compute dtype, closer to the forward pass, as
        the prompt attends with its exact keys and values), but cheaper in the two places a
        long prompt costs most:

        - each layer attends among the prompt's positions alone, on its training path
          ([`eqzoo.nn.Attention.prefill`][]: cuDNN's fused kernel on GPU in half precision
          without attention soft-capping, else XLA over `(seq, seq)` scores) rather than
          through XLA over every slot of the cache;
        - the output head runs for one position, not `seq` (a `(seq, vocab)` logits matrix
          is 147 MiB in float32 for a 768-token prompt at GPT-2's vocabulary).

        [`eqzoo.generate`][] and the other decoding loops start with it.

        **Arguments:** `tokens`, the (right-padded) prompt; `cache`, from `init_cache`;
        `batch_size`, `valid_length` (how many of `tokens` are real; default all) as for
        `decode`.

        **Returns:** `(logits of shape (vocab,) for the position after the prompt, updated cache)`.
        """
        x, cache = self._cached_features(tokens, cache, jnp.zeros((), jnp.int32), batch_size, valid_length, fresh=True)
        last = tokens.shape[0] - 1 if valid_length is None else jnp.asarray(valid_length, jnp.int32) - 1
        return self.logits(jax.lax.dynamic_slice_in_dim(x, last, 1))[0], cache

    def _cached_features(self, tokens, cache, index, batch_size, valid_length, *, fresh):
        """The final normalised features of `tokens` at `index, ...` through the cache, and the
        updated cache: `decode`'s and (`fresh`, index 0) `prefill`'s body."""
        name = f"{type(self).__name__}.{'prefill' if fresh else 'decode'}"
        check_tokens(tokens, max_seq=self.max_seq, model=type(self).__name__)
        check_cache_span(tokens.shape[0], index, valid_length, cache.max_seq, name)
        if cache.max_seq > self.max_seq:  # a cache not from init_cache: positions past max_seq
            raise ShapeError(
                f"{name}: the cache covers {cache.max_seq} positions but the config allows at "
                f"most max_seq={self.max_seq}; build it with model.init_cache(n), n <= max_seq."
            )
        index = jnp.asarray(index, dtype=jnp.int32)
        positions = index + jnp.arange(tokens.shape[0], dtype=jnp.int32)
        x = self.embed_tokens(tokens, positions)

        # The stacked cache rides in the carry and each layer writes its new keys/values into its
        # own slot in place; as per-layer scan outputs it would be rewritten whole every token.
        # The indices are numpy: unrolled layers get Python ints (a mixed stack's cache slots are
        # then chosen at trace time), scanned ones a traced index.
        def step(block, carry, layer):
            h, cache = carry
            layer = int(layer) if isinstance(layer, np.generic) else layer
            if fresh:
                return block.prefill(h, cache, layer, batch_size, valid_length), None
            return block.decode(h, cache, index, layer, batch_size, valid_length), None

        self._check_window_layers()
        layers = np.arange(self.blocks.num_layers, dtype=np.int32)
        # pipeline=False: a pipeline would ship the whole stacked cache from stage to stage.
        (x, cache), _ = self.blocks.apply(step, (x, cache), layers, pipeline=False)
        return self.final_norm(x), cache
