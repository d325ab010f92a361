"""Run every script in benchmarks/ with --smoke --json, each in its own process; fail if any fails.

A CPU regression guard: each benchmark runs at tiny sizes, must exit 0 and must print one JSON
line last (this checks that it parses). The figures themselves are not checked; files starting
with `_` are skipped.
"""

import argparse
import sys

from _run_scripts import ROOT, run_scripts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="only these benchmarks (file stems)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before a benchmark is killed and counted as failed")
    parser.add_argument("--jobs", type=int, default=1,
                        help="benchmarks run at the same time (their smoke figures are not checked)")
    args = parser.parse_args()
    scripts = sorted(s for s in (ROOT / "benchmarks").glob("*.py") if not s.name.startswith("_"))
    if args.names:
        scripts = [s for s in scripts if s.stem in args.names]
    return run_scripts(scripts, ["--smoke", "--json"], noun="benchmarks", timeout=args.timeout, jobs=args.jobs)


if __name__ == "__main__":
    sys.exit(main())
