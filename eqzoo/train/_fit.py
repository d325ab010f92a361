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

from .._errors import ConfigError, as_flag, user_stacklevel
from ._loggers import Logger
from ._profile import Profile, Tracer
from ._readback import mean_metrics
from ._state import TrainState
from ._step import EvalStep, TrainStep

Callback = Callable[[int, TrainState, dict[str, float]], bool | None]
"""A `fit` callback: `cb(step, state, record)`, called after each log with the step, the
train state and the logged record (a dict of float metrics); returning `True` (a bool; any other
value, such as the int a file's `write` returns, is ignored; a 0-d boolean array counts as its
bool) stops training after that step."""


@dataclasses.dataclass
class FitResult:
    """What [`eqzoo.train.fit`][] returns.

    **Attributes:** `state` (the final `TrainState`), `history` (every logged record, a list of
    dicts with `step` and float metrics), `stopped_early` (a callback or a signal asked to
    stop, or the batches ran out before `num_steps`), `profile` (the folder of the trace a
    `profile=` wrote, or `None`).
    """

    state: TrainState
    history: list[dict[str, float]]
    stopped_early: bool = False
    profile: str | None = None

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
    its elements). An eqzoo loader (`TokenLoader`, `ArrayLoader`: endless) is refused: pass a
    finite iterable of its batches. The first batch's token ids (NumPy arrays) are checked
    against the model's `config.vocab_size` as `fit` checks its first training batch: an id
    outside the vocabulary raises a `ConfigError` rather than averaging NaN."""
    from ..data import ArrayLoader, TokenLoader

    if isinstance(batches, TokenLoader | ArrayLoader):
        raise ConfigError(
            f"evaluate got an eqzoo loader ({type(batches).__name__}), which yields batches without end; pass a finite "
            "iterable, e.g. [loader.batch_at(i) for i in range(n)], or for one epoch of an ArrayLoader "
            "itertools.islice(loader, loader.steps_per_epoch)."
        )
    pending = []
    for batch in batches:
        if not pending:  # an id past the vocabulary would make every metric NaN
            _check_token_ids(state, batch, caller="evaluate")
        pending.append(eval_step(state, batch))
    if not pending:
        raise ConfigError(
            "evaluate got no batches: the eval data source is empty. If eval_batches returns the same "
            "iterator each time, the first evaluation used it up; return a fresh one each call "
            "(eval_batches=lambda: iter(val_batches), or a list)."
        )
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
    profile: Profile | None = None,
) -> FitResult:
    """Train until `state.step == num_steps`, logging, evaluating and calling back on the way.

    The loop only dispatches compiled steps; it reads metrics back to the host every `log_every`
    steps (so the device is not synchronised every step), averaged over the window on the
    device and read back as one vector: one transfer per log, however many metrics the step
    returns (with `lm_loss(per_layer=True)`, three per MoE layer).

    **Arguments:**

    - `state`: the starting [`eqzoo.train.TrainState`][] (its `step` may be > 0 when resuming).
    - `train_step`: from [`eqzoo.train.make_train_step`][].
    - `batches`: an iterable of batches (e.g. an `eqzoo.data.TokenLoader`). A loader with
      `step` and `state_dict` (eqzoo's) at another step than `state` warns: a resumed run needs
      `loader.load_state_dict(restored.data_state)`. If it ends before
      `num_steps`, training stops there with a warning: the last steps are logged (and
      evaluated and checkpointed) as at the end, and the result has `stopped_early=True`.
      For a model with a `config.vocab_size`, the first batch's `"tokens"` and `"targets"`
      (and prefixed ones, a preference batch's `"chosen_tokens"` ...; NumPy arrays, as
      eqzoo's loaders yield) are checked against it before any step: an id
      outside the vocabulary (negative targets, ignored by the losses, aside) raises a
      `ConfigError`, where it would have trained the parameters into NaN; so are class labels
      `"y"` outside a classifier's `num_classes` (or `out_features`) (a loader with
      `state_dict` is put back first, so a retry starts from the same batch). A first batch
      that counts no target (its `"mask"` all false, say) warns: its loss has nothing to
      average and its gradient is 0. The first batch of each evaluation has its token ids checked
      too (`evaluate` checks them).
    - `num_steps`: the total step count to reach (a device scalar is read back once, here).
    - `eval_step`, `eval_batches`, `eval_every`: run `eval_step` over the batches that
      `eval_batches()` yields every `eval_every` steps (default: only at the end) and at the last
      step, whatever ends the run (`num_steps`, the data, a callback; not a signal, on which the
      run saves and stops at once); logged as `eval/<name>`, in the step's `train/` record when
      it has one (`eval_every` need not be a multiple of `log_every`; at the step a callback
      stops, in a record of its own after the one the callback saw). If an evaluation raises,
      the `checkpointer` saves that step before the error propagates.
    - `log_every`: how often to log `train/<name>` metrics (averaged over the steps since the
      last log, in float32 on the device; an integer or bool metric as a float, an array metric
      as the mean of its elements) and `train/steps_per_s` (training steps per second over
      that window, not counting evaluation, loggers and callbacks; checkpoint saves count, as
      the time they take from training).
    - `loggers`: e.g. `ConsoleLogger`, `JSONLLogger`, `TensorBoardLogger`; one with a
      `begin(step)` method is told first the step training starts from.
    - `callbacks`: `cb(step, state, record)` after each log, every one of them each time;
      returning `True` (a bool, or a true 0-d boolean array such as `state.step >= 500`)
      stops training after that step; other values (`None`, an int) do not.
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
    - `profile`: an [`eqzoo.train.Profile`][] to trace a window of steps with `jax.profiler`
      (after `skip` steps, `steps` of them, each annotated with its step number); the trace's
      folder is printed and returned as `FitResult.profile`. Default `None`: no trace, and
      nothing added to a step.

    **Returns:** a [`eqzoo.train.FitResult`][].
    """
    # Checked before the first step: a bad argument found at the first evaluation (by default
    # at the end) would lose the whole run, its input state donated.
    num_steps = _checked_arguments(num_steps, log_every, eval_every, eval_step, eval_batches, run_config, batches)
    loggers = _checked_loggers(loggers)
    callbacks = list(callbacks)
    tracer = Tracer(profile)
    iterator: Iterator[Any] = iter(batches)
    run = _Run.begin(state, num_steps, loggers, checkpointer, batches)
    evaluation = None if eval_step is None else (eval_step, eval_batches, eval_every)
    try:
        while run.step < num_steps and not run.stopped:
            index = run.step - run.first_step
            with tracer.around(index, run.step + 1):  # numbered as logged: the step count after it
                run.train_one(iterator, train_step, run_config, batches)
            tracer.after(index, run.state)
            is_last = run.step == num_steps or run.stopped
            run.report(log_every, is_last, evaluation, callbacks, checkpointer, batches)
            if run.stopped and not is_last:  # a callback stopped the run: this step is its last
                run.report(log_every, True, evaluation, [], checkpointer, batches)
            if checkpointer is not None:
                run.checkpoint(checkpointer, batches, is_last)
    finally:
        tracer.close(run.state)  # a run that ended or raised inside the window
    if run.pending:  # the checkpointer stopped the run (a signal) between logs: log what it trained
        run.report(log_every, True, None, callbacks, checkpointer, batches)
    return dataclasses.replace(run.end(), profile=tracer.path)


def _count_argument(name: str, value: Any, least: int) -> int:
    """`value` as a Python int (ints, NumPy integers, integer 0-d arrays; never a bool), or a
    `ConfigError` naming `name` and the least value allowed."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < least:
        raise ConfigError(f"fit: {name} must be an integer >= {least}; got {value!r}.")
    return number


def _checked_arguments(
    num_steps: Any, log_every: Any, eval_every: Any, eval_step: Any, eval_batches: Any, run_config: Any, batches: Any
) -> int:
    """`fit`'s arguments checked, in this order; returns `num_steps` as a Python int (compared
    with a device scalar, each step's tests, `step < num_steps` and the eval schedule, would each
    read it back from the device)."""
    num_steps = _count_argument("num_steps", num_steps, 0)
    _count_argument("log_every", log_every, 1)
    if eval_every is not None:
        _count_argument("eval_every", eval_every, 1)
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
    return num_steps


def _checked_loggers(loggers: Iterable[Logger]) -> list[Logger]:
    """The loggers as a list, each checked now for `log` and `close`: not at the first log or,
    for `close`, after the last step."""
    loggers = list(loggers)
    for logger in loggers:
        missing = [m for m in ("log", "close") if not callable(getattr(logger, m, None))]
        if missing:
            raise ConfigError(
                f"fit: each logger needs log(step, metrics) and close() methods (eqzoo.train.Logger); "
                f"{type(logger).__name__} has no {' or '.join(missing)}. Give it a close() that does "
                "nothing if it holds nothing to flush."
            )
    return loggers


def _id_keys(batch: Mapping[str, Any]) -> list[str]:
    """The batch's keys that hold token ids: `"tokens"` and `"targets"`, and their prefixed
    kin (`"chosen_tokens"`, `"rejected_targets"`, ... of a preference batch)."""
    return [k for k in batch if isinstance(k, str) and (k in ("tokens", "targets") or k.endswith(("_tokens", "_targets")))]


def _check_token_ids(state: TrainState, batch: Any, caller: str = "fit") -> None:
    """Refuse a first host batch whose token ids (`"tokens"`, `"targets"`, or prefixed ones such
    as a preference batch's `"chosen_tokens"`) lie outside the model's vocabulary: under `jit`
    the embedding lookup and the loss read them as NaN, so training would go on with NaN
    parameters (a tokenizer with a larger vocabulary than the model's, say), and an evaluation
    would report NaN. Negative targets are fine (they are ignored). Only NumPy arrays are read:
    no device sync. `caller` names the function in the message."""
    config = getattr(state.model, "config", None)
    _check_class_labels(state.model, batch, caller)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(batch, Mapping) or not isinstance(vocab, int):
        return
    for name in _id_keys(batch):
        ids = batch.get(name)
        if not isinstance(ids, np.ndarray) or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            continue
        is_input = not name.endswith("targets")
        low, high = int(ids.min()), int(ids.max())
        if high >= vocab or (is_input and low < 0):
            bad = high if high >= vocab else low
            raise ConfigError(
                f"{caller}: the first batch's {name!r} holds token id {bad}, outside the model's vocabulary "
                f"[0, {vocab}) (ids from {low} to {high}); the embedding lookup and the loss would read it "
                "as NaN and " + ("train the parameters into NaN" if caller == "fit" else "report NaN metrics") + ". Build the model with vocab_size at least the "
                f"tokenizer's (e.g. vocab_size=tokenizer.vocab_size; {high + 1} or more here), or check the "
                "data's encoding." + (" Negative targets are ignored; negative tokens are not." if low < 0 else "")
            )


def _check_counted_targets(batch: Any) -> None:
    """Warn when a first host batch's targets all go uncounted: every `"mask"` entry false
    (or zero), every target negative (ignored), or, without a mask, every position padding
    (segment id 0); likewise for prefixed targets and masks (`"chosen_targets"` with
    `"chosen_mask"`). The loss is then 0 (or constant) and its gradient 0, so the step trains
    nothing: the usual cause is a prompt/response mask that marks no response. Only NumPy
    arrays are read."""
    if not isinstance(batch, Mapping):
        return
    empty = []
    for name in _id_keys(batch):
        if not name.endswith("targets"):
            continue
        prefix = name[: -len("targets")]
        targets, mask = batch.get(name), batch.get(prefix + "mask")
        if not isinstance(targets, np.ndarray) or targets.size == 0 or not np.issubdtype(targets.dtype, np.integer):
            continue
        counted = targets >= 0
        if isinstance(mask, np.ndarray) and mask.shape == targets.shape:
            counted &= mask != 0
        elif mask is None and not prefix and isinstance(segments := batch.get("segment_ids"), np.ndarray):
            if segments.shape == targets.shape:
                counted &= segments != 0
        if not counted.any():
            empty.append(name if mask is None else f"{name} (with {prefix + 'mask'!r})")
    if empty:
        warnings.warn(
            f"fit: the first batch counts no target in {empty}: every target is masked out (mask false or 0), "
            "ignored (negative) or padding, so the loss has nothing to average and its gradient is 0: such "
            "steps train nothing. If the whole data set is like this, the mask is likely inverted or marks "
            "no response (for instruction tuning, True on the response tokens and the end token, False on "
            "the prompt: eqzoo.hf.HFTokenizer.encode_chat gives such masks).",
            stacklevel=user_stacklevel(),
        )


def _asks_to_stop(answer: Any) -> bool:
    """Whether a callback's return value stops the run: `True`, a NumPy bool or a 0-d boolean
    array that is true (`state.step >= 500`); anything else (`None`, the int `file.write`
    returns) does not."""
    if (flag := as_flag(answer)) is not None:
        return flag
    if isinstance(answer, jax.Array | np.ndarray) and answer.shape == () and answer.dtype == np.bool_:
        return bool(answer)
    return False


def _loader_position(batches: Any) -> Mapping[str, Any] | None:
    """A loader's `state_dict()` when it has one and `load_state_dict` to go back to it."""
    state_dict, load = getattr(batches, "state_dict", None), getattr(batches, "load_state_dict", None)
    return state_dict() if callable(state_dict) and callable(load) else None


def _check_loader_step(batches: Any, first_step: int) -> None:
    """Warn when a loader that counts its steps (eqzoo's loaders: `step` and `state_dict`)
    stands at another step than the state: a resumed run whose loader was not restored would
    train again on the batches it has seen (or skip some)."""
    step = getattr(batches, "step", None)
    if not callable(getattr(batches, "state_dict", None)) or not isinstance(step, int) or step == first_step:
        return
    warnings.warn(
        f"fit: the state is at step {first_step} but the loader ({type(batches).__name__}) at step {step}, so "
        f"step {first_step} trains on the loader's batch {step}. A resumed run whose loader was not restored "
        "repeats the batches it has trained on: restore it with loader.load_state_dict(restored.data_state). "
        "(To look at a batch before training, take loader.batch_at(0), which leaves the loader where it is.) "
        "If the loader is new on purpose (other data), silence this with "
        "warnings.filterwarnings('ignore', message='fit: the state is at step').",
        stacklevel=user_stacklevel(),
    )


def _check_class_labels(model: Any, batch: Any, caller: str = "fit") -> None:
    """Refuse a first host batch whose class labels `"y"` reach past a classifier's classes
    (`num_classes`, or an MLP's `out_features`, when 2 or more): under `jit` the loss reads them
    as NaN. Negative labels are ignored by the losses, and pass. Denoisers (a `null_label`
    attribute: their labels condition, with the null class past the others, or are unused)
    are not checked."""
    config = getattr(model, "config", None)
    classes = getattr(config, "num_classes", getattr(config, "out_features", None))
    labels = batch.get("y") if isinstance(batch, Mapping) else None
    if hasattr(model, "null_label") or not isinstance(classes, int) or classes < 2:
        return
    if not isinstance(labels, np.ndarray) or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return
    high = int(labels.max())
    if high >= classes:
        raise ConfigError(
            f"{caller}: the first batch's 'y' holds class label {high}, outside the model's {classes} classes "
            f"[0, {classes}); the loss would read it as NaN. Build the model with "
            f"{'num_classes' if hasattr(config, 'num_classes') else 'out_features'} at least {high + 1}, "
            "or check the labels."
        )


def _eval_record(eval_step: EvalStep, state: TrainState, eval_batches: Callable[[], Iterable[Any]]) -> dict[str, float]:
    """One evaluation's metrics, as `eval/<name>`."""
    return {f"eval/{k}": v for k, v in evaluate(eval_step, state, eval_batches()).items()}


@dataclasses.dataclass
class _Run:
    """What one `fit` call tracks between steps: the state, the step reached (a Python int: the
    loop never reads the device's), the log window's pending metrics and its start, the history
    and whether to stop. Its methods are `fit`'s steps, in the order `fit` calls them. (Its warnings
    point at the code that called `fit`.)"""

    state: TrainState
    num_steps: int
    loggers: list[Logger]
    first_step: int
    step: int
    begin_run: Callable[..., Any] | None  # the checkpointer's, until the first batch is known
    last_time: float
    last_step: int
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
    stopped: bool = False
    ids_checked: bool = False

    @classmethod
    def begin(cls, state: TrainState, num_steps: int, loggers: list[Logger], checkpointer: Any, batches: Any) -> "_Run":
        """Read the state's step (once), warn when it is past `num_steps` or when the loader
        stands at another step, tell the loggers the step training starts from, and start the
        first log window."""
        first_step = int(state.step)
        if first_step > num_steps:
            warnings.warn(
                f"fit: the state is already at step {first_step}, past num_steps={num_steps} (a run resumed "
                "with a smaller num_steps?); nothing is trained, logged or saved. Pass a num_steps above the "
                "state's step to train on.",
                stacklevel=user_stacklevel(),
            )
        _check_loader_step(batches, first_step)
        for logger in loggers:
            if callable(getattr(logger, "begin", None)):
                logger.begin(first_step)  # e.g. JSONLLogger cuts an earlier run's records past it
        begin_run = getattr(checkpointer, "begin_run", None)
        return cls(
            state=state, num_steps=num_steps, loggers=loggers, first_step=first_step, step=first_step,
            begin_run=begin_run if callable(begin_run) else None, last_time=time.perf_counter(), last_step=first_step,
        )

    def train_one(
        self, iterator: Iterator[Any], train_step: TrainStep, run_config: Mapping[str, Any] | None, batches: Any
    ) -> None:
        """Take the next batch and dispatch one step on it (its metrics join the window); when
        the data has ended, warn and stop instead. Before the first step, check the batch and
        tell the checkpointer what this run is; if either refuses, a loader with `state_dict`
        is put back where it was, so a retry starts from the same batch."""
        position = _loader_position(batches) if not self.ids_checked else None
        try:
            batch = next(iterator)
        except StopIteration:  # the data ended first: keep what was trained, and say so
            warnings.warn(
                f"fit: the batches ran out after step {self.step} of num_steps={self.num_steps}; returning the state "
                "trained so far (stopped_early=True). Pass more batches (more epochs) or a smaller num_steps.",
                stacklevel=user_stacklevel(),
            )
            self.stopped = True
            return
        if not self.ids_checked:  # once: before the first step donates the state
            try:
                _check_token_ids(self.state, batch)
                _check_counted_targets(batch)
                if self.begin_run is not None:  # a bad run_config fails here
                    # here: eqzoo.checkpoint imports eqzoo.train. One read of the injected scalars.
                    from ..checkpoint._hyperparams import injected_values

                    record = _run_record(self.num_steps, batch, run_config, injected_values(self.state))
                    self.begin_run(record, step=self.first_step)
            except Exception:
                if position is not None:
                    batches.load_state_dict(position)
                raise
            self.ids_checked, self.begin_run = True, None
        self.state, metrics = train_step(self.state, batch)
        self.step += 1
        self.pending.append(metrics)

    def window_record(self, log_every: int, is_last: bool) -> dict[str, float] | None:
        """At a log step (or the last), the window's `train/` record: its metrics averaged on
        the device and read back in one transfer, however many steps and metrics, and
        `train/steps_per_s`; otherwise `None`."""
        if not self.pending or not (self.step % log_every == 0 or is_last):
            return None
        means = mean_metrics(self.pending)
        self.pending = []
        now = time.perf_counter()
        record = {"step": float(self.step)} | {f"train/{k}": v for k, v in means.items()}
        record["train/steps_per_s"] = (self.step - self.last_step) / max(now - self.last_time, 1e-9)
        return record

    def eval_due(self, eval_every: int | None, is_last: bool) -> bool:
        """Whether to evaluate after this step: on its own schedule, with the logged record when
        there is one (eval_every need not be a multiple of log_every), once per step: not again
        when the data ran out right after an evaluated step."""
        due = self.step % (eval_every or self.num_steps) == 0 or is_last
        return due and self.step > self.first_step and not _evaluated(self.history, self.step)

    def report(
        self, log_every: int, is_last: bool, evaluation: tuple | None, callbacks: list[Callback],
        checkpointer: Any, batches: Any,
    ) -> None:
        """The step's record, when one is due: the log window's, with an evaluation's when one
        is due (`evaluation` is `(eval_step, eval_batches, eval_every)`), published. An
        evaluation that raises has the checkpointer save this step first: at the last step
        (by default the only evaluation) it would otherwise lose the whole run."""
        record = self.window_record(log_every, is_last)
        if evaluation is not None and self.eval_due(evaluation[2], is_last):
            try:
                metrics = _eval_record(evaluation[0], self.state, evaluation[1])
            except Exception:
                if checkpointer is not None:
                    checkpointer.maybe_save(self.state, batches, force=True, step=self.step)
                raise
            record = (record or {"step": float(self.step)}) | metrics
        if record is not None:
            self.publish(record, callbacks)

    def publish(self, record: dict[str, float], callbacks: list[Callback]) -> None:
        """Log `record` to the history and every logger, call every callback (stopping when
        one returns `True`, the bool: a callback that returns what it wrote, an int, goes on),
        then start the next log window."""
        self.history.append(record)
        for logger in self.loggers:
            logger.log(int(record["step"]), {k: v for k, v in record.items() if k != "step"})
        answers = [cb(self.step, self.state, record) for cb in callbacks]
        if any(_asks_to_stop(answer) for answer in answers):
            self.stopped = True
        # The next window starts after evaluation, logging and callbacks, so steps_per_s
        # measures training alone.
        self.last_time, self.last_step = time.perf_counter(), self.step

    def checkpoint(self, checkpointer: Any, batches: Iterable[Any], is_last: bool) -> None:
        """Let the checkpointer save (forced at the end of the run) and ask it whether to stop."""
        checkpointer.maybe_save(self.state, batches, force=is_last or self.stopped, step=self.step)
        if checkpointer.should_stop():
            self.stopped = True

    def end(self) -> FitResult:
        """Close the loggers; the run's result."""
        for logger in self.loggers:
            logger.close()
        return FitResult(self.state, self.history, self.stopped)
