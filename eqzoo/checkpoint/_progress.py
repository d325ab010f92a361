"""`Checkpointer(progress=...)`: one line when each save starts, with how long training waited for
it, and one when it is committed."""

import time
from pathlib import Path

from .._typing import TextStream


class SaveProgress:
    """Reports saves on `stream` (`None`: silent) as `checkpoint: ...` lines; a save's commit is
    seen at the next `check`."""

    def __init__(self, stream: TextStream | None, directory: Path):
        self._stream = stream
        self._directory = directory
        self._pending: tuple[int, float] | None = None  # (step, when its save began), until seen committed

    def _say(self, line: str) -> None:
        print(f"checkpoint: {line}", file=self._stream, flush=True)

    def started(self, step: int, began: float, *, asynchronous: bool) -> None:
        """The save of `step`, begun at `time.perf_counter()` `began`, has handed back control."""
        if self._stream is None:
            return
        self.check()  # the previous save, if it committed meanwhile
        waited = time.perf_counter() - began
        how = "copied off the device" if asynchronous else "written"
        self._say(f"saving step {step} to {self._directory} (training waited {waited:.2f}s while it was {how})")
        self._pending = (step, began)
        self.check()  # a synchronous save is committed already

    def check(self, *, finished: bool = False) -> None:
        """Report the pending save's commit if its step directory is there now."""
        # One stat call while a save is pending: cheap enough for every step. `finished`: the
        # writes are over, so a step not committed now never will be.
        if self._pending is None:
            return
        step, began = self._pending
        if (self._directory / str(step)).is_dir():
            self._pending = None
            self._say(f"step {step} committed, {time.perf_counter() - began:.1f}s after its save began")
        elif finished:
            self._pending = None
            self._say(f"step {step} was NOT committed (its write failed; see the errors above)")
