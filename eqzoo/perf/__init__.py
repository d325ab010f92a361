"""Performance tools: the XLA flags eqzoo sets for GPU training (only where the user has not),
and the collectives of a compiled program, counted from its HLO."""

from ._collectives import (
    COLLECTIVE_KINDS as COLLECTIVE_KINDS,
    Collective as Collective,
    collective_summary as collective_summary,
    collectives as collectives,
)
from ._xla_flags import (
    GPU_XLA_FLAGS as GPU_XLA_FLAGS,
    applied_xla_flags as applied_xla_flags,
    apply_xla_flags as apply_xla_flags,
)

__all__ = [
    "COLLECTIVE_KINDS",
    "Collective",
    "GPU_XLA_FLAGS",
    "applied_xla_flags",
    "apply_xla_flags",
    "collective_summary",
    "collectives",
]
