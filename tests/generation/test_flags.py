"""True/False options given as NumPy bools (`np.True_`: what a comparison or a boolean array's
item gives) act as the Python bools and are stored as them; other values are still refused.
Without the type-checking hook, that is: under it the `bool` annotations refuse a NumPy bool
first, so these tests run `unchecked`."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqzoo import models, train
from eqzoo._errors import ConfigError
from eqzoo.generation import (
    generate_batch as generate,
    generate_beam,
    generate_speculative,
    generate_stream,
)
from eqzoo.nn import Stacked

PROMPTS = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)


def test_generation_flags_take_numpy_bools(gpt2, unchecked):
    with unchecked():
        _generation_flags(gpt2)


def _generation_flags(gpt2):
    key = jax.random.key(3)
    for flag in (np.True_, np.False_):
        plain = bool(flag)
        want = generate(gpt2, PROMPTS, max_new_tokens=3, use_cache=plain, return_logprobs=plain, key=key, temperature=1.0)
        got = generate(gpt2, PROMPTS, max_new_tokens=3, use_cache=flag, return_logprobs=flag, key=key, temperature=1.0)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(a, b)
    want = generate_beam(gpt2, PROMPTS, max_new_tokens=3, num_beams=2, early_stopping=True, return_scores=True)
    got = generate_beam(gpt2, PROMPTS, max_new_tokens=3, num_beams=2, early_stopping=np.True_, return_scores=np.True_,
                        do_sample=np.False_)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    tokens, stats = generate_speculative(gpt2, gpt2, PROMPTS, max_new_tokens=3, num_draft=2, return_stats=np.True_)
    np.testing.assert_array_equal(tokens, generate(gpt2, PROMPTS, max_new_tokens=3))
    assert stats["rounds"].shape == (2,)
    chunks = list(generate_stream(gpt2, PROMPTS, max_new_tokens=3, chunk_size=2, pipeline=np.False_))
    assert sum(c.tokens.shape[-1] for c in chunks) == 3
    for bad in (1, "yes", np.array([True])):
        with pytest.raises(ConfigError, match="use_cache must be True or False"):
            generate(gpt2, PROMPTS, max_new_tokens=3, use_cache=bad)
    with pytest.raises(ConfigError, match="early_stopping must be True, False or 'never'"):
        generate_beam(gpt2, PROMPTS, max_new_tokens=3, num_beams=2, early_stopping=1)


def test_configs_store_numpy_bools_as_bools(unchecked):
    with unchecked():
        _config_flags()


def _config_flags():
    config = dataclasses.replace(models.get_config("tiny-gpt2"), scan_layers=np.False_)
    assert config.scan_layers is False
    json.dumps(dataclasses.asdict(config))  # a NumPy bool would not serialise
    assert dataclasses.replace(config, scan_layers=np.str_("auto")).scan_layers == "auto"
    for bad in (1, 0.0, "on"):
        with pytest.raises(ConfigError, match="scan_layers must be True, False or 'auto'"):
            dataclasses.replace(config, scan_layers=bad)
    mixtral = dataclasses.replace(models.get_config("tiny-mixtral"), normalize_router_weights=np.True_)
    assert mixtral.normalize_router_weights is True and mixtral.scan_layers in (True, False, "auto")
    llama = dataclasses.replace(models.get_config("tiny-llama"), scan_layers=np.True_, tie_embeddings=np.True_)
    assert llama.scan_layers is True and llama.tie_embeddings is True
    json.dumps(dataclasses.asdict(llama))
    with pytest.raises(ConfigError, match=r"LlamaConfig: tie_embeddings must be True or False, got 1\."):
        dataclasses.replace(llama, tie_embeddings=1)
    stack = Stacked(lambda k: eqx.nn.Linear(4, 4, key=k), 2, scan=np.True_, key=jax.random.key(0))
    assert stack.scan is True


def test_lm_loss_per_layer_takes_a_numpy_bool(create, unchecked):
    model = create("tiny-mixtral", key=jax.random.key(0))
    with unchecked():
        _per_layer(model)


def _per_layer(model):
    ids = jnp.asarray(np.arange(2 * 9).reshape(2, 9) % 50, jnp.int32)
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:]}
    shapes = eqx.filter_eval_shape(lambda m: train.lm_loss(m, batch, per_layer=np.True_), model)[1]
    plain = eqx.filter_eval_shape(lambda m: train.lm_loss(m, batch, per_layer=True), model)[1]
    assert sorted(shapes) == sorted(plain) and len(plain) > 4
    with pytest.raises(ConfigError, match="per_layer must be True or False"):
        train.lm_loss(model, batch, per_layer=1)
