"""Classify scikit-learn's 8x8 handwritten digits with an eqzoo Vision Transformer.

The 1,797 bundled images (`sklearn.datasets.load_digits`, nothing downloaded) are split into
train and test sets fixed by `--seed`, normalised with the training set's mean and standard
deviation, and fed by an `eqzoo.data.ArrayLoader`. The model is the `tiny-vit` preset: 16 patches
of 2x2 pixels plus a class token, four pre-norm transformer blocks of width 64 (136K
parameters). It is stateless, so `eqzoo.train.classification_loss` trains it as it is, with
AdamW under a warmup + cosine schedule and gradient clipping, and `eqzoo.train.make_eval_step`
scores it. Without a convolution's built-in translation prior it needs more epochs than
`digits_cnn.py` (99.7%) and ends a little lower.

    python examples/digits_vit.py                # 97.2% test accuracy (100% train) in 46 s on 2 CPU cores
    python examples/digits_vit.py --smoke --json
"""

import argparse
import json
import time
from typing import Any

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    from eqzoo import data, models, train

import jax
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    args = parser.parse_args(argv)
    epochs = args.epochs or (6 if args.smoke else 50)
    start = time.perf_counter()

    train_set, test_set = load(args.seed)
    config = models.get_config("tiny-vit")
    key_model, key_train = jax.random.split(jax.random.key(args.seed))
    model = models.create(config, key=key_model)

    loader = data.ArrayLoader(train_set, batch_size=args.batch_size, seed=args.seed)
    num_steps = epochs * loader.steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, num_steps // 10), decay_steps=num_steps
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=args.weight_decay))
    state = train.TrainState.create(model, optimizer, key=key_train)
    train_step = train.make_train_step(train.classification_loss, optimizer)
    eval_step = train.make_eval_step(train.classification_loss)

    # Each split is one eval batch (a few hundred 8x8 images), so accuracies are exact.
    result = train.fit(
        state, train_step, loader, num_steps=num_steps,
        eval_step=eval_step, eval_batches=lambda: [test_set], eval_every=5 * loader.steps_per_epoch,
        log_every=loader.steps_per_epoch,
        loggers=[train.ConsoleLogger(num_steps, keys=("train/loss", "eval/loss", "eval/accuracy"))],
    )
    final = result.state
    test_accuracy = float(eval_step(final, test_set)["accuracy"])
    train_accuracy = float(eval_step(final, train_set)["accuracy"])

    summary = {
        "example": "digits_vit",
        "smoke": args.smoke,
        "epochs": epochs,
        "steps": num_steps,
        "num_params": config.num_params(),
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
