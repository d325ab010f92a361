"""Tokenizers: text <-> int32 token ids, with a JSON-able description for checkpoint metadata."""

import abc
from collections.abc import Mapping, Sequence
from typing import Any, Literal, final, no_type_check

import numpy as np
from jax import Array
from jaxtyping import Int, Integer

from .._errors import ConfigError
from ._encoding import EncodedBatch, TokenizerError, check_batch_request, pad_rows, rows_to_decode
from ._stream_decoder import StreamDecoder


class AbstractTokenizer(abc.ABC):
    """The protocol every eqzoo tokenizer follows.

    - `encode(text) -> Int[np.ndarray, "seq"]` (int32) and `decode(ids) -> str` (ids as a NumPy
      or JAX array, e.g. what `eqzoo.generate` returns, or a list of ints);
    - `vocab_size`: ids lie in `[0, vocab_size)`;
    - `encode_batch(texts) -> EncodedBatch` and `decode_batch(ids, attention_mask) -> list[str]`,
      built here on `encode` and `decode` (a tokenizer may override them with a faster path);
    - `stream_decoder() -> StreamDecoder`, the text of a stream of ids a chunk at a time, also
      built on `decode`;
    - `to_dict()` returns a JSON-able dict (with a `"type"` key) that `from_dict` (or
      [`eqzoo.data.tokenizer_from_dict`][]) turns back into an equal tokenizer.
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """The number of distinct token ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> Int[np.ndarray, " seq"]:
        """Encode `text` into an int32 array of token ids."""

    @abc.abstractmethod
    def decode(self, ids: Integer[np.ndarray, " seq"] | Integer[Array, " seq"] | Sequence[int]) -> str:
        """Decode token ids back into text."""

    @property
    def pad_token_id(self) -> int | None:
        """The id `encode_batch` pads with by default; `None` (the default) when the tokenizer
        has no pad token, and `encode_batch` then needs `pad_token_id=`."""
        return None

    @property
    def padding_side(self) -> str:
        """The side `encode_batch` pads on by default: `"right"` unless the tokenizer says
        otherwise."""
        return "right"

    @no_type_check  # checked with messages that say how to fix the call
    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        padding: Literal["longest", "max_length"] = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        padding_side: Literal["right", "left"] | None = None,
        pad_to_multiple_of: int | None = None,
        pad_token_id: int | None = None,
    ) -> EncodedBatch:
        """Encode several texts and pad them to one width, with the attention mask.

        The same ids and mask as transformers' `tokenizer(texts, padding=..., truncation=...,
        max_length=..., padding_side=..., pad_to_multiple_of=...)`, as int32 NumPy arrays.

        **Arguments:**

        - `texts`: a list of strings.
        - `padding`: `"longest"` pads to the longest text of the batch (transformers'
          `padding=True`); `"max_length"` pads every row to `max_length` (fixed widths compile
          once, see [`eqzoo.generation.generate_batch`][]).
        - `max_length`: the width for `padding="max_length"`, and the cut for `truncation`.
        - `truncation`: cut texts longer than `max_length` tokens (keeping their start).
        - `padding_side`: `"right"` (training, and `generate_batch(lengths=)`) or `"left"`
          (transformers' habit for decoding); default the tokenizer's `padding_side`.
        - `pad_to_multiple_of`: round the width up to a multiple of this.
        - `pad_token_id`: the id padding holds (default the tokenizer's `pad_token_id`). It is
          never read by a model given the mask.

        **Returns:** an [`eqzoo.data.EncodedBatch`][]: `ids` and `attention_mask`, int32
        `(batch, seq)`.

        **Raises:** `TokenizerError` when there is no pad token (pass `pad_token_id=`), for
        `truncation=True` or `padding="max_length"` without `max_length`, and for a text longer
        than `max_length` under `padding="max_length"` without `truncation`.
        """
        request = check_batch_request(
            f"{type(self).__name__}.encode_batch", texts, padding=padding, max_length=max_length,
            truncation=truncation, padding_side=self.padding_side if padding_side is None else padding_side,
            pad_to_multiple_of=pad_to_multiple_of, pad_token_id=pad_token_id,
            default_pad_token_id=self.pad_token_id, vocab_size=self.vocab_size,
        )
        rows = [self.encode(text) for text in request.texts]
        if request.truncation:
            rows = [row[: request.max_length] for row in rows]
        return pad_rows(rows, request, f"{type(self).__name__}.encode_batch")

    @no_type_check  # checked with messages that say how to fix the call
    def decode_batch(self, ids: Any, attention_mask: Any = None) -> list[str]:
        """Decode each row of a batch; with `attention_mask`, without its padding.

        **Arguments:**

        - `ids`: `(batch, seq)` integer ids (NumPy or JAX), or a list of rows of any lengths.
        - `attention_mask`: optional 0/1 mask of `ids`' shape (an
          [`eqzoo.data.EncodedBatch`][]'s): only the positions marked 1 are decoded, so a
          left- or right-padded batch decodes to its texts.

        **Returns:** a list of strings, one a row.
        """
        return [self.decode(row) for row in rows_to_decode(ids, attention_mask, f"{type(self).__name__}.decode_batch")]

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder for one stream of ids (one row of
        [`eqzoo.generation.generate_stream`][]'s chunks): `push(ids)` returns the text the new
        ids complete, `flush()` the rest; joined, they are `decode(all ids)` however the ids were
        split (see [`eqzoo.data.StreamDecoder`][]).

        Built on `decode`: each push decodes the new ids with a few ids of context, so its cost
        does not grow with the text so far.

        **Returns:** a new [`eqzoo.data.StreamDecoder`][].
        """
        return StreamDecoder(self.decode, self.vocab_size, type(self).__name__)

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description of this tokenizer."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AbstractTokenizer":
        """Rebuild a tokenizer from the output of `to_dict()`."""


def _as_ids(ids: Any, vocab_size: int, who: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TokenizerError(
            f"{who}.decode takes a 1-D sequence of integer ids; got shape {arr.shape} and "
            f"dtype {arr.dtype}. Decode one sequence at a time (e.g. [tok.decode(r) for r in "
            "batch])."
        )
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise TokenizerError(
            f"{who}.decode needs ids in [0, {vocab_size}); got id {int(arr[i])} at position {i}. "
            "The ids were probably made by a different tokenizer (or a model with a larger "
            "vocabulary): decode with the tokenizer that encoded them."
        )
    return arr.astype(np.int64)


def _check_type(d: Mapping[str, Any], expected: str, keys: set[str], who: str) -> None:
    if not isinstance(d, Mapping) or d.get("type") != expected or set(d) != keys:
        got = dict(d) if isinstance(d, Mapping) else d
        raise ConfigError(
            f"{who}.from_dict expects a dict with exactly the keys {sorted(keys)} and "
            f"type={expected!r}; got {got!r}. Pass the output of {who}.to_dict(), or use "
            "eqzoo.data.tokenizer_from_dict to dispatch on the type."
        )


@final
class CharTokenizer(AbstractTokenizer):
    """A character-level tokenizer: each character of a fixed alphabet is one token.

    Token ids are positions in `chars`. A character outside the alphabet raises a
    `TokenizerError` naming it, unless an `unk` character is set, in which case it is encoded
    as `unk`'s id (and decodes as `unk`).

    **Arguments:**

    - `chars`: the alphabet, each character once; its order defines the ids.
    - `unk`: optional character (which must be in `chars`) that unknown characters map to.
    """

    def __init__(self, chars: str, *, unk: str | None = None):
        if len(chars) == 0 or len(set(chars)) != len(chars):
            dupes = sorted({c for c in chars if chars.count(c) > 1})
            raise ConfigError(
                "CharTokenizer needs a non-empty alphabet with each character once; got "
                f"{len(chars)} characters with duplicates {dupes!r}. Build it with "
                "CharTokenizer.from_text(text), which de-duplicates."
            )
        if unk is not None and (len(unk) != 1 or unk not in chars):
            raise ConfigError(
                f"CharTokenizer(unk=...) must be one character of the alphabet; got {unk!r}. "
                "Add it to `chars`, or use CharTokenizer.from_text(text, unk=...), which does."
            )
        self._chars = chars
        self._unk = unk
        # Look-up by binary search over sorted code points keeps encode vectorised (a corpus of
        # millions of characters encodes in milliseconds rather than a Python loop per char).
        self._codepoints = np.frombuffer(chars.encode("utf-32-le", errors="surrogatepass"), dtype="<u4").copy()
        self._order = np.argsort(self._codepoints, kind="stable").astype(np.int32)
        self._sorted = self._codepoints[self._order]

    @classmethod
    def from_text(cls, text: str, *, unk: str | None = None) -> "CharTokenizer":
        """The tokenizer whose alphabet is the sorted unique characters of `text`.

        **Arguments:**

        - `text`: the text to take the alphabet from (e.g. the training corpus).
        - `unk`: optional character unknown characters map to; added to the alphabet if absent.

        **Returns:** a `CharTokenizer`.
        """
        if unk is not None and not (isinstance(unk, str) and len(unk) == 1):
            raise ConfigError(f"CharTokenizer.from_text: unk must be one character; got {unk!r}.")
        chars = set(text)
        if unk is not None:
            chars.add(unk)
        if not chars:
            raise ConfigError(
                "CharTokenizer.from_text got empty text, so the alphabet would be empty. "
                "Pass the corpus the tokenizer will encode."
            )
        return cls("".join(sorted(chars)), unk=unk)

    @property
    def chars(self) -> str:
        """The alphabet; `chars[i]` is the character of id `i`."""
        return self._chars

    @property
    def unk(self) -> str | None:
        """The character unknown characters map to, or `None` if they raise."""
        return self._unk

    @property
    def vocab_size(self) -> int:
        """The number of characters in the alphabet."""
        return len(self._chars)

    def encode(self, text: str) -> Int[np.ndarray, " seq"]:
        """Encode `text` into int32 ids, one per character.

        **Raises:** `TokenizerError` naming the first character not in the alphabet (when
        `unk` is `None`).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"CharTokenizer.encode takes a str; got {type(text).__name__}.")
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        pos = np.minimum(np.searchsorted(self._sorted, cps), len(self._sorted) - 1)
        known = self._sorted[pos] == cps
        ids = self._order[pos]
        if not known.all():
            if self._unk is None:
                i = int(np.argmin(known))
                raise TokenizerError(
                    f"CharTokenizer cannot encode character {text[i]!r} (U+{ord(text[i]):04X}) "
                    f"at position {i}: it is not in the tokenizer's {self.vocab_size}-character "
                    "alphabet. Build the tokenizer from text that contains it, or pass "
                    "unk=<char> so unknown characters map to one id."
                )
            ids = np.where(known, ids, np.int32(self._chars.index(self._unk)))
        return ids.astype(np.int32)

    def decode(self, ids: Integer[np.ndarray, " seq"] | Integer[Array, " seq"] | Sequence[int]) -> str:
        """Decode ids into the string of their characters.

        **Raises:** `TokenizerError` for an id outside `[0, vocab_size)`.
        """
        arr = _as_ids(ids, self.vocab_size, "CharTokenizer")
        return self._codepoints[arr].tobytes().decode("utf-32-le", errors="surrogatepass")

    def to_dict(self) -> dict[str, Any]:
        """`{"type": "char", "chars": ..., "unk": ...}`, JSON-able."""
        return {"type": "char", "chars": self._chars, "unk": self._unk}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CharTokenizer":
        """Rebuild the tokenizer from `to_dict()`'s output."""
        _check_type(d, "char", {"type", "chars", "unk"}, "CharTokenizer")
        return cls(d["chars"], unk=d["unk"])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CharTokenizer)
            and other._chars == self._chars
            and other._unk == self._unk
        )

    def __hash__(self) -> int:
        return hash((CharTokenizer, self._chars, self._unk))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self._unk!r})"


@final
class ByteTokenizer(AbstractTokenizer):
    """A byte-level tokenizer: the UTF-8 bytes of the text are the ids (vocabulary of 256).

    Every valid string encodes (a lone surrogate, which UTF-8 cannot hold, raises
    `TokenizerError`); decoding replaces invalid UTF-8 (e.g. a sequence cut inside a
    multi-byte character) with U+FFFD rather than raising.
    """

    @property
    def vocab_size(self) -> int:
        """Always 256."""
        return 256

    def encode(self, text: str) -> Int[np.ndarray, " seq"]:
        """Encode `text` as its UTF-8 bytes, as int32 ids.

        **Raises:** `TokenizerError` for a `text` that is not a string or holds a lone
        surrogate (UTF-8 cannot encode it).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"ByteTokenizer.encode takes a str; got {type(text).__name__} (decode bytes first).")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TokenizerError(
                f"ByteTokenizer.encode: text[{err.start}] is the lone surrogate U+{ord(text[err.start]):04X}, which "
                "UTF-8 cannot encode (text decoded with errors='surrogateescape' holds them); clean it first, "
                "e.g. text.encode('utf-8', 'replace').decode('utf-8')."
            ) from None
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Integer[np.ndarray, " seq"] | Integer[Array, " seq"] | Sequence[int]) -> str:
        """Decode byte ids as UTF-8 with `errors="replace"`.

        **Raises:** `TokenizerError` for an id outside `[0, 256)`.
        """
        arr = _as_ids(ids, 256, "ByteTokenizer")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """`{"type": "byte"}`."""
        return {"type": "byte"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ByteTokenizer":
        """Rebuild the tokenizer from `to_dict()`'s output."""
        _check_type(d, "byte", {"type"}, "ByteTokenizer")
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_TOKENIZERS: dict[str, type[AbstractTokenizer]] = {"char": CharTokenizer, "byte": ByteTokenizer}


def tokenizer_from_dict(d: Mapping[str, Any]) -> AbstractTokenizer:
    """Rebuild any eqzoo tokenizer from its `to_dict()` output, dispatching on `d["type"]`:
    `"char"`, `"byte"`, or `"hf"` (an [`eqzoo.hf.HFTokenizer`][], which needs the `tokenizers`
    package).

    **Arguments:**

    - `d`: a dict made by `tokenizer.to_dict()` (e.g. read back from checkpoint metadata).

    **Returns:** the tokenizer.

    **Raises:** `ConfigError` for an unknown or missing `"type"`.
    """
    kind = d.get("type") if isinstance(d, Mapping) else None
    if kind == "hf":  # eqzoo.hf imports eqzoo.data: looked up here
        from ..hf import HFTokenizer

        return HFTokenizer.from_dict(d)
    if kind not in _TOKENIZERS:
        raise ConfigError(
            f"tokenizer_from_dict needs d['type'] to be one of {sorted([*_TOKENIZERS, 'hf'])}; got "
            f"{kind!r}. Pass the output of a tokenizer's to_dict()."
        )
    return _TOKENIZERS[kind].from_dict(d)
