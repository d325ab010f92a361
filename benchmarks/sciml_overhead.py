"""Training-step throughput of the neural ODE example model: eqzoo vs raw Diffrax vs torchdiffeq.

The model is the one of examples/neural_ode.py: an MLP vector field (2 -> 64 -> 64 -> 2,
softplus) fitted to Lotka–Volterra trajectories, a batch of trajectories per step, mean squared
error, Adam. Three implementations of the same step, all with the Dormand–Prince 5(4) solver
(`diffrax.Dopri5` / torchdiffeq's `dopri5`), the same tolerances, the same initial weights and
data, and gradients by backpropagation through the solver:

- `eqzoo`: `eqzoo.sciml.NeuralODE(Autonomous(mlp))` vmapped over the batch;
- `diffrax`: the same model written directly with `diffrax.diffeqsolve` and Equinox;
- `torchdiffeq`: `torchdiffeq.odeint` on CPU torch (not an eqzoo dependency: reported as null
  with a reason when it is not importable). torchdiffeq integrates the whole batch as one
  system with one shared step size, the usual way to use it.

Both JAX steps are compiled once and dispatched through `jax.jit` over flat arrays. Timings
interleave the implementations in rounds (in a rotating order); each one's median round gives
the headline figures, its fastest round is reported beside it. Prints
one JSON line.

    python benchmarks/sciml_overhead.py --json
    python benchmarks/sciml_overhead.py --smoke --json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

import eqzoo.sciml as sciml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from neural_ode import lotka_volterra  # noqa: E402  (the example's true system)

WIDTH, DEPTH = 64, 2
RTOL, ATOL = 1e-3, 1e-6
LR = 1e-3


def make_data(num, length, t_end):
    ts = jnp.linspace(0.0, t_end, length)
    y0s = jax.random.uniform(jax.random.key(1), (num, 2), minval=0.6, maxval=2.4)
    truth = sciml.NeuralODE(
        lotka_volterra,
        solver=diffrax.Dopri5(),
        stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
    )
    return ts, y0s, jax.vmap(truth, in_axes=(0, None))(y0s, ts)


def make_mlp():
    return eqx.nn.MLP(2, 2, WIDTH, DEPTH, activation=jax.nn.softplus, key=jax.random.key(0))


class _Direct(eqx.Module):
    """The same model without eqzoo: an MLP and a `diffrax.diffeqsolve` call."""

    mlp: eqx.nn.MLP

    def __call__(self, y0, ts):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: self.mlp(y)),
            diffrax.Dopri5(),
            ts[0],
            ts[-1],
            None,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            adjoint=diffrax.RecursiveCheckpointAdjoint(),
            max_steps=4096,
        )
        return sol.ys


def jax_stepper(model):
    """Partition once, then a jitted step over flat arrays (donated), as eqzoo's train step."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(LR)

    @jax.jit
    def step(params, opt_state, ts, y0s, ys):
        def loss_fn(p):
            m = eqx.combine(p, static)
            pred = jax.vmap(m, in_axes=(0, None))(y0s, ts)
            return jnp.mean((pred - ys) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, optim.init(params)]

    def run(ts, y0s, ys):
        state[0], state[1], loss = step(state[0], state[1], ts, y0s, ys)
        return loss

    def count_eqns(ts, y0s, ys):
        """Primitive applications in the step's program, sub-programs (loops, conds) included:
        a noise-free measure of the work eqzoo adds."""
        jaxpr = jax.make_jaxpr(step)(state[0], state[1], ts, y0s, ys)
        return _count(jaxpr.jaxpr)

    run.count_eqns = count_eqns
    return run


def _count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _count(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _count(sub)
    return total


def torch_stepper(mlp, ts, y0s, ys):
    """The same step with torchdiffeq, or (None, reason)."""
    try:
        import torch
        import torchdiffeq
    except ImportError as err:
        return None, f"torchdiffeq not importable ({err}); pip install torchdiffeq to measure it"

    # One thread: the ops are tiny (64-wide), and intra-op threads only add synchronisation
    # (with 2 threads on a busy 2-core machine a solve was ~50x slower).
    torch.set_num_threads(1)
    layers = [torch.nn.Linear(lin.in_features, lin.out_features) for lin in mlp.layers]
    with torch.no_grad():
        for layer, lin in zip(layers, mlp.layers, strict=True):
            layer.weight.copy_(torch.from_numpy(np.array(lin.weight)))
            layer.bias.copy_(torch.from_numpy(np.array(lin.bias)))

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, t, y):
            for layer in self.layers[:-1]:
                y = torch.nn.functional.softplus(layer(y))
            return self.layers[-1](y)

    field = Field()
    optim = torch.optim.Adam(field.parameters(), lr=LR)
    t_ts = torch.from_numpy(np.array(ts))
    t_y0 = torch.from_numpy(np.array(y0s))
    t_ys = torch.from_numpy(np.array(ys)).transpose(0, 1)  # (times, batch, 2)

    def run(*_):
        optim.zero_grad()
        pred = torchdiffeq.odeint(field, t_y0, t_ts, rtol=RTOL, atol=ATOL, method="dopri5")
        loss = torch.mean((pred - t_ys) ** 2)
        loss.backward()
        optim.step()
        return loss.detach()

    return (
        run,
        f"torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, threads {torch.get_num_threads()}",
    )


def time_round(run, args, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss = run(*args)
    jax.block_until_ready(loss) if not hasattr(loss, "item") else loss.item()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny, quick run")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    num, length, t_end = (4, 20, 3.0) if args.smoke else (16, 61, 10.0)  # as the example
    steps, rounds = (3, 2) if args.smoke else (20, 30)

    ts, y0s, ys = make_data(num, length, t_end)
    mlp = make_mlp()
    eqzoo_model = sciml.NeuralODE(
        sciml.Autonomous(mlp),
        solver=diffrax.Dopri5(),
        stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
        adjoint="recursive",
    )
    runners = {"eqzoo": jax_stepper(eqzoo_model), "diffrax": jax_stepper(_Direct(mlp))}
    torch_run, torch_note = torch_stepper(mlp, ts, y0s, ys)
    if torch_run is not None:
        runners["torchdiffeq"] = torch_run

    eqns = {name: runners[name].count_eqns(ts, y0s, ys) for name in ("eqzoo", "diffrax")}
    compile_s = {}
    for name, run in runners.items():
        start = time.perf_counter()
        jax.block_until_ready(run(ts, y0s, ys)) if name != "torchdiffeq" else run()
        compile_s[name] = round(time.perf_counter() - start, 3)

    times = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        # Rotate the order every round so no implementation always follows the same one.
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(time_round(runners[name], (ts, y0s, ys), steps))
    step_s = {name: statistics.median(v) for name, v in times.items()}
    best_s = {name: min(v) for name, v in times.items()}

    summary = {
        "benchmark": "sciml_overhead",
        "smoke": args.smoke,
        "problem": f"Lotka-Volterra, {num} trajectories x {length} times on [0, {t_end}]",
        "model": f"MLP 2-{WIDTH}x{DEPTH}-2 softplus",
        "solver": "dopri5",
        "rtol": RTOL,
        "atol": ATOL,
        "steps_per_round": steps,
        "rounds": rounds,
        "eqzoo_steps_per_s": round(1 / step_s["eqzoo"], 2),
        "diffrax_steps_per_s": round(1 / step_s["diffrax"], 2),
        "eqzoo_over_diffrax_time": round(step_s["eqzoo"] / step_s["diffrax"], 3),
        "eqzoo_over_diffrax_time_best": round(best_s["eqzoo"] / best_s["diffrax"], 3),
        "step_ms_median": {k: round(1000 * v, 3) for k, v in step_s.items()},
        "jaxpr_eqns": eqns,
        "torchdiffeq": None,
        "compile_s": compile_s,
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.machine(),
    }
    if "torchdiffeq" in step_s:
        summary["torchdiffeq"] = {
            "steps_per_s": round(1 / step_s["torchdiffeq"], 2),
            "time_over_eqzoo": round(step_s["torchdiffeq"] / step_s["eqzoo"], 3),
            "note": torch_note,
        }
    else:
        summary["torchdiffeq_reason"] = torch_note
    if not args.json:
        for name, s in step_s.items():
            print(f"{name:12s} {1 / s:8.2f} steps/s  ({1000 * s:.1f} ms/step)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
