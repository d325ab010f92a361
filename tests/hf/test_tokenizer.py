"""`load_tokenizer`: a local tokenizer.json read with the `tokenizers` library."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eqzoo.data import AbstractTokenizer, TokenizerError
from eqzoo.hf import HFFormatError, HFTokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

LINES = [line for line in Path(shutil.__file__).read_text().splitlines()[:400] if line.strip()]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few hundred lines of the standard library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(LINES, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|endoftext|>"}))
    return folder


def test_encode_decode_match_the_tokenizers_library(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, AbstractTokenizer) and isinstance(tok, HFTokenizer)
    reference = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "def copyfileobj(fsrc, fdst): # ünïcödé"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.tolist() == reference.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.vocab_size == 300
    assert tok.eos_token_id == tok.bos_token_id == reference.token_to_id("<|endoftext|>")
    assert tok.pad_token_id is None
    assert load_tokenizer(tokenizer_dir / "tokenizer.json") == tok
    assert HFTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok


def test_matches_transformers_fast_tokenizer(tokenizer_dir, hft):
    fast = hft.transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    text = "import os, sys\nshutil.copytree(src, dst)"
    assert load_tokenizer(tokenizer_dir).encode(text).tolist() == fast(text)["input_ids"]


def test_errors(tokenizer_dir, tmp_path):
    with pytest.raises(HFFormatError, match=r"no tokenizer.json at .*found: \[\].*AutoTokenizer.from_pretrained\(path\).save_pretrained\(path\)"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(HFFormatError, match="cannot read .* as a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(TokenizerError, match=r"token ids must lie in \[0, 300\)"):
        tok.decode(np.array([1, 300]))
    with pytest.raises(TokenizerError, match="one 1-d sequence of integer ids"):
        tok.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(TokenizerError, match="needs the output of HFTokenizer.to_dict"):
        HFTokenizer.from_dict({"type": "char"})
