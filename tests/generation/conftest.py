"""Fixtures shared by the generation tests."""

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def gpt2(create):
    """tiny-gpt2 (vocabulary 256, 24 positions) with its float weights scaled by 8: at
    `init_std` 0.02 greedy decoding just repeats one token, which would hide what a logits
    processor changes."""
    model = create("tiny-gpt2", key=jax.random.key(0), max_seq=24)
    return jax.tree.map(lambda a: 8 * a if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) else a, model)
