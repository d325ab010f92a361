"""Stopping on SIGTERM/SIGINT: the handlers a `Checkpointer` installs so that training saves the
current step and stops cleanly, and gives up waiting at a second signal."""

import os
import signal
import threading
from typing import Any


class StopSignals:
    """SIGTERM and SIGINT handlers that record the signal (`received`) instead of stopping the
    process, so the training loop can save and stop; a second signal of the same kind acts as if
    they were not installed. Only installed from the main thread (`install=True`), and not for a
    signal the process already ignores."""

    def __init__(self, install: bool):
        self.received: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(sig)
                # SIG_IGN: the process ignores it (nohup, a runner), so do we; None: a handler set
                # from C, which Python can neither call nor put back, so it stays in place
                if previous == signal.SIG_IGN or previous is None:
                    continue
                self._previous_handlers[sig] = previous
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received is not None:
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
        self.received = signum
        name = signal.Signals(signum).name
        os.write(2, f"eqzoo.checkpoint: received {name}; saving the current step, then stopping "
                    f"(send {name} again to stop at once).\n".encode())

    def restore(self) -> None:
        """Put back the handlers these replaced (not where someone replaced ours since)."""
        for sig, handler in self._previous_handlers.items():
            if signal.getsignal(sig) == self._on_signal:  # not if someone replaced ours since
                signal.signal(sig, handler)
        self._previous_handlers = {}
