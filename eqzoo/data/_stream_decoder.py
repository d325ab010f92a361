"""Incremental detokenization: the text of a token stream, a chunk at a time, for any tokenizer."""

from collections.abc import Callable
from typing import Any, final

import numpy as np

from ._encoding import TokenizerError

# What a decoder writes for bytes that are not (yet) a whole UTF-8 character.
_REPLACEMENT = "\ufffd"
# Tokens of context decoded before the new ones, so that they decode as they do mid-text (a
# SentencePiece "▁" is a space there, not at the start). More are taken where these would start
# inside a character.
_CONTEXT = 2
# A character split across tokens spans at most 4 of them (4 UTF-8 bytes, one or more a token):
# how far back `push` looks for the end of the last whole character.
_SPLIT = 4


@final
class StreamDecoder:
    """The text of a stream of token ids, a piece at a time: for showing tokens as they are
    generated (see [`eqzoo.generation.generate_stream`][]).

    Decoding each chunk of ids on its own gives wrong text: a chunk boundary can cut a
    multi-byte UTF-8 character in two (byte-level BPE: GPT-2, Llama 3), and SentencePiece-style
    tokenizers (Llama 2, Gemma: "▁" starts a word) decode a token differently at the start of a
    string. `push(ids)` returns only the text the new ids complete, holding back a character
    that is not whole yet; `flush()` returns what is held at the end. For any split of a
    sequence of ids into pushes, the pushed texts and `flush()` joined are `decode(all ids)`,
    exactly.

    Each push decodes the new ids with a few tokens of context (the last ones already written,
    and any held back), never the whole text so far: its cost depends on the chunk, not on the
    length of the stream. Ids that decode to nothing but U+FFFD (invalid UTF-8 bytes, as an
    untrained model may emit) are held until a character follows them, `flush()`, or (for a
    long run) until later ids show that no character can end in them: then their U+FFFD are
    written, all but the last few ids' (a long run costs each push a bounded number of decoded
    ids too).

    Made by a tokenizer's `stream_decoder()`
    ([`eqzoo.data.AbstractTokenizer.stream_decoder`][],
    [`eqzoo.hf.HFTokenizer.stream_decoder`][]); one decoder per stream (per row of a batch).

    ```python
    decoder = tokenizer.stream_decoder()
    for chunk in generate_stream(model, prompts, max_new_tokens=64):
        print(decoder.push(chunk.tokens[0, :chunk.counts[0]]), end="", flush=True)
    print(decoder.flush())
    ```
    """

    def __init__(self, decode: Callable[[list[int]], str], vocab_size: int, name: str = "StreamDecoder"):
        """**Arguments:**

        - `decode`: a function from a list of ids to their text (a tokenizer's `decode`).
        - `vocab_size`: ids must lie in `[0, vocab_size)`.
        - `name`: the tokenizer's name, for error messages.
        """
        self._decode = decode
        self._vocab_size = int(vocab_size)
        self._name = name
        self._ids: list[int] = []  # context, then the ids whose text is not yet returned
        self._start = 0  # where in _ids the held ids start
        self._offset = 0  # len(decode(_ids[:_start])): the characters already returned or context

    def push(self, ids: Any) -> str:
        """Add the next ids of the stream; return the text they complete.

        **Arguments:**

        - `ids`: a 1-D sequence of integer ids (NumPy, JAX, a list), possibly empty, or one id.

        **Returns:** the new text: empty while the ids so far end inside a character.

        **Raises:** `TokenizerError` for ids that are not a 1-D integer sequence, or outside
        `[0, vocab_size)`.
        """
        self._ids += self._check(ids)
        n = len(self._ids)
        if n == self._start:
            return ""
        # The text up to the end of the last whole character: usually the last id; a character
        # still cut ends within the last few.
        full = text = self._decode(self._ids)  # the text of all the ids so far
        for cut in range(n, max(self._start, n - _SPLIT), -1):
            text = full if cut == n else self._decode(self._ids[:cut])
            if not text.endswith(_REPLACEMENT):
                break
        else:
            # held: the ids end inside a character, or decode to U+FFFD alone (invalid bytes).
            return self._release(n, full)
        new = text[self._offset :]
        self._trim(cut, text)
        return new

    def flush(self) -> str:
        """The text of the ids held back (a character still cut at the end of the stream
        decodes to U+FFFD, as in `decode`); the decoder is then empty, ready for a new stream.

        **Returns:** the rest of the text.
        """
        rest = self._decode(self._ids)[self._offset :] if len(self._ids) > self._start else ""
        self._ids, self._start, self._offset = [], 0, 0
        return rest

    def _release(self, n: int, full: str) -> str:
        # A held run of ids that decode to U+FFFD alone would be decoded again on every push, for
        # as long as it runs (an untrained model emits such runs): O(n^2) over the stream. Its
        # leading part is written as decode writes it once no character can still end in it: a
        # character is at most 4 UTF-8 bytes, so one that starts before the last _SPLIT ids and
        # is not whole in `full` (the text of all ids so far) would need more than 4 bytes when
        # those ids hold 4 or more (each U+FFFD or character of their text is at least a byte).
        cut = n - _SPLIT
        if cut <= self._start or len(self._decode(self._ids[cut:])) < _SPLIT:
            return ""
        text = self._decode(self._ids[:cut])
        if not full.startswith(text):  # a character does end past `cut`: keep holding
            return ""
        new = text[self._offset :]
        self._trim(cut, text)
        return new

    def _trim(self, cut: int, text: str) -> None:
        # Keep a few ids before `cut` as context: the fewest (from _CONTEXT) whose text is the
        # end of `text` (not starting inside a character, nor decoding otherwise at the start),
        # and not empty: ids that decode to nothing (special tokens skipped) place the next ones
        # at the start of a text, where WordPiece and SentencePiece decoders write no space.
        for keep in range(min(_CONTEXT, cut), min(_CONTEXT + _SPLIT, cut) + 1):
            context = self._decode(self._ids[cut - keep : cut])
            if context and text.endswith(context):
                self._ids = self._ids[cut - keep :]
                self._start, self._offset = keep, len(context)
                return
        self._start, self._offset = cut, len(text)  # no such context yet: keep them all

    def _check(self, ids: Any) -> list[int]:
        arr = np.asarray(ids)
        if arr.ndim == 0 and arr.size == 1:
            arr = arr.reshape(1)
        if arr.size == 0:
            return []
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(
                f"{self._name} stream decoder: push takes a 1-D sequence of integer ids; got shape "
                f"{arr.shape} and dtype {arr.dtype}. Push one row's new ids, e.g. "
                "chunk.tokens[i, :chunk.counts[i]], with one decoder per row."
            )
        bad = (arr < 0) | (arr >= self._vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise TokenizerError(
                f"{self._name} stream decoder: ids must lie in [0, {self._vocab_size}); got id "
                f"{int(arr[i])} at position {i} of this push. Decode with the tokenizer that made the ids."
            )
        return arr.tolist()

    def __repr__(self) -> str:
        return f"StreamDecoder({self._name}, held={len(self._ids) - self._start})"

