"""First-build time of `eqzoo.models.create`: eager (`jit=False`) against one compiled program.

For each preset it measures, each mode in a fresh process (so neither inherits the other's
compiled programs), the first build's wall and CPU seconds and how many XLA compilations it
ran, then a warm second build with another key; for the compiled mode also a build of a variant
that differs only in an init-free field (`remat`, or the attention backend), which must reuse
the program, and whether the arrays equal the eager build's bit for bit.

    python benchmarks/create_time.py --json                       # the tiny presets, gpt2-124m
    python benchmarks/create_time.py --json tiny-gpt2 tiny-unet
    python benchmarks/create_time.py --smoke --json               # mlp-small, in this process

Prints one JSON line per preset, then one summary line (totals, all bit-identical or not).
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

DEFAULT_PRESETS = [
    "tiny-gpt2", "tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-vit", "tiny-dit", "tiny-unet", "cnn-digits",
    "mlp-small", "gpt2-124m",
]


class _Compiles(logging.Handler):
    """Counts the "Compiling ..." records `jax.log_compiles` emits, one per XLA compilation."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record):
        self.count += record.getMessage().startswith("Compiling ")


def _timed(build) -> tuple[object, float, float]:
    import jax

    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(build())
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _variant(config) -> dict:
    """An init-free change of `config` (a remat policy or attention backend), or none."""
    for field, value in (("remat", "full"), ("attention_backend", "xla")):
        if hasattr(config, field) and getattr(config, field) != value:
            return {field: value}
    return {}


def measure(preset: str, mode: str, overrides: dict) -> dict:
    """One mode ("eager" or "compiled") of one preset, in this process."""
    import equinox as eqx
    import jax
    import numpy as np

    from eqzoo import models

    jit = mode == "compiled"
    counter = _Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # count, do not print
    with jax.log_compiles(True):
        first, wall, cpu = _timed(lambda: models.create(preset, key=jax.random.key(0), jit=jit, **overrides))
        compiles = counter.count
        _, warm, _ = _timed(lambda: models.create(preset, key=jax.random.key(1), jit=jit, **overrides))
        row = {f"{mode}_first_s": round(wall, 3), f"{mode}_first_cpu_s": round(cpu, 3),
               f"{mode}_compiles": compiles, f"{mode}_warm_s": round(warm, 4)}
        variant = _variant(models.get_config(preset, **overrides))
        if jit and variant:
            before = counter.count
            _, seconds, _ = _timed(lambda: models.create(preset, key=jax.random.key(0), jit=True, **overrides, **variant))
            row["variant"] = variant
            row["variant_s"] = round(seconds, 4)
            row["variant_compiles"] = counter.count - before
    logger.removeHandler(counter)
    if jit:
        eager = models.create(preset, key=jax.random.key(0), jit=False, **overrides)
        pairs = zip(jax.tree.leaves(eqx.filter(first, eqx.is_array)), jax.tree.leaves(eqx.filter(eager, eqx.is_array)), strict=True)
        row["bit_identical"] = all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in pairs)
    return row


def _in_child(preset: str, mode: str, overrides: dict) -> dict:
    args = [sys.executable, __file__, "--child", mode, "--set", json.dumps(overrides), preset]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{preset} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", help=f"presets to build (default: {' '.join(DEFAULT_PRESETS)})")
    parser.add_argument("--smoke", action="store_true", help="mlp-small at width 16, both modes in this process")
    parser.add_argument("--json", action="store_true", help="one JSON line per preset and a summary line (the default output)")
    parser.add_argument("--set", default="{}", help="config overrides as a JSON object, e.g. '{\"num_layers\": 4}'")
    parser.add_argument("--child", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = json.loads(args.set)
    if args.child:
        print(json.dumps(measure(args.presets[0], args.child, overrides)))
        return
    presets = args.presets or DEFAULT_PRESETS
    if args.smoke:
        presets, overrides = ["mlp-small"], {"width": 16, **overrides}
    rows = []
    for preset in presets:
        row = {"preset": preset, **({"overrides": overrides} if overrides else {})}
        for mode in ("eager", "compiled"):
            row.update(measure(preset, mode, overrides) if args.smoke else _in_child(preset, mode, overrides))
        row["first_build_speedup"] = round(row["eager_first_s"] / row["compiled_first_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({
        "presets": len(rows),
        "eager_first_s": round(sum(r["eager_first_s"] for r in rows), 2),
        "compiled_first_s": round(sum(r["compiled_first_s"] for r in rows), 2),
        "eager_compiles": sum(r["eager_compiles"] for r in rows),
        "compiled_compiles": sum(r["compiled_compiles"] for r in rows),
        "all_bit_identical": all(r["bit_identical"] for r in rows),
        "in_process": args.smoke,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }))


if __name__ == "__main__":
    main()
