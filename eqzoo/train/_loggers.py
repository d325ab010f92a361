"""Metric loggers: JSON lines, TensorBoard (when tensorboardX is installed), and the console."""

import fnmatch
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .._errors import ConfigError, require, user_stacklevel
from .._typing import TextStream


@runtime_checkable
class Logger(Protocol):
    """What [`eqzoo.train.fit`][] calls: `log(step, metrics)` with floats, then `close()`."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` (`"train/loss"`, `"eval/loss"`, ...: floats) at `step`."""
        ...

    def close(self) -> None:
        """Flush and release what the logger holds; called once, when `fit` ends."""
        ...


class JSONLLogger:
    """Appends one JSON object per logged step to a file: `{"step": 10, "train/loss": 2.3, ...}`.

    Each line is flushed as it is written, so a killed run keeps everything logged before.

    A run resumed from a checkpoint appends to the file of the run it resumes, and runs the
    steps after that checkpoint again. [`eqzoo.train.fit`][] tells the logger the step it starts
    from (`begin`), and the records the file already holds past that step are cut off (with a
    warning saying how many), as is a last line cut short by a kill: the file stays one history
    with each step once. A fresh run (step 0) on an old file keeps none of it. Only what the
    file held when the logger opened it is considered, and the file is truncated in place, so
    another logger appending to it is not disturbed. A file that is not a log of this class (a
    line that is not a JSON object with an integer `"step"`) is never cut; its new lines are
    appended.
    """

    def __init__(self, path: str | Path):
        """**Arguments:** `path` of the `.jsonl` file (parent folders are created)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._held = self._file.tell()  # bytes an earlier run wrote: the only ones ever cut
        self._first = True

    def begin(self, step: int) -> None:
        """The run starts after `step` (a resumed state's step, or 0): records of later steps
        that the file already holds are cut off. [`eqzoo.train.fit`][] calls it; without it,
        the first `log` cuts from its own step."""
        self._first = False
        self._rewind(int(step) + 1)

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
        """Cut the records of steps `>= step` that the file held when opened (see the class doc)."""
        if not self._held:
            return
        with self.path.open("rb") as f:
            lines = f.read(self._held).splitlines(keepends=True)
        offset, cut_at, repeated = 0, None, 0
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if line.strip():
                try:
                    record = json.loads(line)
                    s = record["step"]
                    if isinstance(s, bool) or not isinstance(s, int):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    if not (last and not line.endswith(b"\n") and line.startswith(b'{"step": ')):
                        if not lines[-1].endswith(b"\n"):
                            self._file.write("\n")  # appended to, never cut: on a line of its own
                        return  # not a log this class wrote
                    cut_at = offset if cut_at is None else cut_at
                    break
                if s >= step:
                    cut_at = offset if cut_at is None else cut_at
                    repeated += 1
            offset += len(line)
        if cut_at is None:
            if lines and not lines[-1].endswith(b"\n"):
                self._file.write("\n")  # a whole record that lost only its newline
            return
        if repeated:
            warnings.warn(
                f"JSONLLogger: {self.path} already holds {repeated} record(s) from step {step} on, which this "
                f"run logs again (it resumes from an earlier checkpoint, or starts afresh); they are cut off. "
                f"Use a new path to keep an unrelated run's log.",
                stacklevel=user_stacklevel(),
            )
        self._file.flush()
        os.truncate(self.path, cut_at)  # in place: the same file, for every handle and link to it


def _json_float(v: Any) -> Any:
    v = float(v)
    return v if math.isfinite(v) else str(v)


class TensorBoardLogger:
    """Writes scalars for TensorBoard with `tensorboardX` (`pip install 'eqzoo[tensorboard]'`; without
    it the constructor raises an `ImportError` naming that extra)."""

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
    """Prints a progress line per logged step: step, metrics, speed and time left.

    The speed is training steps per second: under [`eqzoo.train.fit`][] it is taken from the
    `train/steps_per_s` that `fit` measures per logging window (evaluation, its compilation,
    logging and callbacks not counted; the time training waits for a checkpoint save counted),
    from the second logged window on, so the train step's first compilation is left out too.
    Metrics without `train/steps_per_s` (a loop of your own) are timed by the wall clock from
    the first logged step. The ETA divides the steps left by that speed, so it leaves out the
    evaluations still to come.

    Per-layer metrics (a key with a `/layer_<i>` part, such as the `train/moe_dropped/layer_3`
    of [`lm_loss(per_layer=True)`][eqzoo.train.lm_loss]: three per layer, 192 for a 64-layer
    model) are left off the line unless `keys` asks for them; the structured loggers
    ([`eqzoo.train.JSONLLogger`][], [`eqzoo.train.TensorBoardLogger`][]) record every key.
    """

    def __init__(self, total_steps: int | None = None, *, stream: TextStream | None = None, keys: tuple[str, ...] | None = None):
        """**Arguments:** `total_steps` (for the ETA), output `stream` (default stderr), and the
        metric `keys` to show, in the order the metrics come: each a key or a shell-style pattern
        (`fnmatch`: `"train/moe_dropped/*"` shows that statistic of every layer). The default
        shows every metric except the per-layer ones."""
        given = keys
        if not (isinstance(keys, str) or keys is None):
            try:
                keys = tuple(keys)  # read once: a generator checked first would show nothing
            except TypeError:  # not a collection: refused below
                keys = (keys,)
        if isinstance(keys, str) or (keys is not None and not all(isinstance(k, str) for k in keys)):
            raise ConfigError(
                f"ConsoleLogger: keys must be a tuple of metric names or patterns, such as ('train/loss',); got {given!r}."
            )
        self.total = total_steps
        self.stream = sys.stderr if stream is None else stream
        self.keys = keys
        self._start: float | None = None
        self._start_step = 0
        self._last_step: int | None = None
        self._train_steps = 0
        self._train_seconds = 0.0
        self._warned_past_total = False

    def _rate(self, step: int, metrics: dict[str, float], now: float) -> float | None:
        window = metrics.get("train/steps_per_s")
        if window is not None:  # fit's own measure of the steps since its previous train record
            previous, self._last_step = self._last_step, step
            window = float(window)
            if previous is not None and step > previous and math.isfinite(window) and window > 0:
                self._train_steps += step - previous
                self._train_seconds += (step - previous) / window
        if self._last_step is not None:  # timed by fit (an evaluation-only record adds nothing)
            return self._train_steps / self._train_seconds if self._train_seconds > 0 else None
        if self._start is None:
            self._start, self._start_step = now, step
        elapsed, done = now - self._start, step - self._start_step
        return done / elapsed if done > 0 and elapsed > 0 else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Print one line."""
        now = time.perf_counter()
        if self.total and step > self.total and not self._warned_past_total:
            self._warned_past_total = True
            warnings.warn(
                f"ConsoleLogger: step {step} is past total_steps={self.total}; total_steps is the run's "
                "number of steps (for the ETA), not how often fit logs (that is fit's log_every).",
                stacklevel=user_stacklevel(),
            )
        shown = {k: v for k, v in metrics.items() if self._shows(k)}
        parts = [f"step {step:>6d}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k} {float(v):.4g}" for k, v in shown.items()]
        rate = self._rate(step, metrics, now)
        if rate is not None:
            parts.append(f"{rate:.2f} steps/s")
            if self.total:
                parts.append(f"eta {_fmt_seconds((self.total - step) / rate)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def _shows(self, key: str) -> bool:
        if self.keys is None:
            return _PER_LAYER.search(key) is None
        return any(key == k or fnmatch.fnmatchcase(key, k) for k in self.keys)

    def close(self) -> None:
        """Nothing to release."""


_PER_LAYER = re.compile(r"/layer_\d+(/|$)")  # a per-layer metric: "train/moe_dropped/layer_3"


def _fmt_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
