"""Train-step compile time against depth, scanned vs unrolled layers; and remat memory/speed.

For GPT-2 shapes (embed 256, 4 heads, vocab 1024, seq 128 by default) at 12, 24 and 48 layers,
with the layers run by `lax.scan` (`scan_layers=True`) and unrolled (`False`), it times
`make_train_step(...).lower(state, batch)` and `.compile()` on abstract arrays (nothing is
allocated). Scanning compiles one layer whatever the depth, so its compile time should stay
flat: the target is `scan_ratio_deep_vs_shallow` (48 vs 12 layers) <= 1.3.

The `remat` section compiles and runs one small config under every remat policy and reports
XLA's memory analysis of the compiled step (`temp_bytes` is the scratch memory, dominated by
the activations kept for the backward pass) and the measured step time.

    python benchmarks/compile_time.py --json
    python benchmarks/compile_time.py --smoke --json
    python benchmarks/compile_time.py --json --mesh data=2,fsdp=2,tensor=2   # sharded, 8 CPU devices

Prints one JSON line with `--json`.
"""

import argparse
import json
import math
import os
import platform
import time

import jax

jax.config.update("jax_num_cpu_devices", int(os.environ.get("EQZOO_CPU_DEVICES", "8")))

import equinox as eqx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import eqzoo  # noqa: E402
from eqzoo import sharding as sh  # noqa: E402
from eqzoo.train import TrainState, lm_loss, make_train_step  # noqa: E402

OPTIMIZER = optax.sgd(1e-3)  # the optimizer barely matters for compile time


def _abstract(config, batch_size, seq_len, mesh):
    state = eqx.filter_eval_shape(
        lambda k: TrainState.create(eqzoo.models.create(config, key=k), OPTIMIZER, key=k),
        jax.random.key(0),
    )
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), np.int32)
    batch = {"tokens": tokens, "targets": tokens}
    if mesh is not None:
        state = sh.abstract_sharded(state, mesh)
        batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, sh.batch_spec(mesh, x.ndim))),
            batch,
        )
    return state, batch


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"temp_bytes": int(m.temp_size_in_bytes), "peak_bytes_estimate": int(peak)}


def time_compile(config, batch_size, seq_len, mesh) -> dict:
    """Lower and compile a fresh train step for `config`; seconds of wall time for each."""
    state, batch = _abstract(config, batch_size, seq_len, mesh)
    step = make_train_step(lm_loss, OPTIMIZER, mesh=mesh, donate=False)  # a new function: no cache
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done, cpu_done = time.perf_counter(), time.process_time()
    return {
        "lower_s": round(lowered_at - start, 3),
        "compile_s": round(done - lowered_at, 3),
        "total_s": round(done - start, 3),
        "total_cpu_s": round(cpu_done - cpu_start, 3),  # all threads; steadier on a busy machine
        **_memory(compiled),
    }


def remat_table(config, batch_size, seq_len, steps, rounds=3) -> list[dict]:
    """Memory analysis and measured step time of one config under every remat policy.

    Step times are the best of `rounds` rounds that visit every policy in turn (`steps` steps
    each), so a noisy machine slows all policies alike rather than whichever ran last.
    """
    toks = np.random.default_rng(0).integers(0, config.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:]}
    rows, runs = [], []
    for policy in eqzoo.nn.REMAT_POLICIES:
        cfg = eqzoo.models.get_config(config, remat=policy)
        state = TrainState.create(eqzoo.models.create(cfg, key=jax.random.key(0)), OPTIMIZER, key=jax.random.key(1))
        step = make_train_step(lm_loss, OPTIMIZER, donate=False)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(state.arrays, batch))  # warm up
        rows.append({"remat": policy, "compile_s": round(compile_s, 3), **_memory(compiled)})
        runs.append((compiled, state.arrays))
    best = [float("inf")] * len(rows)
    for _ in range(rounds):
        for i, (compiled, arrays) in enumerate(runs):
            start = time.perf_counter()
            for _ in range(steps):
                out = compiled(arrays, batch)
            jax.block_until_ready(out)
            best[i] = min(best[i], 1e3 * (time.perf_counter() - start) / steps)
    base = rows[0]
    for row, ms in zip(rows, best, strict=True):
        row["step_ms"] = round(ms, 2)
        if "temp_bytes" in row and base.get("temp_bytes"):
            row["temp_vs_none"] = round(row["temp_bytes"] / base["temp_bytes"], 3)
        row["step_time_vs_none"] = round(ms / best[0], 3)
    return rows


def _sizes(smoke: bool, layers: str | None) -> tuple[list[int], dict, int, dict, int]:
    """The depths, the model shape, the batch size, and the remat section's shape and step
    count: the full run's, or `--smoke`'s small ones; `--layers` overrides the depths."""
    if smoke:
        # Two depths, each scanned and unrolled, run every path of the compile section; the
        # unrolled compile grows with depth, so the smoke run keeps the deeper one shallow.
        depths = [2, 3]
        shape = dict(embed_dim=64, num_heads=4, vocab_size=256, max_seq=32)
        batch_size, remat_shape, remat_steps = 4, dict(num_layers=2, embed_dim=64, num_heads=4, vocab_size=256, max_seq=32), 2
    else:
        depths = [12, 24, 48]
        shape = dict(embed_dim=256, num_heads=4, vocab_size=1024, max_seq=128)
        batch_size, remat_shape, remat_steps = 8, dict(num_layers=4, embed_dim=128, num_heads=4, vocab_size=256, max_seq=128), 10
    if layers:
        depths = [int(d) for d in layers.split(",")]
    return depths, shape, batch_size, remat_shape, remat_steps


def compile_section(depths, shape, batch_size, seq_len, mesh, *, smoke: bool, show: bool) -> dict:
    """The compile section's entries of the summary: every depth timed scanned and unrolled,
    and the deep-vs-shallow ratios (printed too when `show`)."""
    # Warm up (first-compile costs of XLA and of tracing the library) so they do not land
    # on the first measured config; --smoke, whose figures are not compared, skips it.
    if not smoke:
        warm = eqzoo.models.get_config("tiny-gpt2", num_layers=1, **shape)
        time_compile(warm, batch_size, seq_len, mesh)
    runs = []
    for scan in (True, False):
        for depth in depths:
            config = eqzoo.models.get_config("tiny-gpt2", num_layers=depth, scan_layers=scan, **shape)
            runs.append({"layers": depth, "scan_layers": scan, **time_compile(config, batch_size, seq_len, mesh)})

    def total(depth, scan, key="total_s"):
        return next(r[key] for r in runs if r["layers"] == depth and r["scan_layers"] == scan)

    lo, hi = depths[0], depths[-1]
    out = dict(
        shape={**shape, "batch": batch_size, "seq": seq_len},
        runs=runs,
        scan_ratio_deep_vs_shallow=round(total(hi, True) / total(lo, True), 3),
        scan_ratio_deep_vs_shallow_cpu=round(total(hi, True, "total_cpu_s") / total(lo, True, "total_cpu_s"), 3),
        unrolled_ratio_deep_vs_shallow=round(total(hi, False) / total(lo, False), 3),
        scan_target_met=total(hi, True) / total(lo, True) <= 1.3,
    )
    if show:
        for r in runs:
            print(f"{r['layers']:3d} layers  scan={r['scan_layers']!s:5}  lower {r['lower_s']:.2f}s  compile {r['compile_s']:.2f}s")
        print(f"scanned {hi} vs {lo} layers: {out['scan_ratio_deep_vs_shallow']}x (target <= 1.3)")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="fewer, smaller configs")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--mesh", default=None, help="compile for this mesh (default: one device)")
    parser.add_argument("--layers", default=None, help="comma-separated depths (default 12,24,48)")
    parser.add_argument("--sections", default="compile,remat", help="compile, remat or both")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))

    depths, shape, batch_size, remat_shape, remat_steps = _sizes(args.smoke, args.layers)
    seq_len = shape["max_seq"]
    mesh = sh.make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        batch_size = max(batch_size, math.prod(mesh.shape[a] for a in sh.batch_axes(mesh)))

    summary = {
        "benchmark": "compile_time",
        "smoke": args.smoke,
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "mesh": sh.mesh_shape(mesh) if mesh is not None else None,
    }
    if "compile" in sections:
        summary.update(compile_section(depths, shape, batch_size, seq_len, mesh, smoke=args.smoke, show=not args.json))
    if "remat" in sections:
        remat_cfg = eqzoo.models.get_config("tiny-gpt2", **remat_shape)
        summary["remat"] = {
            "shape": {**remat_shape, "batch": batch_size, "seq": remat_shape["max_seq"]},
            "rows": remat_table(remat_cfg, batch_size, remat_shape["max_seq"], remat_steps),
        }
        if not args.json:
            for row in summary["remat"]["rows"]:
                print(row)
    if args.json:
        print(json.dumps(summary))
    return summary

if __name__ == "__main__":
    main()
