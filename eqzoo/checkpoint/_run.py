"""What `fit` records of a run in each step it saves (`CheckpointMeta.run`), and the warnings of
a run that trains on from a step with other settings or from an older step."""

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import user_stacklevel
from ._errors import CheckpointError, list_items


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def run_differences(saved: Any, now: Mapping[str, Any]) -> list[str]:
    """`"setting: saved X, now Y"` for each setting of [`eqzoo.train.fit`][]'s run record
    (`num_steps`, `batch...`, `run_config...`, `hyperparams...`, nested keys joined by dots)
    that differs."""
    if not isinstance(saved, dict):
        return []
    a, b = _flat(saved, ""), _flat(json.loads(json.dumps(dict(now))), "")
    return [
        f"{k}: saved {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if not _same(a.get(k, "<absent>"), b.get(k, "<absent>"))
    ]


def _same(x: Any, y: Any) -> bool:
    """Equal, a NaN setting (`run_config={"clip": float("nan")}`) equal to itself."""
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))


def run_record(run: Mapping[str, Any]) -> dict[str, Any]:
    """`run` as JSON reads it back; raises `CheckpointError` if it is not JSON-able."""
    try:
        return json.loads(json.dumps(dict(run)))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"fit's run record (its run_config) must be JSON-able: {err}") from err


def warn_changed_run(
    saved: Any, run: dict[str, Any], *, step: int, directory: Path, set_on_purpose: frozenset[str] = frozenset()
) -> None:
    """Warn once, naming each setting and both values, when the run record `saved` of the
    committed `step` differs from `run` (other than in `num_steps`, and in the injected
    hyperparameters named in `set_on_purpose`, which a restore was told to set)."""
    if isinstance(saved, dict) and "hyperparams" not in saved:
        # saved by an eqzoo that did not record injected values: nothing to compare them with
        run = {k: v for k, v in run.items() if k != "hyperparams"}
    # num_steps is recorded but not compared: training on for longer is the usual resume
    skip = ("num_steps:", *(f"hyperparams.{name}:" for name in set_on_purpose))
    differ = [d for d in run_differences(saved, run) if not d.startswith(skip)]
    if differ:
        warnings.warn(
            f"training goes on from step {step} of {directory} with other settings than the run "
            f"that saved it ({len(differ)} changed):\n" + list_items(differ)
            + "\nThe run goes on as now set up and records the new settings with its next saves "
            "(an optax.inject_hyperparams optimizer trains with the values its state holds, the "
            "`hyperparams.` lines: the saved ones unless restored with Checkpointer.restore(..., "
            "hyperparams='target') or hyperparams={'learning_rate': ...}); if that is not meant, "
            "restart with the saved ones (Checkpointer.meta(step).run holds them).",
            stacklevel=user_stacklevel(),
        )


def warn_newer_steps(restored_step: int, steps: list[int], directory: Path) -> None:
    """Warn when training goes on from `restored_step` while `directory` holds newer `steps`."""
    # Training on from an older step than the newest committed one (restore(step=...)): its
    # first save of a step that is already committed raises, perhaps hours from now.
    newer = [s for s in steps if s > restored_step]
    if newer:
        warnings.warn(
            f"training goes on from step {restored_step}, but {directory} already holds the "
            f"newer committed step(s) {newer}; saving any of them again raises CheckpointError. To "
            "branch from this step, move the newer steps out of the directory (or save into another "
            "directory) before training.",
            stacklevel=user_stacklevel(),
        )
