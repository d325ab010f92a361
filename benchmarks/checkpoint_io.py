"""Checkpoint save/restore throughput and the training stall of an asynchronous save, as one
JSON line.

The state is a preset's model plus its AdamW state in fp32 (`gpt2-124m`: ~124M parameters x 3
= ~1.5 GB), filled with random values on the host (nothing compiled, incompressible data),
written to a temporary directory on local disk with `eqzoo.checkpoint.Checkpointer`.

- `save_gb_per_s`: a synchronous save (written, fsynced, checksummed, committed) of the state.
- `restore_gb_per_s`: a restore (integrity check of every file, then the arrays) onto an
  abstract target built with `abstract_state`.
- The stall: a "training step" here is one jitted update touching every array of the state
  (`x * 0.999 + 1e-3`, like an optimizer update; buffers donated). `async_save_call_ms` is how
  long `save()` blocks the loop; `async_stall_ms` how much longer the step that starts an
  asynchronous save takes (save call included) than a step without one; `sync_stall_ms` the same
  for a synchronous save. `stall_fraction = async_stall_ms / sync_stall_ms` (target: below 0.1)
  and `blocking_fraction = async_save_call_ms / sync_stall_ms`.

  On CPU, JAX arrays live in host memory and orbax writes straight from them: until the write is
  done, the next step cannot donate those buffers, so it allocates new ones while the disk is
  being written, and the background writer competes with it for the cores. On a small machine
  that dominates `async_stall_ms`. On GPU the save copies the arrays to host memory and the
  device buffers are free when `save()` returns.

    python benchmarks/checkpoint_io.py --json                 # gpt2-124m-sized state
    python benchmarks/checkpoint_io.py --smoke --json         # tiny state, for CI
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqzoo import checkpoint, models


def _random_state(abstract, seed: int):
    rng = np.random.default_rng(seed)

    def fill(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32)).astype(x.dtype)
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(fill, abstract)


def _timed_steps(step, state, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        state = step(state)
        jax.block_until_ready(state.arrays)
        times.append(time.perf_counter() - t)
    return state, times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--repeats", type=int, default=3, help="saves/restores timed (the median is reported)")
    p.add_argument("--steps", type=int, default=5, help="steps timed for the baseline step time")
    p.add_argument("--smoke", action="store_true", help="tiny state (CPU regression guard)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.repeats, args.steps = "tiny-gpt2", 2, 3

    optimizer = optax.adamw(1e-3)
    config = models.get_config(args.preset)
    abstract = checkpoint.abstract_state(config, optimizer)
    state = _random_state(abstract, 0)
    jax.block_until_ready(state.arrays)
    nbytes = sum(
        (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x).nbytes for x in state.arrays
    )
    gb = nbytes / 1e9

    def touch(arrays):
        return tuple(x * 0.999 + 1e-3 if jnp.issubdtype(x.dtype, jnp.floating) else x for x in arrays)

    update = jax.jit(touch, donate_argnums=0)

    def step(s):
        return s._with_arrays(update(s.arrays))

    root = Path(tempfile.mkdtemp(prefix="eqzoo-ckpt-bench-", dir=args.dir))
    try:
        state, _ = _timed_steps(step, state, 2)  # compile
        state, base = _timed_steps(step, state, args.steps)
        step_s = statistics.median(base)

        # Synchronous saves: the whole write happens inside the step that saves.
        sync_save, sync_stall = [], []
        with checkpoint.Checkpointer(root / "sync", async_save=False, keep_last=1, handle_signals=False) as ckpt:
            for i in range(args.repeats):
                t = time.perf_counter()
                ckpt.save(state, step=i)
                sync_save.append(time.perf_counter() - t)
                state = step(state)
                jax.block_until_ready(state.arrays)
                sync_stall.append(time.perf_counter() - t - step_s)

        # Asynchronous saves: the step that saves only waits for the arrays to leave the device.
        async_call, async_stall, async_commit = [], [], []
        with checkpoint.Checkpointer(root / "async", keep_last=1, handle_signals=False) as ckpt:
            for i in range(args.repeats):
                t = time.perf_counter()
                ckpt.save(state, step=i)
                async_call.append(time.perf_counter() - t)
                state = step(state)
                jax.block_until_ready(state.arrays)
                async_stall.append(time.perf_counter() - t - step_s)
                ckpt.wait()
                async_commit.append(time.perf_counter() - t)

            restore_s = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                restored = ckpt.restore(abstract)
                jax.block_until_ready(restored.state.arrays)
                restore_s.append(time.perf_counter() - t)
                del restored
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    result = {
        "benchmark": "checkpoint_io",
        "preset": args.preset,
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "state_gb": round(gb, 4),
        "num_arrays": len(state.arrays),
        "save_s": round(med(sync_save), 4),
        "save_gb_per_s": round(gb / med(sync_save), 3),
        "restore_s": round(med(restore_s), 4),
        "restore_gb_per_s": round(gb / med(restore_s), 3),
        "step_ms": round(step_s * 1e3, 2),
        "sync_stall_ms": round(med(sync_stall) * 1e3, 2),
        "async_save_call_ms": round(med(async_call) * 1e3, 2),
        "async_stall_ms": round(med(async_stall) * 1e3, 2),
        "async_commit_s": round(med(async_commit), 4),
        "stall_fraction": round(med(async_stall) / med(sync_stall), 4),
        "blocking_fraction": round(med(async_call) / med(sync_stall), 4),
    }
    result["target_met"] = result["stall_fraction"] < 0.1
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
