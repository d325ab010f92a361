"""A small CNN on scikit-learn's 8x8 digits, then a Bayesian last layer on its features.

The CNN is trained as usual (optax + `eqx.filter_jit`); its final linear layer is then replaced
by a Bayesian one whose posterior is sampled with NUTS on the trunk's features (the trunk runs
once). We compare accuracy, expected calibration error and NLL of the deterministic and the
Bayesian heads on a held-out split, and draw a reliability diagram.

    python examples/bayesian_digits.py            # full run, plot in runs/bayesian_digits/
    python examples/bayesian_digits.py --smoke --json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import jaxtyping  # noqa: E402

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    import eqzoo.bayes as bayes

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jaxtyping import Array, Float, PRNGKeyArray  # noqa: E402


class Trunk(eqx.Module):
    """Two conv blocks and a dense layer: (1, 8, 8) image -> (features,) vector."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    dense: eqx.nn.Linear
    pool: eqx.nn.MaxPool2d = eqx.field(static=True)

    def __init__(self, features: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k2)
        self.dense = eqx.nn.Linear(32 * 2 * 2, features, key=k3)
        self.pool = eqx.nn.MaxPool2d(2, 2)

    def __call__(self, x: Float[Array, "1 8 8"]) -> Float[Array, " features"]:
        h = self.pool(jax.nn.relu(self.conv1(x)))  # (16, 4, 4)
        h = self.pool(jax.nn.relu(self.conv2(h)))  # (32, 2, 2)
        return jax.nn.relu(self.dense(h.reshape(-1)))


class Net(eqx.Module):
    trunk: Trunk
    head: eqx.nn.Linear

    def __init__(self, features: int, classes: int, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.trunk = Trunk(features, key=k1)
        self.head = eqx.nn.Linear(features, classes, key=k2)

    def __call__(self, x: Float[Array, "1 8 8"]) -> Float[Array, " classes"]:
        return self.head(self.trunk(x))


def load(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn: nothing is downloaded
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
    y = digits.target.astype(np.int32)
    return tuple(train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y))


def train(net: Net, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> Net:
    opt = optax.adamw(3e-3, weight_decay=1e-4)
    opt_state = opt.init(eqx.filter(net, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(net, opt_state, xb, yb):
        def loss_fn(net):
            logits = jax.vmap(net)(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(net)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(net, eqx.is_inexact_array))
        return eqx.apply_updates(net, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    batch = 64
    for _ in range(steps):
        idx = rng.choice(len(x), size=batch, replace=False)
        net, opt_state, _ = step(net, opt_state, x[idx], y[idx])
    return net


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a small, fast run (CI)")
    p.add_argument("--json", action="store_true", help="print one JSON summary line last")
    p.add_argument("--out", type=Path, default=Path("runs/bayesian_digits"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="CNN training steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    smoke = args.smoke
    steps = args.steps or (150 if smoke else 1500)
    features = 16 if smoke else 32
    start = time.perf_counter()

    x_train, x_test, y_train, y_test = load(args.seed)
    key = jax.random.key(args.seed)
    init_key, bayes_key, pred_key = jax.random.split(key, 3)
    net = train(Net(features, 10, key=init_key), x_train, y_train, steps, args.seed)
    train_s = time.perf_counter() - start

    det_probs = jax.nn.softmax(jax.vmap(net)(x_test), axis=-1)
    det = scores(det_probs, y_test)

    t0 = time.perf_counter()
    last = bayes.fit_last_layer(
        net.trunk,
        x_train,
        y_train,
        bayes.Categorical(),
        method="nuts",
        num_outputs=10,
        prior_scale=1.0,
        standardize=True,
        num_warmup=150 if smoke else 400,
        num_samples=150 if smoke else 400,
        num_chains=2,
        key=bayes_key,
    )
    bayes_s = time.perf_counter() - t0
    pred = last.predict(x_test, key=pred_key)
    bay = scores(pred.mean, y_test)
    fs = pred.function_space_diagnostics()

    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "bayesian_digits_reliability.png"
    plot(plot_path, det_probs, pred.mean, y_test, det, bay)

    summary = {
        "example": "bayesian_digits",
        "smoke": smoke,
        "train_examples": int(len(y_train)),
        "test_examples": int(len(y_test)),
        "train_steps": steps,
        "det_accuracy": det["accuracy"],
        "det_ece": det["ece"],
        "det_nll": det["nll"],
        "bayes_accuracy": bay["accuracy"],
        "bayes_ece": bay["ece"],
        "bayes_nll": bay["nll"],
        "bayes_r_hat_max": round(fs["r_hat_max"], 4),
        "bayes_ess_min": round(fs["ess_min"], 1),
        "train_s": round(train_s, 1),
        "bayes_s": round(bayes_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "plot": str(plot_path),
    }
    (args.out / "summary.json").write_text(json.dumps(summary) + "\n")
    if not args.json:
        for k, v in summary.items():
            print(f"{k:>18}: {v}")
    print(json.dumps(summary))
    return summary


def scores(probs: Array, labels: np.ndarray) -> dict[str, float]:
    labels = jnp.asarray(labels)
    nll = -jnp.log(jnp.take_along_axis(probs, labels[:, None], axis=1) + 1e-12).mean()
    return {
        "accuracy": round(float((probs.argmax(-1) == labels).mean()), 4),
        "ece": round(float(bayes.expected_calibration_error(probs, labels, num_bins=10)), 4),
        "nll": round(float(nll), 4),
    }


def plot(path: Path, det_probs, bayes_probs, labels, det, bay) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.4), dpi=110, sharey=True)
    labels = jnp.asarray(labels)
    for ax, probs, name, s in (
        (axes[0], det_probs, "deterministic head", det),
        (axes[1], bayes_probs, "Bayesian last layer (NUTS)", bay),
    ):
        conf, acc, count = bayes.reliability_diagram(probs, labels, num_bins=10)
        centers = (np.arange(10) + 0.5) / 10
        used = np.asarray(count) > 0
        ax.bar(
            centers[used],
            np.asarray(acc)[used],
            width=0.1,
            edgecolor="k",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        bars = zip(centers[used], np.asarray(acc)[used], np.asarray(count)[used], strict=True)
        for cx, a, k in bars:
            ax.text(cx, min(float(a), 0.93) + 0.02, str(int(k)), ha="center", fontsize=6)
        ax.plot(
            np.asarray(conf)[used],
            np.asarray(acc)[used],
            "o",
            color="tab:red",
            ms=3,
            label="(confidence, accuracy)",
        )
        ax.set_title(f"{name}\nacc {s['accuracy']:.3f}, ECE {s['ece']:.3f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy (numbers: test examples per bin)")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
