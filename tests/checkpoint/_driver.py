"""A tiny, complete training job for the kill-and-resume tests: run it, kill it, run it again.

    python tests/checkpoint/_driver.py --dir CKPT --log LOSSES.jsonl --steps 40 --save-every 4

Trains a small MLP classifier on a synthetic dataset (several epochs of an `ArrayLoader`) with
`eqzoo.train.fit` and a `Checkpointer`, resuming from the newest committed step in `--dir` when
there is one. Every step's loss is appended to `--log`. The loss weights examples at random with
the state's key, so a wrongly restored key changes the losses. (An MLP rather than a GPT keeps
XLA's compile time, paid by every process, small.) `--die-after-save K` SIGKILLs the process right after
the (asynchronous) save of step K is started, i.e. while it is being written. On exit the last
stdout line is a JSON summary.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqzoo import checkpoint, models, train
from eqzoo.data import ArrayLoader

CONFIG = models.MLPConfig(in_features=8, out_features=4, width=16, depth=1)


def optimizer():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=4, decay_steps=100)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))


def loss_fn(model, batch, key):
    weights = jax.random.bernoulli(key, 0.8, batch["y"].shape).astype(jnp.float32)
    return train.cross_entropy(jax.vmap(model)(batch["x"]), batch["y"], weights)


def make_loader() -> ArrayLoader:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, CONFIG.in_features)).astype(np.float32)
    y = rng.integers(0, CONFIG.out_features, size=96).astype(np.int32)
    return ArrayLoader({"x": x, "y": y}, batch_size=8, seed=0)


def _held_if_named(fn, final: str):
    def held(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst).rstrip("/")) == final:
            threading.Event().wait()  # until the process is killed
        return fn(src, dst, *args, **kwargs)

    return held


class DieAfterSave:
    """Wraps a Checkpointer: SIGKILL this process right after the save of step `die_at` starts."""

    def __init__(self, inner: checkpoint.Checkpointer, die_at: int | None, directory: str):
        self.inner, self.die_at, self.directory = inner, die_at, directory

    def maybe_save(self, state, batches, *, force=False, step=None):
        if step == self.die_at:
            # The save's background commit must not finish before the kill. Keeping the GIL on
            # this thread (a long switch interval) was not enough on a loaded machine (CI saw
            # the step committed first), so the commit's rename of the step's temporary directory
            # to its final name waits until the kill.
            sys.setswitchinterval(30.0)
            for name in ("rename", "replace"):
                setattr(os, name, _held_if_named(getattr(os, name), str(self.die_at)))
        saved = self.inner.maybe_save(state, batches, force=force, step=step)
        if saved and step == self.die_at:
            # The save's temporary directory may be created by its background thread: wait for
            # it (sleeping hands that thread the GIL), so the kill finds the save in flight even
            # on a loaded machine (a loaded run once killed before the directory existed).
            tmp = os.path.join(self.directory, f"{self.die_at}.orbax-checkpoint-tmp")
            deadline = time.monotonic() + 60.0
            while not os.path.exists(tmp) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    def should_stop(self):
        return self.inner.should_stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--die-after-save", type=int, default=None)
    parser.add_argument("--fallback", action="store_true")
    args = parser.parse_args()

    loader = make_loader()
    opt = optimizer()
    ckpt = checkpoint.Checkpointer(args.dir, save_every=args.save_every, keep_last=3, fallback_to_intact=args.fallback)
    resumed_from = ckpt.latest_step()
    if resumed_from is None:
        model = models.create(CONFIG, key=jax.random.key(0))
        state = train.TrainState.create(model, opt, key=jax.random.key(1))
    else:
        restored = ckpt.restore(checkpoint.abstract_state(CONFIG, opt))
        state = restored.state
        loader.load_state_dict(restored.data_state)
        resumed_from = restored.meta.step
    step_fn = train.make_train_step(loss_fn, opt)
    result = train.fit(
        state, step_fn, loader, num_steps=args.steps, log_every=1,
        loggers=[train.JSONLLogger(args.log)], checkpointer=DieAfterSave(ckpt, args.die_after_save, args.dir),
    )
    ckpt.close()
    print(json.dumps({
        "resumed_from": resumed_from,
        "step": int(result.state.step),
        "stopped_early": result.stopped_early,
        "signal": ckpt.stop_signal,
        "params_sha256": checkpoint.params_sha256(result.state.model),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
