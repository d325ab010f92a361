"""Train a GPT-2, Llama or Mixtral on a device mesh: data, FSDP, context, expert, tensor and pipeline parallelism.

The same script runs on one CPU (JAX is asked for 8 fake CPU devices), on the GPUs of one
machine, and across hosts. The train state is created directly in its sharded layout
(`eqzoo.sharding.sharded_init`), each process loads only its own rows of every global batch
(`eqzoo.data.TokenLoader` slices by `jax.process_index()`), and the rows are assembled into one
global array on the mesh (`eqzoo.sharding.make_global_batch`). The corpus is the bytes of the
Python standard library's own source (nothing downloaded).

    python examples/sharded_training.py --mesh data=2,fsdp=2,tensor=2 --steps 20 --json
    python examples/sharded_training.py --smoke --json      # CI: 4 steps, stage=2,fsdp=2,tensor=2, vs 1 device
    python examples/sharded_training.py --mesh fsdp=-1 --model llama --precision bf16
    python examples/sharded_training.py --mesh data=2,expert=4 --model mixtral --check
    python examples/sharded_training.py --mesh data=2,context=4 --model llama   # long sequences
    python examples/sharded_training.py --mesh stage=2,fsdp=2,tensor=2 --pipeline-microbatches 4 --check  # pipeline
    python examples/sharded_training.py --mesh stage=2,data=4 --num-layers 4 --pipeline-repeats 2 --check  # circular

Several hosts: start the same command on every host with COORDINATOR_ADDRESS (host:port of
process 0), NUM_PROCESSES and PROCESS_ID set, or under SLURM (`srun`); see docs/scaling.md.
`--check` (on in `--smoke`) also runs the steps on one device and reports the largest loss
difference. A mesh with `stage > 1` splits the layer stack by depth (pipeline parallelism,
GPipe's schedule); `--pipeline-microbatches` sets how many micro-batches each step's batch is
cut into (default: up to `2 * stage`; see docs/scaling.md), and `--pipeline-repeats R` runs the
circular schedule instead, each micro-batch going round the stages `R` times (`stage * R` must
divide `--num-layers`). With `--json` the last stdout line is a JSON summary holding the
per-step losses.
"""

import argparse
import json
import math
import os
import sys
import time

import jax

# Fake CPU devices must be requested before JAX starts its CPU backend; on a GPU/TPU machine
# this changes nothing (the accelerators are the default devices).
jax.config.update("jax_num_cpu_devices", int(os.environ.get("EQZOO_CPU_DEVICES", "8")))

import jaxtyping  # noqa: E402

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    import eqzoo
    from eqzoo import sharding as sh
    from eqzoo.train import Precision, TrainState, lm_loss, make_train_step

import numpy as np  # noqa: E402
import optax  # noqa: E402

MODELS = {
    # Tiny presets, with head counts that every tensor-parallel size up to 8 divides.
    "gpt2": ("tiny-gpt2", {"num_heads": 8}),
    "llama": ("tiny-llama", {"num_heads": 8, "num_kv_heads": 4}),
    # 8 experts, so that every expert-parallel size up to 8 holds whole experts.
    "mixtral": (
        "tiny-mixtral",
        {"num_heads": 8, "num_kv_heads": 4, "num_experts": 8, "moe_implementation": "capacity"},
    ),
}
PRECISIONS = {"fp32": Precision.fp32(), "bf16": Precision.bf16(), "fp16": Precision.fp16()}


def build(args, mesh):
    """The config, optimizer, precision, sharded train state and compiled step for `args`."""
    preset, overrides = MODELS[args.model]
    if args.num_layers is not None:
        overrides = {**overrides, "num_layers": args.num_layers}
    config = eqzoo.models.get_config(preset, remat=args.remat, **overrides)
    precision = PRECISIONS[args.precision]
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, 5, max(args.steps, 6)))

    def make_state(key):
        model = eqzoo.models.create(config, key=key)
        return TrainState.create(model, optimizer, key=key, precision=precision)

    key = jax.random.key(args.seed)
    if mesh is None:
        state = make_state(key)
    else:
        state = sh.sharded_init(make_state, key, mesh=mesh)
    step = make_train_step(
        lm_loss, optimizer, precision=precision, grad_accum_steps=args.grad_accum, mesh=mesh,
        pipeline_microbatches=args.pipeline_microbatches if mesh is not None else None,
        pipeline_repeats=args.pipeline_repeats if mesh is not None else 1,
    )
    return config, state, step


def train(args, mesh, tokens):
    """Run `args.steps` steps; returns (losses, state, compile seconds, mean step ms)."""
    config, state, step = build(args, mesh)
    loader = eqzoo.data.TokenLoader(
        tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
        process_index=None if mesh is not None else 0, process_count=None if mesh is not None else 1,
    )
    losses, times, compile_s = [], [], 0.0
    for i in range(args.steps):
        local = next(loader)  # this process's rows of global batch i
        batch = sh.make_global_batch(local, mesh) if mesh is not None else local
        start = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])  # waits for the step
        took = time.perf_counter() - start
        if i == 0:
            compile_s = took
        else:
            times.append(took)
        losses.append(loss)
        if not args.json and (i % max(1, args.steps // 10) == 0 or i == args.steps - 1):
            print(f"step {i:4d}  loss {loss:.4f}", file=sys.stderr)
    step_ms = 1e3 * sum(times) / len(times) if times else float("nan")
    return config, losses, state, compile_s, step_ms


def per_device_bytes(state) -> tuple[int, int]:
    """(bytes of the state on this process's first device, bytes of the whole state)."""
    device = jax.local_devices()[0]
    here = total = 0
    for a in state.arrays:
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            continue
        total += a.size * a.dtype.itemsize
        here += sum(s.data.nbytes for s in a.addressable_shards if s.device == device)
    return here, total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mesh", default=None,
        help="e.g. data=2,fsdp=2,tensor=2 (the default; with --smoke stage=2,fsdp=2,tensor=2); -1 fills",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument(
        "--pipeline-microbatches", type=int, default=None,
        help="micro-batches per step on a mesh with stage > 1 (default: up to 2 * stage)",
    )
    parser.add_argument(
        "--pipeline-repeats", type=int, default=1,
        help="times each micro-batch goes round the stages (1: GPipe's schedule; more: the circular one)",
    )
    parser.add_argument("--num-layers", type=int, default=None, help="the model's depth (default: the tiny preset's)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--remat", choices=sorted(eqzoo.nn.REMAT_POLICIES), default="none")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="also run on one device and compare losses")
    parser.add_argument("--smoke", action="store_true", help="a few steps, checked against one device (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.smoke else 60)
    args.check = args.check or args.smoke
    # The smoke run (CI) pipelines too: the same CPU time as data=2,fsdp=2,tensor=2, one axis more
    args.mesh = args.mesh or ("stage=2,fsdp=2,tensor=2" if args.smoke else "data=2,fsdp=2,tensor=2")

    if sh.resolve_distributed_args().multi_process:
        # CPU processes exchange data through gloo (GPUs and TPUs use their own collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    dist = sh.initialize()  # before anything touches a device; a no-op for one process
    mesh = sh.make_mesh(args.mesh)
    if args.pipeline_microbatches is not None and sh.mesh_shape(mesh)["stage"] == 1:
        parser.error(f"--pipeline-microbatches needs a mesh with stage > 1 (pipeline parallelism); got --mesh {args.mesh}")
    if args.pipeline_repeats != 1 and sh.mesh_shape(mesh)["stage"] == 1:
        parser.error(f"--pipeline-repeats needs a mesh with stage > 1 (pipeline parallelism); got --mesh {args.mesh}")

    text = eqzoo.data.stdlib_corpus(max_chars=2_000_000 if args.smoke else 20_000_000)
    tokens = eqzoo.data.ByteTokenizer().encode(text)

    start = time.perf_counter()
    config, losses, state, compile_s, step_ms = train(args, mesh, tokens)
    train_s = time.perf_counter() - start
    here, total = per_device_bytes(state)

    summary = {
        "example": "sharded_training",
        "smoke": args.smoke,
        "mesh": sh.mesh_shape(mesh),
        "devices": len(jax.devices()),
        "platform": jax.default_backend(),
        "processes": dist.num_processes,
        "model": args.model,
        "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.model))),
        "precision": args.precision,
        "grad_accum": args.grad_accum,
        "pipeline_microbatches": args.pipeline_microbatches,
        "pipeline_repeats": args.pipeline_repeats,
        "num_layers": config.num_layers,
        "remat": args.remat,
        "global_batch": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "losses": losses,
        "final_loss": losses[-1],
        "compile_s": round(compile_s, 2),
        "step_ms": round(step_ms, 2),
        "state_bytes_per_device": here,
        "state_bytes_total": total,
        "train_seconds": round(train_s, 2),
    }
    if args.check and dist.num_processes == 1:
        _, ref, *_ = train(args, None, tokens)
        summary["single_device_losses"] = ref
        summary["max_abs_loss_diff_vs_single_device"] = float(np.max(np.abs(np.array(losses) - np.array(ref))))
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"mesh {summary['mesh']} on {summary['devices']} {summary['platform']} device(s): "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps; state per device "
            f"{here / 2**20:.2f} MiB of {total / 2**20:.2f} MiB"
        )
        if "max_abs_loss_diff_vs_single_device" in summary:
            print(f"largest loss difference vs one device: {summary['max_abs_loss_diff_vs_single_device']:.2e}")
    return summary


if __name__ == "__main__":
    main()
