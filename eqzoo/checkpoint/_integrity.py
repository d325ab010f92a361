"""Integrity checks: a CRC-32 of every file a step's arrays were written to, taken before the
step is committed, and a CRC-32 inside the step's JSON metadata.

Orbax/TensorStore read a flipped byte inside a compressed or raw chunk back without complaint,
and a missing chunk reads as zeros; these checksums turn both into a `CheckpointCorruptError`
that names the step and the parameters whose files are damaged.
"""

import concurrent.futures
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from ._errors import CheckpointCorruptError, list_items

MANIFEST = "eqzoo_checksums.json"
_CHUNK = 8 << 20


def file_crc32(path: Path) -> tuple[int, int]:
    """`(size, crc32)` of a file, read in chunks (zlib releases the GIL on large buffers)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _map(fn, items: list[Any], *, share: float = 1.0) -> list[Any]:
    # `share` of the CPU cores (at most 8 threads): saves run beside training and use half.
    workers = min(8, max(1, int((os.cpu_count() or 1) * share)), max(1, len(items)))
    if workers == 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def write_manifest(directory: Path) -> None:
    """Record the size and CRC-32 of every file under `directory` in `MANIFEST`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    sums = _map(file_crc32, files, share=0.5)
    manifest = {
        "algorithm": "crc32",
        "files": {p.relative_to(directory).as_posix(): [size, crc] for p, (size, crc) in zip(files, sums, strict=True)},
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)


def verify_manifest(directory: Path) -> list[tuple[str, str]] | None:
    """Check every file `MANIFEST` lists. **Returns:** `None` if the manifest itself is missing or
    unreadable, else a list of `(relative path, what is wrong)` (empty when all files match)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = {str(k): (int(v[0]), int(v[1])) for k, v in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None

    def check(item: tuple[str, tuple[int, int]]) -> tuple[str, str] | None:
        rel, (size, crc) = item
        path = directory / rel
        try:
            got_size, got_crc = file_crc32(path)
        except FileNotFoundError:
            return rel, "missing"
        except OSError as err:
            return rel, f"unreadable ({err.strerror})"
        if got_size != size:
            return rel, f"{got_size} bytes, expected {size} (truncated)" if got_size < size else f"{got_size} bytes, expected {size}"
        if got_crc != crc:
            return rel, "contents changed (CRC-32 mismatch)"
        return None

    return [bad for bad in _map(check, sorted(files.items())) if bad is not None]


class _NoOcdbtMergeNotice(logging.Filter):
    # Orbax's finalize always tries to merge OCDBT files and warns when there are none, which is
    # every save here (one zarr directory per array, by choice). Drop only that notice.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


_FILTER = _NoOcdbtMergeNotice()


class VerifiedPyTreeHandler(ocp.PyTreeCheckpointHandler):
    """Orbax's PyTree handler, plus a checksum manifest written in `finalize`: after every array
    file is written and before the step directory is renamed into place (so a committed step always
    has one). Orbax calls `finalize` on the primary process only, in the background thread for
    asynchronous saves."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        absl_logger = logging.getLogger("absl")
        if _FILTER not in absl_logger.filters:
            absl_logger.addFilter(_FILTER)

    def finalize(self, directory) -> None:
        super().finalize(directory)
        write_manifest(Path(str(directory)))


def with_crc(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` plus a `"crc32"` of its canonical JSON (so a flipped digit is caught on load)."""
    body = {k: v for k, v in meta.items() if k != "crc32"}
    return {**body, "crc32": zlib.crc32(json.dumps(body, sort_keys=True).encode())}


def crc_ok(meta: dict[str, Any]) -> bool:
    """Whether `meta["crc32"]` matches the rest of `meta`."""
    return isinstance(meta, dict) and meta.get("crc32") == with_crc(meta)["crc32"]


def check_step_files(state_dir: Path, stored_names: set[str], *, step: int, where: str) -> None:
    """Raise `CheckpointCorruptError` when the arrays of a step (`state_dir`) fail their checksum
    manifest, naming each damaged parameter (one of `stored_names`) or other file."""
    problems = verify_manifest(state_dir)
    if problems is None:
        raise CheckpointCorruptError(
            f"{where}: the checksum manifest {state_dir / MANIFEST} is missing or "
            "unreadable, so the arrays cannot be verified.",
            step=step, parameters=("<manifest>",),
        )
    if problems:
        affected = sorted({rel.split("/")[0] if rel.split("/")[0] in stored_names else f"<{rel}>" for rel, _ in problems})
        raise CheckpointCorruptError(
            f"{where} is corrupt; damaged parameter(s): {affected}.\n"
            + list_items([f"{rel}: {why}" for rel, why in problems]),
            step=step, parameters=tuple(affected),
        )
