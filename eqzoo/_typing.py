"""The axis-name vocabulary and type aliases shared across eqzoo.

Axis names used in jaxtyping annotations throughout the library:

- `batch`: examples in a batch (only ever outside a model; models take one example)
- `seq`: positions in a sequence; `kv_seq` for key/value positions
- `embed`: model width; `hidden` for MLP inner width
- `heads`, `kv_heads`, `head_dim`: attention heads
- `vocab`: vocabulary entries
"""

from typing import Any, TypeAlias

from jaxtyping import PRNGKeyArray, PyTree

PRNGKey: TypeAlias = PRNGKeyArray
"""A typed JAX PRNG key (made with `jax.random.key`)."""

Metrics: TypeAlias = dict[str, Any]
"""A flat mapping from metric name to a scalar array or Python number."""

__all__ = ["PRNGKey", "PyTree", "Metrics"]
