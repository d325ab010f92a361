"""Generate scikit-learn's 8x8 handwritten digits with a class-conditional diffusion model.

The 1,797 bundled images (`sklearn.datasets.load_digits`, nothing downloaded) are scaled to
[-1, 1] and split into train and test sets fixed by `--seed`. A `tiny-dit` (or, with
`--model unet`, a `tiny-unet`) learns to predict the noise added to the training digits
(`eqzoo.diffusion.make_diffusion_loss`, labels dropped 10% of the time so it also learns the
unconditional prediction), trained by `eqzoo.train.fit`. Then it draws digits of every class with
DDIM and classifier-free guidance (`eqzoo.diffusion.sample`, one compiled `lax.scan`).

Quality is measured with a real classifier: a logistic regression fitted on the real training
digits labels each generated image, and `sample_accuracy` is the fraction classified as the digit
the sample was conditioned on (chance: 10%); `classifier_test_accuracy` is that classifier's
accuracy on the real test digits, for reference. `eval_loss` is the denoising loss on the test
digits at fixed timesteps and noise (`eval_loss_init`: the same before training, ~1.0).

    python examples/digits_diffusion.py              # DiT (316,676 parameters): 100% of 500
                                                     # guided samples (w=2) classified as their
                                                     # label, the classifier 96.9% on real test
                                                     # digits; eval loss 0.998 -> 0.131; 4000
                                                     # steps of 64, 210 s on 2 CPU cores
    python examples/digits_diffusion.py --model unet # UNet (702,753): 100% guided, 95.2% at w=1;
                                                     # eval loss 0.998 -> 0.120; 794 s (226 s of
                                                     # it sampling, before the CPU unroll fix)
    python examples/digits_diffusion.py --smoke --json
"""

import argparse
import json
import time
from typing import Any

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    from eqzoo import data, diffusion, models, train

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

TEST_FRACTION = 0.2
PRESETS = {"dit": "tiny-dit", "unet": "tiny-unet"}


def load(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and test sets as `{"x": float32 (n, 1, 8, 8) in [-1, 1], "y": int32 (n,)}`."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    return {"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te}


def fit_classifier(train_set: dict[str, np.ndarray], seed: int) -> LogisticRegression:
    """A logistic regression on the flattened real training digits (the judge of the samples)."""
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    return clf.fit(train_set["x"].reshape(len(train_set["x"]), -1), train_set["y"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="dit")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (32 with --smoke)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--samples-per-class", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    args = parser.parse_args(argv)
    num_steps = args.steps or (60 if args.smoke else 4000)
    batch_size = args.batch_size or (32 if args.smoke else 64)
    per_class = args.samples_per_class or (5 if args.smoke else 50)
    sample_steps = 20 if args.smoke else args.sample_steps
    start = time.perf_counter()

    train_set, test_set = load(args.seed)
    schedule = diffusion.NoiseSchedule.cosine(1000)
    key_model, key_train, key_eval, key_sample = jax.random.split(jax.random.key(args.seed), 4)
    model = models.create(PRESETS[args.model], key=key_model)
    num_params = models.get_config(PRESETS[args.model]).num_params()

    loader = data.ArrayLoader(train_set, batch_size=batch_size, seed=args.seed)
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup_steps=max(1, num_steps // 20), decay_steps=num_steps)
    optimizer = optax.adamw(lr, weight_decay=0.0)
    state = train.TrainState.create(model, optimizer, key=key_train)
    train_step = train.make_train_step(diffusion.make_diffusion_loss(schedule, label_dropout=0.1), optimizer)

    # The denoising loss on the test digits at one fixed draw of timesteps and noise.
    k_t, k_n = jax.random.split(key_eval)
    x_te, y_te = jnp.asarray(test_set["x"]), jnp.asarray(test_set["y"])
    t_eval = jax.random.randint(k_t, (x_te.shape[0],), 0, schedule.num_timesteps, dtype=jnp.int32)
    noise_eval = jax.random.normal(k_n, x_te.shape)
    eval_loss = eqx.filter_jit(lambda m: diffusion.diffusion_loss(m, schedule, x_te, t_eval, noise_eval, y_te))
    eval_loss_init = float(eval_loss(state.model))

    result = train.fit(
        state, train_step, loader, num_steps=num_steps, log_every=max(1, num_steps // 10),
        loggers=[train.ConsoleLogger(num_steps, keys=("train/loss",))],
    )
    final_model = result.state.model
    final_eval_loss = float(eval_loss(final_model))
    train_seconds = time.perf_counter() - start

    labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), per_class)

    def generate(guidance: float) -> np.ndarray:
        images = diffusion.sample(
            final_model, schedule, key=key_sample, shape=(labels.shape[0], 1, 8, 8), labels=labels,
            steps=sample_steps, method="ddim", guidance_scale=guidance, clip_x0=1.0,
            # XLA:CPU runs convolutions inside a loop ~15x slower: unroll the UNet's loop there.
            unroll=args.model == "unet" and jax.default_backend() == "cpu",
        )
        return np.asarray(jax.block_until_ready(images))

    sample_start = time.perf_counter()
    images = generate(args.guidance)
    sample_seconds = time.perf_counter() - sample_start
    unguided = generate(1.0)

    classifier = fit_classifier(train_set, args.seed)
    test_accuracy = float(classifier.score(test_set["x"].reshape(len(test_set["x"]), -1), test_set["y"]))
    accuracy = lambda imgs: float(np.mean(classifier.predict(imgs.reshape(len(imgs), -1)) == np.asarray(labels)))  # noqa: E731
    sample_accuracy, unguided_accuracy = accuracy(images), accuracy(unguided)

    summary = {
        "example": "digits_diffusion",
        "smoke": args.smoke,
        "model": args.model,
        "num_params": num_params,
        "steps": num_steps,
        "batch_size": batch_size,
        "num_train": int(train_set["y"].shape[0]),
        "train_loss": result.last("train/loss"),
        "eval_loss_init": eval_loss_init,
        "eval_loss": final_eval_loss,
        "num_samples": int(labels.shape[0]),
        "sample_steps": sample_steps,
        "guidance_scale": args.guidance,
        "sample_accuracy": sample_accuracy,
        "sample_accuracy_unguided": unguided_accuracy,
        "classifier_test_accuracy": test_accuracy,
        "train_seconds": round(train_seconds, 2),
        "sample_seconds": round(sample_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{sample_accuracy:.1%} of {labels.shape[0]} generated digits classified as their label "
            f"(chance 10%; the classifier scores {test_accuracy:.1%} on real test digits); eval loss "
            f"{eval_loss_init:.3f} -> {final_eval_loss:.3f} after {num_steps} steps in {summary['seconds']:.0f}s"
        )
    return summary


if __name__ == "__main__":
    main()
