"""Overhead of eqzoo.bayes over NumPyro used directly, for the same Bayesian neural network.

The model: an `eqx.nn.MLP` (1 -> 16 -> 16 -> 1, tanh) with Normal(0, 1) priors on every weight
and bias, a learned Gaussian noise scale (HalfNormal(1)), 100 points; the same data and PRNG keys
on every side. Three sides:

- `eqzoo`: `BayesianModel(mlp, 1.0, Gaussian())` with `run_nuts` / `run_svi`;
- `numpyro_eqx`: NumPyro's own `random_eqx_module` on the same `eqx.nn.MLP`, the same
  likelihood, `MCMC(NUTS)` / `SVI` (the bridge's overhead: `nuts_ratio`, `svi_ratio`);
- `numpyro_jnp`: the network written by hand in `jnp`, with the bridge's site names in the same
  order, so NUTS follows the same trajectory up to floating-point rounding (the bridge's plus
  Equinox's layer overhead: `*_ratio_vs_jnp`).

Reported: NUTS wall time (compilation included, as a user sees it), NUTS time per leapfrog
step (removes differences in trajectory length) and SVI steps per second (AutoNormal, Adam via
`optax_to_numpyro`). Each side runs `--repeats` times, the sides rotating; ratios use the best
(smallest) time of each side, the usual choice on a shared machine where other load only ever
adds time, and are also given from medians and from process CPU time. Every timed SVI call gets
a new `optax.adam` object, so eqzoo compiles each time, as `SVI.run` does. `svi_refit_*` then
times one more call on new data of the same shape with the optimizer object of the call before
(eqzoo reuses its compiled program; `SVI.run` compiles again) and counts its XLA compilations.
A short untimed run of each side first pays the one-off costs of a fresh process (NumPyro's
eager set-up ops compile on first use), which would otherwise be charged to whichever side runs
first. `--smoke` skips it, runs at the fewest points, draws and steps, and gives its timed eqzoo
SVI fit the refit's optimizer (so the refit's first fit reuses that program), to stay quick in
CI: it checks that every side and path runs, not the figures.

    python benchmarks/bayes_overhead.py --json
    python benchmarks/bayes_overhead.py --smoke --json
"""

import argparse
import json
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import random_eqx_module
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.optim import optax_to_numpyro

import eqzoo.bayes as bayes

WIDTH = 16
PRIOR = 1.0


def data(n: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=(n, 1)).astype(np.float32)
    y = (np.sin(1.5 * x[:, 0]) + 0.15 * rng.normal(size=n)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def mlp() -> eqx.nn.MLP:
    return eqx.nn.MLP(1, "scalar", WIDTH, 2, activation=jnp.tanh, key=jax.random.key(0))


def eqzoo_model() -> bayes.BayesianModel:
    return bayes.BayesianModel(mlp(), PRIOR, bayes.Gaussian(scale_prior=dist.HalfNormal(1.0)))


def numpyro_eqx_model(x, y=None, *, net=mlp()):
    """The same network through NumPyro's own `random_eqx_module`."""
    sampled = random_eqx_module("net", net, prior=dist.Normal(0.0, PRIOR))
    scale = numpyro.sample("noise_scale", dist.HalfNormal(1.0))
    f = jax.vmap(sampled)(x)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Normal(f, scale), obs=y)


def numpyro_jnp_model(x, y=None):
    """The same network and priors, written directly in NumPyro."""

    def normal(shape):
        return dist.Normal(0.0, PRIOR).expand(shape).to_event(len(shape))

    w0 = numpyro.sample("layers[0].weight", normal((WIDTH, 1)))
    b0 = numpyro.sample("layers[0].bias", normal((WIDTH,)))
    w1 = numpyro.sample("layers[1].weight", normal((WIDTH, WIDTH)))
    b1 = numpyro.sample("layers[1].bias", normal((WIDTH,)))
    w2 = numpyro.sample("layers[2].weight", normal((1, WIDTH)))
    b2 = numpyro.sample("layers[2].bias", normal(()))
    scale = numpyro.sample("noise_scale", dist.HalfNormal(1.0))
    h = jnp.tanh(x @ w0.T + b0)
    h = jnp.tanh(h @ w1.T + b1)
    f = (h @ w2.T)[:, 0] + b2
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Normal(f, scale), obs=y)


def nuts_eqzoo(x, y, warmup, samples, key):
    post = bayes.run_nuts(eqzoo_model(), x, y, num_warmup=warmup, num_samples=samples, key=key)
    jax.block_until_ready(post.samples)
    return int(post.num_steps.sum())


def nuts_numpyro(model, x, y, warmup, samples, key):
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, progress_bar=False)
    with jax.numpy_dtype_promotion("standard"):
        mcmc.run(key, x, y, extra_fields=("num_steps",))
    jax.block_until_ready(mcmc.get_samples())
    return int(mcmc.get_extra_fields()["num_steps"].sum())


def svi_eqzoo(x, y, steps, key, optimizer=None):
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    post = bayes.run_svi(
        eqzoo_model(), x, y, num_steps=steps, optimizer=optimizer, num_samples=100, key=key
    )
    jax.block_until_ready(post.samples)
    return float(post.losses[-100:].mean())


def svi_numpyro(model, x, y, steps, key):
    guide = AutoNormal(model, init_scale=0.1)
    svi = SVI(model, guide, optax_to_numpyro(optax.adam(1e-2)), Trace_ELBO())
    fit_key, sample_key = jax.random.split(key)
    with jax.numpy_dtype_promotion("standard"):
        result = svi.run(fit_key, steps, x, y, progress_bar=False)
        draws = guide.sample_posterior(sample_key, result.params, x, y, sample_shape=(100,))
    jax.block_until_ready(draws)
    return float(result.losses[-100:].mean())


COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: (
        COMPILES.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)


def refit(x, y, steps, optimizer):
    """Wall time and XLA compilations of a second SVI fit on new data of the same shape, with
    `optimizer` (a new one: its first fit here compiles; under --smoke, the one the timed eqzoo
    fit used, whose program this first fit then reuses)."""
    x2, y2 = x[::-1], y[::-1] + 0.1
    svi_eqzoo(x, y, steps, jax.random.key(7), optimizer)
    out = {}
    for side, fn in (
        ("eqzoo", lambda: svi_eqzoo(x2, y2, steps, jax.random.key(8), optimizer)),
        ("numpyro_eqx", lambda: svi_numpyro(numpyro_eqx_model, x2, y2, steps, jax.random.key(8))),
    ):
        before = len(COMPILES)
        wall = timed(fn)[0]
        out[f"svi_refit_s_{side}"] = round(wall, 3)
        out[f"svi_refit_compiles_{side}"] = len(COMPILES) - before
    return out


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, quick run")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    # --smoke only runs every code path (its figures are not checked): the fewest points, draws
    # and steps that do; its time is the compilations, which these sizes do not change.
    n = 8 if args.smoke else 100
    warmup, samples = (5, 5) if args.smoke else (500, 500)
    steps = 10 if args.smoke else 5000
    repeats = args.repeats or (1 if args.smoke else 3)
    x, y = data(n)

    sides = ("eqzoo", "numpyro_eqx", "numpyro_jnp")
    models = {"numpyro_eqx": numpyro_eqx_model, "numpyro_jnp": numpyro_jnp_model}

    # --smoke: the timed eqzoo SVI fit uses refit's optimizer, so refit's first fit reuses its
    # program (one compilation of ~6 s less; the full run gives every timed fit a new optimizer).
    refit_optimizer = optax.adam(1e-2)
    smoke_svi = {"optimizer": refit_optimizer} if args.smoke else {}

    def run(kind, side, *args):
        if side == "eqzoo":
            return nuts_eqzoo(x, y, *args) if kind == "nuts" else svi_eqzoo(x, y, *args, **smoke_svi)
        return (nuts_numpyro if kind == "nuts" else svi_numpyro)(models[side], x, y, *args)

    # Untimed: one-off costs of a fresh process. Each warm-up run compiles anew (~6 s on a CPU
    # core), so --smoke skips it (the sides' figures are not compared there).
    for side in () if args.smoke else sides:
        run("nuts", side, 5, 5, jax.random.key(99))
        run("svi", side, 10, jax.random.key(99))

    wall = {k: {s: [] for s in sides} for k in ("nuts", "svi")}
    cpu = {k: {s: [] for s in sides} for k in ("nuts", "svi")}
    leapfrog = {s: [] for s in sides}
    loss = {}
    for r in range(repeats):
        key = jax.random.key(r)
        order = sides[r % 3 :] + sides[: r % 3]
        for kind, extra in (("nuts", (warmup, samples)), ("svi", (steps,))):
            for side in order:
                w, c, out = timed(run, kind, side, *extra, key)
                wall[kind][side].append(w)
                cpu[kind][side].append(c)
                if kind == "nuts":
                    leapfrog[side].append(out)
                else:
                    loss[side] = out
        if not args.json:
            print(
                f"repeat {r}: "
                + ", ".join(
                    f"{k} {s} {wall[k][s][-1]:.2f}s" for k in ("nuts", "svi") for s in sides
                )
            )

    def best(d, kind, side, agg=min):
        return agg(d[kind][side])

    def per_step(side):
        return min(t / n for t, n in zip(wall["nuts"][side], leapfrog[side], strict=True))

    def ratio(kind, ref, d=wall, agg=min):
        return round(best(d, kind, "eqzoo", agg) / best(d, kind, ref, agg), 3)

    med = statistics.median

    summary = {
        "benchmark": "bayes_overhead",
        "smoke": args.smoke,
        "device": jax.devices()[0].platform,
        "model": f"MLP 1-{WIDTH}-{WIDTH}-1 tanh, {n} points",
        "nuts_warmup": warmup,
        "nuts_samples": samples,
        "nuts_s_eqzoo": round(best(wall, "nuts", "eqzoo"), 3),
        "nuts_s_numpyro_eqx": round(best(wall, "nuts", "numpyro_eqx"), 3),
        "nuts_s_numpyro_jnp": round(best(wall, "nuts", "numpyro_jnp"), 3),
        "nuts_ratio": ratio("nuts", "numpyro_eqx"),
        "nuts_median_ratio": ratio("nuts", "numpyro_eqx", wall, med),
        "nuts_cpu_ratio": ratio("nuts", "numpyro_eqx", cpu),
        "nuts_ratio_vs_jnp": ratio("nuts", "numpyro_jnp"),
        "nuts_cpu_ratio_vs_jnp": ratio("nuts", "numpyro_jnp", cpu),
        "nuts_us_per_leapfrog_eqzoo": round(1e6 * per_step("eqzoo"), 2),
        "nuts_us_per_leapfrog_numpyro_eqx": round(1e6 * per_step("numpyro_eqx"), 2),
        "nuts_us_per_leapfrog_numpyro_jnp": round(1e6 * per_step("numpyro_jnp"), 2),
        "nuts_leapfrog_steps": {s: leapfrog[s][-1] for s in sides},
        "svi_steps": steps,
        "svi_steps_per_s_eqzoo": round(steps / best(wall, "svi", "eqzoo"), 1),
        "svi_steps_per_s_numpyro_eqx": round(steps / best(wall, "svi", "numpyro_eqx"), 1),
        "svi_steps_per_s_numpyro_jnp": round(steps / best(wall, "svi", "numpyro_jnp"), 1),
        "svi_ratio": ratio("svi", "numpyro_eqx"),
        "svi_median_ratio": ratio("svi", "numpyro_eqx", wall, med),
        "svi_cpu_ratio": ratio("svi", "numpyro_eqx", cpu),
        "svi_ratio_vs_jnp": ratio("svi", "numpyro_jnp"),
        "svi_cpu_ratio_vs_jnp": ratio("svi", "numpyro_jnp", cpu),
        "svi_final_loss": {s: round(loss[s], 2) for s in sides},
        **refit(x, y, steps, refit_optimizer),
        "repeats": repeats,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
