"""XLA performance flags that eqzoo sets for GPU training, only where the user has not."""

from ._xla_flags import (
    GPU_XLA_FLAGS as GPU_XLA_FLAGS,
    applied_xla_flags as applied_xla_flags,
    apply_xla_flags as apply_xla_flags,
)

__all__ = ["GPU_XLA_FLAGS", "applied_xla_flags", "apply_xla_flags"]
