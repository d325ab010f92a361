"""`HFTokenizer`'s batch path: encoding a padded (and maybe truncated) batch with the
`tokenizers` library's batch encoder, and decoding one.

The shared `tokenizers.Tokenizer` is never reconfigured: each distinct padding and truncation
setting gets its own copy of it, configured once and kept, so that single encodes on the
shared one need no lock."""

import collections
import copy
import threading
from typing import Any

import numpy as np

from ..data import EncodedBatch, TokenizerError
from ..data._encoding import check_batch_request, check_fits, rows_to_decode

SIDES = ("right", "left")


def check_side(value: Any, name: str, who: str, *, why: str = "") -> str:
    """`value` after checking it is `"right"` or `"left"`."""
    if value not in SIDES:
        raise TokenizerError(f"{who}: {name} must be 'right' or 'left'{why}; got {value!r}.")
    return value


class BatchEncoders:
    """Copies of one `tokenizers.Tokenizer`, each with one padding and truncation setting
    switched on; the most recently used `size` are kept. Copying costs about as much as
    reading the tokenizer.json again (it is serialised and parsed), so a serving loop that
    keeps its settings pays it once."""

    def __init__(self, tokenizer: Any, size: int = 8):
        self._tokenizer = tokenizer
        self._size = size
        self._copies: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._lock = threading.Lock()  # guards the dict only; encoding runs outside it

    def get(self, padding: dict[str, Any], truncation: dict[str, Any] | None) -> Any:
        """The copy with `padding` (`enable_padding`'s arguments) and `truncation`
        (`enable_truncation`'s, or `None` for none) switched on."""
        key = (tuple(sorted(padding.items())), None if truncation is None else tuple(sorted(truncation.items())))
        with self._lock:
            found = self._copies.get(key)
            if found is not None:
                self._copies.move_to_end(key)
                return found
        tok = copy.copy(self._tokenizer)  # outside the lock: other settings' batches go on meanwhile
        if truncation is not None:
            tok.enable_truncation(**truncation)
        tok.enable_padding(**padding)
        with self._lock:
            tok = self._copies.setdefault(key, tok)  # another thread's copy, if it made one first
            self._copies.move_to_end(key)
            while len(self._copies) > self._size:
                self._copies.popitem(last=False)
        return tok


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
    if not isinstance(add_special_tokens, bool):
        raise TokenizerError(f"{who}: add_special_tokens must be True or False; got {add_special_tokens!r}.")
    try:
        tok = hf._batch_encoders.get(
            # A fixed length pads shorter rows and leaves longer ones as they are (checked below).
            dict(
                direction=request.padding_side, pad_id=request.pad_token_id,
                pad_token=hf.tokenizer.id_to_token(request.pad_token_id),
                length=request.max_length if request.padding == "max_length" else None,
                pad_to_multiple_of=request.pad_to_multiple_of,
            ),
            dict(max_length=request.max_length, stride=0, strategy="longest_first", direction=truncation_side)
            if request.truncation else None,
        )
        encodings = tok.encode_batch(request.texts, add_special_tokens=add_special_tokens)
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
