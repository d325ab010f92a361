"""The decode step of continuous batching: the state every slot keeps between calls, and the
compiled program that advances every active slot by up to `steps` tokens (each slot's own
sampling settings, repetition penalty, logit bias, stops and log-probabilities, all traced)."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key

from ..nn._attention import KVCache
from ._generate import decoding_model
from ._sampling import filter_logits
from ._stream import _join_model


class DecodeState(eqx.Module):
    """The immutable state of a [`eqzoo.generation.DecodeEngine`][]: every slot's KV cache and
    decoding settings, stacked on a leading `slots` axis. `insert` and `step` return a new one
    (and donate the old one: use only the state they return).

    - `cache`: each slot's KV cache ([`eqzoo.nn.KVCache`][] of `max_len` positions, its arrays
      with a leading `slots` axis).
    - `logits`: float32 `(slots, vocab)`, the next-token logits of each slot.
    - `position`: int32 `(slots,)`, where each slot's next token goes (its prompt length plus
      the tokens generated so far).
    - `remaining`: int32 `(slots,)`, how many tokens each slot may still generate.
    - `active`: bool `(slots,)`, which slots are decoding (a free or finished slot is not).
    - `key`: `(slots,)` PRNG keys, each slot's own.
    - `temperature`, `top_p`, `min_p`: float32 `(slots,)` (0 greedy; 1 and 0 filter nothing);
      `top_k`: int32 `(slots,)` (the vocabulary size filters nothing).
    - `eos`: int32 `(slots, stop_ids)`, each slot's stop ids, `-1` where it has fewer.
    - `stops`: int32 `(slots, stop_sequence_count, stop_sequence_length)`, each slot's stop
      sequences, each at the end of its row after `-1`s; a row of `-1`s is no sequence.
    - `recent`: int32 `(slots, stop_sequence_length)`, each slot's last generated tokens
      (oldest first; `-1` before its first), which the stop sequences are matched against.
    - `repetition_penalty`: float32 `(slots,)` (1 is off).
    - `seen`: bool `(slots, vocab)`, the ids each slot's prompt and tokens hold (what its
      repetition penalty applies to): one byte per slot and vocabulary entry, a quarter of
      `logits`.
    - `bias_ids`, `bias`: int32 and float32 `(slots, logit_bias_ids)`, each slot's
      `logit_bias` as ids and the biases added to their logits (`vocab` where it has fewer:
      an id that adds nothing).
    - `return_logprobs`: bool `(slots,)`, which slots report their tokens' log-probabilities.
    """

    cache: KVCache
    logits: Float[Array, "slots vocab"]
    position: Int[Array, " slots"]
    remaining: Int[Array, " slots"]
    active: Bool[Array, " slots"]
    key: Key[Array, " slots"]
    temperature: Float[Array, " slots"]
    top_k: Int[Array, " slots"]
    top_p: Float[Array, " slots"]
    min_p: Float[Array, " slots"]
    eos: Int[Array, "slots stop_ids"]
    stops: Int[Array, "slots stop_sequences stop_length"]
    recent: Int[Array, "slots stop_length"]
    repetition_penalty: Float[Array, " slots"]
    seen: Bool[Array, "slots vocab"]
    bias_ids: Int[Array, "slots bias_ids"]
    bias: Float[Array, "slots bias_ids"]
    return_logprobs: Bool[Array, " slots"]


def _slot_settings(state: DecodeState) -> tuple:
    return state.temperature, state.top_k, state.top_p, state.min_p


def _sample(logits, key, temperature, top_k, top_p, min_p, *, filtered: bool):
    """One slot's sampled token, as `generate` draws it (`filter_logits`, then a categorical
    draw) with its settings traced: top-k by the `top_k`-th largest logit (the vocabulary size
    keeps all), top-p of 1 as no filter (a bound of 2 keeps every token exactly)."""
    x = logits.astype(jnp.float32)
    x = (x - jnp.max(x)) / jnp.where(temperature > 0, temperature, 1.0)
    if filtered:  # x's largest is 0, so filter_logits' own shift and a temperature of 1 leave it exact
        kth = jnp.sort(x)[x.shape[0] - top_k]
        x = jnp.where(x < kth, jnp.finfo(jnp.float32).min, x)
        x = filter_logits(x, 1.0, None, jnp.where(top_p < 1.0, top_p, 2.0), min_p)
    else:
        x = filter_logits(x, 1.0, None, None, min_p)
    return jax.random.categorical(key, x).astype(jnp.int32)


def _scores(state: DecodeState) -> Float[Array, "slots vocab"]:
    """The logits each slot's token is chosen from, in `generate`'s order: its repetition
    penalty on the ids its prompt and tokens hold (`penalize_repeats`), then its `logit_bias`
    added. Each runs only when a live slot asks for it; a penalty of 1 and no bias leave a
    slot's logits exactly as they are."""
    live, slots, vocab = state.active, state.logits.shape[0], state.logits.shape[1]
    penalty = state.repetition_penalty[:, None]

    def penalize(x):
        return jnp.where(state.seen, jnp.where(x < 0, x * penalty, x / penalty), x)

    def bias(x):  # ids `vocab` (no entry) are dropped
        return x.at[jnp.arange(slots)[:, None], state.bias_ids].add(state.bias, mode="drop")

    same = lambda x: x  # noqa: E731
    x = jax.lax.cond(jnp.any(live & (state.repetition_penalty != 1.0)), penalize, same, state.logits)
    return jax.lax.cond(jnp.any(live & jnp.any(state.bias_ids < vocab, axis=-1)), bias, same, x)


def _logprobs(state: DecodeState, tok) -> Float[Array, " slots"]:
    """Each slot's log-probability of `tok` under its model's own distribution (the log-softmax
    of its raw logits, as `generate`'s `return_logprobs`: before the penalty, the bias,
    temperature and the filters); 0 where a slot does not report them or emits nothing.
    Computed only when a live slot asks for them."""
    want = state.active & state.return_logprobs

    def computed():
        logp = jax.nn.log_softmax(state.logits, axis=-1)
        return jnp.take_along_axis(logp, jnp.maximum(tok, 0)[:, None], axis=1)[:, 0]

    logp = jax.lax.cond(jnp.any(want), computed, lambda: jnp.zeros(want.shape, jnp.float32))
    return jnp.where(want, logp, 0.0)


def _choose(state: DecodeState, scores, keys) -> Int[Array, " slots"]:
    """Every slot's next token from its `scores` (`_scores`): greedy where its temperature is
    0. The sampling and the sort the top-k / top-p filters need run only when a live slot asks
    for them."""
    greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    temperature, top_k, top_p, _ = _slot_settings(state)
    sampling = state.active & (temperature > 0)
    filtering = sampling & ((top_k < scores.shape[-1]) | (top_p < 1.0))

    def sampled(filtered):
        draw = jax.vmap(functools.partial(_sample, filtered=filtered))
        return lambda: jnp.where(temperature > 0, draw(scores, keys, *_slot_settings(state)), greedy)

    branches = (lambda: greedy, sampled(False), sampled(True))
    return jax.lax.switch(jnp.any(sampling).astype(jnp.int32) + jnp.any(filtering).astype(jnp.int32), branches)


def _advance(model, state: DecodeState) -> tuple[DecodeState, Int[Array, " slots"], Float[Array, " slots"]]:
    """One token for every active slot (`-1` for the others) and its log-probability (0 where
    a slot does not report them), and each token decoded into its cache. Inactive slots decode
    too (the shape is fixed), at a clamped position: their cache is replaced whole when a
    request next lands there."""
    slots, max_len, vocab = state.position.shape[0], state.cache.max_seq, state.logits.shape[1]
    split = jax.vmap(jax.random.split)(state.key)  # as generate's rows: (key, sub) per token
    live = state.active
    tok = jnp.where(live, _choose(state, _scores(state), split[:, 1]), -1)
    logp = _logprobs(state, tok)
    seen = state.seen.at[jnp.arange(slots), jnp.where(live, tok, vocab)].set(True, mode="drop")
    remaining = state.remaining - live.astype(jnp.int32)
    recent = jnp.concatenate([state.recent[:, 1:], tok[:, None]], axis=1)  # (slots, stop_length)
    # a stop sequence matches where each of its ids does (its -1 padding matches anything);
    # a row of -1s (its last id -1) is no sequence
    ends = jnp.all((state.stops < 0) | (recent[:, None, :] == state.stops), axis=-1) & (state.stops[..., -1] >= 0)
    # (slots, stop_ids) and (slots, stop_sequence_count): reduced apart, their widths may differ
    stopped = (jnp.any(tok[:, None] == state.eos, axis=-1) | jnp.any(ends, axis=-1)) & live | (remaining <= 0)

    def decode(tok, cache, position):
        logits, cache = model.decode(tok[None], cache, position, batch_size=slots)
        return logits[0].astype(jnp.float32), cache

    at = jnp.minimum(state.position, max_len - 1)
    logits, cache = jax.vmap(decode)(jnp.maximum(tok, 0), state.cache, at)
    state = dataclasses.replace(
        state, cache=cache, logits=logits, position=state.position + live.astype(jnp.int32), remaining=remaining,
        active=live & ~stopped, key=split[:, 0], recent=recent, seen=seen,
    )
    return state, tok, logp


@functools.partial(jax.jit, static_argnames=("skeleton", "unroll_layers", "steps"), donate_argnums=0)
def _step(state, arrays, *, skeleton, unroll_layers, steps):
    """Up to `steps` decode steps (fewer once no slot is active): the state, `(slots, steps)`
    tokens (`-1` where a slot emitted none), their `(slots, steps)` log-probabilities (0 where
    a slot does not report them) and which slots are still active (a buffer of its own, which
    a host may read after the state is donated to the next call)."""
    model = decoding_model(_join_model(arrays, skeleton), unroll_layers)
    tokens = jnp.full((state.position.shape[0], steps), -1, jnp.int32)
    logps = jnp.zeros((state.position.shape[0], steps), jnp.float32)

    def cond(carry):
        i, state, *_ = carry
        return (i < steps) & jnp.any(state.active)

    def body(carry):
        i, state, tokens, logps = carry
        state, tok, logp = _advance(model, state)
        put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], i, axis=1)  # noqa: E731
        return i + 1, state, put(tokens, tok), put(logps, logp)

    _, state, tokens, logps = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, tokens, logps))
    return state, tokens, logps, jnp.copy(state.active)
