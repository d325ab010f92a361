"""What `Checkpointer(durable=True)` costs: the wall time of a synchronous save with and without
the fsyncs that make a committed step survive a power cut, one JSON line per size.

The state is an MLP plus its AdamW state in fp32 (parameters x 3), sized to about `--mb`
megabytes, filled with random values on the host (nothing compiled, incompressible data), saved
with `async_save=False` (so the wall time is the write) into a temporary directory on local disk.
Saves with and without the syncs alternate, `--repeats` of each; medians are reported.

    python benchmarks/checkpoint_durable.py --mb 10,200 --repeats 9
    python benchmarks/checkpoint_durable.py --smoke --json    # 1 MB, 2 repeats, for CI
"""

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

from eqzoo import checkpoint, models, train


def _state(mb: float, seed: int = 0) -> train.TrainState:
    # depth=3: four width x width layers, so params ~ 4 * width^2; the state is 3x that, fp32.
    width = max(8, int(math.sqrt(mb * 1e6 / (3 * 4 * 4))))
    config = models.MLPConfig(in_features=width, out_features=width, width=width, depth=3)
    model = models.create(config, key=jax.random.key(seed))
    state = train.TrainState.create(model, optax.adamw(1e-3), key=jax.random.key(seed + 1))
    rng = np.random.default_rng(seed)

    def fill(x):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            return jax.numpy.asarray(rng.standard_normal(x.shape, dtype=np.float32))
        return x

    return state._with_arrays(tuple(fill(x) for x in state.arrays))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", default="10,200", help="comma-separated state sizes in MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--smoke", action="store_true", help="a 1 MB state, 2 repeats (CPU regression guard)")
    p.add_argument("--json", action="store_true", help="accepted for the benchmark runner; the output is always JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.mb, args.repeats = "1", 2
    rows = []
    root = Path(tempfile.mkdtemp(prefix="eqzoo-durable-bench-", dir=args.dir))
    try:
        for mb in (float(x) for x in args.mb.split(",")):
            state = _state(mb)
            nbytes = sum(x.nbytes for x in state.arrays if jax.numpy.issubdtype(x.dtype, jax.numpy.floating))
            times: dict[bool, list[float]] = {True: [], False: []}
            ckpts = {
                d: checkpoint.Checkpointer(root / f"{mb}-{d}", async_save=False, keep_last=1, handle_signals=False, durable=d)
                for d in (False, True)
            }
            try:
                for i in range(args.repeats + 1):  # the first round warms orbax up and is dropped
                    for durable in (False, True) if i % 2 else (True, False):
                        t = time.perf_counter()
                        ckpts[durable].save(state, step=i + 1)
                        if i:
                            times[durable].append(time.perf_counter() - t)
            finally:
                for c in ckpts.values():
                    c.close()
            plain, durable = statistics.median(times[False]), statistics.median(times[True])
            rows.append({
                "benchmark": "checkpoint_durable",
                "state_mb": round(nbytes / 1e6, 1),
                "repeats": args.repeats,
                "save_s_plain": round(plain, 4),
                "save_s_durable": round(durable, 4),
                "overhead_pct": round(100 * (durable / plain - 1), 1),
                "all_plain": [round(t, 3) for t in times[False]],
                "all_durable": [round(t, 3) for t in times[True]],
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
