"""XLA's compile-time memory estimate of one training step, without running it, as JSON.

Compiles `make_train_step` for a preset at a batch and sequence length on the current backend
and reports `memory_analysis()`: arguments (state + batch), outputs, temporaries (activations
kept for the backward pass, logits, workspace) and the donated bytes aliased between input and
output state. No device memory is allocated for the state (it is built with `eqx.filter_eval_shape`),
so this can size an H100 run on a CPU. On CPU, attention runs as XLA's einsum-softmax program,
which keeps the `(heads, seq, seq)` probabilities per layer; cuDNN flash attention on GPU keeps
none. To estimate that part, run the same number of tokens at two sequence lengths: the
difference is the part that grows with `seq**2` (docs/performance.md does this per preset).

    python benchmarks/memory_estimate.py --preset gpt2-124m --batch 16 --seq 1024 --remat none,full --json
    python benchmarks/memory_estimate.py --smoke --json
"""

import argparse
import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqzoo
from eqzoo import train

GIB = 2**30


def estimate(preset: str, batch: int, seq: int, remat: str, loss: str, scan: str, precision: str) -> dict:
    overrides = {"remat": remat}
    if scan != "auto":
        overrides["scan_layers"] = scan == "true"
    config = eqzoo.models.get_config(preset, **overrides)
    if seq > config.max_seq:
        config = eqzoo.models.get_config(config, max_seq=seq)
    optimizer = optax.adamw(3e-4, b2=0.95, weight_decay=0.1)
    policy = train.Precision.bf16() if precision == "bf16" else train.Precision()

    def make_state():
        model = eqzoo.models.create(config, key=jax.random.key(0))
        return train.TrainState.create(model, optimizer, key=jax.random.key(1))

    state = eqx.filter_eval_shape(make_state)  # shapes only: nothing allocated

    def loss_fn(m, b, k):
        return train.lm_loss(m, b, k, implementation=loss)

    step = train.make_train_step(loss_fn, optimizer, precision=policy)
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(state, {"tokens": tok, "targets": tok}).compile()
    mem = compiled.memory_analysis()
    state_bytes = sum(a.size * a.dtype.itemsize for a in state.arrays)
    return {
        "preset": preset, "batch": batch, "seq": seq, "remat": remat, "loss": loss,
        "scan_layers": eqzoo.nn.resolve_scan(config.scan_layers), "precision": precision,
        "params": config.num_params(),
        "state_gib": state_bytes / GIB,
        "argument_gib": mem.argument_size_in_bytes / GIB,
        "output_gib": mem.output_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "peak_estimate_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                              - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GIB,
        "compile_s": time.perf_counter() - t0,
        "backend": jax.default_backend(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--remat", default="none", help="comma-separated remat policies")
    p.add_argument("--loss", default="fused", help="comma-separated lm_loss implementations")
    p.add_argument("--scan", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--smoke", action="store_true", help="tiny preset (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq, args.remat, args.loss = "tiny-gpt2", 4, 64, "none,full", "fused,full"
    rows = []
    for remat in args.remat.split(","):
        for loss in args.loss.split(","):
            row = estimate(args.preset, args.batch, args.seq, remat, loss, args.scan, args.precision)
            rows.append(row)
            if not args.json:
                print(f"remat={remat:14s} loss={loss:8s} peak≈{row['peak_estimate_gib']:.2f} GiB "
                      f"(temp {row['temp_gib']:.2f}, state {row['state_gib']:.2f})", file=sys.stderr)
    result = {"benchmark": "memory_estimate", "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
