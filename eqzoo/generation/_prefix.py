"""Prefix caching for continuous batching: a prompt prefix many requests share (a system
prompt, few-shot examples, a chat template's header) prefilled once, its keys and values
copied into each slot that starts with it, so that only the rest of a prompt is prefilled
(as vLLM's automatic prefix caching and SGLang's RadixAttention reuse a shared prefix)."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError, ShapeError
from ..nn._attention import KVCache, ring_positions
from ._generate import decoding_model
from ._stream import _join_model


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix:
    """A prompt prefix prefilled once by [`eqzoo.generation.DecodeEngine.prefill_prefix`][],
    for requests that start with it: `engine.insert(..., prefix=prefix)` or
    `Request(..., prefix=prefix)`, their `prompt` then the tokens after it. Immutable: one
    prefix serves any number of requests, at once or one after another.

    - `tokens`: int32 NumPy `(length,)`, the prefix's token ids.
    - `cache`: its keys and values, every layer's ([`eqzoo.nn.KVCache`][], `width` positions:
      the prefix's prompt bucket; the rows past `length` are padding). Every layer keeps its
      positions in order, sliding-window layers too (the engine turns those into a slot's
      ring when it copies them).
    - `engine`: the [`eqzoo.generation.DecodeEngine`][] that made it, the only one that takes
      it (the keys and values are its model's, in its cache dtype).
    """

    tokens: np.ndarray
    cache: KVCache
    engine: Any = dataclasses.field(repr=False)

    @property
    def length(self) -> int:
        """How many tokens the prefix holds."""
        return int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        """The bucket its cache is padded to (requests whose prefixes share it share programs)."""
        return int(self.cache.keys.shape[-3])


@functools.partial(jax.jit, static_argnames=("skeleton", "unroll_layers", "cache_dtype"))
def _prefill_prefix(arrays, tokens, length, *, skeleton, unroll_layers, cache_dtype) -> KVCache:
    """The keys and values of the prefix `tokens` (`(width,)`, `length` real), every layer's
    in position order: a cache of `width` positions with no rings (a `lookahead` of `width`
    makes a windowed layer's ring as long as the cache). The length is traced: every prefix
    of one bucket runs this one program."""
    model = decoding_model(_join_model(arrays, skeleton), unroll_layers)
    width = tokens.shape[0]
    cache = model.init_cache(width, dtype=cache_dtype, lookahead=width)
    _, cache = model.prefill(tokens, cache, batch_size=1, valid_length=length)  # the unused logits are compiled away
    return cache


def prefixed_rows(model, template: KVCache, suffixes, lengths, prefix_tokens, prefix_lengths, prefix_caches, cache_dtype) -> tuple:
    """Prefill each of `suffixes` (`(n, bucket)`, `lengths` real tokens) after its prefix
    (`prefix_tokens` `(n, width)`, `prefix_lengths` real, `prefix_caches` stacked on `n`):
    `(next-token logits, caches shaped as a slot's (template: the state's cache), joined
    prompts, their lengths)`, one row each, the logits and caches as `_insert`'s prefill gives
    them for the joined prompt (`(n, width + bucket)`, its first `prefix_lengths + lengths`
    tokens real; padding 0).

    The suffix runs through `decode` at the positions after the prefix, over a cache of
    `max_len` positions in order holding the prefix's rows. Its `bucket`-wide chunk must fit
    in the cache: where the prefix ends later than `max_len - bucket`, the chunk starts
    earlier and recomputes the prefix's last tokens (the same keys and values, to rounding),
    so that padding never runs past `max_len`. Windowed layers then keep the slot's ring:
    each ring slot takes the latest position of the joined prompt that lives there."""
    max_len, bucket = template.max_seq, suffixes.shape[1]
    leaves, treedef = jax.tree.flatten(template)

    def row(suffix, length, tokens, plen, pcache):
        total = plen + length
        start = jnp.minimum(plen, max_len - bucket)  # the chunk's first position: start + bucket <= max_len
        i = jnp.arange(tokens.shape[0] + bucket, dtype=jnp.int32)
        joined = jnp.where(i < plen, tokens[jnp.minimum(i, tokens.shape[0] - 1)], suffix[jnp.clip(i - plen, 0, bucket - 1)])
        joined = jnp.where(i < total, joined, 0)  # padding read as token 0, as `_insert`'s
        chunk = jax.lax.dynamic_slice_in_dim(joined, start, bucket)
        fresh = model.init_cache(max_len, dtype=cache_dtype, lookahead=max_len)  # no rings
        fresh_leaves, fresh_def = jax.tree.flatten(fresh)
        work = fresh_def.unflatten([
            jax.lax.dynamic_update_slice_in_dim(f, p, 0, axis=1) for f, p in zip(fresh_leaves, jax.tree.leaves(pcache), strict=True)
        ])
        x, work = model._cached_features(chunk, work, start, 1, total - start, fresh=False)
        last = model.logits(jax.lax.dynamic_slice_in_dim(x, total - start - 1, 1))[0]

        def as_slot(w, t):  # t: the state's leaf, (slots, layers, positions, ...)
            if t.shape[2] == max_len:
                return w
            ring = jnp.maximum(ring_positions(total - 1, t.shape[2]), 0)  # a never-written slot is masked
            return jnp.take(w, ring, axis=1)

        cache = treedef.unflatten([as_slot(w, t) for w, t in zip(jax.tree.leaves(work), leaves, strict=True)])
        return last, cache, joined, total

    return jax.vmap(row)(suffixes, lengths, prefix_tokens, prefix_lengths, prefix_caches)


def check_prefix(prefix, engine, who: str) -> None:
    """Refuse a `prefix` that is not one of `engine`'s `Prefix`es."""
    if not isinstance(prefix, Prefix):
        raise ConfigError(
            f"{who}: prefix must be an eqzoo.generation.Prefix from engine.prefill_prefix(tokens), got "
            f"{type(prefix).__name__}; to serve a plain prompt, pass the whole prompt and no prefix."
        )
    if prefix.engine is not engine:
        raise ConfigError(
            f"{who}: this prefix was made by another DecodeEngine (its keys and values are that engine's "
            "model's, in its cache dtype); make it with this engine's prefill_prefix(tokens)."
        )


def check_prefix_tokens(tokens, vocab: int, max_len: int, widest: int, who: str) -> np.ndarray:
    """The prefix `tokens` as a host int32 array, after checking them."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.shape[0] < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShapeError(f"{who} takes one prefix of at least one integer token id, shape (seq,); got shape "
                         f"{tokens.shape} of dtype {tokens.dtype}.")
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ConfigError(f"{who}: the prefix holds ids outside the model's vocabulary [0, {vocab}).")
    longest = min(max_len - 2, widest)
    if tokens.shape[0] > longest:
        raise ShapeError(
            f"{who}: a prefix of {tokens.shape[0]} tokens is too long for this engine: at most {longest} (max_len="
            f"{max_len} leaves room for a prompt token and a new one after it, and the largest prompt bucket is "
            f"{widest}); shorten the prefix or build the engine with a larger max_len or prompt bucket."
        )
    return tokens.astype(np.int32)
