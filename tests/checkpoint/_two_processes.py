"""Start the two processes of a 2-process CPU run (jax.distributed on localhost) of a worker
script, and collect their JSON summaries with a deadline (used by test_multihost_*.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(worker: Path, *args: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of `python worker *args`, joined through a coordinator on a free port."""
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(worker), *args],
            env={**os.environ, "JAX_PLATFORMS": "cpu", "COORDINATOR_ADDRESS": f"localhost:{port}",
                 "NUM_PROCESSES": "2", "PROCESS_ID": str(pid)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for pid in range(2)
    ]


def finish(runs: dict[str, list[subprocess.Popen]], deadline_s: float) -> dict[str, list[dict]]:
    """Each run's two JSON summaries (the last stdout line of each process); every process still
    running `deadline_s` after this call is killed, and the test fails naming the runs that hung."""
    deadline = time.monotonic() + deadline_s
    hung, outs = [], {}
    for plan, procs in runs.items():
        outs[plan] = []
        for proc in procs:
            try:
                stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                hung.append(plan)
                proc.send_signal(signal.SIGKILL)  # SIGTERM would be caught
                proc.communicate()
                continue
            assert proc.returncode == 0, f"{plan}: {stderr[-3000:]}"
            outs[plan].append(json.loads(stdout.strip().splitlines()[-1]))
    assert not hung, f"processes of run(s) {sorted(set(hung))} were still running after {deadline_s} s (a deadlock)"
    return outs
