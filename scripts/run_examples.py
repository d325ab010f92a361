"""Run every script in examples/ in --smoke mode, each in its own process; fail if any fails.

Each example must print one JSON summary line last; this checks that it parses.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="pass --smoke to every example")
    parser.add_argument("names", nargs="*", help="only these examples (file stems)")
    args = parser.parse_args()
    scripts = sorted((ROOT / "examples").glob("*.py"))
    if args.names:
        scripts = [s for s in scripts if s.stem in args.names]
    if not scripts:
        print("no examples found", file=sys.stderr)
        return 1
    failed = []
    for script in scripts:
        cmd = [sys.executable, str(script), "--json"] + (["--smoke"] if args.smoke else [])
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        took = time.perf_counter() - start
        ok = proc.returncode == 0
        if ok:
            lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
            try:
                json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                ok = False
                print(f"{script.name}: last stdout line is not a JSON summary")
        print(f"{'ok  ' if ok else 'FAIL'} {script.name} ({took:.1f}s)")
        if not ok:
            failed.append(script.name)
            print(proc.stdout[-4000:])
            print(proc.stderr[-4000:], file=sys.stderr)
    print(f"{len(scripts) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
