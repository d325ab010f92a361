"""The axis-name vocabulary and type aliases shared across eqzoo.

Axis names used in jaxtyping annotations throughout the library:

- `batch`: examples in a batch (only ever outside a model; models take one example)
- `seq`: positions in a sequence; `slots` for the positions a KV cache holds
- `embed`: model width; `hidden` for MLP inner width
- `heads`, `kv_heads`, `head_dim`: attention heads
- `vocab`: vocabulary entries
- `layers`: a leading axis of stacked layers; `experts`: mixture-of-experts experts
- `channels height width`: one image (channels first)
- `features` / `out`: the input and output widths of a vector model
- `times` (and `obs_times`, `pred_times`): the time grid of a differential equation; `points
  dim`: collocation points of a physics-informed loss

Token ids, segment ids, positions and class labels are `Integer` (signed or unsigned: uint16
token corpora are common), not `Int` (signed only).
"""

from typing import Any, Protocol, TypeAlias, runtime_checkable

from jaxtyping import PRNGKeyArray, PyTree

PRNGKey: TypeAlias = PRNGKeyArray
"""A typed JAX PRNG key (made with `jax.random.key`)."""

Metrics: TypeAlias = dict[str, Any]
"""A flat mapping from metric name to a scalar array or Python number."""



@runtime_checkable
class TextStream(Protocol):
    """Where progress lines go: anything with `write(str)` and `flush()` (`sys.stderr`, an open
    text file, `io.StringIO`); `typing.TextIO` would refuse `io.StringIO` under type checking."""

    def write(self, s: str, /) -> Any: ...

    def flush(self) -> Any: ...


__all__ = ["PRNGKey", "PyTree", "Metrics", "TextStream"]
