"""Packing whole documents into fixed-length rows, with segment ids so none attends to another."""

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .._errors import ConfigError, ShapeError, shape_str

PackedArrays = dict[str, np.ndarray]
_INT32_MAX = int(np.iinfo(np.int32).max)
_END = object()


def _as_document(i: int, doc, name: str = "document") -> np.ndarray:
    arr = np.asarray(doc)
    if arr.ndim != 1:
        raise ShapeError(
            f"pack_documents: {name} {i} must be a 1-D sequence of token ids; got shape "
            f"{shape_str(arr.shape)}. Pass one token list per document."
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ShapeError(
            f"pack_documents: {name} {i} must hold integer token ids; got dtype {arr.dtype}. "
            "Encode text with a tokenizer first (eqzoo.data.ByteTokenizer().encode(text))."
        )
    if arr.size and int(arr.min()) < 0:
        raise ShapeError(f"pack_documents: {name} {i} holds a negative token id ({int(arr.min())}).")
    if arr.size and int(arr.max()) > _INT32_MAX:
        raise ShapeError(
            f"pack_documents: {name} {i} holds token id {int(arr.max())}, beyond int32 (the "
            "packed arrays' dtype); no vocabulary is that large: check the tokenizer's output."
        )
    # A copy: the caller may reuse its buffer for the next document (a generator's).
    return np.array(arr, dtype=np.int32)


def pack_documents(
    documents: Iterable[Any],  # sequences of ints; checked below with clearer messages
    seq_len: int,
    *,
    eos_id: int | None = None,
    target_masks: Iterable[Any] | None = None,
    pad_id: int = 0,
    num_bins: int = 64,
) -> PackedArrays:
    """Pack whole documents into rows of `seq_len` positions for next-token training, several
    to a row, each in its own segment.

    Document `d` of `n` tokens gives the `n - 1` next-token pairs `d[i] -> d[i + 1]`. Its pairs
    go into one row when they fit (`n - 1 <= seq_len`); a longer document is cut into pieces
    of `seq_len` pairs (the last piece shorter), each piece its own segment starting at
    position 0. Pieces are placed best-fit into a window of `num_bins` open rows, in the order
    the documents come: a piece goes into the open row it fills most tightly; when none has
    room, the fullest open row is finished and a new one opened. Documents are never split to
    fill a row, and no token is dropped: every pair appears exactly once.

    Train on the result with [`eqzoo.data.ArrayLoader`][] (it shuffles the rows each epoch)
    and [`eqzoo.train.lm_loss`][], which passes `segment_ids` and `positions` to the model so
    attention stays inside each document and positions restart at 0 (the logits of a packed
    document equal those it gets alone; tested).

    **Arguments:**

    - `documents`: an iterable of 1-D integer token sequences (lists or numpy arrays); it is
      read once, so a generator works. Empty documents and those of one token (no pair) are
      skipped, unless `eos_id` gives them a pair.
    - `seq_len`: positions per row (the model's training sequence length).
    - `eos_id`: if given, appended to every document, so the model learns to end one.
    - `target_masks`: optional, one boolean sequence per document, as long as the document:
      which tokens count as targets (for fine-tuning on responses only, mark the prompt's
      tokens `False`). The appended `eos_id` counts. Default: every target counts.
    - `pad_id`: the token id of unused positions (they never count).
    - `num_bins`: how many rows are open at once. More packs tighter at a little more time per
      document (the `mask.mean()` of the result is the fraction of positions used).

    **Returns:** a dict of numpy arrays of shape `(rows, seq_len)`:

    - `"tokens"`, `"targets"` (int32): inputs and next-token targets; `targets[r, t]` is the
      token after `tokens[r, t]` in the same document.
    - `"segment_ids"` (int32): `1, 2, ...` for the pieces of a row in order, `0` for padding.
    - `"positions"` (int32): the offset of each position within its piece.
    - `"mask"` (bool): positions whose target counts (in a piece and, with `target_masks`,
      marked).

    **Raises:** `ConfigError` for a bad `seq_len`/`num_bins`/`pad_id`/`eos_id`, when no
    document has a pair, or when `target_masks` leave no target counted in any document; `ShapeError` for a document that is not 1-D integer ids, or a target
    mask of another length.
    """
    _check_arguments(documents, seq_len, num_bins, pad_id, eos_id)
    masks = None if target_masks is None else iter(target_masks)
    bins = _BestFit(seq_len, num_bins)
    count = 0
    for i, doc in enumerate(documents):  # read once, each document placed before the next is read
        count += 1
        tokens, weights = _document(i, doc, masks, eos_id)
        pairs = tokens.shape[0] - 1
        for start in range(0, max(pairs, 0), seq_len):
            m = min(seq_len, pairs - start)
            bins.place((tokens[start : start + m + 1], weights[start + 1 : start + m + 1]))
    if masks is not None and next(masks, _END) is not _END:
        raise ShapeError(f"pack_documents: more target masks than the {count} documents.")
    rows = bins.rows()
    if not rows:
        raise ConfigError(
            f"pack_documents: none of the {count} documents has two tokens (a next-token pair); "
            "pass longer documents, or eos_id to give each one an end-of-document target."
        )
    packed = _arrays(rows, seq_len, pad_id)
    if masks is not None and not packed["mask"].any():
        raise ConfigError(
            f"pack_documents: the target masks count no target in any of the {count} documents, so a loss "
            "on the result would average nothing and train nothing. A document's first token is never a "
            "target (targets are tokens 1 .. n - 1), so a mask marking only it counts none. Mark the "
            "tokens to be predicted True (for instruction tuning, the response and its end token; "
            "eqzoo.hf.HFTokenizer.encode_chat gives such masks), or pass eos_id to count an end token."
        )
    return packed


def _check_arguments(documents: Any, seq_len: Any, num_bins: Any, pad_id: Any, eos_id: Any) -> None:
    for name, value, minimum in (("seq_len", seq_len, 1), ("num_bins", num_bins, 1), ("pad_id", pad_id, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not minimum <= value <= _INT32_MAX:
            raise ConfigError(f"pack_documents: {name} must be an integer in [{minimum}, 2**31 - 1]; got {value!r}.")
    if eos_id is not None and (
        isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or not 0 <= eos_id <= _INT32_MAX
    ):
        raise ConfigError(f"pack_documents: eos_id must be None or an integer in [0, 2**31 - 1]; got {eos_id!r}.")
    if isinstance(documents, np.ndarray) and documents.ndim == 1:
        raise ShapeError(
            "pack_documents takes an iterable of documents (one token sequence each); got one 1-D "
            "array. Wrap a single document in a list: pack_documents([tokens], seq_len)."
        )


def _document(i: int, doc: Any, masks: Iterator[Any] | None, eos_id: int | np.integer | None) -> tuple[np.ndarray, np.ndarray]:
    """Document `i`'s tokens (int32) and target weights (bool, as long), with `eos_id`
    appended (a target that counts) when given; its mask is the next of `masks`."""
    tokens = _as_document(i, doc)
    if masks is None:
        weights = np.ones(tokens.shape[0], bool)
    else:
        try:
            weights = np.array(next(masks), dtype=bool)  # a copy, as for the tokens
        except StopIteration:
            raise ShapeError(f"pack_documents: target_masks ran out at document {i}; give one mask per document.") from None
        if weights.shape != tokens.shape:
            raise ShapeError(
                f"pack_documents: target mask {i} has shape {shape_str(weights.shape)} but "
                f"document {i} has {tokens.shape[0]} tokens; they must match."
            )
    if eos_id is not None:
        tokens = np.append(tokens, np.int32(eos_id))
        weights = np.append(weights, True)
    return tokens, weights


# A piece is (tokens of length m + 1, target mask of length m); rows are lists of pieces.
_Piece = tuple[np.ndarray, np.ndarray]


class _BestFit:
    """Best-fit packing of pieces into rows of `seq_len` pairs, `num_bins` rows open at once."""

    def __init__(self, seq_len: int | np.integer, num_bins: int | np.integer):
        self.seq_len, self.num_bins = seq_len, num_bins
        self.finished: list[list[_Piece]] = []
        self.open_rows: list[list[_Piece]] = []
        self.room: list[int] = []

    def place(self, piece: _Piece) -> None:
        """Put `piece` in the open row it fills most tightly; when none has room, finish the
        fullest open row (when `num_bins` are open) and open a new one. A row left with no
        room is finished at once, its slot freed for another."""
        m = piece[1].shape[0]
        if m == self.seq_len:
            self.finished.append([piece])
            return
        fits = [i for i, r in enumerate(self.room) if r >= m]
        i = min(fits, key=lambda j: self.room[j]) if fits else self._open_row()
        self.open_rows[i].append(piece)
        self.room[i] -= m
        if self.room[i] == 0:
            self.finished.append(self.open_rows.pop(i))
            self.room.pop(i)

    def _open_row(self) -> int:
        if len(self.open_rows) == self.num_bins:
            full = min(range(len(self.room)), key=lambda j: self.room[j])
            self.finished.append(self.open_rows.pop(full))
            self.room.pop(full)
        self.open_rows.append([])
        self.room.append(self.seq_len)
        return len(self.room) - 1

    def rows(self) -> list[list[_Piece]]:
        """Every row: the finished ones in the order they were finished, then the open ones."""
        return self.finished + self.open_rows


def _arrays(rows: list[list[_Piece]], seq_len: int | np.integer, pad_id: int | np.integer) -> PackedArrays:
    """The rows of pieces as `pack_documents`' arrays."""
    out = {
        "tokens": np.full((len(rows), seq_len), pad_id, np.int32),
        "targets": np.full((len(rows), seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((len(rows), seq_len), np.int32),
        "positions": np.zeros((len(rows), seq_len), np.int32),
        "mask": np.zeros((len(rows), seq_len), bool),
    }
    for r, pieces in enumerate(rows):
        at = 0
        for s, (tokens, weights) in enumerate(pieces, start=1):
            m = weights.shape[0]
            out["tokens"][r, at : at + m] = tokens[:-1]
            out["targets"][r, at : at + m] = tokens[1:]
            out["segment_ids"][r, at : at + m] = s
            out["positions"][r, at : at + m] = np.arange(m)
            out["mask"][r, at : at + m] = weights
            at += m
    return out
