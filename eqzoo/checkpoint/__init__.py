"""Checkpoints: whole training states over orbax (async, atomic, keep-N, any mesh, verified),
weights-only safetensors files, and a parameter fingerprint."""

from ._abstract import abstract_state as abstract_state
from ._checkpointer import Checkpointer as Checkpointer
from ._config import config_from_dict as config_from_dict, config_to_dict as config_to_dict
from ._errors import (
    CheckpointCorruptError as CheckpointCorruptError,
    CheckpointError as CheckpointError,
    CheckpointMismatchError as CheckpointMismatchError,
    CheckpointNotFoundError as CheckpointNotFoundError,
    CheckpointVersionError as CheckpointVersionError,
)
from ._meta import (
    FORMAT_VERSION as FORMAT_VERSION,
    RESTORE_MAY_CHANGE as RESTORE_MAY_CHANGE,
    CheckpointMeta as CheckpointMeta,
    Restored as Restored,
)
from ._weights import (
    load_weights as load_weights,
    params_sha256 as params_sha256,
    save_weights as save_weights,
)

__all__ = [
    "FORMAT_VERSION",
    "RESTORE_MAY_CHANGE",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMeta",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointVersionError",
    "Checkpointer",
    "Restored",
    "abstract_state",
    "config_from_dict",
    "config_to_dict",
    "load_weights",
    "params_sha256",
    "save_weights",
]
