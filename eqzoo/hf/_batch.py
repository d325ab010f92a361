"""`HFTokenizer`'s batch path: encoding a padded (and maybe truncated) batch with the
`tokenizers` library's batch encoder, and decoding one.

The shared `tokenizers.Tokenizer` is never reconfigured: batch calls pad and truncate with a
copy of it (`BatchEncoder`), so that single encodes on the shared one need no lock."""

import copy
import threading
from typing import Any

import numpy as np

from .._errors import as_flag
from ..data import EncodedBatch, TokenizerError
from ..data._encoding import check_batch_request, check_fits, rows_to_decode

SIDES = ("right", "left")


def check_side(value: Any, name: str, who: str, *, why: str = "") -> str:
    """`value` after checking it is `"right"` or `"left"`."""
    if value not in SIDES:
        raise TokenizerError(f"{who}: {name} must be 'right' or 'left'{why}; got {value!r}.")
    return value


class BatchEncoder:
    """One copy of a `tokenizers.Tokenizer` for batch calls, reconfigured for each call's
    padding and truncation under its own lock, so the shared tokenizer is never reconfigured
    and single encodes on it need no lock (batch calls take turns; each is parallel in Rust).
    The copy is made on the first batch call (about as costly as reading the tokenizer.json
    again: it is serialised and parsed) and made afresh when the tokenizer it was made from is
    replaced (`hf.tokenizer = ...`) or gains tokens (`add_tokens`, `add_special_tokens`).
    Setting a padding or truncation length costs next to nothing, so a length that changes
    with every call (a per-request `max_length`) is as fast as a fixed one."""

    def __init__(self):
        self._source: tuple[Any, int] | None = None  # what the copy was made from, compared by identity
        self._copy: Any = None
        self._lock = threading.Lock()

    def encode(
        self, tokenizer: Any, texts: list[str], padding: dict[str, Any], truncation: dict[str, Any] | None,
        add_special_tokens: bool,
    ) -> list[Any]:
        """`tokenizer.encode_batch(texts)` with `padding` (`enable_padding`'s arguments) and
        `truncation` (`enable_truncation`'s, or `None` for none: any truncation the tokenizer
        carries is switched off) on, run on the copy."""
        source = (tokenizer, tokenizer.get_vocab_size(with_added_tokens=True))
        with self._lock:
            if self._source is None or self._source[0] is not source[0] or self._source[1] != source[1]:
                self._copy, self._source = copy.copy(tokenizer), source
            tok = self._copy
            if truncation is None:
                tok.no_truncation()
            else:
                tok.enable_truncation(**truncation)
            tok.enable_padding(**padding)
            return tok.encode_batch(texts, add_special_tokens=add_special_tokens)


def encode_batch(
    hf: Any, texts: Any, *, padding: Any, max_length: Any, truncation: Any, truncation_side: Any,
    padding_side: Any, pad_to_multiple_of: Any, pad_token_id: Any, add_special_tokens: Any,
) -> EncodedBatch:
    """`HFTokenizer.encode_batch` (which documents the arguments) for the `HFTokenizer` `hf`."""
    who = "HFTokenizer.encode_batch"
    request = check_batch_request(
        who, texts, padding=padding, max_length=max_length, truncation=truncation,
        padding_side=hf.padding_side if padding_side is None else padding_side,
        pad_to_multiple_of=pad_to_multiple_of, pad_token_id=pad_token_id,
        default_pad_token_id=hf.pad_token_id, vocab_size=hf.vocab_size,
    )
    truncation_side = check_side(hf.truncation_side if truncation_side is None else truncation_side, "truncation_side", who)
    if as_flag(add_special_tokens) is None:
        raise TokenizerError(f"{who}: add_special_tokens must be True or False; got {add_special_tokens!r}.")
    try:
        encodings = hf._batch_encoder.encode(
            hf.tokenizer, request.texts,
            # A fixed length pads shorter rows and leaves longer ones as they are (checked below).
            dict(
                direction=request.padding_side, pad_id=request.pad_token_id,
                pad_token=hf.tokenizer.id_to_token(request.pad_token_id),
                length=request.max_length if request.padding == "max_length" else None,
                pad_to_multiple_of=request.pad_to_multiple_of,
            ),
            dict(max_length=request.max_length, stride=0, strategy="longest_first", direction=truncation_side)
            if request.truncation else None,
            bool(add_special_tokens),
        )
    except Exception as err:  # the Rust side raises a bare Exception (a max_length below the special tokens' count, say)
        raise TokenizerError(f"{who}: the tokenizers library refused the batch: {err}") from None
    masks = [e.attention_mask for e in encodings]
    check_fits([sum(m) for m in masks], request, who)
    return EncodedBatch(
        np.asarray([e.ids for e in encodings], dtype=np.int32), np.asarray(masks, dtype=np.int32), request.padding_side
    )


def check_ids(arr: np.ndarray, vocab_size: int) -> None:
    """A `TokenizerError` unless every id in `arr` lies in `[0, vocab_size)`."""
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise TokenizerError(f"token ids must lie in [0, {vocab_size}); got ids from {arr.min()} to {arr.max()}.")


def decode_batch(hf: Any, ids: Any, attention_mask: Any, *, skip_special_tokens: bool) -> list[str]:
    """`HFTokenizer.decode_batch` (which documents the arguments) for the `HFTokenizer` `hf`."""
    rows = rows_to_decode(ids, attention_mask, "HFTokenizer.decode_batch")
    for row in rows:
        if row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)):
            raise TokenizerError(
                f"HFTokenizer.decode_batch takes rows of integer ids; got a row of shape {row.shape} and dtype {row.dtype}."
            )
        check_ids(row, hf.vocab_size)
    return hf.tokenizer.decode_batch([[int(i) for i in row] for row in rows], skip_special_tokens=skip_special_tokens)
