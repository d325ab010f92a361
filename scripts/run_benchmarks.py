"""Run every script in benchmarks/ with --smoke --json, each in its own process; fail if any fails.

A CPU regression guard: each benchmark runs at tiny sizes, must exit 0 and must print one JSON
line last (this checks that it parses). The figures themselves are not checked; files starting
with `_` are skipped. They compile with the test suite's fast-compiling XLA:CPU settings
(`_run_scripts.fast_compile_env`).
"""

import argparse
import os
import sys

from _run_scripts import ROOT, fast_compile_env, run_scripts

# CPU seconds of each `--smoke --json` run at -O0, one at a time on the shared 2-core machine:
# the costliest start first (`_run_scripts.longest_first`), so with `--jobs 2` no long benchmark
# runs alone at the end (alphabetically, train_throughput started last). Only the order
# depends on these; a missing benchmark counts as 10 s.
COSTS = {
    "bayes_overhead": 38.0, "dispatch_overhead": 25.0, "compile_time": 23.5, "gpu_suite": 21.0,
    "sciml_overhead": 19.0, "image_throughput": 19.0, "qat_int4": 18.5, "memory_estimate": 15.5,
    "generate_throughput": 14.0, "speculative_decoding": 14.0, "train_throughput": 13.0,
    "collective_bytes": 12.5, "create_time": 12.0, "quant_products": 8.5, "continuous_batching": 7.5,
    "equinox_baseline": 6.5, "torch_baseline": 5.5, "checkpoint_io": 2.5, "packing_fill": 1.0,
}


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
    return run_scripts(scripts, ["--smoke", "--json"], noun="benchmarks", timeout=args.timeout, jobs=args.jobs,
                       costs=COSTS, env=fast_compile_env(os.environ))


if __name__ == "__main__":
    sys.exit(main())
