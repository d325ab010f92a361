"""Decoding: KV-cache generation for one prompt or a batch, and token sampling.

`eqzoo.generate` is this package's `generate`.
"""

from ._generate import generate as generate, generate_batch as generate_batch
from ._sampling import sample_logits as sample_logits

__all__ = ["generate", "generate_batch", "sample_logits"]
