import sysconfig

import numpy as np
import pytest

from eqzoo._errors import ConfigError, ShapeError
from eqzoo.data import CorpusError, split_tokens, stdlib_corpus


def test_corpus_is_deterministic_and_large():
    a = stdlib_corpus(max_chars=1_500_000)
    b = stdlib_corpus(max_chars=1_500_000)
    assert a == b
    assert len(a) == 1_500_000  # more than 1 MB is available
    assert "def " in a and "import " in a


def test_max_chars_truncates_a_prefix():
    long = stdlib_corpus(max_chars=50_000)
    short = stdlib_corpus(max_chars=1_234)
    assert len(short) == 1_234
    assert long.startswith(short)


@pytest.mark.parametrize("bad", [0, -5, 1e6])
def test_max_chars_must_be_positive(bad, unchecked):
    with unchecked(), pytest.raises(ConfigError, match="max_chars=...\\) must be a positive int"):
        stdlib_corpus(max_chars=bad)  # 1e6 read the files, then failed slicing with a float


def test_missing_stdlib_folder(monkeypatch, tmp_path):
    missing = tmp_path / "nope"
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(missing)})
    with pytest.raises(CorpusError, match="is not a directory"):
        stdlib_corpus(max_chars=10)


def test_stdlib_folder_without_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(CorpusError, match="found no .py files"):
        stdlib_corpus(max_chars=10)


def test_skips_excluded_dirs_and_non_utf8(monkeypatch, tmp_path):
    (tmp_path / "b.py").write_text("bee\n")
    (tmp_path / "a.py").write_text("ay\n")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("excluded\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("em\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert stdlib_corpus() == "ay\n\nbee\n\nem\n\n"


def test_split_tokens_is_contiguous():
    tokens = np.arange(100, dtype=np.int32)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 90 and len(val) == 10
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_tokens_fraction_range(fraction):
    with pytest.raises(ConfigError, match="needs 0 < val_fraction < 1"):
        split_tokens(np.arange(100, dtype=np.int32), fraction)


def test_split_tokens_takes_a_list_and_refuses_a_string_fraction(unchecked):
    with unchecked():  # the annotation asks for an array: the list is for calls without the hook
        train, val = split_tokens(list(range(10)), 0.2)
    assert val.tolist() == [8, 9] and train.tolist() == list(range(8))
    with unchecked(), pytest.raises(ConfigError, match="needs 0 < val_fraction < 1; got '0.1'"):
        split_tokens(np.arange(100, dtype=np.int32), "0.1")


def test_split_tokens_empty_part():
    with pytest.raises(ConfigError, match="both parts must be non-empty"):
        split_tokens(np.arange(5, dtype=np.int32), 0.1)


def test_split_tokens_needs_1d():
    # Under jaxtyping checking the annotation rejects this first; without it, ShapeError does.
    with pytest.raises((ShapeError, TypeError), match="1-D|shape|Type-check"):
        split_tokens(np.zeros((4, 4), np.int32), 0.5)
