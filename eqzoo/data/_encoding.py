"""Batches of encoded texts: padded token ids with their attention mask, and the checks that
batch encoding and decoding share across tokenizers."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Int

from .._errors import EqzooError, as_flag


class TokenizerError(EqzooError, ValueError):
    """Text or token ids that a tokenizer cannot encode or decode."""


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare the fields with numpy
class EncodedBatch:
    """Texts encoded and padded to one width: what `encode_batch` returns.

    Feeds decoding as `generate_batch(model, batch.ids, attention_mask=batch.attention_mask)`
    (either padding side) and, right-padded, training as `{"tokens": ids[:, :-1], "targets":
    ids[:, 1:], "mask": attention_mask[:, 1:]}` for [`eqzoo.train.lm_loss`][].

    **Fields:**

    - `ids`: int32 token ids, `(batch, seq)`; padding positions hold the pad token's id.
    - `attention_mask`: int32, `(batch, seq)`: 1 for a text's tokens, 0 for padding (as
      transformers' `attention_mask`).
    - `padding_side`: `"right"` or `"left"`, where the padding went.
    """

    ids: Int[np.ndarray, "batch seq"]
    attention_mask: Int[np.ndarray, "batch seq"]
    padding_side: str = "right"

    @property
    def lengths(self) -> Int[np.ndarray, " batch"]:
        """The number of tokens in each row (the mask's row sums), int32."""
        return self.attention_mask.sum(axis=1, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """`encode_batch`'s checked settings."""

    texts: list[str]
    padding: str
    max_length: int | None
    truncation: bool
    padding_side: str
    pad_to_multiple_of: int | None
    pad_token_id: int


def _positive_int(value: Any, name: str, who: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise TokenizerError(f"{who}: {name} must be a positive int or None; got {value!r}.")
    return int(value)


def _checked_texts(who: str, texts: Any) -> list[str]:
    """`texts` as a non-empty list of strings; a lone string (a common slip: it is a sequence of
    characters) and other items are refused."""
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise TokenizerError(
            f"{who} takes a list of strings; got {type(texts).__name__}. For one text use encode(text), "
            "or wrap it: encode_batch([text])."
        )
    texts = list(texts)
    if not texts:
        raise TokenizerError(f"{who} got an empty list of texts; give at least one.")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TokenizerError(f"{who} takes a list of strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}.")
    return texts


def _check_length_options(
    who: str, padding: str, max_length: int | None, truncation: bool, pad_to_multiple_of: int | None
) -> None:
    """Refuse combinations of the (individually valid) length options that cannot mean what the
    caller wants: a cut or a pad to no length, a `max_length` that nothing uses, and a cut that
    padding would then extend."""
    if max_length is None and (truncation or padding == "max_length"):
        need = "truncation=True" if truncation else "padding='max_length'"
        raise TokenizerError(
            f"{who}: {need} needs max_length (eqzoo has no model_max_length default); pass max_length=, "
            "e.g. the model's config.max_seq."
        )
    if max_length is not None and not truncation and padding != "max_length":
        raise TokenizerError(
            f"{who}: max_length={max_length} does nothing with padding='longest' and truncation=False; pass "
            "truncation=True to cut longer texts, padding='max_length' to pad every row to it, or drop max_length."
        )
    if truncation and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
        raise TokenizerError(
            f"{who}: truncation cuts to max_length={max_length}, which is not a multiple of "
            f"pad_to_multiple_of={pad_to_multiple_of}, so rows would be padded past the cut (transformers refuses "
            "this too); make max_length a multiple of it."
        )


def _resolved_pad_token_id(who: str, pad_token_id: Any, default_pad_token_id: int | None, vocab_size: int) -> int:
    """The id to pad with: the one passed, else the tokenizer's own; never a silent fallback
    (0 or eos), and always an id of the vocabulary."""
    if pad_token_id is None:
        pad_token_id = default_pad_token_id
    if pad_token_id is None:
        raise TokenizerError(
            f"{who}: this tokenizer has no pad token, and eqzoo never pads with 0 or eos silently. Pass "
            "pad_token_id= (e.g. pad_token_id=tokenizer.eos_token_id, the usual choice for decoder-only "
            "models: padding is masked out), or name one in tokenizer_config.json's pad_token (for "
            "HFTokenizer, special_tokens={'pad_token': ...})."
        )
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int | np.integer) or not 0 <= pad_token_id < vocab_size:
        raise TokenizerError(f"{who}: pad_token_id must be an id in [0, {vocab_size}); got {pad_token_id!r}.")
    return int(pad_token_id)


def check_batch_request(
    who: str, texts: Any, *, padding: Any, max_length: Any, truncation: Any, padding_side: Any,
    pad_to_multiple_of: Any, pad_token_id: Any, default_pad_token_id: int | None, vocab_size: int,
) -> BatchRequest:
    """Each setting of a batch encode checked, with a message that says how to fix it: the
    texts, then each option alone, then how the length options combine, then the pad id."""
    texts = _checked_texts(who, texts)
    if padding not in ("longest", "max_length"):
        raise TokenizerError(
            f"{who}: padding must be 'longest' (to the batch's longest text; transformers' padding=True) "
            f"or 'max_length' (to max_length); got {padding!r}. Batches are always padded: the ids form one array."
        )
    if (flag := as_flag(truncation)) is None:
        raise TokenizerError(f"{who}: truncation must be True or False; got {truncation!r}.")
    truncation = flag
    if padding_side not in ("right", "left"):
        raise TokenizerError(
            f"{who}: padding_side must be 'right' or 'left' (left for decoder-only generation); got {padding_side!r}."
        )
    max_length = _positive_int(max_length, "max_length", who)
    pad_to_multiple_of = _positive_int(pad_to_multiple_of, "pad_to_multiple_of", who)
    _check_length_options(who, padding, max_length, truncation, pad_to_multiple_of)
    pad_token_id = _resolved_pad_token_id(who, pad_token_id, default_pad_token_id, vocab_size)
    return BatchRequest(texts, padding, max_length, truncation, padding_side, pad_to_multiple_of, pad_token_id)


def check_fits(lengths: Sequence[int], request: BatchRequest, who: str) -> None:
    """Under `padding="max_length"`, a `TokenizerError` for a row longer than `max_length`."""
    if request.padding != "max_length":
        return
    too_long = [i for i, n in enumerate(lengths) if n > request.max_length]
    if too_long:
        i = too_long[0]
        raise TokenizerError(
            f"{who}: text {i} has {lengths[i]} tokens, more than max_length={request.max_length} "
            f"(texts {too_long[:8]} are too long); pass truncation=True to cut them, or a larger max_length."
        )


def pad_rows(rows: Sequence[np.ndarray], request: BatchRequest, who: str) -> EncodedBatch:
    """Token rows (already truncated where asked) padded as `request` says, into one batch."""
    lengths = [len(r) for r in rows]
    check_fits(lengths, request, who)
    width = request.max_length if request.padding == "max_length" else max(lengths)
    if request.pad_to_multiple_of is not None:
        width = -(-width // request.pad_to_multiple_of) * request.pad_to_multiple_of
    ids = np.full((len(rows), width), request.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        start = width - len(row) if request.padding_side == "left" else 0
        ids[i, start : start + len(row)] = row
        mask[i, start : start + len(row)] = 1
    return EncodedBatch(ids, mask, request.padding_side)


def rows_to_decode(ids: Any, attention_mask: Any, who: str) -> list[np.ndarray]:
    """The rows of a batch of ids (a 2-D array, or a list of 1-D sequences of any lengths),
    each without the positions `attention_mask` marks 0."""
    if attention_mask is None:
        if isinstance(ids, list | tuple):  # rows of any lengths, as transformers' batch_decode takes
            return [np.asarray(row) for row in ids]
        arr = np.asarray(ids)
        if arr.ndim != 2:
            raise TokenizerError(
                f"{who} takes a batch of id rows, (batch, seq); got shape {arr.shape}. For one sequence "
                "use decode(ids)."
            )
        return list(arr)
    arr, mask = np.asarray(ids), np.asarray(attention_mask)
    if arr.ndim != 2 or mask.shape != arr.shape:
        raise TokenizerError(
            f"{who}: attention_mask must have the ids' shape (batch, seq); got ids {arr.shape} and mask {mask.shape}."
        )
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_) or not np.isin(mask, (0, 1)).all():
        raise TokenizerError(f"{who}: attention_mask must hold 0 (padding) and 1 (token); got dtype {mask.dtype}.")
    return [row[m.astype(bool)] for row, m in zip(arr, mask, strict=True)]
