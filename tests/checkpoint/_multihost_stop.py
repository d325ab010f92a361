"""One process of a 2-process CPU run stopped by a signal (run by test_multihost_stop.py, not
collected).

    COORDINATOR_ADDRESS=localhost:PORT NUM_PROCESSES=2 PROCESS_ID=i python _multihost_stop.py DIR PLAN

Joins with eqzoo.sharding.initialize(), trains a small MLP data-parallel over both processes
(one CPU device each, so every step all-reduces its gradient across them) with `fit` and a
`Checkpointer` in DIR (resuming from its newest step, if any), and sends itself the signal PLAN
names for this process after a step: `"1:TERM@5"` is SIGTERM to process 1 after step 5 (and
nothing to process 0). A signal after the step a run resumes from is sent before training, and
then the process waits until JAX's preemption service has surely agreed on a step. Each step
sleeps a little, so the run is still training when the processes have agreed where to stop,
about a second later; one that never stops ends at `MAX_STEPS`. PLAN `"no-service"` only makes a
Checkpointer with JAX's preemption service off and reports the warnings and signal handlers.
The last stdout line is a JSON summary.
"""

import json
import os
import signal
import sys
import time
import warnings

import jax
import numpy as np
import optax

from eqzoo import checkpoint, models, sharding as sh, train
from eqzoo.data import ArrayLoader

CONFIG = models.MLPConfig(in_features=4, out_features=2, width=8, depth=1)
OPTIMIZER = optax.sgd(0.1)
MAX_STEPS = 1_000
STEP_SLEEP_S = 0.005
AGREEMENT_S = 2.0  # JAX polls for SIGTERM once a second, then agrees in a few milliseconds
DATA = {
    "x": np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32),
    "y": np.random.default_rng(1).integers(0, 2, 64).astype(np.int32),
}


def loss_fn(model, batch, key):
    return train.cross_entropy(jax.vmap(model)(batch["x"]), batch["y"])


class GlobalBatches:
    """This process's rows of each batch, placed on the mesh as one global batch; the loader's
    `state_dict` (so each checkpoint records the data position)."""

    def __init__(self, loader: ArrayLoader, mesh):
        self.loader, self.mesh = loader, mesh

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(STEP_SLEEP_S)
        return sh.make_global_batch(next(self.loader), self.mesh)

    def state_dict(self):
        return self.loader.state_dict()


def make_loader(**kwargs) -> ArrayLoader:
    """The run's loader (`process_index=`, `process_count=` as for `ArrayLoader`)."""
    return ArrayLoader(DATA, batch_size=8, seed=0, **kwargs)


def new_state(key):
    """A fresh training state (inside `sharded_init`)."""
    return train.TrainState.create(models.create(CONFIG, key=key), OPTIMIZER, key=key)


def train_until_stopped(directory: str, plan: str) -> dict:
    me = jax.process_index()
    who, what = plan.split(":")
    name, at = what.split("@")
    sends = {int(at): getattr(signal, f"SIG{name}")} if int(who) == me else {}

    def send(step, state, record):
        if step in sends:
            os.kill(os.getpid(), sends[step])

    mesh = sh.make_mesh("data=2")
    loader = make_loader()
    ckpt = checkpoint.Checkpointer(directory, save_every=None)
    if ckpt.latest_step() is None:
        state = sh.sharded_init(new_state, jax.random.key(0), mesh=mesh)
    else:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state, data_state, _ = ckpt.restore(checkpoint.abstract_state(CONFIG, OPTIMIZER), shardings=replicated)
        loader.load_state_dict(data_state)
        if loader.state_dict()["step"] in sends:
            send(loader.state_dict()["step"], state, {})
            time.sleep(AGREEMENT_S)
    result = train.fit(
        state, train.make_train_step(loss_fn, OPTIMIZER, mesh=mesh), GlobalBatches(loader, mesh),
        num_steps=MAX_STEPS, log_every=1, callbacks=[send], checkpointer=ckpt,
    )
    # After the agreed stop, a SIGINT to this run's Checkpointer cannot be agreed on again: it
    # interrupts at once, as without eqzoo (it was passed to JAX's service and did nothing).
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)  # the handler runs between bytecodes, well within this
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    ckpt.close()
    # JAX agrees on one step per process: a later Checkpointer here cannot stop on a signal (it
    # would have stopped at the old step number, with no signal), and says so.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.Checkpointer(f"{directory}-later").close()
    return {
        "later_warnings": [str(w.message) for w in caught],
        "later_sigint_interrupts": interrupted,
        "step": int(result.state.step),
        "stopped_early": result.stopped_early,
        "signal": ckpt.stop_signal,
        "latest_step": ckpt.latest_step(),
        "params_sha256": checkpoint.params_sha256(result.state.model),
    }


def without_service(directory: str) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = checkpoint.Checkpointer(directory)
    handlers = {"term_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "int_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler}
    ckpt.close()
    return {"warnings": [str(w.message) for w in caught], **handlers}


def main() -> None:
    directory, plan = sys.argv[1], sys.argv[2]
    jax.config.update("jax_num_cpu_devices", 1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if plan == "no-service":
        jax.config.update("jax_enable_preemption_service", False)
    sh.initialize(initialization_timeout=60)
    out = without_service(directory) if plan == "no-service" else train_until_stopped(directory, plan)
    print(json.dumps({"process": jax.process_index(), **out}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
