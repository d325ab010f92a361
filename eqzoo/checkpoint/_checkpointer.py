"""`Checkpointer`: whole-`TrainState` checkpoints over orbax's `CheckpointManager`.

Each step is one directory `<directory>/<step>` holding two orbax items: `state` (every array of
the `TrainState`, one flat `{name: array}` tree, zarr files per array plus a CRC-32 manifest) and
`meta` (JSON: format version, array names/shapes/dtypes, model config, data-loader state, user
metadata, and a CRC-32 of itself). Orbax writes a step into a temporary directory and renames it
when every file is written, so a step is either listed complete or not listed at all.
"""

import os
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from .._errors import int_hint, user_stacklevel
from .._typing import TextStream
from ..train import TrainState
from ._config import config_to_dict, model_config
from ._durable import DurableRename
from ._errors import CheckpointCorruptError, CheckpointError
from ._exit import OPEN, track_open
from ._hyperparams import HyperparamsChoice, check_choice, set_names
from ._integrity import VerifiedPyTreeHandler
from ._meta import CheckpointMeta, Restored, build_meta, meta_object
from ._optimizer import state_optimizer
from ._progress import SaveProgress
from ._restore import ShardingSpec, StepReader, read_meta, restore_step
from ._run import run_record, warn_changed_run, warn_newer_steps
from ._signals import StopSignals, signal_handling
from ._statics import StaticsCache
from ._steps import META, STATE, committed_steps, pick_steps, quarantine, remove_unfinished
from ._tree import describe, state_names, to_stored


def _check_count(name: str, value: Any, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise CheckpointError(
            f"Checkpointer({name}=...) must be an int >= 1{' or None' if allow_none else ''}; got {value!r}.{int_hint(value)}"
        )
    return int(value)


def _check_own_config(config: Any) -> None:
    """Raise `CheckpointError` naming the fix when the model's own `config` field, which a save
    stores by default to check restores against, has a setting JSON cannot hold (a function, say)."""
    if config is None:
        return
    try:
        config_to_dict(config)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err} This is the model's own `config` field ({type(config).__name__}), which a checkpoint "
            "stores to check restores against. Give the Checkpointer a JSON-able stand-in to store and "
            "compare instead, Checkpointer(..., config=...): a dataclass or dict of the settings that "
            "decide what the weights mean."
        ) from err


class Checkpointer:
    """Saves and restores whole training states, asynchronously, atomically, keeping the last N.

    A saved step holds every array of the [`eqzoo.train.TrainState`][] (model, optimizer state,
    step, the typed PRNG key as its raw key data), the data loader's `state_dict()`, the model
    config as JSON, the model's JSON-able non-array settings (static fields such as a layer's
    `temp`), what `fit` records of the run, and a format version. Non-array leaves (activation
    functions, configs held as static fields) are not restored: the restore target supplies
    them, and `restore` refuses a target whose recorded settings differ.

    Use it as the `checkpointer=` of [`eqzoo.train.fit`][], which calls `maybe_save` and
    `should_stop` after every step; call `close()` (or use `with Checkpointer(...) as ckpt:`)
    before the process exits so the last asynchronous save is committed.

    **Arguments:**

    - `directory`: where steps are written (created if missing).
    - `save_every`: `maybe_save` saves every this many steps; `None` saves only when forced (the
      last step of `fit`) or on a signal.
    - `keep_last`: keep the newest this many steps (`None`: keep all).
    - `keep_every`: also keep every step divisible by this (`None`: no such steps).
    - `async_save`: write in a background thread; the training loop only waits for the arrays to
      be copied off the device. `False` writes synchronously.
    - `handle_signals`: on SIGTERM or SIGINT, save the current step at the next `maybe_save`,
      wait until it is committed, and make `should_stop()` true. A second signal of the same
      kind acts as if this handler were not installed. Only installed from the main thread, and
      not for a signal the process already ignores. On a multi-process run
      (`jax.process_count() > 1`) every process must save the same step, so a signal to any
      of them stops all of them at one step they agree on through JAX's preemption service
      (which `jax.distributed.initialize` starts): a SIGTERM is left to that service's own
      handler, a SIGINT is passed on to it as a SIGTERM, and `maybe_save` asks it, at every
      step and without any communication, whether this is the agreed step (up to a second
      after the signal). That needs `maybe_save` called at every step with the same step
      numbers on every process (as `fit` does). Where the service is off
      (`jax_enable_preemption_service=False`) no signal is handled, with a warning.
    - `fallback_to_intact`: when the newest step fails its integrity check, `restore()` warns,
      moves the damaged step aside (to `corrupt-<step>-<time>`) and restores the newest intact
      step instead of raising. On a multi-process run damage found by any process (each reads
      only its own shards) counts for all: every process falls back to the same step.
    - `config`: the model config to store; default: the model's own `config` field, if any.
    - `compression`: zstd-compress array files (smaller, slower to write and read).
    - `progress`: a stream (`sys.stderr`, say) to report each save on, in process 0: one line
      when it starts, with how long training waited for it, and one when it is committed
      (seen at the next `save`/`maybe_save` call, or at `close`). Default: silent.
    - `durable`: make each committed step survive a power cut: before the step directory is
      renamed into place, every file and directory in it is fsynced, and the parent directory
      right after the rename, before older steps are deleted and before the save counts as
      committed. `False` leaves the files in the page cache for the kernel to write when it
      likes (within about 30 s on Linux), as orbax does: a power cut may then damage the
      newest step (see `fallback_to_intact`). The syncs cost a fixed few tens of
      milliseconds per save, in the background thread for asynchronous saves.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int | None = None,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = True,
        handle_signals: bool = True,
        fallback_to_intact: bool = False,
        config: Any = None,
        compression: bool = False,
        progress: TextStream | None = None,
        durable: bool = True,
    ):
        self._async = async_save
        self._save_every = _check_count("save_every", save_every, allow_none=True)
        keep_last = _check_count("keep_last", keep_last, allow_none=True)
        keep_every = _check_count("keep_every", keep_every, allow_none=True)
        self._directory = Path(directory).absolute()
        self._progress = SaveProgress(progress if jax.process_index() == 0 else None, self._directory)
        self._existed = self._directory.is_dir()
        self._fallback = fallback_to_intact
        self._config = config
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        if keep_every is not None:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler = VerifiedPyTreeHandler(use_ocdbt=False, use_compression=compression)
        meta_handler = ocp.JsonCheckpointHandler()
        registry.add(STATE, ocp.args.PyTreeSave, state_handler)
        registry.add(STATE, ocp.args.PyTreeRestore, state_handler)
        registry.add(META, ocp.args.JsonSave, meta_handler)
        registry.add(META, ocp.args.JsonRestore, meta_handler)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            # Leftovers of saves killed mid-write are removed by our first save instead, so a
            # process that only reads never deletes a directory another process is writing.
            cleanup_tmp_directories=False,
            create=True,
            # Orbax's rename-into-place commit, with fsyncs around the rename.
            temporary_path_class=DurableRename if durable else None,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options, handler_registry=registry)
        self._reader = StepReader(self._directory, state_handler, meta_handler)
        self._last_saved: int | None = None
        self._in_flight: int | None = None  # the step of the save started last, listed once it is done
        self._restored_step: int | None = None
        self._current_step: int | None = None
        self._closed = False
        self._warned_no_data_state = False
        self._statics = StaticsCache()
        self._run: dict[str, Any] | None = None
        self._set_by_restore: frozenset[str] = frozenset()  # injected values the last restore was told to set
        # On several processes JAX's preemption service is told the newest step: a notice before
        # the restore agrees on the step after it.
        install, across_processes = signal_handling(handle_signals, max(self.all_steps(), default=0))
        self._signals = StopSignals(install, across_processes=across_processes)
        self._stop_honoured = False  # should_stop said True: the next run forgets the signal
        track_open(self)

    # ------------------------------------------------------------------ listing

    @property
    def directory(self) -> Path:
        """The checkpoint directory."""
        return self._directory

    def all_steps(self) -> list[int]:
        """The committed steps in the directory, oldest first (in-flight saves are not listed)."""
        steps = committed_steps(self._directory)
        # A step renamed into place is on disk a moment before its save is done (the rename
        # synced, older steps deleted): until then it is still in flight.
        if self._in_flight in steps and not self._closed and self._manager.is_saving_in_progress():
            steps.remove(self._in_flight)
        return steps

    def latest_step(self) -> int | None:
        """The newest committed step, or `None` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ saving

    def save(
        self,
        state: TrainState,
        *,
        data_state: Mapping[str, Any] | None = None,
        config: Any = None,
        metadata: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> bool:
        """Save `state` as step `step` (default `int(state.step)`).

        Returns once the arrays are copied off the device (asynchronous mode) or written
        (synchronous mode); the step is listed only once completely written.

        **Arguments:**

        - `state`: the [`eqzoo.train.TrainState`][].
        - `data_state`: the loader's `state_dict()` (any JSON-able dict).
        - `config`: the model config (a dataclass); default: the constructor's, else the model's
          `config` field.
        - `metadata`: extra JSON-able information to keep with the step.
        - `step`: the step number, when the caller already knows it (saves a device sync).

        **Returns:** `True` if a save was started; `False` if this step was already saved or
        restored by this `Checkpointer` (the same state).

        **Raises:** `CheckpointError` if a different step with this number is already committed
        (resuming from an older step into a directory with newer ones), or metadata is not JSON.
        """
        if self._closed:
            raise CheckpointError("this Checkpointer is closed; make a new one to save.")
        if not isinstance(state, TrainState):
            raise CheckpointError(
                f"Checkpointer.save takes an eqzoo.train.TrainState; got {type(state).__name__}. "
                "For a model alone use eqzoo.checkpoint.save_weights."
            )
        step = int(state.step) if step is None else int(step)
        if step in (self._last_saved, self._restored_step):
            return False
        if step in self.all_steps():
            raise CheckpointError(
                f"step {step} is already committed in {self._directory}, and this run did not "
                "restore it. Resume from the latest step (Checkpointer.restore with step=None), "
                "delete the newer steps, or use another directory."
            )
        if self._last_saved is None:
            remove_unfinished(self._directory)
        began = time.perf_counter()
        names = state_names(state)
        items = {name: to_stored(leaf) for name, leaf in zip(names, state.arrays, strict=True)}
        if config is None:
            config = self._stored_config(state)
            if self._config is None:
                _check_own_config(config)
        meta = build_meta(
            step=step,
            arrays={name: describe(leaf) for name, leaf in zip(names, state.arrays, strict=True)},
            config=config,
            data_state=data_state,
            metadata=metadata,
            statics=self._statics(state),
            run=self._run,
            optimizer=state_optimizer(state),
        )
        self._in_flight = step
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.PyTreeSave(items), META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )
        self._last_saved = step
        self._progress.started(step, began, asynchronous=self._async)
        return True

    def maybe_save(self, state: TrainState, batches: Any = None, *, force: bool = False, step: int | None = None) -> bool:
        """The [`eqzoo.train.fit`][] hook, called after every step: save when the step is a
        multiple of `save_every`, when `force` is set, or when a signal asked to stop.

        **Arguments:** `state`; `batches`, the loader (its `state_dict()` is saved when it has
        one); `force`; `step`, the step number if known (avoids reading it from the device).

        **Returns:** whether a save was started.
        """
        step = int(state.step) if step is None else int(step)
        self._progress.check()
        if self._current_step is None and self._restored_step is not None:
            warn_newer_steps(self._restored_step, self.all_steps(), self._directory)
        self._current_step = step
        # Asked at every step, forced or not: on several processes, JAX's count of steps.
        stop = self._signals.stop_at(step) is not None
        due = force or stop or (self._save_every is not None and step % self._save_every == 0)
        if not due:
            return False
        state_dict = getattr(batches, "state_dict", None)
        if batches is not None and not callable(state_dict) and not self._warned_no_data_state:
            self._warned_no_data_state = True
            warnings.warn(
                f"the batches ({type(batches).__name__}) have no state_dict(), so checkpoints do not "
                "record the data position and a resumed run restarts the data stream; use an "
                "eqzoo.data loader (TokenLoader, ArrayLoader) for exact resume.",
                stacklevel=user_stacklevel(),
            )
        return self.save(state, data_state=state_dict() if callable(state_dict) else None, step=step)

    def begin_run(self, run: Mapping[str, Any], *, step: int) -> None:
        """The [`eqzoo.train.fit`][] hook, called before the first step: `run` (the run's
        `num_steps`, batch shapes, `run_config` and the `optax.inject_hyperparams` values its
        state starts from, `hyperparams`) is recorded in every step saved from now on. When
        training goes on from a committed `step` whose record differs (a changed batch shape,
        `run_config` entry or injected value, such as a learning rate; not `num_steps`, which a
        run trained on for longer changes), warns once, naming each setting and both values.
        Injected values that this Checkpointer's last restore was told to set
        (`hyperparams={...}`, or all of them with `hyperparams="target"`) are changed on purpose
        and not named.

        A signal that already stopped a run (`should_stop` returned `True`) is forgotten here, so
        a run started again with this Checkpointer (in a notebook, say) trains on and stops at
        the next signal; one received before the run started still stops it. (On a multi-process
        run, JAX's preemption service agrees on one step per process lifetime: there a signal
        does not stop a later run with this Checkpointer, and a second SIGINT raises
        `KeyboardInterrupt`.) On a
        multi-process run it also tells that service the step training starts from.

        **Raises:** `CheckpointError` if `run` is not JSON-able.
        """
        if self._stop_honoured:
            self._signals.forget()
            self._stop_honoured = False
        self._signals.start_at(step)
        self._run = run_record(run)
        if step in self.all_steps():
            warn_changed_run(
                self._read_meta(step).get("run"), self._run, step=step, directory=self._directory,
                set_on_purpose=self._set_by_restore,
            )

    def should_stop(self) -> bool:
        """True once SIGTERM/SIGINT was received and the current step is saved and committed
        (this call waits for the commit). On a multi-process run: once the step every process
        agreed to stop at is saved and committed."""
        if self._signals.received is None or self._current_step is None or self._current_step != self._last_saved:
            return False
        self.wait()
        self._stop_honoured = True
        return True

    @property
    def stop_signal(self) -> int | None:
        """The signal number that asked training to stop, or `None` (again once the next run
        begins: `begin_run`). On a multi-process run it is set at the agreed step: the signal
        this process received, or SIGTERM (JAX's preemption notice) where it received none."""
        return self._signals.received

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, release orbax's resources and the signal handlers."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.wait_until_finished()
            self._progress.check(finished=True)
            self._manager.close()
        finally:
            if threading.current_thread() is threading.main_thread():
                self._signals.restore()
            OPEN.discard(self)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self._directory)!r}, save_every={self._save_every})"

    # ------------------------------------------------------------------ restoring

    def _read_meta(self, step: int) -> dict[str, Any]:
        return read_meta(self._reader, step)

    def meta(self, step: int | None = None) -> CheckpointMeta:
        """The metadata of `step` (default: the newest committed step), without reading arrays.

        Useful to build the restore target from the stored config:
        `abstract_state(ckpt.meta().config, optimizer)`.
        """
        step = pick_steps(self._directory, step, existed=self._existed)[0]
        return meta_object(self._read_meta(step))

    def restore(
        self,
        target: TrainState,
        *,
        step: int | None = None,
        shardings: ShardingSpec = None,
        allow_config_change: bool = False,
        allow_optimizer_change: bool = False,
        hyperparams: HyperparamsChoice = "saved",
    ) -> Restored:
        """Restore a step into the structure of `target`.

        **Arguments:**

        - `target`: a `TrainState` giving the structure, shapes, dtypes and non-array parts: a
          real one, or an abstract one from [`eqzoo.checkpoint.abstract_state`][] (no memory
          is allocated for it). The restored state keeps `target`'s trainable filter.
        - `step`: the step to restore; default the newest committed one.
        - `shardings`: where each array goes: a `jax.sharding.Mesh` (from
          [`eqzoo.sharding.make_mesh`][]: the layout [`eqzoo.sharding.shard_state`][] gives
          `target` there, by [`eqzoo.sharding.default_rules`][]), one `jax.sharding.Sharding` for
          all, or a callable `(name, target_leaf) -> Sharding`. Default: the target leaf's own sharding (a
          `jax.ShapeDtypeStruct(..., sharding=...)` or a real array's), else the first local
          device. Any mesh works, whatever the mesh at save time.
        - `allow_config_change`: restore even where the target's model config differs from the
          saved one in a field that changes what the weights mean (heads, rope, norms, ...; see
          [`eqzoo.checkpoint.RESTORE_MAY_CHANGE`][] for those that may always differ), or in a
          recorded non-array setting of its layers (a static `temp`, an `eps`; those that only
          say how it runs or trains, `backend`, `remat`, `scan`, `inference`, a dropout rate, may always differ). Shapes and dtypes are
          checked either way.
        - `allow_optimizer_change`: restore even where the target's optimizer differs from the
          saved run's in a way its arrays do not show: the types of its optax states and how
          they nest (`optax.adamw` saved, `optax.adam` restored: weight decay holds no state).
          The saved arrays (moments, counts) are restored into the target's optimizer.
          Hyperparameters that are not arrays (a weight decay rate) are not recorded, and cannot
          be compared.
        - `hyperparams`: where the numeric hyperparameters of an `optax.inject_hyperparams`
          optimizer (arrays of its state) come from. `"saved"` (default): the checkpoint's, so the
          run goes on as it was; a real target holding other values gets a warning naming each.
          `"target"`: the target's, to train on with the values the code now passes (a learning
          rate changed on purpose); needs a real target (`TrainState.create`), not an abstract
          one. A dict, `{"learning_rate": 1e-4}`: the saved ones, with those it names set to its
          values (cast to the stored dtype, placed as the restored arrays are), from a real or
          an abstract target alike: a fine-tune resumed with a new learning rate. A name is the
          hyperparameter's (`"learning_rate"`), or its path (`"opt_state.1.hyperparams.learning_rate"`)
          where two injected states share it. Scheduled hyperparameters follow the optimizer's
          schedule whichever you choose, and cannot be set.

        **Returns:** [`eqzoo.checkpoint.Restored`][] `(state, data_state, meta)`; pass
        `data_state` to the loader's `load_state_dict`.

        **Raises:** `CheckpointNotFoundError` (no committed step, or not that step),
        `CheckpointMismatchError` (the arrays do not fit `target`, listing each path; or the
        target's model config or non-array settings differ from the saved ones, listing each; or
        its optimizer state is built of other optax states, naming both),
        `CheckpointCorruptError` (integrity check failed; with `fallback_to_intact` the newest
        intact older step is restored instead, with a warning), `CheckpointVersionError`;
        `CheckpointError` for a `hyperparams` dict naming what is not an unscheduled injected
        hyperparameter of the target (listing those it has), or a value that is not a number.
        On a multi-process run, where every process must call `restore`, a failure in one
        process raises in all: `CheckpointCorruptError` where any found damage, else the
        failing process's own error there and a `CheckpointError` naming it in the others.
        """
        if not isinstance(target, TrainState):
            raise CheckpointError(
                f"Checkpointer.restore needs a TrainState target (real or from abstract_state); got {type(target).__name__}."
            )
        chosen = check_choice(hyperparams, target, state_names(target))
        # Steps moved out of the directory by hand since (a damaged one, as the error below
        # suggests) must leave the manager's list too, or saving that step again fails. A save
        # still being written is waited for first: reload lists the steps on disk only.
        self.wait()
        self._manager.reload()
        if isinstance(shardings, jax.sharding.Mesh):  # callable (a context manager): resolve it first
            from ..sharding import tree_shardings  # here: eqzoo.sharding imports eqzoo.train

            by_name = dict(zip(state_names(target), tree_shardings(target, shardings).arrays, strict=True))
            shardings = lambda name, leaf: by_name[name]  # noqa: E731
        candidates = pick_steps(self._directory, step, existed=self._existed)
        if step is not None or not self._fallback:
            candidates = candidates[:1]
        corrupt: list[CheckpointCorruptError] = []
        for s in candidates:
            try:
                restored = restore_step(
                    self._reader, target, s, shardings, self._stored_config(target),
                    allow_config_change, chosen, allow_optimizer_change,
                )
            except CheckpointCorruptError as err:
                corrupt.append(err)
                continue
            if corrupt:
                moved = [quarantine(self._manager, self._directory, err.step) for err in corrupt]
                warnings.warn(
                    f"restored step {s}, the newest intact step, because step(s) "
                    f"{[err.step for err in corrupt]} are damaged (moved aside to {moved}):\n"
                    + "\n".join(str(err) for err in corrupt),
                    stacklevel=user_stacklevel(),
                )
            self._restored_step = s
            self._set_by_restore = set_names(chosen, target)
            self._signals.start_at(s)
            return restored
        if len(corrupt) == 1:
            err = corrupt[0]
            older = [s for s in self.all_steps() if s < err.step]
            if older and step is None:  # say how to go on from an earlier step
                raise CheckpointCorruptError(
                    f"{err}\nEarlier committed steps: {older}. To resume from the newest intact one, "
                    "construct the Checkpointer with fallback_to_intact=True (it moves the damaged "
                    f"step aside to corrupt-{err.step}-<time>/), or move {self._directory / str(err.step)} "
                    f"out of {self._directory} yourself.",
                    step=err.step, parameters=err.parameters,
                ) from err
            raise err
        raise CheckpointCorruptError(
            f"every committed step in {self._directory} is damaged:\n" + "\n".join(str(e) for e in corrupt),
            step=corrupt[0].step,
            parameters=corrupt[0].parameters,
        ) from corrupt[0]

    def _stored_config(self, state: TrainState) -> Any:
        """The config `save` stores for `state` unless given one: the constructor's, else the
        model's own."""
        return self._config if self._config is not None else model_config(getattr(state.structure.static, "model", None))
