"""`pack_documents`: every next-token pair of every document appears once, inside one segment
whose positions restart at 0; target masks; errors."""

import numpy as np
import pytest

from eqzoo import data
from eqzoo._errors import ConfigError, ShapeError


def _documents(seed=0, n=40, max_len=30):
    """Documents whose token ids name them: token `1000 * (d + 1) + j` is token j of document d."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, n)
    return [1000 * (d + 1) + np.arange(length) for d, length in enumerate(lengths)]


def _segments(packed):
    """Yield (row, slice) for every segment of every row."""
    for r, seg in enumerate(packed["segment_ids"]):
        ids = [int(s) for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1))  # numbered 1.. in order
        for s in ids:
            (where,) = np.nonzero(seg == s)
            assert np.all(np.diff(where) == 1)  # contiguous
            yield r, slice(where[0], where[-1] + 1)


@pytest.mark.parametrize("num_bins", [1, 4, 64])
def test_every_pair_once_in_its_own_segment(num_bins):
    docs = _documents()
    seq_len = 16  # shorter than some documents: they are cut into pieces
    packed = data.pack_documents(docs, seq_len, num_bins=num_bins)
    assert {k: v.shape for k, v in packed.items()} == {k: packed["tokens"].shape for k in packed}
    assert packed["tokens"].shape[1] == seq_len
    seen = []
    for r, sl in _segments(packed):
        tokens, targets = packed["tokens"][r, sl], packed["targets"][r, sl]
        np.testing.assert_array_equal(packed["positions"][r, sl], np.arange(len(tokens)))
        assert packed["mask"][r, sl].all()
        # Every pair is a next-token pair of one document.
        assert np.all(targets == tokens + 1) and np.all(tokens // 1000 == targets // 1000)
        seen.extend(tokens.tolist())
    expected = [int(t) for d in docs for t in d[:-1]]
    assert sorted(seen) == sorted(expected)  # each pair exactly once, none lost
    padding = packed["segment_ids"] == 0
    assert not packed["mask"][padding].any() and np.all(packed["tokens"][padding] == 0)
    # Padding only at the end of a row.
    assert all(np.all(np.diff(row == 0) >= 0) for row in packed["segment_ids"])


def test_more_bins_pack_tighter_and_one_bin_keeps_document_order():
    docs = _documents(seed=1, n=200)
    fill = {b: data.pack_documents(docs, 32, num_bins=b)["mask"].mean() for b in (1, 64)}
    assert fill[64] > fill[1]
    one = data.pack_documents(docs, 32, num_bins=1)
    firsts = [one["tokens"][r, sl][0] // 1000 for r, sl in _segments(one)]
    assert firsts == sorted(firsts)  # next-fit: documents appear in the order given


def test_long_document_pieces_restart_positions():
    doc = np.arange(1, 25)  # 23 pairs
    packed = data.pack_documents([doc], 10)
    pieces = [(packed["tokens"][r, sl], packed["positions"][r, sl]) for r, sl in _segments(packed)]
    assert sorted(len(t) for t, _ in pieces) == [3, 10, 10]
    assert all(np.array_equal(p, np.arange(len(t))) for t, p in pieces)


def test_eos_and_target_masks():
    prompt_then_answer = [np.array([5, 6, 7, 8]), np.array([9, 10, 11])]
    masks = [np.array([False, False, True, True]), np.array([False, True, True])]
    packed = data.pack_documents(prompt_then_answer, 8, eos_id=2, target_masks=masks)
    counted = sorted(zip(packed["tokens"][packed["mask"]].tolist(), packed["targets"][packed["mask"]].tolist(), strict=True))
    # Only the answer tokens and the appended end-of-document token are targets.
    assert counted == sorted([(6, 7), (7, 8), (8, 2), (9, 10), (10, 11), (11, 2)])
    # A one-token document still gets its end-of-document pair with eos_id.
    assert data.pack_documents([[4]], 4, eos_id=2)["mask"].sum() == 1


def test_a_generator_that_reuses_its_buffer():
    """Documents are copied as they are read: a producer may overwrite its buffer."""

    def reused():
        buf = np.zeros(4, np.int32)
        for doc in ([1, 2, 3], [4, 5, 6, 7], [8, 9]):
            buf[: len(doc)] = doc
            yield buf[: len(doc)]

    packed = data.pack_documents(reused(), 16, num_bins=1)
    assert packed["tokens"][0, :6].tolist() == [1, 2, 4, 5, 6, 8]


def test_generator_input_and_array_loader():
    packed = data.pack_documents((d for d in _documents(n=60)), 16)
    loader = data.ArrayLoader(packed, batch_size=4, seed=0)
    batch = next(loader)
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "mask"}
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32


def test_memory_mapped_packed_arrays_give_the_same_batches(tmp_path):
    packed = data.pack_documents(_documents(n=60), 16)
    for name, array in packed.items():
        np.save(tmp_path / f"{name}.npy", array)
    mapped = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in packed}
    in_memory, from_disk = data.ArrayLoader(packed, batch_size=4, seed=0), data.ArrayLoader(mapped, batch_size=4, seed=0)
    for _ in range(3):
        a, b = next(in_memory), next(from_disk)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_pack_documents_errors():
    docs = [np.arange(5)]
    with pytest.raises(ConfigError, match=r"seq_len must be an integer in \[1, 2\*\*31 - 1\]; got 0"):
        data.pack_documents(docs, 0)
    with pytest.raises(ConfigError, match=r"num_bins must be an integer in \[1,"):
        data.pack_documents(docs, 8, num_bins=0)
    with pytest.raises(ConfigError, match=r"eos_id must be None or an integer in \[0, 2\*\*31 - 1\]"):
        data.pack_documents(docs, 8, eos_id=-1)
    with pytest.raises(ConfigError, match=r"pad_id must be an integer in \[0, 2\*\*31 - 1\]; got 4294967296"):
        data.pack_documents(docs, 8, pad_id=2**32)
    with pytest.raises(ShapeError, match=r"document 0 holds token id 2147483648, beyond int32"):
        data.pack_documents([np.array([1, 2**31])], 8)
    with pytest.raises(ShapeError, match=r"got one 1-D array. Wrap a single document in a list"):
        data.pack_documents(np.arange(5), 8)
    with pytest.raises(ShapeError, match=r"document 1 must hold integer token ids; got dtype float64"):
        data.pack_documents([np.arange(3), np.ones(3)], 8)
    with pytest.raises(ShapeError, match=r"document 0 must be a 1-D sequence"):
        data.pack_documents([np.ones((2, 2), int)], 8)
    with pytest.raises(ShapeError, match=r"negative token id \(-3\)"):
        data.pack_documents([[1, -3]], 8)
    with pytest.raises(ShapeError, match=r"target mask 0 has shape \(2,\) but document 0 has 5 tokens"):
        data.pack_documents(docs, 8, target_masks=[[True, True]])
    with pytest.raises(ShapeError, match=r"target_masks ran out at document 1"):
        data.pack_documents([[1, 2], [3, 4]], 8, target_masks=[[True, True]])
    with pytest.raises(ShapeError, match=r"more target masks than the 1 documents"):
        data.pack_documents([[1, 2]], 8, target_masks=[[True, True], [True]])
    with pytest.raises(ShapeError, match=r"more target masks than the 1 documents"):
        data.pack_documents([[1, 2]], 8, target_masks=[[True, True], None])
    with pytest.raises(ConfigError, match=r"none of the 2 documents has two tokens"):
        data.pack_documents([[1], []], 8)


def test_target_masks_that_count_nothing_are_refused():
    # A mask with every response token False (or only the first token True, which is never a
    # target) packed rows whose loss averaged nothing: the fine-tune trained nothing, silently.
    docs = [[5, 6, 7, 8], [9, 10, 11]]
    with pytest.raises(ConfigError, match=r"target masks count no target in any of the 2 documents.*first token is never a target.*encode_chat"):
        data.pack_documents(docs, 8, target_masks=[[False] * 4, [True, False, False]])
    # One document with nothing to predict among others is fine, and so is an end token that counts.
    packed = data.pack_documents(docs, 8, target_masks=[[False] * 4, [False, False, True]])
    assert packed["mask"].sum() == 1
    assert data.pack_documents(docs, 8, eos_id=1, target_masks=[[False] * 4, [False] * 3])["mask"].sum() == 2
