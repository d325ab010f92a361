"""Durable commits: a step's files and directories reach stable storage before orbax renames the
step into place, and the rename itself right after, so a power cut cannot leave a listed step
whose contents are lost.

Orbax writes a step into `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/`. TensorStore
fsyncs the array files it writes, but orbax syncs neither its own JSON files, nor eqzoo's
checksum manifest, nor any directory, nor the rename: the kernel may write the rename to disk
before the files it names, and after a power cut the newest step can come back listed but
empty or truncated. `DurableRename` is the temporary-path class the `Checkpointer` gives orbax:
its `finalize` (run by process 0 alone, after every process has written its files and the
manifest is written) fsyncs every file and directory under the temporary directory, lets orbax
write its two commit records and rename, then fsyncs those records, the step directory and the
parent directory.
"""

import asyncio
import concurrent.futures
import os
from pathlib import Path

import orbax.checkpoint as ocp

_SYNC_THREADS = 32


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes the names in it durable)."""
    if path.is_dir():
        if os.name == "nt":  # Windows cannot open a directory to sync it; NTFS journals names
            return
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    else:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, `root` included."""
    paths: list[Path] = []
    for here, _, names in os.walk(root):
        paths.append(Path(here))
        paths.extend(Path(here) / name for name in names)
    # All at once, from many threads: each fsync waits on the disk, not a core, and the file
    # system commits concurrent fsyncs together (ext4 and XFS share one journal commit among
    # them), where one after another each pays its own cache flush. Order does not matter:
    # all of them finish before the rename.
    with concurrent.futures.ThreadPoolExecutor(min(_SYNC_THREADS, max(1, len(paths)))) as pool:
        list(pool.map(fsync_path, paths))


def sync_committed(step_dir: Path) -> None:
    """After the rename: fsync the files orbax wrote at commit time (the files directly in
    `step_dir`), `step_dir`, and its parent, which holds the renamed entry (together, as above)."""
    paths = [p for p in step_dir.iterdir() if p.is_file()] + [step_dir, step_dir.parent]
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        list(pool.map(fsync_path, paths))


class DurableRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's rename-into-place commit, with the fsyncs that make a committed step survive a
    power cut: everything written into the temporary directory is synced before the rename, and
    the rename (the parent directory) right after it, before orbax's retention deletes older
    steps and before the save is reported finished."""

    async def finalize(self) -> None:
        await asyncio.to_thread(sync_tree, Path(str(self.get())))
        # Orbax now writes the commit timestamp into its step metadata file and commit_success.txt
        # (neither is read by a restore), then renames.
        await super().finalize()
        await asyncio.to_thread(sync_committed, Path(str(self.get_final())))
