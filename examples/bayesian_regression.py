"""A Bayesian neural network on 1-D regression with a gap in the data, sampled with NUTS.

The posterior predictive band should widen inside the gap, where the data say nothing, and
cover about 90% of held-out points elsewhere. Convergence is checked in function space: R-hat
and effective sample size of the posterior mean function at test inputs, over several chains
(weight-space R-hat is meaningless for networks whose hidden units can be permuted).

    python examples/bayesian_regression.py            # full run, plot in runs/bayesian_regression/
    python examples/bayesian_regression.py --smoke --json
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
import numpyro.distributions as dist  # noqa: E402

NOISE = 0.15


def true_function(x: np.ndarray) -> np.ndarray:
    return np.sin(1.5 * x) + 0.3 * x


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs in [-3, -1] and [1, 3] (a gap in the middle), noisy targets."""
    rng = np.random.default_rng(seed)
    side = rng.choice([-1.0, 1.0], size=n)
    x = side * rng.uniform(1.0, 3.0, size=n)
    y = true_function(x) + NOISE * rng.normal(size=n)
    return x[:, None].astype(np.float32), y.astype(np.float32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a small, fast run (CI)")
    p.add_argument("--json", action="store_true", help="print one JSON summary line last")
    p.add_argument("--out", type=Path, default=Path("runs/bayesian_regression"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    smoke = args.smoke
    chains = args.chains or (2 if smoke else 4)
    warmup = args.warmup or (200 if smoke else 500)
    samples = args.samples or (200 if smoke else 500)
    width = 8 if smoke else 16
    start = time.perf_counter()

    x, y = make_data(40 if smoke else 80, args.seed)
    x_test, y_test = make_data(400, args.seed + 1)  # held out, same input distribution
    grid = np.linspace(-4.5, 4.5, 61 if smoke else 121, dtype=np.float32)[:, None]

    key = jax.random.key(args.seed)
    init_key, nuts_key, pred_key = jax.random.split(key, 3)
    net = eqx.nn.MLP(1, "scalar", width, 1, activation=jnp.tanh, key=init_key)
    model = bayes.BayesianModel(
        net,
        {"*.weight": bayes.FanInNormal(1.5), "*.bias": 1.5},
        bayes.Gaussian(scale_prior=dist.HalfNormal(0.5)),
    )
    posterior = bayes.run_nuts(
        model,
        x,
        y,
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        target_accept_prob=0.9,
        key=nuts_key,
    )
    sample_s = time.perf_counter() - start

    test = posterior.predict(x_test, key=pred_key, prob=0.9)
    coverage = float(bayes.interval_coverage(y_test, test.lower, test.upper))
    rmse = float(jnp.sqrt(jnp.mean((test.mean - y_test) ** 2)))
    nlpd = float(bayes.negative_log_predictive_density(posterior.log_likelihood(x_test, y_test)))
    crps = float(bayes.crps_samples(y_test, test.samples))
    band = posterior.predict(grid, key=pred_key, prob=0.9)
    fs = band.function_space_diagnostics()  # R-hat/ESS of the mean function over the grid
    ws = posterior.diagnostics()

    gap = np.abs(grid[:, 0]) < 0.7
    gap_width = float(jnp.mean((band.upper - band.lower)[gap]))
    data_width = float(jnp.mean((band.upper - band.lower)[~gap & (np.abs(grid[:, 0]) < 3)]))

    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "bayesian_regression.png"
    plot(plot_path, x, y, grid, band)

    summary = {
        "example": "bayesian_regression",
        "smoke": smoke,
        "chains": chains,
        "warmup": warmup,
        "samples_per_chain": samples,
        "coverage_90": round(coverage, 4),
        "rmse": round(rmse, 4),
        "nlpd": round(nlpd, 4),
        "crps": round(crps, 4),
        "r_hat_max": round(fs["r_hat_max"], 4),
        "ess_min": round(fs["ess_min"], 1),
        "weight_space_r_hat_max": round(ws["r_hat_max"], 3),
        "divergences": ws["divergences"],
        "band_width_gap": round(gap_width, 3),
        "band_width_data": round(data_width, 3),
        "sample_s": round(sample_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "plot": str(plot_path),
    }
    (args.out / "summary.json").write_text(json.dumps(summary) + "\n")
    if not args.json:
        for k, v in summary.items():
            print(f"{k:>24}: {v}")
    print(json.dumps(summary))
    return summary


def plot(path: Path, x, y, grid, band) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = grid[:, 0]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.fill_between(
        g, band.lower, band.upper, color="tab:blue", alpha=0.25, label="90% predictive band"
    )
    ax.plot(g, band.mean, color="tab:blue", lw=2, label="posterior mean")
    ax.plot(g, true_function(g), color="k", lw=1, ls="--", label="true function")
    ax.scatter(x[:, 0], y, s=10, color="tab:red", zorder=3, label="training data")
    ax.axvspan(-1, 1, color="0.9", zorder=0)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("BNN (NUTS) on data with a gap")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
