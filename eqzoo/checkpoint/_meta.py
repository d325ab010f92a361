"""A step's JSON metadata: what it holds, how it is checked, and how a target is checked
against it."""

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ..train import TrainState
from ._config import config_to_dict, decode_config
from ._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    list_items,
)
from ._integrity import crc_ok, with_crc
from ._tree import spec_str

FORMAT_VERSION = 1
"""The checkpoint format this eqzoo writes (stored in every step's metadata). Steps written in
a newer format are refused with `CheckpointVersionError`."""

_FORMAT = "eqzoo.checkpoint"


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a step's JSON metadata holds.

    **Attributes:** `step`; `format_version`; `eqzoo_version` (that wrote it); `config` (the
    model config, rebuilt as its dataclass, or `None`); `data_state` (the loader's `state_dict()`,
    or `None`); `metadata` (the user dict passed to `save`); `arrays` (`{name: {"shape",
    "dtype"}}` for every stored array).
    """

    step: int
    format_version: int
    eqzoo_version: str
    config: Any
    data_state: Any
    metadata: dict[str, Any]
    arrays: dict[str, dict[str, Any]]


class Restored(NamedTuple):
    """What [`eqzoo.checkpoint.Checkpointer.restore`][] returns: `state, data_state, meta`."""

    state: TrainState
    data_state: Any
    meta: CheckpointMeta


def build_meta(
    *,
    step: int,
    arrays: dict[str, dict[str, Any]],
    config: Any,
    data_state: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON metadata of a step, with its CRC-32; raises if something is not JSON-able."""
    from .. import __version__

    meta = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "eqzoo_version": __version__,
        "step": step,
        "config": None if config is None else config_to_dict(config),
        "data_state": None if data_state is None else dict(data_state),
        "metadata": dict(metadata or {}),
        "arrays": arrays,
    }
    try:
        meta = json.loads(json.dumps(meta))  # exactly what a reader will see
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata must be JSON-able (data_state, metadata, config): {err}") from err
    return with_crc(meta)


def validate_meta(meta: Any, *, step: int, where: str, path: Path) -> dict[str, Any]:
    """Check that `meta` is eqzoo metadata in a format this eqzoo reads, unaltered."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointCorruptError(
            f"{where}: {path} is not eqzoo checkpoint metadata.", step=step, parameters=("<metadata>",)
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{where} was written in eqzoo checkpoint format {version!r} (by eqzoo "
            f"{meta.get('eqzoo_version')}); this eqzoo reads formats up to {FORMAT_VERSION}. "
            "Upgrade eqzoo to restore it."
        )
    if not crc_ok(meta):
        raise CheckpointCorruptError(
            f"{where}: its metadata ({path}) fails its CRC-32 check; the file was altered after it "
            "was written.",
            step=step, parameters=("<metadata>",),
        )
    return meta


def meta_object(meta: dict[str, Any]) -> CheckpointMeta:
    """The validated metadata dict as a `CheckpointMeta` (the config rebuilt when possible)."""
    return CheckpointMeta(
        step=int(meta["step"]),
        format_version=int(meta["format_version"]),
        eqzoo_version=str(meta.get("eqzoo_version")),
        config=None if meta.get("config") is None else decode_config(meta["config"]),
        data_state=meta.get("data_state"),
        metadata=meta.get("metadata") or {},
        arrays=meta["arrays"],
    )


def check_fit(expected: dict[str, Any], found: dict[str, Any], *, where: str) -> None:
    """Raise `CheckpointMismatchError` listing every array that is missing, unexpected, or has
    another shape or dtype than the target expects."""
    missing = [f"{n}: expected {spec_str(expected[n])}, not in the checkpoint" for n in expected if n not in found]
    extra = [f"{n}: found {spec_str(found[n])}, not in the target" for n in found if n not in expected]
    differ = [
        f"{n}: expected {spec_str(expected[n])}, found {spec_str(found[n])}"
        for n in expected
        if n in found and (list(expected[n]["shape"]) != list(found[n]["shape"]) or expected[n]["dtype"] != found[n]["dtype"])
    ]
    problems = differ + missing + extra
    if problems:
        raise CheckpointMismatchError(
            f"{where} does not fit the restore target ({len(differ)} with another shape/dtype, "
            f"{len(missing)} missing, {len(extra)} unexpected):\n"
            + list_items(problems)
            + "\nBuild the target from the same model config and optimizer as the saved run "
            "(Checkpointer.meta(step).config holds the saved config)."
        )
