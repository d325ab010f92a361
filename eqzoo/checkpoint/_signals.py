"""Stopping on SIGTERM/SIGINT: the handlers a `Checkpointer` installs so that training saves the
current step and stops cleanly, and gives up waiting at a second signal.

One process acts on its own signal at the next step. Several processes (`jax.distributed`) must
save the same step, or they wait for each other in orbax's barriers forever: there the step to
stop at is agreed through JAX's preemption service, which `jax.distributed.initialize` starts.
Its SIGTERM handler (installed from C++) tells the coordination service, every process's
background thread uploads the step it has reached, and each then stops at one step past the
largest: `multihost_utils.reached_preemption_sync_point(step)` turns true there in every
process. Asking costs a lock and a comparison in this process (no collective, no round trip),
so it is asked at every step; the agreement itself takes up to a second after the signal (the
service polls for SIGTERM once a second), during which training goes on."""

import os
import signal
import threading
import warnings
from typing import Any

import jax
from jax.experimental import multihost_utils

from .._errors import user_stacklevel

# The step the processes agreed to stop at, once they have: JAX's preemption service agrees once
# per process and answers yes at that step number ever after, for every Checkpointer.
_AGREED_STEP: int | None = None


def preemption_service(step: int) -> bool:
    """Whether `jax.distributed.initialize` started JAX's preemption service in this process
    (it does unless `jax_enable_preemption_service` was off), asked through the public call,
    which raises `RuntimeError` without one; tells it `step`, the step training starts from."""
    try:
        multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:
        return False
    return True


class StopSignals:
    """SIGTERM and SIGINT handlers that record the signal (`received`) instead of stopping the
    process, so the training loop can save and stop; a second signal of the same kind acts as if
    they were not installed. Only installed from the main thread (`install=True`), and not for a
    signal the process already ignores.

    With `across_processes=True` (a multi-process run with JAX's preemption service) SIGTERM is
    left to that service, a SIGINT is passed on to it as a SIGTERM, and `received` is set only by
    `stop_at(step)` at the step every process agreed on."""

    def __init__(self, install: bool, *, across_processes: bool = False):
        self.received: int | None = None
        self._across = install and across_processes
        self._seen: int | None = None  # several processes: the signal this one got, not yet agreed on
        # JAX's preemption service agrees on one step per process, and says yes at that step
        # number ever after: a later run passing it again must not be stopped there.
        self._agreed: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            # JAX's own SIGTERM handler must stay: a Python one would replace it, and the
            # processes would never hear of the signal.
            for sig in (signal.SIGINT,) if self._across else (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(sig)
                # SIG_IGN: the process ignores it (nohup, a runner), so do we; None: a handler set
                # from C, which Python can neither call nor put back, so it stays in place
                if previous == signal.SIG_IGN or previous is None:
                    continue
                self._previous_handlers[sig] = previous
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # A second signal, or (several processes) one after the service has agreed on its one stop
        # in this process, which it cannot agree on again: act as without us.
        if (self._seen if self._across else self.received) is not None or (self._across and _AGREED_STEP is not None):
            # A second signal: stop waiting for a clean save and behave as without us. The previous
            # handler is called here, synchronously (re-raising the signal would run it at some
            # later bytecode, possibly after the interrupted code has moved on).
            previous = self._previous_handlers.get(signum, signal.SIG_DFL)
            self.restore()
            if callable(previous):
                previous(signum, frame)  # default_int_handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signum)  # the default action (terminate) happens at once
            return
        name = signal.Signals(signum).name
        if self._across:
            self._seen = signum
            signal.raise_signal(signal.SIGTERM)  # JAX's preemption notifier takes it from here
            os.write(2, f"eqzoo.checkpoint: received {name}; passed on to JAX's preemption service, so "
                        f"that every process saves the same step, then stops (send {name} again to stop "
                        "at once).\n".encode())
            return
        self.received = signum
        os.write(2, f"eqzoo.checkpoint: received {name}; saving the current step, then stopping "
                    f"(send {name} again to stop at once).\n".encode())

    def stop_at(self, step: int) -> int | None:
        """The signal that asks training to stop at `step` (which it then saves), or `None`.
        Several processes: each must call this at every step, with the same step numbers; it
        answers `None` until the step all of them agreed on, then the signal this process
        received (SIGTERM where it received none: the other processes' notice)."""
        global _AGREED_STEP
        if self._across and self.received is None and self._agreed is None and _AGREED_STEP is None:
            if multihost_utils.reached_preemption_sync_point(step):
                self._agreed = _AGREED_STEP = step
                self.received = self._seen if self._seen is not None else signal.SIGTERM
                os.write(2, f"eqzoo.checkpoint: every process stops at step {step} (a preemption notice "
                            "reached one of them); saving it, then stopping.\n".encode())
        return self.received

    def start_at(self, step: int) -> None:
        """Training goes on from `step` (a restored or starting step): with several processes, a
        notice that arrives before the next `stop_at` is agreed on for the step after it (JAX
        counts from the last step it was told of, 0 at first)."""
        if self._across and self.received is None and self._agreed is None and _AGREED_STEP is None:
            multihost_utils.reached_preemption_sync_point(step)

    def forget(self) -> None:
        """Forget a signal that has stopped a run, so the next run trains on."""
        self.received = self._seen = None

    def restore(self) -> None:
        """Put back the handlers these replaced (not where someone replaced ours since)."""
        for sig, handler in self._previous_handlers.items():
            if signal.getsignal(sig) == self._on_signal:  # not if someone replaced ours since
                signal.signal(sig, handler)
        self._previous_handlers = {}


def signal_handling(handle_signals: bool, start_step: int) -> tuple[bool, bool]:
    """`(install, across_processes)` for `StopSignals`: on a multi-process run signals are agreed
    on through JAX's preemption service (told `start_step`); where that service is off, or has
    agreed on a stop in this process already, they cannot be, and none is handled (with a
    warning saying so)."""
    if not handle_signals or jax.process_count() == 1:
        return handle_signals, False
    if _AGREED_STEP is not None:
        warnings.warn(
            f"Checkpointer(handle_signals=True): this process's run stopped at step {_AGREED_STEP} on a signal "
            "agreed through JAX's preemption service, which agrees on one step per process. Signals are not "
            "handled for this Checkpointer: SIGINT raises KeyboardInterrupt, and a SIGTERM reaches JAX's "
            "service only. Start a new process to stop on a signal again, or pass handle_signals=False.",
            stacklevel=user_stacklevel(),
        )
        return False, False
    if preemption_service(start_step):
        return True, True
    warnings.warn(
        "Checkpointer(handle_signals=True) on a multi-process run stops every process at one agreed "
        "step through JAX's preemption service, which this process does not run "
        "(jax_enable_preemption_service was off when jax.distributed.initialize ran). SIGTERM and "
        "SIGINT are not handled: they end the process as they would without eqzoo, and a restart "
        "resumes from the last committed step. Leave jax_enable_preemption_service on (the default) "
        "before jax.distributed.initialize, or pass handle_signals=False to silence this.",
        stacklevel=user_stacklevel(),
    )
    return False, False
