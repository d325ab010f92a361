"""Beam search and beam sampling with a KV cache, compiled as one program, scored as transformers'
`_beam_search`.

Each prompt keeps `num_beams` running hypotheses and `num_beams` finished ones. A step, for
every prompt at once:

1. each running beam's next-token log-probabilities (the log-softmax of its logits, float32,
   then the repetition penalty, `logit_bias` and the processors, as transformers applies its
   processors to log-probabilities in beam search), plus the beam's running score (its summed
   log-probabilities);
2. the best `K = max(2, 1 + number of eos ids) * num_beams` continuations over every beam and
   token (enough that `num_beams` of them do not stop); with beam sampling, the log-probabilities
   are first tempered and filtered (`warp_logprobs`) and the `K` are drawn without replacement
   from the softmax of the sums, then sorted by them (`_draw`);
3. the best `num_beams` continuations that do not stop (an eos id, or the last step) run on;
   the KV cache rows (and, with a repetition penalty, the ids each has seen) are gathered by
   the beam each came from;
4. a continuation among the first `num_beams` that stops is a finished hypothesis, scored by
   its summed log-probability over `generated ** length_penalty` (`generated`: its new tokens,
   eos included; the prompt is not counted) and kept if it is among the best `num_beams`
   finished so far;
5. transformers' early-stopping rule decides whether the search may end (see `generate_beam`).

Transformers' `-1e9` offsets are kept as they are (rather than `-inf`), so that the order of
hypotheses, ties included, is transformers' own."""

import functools
from collections.abc import Mapping, Sequence
from typing import Any, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer

from .._errors import ConfigError, ShapeError, as_flag, shape_str
from .._typing import PRNGKey
from ..models._lm import AbstractLM
from ..nn._attention import check_cache_dtype
from ._generate import (
    check_count,
    check_key,
    check_model,
    decoding_model,
    refuse_deleted_model,
    resolve_new_tokens,
    resolve_unroll,
    typed_key,
)
from ._processors import LogitsProcessor, apply_processors, check_processors, logit_bias_vector
from ._prompts import as_prompts, prompt_batch
from ._sampling import (
    check_sampling,
    check_stop_tokens,
    is_eos,
    penalize_repeats,
    top_k_setting,
    traced_settings,
    traced_stop_tokens,
    warp_logprobs,
)

_NEG = -1.0e9  # transformers' offset for a hypothesis that may not be chosen


@eqx.filter_jit
def _beam_jit(
    model, prompts, lengths, eos, pad, scale, bound, full_stops, logit_bias, penalty, key, warp, *, unroll_layers, **static
):
    model = decoding_model(model, unroll_layers)
    return _beam_search(model, prompts, lengths, eos, pad, scale, bound, full_stops, logit_bias, penalty, key, warp, **static)


def _draw(acc, k, key):
    """`(scores, index)` of the `k` continuations kept from `acc` (batch, beams * vocab), best
    first: the `k` best (`key` `None`: beam search), or `k` drawn without replacement from
    `softmax(acc)` (beam sampling: transformers' `torch.multinomial(..., replacement=False)`).

    The Gumbel-top-k trick (Vieira, 2014; Kool et al., 2019, "Stochastic Beams and Where to Find
    Them"): with `G_i` i.i.d. standard Gumbel, the index of the largest `acc_i + G_i` is drawn
    with probability `softmax(acc)_i` (the Gumbel-max trick), and, given that it was `i`, the
    remaining perturbed values are still independent Gumbels shifted by their `acc` (the max
    and the arg max of such a set are independent), so the second largest is a draw from the
    softmax over the others, and so on: the `k` largest are `k` sequential draws without
    replacement, in one `top_k`. A `-inf` candidate (banned by a processor or a filter) stays
    `-inf` and is never taken ahead of a finite one; only when fewer than `k` are finite are
    `-inf` ones taken, at the end, with score `-inf`, as beam search then
    takes them. Candidates whose probability rounds to 0 in float32 (a running score of
    `-1e9`) are drawn after every other finite one, ordered by `acc + G`, where torch takes
    such zero-probability categories in an order of its own."""
    if key is None:
        return jax.lax.top_k(acc, k)
    index = jax.lax.top_k(acc + jax.random.gumbel(key, acc.shape, jnp.float32), k)[1]
    top, order = jax.lax.top_k(jnp.take_along_axis(acc, index, axis=1), k)  # by score, as transformers sorts them
    return top, jnp.take_along_axis(index, order, axis=1)


def _beam_search(
    model, prompts, lengths, eos, pad, scale, bound, full_stops, logit_bias, penalty, key, warp, *, num_beams,
    max_new_tokens, cache_dtype, processors, top_k=None,
):
    """The search (see the module docstring) for right-padded `prompts` of `lengths`:
    `(tokens (batch, num_beams, total), scores (batch, num_beams))`, best first. `scale[t]` and
    `bound[t]`: the length-penalty divisors of a hypothesis finished at step `t` and of the
    early-stopping bound after step `t`; `full_stops`: `early_stopping is True`; `penalty`: the
    repetition penalty (`None` when off). Beam sampling: `key` (step `t` draws with
    `fold_in(key, t)`) and `warp`, `(temperature, top_p, min_p)` (each but the temperature
    `None` when off), with the static `top_k`; `key` and `warp` `None` for beam search."""
    batch, prompt_len = prompts.shape
    total = prompt_len + max_new_tokens
    vocab, n = model.config.vocab_size, num_beams
    k = max(2, 1 + (0 if eos is None else eos.shape[0])) * n
    rows = batch * n
    pos = jnp.arange(total)
    row_lengths = jnp.repeat(lengths, n)  # (rows,): beam j of prompt b is row b * n + j

    def prefill(prompt, length):  # the padding read as token 0, as in generate_batch
        prompt = jnp.where(jnp.arange(prompt_len) < length, prompt, 0)
        return model.prefill(prompt, model.init_cache(total, dtype=cache_dtype), batch_size=batch, valid_length=length)

    # One prefill per prompt; every beam starts from its prompt's logits and cache.
    last, cache = jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), jax.vmap(prefill)(prompts, lengths))
    buf = jnp.concatenate([prompts, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    buf = jnp.broadcast_to(jnp.where(pos < lengths[:, None], buf, pad)[:, None], (batch, n, total))
    state = {
        "running": buf,  # (batch, n, total)
        "running_scores": jnp.tile(jnp.where(jnp.arange(n) == 0, 0.0, _NEG).astype(jnp.float32), (batch, 1)),
        "finished": buf,  # (batch, n, total)
        "scores": jnp.full((batch, n), _NEG, jnp.float32),
        "done": jnp.zeros((batch, n), bool),  # which finished slots hold a hypothesis
        "open": jnp.ones((batch,), bool),  # whether a prompt's finished beams may still improve
        "go": jnp.ones((), bool),
        "last": last,  # (rows, vocab)
        "cache": cache,
    }
    if penalty is not None:  # each beam's seen ids: its prompt's real tokens (padding, index vocab, dropped)
        real = jnp.where(jnp.arange(prompt_len) < lengths[:, None], prompts, vocab)
        seen = jax.vmap(lambda ids: jnp.zeros((vocab,), bool).at[ids].set(True, mode="drop"))(real)
        state["seen"] = jnp.repeat(seen, n, axis=0)  # (rows, vocab)

    def take(a, index):  # a[b, index[b, i]] for each prompt b: (batch, m, ...) from (batch, *, ...)
        return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)

    def process(t, logp, tokens, at, seen):
        """One beam's log-probabilities through the penalty (on the ids it has `seen`), the
        bias and the processors, in `generate_batch`'s order, then (beam sampling) the warpers."""
        penalize = None if penalty is None else lambda s: penalize_repeats(s, seen, penalty)
        logp = apply_processors(logp, tokens, at, t, logit_bias=logit_bias, processors=processors, penalize=penalize)
        # beam sampling: transformers' warpers, after the processors, keeping k // n tokens or more
        return logp if warp is None else warp_logprobs(logp, warp[0], top_k, warp[1], warp[2], keep=k // n)

    def select(t, state):
        """Step `t` (the `t`-th new token): steps 1-5 of the module docstring, and the chosen
        beams' `(rows,)` new tokens and parent rows."""
        logp = jax.nn.log_softmax(state["last"].astype(jnp.float32), axis=-1)  # (rows, vocab)
        if logit_bias is not None or processors or penalty is not None or warp is not None:
            beams = state["running"].reshape(rows, total)
            logp = jax.vmap(functools.partial(process, t))(logp, beams, row_lengths + t, state.get("seen"))
        acc = (logp.reshape(batch, n, vocab) + state["running_scores"][:, :, None]).reshape(batch, n * vocab)
        top, index = _draw(acc, k, None if key is None else jax.random.fold_in(key, t))  # (batch, k), best first
        parent, tok = index // vocab, (index % vocab).astype(jnp.int32)
        cand = jnp.where(pos == (lengths[:, None] + t)[:, :, None], tok[:, :, None], take(state["running"], parent))
        hits = jnp.broadcast_to(t == max_new_tokens - 1, (batch, k))  # the last step stops every beam
        if eos is not None:
            hits = hits | is_eos(tok, eos)
        # The best `n` continuations that did not stop run on.
        live = top + hits.astype(jnp.float32) * _NEG
        keep = jax.lax.top_k(live, n)[1]  # (batch, n)
        running_scores = take(live, keep)
        # The first `n` that stopped are finished hypotheses, scored with the length penalty;
        # none is added to a prompt whose finished beams are full (early_stopping=True) or may
        # no longer improve.
        just = hits & (jnp.arange(k) < n)
        new = top / scale[t]
        new = new + (jnp.all(state["done"], axis=1, keepdims=True) & full_stops).astype(jnp.float32) * _NEG
        new = new + (~state["open"][:, None]).astype(jnp.float32) * _NEG
        new = new + (~just).astype(jnp.float32) * _NEG
        best = jax.lax.top_k(jnp.concatenate([state["scores"], new], axis=1), n)[1]
        finished = take(jnp.concatenate([state["finished"], cand], axis=1), best)
        scores = take(jnp.concatenate([state["scores"], new], axis=1), best)
        done = take(jnp.concatenate([state["done"], just], axis=1), best)
        # transformers' heuristic: the best running beam, at the best length it may reach,
        # against the worst finished one (any slot still empty counts as -1e9)
        worst = jnp.where(done, jnp.min(scores, axis=1, keepdims=True), _NEG)
        open_ = state["open"] & jnp.any((running_scores[:, :1] / bound[t]) > worst, axis=1)
        go = jnp.any(open_) & ~(jnp.all(done) & full_stops) & ~jnp.all(hits)
        state = {
            **state, "running": take(cand, keep), "running_scores": running_scores, "finished": finished,
            "scores": scores, "done": done, "open": open_, "go": go,
        }
        parents = (take(parent, keep) + n * jnp.arange(batch)[:, None]).reshape(rows)
        chosen = take(tok, keep).reshape(rows)
        if penalty is not None:  # each kept beam's seen ids: its parent's, and its new token
            state["seen"] = state["seen"][parents].at[jnp.arange(rows), chosen].set(True)
        return state, chosen, parents

    def body(carry):
        t, state = carry
        state, tok, parents = select(t, state)
        cache = jax.tree.map(lambda a: a[parents], state["cache"])  # each beam's cache, from its parent
        decode = lambda tk, c, at: model.decode(tk[None], c, at, batch_size=rows)  # noqa: E731
        logits, cache = jax.vmap(decode)(tok, cache, row_lengths + t)
        return t + 1, {**state, "last": logits[:, 0], "cache": cache}

    def cond(carry):
        t, state = carry
        return (t < max_new_tokens - 1) & state["go"]

    # The last step needs no decode after it; after an early stop it changes nothing (every
    # prompt's finished beams are then closed to new hypotheses).
    t = jnp.zeros((), jnp.int32)
    if max_new_tokens > 1:  # one new token: no decode step to compile
        t, state = jax.lax.while_loop(cond, body, (t, state))
    state = select(t, state)[0]
    return state["finished"], state["scores"]


@functools.partial(jax.jit, static_argnames=("count", "single"))
def _best(tokens, scores, *, count: int, single: bool):
    """The `count` best hypotheses of each prompt (of the one prompt, `single`): sliced in a
    small program of its own, so that another `num_return_sequences` compiles only this."""
    tokens, scores = tokens[:, :count], scores[:, :count]
    return (tokens[0], scores[0]) if single else (tokens, scores)


def _penalty_tables(length_penalty: float, early_stopping, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """`(scale, bound)`, float32 `(max_new_tokens,)`: a hypothesis finished with `t + 1` new
    tokens is scored `sum / scale[t]`; after step `t` the best running beam's bound divides by
    `bound[t]` (with `early_stopping="never"` and a positive penalty, by the longest length it
    may reach). Computed in float64 as Python computes transformers' `length ** penalty`, then
    rounded to float32: arguments of the compiled search, so other values compile nothing."""
    lengths = np.arange(1, max_new_tokens + 1, dtype=np.float64)
    scale = lengths**length_penalty
    bound = np.full_like(scale, float(max_new_tokens) ** length_penalty) if early_stopping == "never" and length_penalty > 0 else scale
    return scale.astype(np.float32), bound.astype(np.float32)


@no_type_check  # validated here, with messages that say how to fix the call
def _check_beam_settings(num_beams, num_return_sequences, length_penalty, early_stopping, unknown) -> tuple:
    """Raise `ConfigError` for beam settings outside their ranges and for `unknown` keyword
    arguments; return `length_penalty` as a float and `early_stopping` (a NumPy bool as a `bool`)."""
    check_count(num_beams, "num_beams", "generate_beam")
    check_count(num_return_sequences, "num_return_sequences", "generate_beam")
    if num_return_sequences > num_beams:
        raise ConfigError(
            f"generate_beam: num_return_sequences={num_return_sequences} exceeds num_beams={num_beams}; the search "
            f"keeps num_beams finished hypotheses. Raise num_beams to at least {num_return_sequences}."
        )
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, int | float | np.number) or not np.isfinite(length_penalty):
        raise ConfigError(
            f"generate_beam: length_penalty must be a finite number (1.0: average log-probability per token; 0: "
            f"none; > 1 favours longer hypotheses), got {length_penalty!r}."
        )
    early = "never" if isinstance(early_stopping, str) and early_stopping == "never" else as_flag(early_stopping)
    if early is None:
        raise ConfigError(f"generate_beam: early_stopping must be True, False or 'never' (transformers'), got {early_stopping!r}.")
    if "stop_sequences" in unknown:
        raise ConfigError(
            "generate_beam takes no stop_sequences: its hypotheses end at the eos ids only (eos_token=...). "
            "To stop at a sequence, decode with eqzoo.generate (or generate_batch), which takes stop_sequences."
        )
    if unknown:
        raise ConfigError(f"generate_beam got unexpected keyword arguments {sorted(unknown)}; see its docstring for the ones it takes.")
    return float(length_penalty), early


@no_type_check  # validated here, with messages that say how to fix the call
def _beam_sampling(do_sample, **settings) -> tuple:
    """`(key, warp, top_k)` as the compiled search takes them (see `_beam_search`) for the
    sampling `settings` (`key`, `temperature`, `top_k`, `top_p`, `min_p`), after checking them:
    `(None, None, None)` without `do_sample`, when any of them left on is refused. With it the
    temperature (default 1.0, transformers') must be > 0 and a key is needed; the temperature,
    top-p and min-p are float32 arguments (a new value compiles nothing), top-k static."""
    if as_flag(do_sample) is None:
        raise ConfigError(f"generate_beam: do_sample must be True or False, got {do_sample!r}.")
    if not do_sample:
        # temperature=0.0 is eqzoo.generate's greedy decoding: off, as None is
        on = {name: v for name, v in settings.items() if v is not None and not (name == "temperature" and v == 0.0)}
        if on:
            raise ConfigError(
                f"generate_beam got {on} with do_sample=False: beam search is deterministic (transformers' num_beams "
                "> 1 with do_sample=False) and takes no key, temperature, top_k, top_p or min_p. For beam sampling "
                "pass do_sample=True and a key; for sampling without beams use eqzoo.generate."
            )
        return None, None, None
    temperature = 1.0 if settings["temperature"] is None else settings["temperature"]
    check_sampling(temperature, settings["top_k"], settings["top_p"], settings["min_p"])
    if float(temperature) == 0.0:
        raise ConfigError(
            "generate_beam: beam sampling (do_sample=True) needs a temperature > 0 (default 1.0, as in "
            "transformers); got 0. For the deterministic search pass do_sample=False."
        )
    check_key(settings["key"], "generate_beam")
    if settings["key"] is None:
        raise ConfigError("generate_beam: beam sampling (do_sample=True) needs a PRNG key: pass key=jax.random.key(seed).")
    temperature, top_p, min_p, _ = traced_settings(temperature, settings["top_p"], settings["min_p"])
    top_k = top_k_setting(settings["top_k"])
    return typed_key(settings["key"]), (temperature, top_p, min_p), None if top_k is None else int(top_k)


def _beam_prompts(model, prompts, lengths, attention_mask, max_new_tokens) -> tuple:
    """`(prompts, single)`: the prompts as a batch `(batch, seq)` after checking their shape,
    dtype and length, and whether one prompt `(seq,)` was given."""
    prompts = as_prompts(prompts, "generate_beam")
    single = prompts.ndim == 1
    if single:
        if lengths is not None or attention_mask is not None:
            raise ConfigError("generate_beam: lengths and attention_mask are for a batch of prompts (batch, seq); one prompt takes neither.")
        prompts = prompts[None]
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ShapeError(f"generate_beam takes one prompt (seq,) or a batch (batch, seq) of at least one token; got {shape_str(prompts.shape)}.")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ShapeError(f"prompt token ids must be integers; got dtype {prompts.dtype}.")
    total = prompts.shape[1] + max_new_tokens
    if total > model.max_seq:
        raise ShapeError(
            f"prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds the model's "
            f"max_seq={model.max_seq}; shorten the prompt or ask for fewer tokens."
        )
    return prompts, single


@no_type_check  # validated here, with messages that say how to fix the call
def generate_beam(
    model: AbstractLM,
    prompts: Integer[Array, " seq"] | Integer[Array, "batch seq"],
    lengths: Integer[Array, " batch"] | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    num_beams: int = 4,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    repetition_penalty: float = 1.0,
    eos_token: int | Sequence[int] | None = None,
    pad_token: int = 0,
    attention_mask: Integer[Array, "batch seq"] | None = None,
    unroll_layers: bool | str = "auto",
    cache_dtype=None,
    return_scores: bool = False,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    logit_bias: Mapping[int, float] | None = None,
    do_sample: bool = False,
    key: PRNGKey | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    **unknown: Any,
) -> (
    Int[Array, "*batch beams total"] | tuple[Int[Array, "*batch beams total"], Float[Array, "*batch beams"]]
):
    """Beam search (transformers' `generate(num_beams=..., do_sample=False)`): the
    `num_return_sequences` most likely continuations of each prompt among `num_beams`
    hypotheses, decoding with the KV cache, in one compiled program. With `do_sample=True`,
    beam sampling (transformers' `num_beams > 1, do_sample=True`): the continuations kept at
    each step are drawn rather than the best taken.

    The prompt is prefilled once and its cache copied to the beams; the cache then holds
    `batch * num_beams` rows, gathered by the beam each continuation came from on every step
    (inside the loop: no host round trip). Tokens and scores follow transformers'
    `_beam_search`: a hypothesis's score is its summed log-probability (float32) divided by
    `new_tokens ** length_penalty`, the prompt not counted.

    **Arguments:**

    - `model`: an eqzoo language model ([`eqzoo.models.AbstractLM`][]).
    - `prompts`: one prompt `(seq,)`, or a batch `(batch, seq)` right-padded with `lengths`
      (or `attention_mask`), as [`eqzoo.generation.generate_batch`][] takes them; each prompt
      is searched as transformers searches it alone.
    - `max_new_tokens`: the most tokens a hypothesis may add (>= 1).
    - `max_length`: instead of `max_new_tokens`, the prompt and new tokens together, as a
      `generation_config.json` may give it ([`eqzoo.hf.GenerationConfig.beam_kwargs`][]
      passes it on): `max_length - seq` new tokens, `seq` the prompts' padded width, as
      transformers counts it. `max_new_tokens` wins when both are given.
    - `num_beams`: hypotheses kept per prompt (>= 1).
    - `num_return_sequences`: how many of the best finished hypotheses to return, best first
      (at most `num_beams`).
    - `length_penalty`: the exponent of the new-token count a hypothesis's summed
      log-probability is divided by: 1.0 (default) is the mean per token, 0 the plain sum
      (favours short ones), > 1 favours longer ones.
    - `early_stopping`: when a prompt's search ends (transformers' rule): `True`, once it has
      `num_beams` finished hypotheses; `False` (default), once no running beam could beat the
      worst of them were it to finish now; `"never"`, once none could at the best length it
      may still reach (the exact rule for `length_penalty >= 0`). Every prompt ends at
      `max_new_tokens` in any case.
    - `repetition_penalty`: transformers' penalty on repeats (Keskar et al., 2019), applied as
      transformers applies it in beam search: to each beam's next-token log-probabilities, for
      every id in that beam's own sequence (its prompt's real tokens, then its new ones), a
      negative score is multiplied by it and a positive one divided, so > 1 discourages
      repeats (1.0, the default, is off; a Python number or a concrete 0-d array, as in
      [`eqzoo.generate`][]). Each beam carries a `(vocab,)` set of the ids it has seen, gathered
      from the beam it came from at each step, as its KV cache is. It comes after the
      [`eqzoo.generation.BeforePenalty`][] processors and before `logit_bias` and the others.
    - `eos_token`: a stop id, or several: a beam that picks one is finished (the eos is kept,
      then `pad_token`). Without one every hypothesis runs `max_new_tokens` tokens.
    - `pad_token`: fills each hypothesis after its last token.
    - `unroll_layers`, `cache_dtype`: as in [`eqzoo.generation.generate_batch`][].
    - `return_scores`: also return each hypothesis's score.
    - `logits_processors`, `logit_bias`: as in [`eqzoo.generation.generate_batch`][], but,
      as transformers applies its processors in beam search, to each beam's next-token
      log-probabilities (a `-inf` bans a token; a bias shifts its score, unnormalised). A
      processor sees one beam's tokens.
    - `do_sample`: `True` for beam sampling, as transformers' `_beam_search` samples. Each
      beam's processed log-probabilities go through the temperature (divided by it), top-k,
      top-p and min-p, in that order, each keeping at least the number of eos ids plus one
      (at least 2) best tokens per beam (transformers' `min_tokens_to_keep` in beam methods);
      added to the beam's running score, as in the search; then `max(2, 1 + number of eos
      ids) * num_beams` candidates over every beam and token are drawn without replacement
      from the softmax of those sums (one `top_k` of the sums plus Gumbel noise, which draws
      what sequential draws without replacement draw) and sorted by their sums. The rest is
      the search's: the best `num_beams` drawn that do not stop run on, and hypotheses are
      finished, scored (with the warped log-probabilities, as transformers scores them),
      length-penalised and early-stopped as above. Without it the settings below are refused.
    - `key`: the PRNG key beam sampling draws with (step `t` uses `jax.random.fold_in(key, t)`).
    - `temperature`: > 0 (default 1.0, transformers'); divides the log-probabilities, so it
      also scales the hypotheses' scores.
    - `top_k`, `top_p`, `min_p`: as in [`eqzoo.generate`][], per beam, with at least the
      `min_tokens_to_keep` above kept by each (so `top_k=1` keeps 2 tokens per beam without an
      eos id).

    The program is compiled once per prompt shape, `max_new_tokens`, `num_beams`, number of
    eos ids and processors, whether `repetition_penalty` is 1.0, and, when sampling, `top_k`
    and whether top-p and min-p filter; `length_penalty`, `early_stopping`, the penalty, the
    eos and pad ids, `logit_bias` values, the key, the temperature and the top-p and min-p
    values are its arguments (other values compile nothing); another `num_return_sequences`
    compiles only a small slicing program.

    **Returns:** the hypotheses, `(num_return_sequences, seq + max_new_tokens)` for one prompt
    or `(batch, num_return_sequences, seq + max_new_tokens)` for a batch: each is its
    prompt, its new tokens, then `pad_token`. With `return_scores`, `(tokens, scores)`, the
    scores float32 `(num_return_sequences,)` or `(batch, num_return_sequences)`, best first.
    """
    check_model(model, "generate_beam")
    max_new_tokens = resolve_new_tokens(max_new_tokens, max_length, prompts, "generate_beam")
    length_penalty, early_stopping = _check_beam_settings(num_beams, num_return_sequences, length_penalty, early_stopping, unknown)
    check_count(max_new_tokens, "max_new_tokens", "generate_beam")
    check_sampling(0.0, None, None, None, repetition_penalty)
    key, warp, top_k = _beam_sampling(do_sample, key=key, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    prompts, single = _beam_prompts(model, prompts, lengths, attention_mask, max_new_tokens)
    vocab = model.config.vocab_size
    eos, pad = check_stop_tokens(eos_token, pad_token, vocab, "generate_beam")
    if max(2, 1 + len(eos or ())) > vocab:
        raise ConfigError(f"generate_beam: a vocabulary of {vocab} ids is too small for beam search with {len(eos or ())} eos ids.")
    if as_flag(return_scores) is None:
        raise ConfigError(f"generate_beam: return_scores must be True or False, got {return_scores!r}.")
    prompts, lengths = prompt_batch(prompts, lengths, attention_mask, vocab, "generate_beam", pad)
    scale, bound = _penalty_tables(length_penalty, early_stopping, int(max_new_tokens))
    settings = dict(
        unroll_layers=resolve_unroll(unroll_layers), top_k=top_k, num_beams=int(num_beams),
        max_new_tokens=int(max_new_tokens),
        cache_dtype=None if cache_dtype is None else check_cache_dtype(cache_dtype, None),
        processors=check_processors(logits_processors, "generate_beam", vocab),
    )
    traced = (
        *traced_stop_tokens(eos, pad), scale, bound, np.asarray(early_stopping is True),
        logit_bias_vector(logit_bias, vocab, "generate_beam"), traced_settings(0.0, None, None, repetition_penalty)[3],
    )
    try:
        tokens, scores = _beam_jit(model, prompts, lengths, *traced, key, warp, **settings)
    except Exception as err:
        refuse_deleted_model(model, err, "generate_beam")
        raise
    tokens, scores = _best(tokens, scores, count=int(num_return_sequences), single=single)
    return (tokens, scores) if return_scores else tokens
