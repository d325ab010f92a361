"""Durable commits: every file and directory of a committed step, and the rename in the parent
directory, are fsynced before the step is listed and before retention deletes an older step.

A power cut cannot be staged here, so the tests watch the mechanism: the real `os.fsync`, wrapped
to record which path each call synced (the call itself still made), during real saves through
orbax."""

import os
import threading
from pathlib import Path

import pytest

TMP = ".orbax-checkpoint-tmp"
# Orbax writes these two at commit time, after eqzoo's pre-rename sync; they are synced right
# after the rename instead (a restore does not read them).
LATE = {"_CHECKPOINT_METADATA", "commit_success.txt"}


def _record_fsyncs(monkeypatch, on_call=None):
    """Wrap `os.fsync` to record the path each call syncs (read from Linux's /proc), call
    `on_call(path)`, then make the real call."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd):
        path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        calls.append(path)
        if on_call is not None:
            on_call(path)
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def _tree(root: Path) -> list[str]:
    """Every file and directory under `root`, relative to it ("." for `root`)."""
    found = ["."]
    for here, dirs, files in os.walk(root):
        found += [os.path.relpath(Path(here) / n, root) for n in dirs + files]
    return found


@pytest.mark.parametrize("async_save", [False, True])
def test_committed_step_synced_before_listed_and_before_retention(async_save, ckpt_dir, open_checkpointer, state_factory, monkeypatch):
    state = state_factory()
    ckpt = open_checkpointer(ckpt_dir, keep_last=1, async_save=async_save)
    ckpt.save(state, step=1)
    ckpt.wait()
    parent = str(ckpt_dir.absolute())
    # What is true at the instant the parent directory (holding the rename of step 2) is synced.
    at_parent_sync: list[tuple[bool, list[int], bool]] = []

    def on_call(path):
        if path == parent:
            at_parent_sync.append(
                ((ckpt_dir / "2").is_dir(), ckpt.all_steps(), (ckpt_dir / "1").is_dir())
            )

    calls = _record_fsyncs(monkeypatch, on_call)
    ckpt.save(state, step=2)
    ckpt.wait()
    assert ckpt.all_steps() == [2]

    step_dir = ckpt_dir.absolute() / "2"
    tmp_dir = ckpt_dir.absolute() / f"2{TMP}"
    # Nested item directories are themselves renamed from `<item>.orbax-checkpoint-tmp` before
    # the step is; by the time the step's sync runs they have their final names.
    before_rename = {os.path.relpath(p, tmp_dir) for p in calls if p == str(tmp_dir) or p.startswith(str(tmp_dir) + "/")}
    after_rename = {os.path.relpath(p, step_dir) for p in calls if p == str(step_dir) or p.startswith(str(step_dir) + "/")}
    missing = [rel for rel in _tree(step_dir) if rel not in before_rename and rel not in LATE]
    assert not missing, f"not fsynced before the rename: {missing}"
    assert LATE <= after_rename and "." in after_rename
    # The rename is synced (the parent directory) after it happened, while step 1 (which
    # retention then deletes) still existed and before step 2 was listed as committed.
    assert at_parent_sync == [(True, [1], True)]


def test_async_step_not_listed_until_synced(ckpt_dir, open_checkpointer, state_factory, monkeypatch):
    """A background save is not listed by `all_steps` in the instant between its rename and the
    sync of that rename; `wait()` then lists it."""
    state = state_factory()
    ckpt = open_checkpointer(ckpt_dir, async_save=True)
    step_dir = str(ckpt_dir.absolute() / "3")
    seen: list[tuple[bool, list[int]]] = []

    def on_call(path):
        if path == step_dir and threading.current_thread() is not threading.main_thread():
            seen.append((Path(step_dir).is_dir(), ckpt.all_steps()))

    _record_fsyncs(monkeypatch, on_call)
    ckpt.save(state, step=3)
    ckpt.wait()
    assert seen == [(True, [])]
    assert ckpt.all_steps() == [3]


def test_durable_false_syncs_nothing_of_its_own(ckpt_dir, open_checkpointer, state_factory, monkeypatch):
    state = state_factory()
    ckpt = open_checkpointer(ckpt_dir, async_save=False, durable=False)
    calls = _record_fsyncs(monkeypatch)
    ckpt.save(state, step=1)
    assert calls == []
    assert ckpt.all_steps() == [1]
