"""Learn the Lotka–Volterra predator–prey system from trajectories with an eqzoo NeuralODE.

Training data are trajectories from several initial conditions, generated with Diffrax from the
true equations on t in [0, T_train]. The learned vector field is an MLP; the fit is scored on
the training window and, beyond it, on (T_train, T_end] (extrapolation). Writes a plot of true
vs learned trajectories to --out.

    python examples/neural_ode.py            # full run (a couple of minutes on 2 CPU cores)
    python examples/neural_ode.py --smoke --json
"""

import argparse
import json
import time
from pathlib import Path

import jaxtyping

with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"):
    import eqzoo.sciml as sciml

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Lotka–Volterra: prey x, predator y.
ALPHA, BETA, GAMMA, DELTA = 1.5, 1.0, 3.0, 1.0
T_TRAIN, T_END = 10.0, 15.0


def lotka_volterra(t, y, args):
    x, z = y[0], y[1]
    return jnp.stack([ALPHA * x - BETA * x * z, -GAMMA * z + DELTA * x * z])


def make_data(key, num, ts):
    """True trajectories from `num` random initial conditions, shape (num, times, 2)."""
    y0s = jax.random.uniform(key, (num, 2), minval=0.6, maxval=2.4)
    truth = sciml.NeuralODE(
        lotka_volterra,
        solver=diffrax.Tsit5(),
        stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
    )
    return y0s, jax.vmap(truth, in_axes=(0, None))(y0s, ts)


def make_model(key, width=64, depth=2, rtol=1e-3, atol=1e-6, solver=None):
    """The learned system: an MLP vector field inside an eqzoo NeuralODE."""
    mlp = eqx.nn.MLP(2, 2, width, depth, activation=jax.nn.softplus, key=key)
    return sciml.NeuralODE(
        sciml.Autonomous(mlp),
        solver=diffrax.Tsit5() if solver is None else solver,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        adjoint="recursive",
    )


def rel_err(pred, true):
    return float(jnp.linalg.norm(pred - true) / jnp.linalg.norm(true))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line last")
    parser.add_argument("--out", type=Path, default=Path("runs/neural_ode"))
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps or (150 if args.smoke else 2500)
    num_traj = 4 if args.smoke else 16
    n_train, n_all = 61, 91  # every 1/6 time unit on [0, T_TRAIN] and on [0, T_END]
    start = time.perf_counter()

    key_data, key_model = jax.random.split(jax.random.key(args.seed))
    ts_all = jnp.linspace(0.0, T_END, n_all)
    ts_train = ts_all[:n_train]
    y0s, truth_all = make_data(key_data, num_traj, ts_all)
    ys = truth_all[:, :n_train]  # the training data: the window [0, T_TRAIN] only
    model = eqx.filter_jit(make_model)(key_model)  # one compiled init, not op by op

    # Phase 1 fits short segments that start at observed states (the system is autonomous, so
    # every segment starts at t=0): gradients through short solves are well behaved. Phase 2
    # fine-tunes on whole trajectories from their initial conditions (full runs only).
    seg_len, seg_batch = 12, 128
    phase1 = steps if args.smoke else int(0.8 * steps)
    # Clipping keeps the long-horizon gradients of phase 2 from throwing the model into the
    # trivial minimum (a vector field that ignores the oscillation).
    optim = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.05)),
    )
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(model, opt_state, ts, y0s, ys):
        def loss_fn(m):
            pred = jax.vmap(m, in_axes=(0, None))(y0s, ts)  # (batch, times, 2)
            return jnp.mean((pred - ys) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    ys_np = np.asarray(ys)
    offsets = np.arange(seg_len)
    for step in range(1, steps + 1):
        if step <= phase1:
            traj = rng.integers(0, num_traj, seg_batch)
            first = rng.integers(0, n_train - seg_len + 1, seg_batch)
            segs = jnp.asarray(ys_np[traj[:, None], first[:, None] + offsets])  # (batch, L, 2)
            batch = (ts_train[:seg_len], segs[:, 0], segs)
        else:
            batch = (ts_train, y0s, ys)
        model, opt_state, loss = train_step(model, opt_state, *batch)
        if not args.json and (step % 250 == 0 or step == steps):
            what = "segments" if step <= phase1 else "full window"
            print(f"step {step:5d}  {what:11s}  loss {float(loss):.3e}")

    train_s = time.perf_counter() - start
    pred_all = jax.vmap(model, in_axes=(0, None))(y0s, ts_all)
    in_window = np.arange(n_all) < n_train
    fit_error = rel_err(pred_all[:, in_window], truth_all[:, in_window])
    extrap_error = rel_err(pred_all[:, ~in_window], truth_all[:, ~in_window])

    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / "neural_ode.png"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, color) in enumerate([("prey", "tab:blue"), ("predator", "tab:red")]):
        axes[0].plot(ts_all, truth_all[0, :, i], color=color, label=f"true {name}")
        axes[0].plot(ts_all, pred_all[0, :, i], "--", color=color, label=f"learned {name}")
    axes[0].axvspan(T_TRAIN, T_END, color="0.9", label="extrapolation")
    axes[0].set_xlabel("t")
    axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title("trajectory 0 of the training set")
    for j in range(min(num_traj, 4)):
        axes[1].plot(truth_all[j, :, 0], truth_all[j, :, 1], color=f"C{j}")
        axes[1].plot(pred_all[j, :, 0], pred_all[j, :, 1], "--", color=f"C{j}")
    axes[1].set_xlabel("prey")
    axes[1].set_ylabel("predator")
    axes[1].set_title("phase plane: true (solid), learned (dashed)")
    fig.tight_layout()
    fig.savefig(plot, dpi=80)
    plt.close(fig)

    summary = {
        "example": "neural_ode",
        "smoke": args.smoke,
        "steps": steps,
        "trajectories": num_traj,
        "final_loss": float(loss),
        "fit_rel_error": fit_error,
        "extrapolation_rel_error": extrap_error,
        "train_seconds": round(train_s, 2),
        "plot": str(plot),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"fit error (t <= {T_TRAIN}) {fit_error:.3%}, extrapolation error "
            f"({T_TRAIN} < t <= {T_END}) {extrap_error:.3%}; plot: {plot}"
        )
    return summary


if __name__ == "__main__":
    main()
