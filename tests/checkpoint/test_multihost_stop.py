"""A signal to one process of a real 2-process run (jax.distributed on localhost, CPU): every
process saves the same step and stops there, and that step restores; also when the signal comes
before a resumed run's first step. Each process trains with
`fit` and a `Checkpointer` (tests/checkpoint/_multihost_stop.py). Were the processes to act on
their own signals, the one signalled would wait in orbax's save barrier while the other waits in
the next step's all-reduce: the run would hang (here: be killed at the deadline, and fail)."""

import importlib.util
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from eqzoo import checkpoint

WORKER = Path(__file__).with_name("_multihost_stop.py")
DEADLINE_S = 90  # a hang fails here; the three runs take ~20 s on 2 loaded cores
RESUMED_FROM = 50


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker_module():
    return _module(WORKER)


def _start(directory: Path, plan: str):
    return _module(WORKER.with_name("_two_processes.py")).start(WORKER, str(directory), plan)


def _finish(runs):
    return _module(WORKER.with_name("_two_processes.py")).finish(runs, DEADLINE_S)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_one_saved_step(tmp_path):
    worker = _worker_module()
    # Run 1 resumes from a step this process saves, and its process 0 gets SIGINT before training
    # on: JAX must count from the restored step, not from 0, or no step is ever agreed on.
    state = worker.new_state(jax.random.key(0))
    state = state.replace(step=jnp.asarray(RESUMED_FROM, state.step.dtype))
    with checkpoint.Checkpointer(tmp_path / "run1", handle_signals=False) as ckpt:
        ckpt.save(state, data_state={**worker.make_loader(process_index=0, process_count=1).state_dict(), "step": RESUMED_FROM})
    plans = {"1:TERM@5": (signal.SIGTERM, 5), f"0:INT@{RESUMED_FROM}": (signal.SIGINT, RESUMED_FROM)}
    # The three 2-process runs at once: most of each is starting Python and JAX.
    runs = {plan: _start(tmp_path / f"run{i}", plan) for i, plan in enumerate([*plans, "no-service"])}
    outs = _finish(runs)

    for i, (plan, (sent, after)) in enumerate(plans.items()):
        first, second = outs[plan]
        assert (first["process"], second["process"]) == (0, 1)
        stopped = first["step"]
        assert after < stopped < worker.MAX_STEPS, (plan, first)
        for out in (first, second):
            assert out["stopped_early"] and out["step"] == out["latest_step"] == stopped, (plan, out)
            assert [w for w in out["later_warnings"] if f"stopped at step {stopped} on a signal agreed" in w], out
            assert out["later_sigint_interrupts"], out
        assert first["params_sha256"] == second["params_sha256"]
        # The signalled process reports its signal; the other, the preemption notice (SIGTERM).
        signalled = int(plan[0])
        assert outs[plan][signalled]["signal"] == sent and outs[plan][1 - signalled]["signal"] == signal.SIGTERM
        # The agreed step is committed, and restores (here, in one process) to the final state.
        with checkpoint.Checkpointer(tmp_path / f"run{i}", handle_signals=False) as ckpt:
            assert ckpt.all_steps() == ([stopped] if i == 0 else [RESUMED_FROM, stopped])
            restored = ckpt.restore(checkpoint.abstract_state(worker.CONFIG, worker.OPTIMIZER))
        assert int(restored.state.step) == restored.meta.step == stopped
        assert checkpoint.params_sha256(restored.state.model) == first["params_sha256"]

    # With JAX's preemption service off, no step can be agreed on: the Checkpointer says so and
    # leaves both signals to end the processes.
    for out in outs["no-service"]:
        assert out["term_default"] and out["int_default"], out
        assert len(out["warnings"]) == 1
        assert "which this process does not run (jax_enable_preemption_service was off" in out["warnings"][0]
        assert "pass handle_signals=False to silence this" in out["warnings"][0]
