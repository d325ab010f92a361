"""Training throughput of an eqzoo preset through `make_train_step`, as one JSON line.

Trains the real model on random tokens (the loss must fall) and reports tokens/s, step time,
model FLOPs utilisation (MFU: `flops_per_token * tokens/s / peak`, with the config's
`6 N + 12 L d T` count), compile time and peak memory.

    python benchmarks/train_throughput.py --preset gpt2-124m --batch 16 --seq 1024 --steps 50 --json
    python benchmarks/train_throughput.py --smoke --json          # tiny, for CI on CPU

`--fp8` wraps every linear layer in `eqzoo.quant.prepare_fp8` (fp8 operands in the products,
forward and backward, per-tensor scales each step; the JSON line has `"fp8": true`). The speedup
needs a GPU with fp8 tensor cores (Ada, Hopper); on a CPU the fp8 rounding is emulated, slower:

    python benchmarks/train_throughput.py --preset gpt2-124m --batch 16 --seq 1024 --steps 20 --fp8 --json

`--readback N` also times what `fit` does once per log window: reading N steps' metrics back to
the host, as `fit` does (averaged on the device, one transfer: `readback_ms`) and as it did
before (`jax.device_get` of every step's scalars, then NumPy means: `readback_per_scalar_ms`),
each on fresh metrics, best of 3; and `fit` itself over N steps logging once (`fit_step_ms`,
best of 2). With `--per-layer` the loss reports each MoE layer's statistics too (three
metrics per layer). On the deep, narrow capacity Mixtral where per-layer metrics cost most:

    python benchmarks/train_throughput.py --preset tiny-mixtral --batch 4 --seq 24 --precision fp32 \
        --set num_layers=64 --set embed_dim=32 --set hidden_dim=64 --set moe_implementation=capacity \
        --steps 10 --readback 100 --per-layer --json

With `--mesh` the step is `make_train_step(mesh=...)` on that mesh (on `--devices` fake CPU
devices, 8 by default; `--devices 0` takes the backend's own devices), the state placed by
`eqzoo.sharding.shard_state` and the batches by `shard_batch`, once for each
`--context-attention` strategy and each `--seq` (comma-separated), one JSON line each:
`step_ms` is the median of the timed steps (each timed on its own, after `--warmup` steps),
`tokens_per_s` the batch's tokens over it, `compile_s` the compile, with the temporaries and
collective MiB of one device (docs/scaling.md's context-parallel table):

    python benchmarks/train_throughput.py --preset tiny-llama --set num_heads=8 --set num_kv_heads=4 \
        --batch 2 --seq 1024,2048 --precision fp32 --mesh data=2,context=4 \
        --context-attention gather,ring,ring_balanced --steps 5 --warmup 1 --json
"""

import argparse
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _throughput import (
    PEAK_TFLOPS_HELP,
    mesh_size,
    parse_set,
    report,
    report_compiled,
    throughput_figures,
    token_batches,
    use_fake_cpu_devices,
)

import eqzoo
from eqzoo import train
from eqzoo.train._readback import mean_metrics


def peak_memory_gib(compiled) -> tuple[float, str]:
    """Peak device memory: the allocator's figure on GPU/TPU, XLA's static estimate on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "allocator"
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return total / 2**30, "xla_estimate"


def time_readback(state, step, batches, n: int) -> dict:
    """Milliseconds to read `n` steps' metrics back to the host, both ways, each on the metrics of
    `n` fresh steps (a device array read once keeps its host copy), best of 3 after a warm-up;
    then `fit` over `n` steps logging once, ms per step, best of 2."""

    def window():
        nonlocal state
        pending = []
        for i in range(n):
            state, metrics = step(state, batches[i % len(batches)])
            pending.append(metrics)
        jax.block_until_ready((state.arrays, pending))  # time the read-back alone
        return pending

    def per_scalar(pending):  # what fit did before: one transfer per scalar, NumPy means
        host = jax.device_get(pending)
        return {k: float(np.mean([m[k] for m in host])) for k in host[0]}

    mean_metrics(window())  # compiles the read-back programs for this window length
    times = {"readback_ms": [], "readback_per_scalar_ms": []}
    for _ in range(3):
        for name, read in (("readback_ms", mean_metrics), ("readback_per_scalar_ms", per_scalar)):
            pending = window()
            t0 = time.perf_counter()
            read(pending)
            times[name].append(1e3 * (time.perf_counter() - t0))
    fit_ms = []
    for _ in range(2):
        start = int(state.step)
        t0 = time.perf_counter()
        state = train.fit(state, step, itertools.cycle(batches), num_steps=start + n, log_every=n).state
        fit_ms.append(1e3 * (time.perf_counter() - t0) / n)
    return {"readback_steps": n, **{k: min(v) for k, v in times.items()}, "fit_step_ms": min(fit_ms)}


def time_on_mesh(args, overrides: dict, seqs: list[int]) -> list[dict]:
    """Times `make_train_step(mesh=...)` on `args.mesh` for each `(seq, context_attention)`:
    one row each, printed as it is measured."""
    from eqzoo import perf, sharding as sh

    devices = jax.devices()
    if mesh_size(args.mesh) > len(devices):
        raise SystemExit(f"--mesh {args.mesh} takes {mesh_size(args.mesh)} devices; there are "
                         f"{len(devices)}: raise --devices")
    mesh = sh.make_mesh(args.mesh, devices=devices[: mesh_size(args.mesh)])
    optimizer = optax.adamw(3e-4, b2=0.95, weight_decay=0.1)
    precision = train.Precision.bf16() if args.precision == "bf16" else train.Precision()

    def loss_fn(m, b, k):
        return train.lm_loss(m, b, k, implementation=args.loss, chunk_size=args.chunk_size)

    rows = []
    for seq in seqs:
        config = eqzoo.models.get_config(args.preset, **overrides)
        if seq > config.max_seq:
            config = eqzoo.models.get_config(config, max_seq=seq)
        batches = [sh.shard_batch({"tokens": x, "targets": y}, mesh)
                   for x, y in token_batches(config.vocab_size, args.batch, seq)]
        for strategy in args.context_attention.split(","):
            # A fresh state for each strategy: the step donates it.
            state = train.TrainState.create(eqzoo.models.create(config, key=jax.random.key(0)), optimizer,
                                            key=jax.random.key(1))
            state = sh.shard_state(state, mesh)
            step = train.make_train_step(loss_fn, optimizer, mesh=mesh, precision=precision,
                                         context_attention=strategy)
            t0 = time.perf_counter()
            compiled = step.lower(state, batches[0]).compile()
            compile_s = time.perf_counter() - t0
            losses, times = [], []
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                state, m = step(state, batches[i % len(batches)])
                jax.block_until_ready((state.arrays, m))
                times.append(time.perf_counter() - t0)
                losses.append(float(m["loss"]))
            step_s = float(np.median(times[args.warmup:]))
            summary = perf.collective_summary(compiled).get("total", {"ops": 0, "mib": 0.0})
            row = {
                "benchmark": "train_throughput", "preset": args.preset, "overrides": overrides,
                "backend": jax.default_backend(), "device": devices[0].device_kind,
                "mesh": args.mesh, "context_attention": strategy, "batch": args.batch, "seq": seq,
                "steps": args.steps, "warmup": args.warmup, "precision": args.precision, "loss": args.loss,
                "step_ms": 1e3 * step_s,
                "step_ms_min": 1e3 * min(times[args.warmup:]),
                "step_ms_max": 1e3 * max(times[args.warmup:]),
                "tokens_per_s": args.batch * seq / step_s,
                "compile_s": compile_s,
                "step_compilations": step.num_compilations,
                "temp_mib_per_device": compiled.memory_analysis().temp_size_in_bytes / 2**20,
                "collective_ops": summary["ops"], "collective_mib": summary["mib"],
                "loss_first": losses[0], "loss_last": losses[-1], "loss_fell": losses[-1] < losses[0],
            }
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"seq={seq:<6d} {strategy:13s} step {row['step_ms']:9.1f} ms (median of {args.steps}), "
                      f"{row['tokens_per_s']:9.0f} tokens/s, compile {compile_s:5.1f} s, temporaries "
                      f"{row['temp_mib_per_device']:.1f} MiB, collectives {row['collective_mib']:.1f} MiB a device",
                      flush=True)
    return rows


def smoke_on_mesh(args) -> bool:
    """`--smoke`'s mesh row: the smoke model on `data=2,context=2` with ring attention (gather runs
    in `memory_estimate.py --smoke`), a warm-up and two timed steps, fp32. Whether the loss fell."""
    smoke = argparse.Namespace(**{**vars(args), "mesh": "data=2,context=2", "context_attention": "ring",
                                  "steps": 2, "warmup": 1, "precision": "fp32", "json": True})
    return all(r["loss_fell"] for r in time_on_mesh(smoke, parse_set(args.set), [args.seq]))


def with_fp8(model):
    """`--fp8`: every linear layer's products in fp8 (`eqzoo.quant.prepare_fp8`)."""
    from eqzoo import quant

    return quant.prepare_fp8(model)


def resolve_args(p: argparse.ArgumentParser, args) -> list[int]:
    """Fills in `--smoke`'s sizes and returns `--seq`'s lengths (several only with `--mesh`); with
    `--mesh` or `--smoke`, also lays the run on fake CPU devices, which must happen before JAX
    starts its backend."""
    if args.smoke:
        args.preset, args.batch, args.seq, args.steps, args.warmup = "tiny-gpt2", 4, "64", 8, 2
        args.readback = 4 if args.readback is None else args.readback
    args.readback = args.readback or 0
    try:
        seqs = [int(s) for s in args.seq.split(",")]
    except ValueError:
        p.error(f"--seq takes comma-separated integers, got {args.seq!r}")
    if args.mesh is None and len(seqs) > 1:
        p.error(f"several --seq lengths ({args.seq}) are timed only with --mesh; give one")
    if args.fp8 and args.mesh:
        p.error("--fp8 is timed on one device only (without --mesh)")
    if args.mesh and args.warmup < 1:  # lower().compile() does not fill the step's dispatch cache
        p.error("--mesh needs --warmup 1 or more: the first call of the step compiles it again")
    if (args.mesh or args.smoke) and args.devices:
        if args.mesh and mesh_size(args.mesh) > args.devices:
            p.error(f"--mesh {args.mesh} takes {mesh_size(args.mesh)} devices; --devices is {args.devices}: raise it")
        use_fake_cpu_devices(max(args.devices, 4) if args.smoke else args.devices)
    return seqs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", default="1024", help="sequence length (with --mesh: comma-separated lengths)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--remat", default=None, help="override the preset's remat policy")
    p.add_argument("--scan", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--loss", choices=list(train.LM_LOSS_IMPLEMENTATIONS), default="fused",
                   help="lm_loss implementation (fused: no whole-batch fp32 logits, no recompute)")
    p.add_argument("--chunk-size", type=int, default=None, help="positions per loss chunk (default: auto)")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=989.0, help=PEAK_TFLOPS_HELP)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set num_layers=4 (repeatable)")
    p.add_argument("--packed-docs", type=int, default=0, metavar="N",
                   help="split every row into N documents with segment_ids (packed-sequence "
                        "attention masks, eqzoo.data.pack_documents); 0: one document per row")
    p.add_argument("--per-layer", action="store_true",
                   help="lm_loss(per_layer=True): each MoE layer's statistics are metrics too")
    p.add_argument("--readback", type=int, default=None, metavar="N",
                   help="also time reading N steps' metrics back to the host, and fit over N steps "
                        "(default: 0, not timed; 4 with --smoke)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="time make_train_step(mesh=...) on this mesh, e.g. data=2,context=4 (one JSON "
                        "line per --seq and --context-attention)")
    p.add_argument("--context-attention", default="gather",
                   help="with --mesh: comma-separated strategies under context > 1 (gather, ring, ring_balanced)")
    p.add_argument("--devices", type=int, default=8,
                   help="with --mesh: fake CPU devices to lay it on (0: the backend's own devices)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model and sizes (CPU regression guard); also times data=2,context=2 "
                        "with ring attention, so the whole run is on fake CPU devices (even on a GPU host)")
    p.add_argument("--fp8", action="store_true",
                   help="fp8 training matmuls: eqzoo.quant.prepare_fp8 on every linear layer")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    seqs = resolve_args(p, args)
    if args.mesh:
        rows = time_on_mesh(args, parse_set(args.set), seqs)
        return {"rows": rows, "loss_fell": all(r["loss_fell"] for r in rows)}
    args.seq = seqs[0]

    overrides = {"attention_backend": args.attention, **parse_set(args.set)}
    if args.remat is not None:
        overrides["remat"] = args.remat
    if args.scan != "auto":
        overrides["scan_layers"] = args.scan == "true"
    config = eqzoo.models.get_config(args.preset, **overrides)
    if args.seq > config.max_seq:
        overrides["max_seq"] = args.seq
        config = eqzoo.models.get_config(args.preset, **overrides)
    model = eqzoo.models.create(config, key=jax.random.key(0))
    model = with_fp8(model) if args.fp8 else model
    optimizer = optax.adamw(3e-4, b2=0.95, weight_decay=0.1)
    precision = train.Precision.bf16() if args.precision == "bf16" else train.Precision()
    state = train.TrainState.create(model, optimizer, key=jax.random.key(1))
    del model
    def loss_fn(m, b, k):
        return train.lm_loss(m, b, k, implementation=args.loss, chunk_size=args.chunk_size, per_layer=args.per_layer)
    step = train.make_train_step(loss_fn, optimizer, precision=precision)

    batches = [{"tokens": jnp.asarray(x), "targets": jnp.asarray(y)}
               for x, y in token_batches(config.vocab_size, args.batch, args.seq)]
    if args.packed_docs < 0 or args.packed_docs > args.seq // 2:
        p.error(f"--packed-docs must be in [0, seq/2={args.seq // 2}] (a document needs two "
                f"positions for one counted target), got {args.packed_docs}")
    if args.packed_docs:
        # N equal documents per row (1-based ids); the loss counts every position but the
        # last of each document, as pack_documents' mask would.
        seg = 1 + np.arange(args.seq) * args.packed_docs // args.seq
        segment_ids = jnp.asarray(np.broadcast_to(seg, (args.batch, args.seq)), jnp.int32)
        mask = jnp.asarray(np.broadcast_to(np.append(seg[1:] == seg[:-1], False), (args.batch, args.seq)))
        batches = [{**b, "segment_ids": segment_ids, "mask": mask} for b in batches]

    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    report_compiled("train_throughput", args.json, preset=args.preset, backend=jax.default_backend(),
                    device=jax.devices()[0].device_kind, compile_s=compile_s)

    losses = []
    for i in range(args.warmup):
        state, m = step(state, batches[i % 4])
        losses.append(m["loss"])
    jax.block_until_ready(state.arrays)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = step(state, batches[i % 4])
        losses.append(m["loss"])
    jax.block_until_ready(state.arrays)
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]

    readback = time_readback(state, step, batches, args.readback) if args.readback else {}

    peak, peak_source = peak_memory_gib(compiled)
    result = {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": args.precision,
        "fp8": args.fp8,
        # every --set override (gpu_suite's mixtral-1l-* rows differ only in moe_implementation)
        "overrides": parse_set(args.set),
        "remat": config.remat,
        "scan_layers": eqzoo.nn.resolve_scan(config.scan_layers),
        "attention": args.attention,
        "loss": args.loss,
        "chunk_size": args.chunk_size,
        "packed_docs": args.packed_docs,
        "per_layer": args.per_layer,
        "metrics_per_step": len(m),
        "params": config.num_params(),
        **throughput_figures(batch=args.batch, seq=args.seq, steps=args.steps, elapsed=elapsed,
                             flops_per_token=config.flops_per_token(args.seq),
                             peak_tflops=args.peak_tflops, losses=losses),
        "compile_s": compile_s,
        # executables the step built over warmup and timed steps: 1 unless something recompiled
        "step_compilations": step.num_compilations,
        "peak_memory_gib": peak,
        "peak_memory_source": peak_source,
        **readback,
    }
    report(result, args.json)
    if args.smoke:  # the mesh path too, at a tiny size, each row one JSON line
        result["loss_fell"] &= smoke_on_mesh(args)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["loss_fell"] else 1)
