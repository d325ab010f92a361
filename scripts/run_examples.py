"""Run every script in examples/ in --smoke mode, each in its own process; fail if any fails.

Each example must print one JSON summary line last; this checks that it parses.
"""

import argparse
import sys

from _run_scripts import ROOT, run_scripts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="pass --smoke to every example")
    parser.add_argument("names", nargs="*", help="only these examples (file stems)")
    args = parser.parse_args()
    scripts = sorted((ROOT / "examples").glob("*.py"))
    if args.names:
        scripts = [s for s in scripts if s.stem in args.names]
    flags = ["--json"] + (["--smoke"] if args.smoke else [])
    return run_scripts(scripts, flags, noun="examples")


if __name__ == "__main__":
    sys.exit(main())
