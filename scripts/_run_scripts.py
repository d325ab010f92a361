"""Shared by `run_examples.py` and `run_benchmarks.py`: run scripts one process each, check them.

A script passes when it exits 0 and its last non-empty stdout line parses as JSON.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def last_line_is_json(stdout: str) -> bool:
    """Whether the last non-empty line of `stdout` parses as JSON."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    try:
        json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return False
    return True


def run_scripts(
    scripts: list[Path], flags: list[str], *, noun: str, timeout: float | None = None
) -> int:
    """Runs `python SCRIPT *flags` for each script from the repository root, in order.

    Prints `ok  ` / `FAIL` with the wall time per script (and a failure's output tails), then
    `N passed, N failed`. A script still running after `timeout` seconds is killed and fails.

    **Returns:**

    The exit status for the caller: 0 if every script passed, 1 otherwise (or if there were none).
    """
    if not scripts:
        print(f"no {noun} found", file=sys.stderr)
        return 1
    failed = []
    for script in scripts:
        cmd = [sys.executable, str(script), *flags]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(cmd, None, _text(e.stdout), _text(e.stderr))
            print(f"{script.name}: timed out after {timeout:.0f}s")
        took = time.perf_counter() - start
        ok = proc.returncode == 0
        if ok and not last_line_is_json(proc.stdout):
            ok = False
            print(f"{script.name}: last stdout line is not a JSON summary")
        print(f"{'ok  ' if ok else 'FAIL'} {script.name} ({took:.1f}s)")
        if not ok:
            failed.append(script.name)
            print(proc.stdout[-4000:])
            print(proc.stderr[-4000:], file=sys.stderr)
    print(f"{len(scripts) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _text(out: str | bytes | None) -> str:
    # TimeoutExpired keeps whatever output had arrived, as bytes even when text=True was asked.
    if isinstance(out, bytes):
        return out.decode(errors="replace")
    return out or ""
