"""Committing the saves still being written when the main program ends: every `Checkpointer`
not yet closed is closed by one exit hook."""

import atexit
import sys
import threading
import traceback
import weakref
from typing import Any

OPEN: "weakref.WeakSet[Any]" = weakref.WeakSet()  # Checkpointers not yet closed; closed at exit
_hook_registered = False


def _close_open_at_exit() -> None:
    # Every one is closed even when one's pending save fails: an error here would end the loop
    # (and threading prints it and exits 0), leaving the others' saves unwritten.
    for ckpt in list(OPEN):
        try:
            ckpt.close()
        except Exception:
            sys.stderr.write(f"eqzoo.checkpoint: closing {ckpt!r} at exit failed:\n{traceback.format_exc()}")


def track_open(ckpt: Any) -> None:
    """Add `ckpt` (a `Checkpointer`) to the ones closed at exit, registering the hook once."""
    # A save still being written when the main program ends must be committed before the
    # interpreter shuts down the thread pools orbax's background commit submits work to.
    # concurrent.futures stops accepting work in threading's own exit hooks, which run before
    # `atexit`'s: a plain atexit handler waits too late (the commit fails with "cannot schedule
    # new futures after interpreter shutdown" and the step stays an unfinished temporary
    # directory). threading's hooks run newest first, so this one runs before that shutdown:
    # it is registered once, when the first Checkpointer is made (concurrent.futures is
    # imported by then), and closes every Checkpointer still open. Those hooks can never be
    # unregistered, so one per Checkpointer would pile up in a long process.
    global _hook_registered
    OPEN.add(ckpt)
    if _hook_registered:
        return
    _hook_registered = True
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_close_open_at_exit)
            return
        except RuntimeError:  # already shutting down
            pass
    atexit.register(_close_open_at_exit)
