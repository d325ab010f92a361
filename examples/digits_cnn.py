"""Classify scikit-learn's 8x8 handwritten digits with an eqzoo CNN (BatchNorm, stateful).

The 1,797 bundled images (`sklearn.datasets.load_digits`, nothing downloaded) are split into
train and test sets fixed by `--seed`, normalised with the training set's mean and standard
deviation, and fed by an `eqzoo.data.ArrayLoader`. The model is the `cnn-digits` preset: its
BatchNorm statistics live in an `eqx.nn.State` that `eqzoo.train.make_train_step` threads
through the step; `eqzoo.train.make_eval_step` scores it in inference mode (running statistics).

    python examples/digits_cnn.py                # ~99.7% test accuracy in ~10 s on 2 CPU cores
    python examples/digits_cnn.py --smoke --json
"""

import argparse
import json
import time
from typing import Any

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    from eqzoo import data, models, train

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_FRACTION = 0.2


def load(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and test sets as `{"x": float32 (n, 1, 8, 8), "y": int32 (n,)}`, normalised with
    the training set's statistics."""
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # (n, 1, 8, 8), values 0..16
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()
    norm = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return {"x": norm(x_tr), "y": y_tr}, {"x": norm(x_te), "y": y_te}


def with_batch_statistics(
    model: models.CNN, state: eqx.nn.State
) -> tuple[models.CNN, eqx.nn.State]:
    """The model with its BatchNorms normalising by the current batch's statistics while
    training (what PyTorch and Flax do), and a fresh state for it.

    eqzoo's `ConvBlock` now uses `eqx.nn.BatchNorm(mode="batch")`, which already does this, so
    this returns the model unchanged; it is kept for models built with `mode="ema"`, whose
    training-time normalisation by a running average diverged on this problem. With
    `momentum=0` that "running average" is the current batch; `calibrate` then sets the
    statistics used at inference.
    """
    is_norm = lambda x: isinstance(x, eqx.nn.BatchNorm)  # noqa: E731
    norms = lambda m: [x for x in jax.tree.leaves(m, is_leaf=is_norm) if is_norm(x)]  # noqa: E731
    old = norms(model)
    if all(n.mode == "batch" for n in old):
        return model, state
    new = [
        eqx.nn.BatchNorm(n.input_size, n.axis_name, eps=n.eps, momentum=0.0, mode="ema")
        for n in old
    ]
    model = eqx.tree_at(norms, model, new)
    # As eqx.nn.make_with_state does: the state takes the initial statistics out of the model.
    return eqx.nn.delete_init_state(model), eqx.nn.State(model)


@eqx.filter_jit
def calibrate(model: models.CNN, model_state: eqx.nn.State, x: jax.Array) -> eqx.nn.State:
    """BatchNorm statistics of the whole training set under the final weights ("precise
    BatchNorm", Wu & Johnson 2021): one forward pass in training mode, one batch."""
    forward = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return forward(x, model_state)[1]


def loss_fn(model: models.CNN, model_state: Any, batch: dict[str, jax.Array], key: Any):
    """Cross-entropy of a batch; BatchNorm averages over the vmapped `"batch"` axis and returns
    the updated running statistics. **Returns:** `(loss, model_state, {"accuracy": ...})`."""
    forward = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, model_state = forward(batch["x"], model_state)  # (batch, classes)
    loss = train.cross_entropy(logits, batch["y"])
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32))
    return loss, model_state, {"accuracy": accuracy}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.smoke else 20)
    start = time.perf_counter()

    train_set, test_set = load(args.seed)
    config = models.get_config("cnn-digits", widths=(16, 32)) if args.smoke else models.get_config("cnn-digits")
    key_model, key_train = jax.random.split(jax.random.key(args.seed))
    model, model_state = models.create(config, key=key_model)
    model, model_state = with_batch_statistics(model, model_state)

    loader = data.ArrayLoader(train_set, batch_size=args.batch_size, seed=args.seed)
    num_steps = epochs * loader.steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, num_steps // 20), decay_steps=num_steps
    )
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    state = train.TrainState.create(model, optimizer, key=key_train, model_state=model_state)
    train_step = train.make_train_step(loss_fn, optimizer)
    eval_step = train.make_eval_step(loss_fn)  # runs the model in inference mode

    # Each split is one eval batch (a few hundred 8x8 images), so accuracies are exact.
    result = train.fit(
        state, train_step, loader, num_steps=num_steps,
        eval_step=eval_step, eval_batches=lambda: [test_set], eval_every=loader.steps_per_epoch,
        log_every=loader.steps_per_epoch,
        loggers=[train.ConsoleLogger(num_steps, keys=("train/loss", "eval/loss", "eval/accuracy"))],
    )
    final = result.state
    final = final.replace(model_state=calibrate(final.model, final.model_state, jnp.asarray(train_set["x"])))
    test_accuracy = float(eval_step(final, test_set)["accuracy"])
    train_accuracy = float(eval_step(final, train_set)["accuracy"])

    summary = {
        "example": "digits_cnn",
        "smoke": args.smoke,
        "epochs": epochs,
        "steps": num_steps,
        "num_train": int(train_set["y"].shape[0]),
        "num_test": int(test_set["y"].shape[0]),
        "train_loss": result.last("train/loss"),
        "test_loss": result.last("eval/loss"),
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"test accuracy {test_accuracy:.2%} (train {train_accuracy:.2%}) after {epochs} epochs "
            f"in {summary['seconds']:.0f}s"
        )
    return summary


if __name__ == "__main__":
    main()
