"""One process of a 2-process CPU "cluster" (run by test_distributed.py, not collected).

Joins with eqzoo.sharding.initialize() from COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID,
loads its own half of each global batch, assembles global batches with make_global_batch, and
prints the losses of a few sharded train steps as one JSON line.
"""

import json
import sys

import jax
import jaxtyping
import numpy as np
import optax

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    import eqzoo
    from eqzoo import sharding as sh
    from eqzoo.train import TrainState, lm_loss, make_train_step

MESH, STEPS, BATCH, SEQ = "data=4,tensor=2", 2, 16, 16


def run() -> dict:
    """The computation both the 2-process run and the single-process reference perform."""
    mesh = sh.make_mesh(MESH)
    optimizer = optax.sgd(0.1)
    state = sh.sharded_init(
        lambda k: TrainState.create(eqzoo.models.create("tiny-gpt2", key=k), optimizer, key=k),
        jax.random.key(0),
        mesh=mesh,
    )
    tokens = (np.arange(20_000, dtype=np.int64) * 7919 % 251).astype(np.int32)
    loader = eqzoo.data.TokenLoader(tokens, batch_size=BATCH, seq_len=SEQ, seed=0)
    step = make_train_step(lm_loss, optimizer, mesh=mesh)
    losses, rows = [], loader.local_batch_size
    for _ in range(STEPS):
        state, metrics = step(state, sh.make_global_batch(next(loader), mesh))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "local_rows": rows}


if __name__ == "__main__":
    # Before JAX starts its CPU backend: 4 devices per process, collectives across processes.
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    args = sh.initialize(initialization_timeout=120)
    out = run()
    out.update(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        devices=len(jax.devices()),
        local_devices=len(jax.local_devices()),
        source=args.source,
    )
    print(json.dumps(out))
    sys.stdout.flush()
