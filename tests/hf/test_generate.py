"""Greedy decoding of a loaded checkpoint gives exactly transformers' greedy tokens."""

import jax.numpy as jnp
import numpy as np
import pytest

import eqzoo
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
