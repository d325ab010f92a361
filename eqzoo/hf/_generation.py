"""Reading a checkpoint folder's `generation_config.json` into `eqzoo.generate`'s arguments."""

import dataclasses
import math
import operator
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .._errors import ConfigError, as_flag, user_stacklevel
from ._errors import HFFormatError
from ._files import CONFIG_NAME, GENERATION_CONFIG_NAME, read_json_object

# Settings that change what transformers' generate produces and that eqzoo's decoding does not
# have, with the value that leaves them off (`num_beam_groups`: group beam search, which
# transformers 5 moved out of the library to a Hub `custom_generate` repository).
_UNSUPPORTED = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "num_beam_groups": 1,
}
_TOP_K = 50  # transformers' top_k when sampling and the file sets none
_FILE_EOS: Any = object()  # `logits_processors()`'s default: the file's eos ids


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """A checkpoint's default decoding settings, as transformers' `generate` applies them.

    **Fields:** `eos_token` (a tuple of stop ids, or `None`), `pad_token` (or `None`),
    `temperature` (0.0 for greedy: `do_sample` false or absent), `top_k`, `top_p` and `min_p`
    (`None` when off), `repetition_penalty` (`None` when off, 1.0), `max_new_tokens` (or
    `None`); `max_length` (prompt and new tokens together; `kwargs` and `beam_kwargs` pass it on
    when the file sets no `max_new_tokens`, and the decoding functions subtract the prompt's
    width, as transformers does); and the settings [`logits_processors`][eqzoo.hf.GenerationConfig.logits_processors]
    applies, each `None` when off: `no_repeat_ngram_size`, `bad_words_ids` (a tuple of id
    tuples), `suppress_tokens`, `begin_suppress_tokens` (tuples of ids), `min_new_tokens` and
    `min_length` (prompt included), and `sequence_bias` (a tuple of `(ids, bias)` pairs); and
    beam search's `num_beams` (1: none), `length_penalty`, `early_stopping` (`True`, `False` or
    `"never"`) and `num_return_sequences`, which
    [`beam_kwargs`][eqzoo.hf.GenerationConfig.beam_kwargs] passes to
    [`eqzoo.generation.generate_beam`][].
    """

    eos_token: tuple[int, ...] | None = None
    pad_token: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def logits_processors(self, *, eos_token: Any = _FILE_EOS) -> list:
        """The [`eqzoo.generation`][eqzoo.generation.NoRepeatNGram] processors these settings
        give, in transformers' order (empty when none is set), as transformers' `generate`
        builds them from the file: `sequence_bias` gives
        [`SequenceBias`][eqzoo.generation.SequenceBias] wrapped in
        [`BeforePenalty`][eqzoo.generation.BeforePenalty] (transformers adds the bias before
        `repetition_penalty`; the others run after it); `no_repeat_ngram_size` >= 1
        [`NoRepeatNGram`][eqzoo.generation.NoRepeatNGram]; `bad_words_ids`
        [`BannedSequences`][eqzoo.generation.BannedSequences] (less the one-token sequences
        that are an eos id, as transformers drops them); `min_length` and `min_new_tokens`
        (> 0, with an eos id: without one there is nothing to hold back)
        [`MinLength`][eqzoo.generation.MinLength] and
        [`MinNewTokens`][eqzoo.generation.MinNewTokens] on the eos ids;
        `suppress_tokens` [`SuppressTokens`][eqzoo.generation.SuppressTokens];
        `begin_suppress_tokens` [`SuppressTokensAtBegin`][eqzoo.generation.SuppressTokensAtBegin].

        **Arguments:** `eos_token`, the eos ids the processors use in place of the file's (one
        id, a list of ids or `None`, as `eqzoo.generate`'s `eos_token`); by default the file's.
        [`kwargs`][eqzoo.hf.GenerationConfig.kwargs] passes its `eos_token` override here."""
        from ..generation import (
            BannedSequences,
            BeforePenalty,
            MinLength,
            MinNewTokens,
            NoRepeatNGram,
            SequenceBias,
            SuppressTokens,
            SuppressTokensAtBegin,
        )

        eos = (self.eos_token or ()) if eos_token is _FILE_EOS else _eos_override(eos_token)
        out: list = []
        if self.sequence_bias:
            out.append(BeforePenalty(SequenceBias(dict(self.sequence_bias))))
        if self.no_repeat_ngram_size:
            out.append(NoRepeatNGram(self.no_repeat_ngram_size))
        bad = [list(b) for b in self.bad_words_ids or () if not (len(b) == 1 and b[0] in eos)]
        if bad:
            out.append(BannedSequences(bad))
        if self.min_length and eos:
            out.append(MinLength(self.min_length, eos))
        if self.min_new_tokens and eos:
            out.append(MinNewTokens(self.min_new_tokens, eos))
        if self.suppress_tokens:
            out.append(SuppressTokens(self.suppress_tokens))
        if self.begin_suppress_tokens:
            out.append(SuppressTokensAtBegin(self.begin_suppress_tokens))
        return out

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of [`eqzoo.generate`][eqzoo.generation.generate] and
        [`eqzoo.generation.generate_batch`][] these settings give (those left unset are left
        out, so generate's defaults apply; a file with `max_length` and no `max_new_tokens` gives
        `max_length`, from which generate subtracts the prompt), updated with `overrides`:
        `eqzoo.generate(model, prompt, **config.kwargs(key=key, max_new_tokens=64))`.
        `logits_processors` holds [`logits_processors()`][eqzoo.hf.GenerationConfig.logits_processors]
        when there are any, built with the `eos_token` override when there is one (so
        `MinNewTokens` and `MinLength` hold back the ids the decoding stops on); a
        `logits_processors` override replaces them, so add processors of your own after them:
        `config.kwargs(logits_processors=[*config.logits_processors(), mine])`. A file that asks
        for beams (`num_beams` > 1: beam search, or beam sampling with `do_sample`) warns: these
        arguments decode one sequence, greedily or sampled, without beams;
        [`beam_kwargs`][eqzoo.hf.GenerationConfig.beam_kwargs] gives the beams'.
        `do_sample=False` among the overrides decodes greedily (the file's temperature, `top_k`,
        `top_p` and `min_p` are left out), as transformers' `generate(do_sample=False)` does;
        `do_sample=True` keeps a sampling file's settings (on a greedy file it needs a
        `temperature=` override above 0: the file's sampling values are not read, as
        transformers ignores them). `do_sample=False` beside a sampling override (a temperature
        above 0, `top_k`, `top_p`, `min_p`) is refused as contradictory."""
        overrides, sample = self._do_sample(overrides, "kwargs")
        if self.num_beams > 1:
            what = "beam sampling" if self.temperature > 0.0 else "beam search"
            how = "sample without beams" if self.temperature > 0.0 and sample is not False else "decode greedily"
            warnings.warn(
                f"this generation config asks for {what} (num_beams={self.num_beams}); kwargs() gives "
                f"eqzoo.generate's arguments, which {how}. For transformers' beams: "
                "eqzoo.generation.generate_beam(model, prompt, **config.beam_kwargs()) (with max_new_tokens=N "
                "there when the file sets neither it nor max_length, and key=... for beam sampling).",
                stacklevel=user_stacklevel(),
            )
        out = {
            "eos_token": self.eos_token, "pad_token": self.pad_token, "temperature": self.temperature,
            "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, **self._length(),
        }
        if sample is False:
            out |= {"temperature": 0.0, "top_k": None, "top_p": None, "min_p": None}
        return {k: v for k, v in out.items() if v is not None} | self._processors(overrides) | overrides

    def beam_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of [`eqzoo.generation.generate_beam`][] these settings give,
        updated with `overrides`, as [`kwargs`][eqzoo.hf.GenerationConfig.kwargs] gives
        `eqzoo.generate`'s: `num_beams`, `length_penalty`, `early_stopping`,
        `num_return_sequences`, `repetition_penalty`, the eos and pad ids, `max_new_tokens` (or
        the file's `max_length` when it sets only that) and the logits processors (those left
        unset are left out):
        `generate_beam(model, prompt, **config.beam_kwargs(max_new_tokens=32))`. A file that
        samples (`do_sample: true` with beams: transformers' beam sampling) adds
        `do_sample=True` and its `temperature`, `top_k`, `top_p` and `min_p` (transformers'
        `top_k` of 50 where the file sets none); pass the key as an override:
        `config.beam_kwargs(key=jax.random.key(0))`. A `do_sample` override is read as
        [`kwargs`][eqzoo.hf.GenerationConfig.kwargs] reads it: `do_sample=False` gives the
        deterministic search whatever the file says."""
        overrides, sample = self._do_sample(overrides, "beam_kwargs")
        out = {
            "eos_token": self.eos_token, "pad_token": self.pad_token, **self._length(),
            "num_beams": self.num_beams, "length_penalty": self.length_penalty, "early_stopping": self.early_stopping,
            "num_return_sequences": self.num_return_sequences, "repetition_penalty": self.repetition_penalty,
        }
        if self.temperature > 0.0 and sample is not False:  # beam sampling
            out |= {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}
        return {k: v for k, v in out.items() if v is not None} | self._processors(overrides) | overrides

    def request_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of [`eqzoo.generation.Request`][] these settings give, for
        serving with [`eqzoo.generation.serve`][]:
        `Request(prompt, id=..., **config.request_kwargs(max_new_tokens=64, key=key))`. They are
        [`kwargs`][eqzoo.hf.GenerationConfig.kwargs]' (overrides, `do_sample` included, as
        there) less `pad_token` (a request's events hold only its new tokens: there is no
        padding). What a request cannot carry is refused rather than dropped: a file limited by
        `max_length` alone or by nothing (pass `max_new_tokens=`) and settings applied by logits processors
        (`no_repeat_ngram_size`, `bad_words_ids`, `min_new_tokens`, ...: decode those with
        [`eqzoo.generation.generate_batch`][], or pass `logits_processors=[]` to serve without
        them).

        **Raises:** `ConfigError` for either, naming the fix."""
        out = self.kwargs(**overrides)
        out.pop("pad_token", None)
        if "max_length" in out and "max_new_tokens" in out:  # the override wins, as in transformers
            del out["max_length"]
        if "max_length" in out:
            raise ConfigError(
                f"GenerationConfig.request_kwargs: this generation config limits decoding by max_length="
                f"{out['max_length']} (prompt included), which a Request does not take: pass "
                "request_kwargs(max_new_tokens=N)."
            )
        if "max_new_tokens" not in out:
            raise ConfigError(
                "GenerationConfig.request_kwargs: this generation config sets neither max_new_tokens nor "
                "max_length, and a Request needs a budget: pass request_kwargs(max_new_tokens=N)."
            )
        processors = out.pop("logits_processors", [])
        if processors:
            names = ", ".join(type(p).__name__ for p in processors)
            raise ConfigError(
                f"GenerationConfig.request_kwargs: this generation config's settings are applied by logits "
                f"processors ({names}), which serve's requests do not run. Decode with "
                "eqzoo.generation.generate_batch(model, ..., **config.kwargs()) to apply them, or pass "
                "request_kwargs(logits_processors=[]) to serve without them."
            )
        return out

    def _do_sample(self, overrides: dict[str, Any], caller: str) -> tuple[dict[str, Any], bool | None]:
        """`overrides` less `do_sample`, and its value (`None` when not given), checked: a
        transformers user's `do_sample=False` turns sampling off, which eqzoo's decoding spells
        `temperature=0.0` (or no `do_sample` for `generate_beam`)."""
        if "do_sample" not in overrides:
            return overrides, None
        rest = {k: v for k, v in overrides.items() if k != "do_sample"}
        sample = as_flag(overrides["do_sample"])
        if sample is None:
            raise ConfigError(f"GenerationConfig.{caller}: do_sample must be True or False, got {overrides['do_sample']!r}.")
        if sample is False:
            # transformers' own defaults (and temperature 0) change nothing in greedy decoding
            inert = {"temperature": (0, 1), "top_k": (0, 50), "top_p": (1,), "min_p": (0,)}
            given = [f"{k}={rest[k]!r}" for k, ok in inert.items() if rest.get(k) is not None and rest[k] not in ok]
            if given:
                raise ConfigError(
                    f"GenerationConfig.{caller}: do_sample=False decodes greedily, but {', '.join(given)} asks for "
                    "sampling; drop do_sample=False to sample with them, or drop them to decode greedily."
                )
            rest = {k: v for k, v in rest.items() if k not in inert}
        if sample and self.temperature == 0.0 and not (rest.get("temperature") or 0.0) > 0.0:
            how = (
                "eqzoo.generate samples whenever temperature > 0: kwargs(temperature=0.7, top_k=50, top_p=0.9, key=jax.random.key(0))"
                if caller == "kwargs" else
                "pass them to generate_beam beside beam_kwargs(): generate_beam(model, prompt, **config.beam_kwargs(), "
                "do_sample=True, temperature=0.7, top_k=50, key=jax.random.key(0))"
            )
            raise ConfigError(
                f"GenerationConfig.{caller}: do_sample=True, but this generation config decodes greedily (its "
                "do_sample is false or absent), so its temperature, top_k and top_p were not read (transformers "
                f"ignores them there too). Give the sampling settings yourself instead of do_sample: {how}."
            )
        if sample and caller == "beam_kwargs":
            rest = {"do_sample": True} | rest
        return rest, sample

    def _length(self) -> dict[str, int | None]:
        """`max_new_tokens`, or, when the file sets only `max_length`, that (prompt included):
        `generate`, `generate_batch`, `generate_stream`, `generate_speculative` and
        `generate_beam` take either."""
        if self.max_new_tokens is None and self.max_length is not None:
            return {"max_length": self.max_length}
        return {"max_new_tokens": self.max_new_tokens}

    def _processors(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """`{"logits_processors": [...]}` for `kwargs` and `beam_kwargs` (empty when there are
        none, or when `overrides` replaces them), built with the `eos_token` override."""
        if "logits_processors" in overrides:
            return {}
        processors = self.logits_processors(eos_token=overrides.get("eos_token", _FILE_EOS))
        return {"logits_processors": processors} if processors else {}


def _eos_override(value: Any) -> tuple[int, ...]:
    """An `eos_token` override (`None`, one id or a sequence of ids) as a tuple of ids."""
    if value is None:
        return ()
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return (operator.index(value),)
    ids = np.asarray(value).reshape(-1).tolist() if isinstance(value, np.ndarray | jax.Array) else value
    if isinstance(ids, str) or not isinstance(ids, Sequence) or not all(
        isinstance(i, int | np.integer) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise ConfigError(
            f"GenerationConfig: eos_token must be a token id, a list of token ids or None (as eqzoo.generate "
            f"takes it); got {value!r}."
        )
    return tuple(operator.index(i) for i in ids)


def load_generation_config(path: str | os.PathLike[str]) -> GenerationConfig:
    """Read `generation_config.json` (in the folder `path`, or the file `path` itself).

    As transformers reads it: without `do_sample: true` decoding is greedy (`temperature`,
    `top_k` and `top_p` are ignored); when sampling, an absent `temperature` is 1.0 and an
    absent `top_k` is 50 (transformers' defaults), `top_k: 0`, `top_p: 1.0` and `min_p: 0`
    filter nothing; `min_p` applies only when sampling. `repetition_penalty` applies in greedy
    decoding too (1.0 is off). `eos_token_id` may be one id or a list. Settings eqzoo's
    decoding lacks (group beam search, `typical_p`, ...) are named in a warning when they would change the
    output. Beam search's settings (`num_beams`, `length_penalty`, `early_stopping`,
    `num_return_sequences`) are kept for [`eqzoo.generation.generate_beam`][]
    ([`beam_kwargs`][eqzoo.hf.GenerationConfig.beam_kwargs]). `sequence_bias` (a list of `[ids, bias]` pairs, as transformers saves it),
    `no_repeat_ngram_size`, `bad_words_ids`, `suppress_tokens`, `begin_suppress_tokens`,
    `min_new_tokens` and `min_length` are applied by logits processors (see
    [`eqzoo.hf.GenerationConfig.logits_processors`][]), `sequence_bias` before
    `repetition_penalty` and the others after it, as transformers orders them.

    **Returns:** a frozen [`eqzoo.hf.GenerationConfig`][]; `.kwargs(**overrides)` gives the
    keyword arguments of `eqzoo.generate`.

    A folder without `generation_config.json` but with a `config.json` decodes greedily with
    that file's `eos_token_id` and `pad_token_id` (as transformers falls back to them).

    **Raises:** [`eqzoo.hf.HFFormatError`][] for a missing (no `config.json` either) or
    unreadable file and for values outside their ranges (the message names the key and the
    value).
    """
    file = Path(path)
    folder = file if file.is_dir() else None
    if folder is not None:
        file = folder / GENERATION_CONFIG_NAME
    if file.is_file():
        raw = _Raw(repr(str(file)), read_json_object(file))
    elif folder is not None and (folder / CONFIG_NAME).is_file():
        raw = _from_model_config(folder / CONFIG_NAME)
    else:
        raise HFFormatError(
            f"no {GENERATION_CONFIG_NAME} at {str(file)!r} (and no {CONFIG_NAME} beside it to take the "
            "token ids from); a checkpoint without one decodes with eqzoo.generate's defaults (greedy, no "
            "stop token): pass eos_token= yourself."
        )
    eos = _eos_ids(raw)
    pad = raw.get("pad_token_id")
    pad = None if pad is None else _token_id(raw, pad, "pad_token_id")
    decoding = _decoding(raw)
    beams = _beams(raw)
    _warn_unsupported(raw, sampling=decoding["temperature"] > 0.0)
    sequence_bias = _sequence_bias(raw)
    return GenerationConfig(
        eos_token=eos, pad_token=pad, **decoding,
        max_new_tokens=_count(raw, "max_new_tokens", 1), max_length=_count(raw, "max_length", 1),
        no_repeat_ngram_size=_count(raw, "no_repeat_ngram_size", 0) or None, bad_words_ids=_id_lists(raw, "bad_words_ids"),
        suppress_tokens=_id_list(raw, "suppress_tokens"), begin_suppress_tokens=_id_list(raw, "begin_suppress_tokens"),
        min_new_tokens=_count(raw, "min_new_tokens", 0) or None, min_length=_count(raw, "min_length", 0) or None,
        sequence_bias=sequence_bias, **beams,
    )


def _from_model_config(file: Path) -> "_Raw":
    """A folder without `generation_config.json`: greedy decoding with the stop and pad ids of
    its `config.json` (top level, or its `text_config`), as transformers falls back to them."""
    model = read_json_object(file)
    text = model.get("text_config") if isinstance(model.get("text_config"), dict) else {}
    ids = {k: model[k] if model.get(k) is not None else text.get(k) for k in ("eos_token_id", "pad_token_id")}
    where = f"{str(file)!r} (no {GENERATION_CONFIG_NAME} beside it: its token ids)"
    return _Raw(where, {k: v for k, v in ids.items() if v is not None})


class _Raw(dict):
    """A `generation_config.json`'s object, with `where` (the file, quoted) for messages."""

    def __init__(self, where: str, values: dict[str, Any]):
        super().__init__(values)
        self.where = where

    def bad(self, key: str, rule: str) -> HFFormatError:
        return HFFormatError(f"{self.where}: {key} must be {rule}; got {self[key]!r}.")


def _is_id(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _token_id(raw: _Raw, value: Any, key: str) -> int:
    if not _is_id(value):
        raise raw.bad(key, "a token id (an integer >= 0) or a list of them" if key == "eos_token_id" else "a token id (an integer >= 0)")
    return operator.index(value)


def _eos_ids(raw: _Raw) -> tuple[int, ...] | None:
    """`eos_token_id`, one id or a list, as a tuple (`None` when absent or an empty list: no
    stop token)."""
    eos = raw.get("eos_token_id")
    if eos is None:
        return None
    eos = tuple(_token_id(raw, e, "eos_token_id") for e in eos) if isinstance(eos, list) else (_token_id(raw, eos, "eos_token_id"),)
    return eos or None


def _number(raw: _Raw, key: str, low: float, high: float, low_open: bool) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        raise raw.bad(key, f"a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _count(raw: _Raw, key: str, low: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise raw.bad(key, f"an integer >= {low}")
    return value


def _id_list(raw: _Raw, key: str) -> tuple[int, ...] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is_id(v) for v in value):
        raise raw.bad(key, "a list of token ids (integers >= 0)")
    return tuple(value) or None


def _id_lists(raw: _Raw, key: str) -> tuple[tuple[int, ...], ...] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, list) and s and all(_is_id(v) for v in s) for s in value):
        raise raw.bad(key, "a list of non-empty lists of token ids (integers >= 0)")
    return tuple(tuple(s) for s in value) or None


def _sequence_bias(raw: _Raw) -> tuple[tuple[tuple[int, ...], float], ...] | None:
    """`sequence_bias` as transformers saves it, a list of `[[ids...], bias]` pairs, as a tuple
    of `(ids, bias)` (a sequence listed twice keeps its last bias, as transformers' dict does)."""
    value = raw.get("sequence_bias")
    if value is None:
        return None

    def pair(entry: Any) -> bool:
        return (
            isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and bool(entry[0])
            and all(_is_id(v) for v in entry[0]) and not isinstance(entry[1], bool)
            and isinstance(entry[1], int | float) and not math.isnan(entry[1])
        )

    if not isinstance(value, list) or not all(pair(e) for e in value):
        raise raw.bad(
            "sequence_bias", "a list of [token-id list, bias] pairs, e.g. [[[318, 257], -2.0], [[42], 1.5]], as "
            "transformers saves it"
        )
    merged = {tuple(ids): float(bias) for ids, bias in value}
    return tuple(merged.items()) or None


def _decoding(raw: _Raw) -> dict[str, Any]:
    """`temperature`, `top_k`, `top_p`, `min_p` and `repetition_penalty` as transformers applies
    them: sampling's defaults and no-op values with `do_sample: true`, greedy otherwise."""
    sample = raw.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise raw.bad("do_sample", "true or false")
    temperature = _number(raw, "temperature", 0.0, math.inf, low_open=False)
    top_p = _number(raw, "top_p", 0.0, 1.0, low_open=True)
    min_p = _number(raw, "min_p", 0.0, 1.0, low_open=False)
    penalty = _number(raw, "repetition_penalty", 0.0, math.inf, low_open=True)
    top_k = _count(raw, "top_k", 0)
    if not sample:
        return dict(temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=_off(penalty, 1.0))
    if temperature == 0.0:
        raise raw.bad("temperature", "> 0 with do_sample: true (for greedy decoding set do_sample: false)")
    return dict(
        temperature=1.0 if temperature is None else temperature,
        top_k=_TOP_K if top_k is None else _off(top_k, 0),
        top_p=_off(top_p, 1.0),
        min_p=_off(min_p, 0.0),  # 0 keeps every token
        repetition_penalty=_off(penalty, 1.0),
    )


def _beams(raw: _Raw) -> dict[str, Any]:
    """`num_beams`, `length_penalty`, `early_stopping` and `num_return_sequences`, checked (the
    defaults where absent)."""
    early = raw.get("early_stopping", False)
    if early is not True and early is not False and early != "never":
        raise raw.bad("early_stopping", 'true, false or "never"')
    penalty = _number(raw, "length_penalty", -math.inf, math.inf, low_open=False)
    return dict(
        num_beams=_count(raw, "num_beams", 1) or 1, length_penalty=1.0 if penalty is None else penalty,
        early_stopping=early, num_return_sequences=_count(raw, "num_return_sequences", 1) or 1,
    )


def _off(value: Any, off: Any) -> Any:
    """`None` for the value that turns a setting off."""
    return None if value == off else value


def _warn_unsupported(raw: _Raw, sampling: bool) -> None:
    # several samples per prompt without beams (eqzoo.generate draws one: repeat the prompt);
    # with beams, generate_beam returns num_return_sequences of them, sampled or not
    several = sampling and raw.get("num_beams") in (None, 1)
    off = _UNSUPPORTED | ({"num_return_sequences": 1} if several else {})
    unsupported = {k: raw[k] for k, v in off.items() if raw.get(k) is not None and raw[k] != v and raw[k] != []}
    if unsupported:
        warnings.warn(
            f"{raw.where} sets {unsupported}, which eqzoo's decoding does not apply: its tokens can differ "
            "from transformers' generate with this file.",
            stacklevel=user_stacklevel(),
        )
