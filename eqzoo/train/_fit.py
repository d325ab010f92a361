"""`fit`: the thin loop around a compiled train step — logging, evaluation, callbacks."""

import dataclasses
import operator
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Int

from .._errors import ConfigError
from ._loggers import Logger
from ._readback import mean_metrics
from ._state import TrainState
from ._step import EvalStep, TrainStep

Callback = Callable[[int, TrainState, dict[str, float]], bool | None]
"""A `fit` callback: `cb(step, state, record)`, called after each log with the step, the
train state and the logged record (a dict of float metrics); returning `True` stops training."""


@dataclasses.dataclass
class FitResult:
    """What [`eqzoo.train.fit`][] returns.

    **Attributes:** `state` (the final `TrainState`), `history` (every logged record, a list of
    dicts with `step` and float metrics), `stopped_early` (a callback or a signal asked to
    stop, or the batches ran out before `num_steps`).
    """

    state: TrainState
    history: list[dict[str, float]]
    stopped_early: bool = False

    def last(self, key: str) -> float:
        """The most recent logged value of `key` (e.g. `"train/loss"`)."""
        for record in reversed(self.history):
            if key in record:
                return record[key]
        raise KeyError(f"no logged metric {key!r}; logged keys: {sorted({k for r in self.history for k in r})}")


def evaluate(eval_step: EvalStep, state: TrainState, batches: Iterable[Any]) -> dict[str, float]:
    """Average `eval_step` metrics over `batches` (each metric weighted equally per batch).

    The steps are dispatched one after another and their metrics averaged on the device and
    read back once, at the end, in one transfer, so the host never waits for the device between
    batches (as `fit` reads a log window's metrics back; an array metric counts as the mean of
    its elements)."""
    pending = [eval_step(state, batch) for batch in batches]
    if not pending:
        raise ConfigError("evaluate got no batches; check the eval data source.")
    return mean_metrics(pending)


def _evaluated(history: list[dict[str, float]], step: int) -> bool:
    return bool(history) and history[-1]["step"] == step and any(k.startswith("eval/") for k in history[-1])


def _run_record(
    num_steps: int, batch: Any, run_config: Mapping[str, Any] | None, hyperparams: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint records of the run that saved it (the batch is described on the host, no
    device sync); `hyperparams`, the `optax.inject_hyperparams` values the state starts from,
    only when it has any."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]

    def name(path) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path) or "batch"

    shapes = {
        name(path): f"{np.dtype(x.dtype).name}{tuple(int(d) for d in x.shape)}"
        for path, x in leaves
        if hasattr(x, "shape") and hasattr(x, "dtype")
    }
    record = {"num_steps": num_steps, "batch": shapes, "run_config": dict(run_config or {})}
    if hyperparams:
        record["hyperparams"] = dict(hyperparams)
    return record


def fit(
    state: TrainState,
    train_step: TrainStep,
    batches: Iterable[Any],
    *,
    num_steps: int | Int[Array, ""],
    eval_step: EvalStep | None = None,
    eval_batches: Callable[[], Iterable[Any]] | None = None,
    eval_every: int | None = None,
    log_every: int = 10,
    loggers: Iterable[Logger] = (),
    callbacks: Iterable[Callback] = (),
    checkpointer: Any = None,
    run_config: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train until `state.step == num_steps`, logging, evaluating and calling back on the way.

    The loop only dispatches compiled steps; it reads metrics back to the host every `log_every`
    steps (so the device is not synchronised every step), averaged over the window on the
    device and read back as one vector: one transfer per log, however many metrics the step
    returns (with `lm_loss(per_layer=True)`, three per MoE layer).

    **Arguments:**

    - `state`: the starting [`eqzoo.train.TrainState`][] (its `step` may be > 0 when resuming).
    - `train_step`: from [`eqzoo.train.make_train_step`][].
    - `batches`: an iterable of batches (e.g. an `eqzoo.data.TokenLoader`). If it ends before
      `num_steps`, training stops there with a warning: the last steps are logged (and
      evaluated and checkpointed) as at the end, and the result has `stopped_early=True`.
    - `num_steps`: the total step count to reach (a device scalar is read back once, here).
    - `eval_step`, `eval_batches`, `eval_every`: run `eval_step` over the batches that
      `eval_batches()` yields every `eval_every` steps (default: only at the end) and at the last
      step; logged as `eval/<name>`, in the step's `train/` record when it has one (`eval_every`
      need not be a multiple of `log_every`).
    - `log_every`: how often to log `train/<name>` metrics (averaged over the steps since the
      last log, in float32 on the device; an integer or bool metric as a float, an array metric
      as the mean of its elements) and `train/steps_per_s` (training steps per second over
      that window, not counting evaluation, loggers and callbacks; checkpoint saves count, as
      the time they take from training).
    - `loggers`: e.g. `ConsoleLogger`, `JSONLLogger`, `TensorBoardLogger`; one with a
      `begin(step)` method is told first the step training starts from.
    - `callbacks`: `cb(step, state, record)` after each log; returning `True` stops training.
    - `checkpointer`: optional object with `maybe_save(state, batches, *, force=False, step=None)
      -> bool` and `should_stop() -> bool`, called after every step (see
      `eqzoo.checkpoint.Checkpointer`); `step` is the step just taken, so it need not be read
      back from the device. One with a `begin_run(run, *, step)` method is told first what this
      run is (below).
    - `run_config`: your run's settings that `fit` cannot see (learning rate, schedule,
      warmup, ...), a JSON-able dict. With `num_steps` and the first batch's shapes and
      dtypes, and the numeric `optax.inject_hyperparams` values the state starts from, it is
      recorded in every checkpoint the `checkpointer` saves (`meta.run`), and a run resumed
      from a checkpoint whose record differs warns once, naming each setting that changed.

    **Returns:** a [`eqzoo.train.FitResult`][].
    """
    # Checked before the first step: a bad argument found at the first evaluation (by default
    # at the end) would lose the whole run, its input state donated.
    for name, value, least in (("num_steps", num_steps, 0), ("log_every", log_every, 1), ("eval_every", eval_every, 1)):
        if value is None and name == "eval_every":
            continue
        try:
            if isinstance(value, bool):
                raise TypeError
            number = operator.index(value)  # ints, NumPy integers, integer 0-d arrays
        except TypeError:
            number = None
        if number is None or number < least:
            raise ConfigError(f"fit: {name} must be an integer >= {least}; got {value!r}.")
        if name == "num_steps":
            # A Python int from here on: compared with a device scalar, each step's tests
            # (`step < num_steps`, the eval schedule) would each read it back from the device.
            num_steps = number
    if (eval_step is None) != (eval_batches is None):
        raise ConfigError("pass eval_step and eval_batches together (or neither).")
    if eval_batches is not None and not callable(eval_batches):
        raise ConfigError(
            f"fit: eval_batches must be a function returning the evaluation batches (each evaluation "
            f"iterates them afresh), e.g. eval_batches=lambda: batches; got a {type(eval_batches).__name__}."
        )
    if run_config is not None and not isinstance(run_config, Mapping):
        raise ConfigError(f"fit: run_config must be a dict of your run's settings; got a {type(run_config).__name__}.")
    if isinstance(batches, Mapping):
        raise ConfigError(
            "fit: batches must yield batches (an iterator, a loader, a list of dicts); got one dict, whose "
            "iteration yields its keys. Pass [batch] (one step) or itertools.repeat(batch)."
        )
    loggers = list(loggers)
    for logger in loggers:  # checked now, not at the first log or, for close, after the last step
        missing = [m for m in ("log", "close") if not callable(getattr(logger, m, None))]
        if missing:
            raise ConfigError(
                f"fit: each logger needs log(step, metrics) and close() methods (eqzoo.train.Logger); "
                f"{type(logger).__name__} has no {' or '.join(missing)}. Give it a close() that does "
                "nothing if it holds nothing to flush."
            )
    callbacks = list(callbacks)
    iterator: Iterator[Any] = iter(batches)
    step = first_step = int(state.step)
    if first_step > num_steps:
        warnings.warn(
            f"fit: the state is already at step {first_step}, past num_steps={num_steps} (a run resumed "
            "with a smaller num_steps?); nothing is trained, logged or saved. Pass a num_steps above the "
            "state's step to train on.",
            stacklevel=2,
        )
    for logger in loggers:
        if callable(getattr(logger, "begin", None)):
            logger.begin(first_step)  # e.g. JSONLLogger cuts an earlier run's records past it
    begin_run = getattr(checkpointer, "begin_run", None)
    history: list[dict[str, float]] = []
    pending: list[dict[str, jax.Array]] = []
    stopped = False
    last_time = time.perf_counter()
    last_step = step

    def emit(record: dict[str, float]) -> None:
        history.append(record)
        for logger in loggers:
            logger.log(int(record["step"]), {k: v for k, v in record.items() if k != "step"})

    def run_eval() -> dict[str, float]:
        assert eval_step is not None and eval_batches is not None
        return {f"eval/{k}": v for k, v in evaluate(eval_step, state, eval_batches()).items()}

    while step < num_steps and not stopped:
        try:
            batch = next(iterator)
        except StopIteration:  # the data ended first: keep what was trained, and say so
            warnings.warn(
                f"fit: the batches ran out after step {step} of num_steps={num_steps}; returning the state "
                "trained so far (stopped_early=True). Pass more batches (more epochs) or a smaller num_steps.",
                stacklevel=2,
            )
            stopped = True
        else:
            if callable(begin_run):  # before the first step: a bad run_config fails here
                # here: eqzoo.checkpoint imports eqzoo.train. One read of the injected scalars.
                from ..checkpoint._hyperparams import injected_values

                begin_run(_run_record(num_steps, batch, run_config, injected_values(state)), step=first_step)
                begin_run = None
            state, metrics = train_step(state, batch)
            step += 1
            pending.append(metrics)
        is_last = step == num_steps or stopped
        record = None
        if pending and (step % log_every == 0 or is_last):
            means = mean_metrics(pending)  # one transfer, however many steps and metrics
            pending = []
            now = time.perf_counter()
            record = {"step": float(step)} | {f"train/{k}": v for k, v in means.items()}
            record["train/steps_per_s"] = (step - last_step) / max(now - last_time, 1e-9)
        # Evaluated on its own schedule, with the logged record when there is one (eval_every
        # need not be a multiple of log_every), once per step: not again when the data ran out
        # right after an evaluated step.
        due = step % (eval_every or num_steps) == 0 or is_last
        if eval_step is not None and due and step > first_step and not _evaluated(history, step):
            record = (record or {"step": float(step)}) | run_eval()
        if record is not None:
            emit(record)
            if any(cb(step, state, record) for cb in callbacks):
                stopped = True
            # The next window starts after evaluation, logging and callbacks, so steps_per_s
            # measures training alone.
            last_time, last_step = time.perf_counter(), step
        if checkpointer is not None:
            checkpointer.maybe_save(state, batches, force=is_last or stopped, step=step)
            if checkpointer.should_stop():
                stopped = True
    for logger in loggers:
        logger.close()
    return FitResult(state, history, stopped)
