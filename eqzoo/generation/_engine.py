"""Continuous batching: a fixed number of decode slots, each holding one request at its own
position, filled by a prefill program per prompt-length bucket and advanced together by one
decode program of fixed shape (Yu et al., 2022, "Orca"; vLLM and JetStream serve this way).

This module is the engine and its admission side (checking a request, prefilling it into a
slot); the decode step it runs is `_decode_step`'s."""

import functools
import math
from collections.abc import Mapping, Sequence
from typing import no_type_check

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Integer

from .._errors import ConfigError, ShapeError, as_flag, shape_str
from .._typing import PRNGKey
from ..models._lm import AbstractLM
from ..nn._attention import check_cache_dtype
from ._decode_step import DecodeState, _step
from ._generate import (
    check_count,
    check_key,
    check_model,
    decoding_model,
    loop_key,
    resolve_unroll,
    typed_key,
)
from ._prefix import Prefix, _prefill_prefix, check_prefix, check_prefix_tokens, prefixed_rows
from ._processors import logit_bias_vector
from ._prompts import as_prompts
from ._sampling import check_sampling, check_stop_sequences, check_stop_tokens, top_k_setting
from ._speculative import _dropless
from ._stream import _join_model, _split_model


@functools.cache
def _state_key_dtype():
    """The dtype of the keys `_init` gives the slots: the default PRNG implementation's."""
    return jax.eval_shape(lambda: jax.random.key(0)).dtype


@functools.partial(jax.jit, static_argnames=("skeleton", "slots", "max_len", "cache_dtype", "stop_ids", "stop_shape", "bias_ids"))
def _init(arrays, *, skeleton, slots, max_len, cache_dtype, stop_ids, stop_shape, bias_ids) -> DecodeState:
    model = _join_model(arrays, skeleton)
    one = model.init_cache(max_len, dtype=cache_dtype)
    vocab = model.config.vocab_size
    zeros = lambda dtype: jnp.zeros((slots,), dtype)  # noqa: E731
    return DecodeState(
        cache=jax.tree.map(lambda a: jnp.zeros((slots, *a.shape), a.dtype), one),
        logits=jnp.zeros((slots, vocab), jnp.float32), position=zeros(jnp.int32), remaining=zeros(jnp.int32),
        active=zeros(bool), key=jax.random.split(jax.random.key(0), slots), temperature=zeros(jnp.float32),
        top_k=jnp.full((slots,), vocab, jnp.int32), top_p=jnp.ones((slots,), jnp.float32), min_p=zeros(jnp.float32),
        eos=jnp.full((slots, stop_ids), -1, jnp.int32), stops=jnp.full((slots, *stop_shape), -1, jnp.int32),
        recent=jnp.full((slots, stop_shape[1]), -1, jnp.int32), repetition_penalty=jnp.ones((slots,), jnp.float32),
        seen=jnp.zeros((slots, vocab), bool), bias_ids=jnp.full((slots, bias_ids), vocab, jnp.int32),
        bias=jnp.zeros((slots, bias_ids), jnp.float32), return_logprobs=zeros(bool),
    )


@functools.partial(jax.jit, static_argnames=("skeleton", "unroll_layers", "cache_dtype"), donate_argnums=0)
def _insert(state, arrays, slots, prompts, lengths, requests, *, skeleton, unroll_layers, cache_dtype) -> DecodeState:
    """Prefill each of `prompts` (`(n, bucket)`, `lengths` real tokens each) into a fresh cache
    and write it, its next-token logits and its request's settings (`requests`: each a leading
    `n` axis) into row `slots[i]` of `state`, all rows in one scatter. A slot index past the
    last (a padding row of the admission batch) writes nothing."""
    model = decoding_model(_join_model(arrays, skeleton), unroll_layers)

    def prefill(prompt, length):  # as generate_batch's rows prefill (padding read as token 0)
        prompt = jnp.where(jnp.arange(prompt.shape[0]) < length, prompt, 0)
        cache = model.init_cache(state.cache.max_seq, dtype=cache_dtype)
        return model.prefill(prompt, cache, batch_size=1, valid_length=length)

    last, cache = jax.vmap(prefill)(prompts, lengths)  # each row a batch of one, as generate's
    return _admitted(state, slots, last, cache, prompts, lengths, requests)


@functools.partial(jax.jit, static_argnames=("skeleton", "unroll_layers", "cache_dtype"), donate_argnums=0)
def _insert_prefixed(
    state, arrays, slots, suffixes, lengths, prefix_tokens, prefix_lengths, prefix_caches, requests, *, skeleton,
    unroll_layers, cache_dtype,
) -> DecodeState:
    """`_insert` for prompts that follow a prefix (`prefix_tokens`, `prefix_lengths` and the
    lists of `n` prefix caches, one per row, all of one width): each slot's cache starts as
    its prefix's rows, and only the suffix is prefilled (`prefixed_rows`)."""
    model = decoding_model(_join_model(arrays, skeleton), unroll_layers)
    caches = jax.tree.map(lambda *rows: jnp.stack(rows), *prefix_caches)  # stacked here: no dispatch of its own
    last, cache, joined, total = prefixed_rows(
        model, state.cache, suffixes, lengths, prefix_tokens, prefix_lengths, caches, cache_dtype
    )
    return _admitted(state, slots, last, cache, joined, total, requests)


def _admitted(state, slots, last, cache, prompts, lengths, requests) -> DecodeState:
    """`state` with row `slots[i]` holding admitted request `i`: its prefilled `cache`, the
    next-token logits `last`, its whole prompt (`prompts[i]`, a prefix's tokens included, its
    first `lengths[i]` real: the slot's next position, and the ids its repetition penalty
    starts from) and its settings (`requests`), all rows in one scatter; slot `slots`
    (padding) writes nothing."""
    keys = jax.vmap(lambda key: jax.random.split(key, 1)[0])(jnp.stack(requests["key"]))  # generate's row key: sampling matches it
    put = lambda rows, new: rows.at[slots].set(new, mode="drop")  # noqa: E731
    n, vocab = slots.shape[0], state.seen.shape[1]

    def seen(prompt, length):  # the ids the prompt holds, as generate's `seen` starts (padding: id vocab, dropped)
        real = jnp.where(jnp.arange(prompt.shape[0]) < length, prompt, vocab)
        return jnp.zeros((vocab,), bool).at[real].set(True, mode="drop")

    return DecodeState(
        cache=jax.tree.map(put, state.cache, cache), logits=put(state.logits, last.astype(jnp.float32)),
        position=put(state.position, lengths), remaining=put(state.remaining, requests["max_new_tokens"]),
        active=put(state.active, jnp.ones((n,), bool)), key=put(state.key, keys),
        temperature=put(state.temperature, requests["temperature"]), top_k=put(state.top_k, requests["top_k"]),
        top_p=put(state.top_p, requests["top_p"]), min_p=put(state.min_p, requests["min_p"]),
        eos=put(state.eos, requests["eos"]), stops=put(state.stops, requests["stops"]),
        recent=put(state.recent, jnp.full((n, state.recent.shape[1]), -1, jnp.int32)),
        repetition_penalty=put(state.repetition_penalty, requests["repetition_penalty"]),
        seen=put(state.seen, jax.vmap(seen)(prompts, lengths)), bias_ids=put(state.bias_ids, requests["bias_ids"]), bias=put(state.bias, requests["bias"]),
        return_logprobs=put(state.return_logprobs, requests["return_logprobs"]),
    )


def _named(error: ConfigError | ShapeError, who: str) -> ConfigError | ShapeError:
    """`error` with its message starting `"{who}: "`, as every refusal of a request does
    (`error` itself where it does already; the shared sampling checks name no caller)."""
    message = str(error)
    return error if message.startswith(f"{who}: ") else type(error)(f"{who}: {message}")


def _check_prompt(prompt: np.ndarray, who: str) -> None:
    """Refuse anything but one non-empty prompt of integer ids, with the fix for each case."""
    several = ("give each its own Request" if who == "serve" else "insert each into its own slot")
    if prompt.ndim != 1 or prompt.shape[0] < 1:
        raise ShapeError(f"{who}: a prompt is one sequence of at least one integer token id, shape (seq,); got "
                         f"{shape_str(prompt.shape)}. For several prompts, {several}.")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ShapeError(f"{who}: a prompt is one sequence of at least one integer token id, shape (seq,); got dtype "
                         f"{prompt.dtype}. Token ids are integers: pass the tokenizer's ids, or cast with .astype(np.int32).")


def _buckets(prompt_buckets, max_len: int) -> tuple[int, ...]:
    """The prompt widths prefill compiles for: powers of two from 16, then `max_len - 1` (the
    longest prompt that leaves room for one token); or the user's, checked."""
    if prompt_buckets is None:
        widths = [2**i for i in range(4, max(4, math.ceil(math.log2(max(max_len - 1, 1)))) + 1)]
        return tuple(sorted({w for w in widths if w < max_len - 1} | {max_len - 1}))
    widths = list(prompt_buckets)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int | np.integer) or not 1 <= w < max_len for w in widths):
        raise ConfigError(
            f"DecodeEngine: prompt_buckets must be integers in [1, max_len - 1 = {max_len - 1}] (a prompt needs room "
            f"for one new token), got {prompt_buckets!r}."
        )
    return tuple(sorted({int(w) for w in widths}))


class DecodeEngine:
    """Continuous batching (Yu et al., 2022, "Orca: A Distributed Serving System for
    Transformer-Based Generative Models"): `slots` rows decoded together, each holding one
    request at its own position. A new request is prefilled into a free slot while the others
    keep their place; a finished request frees its slot at once, so no row waits for the
    longest of a batch as in [`eqzoo.generation.generate_batch`][].

    The engine holds the model and the compiled programs; the decoding state is a separate,
    immutable [`eqzoo.generation.DecodeState`][] that `init_state`, `insert` and `step`
    return (each donates the state it is given: keep only the new one).
    [`eqzoo.generation.serve`][] runs the host loop (admit, step, stream, free).

    With greedy decoding each request's tokens equal [`eqzoo.generate`][]'s for its prompt alone
    (as `generate_batch`'s rows do, to the last bit on CPU), whatever slot it lands in and
    whatever its neighbours do; sampling with a request's `key` draws the tokens
    `eqzoo.generate` draws with that key and the same settings.

    Compiled programs: one `insert` per prompt bucket (prompts of lengths within one bucket
    share it) and admission batch size (`serve` prefills the requests it admits together:
    1, 2, 4, ... up to `slots` prompts a program, padded with rows that write nothing), one
    `step` per `steps`; with prefixes (`prefill_prefix`), one prefix prefill per prompt bucket
    and one `insert` per (prompt bucket, prefix bucket, admission size). Sampling settings,
    stop ids, stop sequences (within the engine's `stop_sequence_count` and
    `stop_sequence_length`), repetition penalties, logit biases
    (within `logit_bias_ids`), whether a request reports log-probabilities, budgets and keys
    are arguments: a new value compiles nothing.

    Per-request repetition penalties and logit biases give the greedy tokens `eqzoo.generate`
    gives with the same settings. The penalty keeps a `(slots, vocab)` bool table of the ids
    each slot has seen (one byte an entry: a quarter of the `(slots, vocab)` float32 logits
    the state holds anyway); a bias is `logit_bias_ids` (id, value) pairs per slot. A step
    runs the penalty, the bias and the log-probabilities only when a live slot asks for them.

    Mixture-of-experts layers that run `"capacity"` run `"dense"` here (the same weights; see
    [`eqzoo.nn.MoE`][]): a capacity router would drop a prompt's assignments depending on
    the bucket it is padded to. So no assignment is ever dropped, and a request's tokens are
    those `eqzoo.generate` gives for it with `model.with_moe_implementation("dense")` (the
    same as with `"capacity"` wherever its prefill drops nothing: decoding steps never drop).
    """

    @no_type_check  # validated here, with messages that say how to fix the call
    def __init__(
        self,
        model: AbstractLM,
        *,
        slots: int,
        max_len: int,
        cache_dtype=None,
        prompt_buckets: Sequence[int] | None = None,
        steps_per_call: int = 8,
        stop_ids: int = 4,
        stop_sequence_count: int = 4,
        stop_sequence_length: int = 8,
        logit_bias_ids: int = 16,
        unroll_layers: bool | str = "auto",
    ):
        """**Arguments:**

        - `model`: an eqzoo language model ([`eqzoo.models.AbstractLM`][]).
        - `slots`: how many requests decode at once (the decode program's batch).
        - `max_len`: positions per slot: a request's prompt plus its `max_new_tokens` must fit.
          At most the model's `max_seq`.
        - `cache_dtype`: the KV cache's dtype, as in [`eqzoo.generation.generate_batch`][].
        - `prompt_buckets`: the widths prompts are padded to before prefill, one compiled
          `insert` each (default: powers of two from 16, and `max_len - 1`).
        - `steps_per_call`: decode steps per `step` call (default 8): one host round trip
          hands over up to this many tokens per slot. A slot that finishes mid-call idles for
          the rest of it; more steps cost fewer round trips.
        - `stop_ids`: the most eos ids one request may give (a static width; default 4).
        - `stop_sequence_count`, `stop_sequence_length`: the most stop sequences one request
          may give (default 4), and the longest (default 8 tokens): static widths.
        - `logit_bias_ids`: the most ids one request's `logit_bias` may bias (a static width;
          default 16).
        - `unroll_layers`: as in [`eqzoo.generation.generate_batch`][].
        """
        check_model(model, "DecodeEngine")
        counts = dict(slots=slots, max_len=max_len, steps_per_call=steps_per_call, stop_ids=stop_ids,
                      stop_sequence_count=stop_sequence_count, stop_sequence_length=stop_sequence_length,
                      logit_bias_ids=logit_bias_ids)
        for name, value in counts.items():
            check_count(value, name, "DecodeEngine")
        if not 2 <= max_len <= model.max_seq:
            raise ShapeError(
                f"DecodeEngine: max_len={max_len} must lie in [2, the model's max_seq={model.max_seq}] (a prompt "
                "token and a new one at least); lower max_len or build the model with a larger max_seq."
            )
        self.model = model
        self.slots, self.max_len, self.steps_per_call, self.stop_ids = int(slots), int(max_len), int(steps_per_call), int(stop_ids)
        self.stop_shape = (int(stop_sequence_count), int(stop_sequence_length))
        self.logit_bias_ids = int(logit_bias_ids)
        # prompts prefilled by one program: 1, 2, 4, ... and `slots`
        self.admission_sizes = tuple(sorted({2**i for i in range(self.slots.bit_length()) if 2**i < self.slots} | {self.slots}))
        self.cache_dtype = None if cache_dtype is None else check_cache_dtype(cache_dtype, None)
        self.prompt_buckets = _buckets(prompt_buckets, self.max_len)
        self.unroll_layers = resolve_unroll(unroll_layers)
        self._arrays, self._skeleton = _split_model(_dropless(model))

    def init_state(self) -> DecodeState:
        """A state with every slot free."""
        return _init(self._arrays, skeleton=self._skeleton, slots=self.slots, max_len=self.max_len,
                     cache_dtype=self.cache_dtype, stop_ids=self.stop_ids, stop_shape=self.stop_shape,
                     bias_ids=self.logit_bias_ids)

    def bucket(self, length: int) -> int:
        """The width a prompt of `length` tokens is padded to (the smallest bucket that holds it)."""
        return self._bucket(length, "DecodeEngine")

    def _bucket(self, length: int, who: str) -> int:
        """`bucket`, its error naming `who`."""
        for width in self.prompt_buckets:
            if length <= width:
                return width
        raise ShapeError(
            f"{who}: a prompt of {length} tokens is longer than the largest prompt bucket "
            f"({self.prompt_buckets[-1]}); pass prompt_buckets with a wider one or shorten the prompt."
        )

    @no_type_check  # validated here, with messages that say how to fix the call
    def prefill_prefix(self, tokens: Integer[Array, " seq"]) -> Prefix:
        """Prefill a prompt prefix that many requests share (a system prompt, few-shot
        examples, a chat template's header) once, for `insert(..., prefix=...)` and
        `Request(..., prefix=...)`: each request that names it gets the prefix's keys and values
        copied into its slot and prefills only its own `prompt`, at the positions after the
        prefix. Its tokens are those of serving `prefix + prompt` as one prompt (greedy: equal
        to [`eqzoo.generation.generate_batch`][]'s for the joined prompt, tested on CPU; the
        logits to float rounding, as the prompt runs through `decode` over the cached rows),
        and repetition penalties count the prefix's ids as prompt ids.

        The prefix is padded to a prompt bucket and prefilled by one compiled program per
        bucket (its length traced: another prefix of the bucket compiles nothing); requests with
        a prefix prefill in one `insert` program per (prompt bucket, prefix bucket, admission
        size), their prefix lengths traced too. The prompt after the prefix is bucketed as a
        plain prompt is, and `prefix + prompt + max_new_tokens` must fit `max_len`. The prefix
        holds its bucket's positions of every layer, windowed ones in position order too (an
        admission after a prefix builds each slot's cache at full length, then turns its
        windowed layers into the slot's rings).

        **Arguments:**

        - `tokens`: the prefix's token ids, 1-D, at least one and at most `max_len - 2` (room
          for a prompt token and a new one) and the largest prompt bucket.

        **Returns:** an immutable [`eqzoo.generation.Prefix`][] (this engine's only).
        """
        who = "DecodeEngine.prefill_prefix"
        tokens = check_prefix_tokens(as_prompts(tokens, who), self.model.config.vocab_size, self.max_len,
                                     self.prompt_buckets[-1], who)
        padded = np.zeros((self.bucket(tokens.shape[0]),), np.int32)
        padded[: tokens.shape[0]] = tokens
        cache = _prefill_prefix(self._arrays, padded, np.int32(tokens.shape[0]), skeleton=self._skeleton,
                                unroll_layers=self.unroll_layers, cache_dtype=self.cache_dtype)
        tokens.setflags(write=False)
        return Prefix(tokens, cache, self)

    @no_type_check  # validated here, with messages that say how to fix the call
    def insert(
        self,
        state: DecodeState,
        slot: int,
        prompt: Integer[Array, " seq"],
        *,
        max_new_tokens: int,
        key: PRNGKey | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        eos_token: int | Sequence[int] | None = None,
        stop_sequences: Sequence[Sequence[int]] | None = None,
        repetition_penalty: float = 1.0,
        logit_bias: Mapping[int, float] | None = None,
        return_logprobs: bool = False,
        prefix: Prefix | None = None,
    ) -> DecodeState:
        """Prefill `prompt` into the free `slot` and start decoding it there.

        **Arguments:**

        - `state`: the current [`eqzoo.generation.DecodeState`][] (donated).
        - `slot`: a free slot (`not state.active[slot]`): an int in `[0, slots)`.
        - `prompt`: one prompt's token ids, 1-D, at least one token (with a `prefix`, the
          tokens after it).
        - `max_new_tokens`: the request's token budget; `len(prompt) + max_new_tokens` (plus
          the prefix's length) must be at most `max_len`.
        - `key`, `temperature`, `top_k`, `top_p`, `min_p`: as in [`eqzoo.generate`][], for this
          request alone (arguments of the compiled programs: new values compile nothing).
        - `eos_token`: a stop id or a sequence of at most `stop_ids` of them: the slot stops
          after producing one (it is emitted).
        - `stop_sequences`: multi-token stops, token-id sequences (at most
          `stop_sequence_count`, each at most `stop_sequence_length` long), as
          [`eqzoo.generate`][] takes them: the slot stops once its generated tokens end with
          one (it is emitted). Checked on the device, every step.
        - `repetition_penalty`: as in [`eqzoo.generate`][] (on the ids of this request's
          prompt and tokens).
        - `logit_bias`: as in [`eqzoo.generate`][], at most `logit_bias_ids` ids.
        - `return_logprobs`: whether `step(..., return_logprobs=True)` reports this slot's
          tokens' log-probabilities, as [`eqzoo.generate`][] defines them (0 otherwise).
        - `prefix`: a [`eqzoo.generation.Prefix`][] from this engine's `prefill_prefix`: the
          slot starts with its keys and values and prefills only `prompt` after it, as if
          the prompt were `prefix.tokens` followed by `prompt`.

        Reads `state.active` back to check the slot is free ([`eqzoo.generation.serve`][]
        tracks its slots itself and skips the read).

        **Returns:** the new state.
        """
        self._check_slot(slot)
        if bool(np.asarray(state.active)[slot]):
            raise ConfigError(
                f"DecodeEngine.insert: slot {slot} is still decoding a request; insert into a free slot "
                f"(free: {np.flatnonzero(~np.asarray(state.active)).tolist()}) or step until it finishes."
            )
        request = self._request(prompt, max_new_tokens=max_new_tokens, key=key, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, eos_token=eos_token, stop_sequences=stop_sequences,
                                repetition_penalty=repetition_penalty, logit_bias=logit_bias,
                                return_logprobs=return_logprobs, prefix=prefix)
        return self._insert_batch(state, [slot], [request])

    def _check_slot(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int | np.integer) or not 0 <= slot < self.slots:
            raise ConfigError(f"DecodeEngine.insert: slot must be an int in [0, {self.slots}), got {slot!r}.")

    def _insert_batch(self, state, slots, requests) -> DecodeState:
        """Prefill the `requests` (`_request`'s values) into the free `slots`, in one program per
        prompt bucket and prefix bucket (none for requests without a prefix), each batch padded
        to an admission size with rows that write nothing."""
        groups: dict[tuple, list] = {}
        for slot, request in zip(slots, requests, strict=True):
            prompt, _, prefix = request
            groups.setdefault((self.bucket(prompt.shape[0]), None if prefix is None else prefix.width), []).append((slot, request))
        for (width, _), rows in groups.items():
            for start in range(0, len(rows), self.slots):
                state = self._prefill_rows(state, width, rows[start : start + self.slots])
        return state

    def _prefill_rows(self, state, width, rows) -> DecodeState:
        n = next(size for size in self.admission_sizes if size >= len(rows))
        rows = rows + [(self.slots, rows[0][1])] * (n - len(rows))  # padding: slot `slots` writes nothing
        padded = np.zeros((n, width), np.int32)
        for i, (_, (prompt, _, _)) in enumerate(rows):
            padded[i, : prompt.shape[0]] = prompt
        lengths = np.asarray([prompt.shape[0] for _, (prompt, _, _) in rows], np.int32)
        requests = [request for _, (_, request, _) in rows]
        settings = {k: np.stack([r[k] for r in requests]) for k in requests[0] if k != "key"}
        settings["key"] = [r["key"] for r in requests]  # stacked in the program: no dispatch of its own
        slots = np.asarray([slot for slot, _ in rows], np.int32)
        static = dict(skeleton=self._skeleton, unroll_layers=self.unroll_layers, cache_dtype=self.cache_dtype)
        prefixes = [prefix for _, (_, _, prefix) in rows]
        if prefixes[0] is None:
            return _insert(state, self._arrays, slots, padded, lengths, settings, **static)
        tokens = np.zeros((n, prefixes[0].width), np.int32)
        for i, prefix in enumerate(prefixes):
            tokens[i, : prefix.length] = prefix.tokens
        return _insert_prefixed(state, self._arrays, slots, padded, lengths, tokens,
                                np.asarray([p.length for p in prefixes], np.int32), [p.cache for p in prefixes],
                                settings, **static)

    def _request(
        self, prompt, *, max_new_tokens, key, temperature, top_k, top_p, min_p, eos_token, stop_sequences,
        repetition_penalty=1.0, logit_bias=None, return_logprobs=False, prefix=None, who="DecodeEngine.insert",
    ) -> tuple:
        """The prompt as a host int32 array, the request's settings as the insert program
        takes them and its prefix (or `None`), after checking all three. A bad request raises
        `ConfigError` or `ShapeError` (what `serve` refuses a request for), its message
        starting `"{who}: "` (`_named`: the one place that names the caller)."""
        try:
            return self._checked_request(
                prompt, max_new_tokens=max_new_tokens, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
                min_p=min_p, eos_token=eos_token, stop_sequences=stop_sequences, repetition_penalty=repetition_penalty,
                logit_bias=logit_bias, return_logprobs=return_logprobs, prefix=prefix, who=who,
            )
        except (ConfigError, ShapeError) as error:
            named = _named(error, who)
            if named is error:
                raise
            raise named from None

    def _checked_request(
        self, prompt, *, max_new_tokens, key, temperature, top_k, top_p, min_p, eos_token, stop_sequences,
        repetition_penalty, logit_bias, return_logprobs, prefix, who,
    ) -> tuple:
        """`_request`'s checks and values."""
        vocab = self.model.config.vocab_size
        if prefix is not None:
            check_prefix(prefix, self, who)
        if isinstance(prompt, str | bytes):
            raise ShapeError(f"{who}: the prompt is text ({prompt[:24]!r}), but the engine takes token ids: pass "
                             "tokenizer.encode(text).")
        prompt = np.asarray(as_prompts(prompt, who))
        _check_prompt(prompt, who)
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ConfigError(f"{who}: the prompt holds ids outside the model's vocabulary [0, {vocab}).")
        check_count(max_new_tokens, "max_new_tokens", who)
        before = 0 if prefix is None else prefix.length
        if before + prompt.shape[0] + max_new_tokens > self.max_len:
            head = "" if prefix is None else f"prefix length {before} + "
            raise ShapeError(
                f"{who}: {head}prompt length {prompt.shape[0]} + max_new_tokens {max_new_tokens} = "
                f"{before + prompt.shape[0] + max_new_tokens} exceeds the engine's max_len={self.max_len}; shorten the "
                "prompt, ask for fewer tokens or build the engine with a larger max_len."
            )
        self._bucket(prompt.shape[0], who)  # refused here, before serve books the slot, if no bucket holds it
        check_key(key, who)
        if key is not None and typed_key(key).dtype != _state_key_dtype():  # the slots' keys are stacked together
            raise ConfigError(
                f"{who}: the key is a {typed_key(key).dtype} key, but the engine's slots hold {_state_key_dtype()} keys "
                "(JAX's default implementation); make it with jax.random.key(seed)."
            )
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        if as_flag(return_logprobs) is None:
            raise ConfigError(f"{who}: return_logprobs must be True or False, got {return_logprobs!r}.")
        if key is None and temperature > 0:
            raise ConfigError(f"{who}: sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(seed).")
        eos, _ = check_stop_tokens(eos_token, 0, vocab, who)
        eos = () if eos is None else eos
        if len(eos) > self.stop_ids:
            raise ConfigError(f"{who}: {len(eos)} eos ids given, but the engine takes at most stop_ids={self.stop_ids}; "
                              "build it with a larger stop_ids.")
        stops = self._stops(stop_sequences, who)
        bias_ids, bias = self._bias(logit_bias, who)
        top_k = top_k_setting(top_k)
        settings = dict(
            max_new_tokens=np.asarray(max_new_tokens, np.int32), key=loop_key(key),
            temperature=np.asarray(float(temperature), np.float32),
            top_k=np.asarray(vocab if top_k is None else min(top_k, vocab), np.int32),
            top_p=np.asarray(1.0 if top_p is None else float(top_p), np.float32),
            min_p=np.asarray(0.0 if min_p is None else float(min_p), np.float32),
            eos=np.asarray(eos + (-1,) * (self.stop_ids - len(eos)), np.int32), stops=stops,
            repetition_penalty=np.asarray(float(repetition_penalty), np.float32), bias_ids=bias_ids, bias=bias,
            return_logprobs=np.asarray(bool(return_logprobs)),
        )
        return prompt.astype(np.int32), settings, prefix

    def _bias(self, logit_bias, who: str) -> tuple[np.ndarray, np.ndarray]:
        """`logit_bias` (checked as `generate` checks it) as int32 ids and float32 biases, each
        `(logit_bias_ids,)`, the unused entries id `vocab` (dropped) and bias 0."""
        vocab, width = self.model.config.vocab_size, self.logit_bias_ids
        dense = logit_bias_vector(logit_bias, vocab, who)
        ids = np.zeros((0,), np.int64) if dense is None else np.flatnonzero(dense)  # a bias of 0 adds nothing
        if ids.shape[0] > width:
            raise ConfigError(f"{who}: logit_bias biases {ids.shape[0]} ids, but the engine takes at most "
                              f"logit_bias_ids={width}; build it with a larger logit_bias_ids.")
        out_ids, out = np.full((width,), vocab, np.int32), np.zeros((width,), np.float32)
        out_ids[: ids.shape[0]] = ids
        if dense is not None:
            out[: ids.shape[0]] = dense[ids]
        return out_ids, out

    def _stops(self, stop_sequences, who: str) -> np.ndarray:
        """The stop sequences as `(stop_sequence_count, stop_sequence_length)` int32, each right-aligned
        after `-1`s, rows of `-1`s for none, after checking them against the engine's widths."""
        stops = check_stop_sequences(stop_sequences, self.model.config.vocab_size, who) or ()
        count, length = self.stop_shape
        longest = max((len(s) for s in stops), default=0)
        if len(stops) > count or longest > length:
            raise ConfigError(
                f"{who}: {len(stops)} stop sequences of up to {longest} tokens given, but the engine takes at most "
                f"stop_sequence_count={count} of at most stop_sequence_length={length} tokens; build it with larger ones."
            )
        out = np.full((count, length), -1, np.int32)
        for row, seq in enumerate(stops):
            out[row, length - len(seq) :] = seq
        return out

    def step(self, state: DecodeState, steps: int | None = None, *, return_logprobs: bool = False) -> tuple:
        """Decode up to `steps` tokens (default `steps_per_call`) for every active slot, in one
        compiled program of fixed shape (it ends early once no slot is active). A slot stops at
        one of its eos ids or the end of one of its stop sequences (emitted) or at its
        `max_new_tokens`, and is free from then on.

        **Returns:** `(state, tokens)`: the new state (the given one is donated) and int32
        `(slots, steps)` tokens, each slot's new ones in order, `-1` where it emitted none.
        With `return_logprobs=True`, `(state, tokens, logprobs)`: float32 `(slots, steps)`,
        each token's log-probability for the slots inserted with `return_logprobs=True`, 0
        elsewhere (one program either way: this only picks what is returned). Nothing is read
        back to the host.
        """
        state, tokens, logprobs, _ = self._step(state, steps)
        return (state, tokens, logprobs) if return_logprobs else (state, tokens)

    def _step(self, state, steps) -> tuple:
        """`step`: the state, tokens, log-probabilities, and which slots are still active after
        it (its own buffer)."""
        steps = self.steps_per_call if steps is None else steps
        check_count(steps, "steps", "DecodeEngine.step")
        return _step(state, self._arrays, skeleton=self._skeleton, unroll_layers=self.unroll_layers, steps=int(steps))
