"""Run every script in examples/ in --smoke mode, each in its own process; fail if any fails.

Each example must print one JSON summary line last; this checks that it parses. With
`--skip-tested`, the examples whose `main` the test suite already runs in-process with the
same flags (and checks their figures) are left out: `make test` runs them once, not twice.
"""

import argparse
import sys

from _run_scripts import ROOT, run_scripts

# Examples the test suite runs in-process through their `main(["--smoke", "--json", ...])`
# (tests/examples, tests/sciml/test_pinn.py, tests/bayes/test_inference.py);
# tests/test_benchmark_scripts.py checks each is. The main job, train_char_gpt, also runs here
# as its own process, as the README runs it.
RUN_IN_TESTS = frozenset({
    "bayesian_regression", "char_moe", "digits_cnn", "digits_diffusion", "digits_vit", "finetune_lora",
    "pinn_poisson",
})

# CPU seconds of each `--smoke --json` run, one at a time on the shared 2-core machine: the
# costliest start first (`_run_scripts.longest_first`), so with `--jobs 2` no long example
# runs alone at the end. Only the order depends on these; a missing example counts as 10 s.
COSTS = {
    "bayesian_digits": 31.0, "neural_ode": 25.0, "neural_cde": 23.5, "sharded_training": 20.5,
    "train_char_gpt": 17.0, "hf_generate": 13.0,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="pass --smoke to every example")
    parser.add_argument("--skip-tested", action="store_true", help="leave out RUN_IN_TESTS")
    parser.add_argument("--jobs", type=int, default=1, help="examples run at the same time")
    parser.add_argument("names", nargs="*", help="only these examples (file stems)")
    args = parser.parse_args()
    scripts = sorted((ROOT / "examples").glob("*.py"))
    if args.names:
        scripts = [s for s in scripts if s.stem in args.names]
    if args.skip_tested:
        scripts = [s for s in scripts if s.stem not in RUN_IN_TESTS]
    flags = ["--json"] + (["--smoke"] if args.smoke else [])
    return run_scripts(scripts, flags, noun="examples", jobs=args.jobs, costs=COSTS)


if __name__ == "__main__":
    sys.exit(main())
