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

# Seconds each `--smoke --json` run took in `make test` on a fresh clone (two at a time on the
# 2-core machine, with the suite's XLA settings, `_run_scripts.fast_compile_env`): the costliest
# start first (`_run_scripts.longest_first`), so with `--jobs 2` no long benchmark runs alone at
# the end (alphabetically, train_throughput started last). Only the order depends on these; a
# missing benchmark counts as 10 s.
COSTS = {
    "bayes_overhead": 34.7, "sciml_overhead": 23.1, "dispatch_overhead": 21.0, "qat_int4": 18.3,
    "gpu_suite": 14.9, "speculative_decoding": 14.5, "compile_time": 12.6, "train_throughput": 11.6,
    "image_throughput": 10.9, "collective_bytes": 10.6, "memory_estimate": 10.3, "generate_throughput": 10.1,
    "quant_products": 9.6, "continuous_batching": 7.7, "eager_calls": 5.3, "equinox_baseline": 5.2,
    "torch_baseline": 4.4, "create_time": 3.7, "checkpoint_io": 3.6, "checkpoint_durable": 3.0, "packing_fill": 1.8,
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
