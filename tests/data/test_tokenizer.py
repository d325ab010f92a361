import json

import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo._errors import ConfigError
from eqzoo.data import (
    ByteTokenizer,
    CharTokenizer,
    StreamDecoder,
    TokenizerError,
    stdlib_corpus,
    tokenizer_from_dict,
)

TEXT = "hello, wörld! ∑ 🙂\n\tdef f(x): return x"


def test_char_round_trip_on_corpus():
    text = stdlib_corpus(max_chars=200_000)
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.chars == "".join(sorted(set(text)))


@pytest.mark.parametrize("tok", [CharTokenizer.from_text("abc"), ByteTokenizer()])
def test_decode_takes_jax_arrays(tok):
    """What `eqzoo.generate` returns decodes as it is, type checking on (the docs do this)."""
    ids = tok.encode("cab")
    assert tok.decode(jnp.asarray(ids)) == "cab"
    assert tok.decode(jnp.asarray(ids, jnp.uint8)) == "cab"


def test_char_ids_are_alphabet_positions():
    tok = CharTokenizer.from_text("cabbage")
    assert tok.chars == "abceg"
    np.testing.assert_array_equal(tok.encode("gab"), np.array([4, 0, 1], np.int32))
    assert tok.decode([4, 0, 1]) == "gab"
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_char_unknown_raises_naming_the_character():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(
        TokenizerError, match=r"cannot encode character 'z' \(U\+007A\) at position 2"
    ):
        tok.encode("abzc")


def test_char_unk_maps_unknown_characters():
    tok = CharTokenizer.from_text("abc", unk="?")
    assert tok.vocab_size == 4
    ids = tok.encode("azc")
    assert tok.decode(ids) == "a?c"


def test_char_unsorted_alphabet():
    tok = CharTokenizer("zxa")
    np.testing.assert_array_equal(tok.encode("axz"), np.array([2, 1, 0], np.int32))
    assert tok.decode(tok.encode("zax")) == "zax"


def test_char_bad_alphabets():
    with pytest.raises(ConfigError, match=r"each character once.*duplicates \['a'\]"):
        CharTokenizer("aab")
    with pytest.raises(ConfigError, match="must be one character of the alphabet"):
        CharTokenizer("ab", unk="?")
    with pytest.raises(ConfigError, match="got empty text"):
        CharTokenizer.from_text("")


@pytest.mark.parametrize("tok", [CharTokenizer.from_text("abc"), ByteTokenizer()])
def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(TokenizerError, match=rf"needs ids in \[0, {tok.vocab_size}\); got id"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(TokenizerError, match="got id -1"):
        tok.decode(np.array([-1], np.int32))


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and tok.vocab_size == 256
    assert len(ids) == len(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT


def test_lone_surrogates(unchecked):
    # UTF-8 cannot hold a lone surrogate: a TokenizerError naming it, not a UnicodeEncodeError
    with pytest.raises(TokenizerError, match=r"text\[1\] is the lone surrogate U\+D800"):
        ByteTokenizer().encode("a\ud800b")
    with unchecked(), pytest.raises(TokenizerError, match="takes a str; got bytes"):
        ByteTokenizer().encode(b"abc")
    # a character tokenizer keeps them (UTF-32 code points), alphabet included
    tok = CharTokenizer.from_text("a\ud800b")
    assert tok.decode(tok.encode("b\ud800a")) == "b\ud800a"


def test_byte_decode_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("ö")[:1]  # first byte of a two-byte character
    assert tok.decode(ids) == "\ufffd"


@pytest.mark.parametrize(
    "tok", [CharTokenizer.from_text(TEXT), CharTokenizer.from_text("ab", unk="?"), ByteTokenizer()]
)
def test_to_dict_is_json_and_round_trips(tok):
    d = json.loads(json.dumps(tok.to_dict()))
    again = tokenizer_from_dict(d)
    assert again == tok and type(again) is type(tok)
    assert type(tok).from_dict(d) == tok


def test_from_dict_errors():
    with pytest.raises(ConfigError, match="d\\['type'\\] to be one of \\['byte', 'char', 'hf'\\]"):
        tokenizer_from_dict({"type": "bpe"})
    with pytest.raises(ConfigError, match="unk must be one character; got 'ab'"):
        CharTokenizer.from_text("abc", unk="ab")
    with pytest.raises(ConfigError, match="expects a dict with exactly the keys"):
        CharTokenizer.from_dict({"type": "byte"})
    with pytest.raises(ConfigError, match="expects a dict with exactly the keys"):
        ByteTokenizer.from_dict({"type": "byte", "extra": 1})


def test_encode_batch_pads_on_either_side_and_decodes_back():
    # The default on AbstractTokenizer: encode each text, cut, pad with the given id.
    tok = CharTokenizer.from_text("abcdef_")
    pad = tok.encode("_")[0]
    texts = ["abc", "f", "dead"]
    right = tok.encode_batch(texts, pad_token_id=pad)
    assert right.ids.dtype == right.attention_mask.dtype == np.int32 and right.padding_side == "right"
    np.testing.assert_array_equal(right.ids, np.stack([tok.encode(t) for t in ("abc_", "f___", "dead")]))
    np.testing.assert_array_equal(right.attention_mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(right.lengths, [3, 1, 4])
    left = tok.encode_batch(texts, pad_token_id=pad, padding_side="left", pad_to_multiple_of=3)
    np.testing.assert_array_equal(left.ids, np.stack([tok.encode(t) for t in ("___abc", "_____f", "__dead")]))
    np.testing.assert_array_equal(left.attention_mask.sum(1), [3, 1, 4])
    for batch in (right, left):
        assert tok.decode_batch(batch.ids, batch.attention_mask) == texts
    assert tok.decode_batch(left.ids)[1] == "_____f"  # no mask: every id
    cut = ByteTokenizer().encode_batch(["héllo", "hi"], padding="max_length", max_length=3, truncation=True, pad_token_id=0)
    np.testing.assert_array_equal(cut.ids, [[104, 195, 169], [104, 105, 0]])
    assert ByteTokenizer().decode_batch([[104, 105], [33]]) == ["hi", "!"]  # rows of any lengths


def test_encode_batch_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"no pad token, and eqzoo never pads with 0 or eos silently\. Pass pad_token_id="):
        tok.encode_batch(["ab", "c"])
    with pytest.raises(TokenizerError, match=r"takes a list of strings; got str\. For one text use encode"):
        tok.encode_batch("abc", pad_token_id=0)
    with pytest.raises(TokenizerError, match=r"truncation=True needs max_length .*pass max_length="):
        tok.encode_batch(["ab"], truncation=True, pad_token_id=0)
    with pytest.raises(TokenizerError, match=r"max_length=2 does nothing with padding='longest' and truncation=False"):
        tok.encode_batch(["ab"], max_length=2, pad_token_id=0)
    with pytest.raises(TokenizerError, match=r"text 1 has 3 tokens, more than max_length=2 .*truncation=True"):
        tok.encode_batch(["ab", "abc"], padding="max_length", max_length=2, pad_token_id=0)
    with pytest.raises(TokenizerError, match=r"padding must be 'longest' .* got True"):
        tok.encode_batch(["ab"], padding=True, pad_token_id=0)
    with pytest.raises(TokenizerError, match=r"pad_token_id must be an id in \[0, 3\); got 3"):
        tok.encode_batch(["ab"], pad_token_id=3)
    with pytest.raises(TokenizerError, match=r"max_length=6, which is not a multiple of pad_to_multiple_of=4"):
        tok.encode_batch(["ab"], truncation=True, max_length=6, pad_to_multiple_of=4, pad_token_id=0)
    with pytest.raises(TokenizerError, match=r"attention_mask must have the ids' shape \(batch, seq\); got ids \(1, 2\) and mask \(1, 3\)"):
        tok.decode_batch(np.zeros((1, 2), np.int32), np.ones((1, 3), np.int32))
    with pytest.raises(TokenizerError, match=r"takes a batch of id rows, \(batch, seq\); got shape \(2,\)"):
        tok.decode_batch(np.zeros(2, np.int32))


MULTIBYTE = "naïve café — 東京タワー 🎉👩‍💻 中文字符 ünïcödé, Ωmega ∑ 🙂!\n"


def _random_splits(ids, rng, times=25):
    """`times` random splits of `ids` into pushes (empty pushes and single ids included)."""
    for _ in range(times):
        cuts = np.sort(rng.integers(0, len(ids) + 1, rng.integers(1, max(2, len(ids) // 2))))
        yield np.split(np.asarray(ids), cuts)


def check_stream_decoding(tok, ids, *, seed=0, **kw):
    """For random splits of `ids`, the pushed texts and flush() joined are decode(ids), exactly
    (a helper the HF tokenizer tests share)."""
    want = tok.decode(ids, **kw)
    for pieces in _random_splits(ids, np.random.default_rng(seed)):
        decoder = tok.stream_decoder(**kw)
        got = [decoder.push(p) for p in pieces]
        assert "".join(got) + decoder.flush() == want, [len(p) for p in pieces]


@pytest.mark.parametrize("tok", [CharTokenizer.from_text(MULTIBYTE + "\ufffd"), ByteTokenizer()], ids=["char", "byte"])
def test_stream_decoder_joins_to_decode_for_any_split(tok):
    ids = tok.encode(MULTIBYTE * 3 + "ï\ufffdé\ufffd")  # a literal U+FFFD too, at the very end
    check_stream_decoding(tok, ids)
    if isinstance(tok, ByteTokenizer):
        # invalid UTF-8 (a cut character, a stray continuation byte), and a stream cut inside a
        # character: flush() writes what decode does
        check_stream_decoding(tok, np.concatenate([ids[:9], [0xE4, 0xB8, 0x41, 0x80, 0x42], ids[:5], [0xF0, 0x9F]]))


def test_stream_decoder_holds_back_a_cut_character():
    decoder = ByteTokenizer().stream_decoder()
    emoji = list("🎉".encode())
    assert decoder.push([104, 105] + emoji[:2]) == "hi"  # the emoji's first two bytes held back
    assert decoder.push(emoji[2:3]) == ""
    assert decoder.push(emoji[3:] + [33]) == "🎉!"
    assert decoder.push(emoji[:1]) == ""
    assert decoder.flush() == "\ufffd"  # cut at the end: what decode writes for it
    assert decoder.push(np.int32(65)) == "A"  # flushed: a new stream


def test_stream_decoder_cost_does_not_grow_with_the_text():
    # Each push decodes the new ids and a few of context, never the text so far: as many ids
    # are decoded for the last pushes of a long stream as for the first.
    tok = ByteTokenizer()
    decoded = []
    decoder = StreamDecoder(lambda ids: decoded.append(len(ids)) or tok.decode(ids), 256)
    ids = tok.encode(MULTIBYTE * 40)
    per_push = []
    for piece in np.array_split(ids, len(ids) // 7):
        decoded.clear()
        decoder.push(piece)
        per_push.append(sum(decoded))
    # (re-decoding the text so far would decode ~1,000 ids a push on average)
    assert len(ids) > 2000 and max(per_push) <= 64, max(per_push)


def count_decoded(tok):
    """A stream decoder over `tok.decode` and the list of how many ids each decode call took."""
    decoded = []
    return StreamDecoder(lambda ids: decoded.append(len(ids)) or tok.decode(ids), tok.vocab_size), decoded


def test_stream_decoder_cost_is_bounded_in_a_long_invalid_run():
    # 2,000 lone continuation bytes decode to 2,000 U+FFFD, as an untrained model's ids may: the
    # base code held the whole run and decoded it again on each push (~4,000 ids a push at the
    # end, O(n^2) in all); once a run passes 4 ids its head can no longer end in a character.
    tok = ByteTokenizer()
    ids = np.concatenate([tok.encode("ok "), np.tile(np.arange(0x80, 0xC0), 32)[:2000], tok.encode("é!")])
    decoder, decoded = count_decoded(tok)
    per_push, texts = [], []
    for piece in np.array_split(ids, len(ids) // 3):
        decoded.clear()
        texts.append(decoder.push(piece))
        per_push.append(sum(decoded))
    assert "".join(texts) + decoder.flush() == tok.decode(ids) == "ok " + "\ufffd" * 2000 + "é!"
    assert max(per_push) <= 96, max(per_push)
    assert sum(len(t) > 0 for t in texts) > 600  # the run is written as it comes, not at its end


def test_stream_decoder_joins_to_decode_across_long_invalid_runs():
    # Invalid runs mixed with characters cut across pushes: truncated multi-byte starts, stray
    # continuation bytes and an overlong run; every split joins to decode(ids) exactly.
    tok = ByteTokenizer()
    rng = np.random.default_rng(1)
    valid = tok.encode(MULTIBYTE)
    parts = []
    for _ in range(12):
        parts.append(rng.integers(0x80, 0x100, rng.integers(1, 40)))  # continuation and start bytes alike
        parts.append(valid[: rng.integers(1, len(valid))])
    parts.append([0xF0, 0x9F, 0x8E])  # a stream cut inside a character
    check_stream_decoding(tok, np.concatenate(parts).astype(np.int64))


def test_stream_decoder_errors():
    decoder = CharTokenizer.from_text("abc").stream_decoder()
    with pytest.raises(TokenizerError, match=r"push takes a 1-D sequence of integer ids; got shape \(2, 2\)"):
        decoder.push(np.zeros((2, 2), np.int32))
    with pytest.raises(TokenizerError, match="got shape \\(2,\\) and dtype float32"):
        decoder.push(np.zeros(2, np.float32))
    with pytest.raises(TokenizerError, match=r"ids must lie in \[0, 3\); got id 3 at position 1 of this push"):
        decoder.push([0, 3])
    assert decoder.push([0, 1, 2]) == "abc"  # a refused push leaves the decoder as it was
