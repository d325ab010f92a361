"""Beam search: its errors (the reference tests against transformers are in tests/hf/test_generate.py)."""

import jax.numpy as jnp
import pytest

from eqzoo._errors import ConfigError, ShapeError
from eqzoo.generation import generate_beam

PROMPT = jnp.array([5, 17, 42, 7, 99], jnp.int32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_beams=0), ConfigError, r"generate_beam: num_beams must be an integer >= 1, got 0"),
        (dict(num_beams=2, num_return_sequences=3), ConfigError,
         r"num_return_sequences=3 exceeds num_beams=2; .* Raise num_beams to at least 3"),
        (dict(max_new_tokens=0), ConfigError, r"generate_beam: max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=20), ShapeError, r"prompt length 5 \+ max_new_tokens 20 = 25 exceeds the model's max_seq=24"),
        (dict(temperature=0.7, top_k=5), ConfigError,
         r"got \{'temperature': 0.7, 'top_k': 5\}: eqzoo's beam search is deterministic .* For sampling use eqzoo.generate"),
        (dict(num_beam=4), ConfigError, r"generate_beam got unexpected keyword arguments \['num_beam'\]"),
        (dict(early_stopping="sometimes"), ConfigError, r"early_stopping must be True, False or 'never' .*got 'sometimes'"),
        (dict(length_penalty=float("nan")), ConfigError, r"length_penalty must be a finite number .*got nan"),
        (dict(repetition_penalty=0.0), ConfigError, r"repetition_penalty must be a finite number > 0 .*got 0.0"),
        (dict(eos_token=300), ConfigError, r"generate_beam: eos_token \[300\] holds ids \[300\] outside the model's vocabulary"),
    ],
)
def test_generate_beam_errors(gpt2, kwargs, error, match):
    # Each is refused before anything compiles, with the rule and the fix.
    kwargs = dict(max_new_tokens=4) | kwargs
    with pytest.raises(error, match=match):
        generate_beam(gpt2, PROMPT, **kwargs)


def test_generate_beam_needs_a_language_model():
    with pytest.raises(ConfigError, match=r"generate_beam needs an eqzoo language model .*got object"):
        generate_beam(object(), PROMPT, max_new_tokens=4)
