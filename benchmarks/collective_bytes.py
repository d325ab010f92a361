"""What one sharded training step communicates, from its compiled HLO, as JSON.

Compiles `make_train_step(..., mesh=mesh)` for a preset on fake CPU devices (no state is
allocated: it is built with `eqx.filter_eval_shape` and laid out with
`eqzoo.sharding.abstract_sharded`) and counts every collective with
`eqzoo.perf.collectives`: operations and MiB per step (result bytes on one device, multiplied
by the trip counts of the loops around them), inside and outside loops. XLA's partitioner makes
the same choices for fake CPU devices as for GPUs, so this sizes a multi-GPU step's traffic on
a laptop. `param_mib` is the fp32 parameter size, the gradient a data-parallel step must
all-reduce at least once; `state_mib_per_device` the train state (parameters and optimizer
moments) one device holds in the mesh's layout; `temp_mib_per_device` XLA's temporaries
(activations, workspace) on one device (`memory_analysis()`); `stack_mib_per_device` the
layer stack's parameters alone on one device (split over `stage` on a mesh with `stage > 1`,
pipeline parallelism; rows on such a mesh also give the micro-batches the schedule uses, its
repeats and its bubble fraction, `(stage - 1) / (micro * repeats + stage - 1)`). `--context-attention
gather,ring,ring_balanced` compares the attention strategies of context parallelism
(docs/scaling.md):

    python benchmarks/collective_bytes.py --preset tiny-llama --set num_heads=8 --set num_kv_heads=4 \
        --batch 2 --seq 2048 --mesh data=2,context=4 --loss fused --context-attention gather,ring,ring_balanced

    python benchmarks/collective_bytes.py --preset gpt2-124m --batch 16 --seq 1024 \\
        --mesh data=8 --mesh fsdp=8 --mesh fsdp=4,tensor=2 --mesh data=2,context=4 --loss fused,full --json
    python benchmarks/collective_bytes.py --smoke --json

Pipeline parallelism against the same mesh without it (docs/scaling.md, "Pipeline parallelism"):

    python benchmarks/collective_bytes.py --preset tiny-llama --set num_layers=8 --batch 16 --seq 256 \
        --loss fused --mesh data=2,fsdp=2,tensor=2 --mesh stage=2,fsdp=2,tensor=2 --pipeline-microbatches 4,8

GPipe's schedule against the circular one (`--pipeline-repeats 1,2`: each micro-batch goes round
the stages twice, each stage holding two non-contiguous chunks of the stack):

    python benchmarks/collective_bytes.py --preset tiny-llama --set num_layers=8 --batch 16 --seq 256 \
        --loss fused --mesh stage=2,data=4 --mesh stage=4,data=2 --pipeline-repeats 1,2
"""

import argparse
import json
import math
import sys
import time

from _throughput import parse_set, use_fake_cpu_devices


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mesh", action="append", help="mesh shape, e.g. data=8 (repeatable)")
    p.add_argument("--loss", default="fused,full", help="comma-separated lm_loss implementations")
    p.add_argument("--chunk-size", type=int, default=None, help="lm_loss chunk_size (default: automatic)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--context-attention", default="gather",
                   help="comma-separated attention strategies under context > 1 (gather, ring, ring_balanced)")
    p.add_argument("--pipeline-microbatches", default="auto",
                   help="comma-separated micro-batch counts for meshes with stage > 1 ('auto': the default choice)")
    p.add_argument("--pipeline-repeats", default="1",
                   help="comma-separated pipeline_repeats for meshes with stage > 1 (1: GPipe's schedule, "
                        "more: the circular one)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (must cover every mesh)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set moe_implementation=capacity (repeatable)")
    p.add_argument("--smoke", action="store_true", help="tiny preset (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq = "tiny-gpt2", 8, 64
        args.mesh = args.mesh or ["data=8", "data=2,fsdp=2,tensor=2"]
    args.mesh = args.mesh or ["data=8", "fsdp=8", "fsdp=4,tensor=2"]
    return args


def measure(
    args, mesh_spec: str, loss: str, context_attention: str = "gather", microbatches: int | None = None,
    repeats: int = 1,
) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqzoo
    from eqzoo import perf, sharding as sh, train

    config = eqzoo.models.get_config(args.preset, **parse_set(args.set))
    if args.seq > config.max_seq:
        config = eqzoo.models.get_config(config, max_seq=args.seq)
    optimizer = optax.adamw(3e-4, b2=0.95, weight_decay=0.1)
    mesh = sh.make_mesh(mesh_spec)

    def make_state():
        model = eqzoo.models.create(config, key=jax.random.key(0))
        return train.TrainState.create(model, optimizer, key=jax.random.key(1))

    state = sh.abstract_sharded(eqx.filter_eval_shape(make_state), mesh)
    rows = jax.NamedSharding(mesh, sh.batch_spec(mesh))  # (batch, seq): the sequence over context too
    tok = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32, sharding=rows)

    def loss_fn(m, b, k):
        return train.lm_loss(m, b, k, implementation=loss, chunk_size=args.chunk_size)

    policy = train.Precision.bf16() if args.precision == "bf16" else train.Precision()
    step = train.make_train_step(loss_fn, optimizer, mesh=mesh, precision=policy, context_attention=context_attention,
                                 pipeline_microbatches=microbatches, pipeline_repeats=repeats)
    t0 = time.perf_counter()
    compiled = step.lower(state, {"tokens": tok, "targets": tok}).compile()
    compile_s = time.perf_counter() - t0
    summary = perf.collective_summary(compiled)
    # The train state (parameters, optimizer moments) one device holds, from the layout alone.
    state_bytes = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(state) if hasattr(x, "sharding")
    )
    stack_bytes = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state.model.blocks)
    )
    stages = sh.mesh_shape(mesh)["stage"]
    pipeline = {}
    if stages > 1:
        from eqzoo.nn._pipeline import bubble_fraction, default_microbatches

        ways = math.prod(n for a, n in sh.mesh_shape(mesh).items() if a in ("data", "fsdp", "expert"))
        micro = microbatches or default_microbatches(args.batch, stages, ways)
        pipeline = {
            "pipeline_microbatches": micro, "pipeline_repeats": repeats,
            "bubble_fraction": round(bubble_fraction(stages, micro, repeats), 3),
        }
    total = summary.get("total", {"ops": 0, "mib": 0.0, "in_loop_ops": 0, "in_loop_mib": 0.0})
    return {
        "preset": args.preset, "overrides": parse_set(args.set), "batch": args.batch, "seq": args.seq, "mesh": mesh_spec, "loss": loss,
        "context_attention": context_attention,
        "temp_mib_per_device": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
        "chunk_size": args.chunk_size, "precision": args.precision,
        "param_mib": round(config.num_params() * 4 / 2**20, 1),
        "state_mib_per_device": round(state_bytes / 2**20, 1),
        "stack_mib_per_device": round(stack_bytes / 2**20, 2), **pipeline,
        "collective_ops": total["ops"], "collective_mib": round(total["mib"], 1),
        "in_loop_ops": total["in_loop_ops"], "in_loop_mib": round(total["in_loop_mib"], 1),
        "by_kind": {k: v for k, v in summary.items() if k != "total"},
        "compile_s": round(compile_s, 2),
    }


def _microbatch_counts(args, mesh_spec: str) -> list[int | None]:
    """The `pipeline_microbatches` to measure on `mesh_spec`: those asked for on a mesh with
    `stage > 1`, the default alone elsewhere."""
    if "stage=" not in mesh_spec.replace(" ", "") or args.pipeline_microbatches == "auto":
        return [None]
    return [None if m == "auto" else int(m) for m in args.pipeline_microbatches.split(",")]


def _repeat_counts(args, mesh_spec: str) -> list[int]:
    """The `pipeline_repeats` to measure on `mesh_spec`: those asked for on a mesh with
    `stage > 1`, 1 elsewhere."""
    if "stage=" not in mesh_spec.replace(" ", ""):
        return [1]
    return [int(r) for r in args.pipeline_repeats.split(",")]


def main(argv=None) -> dict:
    args = parse(argv)
    # Before JAX starts: the fake devices the meshes are laid on.
    use_fake_cpu_devices(args.devices)
    rows = []
    for mesh_spec in args.mesh:
        pipelines = [(m, r) for m in _microbatch_counts(args, mesh_spec) for r in _repeat_counts(args, mesh_spec)]
        for loss in args.loss.split(","):
            for strategy in args.context_attention.split(","):
                for micro, repeats in pipelines:
                    row = measure(args, mesh_spec, loss, strategy, micro, repeats)
                    rows.append(row)
                    if not args.json:
                        piped = (
                            f" micro={row['pipeline_microbatches']} repeats={row['pipeline_repeats']} "
                            f"bubble={row['bubble_fraction']}" if "bubble_fraction" in row else ""
                        )
                        print(f"{mesh_spec:18s} loss={loss:8s} attention={strategy:13s}{piped} {row['collective_ops']:5d} collectives, "
                              f"{row['collective_mib']:9.1f} MiB/step ({row['in_loop_mib']:.1f} in loops; "
                              f"params {row['param_mib']} MiB fp32; state {row['state_mib_per_device']} MiB, "
                              f"stack {row['stack_mib_per_device']} MiB, "
                              f"temporaries {row['temp_mib_per_device']} MiB a device)", file=sys.stderr)
    result = {"benchmark": "collective_bytes", "smoke": args.smoke, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
