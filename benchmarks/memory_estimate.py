"""XLA's compile-time memory estimate of one training step, without running it, as JSON.

Compiles `make_train_step` for a preset at a batch and sequence length on the current backend
and reports `memory_analysis()`: arguments (state + batch), outputs, temporaries (activations
kept for the backward pass, logits, workspace) and the donated bytes aliased between input and
output state. No device memory is allocated for the state (it is built with `eqx.filter_eval_shape`),
so this can size an H100 run on a CPU. On CPU, attention runs as XLA's einsum-softmax program,
which keeps the `(heads, seq, seq)` probabilities per layer; cuDNN flash attention on GPU keeps
none. To estimate that part, run the same number of tokens at two sequence lengths: the
difference is the part that grows with `seq**2` (docs/performance.md does this per preset).

With `--mesh` (repeatable) the step is compiled for that mesh on fake CPU devices
(`--devices`, 8 by default; each mesh takes the first devices it needs), the state laid out
by `eqzoo.sharding.abstract_sharded` and the batch split by `batch_spec` (the sequence over
`context` too), and the figures are per device: what context parallelism saves in activations
(docs/scaling.md quotes the second command; `--mesh none` adds the unsharded step).

    python benchmarks/memory_estimate.py --preset gpt2-124m --batch 16 --seq 1024 --remat none,full --json
    python benchmarks/memory_estimate.py --preset tiny-llama --set num_heads=8 --set num_kv_heads=4 \
        --batch 2 --seq 512,2048 --precision fp32 --mesh data=2 --mesh data=2,context=4 --json
    python benchmarks/memory_estimate.py --smoke --json
"""

import argparse
import json
import math
import sys
import time

from _throughput import mesh_size, parse_set, use_fake_cpu_devices

GIB = 2**30


def estimate(preset: str, batch: int, seq: int, remat: str, loss: str, scan: str, precision: str,
             mesh_spec: str | None = None, overrides: dict | None = None) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqzoo
    from eqzoo import sharding as sh, train

    overrides = {**(overrides or {}), "remat": remat}
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
    state_bytes = sum(a.size * a.dtype.itemsize for a in state.arrays)

    def loss_fn(m, b, k):
        return train.lm_loss(m, b, k, implementation=loss)

    if mesh_spec is None:
        step = train.make_train_step(loss_fn, optimizer, precision=policy)
        tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    else:
        mesh = sh.make_mesh(mesh_spec, devices=jax.devices()[: mesh_size(mesh_spec)])
        state = sh.abstract_sharded(state, mesh)
        # one device's share of the state, from the layout alone
        state_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                          for x in jax.tree.leaves(state) if hasattr(x, "sharding"))
        tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=jax.NamedSharding(mesh, sh.batch_spec(mesh)))
        step = train.make_train_step(loss_fn, optimizer, mesh=mesh, precision=policy)
    t0 = time.perf_counter()
    compiled = step.lower(state, {"tokens": tok, "targets": tok}).compile()
    mem = compiled.memory_analysis()  # per device under a mesh (one SPMD program)
    return {
        "preset": preset, "overrides": {k: v for k, v in overrides.items() if k != "remat"},
        "batch": batch, "seq": seq, "remat": remat, "loss": loss,
        "scan_layers": eqzoo.nn.resolve_scan(config.scan_layers), "precision": precision,
        "mesh": mesh_spec,
        "params": config.num_params(),
        "state_gib": state_bytes / GIB,
        "argument_gib": mem.argument_size_in_bytes / GIB,
        "output_gib": mem.output_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "peak_estimate_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                              - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GIB,
        "compile_s": time.perf_counter() - t0,
        "backend": jax.default_backend(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", default="1024", help="comma-separated sequence lengths")
    p.add_argument("--remat", default="none", help="comma-separated remat policies")
    p.add_argument("--loss", default="fused", help="comma-separated lm_loss implementations")
    p.add_argument("--scan", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of the preset (repeatable)")
    p.add_argument("--mesh", action="append", default=None, metavar="AXIS=N,...",
                   help="compile for this mesh on fake CPU devices, figures per device (repeatable; "
                        "'none': the unsharded step), e.g. --mesh data=2 --mesh data=2,context=4")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices with --mesh (must cover every mesh)")
    p.add_argument("--smoke", action="store_true", help="tiny preset (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:  # one mesh with context, so the sharded path runs in CI too
        args.preset, args.batch, args.seq, args.remat, args.loss = "tiny-gpt2", 4, "64", "none,full", "fused"
        args.mesh = args.mesh or ["none", "data=2,context=2"]
    meshes = [None if m == "none" else m for m in args.mesh or ["none"]]
    for m in meshes:
        if m is not None and mesh_size(m) > args.devices:
            raise SystemExit(f"--mesh {m} takes {mesh_size(m)} devices; --devices is {args.devices}: raise it")
    if any(m is not None for m in meshes):  # before JAX starts: the fake devices the meshes are laid on
        use_fake_cpu_devices(args.devices)
    rows = []
    for mesh in meshes:
        for seq in (int(s) for s in args.seq.split(",")):
            for remat in args.remat.split(","):
                for loss in args.loss.split(","):
                    row = estimate(args.preset, args.batch, seq, remat, loss, args.scan, args.precision,
                                   mesh, parse_set(args.set))
                    rows.append(row)
                    if not args.json:
                        print(f"mesh={mesh or 'none':18s} seq={seq:<6d} remat={remat:14s} loss={loss:8s} "
                              f"peak≈{row['peak_estimate_gib']:.2f} GiB (temp {row['temp_mib']:.1f} MiB, "
                              f"state {row['state_gib']:.2f} GiB)", file=sys.stderr)
    result = {"benchmark": "memory_estimate", "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
