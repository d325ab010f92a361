"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a small draft model
proposes a few tokens, the model checks them all in one pass, and every proposal up to the
first rejection is kept, plus one token of the model's own.

The first new token comes from the model's prefill, as in `generate_batch`. The state of one
row between rounds: `n` tokens are known (`buf[:n]`), both KV caches hold positions
`[0, n - 1)`, and the last known token `buf[n - 1]` is fed next. A round:

1. the draft feeds `buf[n - 1]`, then each of its own proposals, `num_draft + 1` single-token
   steps: proposals `d_1 .. d_k` at positions `n .. n + k - 1` (the last step only writes
   `d_k` into the draft's cache, so that its cache is whole if every proposal is kept);
2. the model feeds `buf[n - 1], d_1 .. d_k` in one call: its greedy tokens `g_0 .. g_k` for
   positions `n .. n + k`;
3. `a` = how many leading proposals equal the model's tokens (`d_i == g_{i-1}`); the round
   writes `d_1 .. d_a, g_a` and `n` grows by `a + 1`.

When sampling (`temperature > 0`), the draft samples `d_i` from its filtered distribution
`q_i`, the model's pass gives its filtered distributions `p_0 .. p_k`, and `d_i` is accepted
with probability `min(1, p_{i-1}(d_i) / q_i(d_i))`, in order, until the first rejection at
`i = a + 1`; the round's own token is then sampled from `max(p_a - q_{a+1}, 0)` renormalised (or
from `p_k` when all `k` are accepted). Each token so produced is distributed as the model's own
sampling would draw it (Leviathan et al., Theorem 1).

In both cases the caches now hold correct entries for `[0, n - 1)`; entries past it are stale
but lie at positions the next round rewrites before any query reaches them (a query at
position `p` reads keys at positions `<= p` only). A sliding-window layer's ring holds
`num_draft - 1` slots more than its window, so that those stale rows never take the slot of a
position still inside the window.

Mixture-of-experts layers that run `"capacity"` (which may drop assignments when several tokens
go through at once, where single-token decoding never drops) check in `"dense"`, so that the
check computes what `generate_batch`'s single steps compute. The output is the model's own
greedy decoding, or a sample of the model's own sampling distribution, up to logits that the
one-pass check and single-token steps round differently.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Integer

from .._errors import ConfigError, ShapeError, as_flag, shape_str
from .._typing import PRNGKey
from ..models._lm import AbstractLM
from ..nn import MoE
from ..nn._attention import check_cache_dtype
from ._generate import (
    check_count,
    check_key,
    check_model,
    decoding_model,
    loop_key,
    loop_settings,
    resolve_new_tokens,
    resolve_unroll,
)
from ._prompts import as_prompts, prompt_batch
from ._sampling import (
    check_sampling,
    check_stop_tokens,
    draw,
    filter_logits,
    is_eos,
    traced_stop_tokens,
)


def _dropless(model):
    """`model` with its `"capacity"` mixture-of-experts layers running `"dense"` (same weights)."""
    return jax.tree.map(
        lambda m: m.with_implementation("dense") if isinstance(m, MoE) and m.implementation == "capacity" else m,
        model, is_leaf=lambda m: isinstance(m, MoE),
    )


def _speculate_rows(model, draft, prompts, lengths, keys, **settings):
    """Speculative decoding of every row, each at its own position (the phases of a row:
    `_Speculation`): the rounds' work is per row (`vmap`), the loop over rounds runs outside the
    `vmap` with one scalar stop test (any row still live). A `while_loop` under `vmap` would
    instead select, on every round, between each row's new and old carry, both KV caches
    included, so that the caches could no longer be updated in place. A row that has finished
    keeps running rounds with the others; they write only its caches, which nothing reads
    again."""
    spec = _Speculation(model, draft, prompts.shape, **settings)
    state = jax.vmap(spec.start)(prompts, lengths, keys)
    state = jax.lax.while_loop(
        lambda s: jnp.any(jax.vmap(spec.live)(s, lengths)), lambda s: jax.vmap(spec.round_)(s, lengths), state
    )
    out = jax.vmap(spec.finish)(state["buf"], state.get("logps"), lengths)
    return out, state["rounds"]


class _Speculation:
    """One row's speculative decoding, phase by phase, for `_speculate_rows` (the module
    docstring describes a round): `start` (prefill both models and draw the first token),
    `propose` (the draft's tokens), `judge` (which of them the model keeps), `round_` (one
    round), `live` (whether a row still needs rounds) and `finish` (cut the row to its
    tokens). The settings are static values and traced arrays, as `generate_speculative`
    passes them."""

    def __init__(
        self, model, draft, shape, *, max_new_tokens, num_draft, eos_token, pad_token, temperature, top_k, top_p,
        min_p=None, cache_dtype=None, return_logprobs=False,
    ):
        self.model, self.draft, self.k = model, draft, num_draft
        self.batch_size, self.prompt_len = shape
        self.sampling = temperature is not None  # else greedy; temperature, top_p and min_p may be traced
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.max_new_tokens, self.eos_token, self.pad_token = max_new_tokens, eos_token, pad_token
        self.cache_dtype, self.return_logprobs = cache_dtype, return_logprobs
        self.total = self.prompt_len + max_new_tokens
        # A live round starts at n <= total - 1: its caches are written up to position n + k - 1
        # and its tokens up to n + k.
        self.room = self.total + num_draft
        self.positions = jnp.arange(self.room, dtype=jnp.int32)
        self.checker = _dropless(model)
        self.vocab = model.config.vocab_size

    def dist(self, logits):
        """The sampling distribution of one position's logits (the draft's q and the model's p alike)."""
        return jax.nn.softmax(filter_logits(logits, self.temperature, self.top_k, self.top_p, self.min_p))

    def start(self, prompt, length, key):
        """One row's state before its first round: both caches prefilled, and the prefill's
        token drawn, as `generate_batch` draws it."""
        k, room, prompt_len, pad_token = self.k, self.room, self.prompt_len, self.pad_token
        buf = jnp.concatenate([prompt, jnp.full((room - prompt_len,), pad_token, jnp.int32)])
        buf = jnp.where(self.positions < length, buf, pad_token)
        # A round writes up to k - 1 positions past the next round's start, then rewinds: a
        # sliding-window layer's ring keeps that many slots more than its window (and, as in
        # generate_batch, the prefill keeps the prompt's real positions, not its padding).
        prefill = dict(batch_size=self.batch_size, valid_length=length)
        prompt = jnp.where(self.positions[:prompt_len] < length, prompt, 0)  # padding may hold any id
        model, draft = self.model, self.draft
        last, cache = model.prefill(prompt, model.init_cache(room - 1, dtype=self.cache_dtype, lookahead=k - 1), **prefill)
        _, draft_cache = draft.prefill(prompt, draft.init_cache(room - 1, dtype=self.cache_dtype, lookahead=k - 1), **prefill)
        key, sub = jax.random.split(key)
        first = draw(last, sub, self.temperature, self.top_k, self.top_p, self.min_p)
        done = jnp.zeros((), bool) if self.eos_token is None else is_eos(first, self.eos_token)
        state = dict(
            cache=cache, draft_cache=draft_cache, n=length + 1, buf=buf.at[length].set(first), done=done,
            rounds=jnp.zeros((), jnp.int32), key=key,
        )
        if self.return_logprobs:  # under the model's own distribution: no temperature, no filtering
            state["logps"] = jnp.zeros((room,), jnp.float32).at[length].set(_logprob(last, first))
        return state

    def propose(self, draft_cache, n, buf, key):
        """The draft's tokens d_1 .. d_k and, when sampling, the distributions q_1 .. q_k they
        were drawn from; then d_k is fed once more, only to write it into the draft's cache."""
        k = self.k
        qs = jnp.zeros((k, self.vocab if self.sampling else 0), jnp.float32)
        draft_cache, last, proposals, qs = jax.lax.fori_loop(
            0, k, functools.partial(self._draft_step, n=n, key=key),
            (draft_cache, buf[n - 1], jnp.zeros((k,), jnp.int32), qs),
        )
        _, draft_cache = self.draft.decode(last[None], draft_cache, n - 1 + k, batch_size=self.batch_size)
        return draft_cache, proposals, qs

    def _draft_step(self, i, carry, *, n, key):
        """One of `propose`'s draft steps: feed the last token, draw proposal `i`."""
        draft_cache, tok, proposals, qs = carry
        logits, draft_cache = self.draft.decode(tok[None], draft_cache, n - 1 + i, batch_size=self.batch_size)
        if self.sampling:
            q = self.dist(logits[0])
            nxt = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(q)).astype(jnp.int32)
            qs = qs.at[i].set(q)
        else:
            nxt = jnp.argmax(logits[0]).astype(jnp.int32)
        return draft_cache, nxt, proposals.at[i].set(nxt), qs

    def judge(self, logits, proposals, qs, key):
        """`(a, tokens)`: how many proposals are kept, and the k + 1 tokens for positions
        n .. n + k whose first a + 1 the round writes."""
        k = self.k
        if not self.sampling:
            greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # g_0 .. g_k for positions n .. n + k
            # a: leading proposals equal to the model's tokens; then g_a (g_i = d_{i+1} for i < a)
            return jnp.sum(jnp.cumprod((proposals == greedy[:k]).astype(jnp.int32))), greedy
        ps = jax.vmap(self.dist)(logits)  # p_0 .. p_k
        idx = jnp.arange(k)
        k_accept, k_resample = jax.random.split(key)
        ratio = ps[idx, proposals] / qs[idx, proposals]  # q_i(d_i) > 0: d_i was drawn from q_i
        keep = jax.random.uniform(k_accept, (k,)) < ratio
        accepted = jnp.sum(jnp.cumprod(keep.astype(jnp.int32)))
        # After a rejection at proposal a + 1: max(p_a - q_{a+1}, 0), renormalised; after k
        # acceptances: p_k (q padded with a zero row).
        q_next = jnp.concatenate([qs, jnp.zeros((1, qs.shape[1]), qs.dtype)])[accepted]
        residual = jnp.maximum(ps[accepted] - q_next, 0.0)
        residual = jnp.where(jnp.sum(residual) > 0, residual, ps[accepted])  # p_a == q_{a+1}: rounding
        own = jax.random.categorical(k_resample, jnp.log(residual)).astype(jnp.int32)
        tokens = jnp.concatenate([proposals, own[None]]).at[accepted].set(own)
        return accepted, tokens

    def live(self, state, length):
        """Whether a row still needs rounds: it has not all its tokens, nor stopped at an eos."""
        return (state["n"] < length + self.max_new_tokens) & ~state["done"]

    def round_(self, state, length):
        """One round of one row: propose, check in one pass, keep the accepted prefix and the
        model's own token."""
        k, pad_token, eos_token = self.k, self.pad_token, self.eos_token
        on = self.live(state, length)
        # A finished row may stand past the caches' last slot; its round runs at the last live
        # start instead, writing caches that nothing reads again, and changes nothing else.
        n = jnp.minimum(state["n"], self.total - 1)
        buf = state["buf"]
        key, k_draft, k_judge = jax.random.split(state["key"], 3)
        draft_cache, proposals, qs = self.propose(state["draft_cache"], n, buf, k_draft)
        fed = jnp.concatenate([buf[n - 1][None], proposals])  # (k + 1,) at positions n - 1 ..
        logits, cache = self.checker.decode(fed, state["cache"], n - 1, batch_size=self.batch_size)
        accepted, tokens = self.judge(logits, proposals, qs, k_judge)
        # Positions n .. n + k get d_1 .. d_a, then the model's own token; the rest of the
        # window is rewritten by later rounds (or cut off).
        written = jnp.arange(k + 1) <= accepted
        new_buf = jax.lax.dynamic_update_slice(buf, jnp.where(written, tokens, pad_token), (n,))
        done = state["done"]
        if eos_token is not None:
            done = done | (on & jnp.any(written & is_eos(tokens, eos_token)))
        new = dict(
            cache=cache, draft_cache=draft_cache, n=jnp.where(on, n + accepted + 1, state["n"]),
            buf=jnp.where(on, new_buf, buf), done=done, rounds=state["rounds"] + on.astype(jnp.int32),
            key=key,  # a finished row's key is never used again
        )
        if self.return_logprobs:  # the check's logits for positions n .. n + k score the tokens written there
            logps = jnp.where(written, jax.vmap(_logprob)(logits, tokens), 0.0)
            new["logps"] = jnp.where(on, jax.lax.dynamic_update_slice(state["logps"], logps, (n,)), state["logps"])
        return new

    def finish(self, buf, logps, length):
        """Keep exactly max_new_tokens after the prompt, and padding after the first eos."""
        positions = self.positions
        generated = (positions >= length) & (positions < length + self.max_new_tokens)
        if self.eos_token is not None:
            stop = (generated & is_eos(buf, self.eos_token)).astype(jnp.int32)
            after_eos = (jnp.cumsum(stop) - stop) > 0  # strictly after the first eos
            generated = generated & ~after_eos
        buf = jnp.where((positions < length) | generated, buf, self.pad_token)[: self.total]
        return buf if logps is None else (buf, jnp.where(generated, logps, 0.0)[: self.total])


def _logprob(logits, token):
    """`token`'s log-probability under `logits` (float32 log-softmax)."""
    return jax.nn.log_softmax(logits.astype(jnp.float32))[token]


def _sampling_settings(temperature, top_k, top_p, min_p) -> dict:
    """`loop_settings` without the repetition penalty (refused above, so off)."""
    settings = loop_settings(temperature, top_k, top_p, min_p)
    del settings["repetition_penalty"]
    return settings


def _check_pair(model, draft) -> None:
    """Raise `ConfigError` unless `model` and `draft` are eqzoo language models with one vocabulary."""
    for name, m in (("model", model), ("draft", draft)):
        if not isinstance(m, AbstractLM):
            raise ConfigError(f"generate_speculative: {name} must be an eqzoo language model; got {type(m).__name__}.")
        check_model(m, f"generate_speculative ({name})")  # the config fields decoding reads
    if model.config.vocab_size != draft.config.vocab_size:
        raise ConfigError(
            f"generate_speculative: the draft's vocabulary ({draft.config.vocab_size}) differs from the "
            f"model's ({model.config.vocab_size}); the draft must share the model's tokenizer."
        )


def _refuse_unapplied(repetition_penalty, stop_sequences, logits_processors, logit_bias) -> None:
    """Raise `ConfigError` for the settings `generate_speculative` does not apply, unless they
    are off, so that settings from `GenerationConfig.kwargs` are never silently dropped."""
    refused = {
        name: value for name, value, off in (
            ("repetition_penalty", repetition_penalty, 1.0), ("stop_sequences", stop_sequences, None)
        ) if not (value is off or (off is not None and value == off))
    }
    if refused:
        raise ConfigError(
            f"generate_speculative does not apply {sorted(refused)} (got {refused}): with a repetition penalty "
            "the draft's proposals and the one-pass check would need per-position penalised distributions "
            "within each round, and a stop sequence can end inside a round. Decode with "
            "eqzoo.generation.generate_batch, which applies them, or drop them here."
        )
    steering = {
        name: value for name, value in (("logits_processors", logits_processors), ("logit_bias", logit_bias))
        if value is not None and not (isinstance(value, list | tuple | dict) and not value)
    }
    if steering:
        raise ConfigError(
            f"generate_speculative does not apply {sorted(steering)}: its acceptance test keeps a proposal "
            "with probability min(1, p/q) for the model's and the draft's own distributions p and q, so that the "
            "tokens follow the model's; with processors or a bias the test would need both models' logits "
            "processed at every position of a round, each against tokens the round may still reject. Decode with "
            "eqzoo.generation.generate_batch, which applies them, or drop them here."
        )


@eqx.filter_jit
def _speculate_batch(model, draft, prompts, lengths, key, *, unroll_layers, **static):
    model, draft = decoding_model(model, unroll_layers), decoding_model(draft, unroll_layers)  # as generate_batch
    keys = jax.random.split(key, prompts.shape[0])  # one per row, as generate_batch splits them
    return _speculate_rows(model, draft, prompts, lengths, keys, **static)


@no_type_check  # validated below with messages that say how to fix the call
def generate_speculative(
    model: AbstractLM,
    draft: AbstractLM,
    prompts: Integer[Array, "batch seq"],
    lengths: Integer[Array, " batch"] | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    attention_mask: Integer[Array, "batch seq"] | Bool[Array, "batch seq"] | None = None,
    num_draft: int = 4,
    key: PRNGKey | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    pad_token: int = 0,
    return_stats: bool = False,
    unroll_layers: bool | str = "auto",
    cache_dtype=None,
    return_logprobs: bool = False,
    logits_processors: Sequence[Callable] | None = None,
    logit_bias: Mapping[int, float] | None = None,
) -> (
    Int[Array, "batch total"]
    | tuple[Int[Array, "batch total"], dict[str, Array]]
    | tuple[Int[Array, "batch total"], Float[Array, "batch total"]]
    | tuple[Int[Array, "batch total"], Float[Array, "batch total"], dict[str, Array]]
):
    """Decoding of `model`, sped up by a smaller `draft` model that proposes tokens.

    Each round the draft proposes `num_draft` tokens one by one, `model` scores them all in one
    pass, and the proposals up to the first one `model` rejects are kept, followed by a token
    of `model`'s own: every round adds between 1 and `num_draft + 1` tokens.

    - Greedy (`temperature=0`, the default): a proposal is kept when it is `model`'s greedy
      token, so the output is `model`'s greedy decoding (as
      [`eqzoo.generation.generate_batch`][] with `temperature=0`), up to ties between logits
      that the one-pass check and single steps round differently.
    - Sampling (`temperature > 0`, with optional `top_k` / `top_p` / `min_p`): both models'
      distributions are filtered as [`eqzoo.generation.sample_logits`][] filters them (the
      same filters, in the same order, for the draft's `q` and the model's `p`, so `p` is the
      distribution `generate_batch` samples); a proposal `d` drawn
      from the draft's `q` is kept with probability `min(1, p(d) / q(d))`, and after a
      rejection the model's token is drawn from `max(p - q, 0)` renormalised. Every token is
      then distributed exactly as `generate_batch` with the same settings would draw it
      (Leviathan et al., 2023), though not with the same random numbers: the outputs are equal
      in distribution, not token for token.

    `"capacity"` mixture-of-experts layers check in `"dense"` (one token at a time, as decoding
    runs them, they drop nothing). It pays when the draft is much cheaper than `model` and
    usually agrees with it (a smaller model of the same family and tokenizer, or `model`'s own
    first layers). The whole loop is one compiled program.

    **Arguments:**

    - `model`: the language model whose output (greedy or sampled) is wanted.
    - `draft`: a language model with the same vocabulary.
    - `prompts`: right-padded prompts `(batch, seq)`; `lengths`: their real lengths (default:
      all `seq`), each at least 1. A row that looks left-padded is refused, as in
      [`eqzoo.generation.generate_batch`][].
    - `attention_mask`: instead of `lengths`, a tokenizer's 0/1 mask, padded on the left or on
      the right, as in [`eqzoo.generation.generate_batch`][]; the output is right-padded.
    - `max_new_tokens`: tokens to add to each prompt.
    - `max_length`: instead of `max_new_tokens`, the prompt and new tokens together, as a
      `generation_config.json` may give it (and [`eqzoo.hf.GenerationConfig.kwargs`][] passes
      it on): `max_length - seq` new tokens, `seq` the prompts' padded width, as transformers
      counts it. `max_new_tokens` wins when both are given.
    - `num_draft`: tokens the draft proposes per round (`>= 1`).
    - `key`, `temperature`, `top_k`, `top_p`, `min_p`: as in [`eqzoo.generate`][]; a key is
      needed when `temperature > 0`. A new `temperature`, `top_p` or `min_p` value compiles
      nothing new.
    - `repetition_penalty`, `stop_sequences`: accepted only at their off values (1.0,
      `None`), and refused otherwise with a `ConfigError`, so that settings from
      [`eqzoo.hf.GenerationConfig.kwargs`][] are never silently dropped. A penalty would make
      each proposal's distribution depend on the proposals before it in the same round (the
      one-pass check would need a presence set per position, for both models, and the
      acceptance test the penalised `p` and `q`), and a stop sequence can end inside a round;
      [`eqzoo.generation.generate_batch`][] applies both.
    - `logits_processors`, `logit_bias`: accepted only empty or `None`, refused otherwise with a
      `ConfigError` for the same reason: the acceptance test compares the two models' own
      distributions, and processed ones would have to be computed per position of a round,
      against proposals the round may still reject.
    - `eos_token`: a stop token id or a sequence of them: once a row produces one, the rest of
      that row is `pad_token`.
    - `pad_token`: fills positions after each row's tokens.
    - `return_stats`: also return `{"rounds": (batch,) int32}`, the rounds each row took (its
      tokens per round, `max_new_tokens / rounds`, measure how often the draft was right).
    - `unroll_layers`, `cache_dtype`: as in [`eqzoo.generation.generate_batch`][], for both
      models.
    - `return_logprobs`: also return each generated token's log-probability under `model`'s
      own distribution (float32 log-softmax of its logits, before `temperature`, `top_k`,
      `top_p` and `min_p`), as [`eqzoo.generation.generate_batch`][] returns it. A token from a round's
      check is scored by the check's logits, which round differently from single steps.

    **Returns:** `(batch, seq + max_new_tokens)` tokens; with `return_logprobs`, then their
    float32 log-probabilities of the same shape (0 at the prompt and at padding); with
    `return_stats`, then the stats: `tokens`, `(tokens, logprobs)`, `(tokens, stats)` or
    `(tokens, logprobs, stats)`.

    **Raises:** `ConfigError` for models that are not eqzoo language models, vocabularies that
    differ, a bad `num_draft` or sampling settings, or `temperature > 0` without a `key`;
    `ShapeError` for prompts that, with the new tokens and one
    round's lookahead (`num_draft - 1`), exceed either model's `max_seq`.
    """
    _check_pair(model, draft)
    max_new_tokens = resolve_new_tokens(max_new_tokens, max_length, prompts, "generate_speculative")
    check_count(num_draft, "num_draft", "generate_speculative")
    check_count(max_new_tokens, "max_new_tokens", "generate_speculative")
    prompts = as_prompts(prompts, "generate_speculative")
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ShapeError(
            f"generate_speculative takes integer prompts of shape (batch, seq); got {shape_str(prompts.shape)} "
            f"of dtype {prompts.dtype}."
        )
    need = prompts.shape[1] + max_new_tokens + num_draft - 1
    for name, m in (("model", model), ("draft", draft)):
        if need > m.max_seq:
            raise ShapeError(
                f"generate_speculative: prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} "
                f"+ one round's lookahead {num_draft - 1} = {need} exceeds the {name}'s max_seq={m.max_seq}; "
                "shorten the prompt or ask for fewer tokens."
            )
    check_sampling(temperature, top_k, top_p, min_p)
    _refuse_unapplied(repetition_penalty, stop_sequences, logits_processors, logit_bias)
    if cache_dtype is not None:
        cache_dtype = check_cache_dtype(cache_dtype, None)  # one static value per dtype
    for flag, value in (("return_stats", return_stats), ("return_logprobs", return_logprobs)):
        if as_flag(value) is None:
            raise ConfigError(f"generate_speculative: {flag} must be True or False, got {value!r}.")
    check_key(key, "generate_speculative")
    if key is None and temperature > 0:
        raise ConfigError("generate_speculative: sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(seed).")
    eos_token, pad_token = check_stop_tokens(eos_token, pad_token, model.config.vocab_size, "generate_speculative")
    prompts, lengths = prompt_batch(prompts, lengths, attention_mask, model.config.vocab_size, "generate_speculative", pad_token)
    out, rounds = _speculate_batch(
        model, draft, prompts, lengths, loop_key(key), max_new_tokens=int(max_new_tokens),
        num_draft=int(num_draft), unroll_layers=resolve_unroll(unroll_layers),
        **dict(zip(("eos_token", "pad_token"), traced_stop_tokens(eos_token, pad_token), strict=True)),
        **_sampling_settings(temperature, top_k, top_p, min_p), cache_dtype=cache_dtype,
        return_logprobs=bool(return_logprobs),
    )
    out = out if return_logprobs else (out,)
    return (*out, {"rounds": rounds}) if return_stats else out if return_logprobs else out[0]
