"""Processes restoring one step take one way on: each reads only its own shards of the arrays,
so one may find damage, or run out of memory, where another reads its part without trouble."""

import jax
import numpy as np

from ._errors import CheckpointCorruptError, CheckpointError

_OK, _DAMAGED, _FAILED = 0, 1, 2


def agree(failure: Exception | None, *, step: int, where: str) -> None:
    """Raise, in every process, when restoring `step` failed in any (`failure`: this process's
    error, `None` where it succeeded; `where` names the step in messages).

    Damage found by any process counts for all: each raises a `CheckpointCorruptError` (its own,
    or one naming the processes that found the damage), so with `fallback_to_intact` every
    process moves the step aside and falls back to the same older one. Otherwise, a failure in
    any process (out of memory, a target that does not fit) raises there, and a
    `CheckpointError` naming those processes in the others, rather than leaving them to train
    on alone. One process: `failure` is raised as it is. Several: one all-gather of an int per
    process, which every process restoring the step must reach.
    """
    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return
    from jax.experimental import multihost_utils

    mine = _OK if failure is None else _DAMAGED if isinstance(failure, CheckpointCorruptError) else _FAILED
    codes = np.asarray(multihost_utils.process_allgather(np.asarray(mine, np.int32))).reshape(-1)
    if (codes == _OK).all():
        return
    damaged = np.flatnonzero(codes == _DAMAGED).tolist()
    if damaged:
        if mine == _DAMAGED:
            raise failure
        raise CheckpointCorruptError(
            f"{where}: process(es) {damaged} found it damaged in the parts of its arrays they read (their "
            "errors name the parameters); each process reads only its own shards, and this one read its "
            "part, but a step damaged anywhere is damaged for every process.",
            step=step, parameters=("<read by other processes>",),
        ) from failure
    if failure is not None:
        raise failure
    raise CheckpointError(
        f"{where}: restoring it failed in process(es) {np.flatnonzero(codes == _FAILED).tolist()} (their errors "
        "say why: it is not damage, so the step was not moved aside). This process read its part, but every "
        "process must restore the same step, so none goes on; fix the cause there and restore again."
    )
