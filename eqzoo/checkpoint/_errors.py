"""The errors `eqzoo.checkpoint` raises, and how their messages list parameters."""

from .._errors import EqzooError


class CheckpointError(EqzooError):
    """Base class of every checkpoint error (and raised itself for misuse, e.g. bad arguments)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory does not exist, holds no committed step, or lacks the step asked for."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's arrays do not fit the restore target (missing, extra, or other shapes or
    dtypes); the message lists each offending parameter path with what was expected and found."""


class CheckpointCorruptError(CheckpointError):
    """A committed step fails its integrity check (truncated, altered or missing files, or
    unreadable metadata); the message names the step and the affected parameters.

    **Attributes:** `step` (the step that failed; `None` for a weights file) and `parameters` (the affected names).
    """

    def __init__(self, message: str, *, step: int | None, parameters: tuple[str, ...] = ()):
        super().__init__(message)
        self.step = step
        self.parameters = parameters


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written in a newer eqzoo checkpoint format than this eqzoo reads."""


def list_items(items: list[str], limit: int = 20) -> str:
    """One indented line per item, at most `limit` of them, then how many more there are."""
    shown = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"  ... and {len(items) - limit} more")
    return "\n".join(shown)
