"""Shared by `run_examples.py` and `run_benchmarks.py`: run scripts one process each, check them.

A script passes when it exits 0 and its last non-empty stdout line parses as JSON.
"""

import concurrent.futures
import json
import subprocess
import sys
import time
from collections.abc import Mapping
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


DEFAULT_COST = 10.0
"""Seconds assumed for a script missing from the caller's `costs`."""


def longest_first(scripts: list[Path], costs: Mapping[str, float]) -> list[Path]:
    """`scripts` in the order they start: the costliest first (`costs` by file stem, a script
    missing there counts as `DEFAULT_COST`), ties by name. With `jobs` workers, starting the
    long ones first keeps one long script from running alone at the end while the other
    workers idle."""
    return sorted(scripts, key=lambda s: (-costs.get(s.stem, DEFAULT_COST), s.name))


FAST_COMPILE_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}
"""The XLA:CPU settings the test suite (tests/conftest.py, through `fast_compile_env`) and the
benchmarks' smoke runs compile with (LLVM at -O0, the older LLVM emitters): tests/conftest.py's
comment gives the figures and the one known miscompile."""


def fast_compile_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` with the suite's fast-compiling XLA:CPU settings (`FAST_COMPILE_FLAGS`) added to
    `XLA_FLAGS`; a flag `base` already sets is kept as it is.

    The smoke runs' time is mostly compiling small programs, and their figures are not checked:
    at -O0 alone `bayes_overhead.py --smoke` took 41 s of CPU against 60 s, `image_throughput.py
    --smoke` 19 s against 34 s (back to back on the shared 2-core machine); the 18 benchmarks of
    the time 265 s against 412 s."""
    env = dict(base)
    flags = env.get("XLA_FLAGS", "")
    for name, value in FAST_COMPILE_FLAGS.items():
        if name not in flags:
            flags = f"{flags} {name}={value}".strip()
    env["XLA_FLAGS"] = flags
    return env


def run_scripts(
    scripts: list[Path], flags: list[str], *, noun: str, timeout: float | None = None, jobs: int = 1,
    costs: Mapping[str, float] | None = None, env: Mapping[str, str] | None = None,
) -> int:
    """Runs `python SCRIPT *flags` for each script from the repository root, `jobs` at a time,
    the costliest first by `costs` (seconds by file stem; `longest_first`), in the environment
    `env` (default: this process's).

    Prints `ok  ` / `FAIL` with the wall time per script as each finishes (and a failure's
    output tails), then `N passed, N failed`. A script still running after `timeout` seconds is
    killed and fails. The scripts are independent processes; on CI's two cores two at a time
    take about half the wall time of one at a time (compiling is single-threaded).

    **Returns:**

    The exit status for the caller: 0 if every script passed, 1 otherwise (or if there were none).
    """
    if not scripts:
        print(f"no {noun} found", file=sys.stderr)
        return 1
    failed = []
    scripts = longest_first(scripts, costs or {})

    def run(script: Path) -> tuple[Path, subprocess.CompletedProcess, float, bool]:
        cmd = [sys.executable, str(script), *flags]
        start = time.perf_counter()
        timed_out = False
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  env=None if env is None else dict(env))
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(cmd, None, _text(e.stdout), _text(e.stderr))
            timed_out = True
        return script, proc, time.perf_counter() - start, timed_out

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in concurrent.futures.as_completed([pool.submit(run, s) for s in scripts]):
            script, proc, took, timed_out = future.result()
            if timed_out:
                print(f"{script.name}: timed out after {timeout:.0f}s")
            ok = proc.returncode == 0
            if ok and not last_line_is_json(proc.stdout):
                ok = False
                print(f"{script.name}: last stdout line is not a JSON summary")
            print(f"{'ok  ' if ok else 'FAIL'} {script.name} ({took:.1f}s)", flush=True)
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
