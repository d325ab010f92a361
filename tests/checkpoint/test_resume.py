"""Kill a real training process at random instants, restart it with the same command, and get
bitwise the run that never stopped: parameters, optimizer state, key and every logged loss.

The job is `_driver.py` (a small MLP trained with `fit` and a `Checkpointer`), run in its own
process with `JAX_PLATFORMS=cpu` and a shared persistent compilation cache, so only the first
process pays XLA's compile time.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from eqzoo import checkpoint

DRIVER = Path(__file__).with_name("_driver.py")
STEPS, SAVE_EVERY = 36, 6
TIMEOUT = 120


def _driver_module():
    spec = importlib.util.spec_from_file_location("eqzoo_checkpoint_test_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_compilation_cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONUNBUFFERED": "1",
    }


def _start(run: Path, env, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(DRIVER), "--dir", str(run / "ckpt"), "--log", str(run / "losses.jsonl"),
           "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err


def _logged(run: Path) -> list[tuple[int, float]]:
    path = run / "losses.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        records.append((int(record["step"]), record["train/loss"]))
    return records


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if any(s >= step for s, _ in _logged(run)):
            return
        time.sleep(0.002)
    raise AssertionError(f"the driver did not reach step {step} (exit code {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")


def _check_directory(run: Path, target) -> list[int]:
    """Every listed step is complete and intact (restoring it verifies every file)."""
    ckpt = checkpoint.Checkpointer(run / "ckpt", handle_signals=False)
    try:
        steps = ckpt.all_steps()
        for step in steps:
            assert ckpt.restore(target, step=step).meta.step == step
        return steps
    finally:
        ckpt.close()


def _final_state(run: Path, target):
    ckpt = checkpoint.Checkpointer(run / "ckpt", handle_signals=False)
    try:
        assert ckpt.latest_step() == STEPS
        return ckpt.restore(target)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def target():
    driver = _driver_module()
    with jax.numpy_dtype_promotion("standard"):
        return checkpoint.abstract_state(driver.CONFIG, driver.optimizer())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, env):
    """The run that never stopped."""
    run = tmp_path_factory.mktemp("straight")
    code, summary, err = _finish(_start(run, env))
    assert code == 0, err
    assert summary["step"] == STEPS and summary["resumed_from"] is None
    return run, summary


def _assert_same_run(run: Path, straight_run: Path, target, same_state) -> None:
    logged = _logged(run)
    # Steps logged after the last save and before a kill were run again after the restart; the
    # logger kept the second record only, so each step appears once, with bitwise the loss of
    # the run that never stopped.
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))
    assert logged == _logged(straight_run)
    a, b = _final_state(run, target), _final_state(straight_run, target)
    same_state(a.state, b.state)
    assert a.data_state == b.data_state


def test_killed_at_random_instants_resumes_bitwise(straight, env, tmp_path, target, same_state):
    straight_run, straight_summary = straight
    run = tmp_path / "interrupted"
    rng = random.Random(20261125)
    restarts = []

    # Two SIGKILLs at random moments, found by watching the loss log.
    for kill_at in sorted(rng.sample(range(4, STEPS - 8), 2)):
        proc = _start(run, env)
        _wait_for_step(proc, run, kill_at)
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        code, _, _ = _finish(proc)
        assert code == -signal.SIGKILL
        restarts.append(_check_directory(run, target))

    # A SIGKILL while an asynchronous save is being written: the driver kills itself right after
    # the save of `die_at` starts. That step must not be listed; the restart must work.
    latest = max(restarts[-1], default=0)
    die_at = latest + 2 * SAVE_EVERY
    code, _, err = _finish(_start(run, env, "--die-after-save", str(die_at)))
    assert code == -signal.SIGKILL, err
    assert (run / "ckpt" / f"{die_at}.orbax-checkpoint-tmp").exists()  # it really was in flight
    steps = _check_directory(run, target)
    assert die_at not in steps and max(steps) == die_at - SAVE_EVERY

    # The last restart runs to the end.
    code, summary, err = _finish(_start(run, env))
    assert code == 0, err
    assert summary["resumed_from"] == die_at - SAVE_EVERY and summary["step"] == STEPS
    assert summary["params_sha256"] == straight_summary["params_sha256"]
    assert not list((run / "ckpt").glob("*.orbax-checkpoint-tmp*"))  # leftovers were cleaned up
    _assert_same_run(run, straight_run, target, same_state)


def test_sigterm_saves_the_current_step_and_exits_cleanly(straight, env, tmp_path, target, same_state):
    straight_run, straight_summary = straight
    run = tmp_path / "terminated"
    proc = _start(run, env)
    _wait_for_step(proc, run, 9)
    proc.send_signal(signal.SIGTERM)
    code, summary, err = _finish(proc)
    assert code == 0, err
    assert "received SIGTERM; saving the current step" in err
    assert summary["stopped_early"] and summary["signal"] == signal.SIGTERM
    stopped_at = summary["step"]
    assert 9 <= stopped_at < STEPS
    assert _check_directory(run, target)[-1] == stopped_at  # the step it stopped at, committed

    code, summary, err = _finish(_start(run, env))
    assert code == 0, err
    assert summary["resumed_from"] == stopped_at and summary["step"] == STEPS
    assert summary["params_sha256"] == straight_summary["params_sha256"]
    _assert_same_run(run, straight_run, target, same_state)


_EXIT_WITHOUT_CLOSE = """
import sys, jax, optax
from eqzoo import checkpoint, models, train
model = models.create(models.MLPConfig(in_features=4, out_features=2, width=8, depth=1), key=jax.random.key(0))
state = train.TrainState.create(model, optax.adam(1e-3), key=jax.random.key(1))
# two open Checkpointers, each with a save in flight: one exit hook commits both
ckpts = [checkpoint.Checkpointer(f"{sys.argv[1]}/{name}", handle_signals=False) for name in ("a", "b")]
for ckpt in ckpts:
    ckpt.save(state, step=3)
sys.setswitchinterval(30.0)  # keep the GIL: the background commit cannot finish before the exit starts
"""


def test_a_save_in_flight_when_the_program_ends_without_close_is_committed(env, tmp_path):
    # The docs promise close() runs at interpreter exit; it must run before the interpreter
    # stops the thread pools orbax commits with, or the last step is lost as a tmp directory.
    directory = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(directory)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot schedule new futures" not in proc.stderr
    assert [sorted(p.name for p in (directory / name).iterdir()) for name in ("a", "b")] == [["3"], ["3"]]
