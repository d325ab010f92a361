"""Metric loggers: JSON lines, TensorBoard (when tensorboardX is installed), and the console."""

import json
import math
import sys
import time
import warnings
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

    A run resumed from a checkpoint appends to the same file. It repeats the steps logged after
    that checkpoint, so on its first log the records from that step on are dropped (with a
    warning naming how many): the file stays one history with each step once. A file that
    cannot be read as JSON lines is never rewritten; its new lines are appended.
    """

    def __init__(self, path: str | Path):
        """**Arguments:** `path` of the `.jsonl` file (parent folders are created)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._first = True

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one line."""
        if self._first:
            self._first = False
            self._rewind(int(step))
        record = {"step": int(step), **{k: _json_float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def _rewind(self, step: int) -> None:
        """Drop the records of steps `>= step` that an earlier run wrote (see the class doc)."""
        if self.path.stat().st_size == 0:
            return
        lines = self.path.read_text().splitlines(keepends=True)
        torn = not lines[-1].endswith("\n")  # a run killed mid-write: its last line is cut short
        steps, cut = [], False
        for i, line in enumerate(lines):
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                if not (torn and i == len(lines) - 1):
                    return  # not a log this class wrote: never rewritten
                steps.append(step)  # the cut-short line is dropped with the repeated ones
                cut = True
        keep = [line for line, s in zip(lines, steps, strict=True) if s < step]
        if torn and keep and keep[-1] is lines[-1]:
            keep[-1] += "\n"  # a whole record that lost only its newline
        if keep == lines:
            return
        repeated = sum(s >= step for s in steps) - cut
        if repeated:
            warnings.warn(
                f"JSONLLogger: {self.path} already holds {repeated} record(s) from step {step} on, "
                f"which this run logs again (a resume from an earlier checkpoint); they are "
                f"dropped. Use a new path to keep an unrelated run's log.",
                stacklevel=3,
            )
        self._file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(self.path)  # atomic: a crash here leaves the old or the new file, whole
        self._file = self.path.open("a")


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
