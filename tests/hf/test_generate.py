"""Greedy decoding of a loaded checkpoint gives exactly transformers' greedy tokens."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo
from eqzoo._errors import ConfigError
from eqzoo.generation import generate_batch

FAMILIES = ["gpt2", "llama-gqa-untied", "llama-gqa-tied", "mixtral", "mistral", "qwen2", "qwen3", "qwen3-moe", "gemma2", "gemma3"]
NEW_TOKENS = 32
LENGTHS = (5, 9, 13)

_reference: dict[str, list[np.ndarray]] = {}


def _prompts(vocab: int) -> np.ndarray:
    """Right-padded prompts of different lengths (padding with 0)."""
    rng = np.random.default_rng(7)
    prompts = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
    for i, n in enumerate(LENGTHS):
        prompts[i, :n] = rng.integers(1, vocab, size=n)
    return prompts


def _transformers_greedy(family, hf_model, prompts, hft) -> list[np.ndarray]:
    """transformers' greedy continuation of each prompt, one prompt at a time (cached)."""
    if family not in _reference:
        outputs = []
        for row, n in zip(prompts, LENGTHS, strict=True):
            with hft.torch.no_grad():
                out = hf_model.generate(
                    hft.torch.as_tensor(row[None, :n], dtype=hft.torch.long),
                    attention_mask=hft.torch.ones((1, n), dtype=hft.torch.long),
                    do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                    pad_token_id=0, eos_token_id=None,
                )
            outputs.append(out[0].numpy())
        _reference[family] = outputs
    return _reference[family]


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, use_cache, hf_checkpoints, loaded, hft):
    hf_model, _ = hf_checkpoints(family)
    model = loaded(family)
    prompts = _prompts(hft.VOCAB)
    expected = _transformers_greedy(family, hf_model, prompts, hft)
    out = np.asarray(generate_batch(
        model, jnp.asarray(prompts), jnp.asarray(LENGTHS, jnp.int32), max_new_tokens=NEW_TOKENS,
        use_cache=use_cache,
    ))
    for i, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(out[i, : n + NEW_TOKENS], expected[i], err_msg=f"{family} prompt {i}")
    if family == "gpt2":  # each extra compiled program costs seconds on CPU; one family suffices
        # The single-prompt entry point agrees too, for the longest prompt.
        single = eqzoo.generate(model, jnp.asarray(prompts[-1]), max_new_tokens=NEW_TOKENS, use_cache=use_cache)
        np.testing.assert_array_equal(np.asarray(single), expected[-1])


def test_generation_config_written_by_transformers(tmp_path, hft):
    import eqzoo.hf

    gen = hft.transformers.GenerationConfig
    gen(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[128001, 128009], bos_token_id=128000).save_pretrained(tmp_path)
    config = eqzoo.hf.load_generation_config(tmp_path)
    # transformers samples with top_k=50 where the file sets none
    assert config == eqzoo.hf.GenerationConfig(eos_token=(128001, 128009), temperature=0.6, top_k=50, top_p=0.9)
    assert config.kwargs(max_new_tokens=7) == dict(eos_token=(128001, 128009), temperature=0.6, top_k=50, top_p=0.9, max_new_tokens=7)
    # transformers' generate(do_sample=False) override: greedy (it reached eqzoo.generate as an
    # unknown keyword); True keeps the file's sampling; beams take the deterministic search
    assert config.kwargs(do_sample=False) == dict(eos_token=(128001, 128009), temperature=0.0)
    assert config.kwargs(do_sample=True) == config.kwargs()
    assert "do_sample" not in config.beam_kwargs(do_sample=False) and "temperature" not in config.beam_kwargs(do_sample=False)
    with pytest.raises(ConfigError, match=r"GenerationConfig.kwargs: do_sample must be True or False, got 'no'"):
        config.kwargs(do_sample="no")
    gen(do_sample=True, top_k=0, top_p=1.0, pad_token_id=3, max_new_tokens=12).save_pretrained(tmp_path)
    config = eqzoo.hf.load_generation_config(tmp_path / "generation_config.json")
    assert config.kwargs() == dict(pad_token=3, temperature=1.0, max_new_tokens=12)  # nothing filters
    # do_sample unset: greedy (transformers no longer saves such a file; older releases hold them)
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7, "top_k": 5, "eos_token_id": 2}')
    assert eqzoo.hf.load_generation_config(tmp_path).kwargs() == dict(eos_token=(2,), temperature=0.0)
    with pytest.raises(ConfigError, match=r"do_sample=True, but this generation config decodes greedily.*kwargs\(temperature=0.7"):
        eqzoo.hf.load_generation_config(tmp_path).kwargs(do_sample=True)
    # ... unless the override gives the temperature; and do_sample=False contradicts a sampling override
    greedy_file = eqzoo.hf.load_generation_config(tmp_path)
    assert greedy_file.kwargs(do_sample=True, temperature=0.7) == dict(eos_token=(2,), temperature=0.7)
    with pytest.raises(ConfigError, match=r"do_sample=False decodes greedily, but temperature=0.7, top_k=5 asks"):
        greedy_file.kwargs(do_sample=False, temperature=0.7, top_k=5)
    assert greedy_file.kwargs(do_sample=False, temperature=1.0, top_k=50, top_p=1.0) == dict(eos_token=(2,), temperature=0.0)


def test_generation_config_request_kwargs_for_serving(tmp_path, hft):
    # A file's settings as a serving Request's arguments: kwargs() held pad_token (and could
    # hold logits processors), which Request refused with a bare TypeError.
    import eqzoo.hf
    from eqzoo.generation import Request

    gen = hft.transformers.GenerationConfig
    gen(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[5, 9], pad_token_id=3, repetition_penalty=1.2).save_pretrained(tmp_path)
    config = eqzoo.hf.load_generation_config(tmp_path)
    kwargs = config.request_kwargs(max_new_tokens=8, key=jax.random.key(0))
    assert kwargs.keys() == {"eos_token", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "key"}
    request = Request([1, 2], id="a", **kwargs)
    assert (request.eos_token, request.temperature, request.top_k, request.top_p) == ((5, 9), 0.6, 50, 0.9)
    assert config.request_kwargs(do_sample=False, max_new_tokens=8) == dict(eos_token=(5, 9), repetition_penalty=1.2, max_new_tokens=8, temperature=0.0)
    gen(max_length=20, no_repeat_ngram_size=2, eos_token_id=5).save_pretrained(tmp_path)
    config = eqzoo.hf.load_generation_config(tmp_path)
    with pytest.raises(ConfigError, match=r"limits decoding by max_length=20 .*request_kwargs\(max_new_tokens=N\)"):
        config.request_kwargs()
    with pytest.raises(ConfigError, match=r"applied by logits processors \(NoRepeatNGram\).*generate_batch"):
        config.request_kwargs(max_new_tokens=4)
    assert config.request_kwargs(max_new_tokens=4, logits_processors=[]) == dict(eos_token=(5,), temperature=0.0, max_new_tokens=4)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 5}')  # no budget at all
    with pytest.raises(ConfigError, match=r"sets neither max_new_tokens nor max_length.*request_kwargs\(max_new_tokens=N\)"):
        eqzoo.hf.load_generation_config(tmp_path).request_kwargs()


def test_generation_config_stops_where_transformers_does(tmp_path, hf_checkpoints, loaded, hft):
    import eqzoo.hf

    hf_model, _ = hf_checkpoints("gpt2")
    prompt = _prompts(hft.VOCAB)[0, : LENGTHS[0]]
    free = _transformers_greedy("gpt2", hf_model, _prompts(hft.VOCAB), hft)[0]
    stops = [int(free[LENGTHS[0] + 3]), int(free[LENGTHS[0] + 9])]  # the 4th and 10th new tokens
    hft.transformers.GenerationConfig(eos_token_id=stops, pad_token_id=hft.VOCAB - 1, max_new_tokens=16).save_pretrained(tmp_path)
    with hft.torch.no_grad():
        want = hf_model.generate(hft.torch.as_tensor(prompt[None], dtype=hft.torch.long),
                                 generation_config=hft.transformers.GenerationConfig.from_pretrained(tmp_path))[0].numpy()
    got = np.asarray(eqzoo.generate(loaded("gpt2"), jnp.asarray(prompt), **eqzoo.hf.load_generation_config(tmp_path).kwargs()))
    assert got.shape == (LENGTHS[0] + 16,) and want.shape[0] <= got.shape[0]
    np.testing.assert_array_equal(got[: want.shape[0]], want)
    np.testing.assert_array_equal(got[want.shape[0]:], hft.VOCAB - 1)  # padding after the stop


def test_generation_config_processors_match_transformers(tmp_path, hf_checkpoints, loaded, hft, compile_log):
    # no_repeat_ngram_size, bad_words_ids (one id, a bigram, and the eos id, which transformers
    # drops), min_new_tokens (holding back the eos, row 0's first free token), suppress_tokens,
    # begin_suppress_tokens, sequence_bias (one id, a bigram, and each row's first prompt token,
    # an id the penalty applies to) and repetition_penalty from a generation_config.json:
    # transformers' greedy tokens, row by row (the bias added before the penalty, as
    # transformers adds it), and the same tokens as the processors passed by hand (compiling
    # nothing new).
    import eqzoo.hf
    from eqzoo.generation import (
        BannedSequences,
        BeforePenalty,
        MinNewTokens,
        NoRepeatNGram,
        SequenceBias,
        SuppressTokens,
        SuppressTokensAtBegin,
    )

    hf_model, _ = hf_checkpoints("gpt2")
    prompts = _prompts(hft.VOCAB)
    free = _transformers_greedy("gpt2", hf_model, prompts, hft)
    new = [f[n:] for f, n in zip(free, LENGTHS, strict=True)]
    eos = int(new[0][1])
    settings = dict(
        no_repeat_ngram_size=3, bad_words_ids=[[int(new[1][2])], [int(new[2][0]), int(new[2][1])], [eos]],
        min_new_tokens=4, suppress_tokens=[int(new[0][5])], begin_suppress_tokens=[int(new[1][0])],
        sequence_bias=[[[int(new[2][3])], -30.0], [[int(new[0][2]), int(new[0][3])], 2.5],
                       *([[int(prompts[i, 0])], b] for i, b in enumerate((4.0, 3.0, -2.0)))],
        repetition_penalty=1.5, eos_token_id=eos, pad_token_id=hft.VOCAB - 1, max_new_tokens=12,
    )
    hft.transformers.GenerationConfig(**settings).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unapplied
        config = eqzoo.hf.load_generation_config(tmp_path)
    expected = []
    for row, n in zip(prompts, LENGTHS, strict=True):
        with hft.torch.no_grad():
            out = hf_model.generate(hft.torch.as_tensor(row[None, :n], dtype=hft.torch.long), attention_mask=hft.torch.ones((1, n), dtype=hft.torch.long),
                                    generation_config=hft.transformers.GenerationConfig.from_pretrained(tmp_path))
        expected.append(out[0].numpy())
    assert not any(np.array_equal(e, f[: len(e)]) for e, f in zip(expected, free, strict=True))  # the settings matter
    model = loaded("gpt2")
    got = np.asarray(generate_batch(model, prompts, np.asarray(LENGTHS), **config.kwargs()))
    for i, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(got[i, : n + 12], expected[i], err_msg=f"prompt {i}")
    by_hand = [
        BeforePenalty(SequenceBias(settings["sequence_bias"])), NoRepeatNGram(3), BannedSequences(settings["bad_words_ids"][:2]), MinNewTokens(4, eos),
        SuppressTokens(settings["suppress_tokens"]), SuppressTokensAtBegin(settings["begin_suppress_tokens"]),
    ]
    with compile_log() as log:
        again = generate_batch(model, prompts, np.asarray(LENGTHS), **config.kwargs(logits_processors=by_hand))
    np.testing.assert_array_equal(again, got)
    assert log.compiled == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "is not valid JSON"),
        ("[1]", "must hold a JSON object, got list"),
        ('{"eos_token_id": [2, "x"]}', r"eos_token_id must be a token id \(an integer >= 0\) or a list of them; got \[2, 'x'\]"),
        ('{"pad_token_id": -1}', r"pad_token_id must be a token id \(an integer >= 0\); got -1"),
        ('{"do_sample": "yes"}', "do_sample must be true or false; got 'yes'"),
        ('{"do_sample": true, "temperature": 0}', r"temperature must be > 0 with do_sample: true \(for greedy decoding set do_sample: false\)"),
        ('{"top_p": 1.5}', r"top_p must be a number in \(0.0, 1.0\]; got 1.5"),
        ('{"top_k": -1}', "top_k must be an integer >= 0; got -1"),
        ('{"max_new_tokens": 0}', "max_new_tokens must be an integer >= 1; got 0"),
        ('{"repetition_penalty": 0}', r"repetition_penalty must be a number in \(0.0, inf\]; got 0"),
        ('{"min_p": 1.5}', r"min_p must be a number in \[0.0, 1.0\]; got 1.5"),
        ('{"no_repeat_ngram_size": -1}', "no_repeat_ngram_size must be an integer >= 0; got -1"),
        ('{"bad_words_ids": [[1], []]}', r"bad_words_ids must be a list of non-empty lists of token ids \(integers >= 0\); got \[\[1\], \[\]\]"),
        ('{"suppress_tokens": [3, -1]}', r"suppress_tokens must be a list of token ids \(integers >= 0\); got \[3, -1\]"),
        ('{"sequence_bias": {"(1, 2)": -1.0}}', r"sequence_bias must be a list of \[token-id list, bias\] pairs, e.g. .*; got \{'\(1, 2\)': -1.0\}"),
        ('{"sequence_bias": [[[1, 2], "x"]]}', r"sequence_bias must be a list of \[token-id list, bias\] pairs"),
    ],
)
def test_bad_generation_configs_are_refused(tmp_path, text, match):
    import eqzoo.hf

    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(eqzoo.hf.HFFormatError, match=match):
        eqzoo.hf.load_generation_config(tmp_path)


def test_generation_config_missing_or_unsupported(tmp_path):
    import eqzoo.hf

    with pytest.raises(eqzoo.hf.HFFormatError, match=r"no generation_config.json at .*pass eos_token= yourself"):
        eqzoo.hf.load_generation_config(tmp_path)
    # without one, config.json's stop and pad ids (in text_config for a multimodal config), greedy
    (tmp_path / "config.json").write_text('{"model_type": "gemma3", "text_config": {"eos_token_id": [1, 106], "pad_token_id": 0}}')
    assert eqzoo.hf.load_generation_config(tmp_path).kwargs(max_new_tokens=3) == dict(eos_token=(1, 106), pad_token=0, temperature=0.0, max_new_tokens=3)
    (tmp_path / "config.json").write_text('{"eos_token_id": -1}')
    with pytest.raises(eqzoo.hf.HFFormatError, match=r"config.json' \(no generation_config.json beside it: its token ids\): eos_token_id must be"):
        eqzoo.hf.load_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text(
        '{"num_beams": 4, "num_beam_groups": 2, "num_return_sequences": 2, "repetition_penalty": 1.2, "min_p": 0.1, '
        '"do_sample": true, "eos_token_id": 1}'
    )
    # group beam search is named; beam sampling (generate_beam) and its num_return_sequences are not
    with pytest.warns(UserWarning, match=r"sets \{'num_beam_groups': 2\}, which eqzoo's decoding does not apply"):
        config = eqzoo.hf.load_generation_config(tmp_path)
    assert (config.eos_token, config.repetition_penalty, config.min_p, config.num_beams) == ((1,), 1.2, 0.1, 4)
    # several samples per prompt without beams (eqzoo.generate draws one) are named
    (tmp_path / "generation_config.json").write_text('{"num_return_sequences": 2, "do_sample": true}')
    with pytest.warns(UserWarning, match=r"sets \{'num_return_sequences': 2\}, which eqzoo's decoding does not apply"):
        eqzoo.hf.load_generation_config(tmp_path)


def test_left_padded_batch_with_attention_mask_matches_transformers(hf_checkpoints, loaded, hft):
    # transformers' tokenizers pad on the left for decoding: the mask says where the prompt is
    hf_model, _ = hf_checkpoints("gpt2")
    prompts = _prompts(hft.VOCAB)
    expected = _transformers_greedy("gpt2", hf_model, prompts, hft)
    width = max(LENGTHS)
    left = np.full_like(prompts, hft.VOCAB - 1)
    mask = np.zeros_like(prompts)
    for i, n in enumerate(LENGTHS):
        left[i, width - n:], mask[i, width - n:] = prompts[i, :n], 1
    out = np.asarray(generate_batch(loaded("gpt2"), left, attention_mask=mask, max_new_tokens=NEW_TOKENS))
    for i, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(out[i, : n + NEW_TOKENS], expected[i], err_msg=f"prompt {i}")


def test_repetition_penalty_matches_transformers_with_left_padding(tmp_path, hf_checkpoints, loaded, hft):
    # repetition_penalty from a generation_config.json, applied as transformers applies it in
    # greedy decoding; a left-padded batch decodes each row as transformers decodes it alone
    # (the padding is not a "seen" token: here the pad id is a token the penalty changes).
    import eqzoo.hf

    hf_model, _ = hf_checkpoints("gpt2")
    prompts = _prompts(hft.VOCAB)
    hft.transformers.GenerationConfig(repetition_penalty=1.3).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unapplied
        kwargs = eqzoo.hf.load_generation_config(tmp_path).kwargs(max_new_tokens=NEW_TOKENS)
    assert kwargs == dict(temperature=0.0, repetition_penalty=1.3, max_new_tokens=NEW_TOKENS)
    expected = []
    for row, n in zip(prompts, LENGTHS, strict=True):
        with hft.torch.no_grad():
            out = hf_model.generate(
                hft.torch.as_tensor(row[None, :n], dtype=hft.torch.long), attention_mask=hft.torch.ones((1, n), dtype=hft.torch.long),
                do_sample=False, repetition_penalty=1.3, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                pad_token_id=0, eos_token_id=None,
            )
        expected.append(out[0].numpy())
    free = _transformers_greedy("gpt2", hf_model, prompts, hft)
    assert not any(np.array_equal(e, f) for e, f in zip(expected, free, strict=True))  # the penalty matters
    width = max(LENGTHS)
    left, mask = np.full_like(prompts, hft.VOCAB - 1), np.zeros_like(prompts)
    for i, n in enumerate(LENGTHS):
        left[i, width - n:], mask[i, width - n:] = prompts[i, :n], 1
    assert any(hft.VOCAB - 1 in e[n:].tolist() for e, n in zip(expected, LENGTHS, strict=True))  # the pad id is generated
    got = np.asarray(generate_batch(loaded("gpt2"), left, attention_mask=mask, **kwargs))
    for i, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(got[i, : n + NEW_TOKENS], expected[i], err_msg=f"prompt {i}")


def test_min_p_keeps_what_transformers_keeps(hft):
    # Temperature, then top-k, then min-p, as transformers orders its warpers; the kept sets and
    # the renormalised distributions agree (float32, atol 1e-6) on random logits.
    import jax

    from eqzoo.generation._sampling import filter_logits

    torch, lp = hft.torch, hft.transformers.generation.logits_process
    logits = np.random.default_rng(0).normal(size=(16, hft.VOCAB)).astype(np.float32) * 3
    for temperature, top_k, min_p in ((1.0, None, 0.1), (0.7, None, 0.05), (1.5, 20, 0.2)):
        warpers = [lp.TemperatureLogitsWarper(temperature)] + ([lp.TopKLogitsWarper(top_k)] if top_k else [])
        warpers.append(lp.MinPLogitsWarper(min_p))
        want = torch.as_tensor(logits)
        for w in warpers:
            want = w(None, want)
        want = want.numpy()
        got = np.asarray(jax.vmap(lambda x: filter_logits(x, temperature, top_k, None, min_p))(logits))  # noqa: B023
        kept = np.isfinite(want)
        np.testing.assert_array_equal(got > np.finfo(np.float32).min, kept)
        assert 1 < kept.sum(-1).max() < hft.VOCAB  # the filter does filter, and keeps more than the top
        np.testing.assert_allclose(np.asarray(jax.nn.softmax(got)), torch.softmax(torch.as_tensor(want), -1).numpy(), atol=1e-6)


def test_generation_config_sequence_bias(tmp_path, hft):
    # sequence_bias as transformers saves it becomes SequenceBias, first and before the penalty
    # (BeforePenalty), with a repetition_penalty too (no warning: transformers' order is kept;
    # the tokens: test_generation_config_processors_match_transformers).
    import eqzoo.hf
    from eqzoo.generation import BeforePenalty, NoRepeatNGram, SequenceBias

    bias = [[[1, 2], -1.0], [[3], 2.5], [[1, 2], 0.5]]  # (1, 2) twice: the last bias holds, as in transformers
    hft.transformers.GenerationConfig(sequence_bias=bias, no_repeat_ngram_size=2, repetition_penalty=1.3).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = eqzoo.hf.load_generation_config(tmp_path)
    assert config.sequence_bias == (((1, 2), 0.5), ((3,), 2.5)) and config.repetition_penalty == 1.3
    first, second = config.logits_processors()
    assert isinstance(first, BeforePenalty) and isinstance(second, NoRepeatNGram)
    assert isinstance(first.processor, SequenceBias) and first.processor.biases.tolist() == [0.5, 2.5]


def test_generation_config_eos_override_rebuilds_the_eos_processors(tmp_path, hft):
    # An eos_token override rebuilds MinNewTokens, MinLength and the eos filter of bad_words_ids
    # on the override's ids, not the file's.
    import eqzoo.hf
    from eqzoo.generation import BannedSequences, MinLength, MinNewTokens

    hft.transformers.GenerationConfig(
        min_new_tokens=2, min_length=4, eos_token_id=5, bad_words_ids=[[6], [5], [7, 8]]
    ).save_pretrained(tmp_path)
    config = eqzoo.hf.load_generation_config(tmp_path)

    def held_back(kwargs):
        procs = [p for p in kwargs["logits_processors"] if isinstance(p, MinNewTokens | MinLength)]
        return [sorted(p.eos_tokens.tolist()) for p in procs]

    def banned(kwargs):
        (ban,) = [p for p in kwargs["logits_processors"] if isinstance(p, BannedSequences)]
        return ban.sequences[:, -1].tolist()

    assert held_back(config.kwargs()) == [[5], [5]] and banned(config.kwargs()) == [6, 8]  # [5] dropped
    override = config.kwargs(eos_token=[6, 9])
    assert override["eos_token"] == [6, 9] and held_back(override) == [[6, 9], [6, 9]]
    assert banned(override) == [5, 8]  # now [6] is dropped and [5] kept
    assert held_back(config.kwargs(eos_token=np.int32(7))) == [[7], [7]]
    assert held_back(config.kwargs(eos_token=None)) == []  # nothing to hold back
    assert held_back(config.kwargs(logits_processors=config.logits_processors(eos_token=3))) == [[3], [3]]
    assert config.kwargs(eos_token=6, logits_processors=[])["logits_processors"] == []
    with pytest.raises(ConfigError, match=r"GenerationConfig: eos_token must be a token id, a list of token ids or None .*; got 'x'"):
        config.kwargs(eos_token="x")


# Beam search. At transformers' initial weight scale these tiny models' beams mostly repeat one
# token; their matrices are scaled by 4 so that hypotheses differ and finish at different steps.
BEAM_NEW = 12
BEAM_PAD = 159  # nonzero: transformers pads a finished hypothesis with eos when pad_token_id is 0


def _scaled_pair(hf_model, folder, hft):
    import eqzoo.hf

    with hft.torch.no_grad():
        for param in hf_model.parameters():
            if param.ndim == 2:
                param.mul_(4.0)
    hf_model.save_pretrained(folder)
    return hf_model, eqzoo.hf.load_pretrained(folder)


def _transformers_beams(hf_model, prompt, hft, **settings):
    """transformers' beam search of one prompt: `(sequences, sequences_scores)` (`None` without
    beams: greedy decoding); beam sampling with `do_sample=True` in `settings`."""
    torch = hft.torch
    with torch.no_grad():
        out = hf_model.generate(
            torch.as_tensor(np.asarray(prompt)[None], dtype=torch.long), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            pad_token_id=BEAM_PAD, return_dict_in_generate=True, output_scores=True, **(dict(do_sample=False) | settings),
        )
    scores = getattr(out, "sequences_scores", None)
    return out.sequences.numpy(), None if scores is None else scores.numpy()


def _assert_same_beams(tokens, scores, want, want_scores, what):
    """eqzoo's hypotheses (padded to `seq + max_new_tokens`) against transformers' (cut to the
    longest returned): the same tokens, `BEAM_PAD` past them, and the scores to 1e-4 (float32
    sums of up to 12 log-probabilities, as transformers sums them)."""
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens[:, : want.shape[1]], want, err_msg=what)
    np.testing.assert_array_equal(tokens[:, want.shape[1]:], BEAM_PAD, err_msg=what)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=0, atol=1e-4, err_msg=what)


def test_beam_search_matches_transformers(tmp_path, hft, compile_log):
    # transformers' generate(num_beams=4, do_sample=False) on a tiny GPT-2: the same hypotheses,
    # token for token, and their scores, for each early_stopping mode, length penalties that
    # favour short (< 0) and long (2.0) hypotheses and several returned sequences, with an eos
    # that greedy decoding emits. For this prompt early_stopping "never" and False differ (the
    # bound on what a running beam may reach). A repetition penalty, applied to each beam's
    # log-probabilities over its own sequence's ids, changes the hypotheses. Other settings
    # reuse the compiled search (turning the penalty on compiles it once; its value is traced).
    # A sequence_bias, wrapped in BeforePenalty, is added before the penalty, as in transformers.
    from eqzoo.generation import BeforePenalty, SequenceBias, generate_beam

    hf_model, model = _scaled_pair(hft.make_gpt2(0), tmp_path, hft)
    prompt = np.array([70, 75, 151, 31, 79], np.int32)
    greedy, _ = _transformers_beams(hf_model, prompt, hft, max_new_tokens=BEAM_NEW, eos_token_id=None)
    eos = int(greedy[0, len(prompt) + 4])  # greedy's 5th new token
    settings = [
        dict(num_return_sequences=4),  # early_stopping=False, length_penalty=1.0
        dict(early_stopping="never", num_return_sequences=4),
        dict(early_stopping=True, length_penalty=2.0, num_return_sequences=3),
        dict(length_penalty=-1.0, num_return_sequences=2),
        dict(repetition_penalty=1.3, length_penalty=2.0, num_return_sequences=4),
        dict(repetition_penalty=2.0, early_stopping="never", num_return_sequences=4),
        # sequence_bias (BeforePenalty(SequenceBias)) before the penalty, as transformers orders them
        # (after it, as a plain processor, these hypotheses differ)
        dict(repetition_penalty=1.5, sequence_bias={(95, 96): -2.0, (96,): 4.0}, num_return_sequences=4),
    ]
    stopped_early, outputs = 0, []
    jax.clear_caches()  # the first search's compile counted from a cold cache (see CompileLog)
    for k, setting in enumerate(settings):
        want, want_scores = _transformers_beams(hf_model, prompt, hft, num_beams=4, max_new_tokens=BEAM_NEW, eos_token_id=eos, **setting)
        ours = dict(setting)
        if "sequence_bias" in ours:
            ours["logits_processors"] = [BeforePenalty(SequenceBias(ours.pop("sequence_bias")))]
        with compile_log("_beam_jit") as log:
            tokens, scores = generate_beam(
                model, jnp.asarray(prompt), max_new_tokens=BEAM_NEW, num_beams=4, eos_token=eos, pad_token=BEAM_PAD,
                return_scores=True, **ours,
            )
        _assert_same_beams(tokens, scores, want, want_scores, str(setting))
        assert tokens.shape == (setting.get("num_return_sequences", 1), len(prompt) + BEAM_NEW)
        stopped_early += int(np.sum(np.asarray(tokens)[:, -1] == BEAM_PAD))
        outputs.append(np.asarray(tokens))
        assert len(log.compiled) == (1 if k in (0, 4, 6) else 0), log.compiled
    assert stopped_early >= 3  # hypotheses that ended at eos before max_new_tokens
    assert not np.array_equal(outputs[0], outputs[1])  # early_stopping False and "never" differ here
    assert not np.array_equal(outputs[0], outputs[4])  # the penalty changes the hypotheses
    assert not np.array_equal(outputs[4], outputs[6])  # and so does the bias


def test_beam_search_batch_with_processor_matches_transformers_llama(tmp_path, hft):
    # A Llama (rotary positions, grouped-query KV cache): a right-padded batch of prompts of
    # different lengths, with no_repeat_ngram_size as a logits processor (applied, as
    # transformers applies it in beam search, to log-probabilities): each row's hypotheses are
    # transformers' for that prompt alone.
    from eqzoo.generation import NoRepeatNGram, generate_beam

    hf_model, model = _scaled_pair(hft.make_llama(0), tmp_path, hft)
    rows = [np.array([5, 17, 42, 7, 99, 3], np.int32), np.array([11, 60, 2, 150], np.int32)]
    prompts = np.zeros((2, 6), np.int32)
    for i, row in enumerate(rows):
        prompts[i, : len(row)] = row
    greedy, _ = _transformers_beams(hf_model, rows[0], hft, max_new_tokens=BEAM_NEW, eos_token_id=None)
    eos = int(greedy[0, len(rows[0]) + 3])
    setting = dict(num_beams=3, num_return_sequences=3, length_penalty=1.5)
    tokens, scores = generate_beam(
        model, prompts, np.array([6, 4]), max_new_tokens=BEAM_NEW, eos_token=eos, pad_token=BEAM_PAD,
        logits_processors=[NoRepeatNGram(2)], return_scores=True, **setting,
    )
    assert tokens.shape == (2, 3, 6 + BEAM_NEW) and scores.shape == (2, 3)
    for i, row in enumerate(rows):
        want, want_scores = _transformers_beams(
            hf_model, row, hft, max_new_tokens=BEAM_NEW, eos_token_id=eos, no_repeat_ngram_size=2, **setting
        )
        _assert_same_beams(np.asarray(tokens[i])[:, : len(row) + BEAM_NEW], scores[i], want, want_scores, f"row {i}")
        np.testing.assert_array_equal(np.asarray(tokens[i])[:, len(row) + BEAM_NEW:], BEAM_PAD)


def test_beam_sampling_matches_transformers(tmp_path, hft, compile_log):
    # transformers' beam sampling (num_beams=3, do_sample=True) where it is deterministic: its
    # warpers keep at least 2 tokens per beam (min_tokens_to_keep: one more than the eos ids),
    # and top_p=0.05 (or min_p=0.9) keeps no more, so 2 * num_beams candidates are left, exactly
    # as many as it draws without replacement (the first step's 2 beside the -1e9 beams'). The
    # hypotheses are then fixed (the same for two torch seeds) and eqzoo's, drawn with any key,
    # equal them token for token, with the scores (tempered log-probabilities) to 1e-4. The
    # first settings come from a generation_config.json (beam_kwargs); the second, other
    # temperature, top_p and min_p values, reuse the compiled search.
    import eqzoo.hf
    from eqzoo.generation import generate_beam

    hf_model, model = _scaled_pair(hft.make_gpt2(0), tmp_path, hft)
    prompt = np.array([70, 75, 151, 31, 79], np.int32)
    greedy, _ = _transformers_beams(hf_model, prompt, hft, max_new_tokens=BEAM_NEW, eos_token_id=None)
    eos = int(greedy[0, len(prompt) + 4])
    hft.transformers.GenerationConfig(
        do_sample=True, num_beams=3, num_return_sequences=3, temperature=1.5, top_p=0.05, min_p=0.05, length_penalty=2.0,
        eos_token_id=eos, pad_token_id=BEAM_PAD, max_new_tokens=BEAM_NEW,
    ).save_pretrained(tmp_path / "sampling")
    kwargs = eqzoo.hf.load_generation_config(tmp_path / "sampling").beam_kwargs()
    assert kwargs["do_sample"] and kwargs["top_k"] == 50  # transformers' top_k where the file sets none
    settings = [
        kwargs,
        kwargs | dict(temperature=0.6, top_p=0.9, min_p=0.9, early_stopping="never", length_penalty=1.0),
    ]
    for k, setting in enumerate(settings):
        theirs = dict(setting, eos_token_id=setting["eos_token"][0])
        for name in ("eos_token", "pad_token"):
            theirs.pop(name)
        hft.torch.manual_seed(0)
        want, want_scores = _transformers_beams(hf_model, prompt, hft, **theirs)
        hft.torch.manual_seed(1)
        np.testing.assert_array_equal(_transformers_beams(hf_model, prompt, hft, **theirs)[0], want)
        with compile_log("_beam_jit") as log:
            tokens, scores = generate_beam(model, jnp.asarray(prompt), key=jax.random.key(k), return_scores=True, **setting)
        _assert_same_beams(tokens, scores, want, want_scores, str(setting))
        assert len(log.compiled) == (1 if k == 0 else 0), log.compiled


def test_generation_config_carries_beam_settings(tmp_path, hf_checkpoints, loaded, hft):
    # num_beams, length_penalty, early_stopping and num_return_sequences from a
    # generation_config.json (no warning now): beam_kwargs() gives generate_beam transformers'
    # search with that file; kwargs() (eqzoo.generate's, greedy) warns that it is not it.
    import dataclasses

    import eqzoo.hf
    from eqzoo.generation import generate_beam

    hf_model, _ = hf_checkpoints("gpt2")
    prompt = np.array([11, 60, 2, 150, 33], np.int32)
    greedy, _ = _transformers_beams(hf_model, prompt, hft, max_new_tokens=BEAM_NEW, eos_token_id=None)
    eos = int(greedy[0, len(prompt) + 2])
    hft.transformers.GenerationConfig(
        num_beams=4, length_penalty=0.5, early_stopping=True, num_return_sequences=2, eos_token_id=eos,
        pad_token_id=BEAM_PAD, max_new_tokens=BEAM_NEW,
    ).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = eqzoo.hf.load_generation_config(tmp_path)
    kwargs = config.beam_kwargs()
    assert kwargs == dict(
        eos_token=(eos,), pad_token=BEAM_PAD, max_new_tokens=BEAM_NEW, num_beams=4, length_penalty=0.5,
        early_stopping=True, num_return_sequences=2,
    )
    with hft.torch.no_grad():
        want = hf_model.generate(
            hft.torch.as_tensor(prompt[None], dtype=hft.torch.long), return_dict_in_generate=True, output_scores=True,
            generation_config=hft.transformers.GenerationConfig.from_pretrained(tmp_path),
        )
    tokens, scores = generate_beam(loaded("gpt2"), jnp.asarray(prompt), return_scores=True, **kwargs)
    _assert_same_beams(tokens, scores, want.sequences.numpy(), want.sequences_scores.numpy(), "from the file")
    with pytest.warns(UserWarning, match=r"asks for beam search \(num_beams=4\); kwargs\(\) gives eqzoo.generate's"):
        config.kwargs()
    assert dataclasses.replace(config, repetition_penalty=1.2).beam_kwargs() == kwargs | dict(repetition_penalty=1.2)
    # a file that samples with beams: transformers' beam sampling, with its filters
    sampling = dataclasses.replace(config, temperature=0.7, top_k=50, top_p=0.9)
    assert sampling.beam_kwargs() == kwargs | dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    with pytest.warns(UserWarning, match=r"asks for beam sampling \(num_beams=4\); kwargs\(\) gives eqzoo.generate's .*sample without beams"):
        sampling.kwargs()
    # do_sample=False: the deterministic search, and kwargs() says it decodes greedily
    assert sampling.beam_kwargs(do_sample=False) == kwargs
    with pytest.warns(UserWarning, match=r"asks for beam sampling .*which decode greedily"):
        assert sampling.kwargs(do_sample=False)["temperature"] == 0.0
