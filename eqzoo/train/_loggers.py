"""Metric loggers: JSON lines, TensorBoard (when tensorboardX is installed), and the console."""

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from .._errors import require


@runtime_checkable
class Logger(Protocol):
    """What [`eqzoo.train.fit`][] calls: `log(step, metrics)` with floats, then `close()`."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JSONLLogger:
    """Appends one JSON object per logged step to a file: `{"step": 10, "train/loss": 2.3, ...}`.

    Each line is flushed as it is written, so a killed run keeps everything logged before.
    """

    def __init__(self, path: str | Path):
        """**Arguments:** `path` of the `.jsonl` file (parent folders are created)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one line."""
        record = {"step": int(step), **{k: _json_float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _json_float(v: Any) -> Any:
    v = float(v)
    return v if math.isfinite(v) else str(v)


class TensorBoardLogger:
    """Writes scalars for TensorBoard with `tensorboardX` (install it to use this logger)."""

    def __init__(self, logdir: str | Path):
        """**Arguments:** `logdir`, the TensorBoard run folder."""
        tbx = require("tensorboardX", "tensorboard")
        self._writer = tbx.SummaryWriter(str(logdir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Add each metric as a scalar at `step`."""
        for k, v in metrics.items():
            self._writer.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        """Flush and close."""
        self._writer.close()


class ConsoleLogger:
    """Prints a progress line per logged step: step, metrics, speed and time left."""

    def __init__(self, total_steps: int | None = None, *, stream: TextIO | None = None, keys: tuple[str, ...] | None = None):
        """**Arguments:** `total_steps` (for the ETA), output `stream` (default stderr), and the
        metric `keys` to show (default all)."""
        self.total = total_steps
        self.stream = sys.stderr if stream is None else stream
        self.keys = keys
        self._start: float | None = None
        self._start_step = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Print one line."""
        now = time.perf_counter()
        if self._start is None:
            self._start, self._start_step = now, step
        shown = {k: v for k, v in metrics.items() if self.keys is None or k in self.keys}
        parts = [f"step {step:>6d}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k} {float(v):.4g}" for k, v in shown.items()]
        elapsed = now - self._start
        done = step - self._start_step
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.2f} steps/s")
            if self.total:
                parts.append(f"eta {_fmt_seconds((self.total - step) / rate)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        """Nothing to release."""


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
