"""Reading a checkpoint folder's `generation_config.json` into `eqzoo.generate`'s arguments."""

import dataclasses
import math
import operator
import os
import warnings
from pathlib import Path
from typing import Any

from .._errors import user_stacklevel
from ._errors import HFFormatError
from ._files import GENERATION_CONFIG_NAME, read_json_object

# Settings that change what transformers' generate produces and that eqzoo's decoding does not
# have, with the value that leaves them off.
_UNSUPPORTED = {
    "num_beams": 1, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "length_penalty": 1.0,
    "exponential_decay_length_penalty": None, "sequence_bias": None,
}
_TOP_K = 50  # transformers' top_k when sampling and the file sets none


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """A checkpoint's default decoding settings, as transformers' `generate` applies them.

    **Fields:** `eos_token` (a tuple of stop ids, or `None`), `pad_token` (or `None`),
    `temperature` (0.0 for greedy: `do_sample` false or absent), `top_k`, `top_p` and `min_p`
    (`None` when off), `repetition_penalty` (`None` when off, 1.0), `max_new_tokens` (or
    `None`); `max_length` (prompt and new tokens together, kept for reference: eqzoo asks for
    `max_new_tokens`); and the settings [`logits_processors`][eqzoo.hf.GenerationConfig.logits_processors]
    applies, each `None` when off: `no_repeat_ngram_size`, `bad_words_ids` (a tuple of id
    tuples), `suppress_tokens`, `begin_suppress_tokens` (tuples of ids), `min_new_tokens` and
    `min_length` (prompt included).
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

    def logits_processors(self) -> list:
        """The [`eqzoo.generation`][eqzoo.generation.NoRepeatNGram] processors these settings
        give, in transformers' order (empty when none is set), as transformers' `generate`
        builds them from the file: `no_repeat_ngram_size` >= 1 gives
        [`NoRepeatNGram`][eqzoo.generation.NoRepeatNGram]; `bad_words_ids`
        [`BannedSequences`][eqzoo.generation.BannedSequences] (less the one-token sequences
        that are an eos id, as transformers drops them); `min_length` and `min_new_tokens`
        (> 0, with an `eos_token`: without one there is nothing to hold back)
        [`MinLength`][eqzoo.generation.MinLength] and
        [`MinNewTokens`][eqzoo.generation.MinNewTokens] on the file's eos ids;
        `suppress_tokens` [`SuppressTokens`][eqzoo.generation.SuppressTokens];
        `begin_suppress_tokens` [`SuppressTokensAtBegin`][eqzoo.generation.SuppressTokensAtBegin]."""
        from ..generation import (
            BannedSequences,
            MinLength,
            MinNewTokens,
            NoRepeatNGram,
            SuppressTokens,
            SuppressTokensAtBegin,
        )

        out: list = []
        if self.no_repeat_ngram_size:
            out.append(NoRepeatNGram(self.no_repeat_ngram_size))
        eos = self.eos_token or ()
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
        out, so generate's defaults apply), updated with `overrides`:
        `eqzoo.generate(model, prompt, **config.kwargs(key=key, max_new_tokens=64))`.
        `logits_processors` holds [`logits_processors()`][eqzoo.hf.GenerationConfig.logits_processors]
        when there are any; an override replaces it, so add processors of your own after them:
        `config.kwargs(logits_processors=[*config.logits_processors(), mine])`."""
        out = {
            "eos_token": self.eos_token, "pad_token": self.pad_token, "temperature": self.temperature,
            "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "max_new_tokens": self.max_new_tokens,
            "logits_processors": self.logits_processors() or None,
        }
        return {k: v for k, v in out.items() if v is not None} | overrides


def load_generation_config(path: str | os.PathLike[str]) -> GenerationConfig:
    """Read `generation_config.json` (in the folder `path`, or the file `path` itself).

    As transformers reads it: without `do_sample: true` decoding is greedy (`temperature`,
    `top_k` and `top_p` are ignored); when sampling, an absent `temperature` is 1.0 and an
    absent `top_k` is 50 (transformers' defaults), `top_k: 0`, `top_p: 1.0` and `min_p: 0`
    filter nothing; `min_p` applies only when sampling. `repetition_penalty` applies in greedy
    decoding too (1.0 is off). `eos_token_id` may be one id or a list. Settings eqzoo's
    decoding lacks (beams, `typical_p`, `sequence_bias`, ...) are named in a warning when they
    would change the output. `no_repeat_ngram_size`, `bad_words_ids`, `suppress_tokens`,
    `begin_suppress_tokens`, `min_new_tokens` and `min_length` are applied by logits processors
    (see [`eqzoo.hf.GenerationConfig.logits_processors`][]).

    **Returns:** a frozen [`eqzoo.hf.GenerationConfig`][]; `.kwargs(**overrides)` gives the
    keyword arguments of `eqzoo.generate`.

    **Raises:** [`eqzoo.hf.HFFormatError`][] for a missing or unreadable file and for values
    outside their ranges (the message names the key and the value).
    """
    file = Path(path)
    if file.is_dir():
        file = file / GENERATION_CONFIG_NAME
    if not file.is_file():
        raise HFFormatError(
            f"no {GENERATION_CONFIG_NAME} at {str(file)!r}; a checkpoint without one decodes with "
            "eqzoo.generate's defaults (greedy, no stop token): pass eos_token= yourself."
        )
    raw = read_json_object(file)

    def bad(key: str, rule: str) -> HFFormatError:
        return HFFormatError(f"{str(file)!r}: {key} must be {rule}; got {raw[key]!r}.")

    def token_id(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(key, "a token id (an integer >= 0) or a list of them" if key == "eos_token_id" else "a token id (an integer >= 0)")
        return operator.index(value)

    def number(key: str, low: float, high: float, low_open: bool) -> float | None:
        value = raw.get(key)
        if value is None:
            return None
        ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        if not ok or value > high or value < low or (low_open and value == low):
            raise bad(key, f"a number in {'(' if low_open else '['}{low}, {high}]")
        return float(value)

    def count(key: str, low: int) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(key, f"an integer >= {low}")
        return value

    def id_list(key: str) -> tuple[int, ...] | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
            raise bad(key, "a list of token ids (integers >= 0)")
        return tuple(value) or None

    def id_lists(key: str) -> tuple[tuple[int, ...], ...] | None:
        value = raw.get(key)
        if value is None:
            return None
        ok = isinstance(value, list) and all(
            isinstance(s, list) and s and all(not isinstance(v, bool) and isinstance(v, int) and v >= 0 for v in s)
            for s in value
        )
        if not ok:
            raise bad(key, "a list of non-empty lists of token ids (integers >= 0)")
        return tuple(tuple(s) for s in value) or None

    eos = raw.get("eos_token_id")
    if eos is not None:
        eos = tuple(token_id(e, "eos_token_id") for e in eos) if isinstance(eos, list) else (token_id(eos, "eos_token_id"),)
        eos = eos or None  # an empty list: no stop token
    pad = raw.get("pad_token_id")
    pad = None if pad is None else token_id(pad, "pad_token_id")
    sample = raw.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise bad("do_sample", "true or false")
    temperature = number("temperature", 0.0, math.inf, low_open=False)
    top_p = number("top_p", 0.0, 1.0, low_open=True)
    min_p = number("min_p", 0.0, 1.0, low_open=False)
    penalty = number("repetition_penalty", 0.0, math.inf, low_open=True)
    penalty = None if penalty == 1.0 else penalty
    top_k = count("top_k", 0)
    if sample and temperature == 0.0:
        raise bad("temperature", "> 0 with do_sample: true (for greedy decoding set do_sample: false)")
    if sample:
        temperature = 1.0 if temperature is None else temperature
        top_k = _TOP_K if top_k is None else (top_k or None)
        top_p = None if top_p == 1.0 else top_p
        min_p = min_p or None  # 0 keeps every token
    else:
        temperature, top_k, top_p, min_p = 0.0, None, None, None
    unsupported = {
        k: raw[k] for k, off in _UNSUPPORTED.items() if raw.get(k) is not None and raw[k] != off and raw[k] != []
    }
    if unsupported:
        warnings.warn(
            f"{str(file)!r} sets {unsupported}, which eqzoo's decoding does not apply: its tokens can differ "
            "from transformers' generate with this file.",
            stacklevel=user_stacklevel(),
        )
    return GenerationConfig(
        eos_token=eos, pad_token=pad, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=penalty, max_new_tokens=count("max_new_tokens", 1), max_length=count("max_length", 1),
        no_repeat_ngram_size=count("no_repeat_ngram_size", 0) or None, bad_words_ids=id_lists("bad_words_ids"),
        suppress_tokens=id_list("suppress_tokens"), begin_suppress_tokens=id_list("begin_suppress_tokens"),
        min_new_tokens=count("min_new_tokens", 0) or None, min_length=count("min_length", 0) or None,
    )
