"""Reading one committed step back: its metadata, the checks that it fits the restore target,
and its arrays, placed as the target asks."""

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import orbax.checkpoint as ocp
from jax.sharding import Mesh, Sharding

from ..train import TrainState
from ._agree import agree
from ._errors import CheckpointCorruptError, CheckpointError
from ._hyperparams import Resolved, reconcile
from ._integrity import check_step_files
from ._meta import (
    Restored,
    check_config,
    check_fit,
    check_model_class,
    meta_object,
    renamed_codes,
    validate_meta,
)
from ._optimizer import check_optimizer
from ._statics import check_statics
from ._steps import META, STATE
from ._tree import describe, from_stored, restore_specs, state_names

ShardingSpec = Mesh | Sharding | Callable[[str, Any], Sharding] | None


class StepReader(NamedTuple):
    """Reads the items of a committed step in `directory` with the `Checkpointer`'s own orbax
    handlers rather than `CheckpointManager.restore`, which ends at a barrier of every process:
    a process whose read failed never reaches it, and the others would wait there for it.
    Processes that read a step agree on the outcome instead (`restore_step`)."""

    directory: Path
    state: ocp.PyTreeCheckpointHandler
    meta: ocp.JsonCheckpointHandler


def read_meta(reader: StepReader, step: int) -> dict[str, Any]:
    """The validated metadata of `step`; `CheckpointCorruptError` if it cannot be read."""
    directory = reader.directory
    path = directory / str(step) / META
    try:
        meta = reader.meta.restore(directory / str(step) / META, args=ocp.args.JsonRestore())
    except Exception as err:  # orbax wraps JSON and IO errors in several types
        raise CheckpointCorruptError(
            f"step {step} in {directory}: its metadata ({path}) cannot be read: {err}",
            step=step, parameters=("<metadata>",),
        ) from err
    return validate_meta(meta, step=step, where=f"step {step} in {directory}", path=path)


def restore_step(
    reader: StepReader, target: TrainState, step: int, shardings: ShardingSpec,
    stored_config: Any, allow_config_change: bool = False, hyperparams: Resolved = "saved",
    allow_optimizer_change: bool = False,
) -> Restored:
    """Restore `step` into the structure of `target` (see `Checkpointer.restore`); `stored_config`
    is the config a save of `target` would store, compared with the saved one.

    On several processes every one of them calls this, and each reads only its own shards, so
    one may fail where another succeeds: they agree (`agree`, one small collective) and raise
    alike, a `CheckpointCorruptError` on every process where any found damage, else an error on
    every process where any failed; none returns a state unless all do."""
    where = f"step {step} in {reader.directory}"
    try:
        meta, stored = _read_step(reader, target, step, shardings, stored_config, allow_config_change, allow_optimizer_change)
        failure = None
    except Exception as err:  # any error in any process: every process must hear of it
        failure = err
    agree(failure, step=step, where=where)
    names = state_names(target)
    arrays = tuple(from_stored(stored[name], leaf) for name, leaf in zip(names, target.arrays, strict=True))
    arrays = reconcile(target, arrays, names, hyperparams, where)
    state = TrainState(arrays, target.structure)
    info = meta_object(meta)
    return Restored(state, info.data_state, info)


def _read_step(
    reader: StepReader, target: TrainState, step: int, shardings: ShardingSpec, stored_config: Any,
    allow_config_change: bool, allow_optimizer_change: bool,
) -> tuple[dict[str, Any], dict]:
    """This process's part of `restore_step`: the step's metadata, checked against `target`, and
    its arrays as stored, by the target's names (`{name: array}`)."""
    directory = reader.directory
    meta = read_meta(reader, step)
    names = state_names(target)
    leaves = dict(zip(names, target.arrays, strict=True))
    expected = {name: describe(leaf) for name, leaf in leaves.items()}
    where = f"step {step} in {directory}"
    if not allow_config_change:
        check_model_class(meta.get("config"), stored_config, where=where)
    stored_as = renamed_codes(expected, meta["arrays"])  # int8 codes older eqzoo saved as `weight`
    found = {n: spec for n, spec in meta["arrays"].items() if n not in stored_as.values()}
    found.update({n: meta["arrays"][old] for n, old in stored_as.items()})
    check_fit(expected, found, where=where)
    if not allow_config_change:
        check_config(meta.get("config"), stored_config, where=where)
        check_statics(meta.get("statics"), target.model, where=where)
    if not allow_optimizer_change:
        check_optimizer(meta.get("optimizer"), target, where=where)
    check_step_files(directory / str(step) / STATE, {stored_as.get(n, n) for n in leaves}, step=step, where=where)
    abstract, restore_args = restore_specs(leaves, shardings, stored_as)
    try:
        stored = _read_arrays(reader, step, abstract, restore_args)
    except Exception as err:  # TensorStore read failures surface as several exception types
        # Every file passed its checksum above. Damage (a file rewritten since) shows as an array
        # that fails read alone; a read that fails whole but not array by array, or for want of
        # memory, is no damage: it must not send the step to `fallback_to_intact`'s quarantine.
        bad = [] if _out_of_memory(err) else _unreadable(reader, step, abstract, restore_args)
        if not bad:
            raise CheckpointError(
                f"step {step} in {directory}: reading the arrays failed, though every file matches its checksum "
                f"and no array fails read alone, so the step is intact (it was not moved aside): "
                f"{str(err).splitlines()[0][:300]}. Out of device memory? Restore onto more devices (shardings=) "
                "or free memory, then retry."
            ) from err
        raise CheckpointCorruptError(
            f"step {step} in {directory}: reading the arrays failed for parameter(s) {bad}: "
            f"{str(err).splitlines()[0][:300]}",
            step=step, parameters=tuple(bad),
        ) from err
    return meta, {name: stored[stored_as.get(name, name)] for name in names}


def _read_arrays(reader: StepReader, step: int, abstract: dict, restore_args: dict, *, partial: bool = False) -> dict:
    args = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=partial)
    return reader.state.restore(reader.directory / str(step) / STATE, args=args)


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) says memory ran out: XLA's
    `RESOURCE_EXHAUSTED`, or a `MemoryError`."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            return True
        err = err.__cause__ or err.__context__
    return False


def _unreadable(reader: StepReader, step: int, abstract: dict, restore_args: dict) -> list[str]:
    # Only on the error path: read the arrays one at a time to name the ones that fail (in this
    # process's shards: on several processes, `agree` makes damage found by one count for all).
    bad = []
    for name in abstract:
        try:
            _read_arrays(reader, step, {name: abstract[name]}, {name: restore_args[name]}, partial=True)
        except Exception:
            bad.append(name)
    return bad
