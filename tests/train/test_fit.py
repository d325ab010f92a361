"""`fit`: JSONL logging, periodic evaluation, stopping from a callback, resuming from `state.step`."""

import json
import pathlib
import re
import sys
import tomllib
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqzoo import models, train
from eqzoo._errors import ConfigError, MissingDependencyError
from eqzoo.train._fit import _check_token_ids
from eqzoo.train._readback import mean_metrics

OPTIMIZER = optax.sgd(0.05)
CONFIG = models.get_config("mlp-small", in_features=8, width=16, depth=1, out_features=3)


def batch_at(i):
    """The i-th training batch, a pure function of i (as a resumable loader would give)."""
    key = jax.random.fold_in(jax.random.key(11), i)
    x = jax.random.normal(key, (8, 8))
    return {"x": x, "y": (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)}


def batches(start=0):
    i = start
    while True:
        yield batch_at(i)
        i += 1


def eval_batches():
    return [batch_at(1000 + i) for i in range(2)]


@pytest.fixture(scope="module")
def steps():
    return train.make_train_step(train.classification_loss, OPTIMIZER), train.make_eval_step(train.classification_loss)


def _state(seed=0):
    model = models.create(CONFIG, key=jax.random.key(seed))
    return train.TrainState.create(model, OPTIMIZER, key=jax.random.key(seed))


def test_fit_logs_jsonl_and_evaluates(steps, tmp_path):
    train_step, eval_step = steps
    path = tmp_path / "run" / "metrics.jsonl"
    result = train.fit(
        _state(), train_step, batches(), num_steps=6, log_every=2, eval_step=eval_step,
        eval_batches=eval_batches, eval_every=4, loggers=[train.JSONLLogger(path)],
    )
    assert int(result.state.step) == 6 and not result.stopped_early
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(np.isfinite(r["train/loss"]) and "train/accuracy" in r and "train/grad_norm" in r for r in lines)
    # evaluation at every 4th step and at the last one
    assert ["eval/loss" in r for r in lines] == [False, True, True]
    assert lines == [{**r, "step": int(r["step"])} for r in result.history]
    # the logged eval loss is the eval step averaged over the eval batches
    expected = np.mean([float(eval_step(result.state, b)["loss"]) for b in eval_batches()])
    np.testing.assert_allclose(lines[-1]["eval/loss"], expected, rtol=1e-6)
    assert result.last("eval/loss") == lines[-1]["eval/loss"]
    # training made progress on this learnable task
    assert lines[-1]["train/loss"] < lines[0]["train/loss"]


def test_eval_every_need_not_be_a_multiple_of_log_every(steps):
    # Every 3rd step and the last are evaluated whatever log_every is: step 3 alone (not a
    # logged step), step 6 with its logged record, step 7 at the end.
    train_step, eval_step = steps
    result = train.fit(
        _state(), train_step, batches(), num_steps=7, log_every=2, eval_step=eval_step,
        eval_batches=eval_batches, eval_every=3,
    )
    assert [r["step"] for r in result.history] == [2, 3, 4, 6, 7]
    assert [r["step"] for r in result.history if "eval/loss" in r] == [3, 6, 7]
    assert "train/loss" not in result.history[1] and "train/loss" in result.history[3]


def test_num_steps_as_a_device_scalar_is_read_once(steps, monkeypatch):
    # num_steps=jnp.asarray(n) is read back once; the per-step tests then use a Python int
    # (compared with the device scalar, each step would synchronise with the device 3 times).
    train_step, eval_step = steps
    state = _state()
    num_steps = jnp.asarray(4)
    reads = []
    impl = type(num_steps)
    original = impl.__bool__
    monkeypatch.setattr(impl, "__bool__", lambda self: reads.append(self.shape) or original(self))
    result = train.fit(state, train_step, batches(), num_steps=num_steps, log_every=2,
                       eval_step=eval_step, eval_batches=eval_batches)
    assert reads == []
    assert [r["step"] for r in result.history] == [2, 4] and "eval/loss" in result.history[-1]


def test_evaluate_reads_the_metrics_back_once(steps, monkeypatch):
    # Every eval batch is dispatched before any metric is read: one device_get for them all.
    _, eval_step = steps
    state = _state()
    want = [float(eval_step(state, b)["loss"]) for b in eval_batches()]
    reads = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or device_get(x))
    got = train.evaluate(eval_step, state, eval_batches())
    assert len(reads) == 1
    np.testing.assert_allclose(got["loss"], np.mean(want), rtol=1e-6)


def test_callback_returning_true_stops(steps):
    train_step, _ = steps
    seen = []

    def stop_at_3(step, state, record):
        seen.append(step)
        return step >= 3

    result = train.fit(_state(), train_step, batches(), num_steps=10, log_every=1, callbacks=[stop_at_3])
    assert result.stopped_early
    assert seen == [1, 2, 3]
    assert int(result.state.step) == 3 and [r["step"] for r in result.history] == [1, 2, 3]


def test_every_callback_runs_and_only_true_stops(steps):
    # Every callback sees each record, also after one asked to stop; a callback that returns
    # what it wrote (an int) does not stop the run; the step a callback stops at is evaluated.
    train_step, eval_step = steps
    seen, lines = [], []

    def write(step, state, record):
        lines.append(f"{step}\n")
        return len(lines[-1])  # as file.write returns

    result = train.fit(
        _state(), train_step, batches(), num_steps=10, log_every=1, eval_step=eval_step, eval_batches=eval_batches,
        callbacks=[write, lambda step, state, record: state.step >= 2, lambda step, state, record: seen.append(step)],
    )
    assert result.stopped_early and int(result.state.step) == 2 and seen == [1, 2] and len(lines) == 2
    assert [r["step"] for r in result.history] == [1, 2, 2] and "eval/loss" in result.history[-1]
    assert not any(k.startswith("eval/") for r in result.history[:2] for k in r)


def test_an_evaluation_that_raises_saves_the_step_first(steps, tmp_path):
    # The only evaluation is at the end: an empty eval source found there lost the whole run
    # (no checkpoint, the input state donated).
    from eqzoo import checkpoint

    train_step, eval_step = steps
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")  # save_every=None: saves at the end only
    try:
        with pytest.raises(ConfigError, match=r"eval data source is empty.*return a fresh one each call"):
            train.fit(_state(), train_step, batches(), num_steps=3, eval_step=eval_step, eval_batches=lambda: [],
                      checkpointer=ckpt)
        ckpt.wait()
        assert ckpt.all_steps() == [3]
    finally:
        ckpt.close()


def test_a_signal_between_logs_still_logs_the_window(steps, tmp_path):
    # SIGTERM during step 4 of a 5-step log window: the step is saved and the run stops; the
    # window's steps 1-4 are logged (they were dropped, and the resumed run starts at step 5).
    import signal

    from eqzoo import checkpoint

    train_step, _ = steps

    def signalling():
        for i in range(10):
            if i == 3:
                signal.raise_signal(signal.SIGTERM)
            yield batch_at(i)

    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", save_every=100)
    try:
        result = train.fit(_state(), train_step, signalling(), num_steps=10, log_every=5, checkpointer=ckpt)
        assert result.stopped_early and int(result.state.step) == 4 and ckpt.all_steps() == [4]
        assert [r["step"] for r in result.history] == [4] and "train/loss" in result.history[0]
        # Run again with the same Checkpointer (a notebook): the signal it stopped on is spent;
        # it saved every step and stopped after one.
        again = train.fit(result.state, train_step, batches(4), num_steps=10, log_every=5, checkpointer=ckpt)
        ckpt.wait()
        assert not again.stopped_early and int(again.state.step) == 10 and ckpt.all_steps() == [4, 10]
        assert ckpt.stop_signal is None
    finally:
        ckpt.close()


def test_the_loader_is_checked_against_the_state_step(steps):
    from eqzoo.data import ArrayLoader, TokenLoader

    train_step, _ = steps
    data = {name: np.asarray(jnp.concatenate([batch_at(i)[name] for i in range(4)])) for name in ("x", "y")}
    loader = ArrayLoader(data, batch_size=8, seed=0)
    next(loader)  # a loader not restored to the state's step
    with pytest.warns(UserWarning, match=r"state is at step 0 but the loader \(ArrayLoader\) at step 1.*load_state_dict"):
        train.fit(_state(), train_step, loader, num_steps=1)
    # An endless loader as the eval batches (eval_batches=lambda: loader) hung, its memory growing.
    with pytest.raises(ConfigError, match=r"evaluate got an eqzoo loader \(ArrayLoader\), which yields batches without end.*islice"):
        train.evaluate(steps[1], _state(), loader)
    # A first batch refused before the first step leaves the loader where it was.
    config = models.get_config("tiny-llama", vocab_size=64, num_layers=1, embed_dim=16, hidden_dim=32, max_seq=8)
    state = train.TrainState.create(models.create(config, key=jax.random.key(0)), OPTIMIZER, key=jax.random.key(1))
    tokens = TokenLoader(np.arange(300) % 119, batch_size=2, seq_len=8, seed=0)
    with pytest.raises(ConfigError, match=r"outside the model's vocabulary"):
        train.fit(state, train.make_train_step(train.lm_loss, OPTIMIZER), tokens, num_steps=1)
    assert tokens.step == 0


def test_batches_that_run_out_stop_training_with_a_warning(steps):
    # Five batches for ten steps: five steps are taken, the last window (steps 5, not a multiple
    # of log_every) is logged and evaluated as at the end, and the state trained so far comes back.
    train_step, eval_step = steps
    with pytest.warns(UserWarning, match=r"batches ran out after step 5 of num_steps=10; returning the state trained so far"):
        result = train.fit(
            _state(), train_step, [batch_at(i) for i in range(5)], num_steps=10, log_every=2,
            eval_step=eval_step, eval_batches=eval_batches,
        )
    assert result.stopped_early and int(result.state.step) == 5
    assert [r["step"] for r in result.history] == [2, 4, 5] and "eval/loss" in result.history[-1]
    straight = train.fit(_state(), train_step, batches(), num_steps=5, log_every=2)
    assert _same_params(result.state.model, straight.state.model)
    # Four batches: they run out right after the logged step 4, which is then evaluated.
    with pytest.warns(UserWarning, match=r"batches ran out after step 4 of num_steps=10"):
        result = train.fit(
            _state(), train_step, [batch_at(i) for i in range(4)], num_steps=10, log_every=2,
            eval_step=eval_step, eval_batches=eval_batches,
        )
    assert [r["step"] for r in result.history] == [2, 4, 4] and "eval/loss" in result.history[-1]
    assert "eval/loss" not in result.history[1] and int(result.state.step) == 4


def _same_params(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array)), strict=True))


def test_resume_from_state_step_continues_the_same_trajectory(steps):
    train_step, _ = steps
    straight = train.fit(_state(), train_step, batches(), num_steps=6, log_every=1)

    first = train.fit(_state(), train_step, batches(), num_steps=3, log_every=1)
    consumed = []

    def resumed_batches():
        for i, b in enumerate(batches(start=3)):
            consumed.append(i)
            yield b

    second = train.fit(first.state, train_step, resumed_batches(), num_steps=6, log_every=1)
    assert [r["step"] for r in second.history] == [4, 5, 6]
    assert len(consumed) == 3  # only the remaining steps ran
    assert int(second.state.step) == 6
    for a, b in zip(jax.tree.leaves(eqx.filter(second.state.model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(straight.state.model, eqx.is_array)), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-for-bit the uninterrupted run
    # already at num_steps: nothing to do
    done = train.fit(second.state, train_step, batches(), num_steps=6)
    assert done.history == [] and int(done.state.step) == 6
    # past num_steps (resumed with a smaller one): said, rather than a silent no-op
    with pytest.warns(UserWarning, match=r"already at step 6, past num_steps=4 .*nothing is trained"):
        past = train.fit(second.state, train_step, batches(), num_steps=4)
    assert past.history == [] and int(past.state.step) == 6


def test_fit_argument_errors(steps, unchecked):
    train_step, eval_step = steps
    with pytest.raises(ConfigError, match="pass eval_step and eval_batches together"):
        train.fit(_state(), train_step, batches(), num_steps=1, eval_step=eval_step)
    with pytest.raises(ConfigError, match="fit: log_every must be an integer >= 1; got 0"):
        train.fit(_state(), train_step, batches(), num_steps=1, log_every=0)
    # each of these was found late (at the first evaluation, by default the last step) or not
    # at all; checked without the annotations, as a user's run is
    with unchecked(), pytest.raises(ConfigError, match=r"fit: num_steps must be an integer >= 0; got 2\.5"):
        train.fit(_state(), train_step, batches(), num_steps=2.5)
    with pytest.raises(ConfigError, match=r"fit: eval_every must be an integer >= 1; got -1"):
        train.fit(_state(), train_step, batches(), num_steps=1, eval_step=eval_step, eval_batches=eval_batches, eval_every=-1)
    with unchecked(), pytest.raises(ConfigError, match=r"eval_batches must be a function .*eval_batches=lambda: batches; got a list"):
        train.fit(_state(), train_step, batches(), num_steps=1, eval_step=eval_step, eval_batches=list(eval_batches()))
    with unchecked(), pytest.raises(ConfigError, match=r"fit: run_config must be a dict of your run.s settings; got a list"):
        train.fit(_state(), train_step, batches(), num_steps=1, run_config=[("lr", 0.1)])
    with pytest.raises(ConfigError, match=r"got one dict, whose iteration yields its keys"):
        train.fit(_state(), train_step, next(batches()), num_steps=1)
    # a logger without close() crashed after the last step, and the run's result was lost

    class PrintOnly:
        def log(self, step, metrics):
            pass

    with unchecked(), pytest.raises(ConfigError, match=r"each logger needs log\(step, metrics\) and close\(\).*PrintOnly has no close"):
        train.fit(_state(), train_step, batches(), num_steps=1, loggers=[PrintOnly()])
    state = _state()
    assert int(train.fit(state, train_step, batches(), num_steps=state.step + 1).state.step) == 1  # a JAX scalar
    with pytest.raises(ConfigError, match="evaluate got no batches"):
        train.evaluate(eval_step, _state(), [])


def test_class_labels_outside_the_classes_are_refused_before_the_first_step(steps):
    # A label past the model's 3 classes trained on with a NaN loss.
    train_step, _ = steps
    batch = {name: np.asarray(v) for name, v in batch_at(0).items()}
    state = _state()
    with pytest.raises(ConfigError, match=r"first batch's 'y' holds class label 3, outside the model's 3 classes \[0, 3\).*out_features at least 4"):
        train.fit(state, train_step, [batch | {"y": np.full_like(batch["y"], 3)}], num_steps=1)
    assert not any(x.is_deleted() for x in state.arrays)
    ignored = batch | {"y": np.where(np.arange(len(batch["y"])) % 2, batch["y"], -100)}  # negative labels: ignored
    assert int(train.fit(state, train_step, [ignored], num_steps=1).state.step) == 1
    # Denoisers are not checked: their labels condition (the null class is num_classes; an
    # unconditional model, num_classes=0, ignores them).
    unet = models.create("tiny-unet", key=jax.random.key(0), num_classes=0)
    _check_token_ids(train.TrainState.create(unet, OPTIMIZER, key=jax.random.key(1)), {"y": np.arange(2, dtype=np.int32)})


def test_token_ids_outside_the_vocabulary_are_refused_before_the_first_step():
    # A tokenizer with more ids than the model's vocab_size (bytes into a 64-token model) used to
    # train on: the embedding lookup read NaN, and so did every parameter after the first step.
    config = models.get_config("tiny-llama", vocab_size=64, num_layers=1, embed_dim=16, hidden_dim=32, max_seq=8)
    state = train.TrainState.create(models.create(config, key=jax.random.key(0)), OPTIMIZER, key=jax.random.key(1))
    step = train.make_train_step(train.lm_loss, OPTIMIZER)
    ids = np.arange(18, dtype=np.int32).reshape(2, 9) * 7  # up to 119
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:]}
    with pytest.raises(ConfigError, match=r"first batch's 'tokens' holds token id 112, outside the model's vocabulary \[0, 64\).*vocab_size=tokenizer\.vocab_size; 113 or more"):
        train.fit(state, step, [batch], num_steps=1)
    assert int(state.step) == 0 and not any(x.is_deleted() for x in state.arrays)  # nothing ran or was donated
    with pytest.raises(ConfigError, match=r"'targets' holds token id 64"):
        _check_token_ids(state, {"tokens": ids[:, :-1] % 64, "targets": np.full((2, 8), 64)})
    with pytest.raises(ConfigError, match=r"'tokens' holds token id -1.*negative tokens are not"):
        _check_token_ids(state, {"tokens": ids[:, :-1] % 64 - 1})
    _check_token_ids(state, {"tokens": ids[:, :-1] % 64, "targets": np.full((2, 8), -100)})  # ignored targets pass


def test_steps_per_s_counts_training_time_only(steps, monkeypatch):
    """A fake clock: each train step takes 1 s and each evaluation 1000 s. Every logged window
    of 2 steps must read 1 step/s, including the windows right after an evaluation."""
    import types

    from eqzoo.train import _fit

    now = [0.0]
    monkeypatch.setattr(_fit, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    train_step, eval_step = steps

    def timed_batches():  # the loop takes one batch per step
        for batch in batches():
            now[0] += 1.0
            yield batch

    def slow_eval_batches():
        now[0] += 1000.0
        return eval_batches()

    result = train.fit(
        _state(), train_step, timed_batches(), num_steps=8, log_every=2, eval_step=eval_step,
        eval_batches=slow_eval_batches, eval_every=2,
    )
    rates = [r["train/steps_per_s"] for r in result.history]
    assert len(rates) == 4 and all("eval/loss" in r for r in result.history)
    assert rates == pytest.approx([1.0] * 4, rel=1e-12)


def test_jsonl_logger_keeps_each_step_once_across_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = train.JSONLLogger(path)
    for step in (2, 4, 6, 8):
        first.log(step, {"loss": float(step)})
    first.close()
    with path.open("a") as f:
        f.write('{"step": 10, "lo')  # the run was killed while writing this line
    resumed = train.JSONLLogger(path)  # restored from the checkpoint of step 4
    with pytest.warns(UserWarning, match=r"holds 2 record\(s\) from step 6 on"):
        resumed.log(6, {"loss": 60.0})
    resumed.log(8, {"loss": 80.0})
    resumed.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{"step": 2, "loss": 2.0}, {"step": 4, "loss": 4.0},
                       {"step": 6, "loss": 60.0}, {"step": 8, "loss": 80.0}]
    # a later run that starts after everything logged only appends, silently
    later = train.JSONLLogger(path)
    later.log(10, {"loss": 1.0})
    later.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 6, 8, 10]
    # fit's begin(step): a run resumed from step 4 cuts what came after; a fresh one (step 0)
    # keeps nothing of an old run (its first log, at step 6, would have kept steps 2 and 4)
    for start, kept in ((4, [2, 4]), (0, [])):
        path.write_text("".join(json.dumps({"step": s, "loss": 0.0}) + "\n" for s in (2, 4, 6, 8)))
        logger = train.JSONLLogger(path)
        with pytest.warns(UserWarning, match=rf"holds {4 - len(kept)} record\(s\) from step {start + 1} on"):
            logger.begin(start)
        logger.log(6, {"loss": 1.0})
        logger.close()
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [*kept, 6]
    # two loggers on one path: the second one's cut leaves the first one's new records alone
    path.write_text("")
    a, b = train.JSONLLogger(path), train.JSONLLogger(path)
    a.log(10, {"loss": 1.0})
    b.log(10, {"loss": 2.0})
    a.log(20, {"loss": 1.0})
    a.close()
    b.close()
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [1.0, 2.0, 1.0]
    # a file the logger did not write is never cut, even one whose last line has no newline
    for text in ("free text\n", "notes without a newline", '{"step": 1}\n{"epoch": 3}'):
        other = tmp_path / "notes.jsonl"
        other.write_text(text)
        foreign = train.JSONLLogger(other)
        foreign.begin(0)
        foreign.log(0, {"loss": 1.0})
        foreign.close()
        assert other.read_text().startswith(text.rstrip("\n") + "\n")
        assert json.loads(other.read_text().splitlines()[-1]) == {"step": 0, "loss": 1.0}


def test_console_logger_prints_to_any_text_stream():
    # io.StringIO is not a typing.TextIO: the stream is typed by what is used (write, flush),
    # so the suite's type-checking hook accepts it as plain Python does.
    import io

    stream = io.StringIO()
    logger = train.ConsoleLogger(10, stream=stream, keys=("train/loss",))
    logger.log(5, {"train/loss": 1.25, "train/steps_per_s": 3.0})
    assert stream.getvalue().startswith("step      5/10 | train/loss 1.25")
    # total_steps taken for the logging interval: said once, not printed as "step 60/10" silently
    with pytest.warns(UserWarning, match=r"step 20 is past total_steps=10; total_steps is the run's number of steps"):
        logger.log(20, {"train/loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log(30, {"train/loss": 1.0})


def test_console_logger_rate_counts_training_time_only(steps, monkeypatch):
    """A fake clock: each train step takes 1 s, each evaluation (its compile, say) 1000 s, and
    the first window holds a 50 s compile. The printed speed is 1 step/s throughout, from the
    second window on (the ETA follows it); before, the line after the first evaluation read
    "0.00 steps/s | eta 1h23m" for 5 steps left."""
    import io
    import types

    from eqzoo.train import _fit, _loggers

    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(_fit, "time", clock)
    monkeypatch.setattr(_loggers, "time", clock)
    train_step, eval_step = steps

    def timed_batches():
        for i, batch in enumerate(batches()):
            now[0] += 51.0 if i == 0 else 1.0
            yield batch

    def slow_eval_batches():
        now[0] += 1000.0
        return eval_batches()

    stream = io.StringIO()
    train.fit(
        _state(), train_step, timed_batches(), num_steps=8, log_every=2, eval_step=eval_step,
        eval_batches=slow_eval_batches, eval_every=3, loggers=[train.ConsoleLogger(8, stream=stream, keys=())],
    )
    lines = stream.getvalue().splitlines()
    # steps 2, 3 (evaluation only), 4, 6, 8: the evaluation-only record adds no window
    assert [line.split(" | ")[0].split()[1] for line in lines] == ["2/8", "3/8", "4/8", "6/8", "8/8"]
    assert lines[0] == "step      2/8" and lines[1] == "step      3/8"
    assert lines[2:] == ["step      4/8 | 1.00 steps/s | eta 0m04s", "step      6/8 | 1.00 steps/s | eta 0m02s",
                         "step      8/8 | 1.00 steps/s | eta 0m00s"]
    # a loop of its own (no train/steps_per_s): timed by the wall clock from its first log
    own = train.ConsoleLogger(stream=stream)
    own.log(10, {"loss": 1.0})
    now[0] += 4.0
    own.log(20, {"loss": 1.0})
    assert stream.getvalue().splitlines()[-1] == "step     20 | loss 1 | 2.50 steps/s"


def test_console_logger_leaves_per_layer_metrics_to_the_structured_loggers(tmp_path, unchecked, monkeypatch):
    # lm_loss(per_layer=True) adds three metrics per layer (192 for 64 layers); the console line
    # printed them all.
    import io
    import sys
    import types

    def layered_loss(model, batch, key):
        loss, metrics = train.classification_loss(model, batch, key)
        return loss, metrics | {f"moe_dropped/layer_{i}": jnp.float32(i) for i in range(2)}

    stream, tensorboard = io.StringIO(), {}
    writer = types.SimpleNamespace(add_scalar=lambda k, v, step: tensorboard.setdefault(k, v), close=lambda: None)
    fake = types.ModuleType("tensorboardX")  # not installed here: a stand-in writer
    fake.SummaryWriter = lambda logdir: writer
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    board = train.TensorBoardLogger(tmp_path / "tb")
    train.fit(
        _state(), train.make_train_step(layered_loss, OPTIMIZER), batches(), num_steps=2, log_every=2,
        loggers=[train.ConsoleLogger(stream=stream), train.JSONLLogger(tmp_path / "log.jsonl"), board],
    )
    line = stream.getvalue()
    assert "train/accuracy" in line and "train/loss" in line and "layer_" not in line
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert record["train/moe_dropped/layer_0"] == 0.0 and record["train/moe_dropped/layer_1"] == 1.0
    assert {"train/moe_dropped/layer_0", "train/moe_dropped/layer_1", "train/loss"} <= set(tensorboard)
    # asked for by name or by a shell-style pattern, they are shown, in the metrics' order
    metrics = {"train/loss": 2.0, "train/moe_dropped": 0.5, "train/moe_dropped/layer_0": 0.25, "train/moe_dropped/layer_1": 0.75}
    for keys, shown in [
        (("train/moe_dropped/*", "train/loss"), "train/loss 2 | train/moe_dropped/layer_0 0.25 | train/moe_dropped/layer_1 0.75"),
        (("train/moe_dropped/layer_1",), "train/moe_dropped/layer_1 0.75"),
        (None, "train/loss 2 | train/moe_dropped 0.5"),
    ]:
        stream = io.StringIO()
        train.ConsoleLogger(stream=stream, keys=keys).log(1, metrics)
        assert stream.getvalue() == f"step      1 | {shown}\n"
    with unchecked(), pytest.raises(ConfigError, match=r"keys must be a tuple of metric names or patterns.*got 'train/loss'"):
        train.ConsoleLogger(keys="train/loss")
    with unchecked():  # any iterable of names, read once (a generator was consumed by the check and showed nothing)
        stream = io.StringIO()
        train.ConsoleLogger(stream=stream, keys=(k for k in ["train/loss"])).log(1, metrics)
    assert stream.getvalue() == "step      1 | train/loss 2\n"


def test_tensorboard_logger_names_an_extra_that_exists(tmp_path, monkeypatch):
    # The error said `pip install 'eqzoo[tensorboard]'`, an extra pyproject.toml did not declare.
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # importing it raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'eqzoo\[tensorboard\]'"):
        train.TensorBoardLogger(tmp_path / "tb")
    root = pathlib.Path(__file__).parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("tensorboardX") for dep in extras["tensorboard"])
    # and so does every other `require(module, extra)` of the package
    source = "\n".join(p.read_text() for p in (root / "eqzoo").rglob("*.py"))
    named = set(re.findall(r'require\(\s*"[\w.]+",\s*"([\w-]+)"\s*\)', source))
    assert {"tensorboard", "bayes", "sciml", "hf"} <= named <= set(extras)


def mixed_loss(model, batch, key):
    """classification_loss with metrics of every kind a loss returns: per-layer float keys, an
    integer count, a bool, a bf16 value and a per-example array."""
    loss, metrics = train.classification_loss(model, batch, key)
    logits = jax.vmap(model)(batch["x"])
    per_example = -jax.nn.log_softmax(logits)[jnp.arange(batch["x"].shape[0]), batch["y"]]
    layers = {f"moe_dropped/layer_{i}": jnp.abs(logits[i, 0]) * (i + 1) for i in range(3)}
    counted = {"tokens": jnp.sum(batch["y"] > 0), "all_right": metrics["accuracy"] == 1.0}
    return loss, metrics | layers | counted | {"half": loss.astype(jnp.bfloat16), "per_example": per_example}


def test_logged_metrics_are_the_windows_means(steps):
    # Each record holds, per metric, the mean over the steps since the last log (the short last
    # window too), as the float64 NumPy mean of the steps' values: within 1e-6 relative, the
    # device's float32 mean (a bf16 metric is averaged in float32, without rounding to bf16).
    _, eval_step = steps
    step = train.make_train_step(mixed_loss, OPTIMIZER, donate=False)
    state, per_step = _state(), []
    for i in range(5):
        state, metrics = step(state, batch_at(i))
        per_step.append({k: np.asarray(jax.device_get(v), np.float64) for k, v in metrics.items()})
    result = train.fit(_state(), step, batches(), num_steps=5, log_every=2)
    assert [r["step"] for r in result.history] == [2, 4, 5]
    for record, window in zip(result.history, [per_step[0:2], per_step[2:4], per_step[4:5]], strict=True):
        assert list(record) == ["step", *(f"train/{k}" for k in sorted(window[0])), "train/steps_per_s"]
        assert all(type(v) is float for v in record.values())
        for k in window[0]:
            np.testing.assert_allclose(record[f"train/{k}"], np.mean([m[k] for m in window]), rtol=1e-6, atol=0)
    assert 0 < result.history[0]["train/tokens"] <= 8 and result.history[-1]["train/all_right"] in (0.0, 1.0)
    # evaluate averages over the batches the same way
    want = [jax.device_get(eval_step(state, b)) for b in eval_batches()]
    got = train.evaluate(eval_step, state, eval_batches())
    assert list(got) == ["accuracy", "loss"] and all(type(v) is float for v in got.values())
    for k in got:
        np.testing.assert_allclose(got[k], np.mean([np.float64(m[k]) for m in want]), rtol=1e-6, atol=0)


def test_a_log_window_is_read_back_in_one_transfer_compiled_once(steps, compile_log, monkeypatch):
    # 3 per-layer metrics and 5 others a step: the base code read back each step's 11 scalars
    # (22 a window of 2); one vector now, compiled once per metrics structure, however many logs.
    _, eval_step = steps
    step = train.make_train_step(mixed_loss, OPTIMIZER)
    reads = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(jax.tree.leaves(x)) or device_get(x))
    jax.clear_caches()  # so that the read-back programs compile here, whatever ran before

    def run(num_steps):
        reads.clear()
        with compile_log() as log:
            result = train.fit(_state(), step, batches(), num_steps=num_steps, log_every=2,
                               eval_step=eval_step, eval_batches=eval_batches, eval_every=4)
        return result, [c.split(" ")[1] for c in log.compiled if c.split(" ")[1] in ("jit(_pack)", "jit(_accumulate)")]

    result, compiled = run(7)  # windows of 2, 2, 2 and 1; evaluated at steps 4 and 7
    assert [r["step"] for r in result.history] == [2, 4, 6, 7]
    assert len(reads) == 4 + 2 and all(len(leaves) == 1 for leaves in reads)
    # the train metrics' and eval metrics' packing and summing, whatever the windows' lengths
    assert sorted(compiled) == ["jit(_accumulate)"] * 2 + ["jit(_pack)"] * 2
    result, compiled = run(15)  # twice the logs: nothing compiles again
    assert len(result.history) == 8 and compiled == []
    assert len(reads) == 8 + 4 and all(len(leaves) == 1 for leaves in reads)


def test_windows_of_any_length_share_one_program(compile_log):
    # A program over a whole window compiled anew for each length, in time growing steeply with
    # it (5 s at 1,000 steps, 3 min at 4,000 on XLA:CPU): `evaluate` over a long eval set, a
    # large log_every. The window is summed a fixed block at a time instead.
    rng = np.random.default_rng(0)
    windows = [[{"loss": jnp.float32(v), "n": jnp.int32(i)} for i, v in enumerate(rng.normal(size=n))] for n in (3, 40, 70)]
    mean_metrics(windows[0])
    with compile_log() as log:
        got = [mean_metrics(w) for w in windows[1:]]
    assert log.compiled == []
    for means, window in zip(got, windows[1:], strict=True):
        for k in ("loss", "n"):  # float32 sums of up to 70 values: 1e-5 relative of a float64 mean
            np.testing.assert_allclose(means[k], np.mean([np.float64(m[k]) for m in window]), rtol=1e-5, atol=1e-6)
    inf = [{"x": jnp.float32(1.0)}] * 2 + [{"x": jnp.float32(np.inf)}]  # the padded block keeps inf an inf
    assert mean_metrics(inf) == {"x": np.inf}


def test_metric_names_that_change_within_a_window_are_refused():
    # Packed by sorted name, the second step's "c" would be averaged into "b" (51.0, silently).
    window = [{"a": jnp.float32(1.0), "b": jnp.float32(2.0)}, {"a": jnp.float32(1.0), "c": jnp.float32(100.0)}]
    with pytest.raises(ConfigError, match=r"same metric names; step 0 of the window returned \['a', 'b'\] and step 1 \['a', 'c'\]"):
        mean_metrics(window)
    with pytest.raises(ConfigError, match=r"metric 'note' is a str"):
        mean_metrics([{"loss": jnp.float32(1.0), "note": "warmup"}])


def test_a_metric_that_is_not_a_number_is_named(steps):
    def nested_loss(model, batch, key):
        loss, metrics = train.classification_loss(model, batch, key)
        return loss, metrics | {"router": {"a": loss, "b": loss}}

    step = train.make_train_step(nested_loss, OPTIMIZER)
    with pytest.raises(ConfigError, match=r"metric 'router' is a dict.*\{'router/a': \.\.\., 'router/b': \.\.\.\}"):
        train.fit(_state(), step, batches(), num_steps=2, log_every=2)


def test_integer_metrics_are_summed_exactly():
    # A step's token count of 2**24 + 1 (16 x 1024 x 1024 + 1): a float32 sum rounds it to 2**24
    # (the base code logged 16777216.0); the int32 word pair keeps it, over a window that crosses
    # blocks, whose sum (~6e8) and per-step values near int32's ends would overflow one int32.
    window = [{"tokens": jnp.int32(2**24 + 1), "big": jnp.int32(2**31 - 1), "low": jnp.int32(-(2**31)),
               "counts": jnp.full((3,), 2**31 - 1, jnp.uint32) + jnp.uint32(2**31), "loss": jnp.float32(0.1 * i),
               "flag": jnp.bool_(i % 3 == 0)} for i in range(40)]
    means = mean_metrics(window)
    assert list(means) == ["big", "counts", "flag", "loss", "low", "tokens"]
    assert means["tokens"] == 2**24 + 1 and means["big"] == 2**31 - 1 and means["low"] == -(2**31)
    assert means["counts"] == 2**32 - 1 and means["flag"] == 14 / 40  # exact: the one division in float64
    np.testing.assert_allclose(means["loss"], np.mean(0.1 * np.arange(40, dtype=np.float32)), rtol=1e-6, atol=0)
    # An integer array metric is the mean of its elements, as before: 1 + 2**24 + 2 over 3 elements.
    assert mean_metrics([{"n": jnp.array([1, 2**24, 2], jnp.int32)}] * 2) == {"n": (2**24 + 3) / 3}
    # Past the words' range (|sum| >= 2**47, here ~6e15) the float32 mean stands in, within 1e-6.
    huge = mean_metrics([{"n": jnp.full((2**15,), 2**31 - 1, jnp.int32)}] * 100)
    np.testing.assert_allclose(huge["n"], 2**31 - 1, rtol=1e-6, atol=0)


def test_a_metric_that_changes_kind_within_a_window_is_refused():
    # An integer metric's mean is its exact window sum / (elements x steps): the base code averaged
    # 3 and 3.5 to 3.25 here, and the sum would mix kinds now. Checked once per metrics structure.
    with pytest.raises(ConfigError, match=r"metric 'n' is an integer with 1 elements on the first step of the log window and a float32 on another"):
        mean_metrics([{"n": jnp.int32(3)}, {"n": jnp.float32(3.5)}])
    with pytest.raises(ConfigError, match=r"metric 'n' is an integer with 1 elements .* an integer with 2 elements on another"):
        mean_metrics([{"n": jnp.int32(3)}, {"n": jnp.zeros(2, jnp.int32)}])
    # A float on the first step keeps the float mean, as before.
    assert mean_metrics([{"n": jnp.float32(3.5)}, {"n": jnp.int32(3)}]) == {"n": 3.25}


def test_fit_warnings_point_at_the_caller(steps):
    # The run-out and past-num_steps warnings name the line that called fit, not eqzoo's code nor
    # the type-checking wrapper the test hook puts around fit.
    train_step, _ = steps
    with pytest.warns(UserWarning, match=r"batches ran out after step 2") as record:
        result = train.fit(_state(), train_step, [batch_at(0), batch_at(1)], num_steps=3, log_every=2)
    with pytest.warns(UserWarning, match=r"already at step 2, past num_steps=1") as past:
        train.fit(result.state, train_step, batches(), num_steps=1)
    assert [w.filename for w in [*record, *past]] == [__file__, __file__]


def test_checkpoint_warnings_point_at_the_caller(steps, tmp_path):
    # The Checkpointer's warnings had fixed stack levels, which pointed into fit (or, under the
    # type-checking hook, into jaxtyping's wrapper); they name the line that called fit.
    from eqzoo import checkpoint

    with checkpoint.Checkpointer(tmp_path / "ckpt", save_every=1, handle_signals=False) as ckpt:
        with pytest.warns(UserWarning, match=r"have no state_dict\(\)") as record:
            train.fit(_state(), steps[0], batches(), num_steps=1, checkpointer=ckpt)
    assert [w.filename for w in record] == [__file__]


def _traced_steps(folder) -> list[int]:
    """The step numbers of the "train" step annotations in a trace folder's xplane file."""
    (path,) = pathlib.Path(folder).glob("*.xplane.pb")
    found = set()
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "train":
                    found.add(int(dict(event.stats)["step_num"]))
    return sorted(found)


def test_a_profile_traces_the_window_of_steps_it_names(steps, tmp_path, capsys):
    """`profile=` traces `steps` steps after the run's first `skip` (counted from where a
    resumed run starts), each annotated with its step number; the trace is written and its
    folder printed and returned. A run that ends inside the window still writes its trace."""
    train_step, _ = steps
    result = train.fit(_state(), train_step, batches(), num_steps=6, log_every=3,
                       profile=train.Profile(tmp_path / "prof", steps=2, skip=1))
    assert pathlib.Path(result.profile).parent == tmp_path / "prof" / "plugins" / "profile"
    assert _traced_steps(result.profile) == [2, 3]  # numbered as logged: the step count after each
    assert f"fit: traced steps 2-3 into {result.profile}" in capsys.readouterr().err
    assert int(result.state.step) == 6 and [r["step"] for r in result.history] == [3, 6]
    # resumed at step 6: its own steps 2.. are traced; the run ends (at 8) inside the window
    again = train.fit(result.state, train_step, batches(6), num_steps=8, log_every=1,
                      profile=train.Profile(tmp_path / "again", steps=5, skip=1))
    assert _traced_steps(again.profile) == [8]
    # no profile: nothing traced, nothing returned; a trace of the caller's own is left alone
    plain = train.fit(again.state, train_step, batches(8), num_steps=9)
    assert plain.profile is None
    jax.profiler.start_trace(str(tmp_path / "mine"))
    try:
        with pytest.warns(UserWarning, match=r"fit: the profiler trace could not start .*training goes on without it"):
            other = train.fit(plain.state, train_step, batches(9), num_steps=10, profile=train.Profile(tmp_path / "x", skip=0))
    finally:
        jax.profiler.stop_trace()
    assert int(other.state.step) == 10 and other.profile is None


def test_profile_settings_are_checked(steps, unchecked):
    with unchecked():
        for kwargs, match in [
            ({"steps": 0}, r"Profile: steps must be an integer >= 1; got 0"),
            ({"skip": -1}, r"Profile: skip must be an integer >= 0; got -1"),
            ({"steps": 2.0}, r"Profile: steps must be an integer >= 1; got 2\.0"),
        ]:
            with pytest.raises(ConfigError, match=match):
                train.Profile("runs/profile", **kwargs)
        with pytest.raises(ConfigError, match=r"Profile: log_dir must be a folder path \(a str or a Path\); got None"):
            train.Profile(None)
        with pytest.raises(ConfigError, match=r"fit: profile must be an eqzoo.train.Profile .* or None; got str"):
            train.fit(_state(), steps[0], batches(), num_steps=1, profile="runs/profile")


def _tiny_lm_state():
    config = models.get_config("tiny-llama", vocab_size=64, num_layers=1, embed_dim=16, hidden_dim=32, max_seq=8)
    return train.TrainState.create(models.create(config, key=jax.random.key(0)), OPTIMIZER, key=jax.random.key(1))


def test_preference_and_eval_token_ids_outside_the_vocabulary_are_refused():
    # A DPO batch's ids ("chosen_tokens", ...) and an eval batch's were not checked: the first
    # trained into NaN, the second reported eval/loss NaN.
    state = _tiny_lm_state()
    ids = np.arange(18, dtype=np.int32).reshape(2, 9) % 64
    side = {"tokens": ids[:, :-1], "targets": ids[:, 1:], "mask": np.ones((2, 8), bool)}
    pairs = {f"{s}_{k}": v for s in ("chosen", "rejected") for k, v in side.items()} | {
        "ref_chosen_logprobs": np.zeros(2, np.float32), "ref_rejected_logprobs": np.zeros(2, np.float32)}
    step = train.make_train_step(train.dpo_loss, OPTIMIZER)
    with pytest.raises(ConfigError, match=r"fit: the first batch's 'rejected_tokens' holds token id 76, outside the model's vocabulary \[0, 64\)"):
        train.fit(state, step, [pairs | {"rejected_tokens": ids[:, :-1] + 60}], num_steps=1)
    with pytest.raises(ConfigError, match=r"'chosen_targets' holds token id 64"):
        _check_token_ids(state, pairs | {"chosen_targets": np.full((2, 8), 64)})
    eval_step = train.make_eval_step(train.lm_loss)
    with pytest.raises(ConfigError, match=r"evaluate: the first batch's 'tokens' holds token id 76, outside the model's vocabulary \[0, 64\)"):
        train.evaluate(eval_step, state, [side | {"tokens": ids[:, :-1] + 60}])
    assert np.isfinite(train.evaluate(eval_step, state, [side])["loss"])


def test_a_first_batch_that_counts_no_target_warns():
    # A prompt/response mask that marks nothing gave loss 0 and gradient 0 at every step: a
    # fine-tune that trained nothing, with no word.
    ids = np.arange(18, dtype=np.int32).reshape(2, 9) % 64
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:]}
    step = train.make_train_step(train.lm_loss, OPTIMIZER)
    for counted_none in (batch | {"mask": np.zeros((2, 8), bool)}, batch | {"targets": np.full((2, 8), -100)},
                         batch | {"segment_ids": np.zeros((2, 8), np.int32)}):
        with pytest.warns(UserWarning, match=r"fit: the first batch counts no target in \[.*targets.*\].*gradient is 0.*encode_chat"):
            result = train.fit(_tiny_lm_state(), step, [counted_none], num_steps=1)
        assert result.last("train/tokens") == 0
    with pytest.warns(UserWarning, match=r"no target in \[\"chosen_targets \(with 'chosen_mask'\)\"\]"):
        train._fit._check_counted_targets({"chosen_targets": ids, "chosen_mask": np.zeros_like(ids, bool),
                                           "rejected_targets": ids, "rejected_mask": np.ones_like(ids, bool)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.fit(_tiny_lm_state(), step, [batch | {"mask": np.eye(2, 8, dtype=bool)}], num_steps=1)
