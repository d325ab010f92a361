"""A `jax.profiler` trace of a window of `fit`'s steps."""

import contextlib
import dataclasses
import os
import sys
import warnings
from pathlib import Path

import jax

from .._errors import ConfigError, user_stacklevel


@dataclasses.dataclass(frozen=True)
class Profile:
    """Which of [`eqzoo.train.fit`][]'s steps to trace with `jax.profiler`, and where to write
    the trace (`fit(..., profile=Profile("runs/profile"))`).

    `fit` starts the trace after the run's first `skip` steps (the first compiles the step;
    the next ones warm up the input pipeline and the allocator) and stops it after `steps`
    more, once the device has finished them, so the trace holds whole steps and nothing after.
    Each traced step is a `jax.profiler.StepTraceAnnotation` named `"train"` with its step
    number (taking the batch and dispatching the step), which TensorBoard's profile plugin and
    XProf use to cut the trace into steps. The steps are counted from where the run starts, so
    a resumed run traces its own steps `skip ...`. A run that ends, or raises, before the window
    closes stops the trace there.

    The trace lands in `log_dir/plugins/profile/<time>/` (one `<host>.xplane.pb` per process,
    and a `<host>.trace.json.gz` for Perfetto); `fit` prints that folder and returns it as
    `FitResult.profile`. Open `log_dir` with `tensorboard --logdir` (with the
    `tensorboard-plugin-profile` package) or `xprof`, or the `.json.gz` at ui.perfetto.dev.

    **Arguments:**

    - `log_dir`: the folder to write into (created if missing).
    - `steps`: how many steps to trace, at least 1 (default 5). A trace grows with each step
      (tens of MB a step for a large model on a GPU): keep it short.
    - `skip`: how many of the run's steps to take before the trace starts, at least 0
      (default 3).
    """

    log_dir: str | os.PathLike
    steps: int = 5
    skip: int = 3

    def __post_init__(self):
        if not isinstance(self.log_dir, str | os.PathLike) or not str(self.log_dir):
            raise ConfigError(f"Profile: log_dir must be a folder path (a str or a Path); got {self.log_dir!r}.")
        for name, least in (("steps", 1), ("skip", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"Profile: {name} must be an integer >= {least}; got {value!r}.")


class Tracer:
    """`fit`'s side of a `Profile`: `around(index, step)` wraps the run's step number `index`
    (0 for its first; `step` is its number as `fit` logs it, the step count after it), starting the trace before the
    window's first step and annotating each step in the window; `after(index, state)` stops it
    after the window's last; `close(state)` stops a trace still running (a run that ended or
    raised inside the window). `path` is the trace's folder once written."""

    def __init__(self, profile: Profile | None):
        if profile is not None and not isinstance(profile, Profile):
            raise ConfigError(
                f"fit: profile must be an eqzoo.train.Profile (e.g. Profile('runs/profile', steps=5)) or None; "
                f"got {type(profile).__name__}."
            )
        self.profile, self.active, self.path, self.first, self.last = profile, False, None, None, None

    def around(self, index: int, step: int):
        p = self.profile
        if p is None or not p.skip <= index < p.skip + p.steps:
            return contextlib.nullcontext()
        if index == p.skip:
            Path(p.log_dir).mkdir(parents=True, exist_ok=True)
            try:
                jax.profiler.start_trace(str(p.log_dir))
            except RuntimeError as err:  # e.g. a trace of the caller's own already running
                warnings.warn(
                    f"fit: the profiler trace could not start ({err}); training goes on without it. Stop the other "
                    "trace (jax.profiler.stop_trace()) or drop profile=.",
                    stacklevel=user_stacklevel(),
                )
                self.profile = None
                return contextlib.nullcontext()
            self.active, self.first = True, step
        self.last = step
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, index: int, state) -> None:
        p = self.profile
        if self.active and index == p.skip + p.steps - 1:
            self.close(state)

    def close(self, state) -> None:
        if not self.active:
            return
        self.active = False
        try:
            jax.block_until_ready(state)  # the window's last step done on the device, in the trace
        except Exception:  # a state deleted (donated) by a step that raised: stop the trace all the same
            pass
        before = set(_runs(self.profile.log_dir))
        jax.profiler.stop_trace()
        written = sorted(set(_runs(self.profile.log_dir)) - before) or sorted(_runs(self.profile.log_dir))[-1:]
        self.path = str(written[-1]) if written else str(self.profile.log_dir)
        print(f"fit: traced steps {self.first}-{self.last} into {self.path}", file=sys.stderr, flush=True)


def _runs(log_dir) -> list[Path]:
    return [p for p in (Path(log_dir) / "plugins" / "profile").glob("*") if p.is_dir()]

