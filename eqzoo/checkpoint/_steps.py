"""The step directories of a checkpoint directory: which are committed, which one a restore
picks, and moving aside what should not be read (unfinished saves, damaged steps)."""

import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ._errors import CheckpointError, CheckpointNotFoundError

STATE, META = "state", "meta"  # the two orbax items of a step
TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for a step that is still being written


def committed_steps(directory: Path) -> list[int]:
    """The committed steps in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    # Orbax's own listing: numeric step directories only; temporary (uncommitted) ones are skipped.
    return sorted(m.step for m in ocp.step.standard_name_format().find_all(directory))


def pick_steps(directory: Path, step: int | None, *, existed: bool) -> list[int]:
    """`[step]` if it is committed, else (`step=None`) every committed step, newest first.

    **Raises:** `CheckpointNotFoundError` naming why there is none to restore (`existed`: the
    directory was there before the `Checkpointer` created it).
    """
    steps = committed_steps(directory)
    if not steps:
        if not existed and not any(directory.iterdir()):
            why = "the directory did not exist (it was created empty)"
        else:
            tmp = [p.name for p in directory.iterdir() if TMP in p.name]
            why = "it holds no committed step" + (
                f" (only unfinished saves {tmp}, which are never restored)" if tmp else ""
            )
        raise CheckpointNotFoundError(f"no checkpoint to restore in {directory}: {why}.")
    if step is not None:
        if int(step) not in steps:
            raise CheckpointNotFoundError(
                f"step {step} is not a committed step in {directory}; committed steps: {steps}."
            )
        return [int(step)]
    return sorted(steps, reverse=True)


def remove_unfinished(directory: Path) -> None:
    """Delete the temporary step directories of saves that never committed (in process 0)."""
    # Temporary step directories of saves that never committed (the writer was killed).
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for path in directory.iterdir():
        if TMP in path.name and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def quarantine(manager: ocp.CheckpointManager, directory: Path, step: int) -> str:
    """Move a damaged step aside to `corrupt-<step>-<time>` (process 0 moves it, every process
    calls this); returns where it is, the same path in every process. Every process then
    re-reads its manager's step list (after process 0 has moved the step, so that it sees the
    move): one still listing the step would refuse to save it again when training reaches it.

    **Raises:** the `OSError` of a move that failed in process 0; in the others, a
    `CheckpointError` saying so (rather than waiting for process 0).
    """
    # Every process comes here for the same steps: `restore_step` makes damage found by one
    # process count for all.
    stamp, failed = int(time.time()), None
    if jax.process_index() == 0:
        try:
            os.replace(directory / str(step), directory / f"corrupt-{step}-{stamp}")
        except OSError as err:
            stamp, failed = 0, err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Process 0's time (0: its move failed); a collective, so no process reloads before the move.
        stamp = int(multihost_utils.broadcast_one_to_all(np.asarray(stamp, np.uint32)))
    if failed is not None:
        raise failed
    if stamp == 0:
        raise CheckpointError(
            f"process 0 could not move the damaged step {step} aside in {directory} (its error says why); "
            f"move {directory / str(step)} out of {directory} by hand, then restore again."
        )
    manager.reload()
    return str(directory / f"corrupt-{step}-{stamp}")
