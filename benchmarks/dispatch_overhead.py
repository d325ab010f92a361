"""Per-step dispatch overhead of `eqzoo.train.make_train_step`, and per-call overhead of
`eqzoo.generation.generate_batch`, as one JSON line.

Small models, where a step's compute is short and Python work per step shows, are trained
three ways on the same device-resident batch, with the same loss and optimizer:

- `eqzoo`: `TrainState.create` + `make_train_step` (what eqzoo users run);
- `floor`: a raw `jax.jit` over the flat list of parameter and optimizer-state leaves, with
  buffer donation, partitioned and flattened once, written inline here: the least Python
  work a step can do;
- `floor_matched`: the floor also doing the arithmetic eqzoo's step does besides the update
  (split the PRNG key, count the step, return the gradient norm and the loss's aux metrics), so
  `eqzoo / floor_matched` is host-side dispatch alone;
- `filter_jit`: `@eqx.filter_jit def step(model, opt_state, batch)` with
  `eqx.filter_value_and_grad`, as Equinox users usually write it.

Each variant is warmed up, then timed in blocks of many steps with `block_until_ready` only at
the end of a block; the blocks of the variants are interleaved (so load on the machine hits
them alike) and the median block gives `step_ms`; `cpu_ms` is the process's CPU time per step
(all threads), steadier than wall time on a shared machine.

`generate` rows: `generate_batch` on tiny-gpt2 (batch 4, NumPy prompts of 16 tokens, 4 new
tokens; greedy, and sampling with temperature 0.7, top-p 0.9 and an eos id) against its
compiled loop alone, called with the very arguments `generate_batch` hands it (recorded from
one call): the difference is what a call does on the host before its loop runs. Each call is
waited for; `ms` is the median of `--calls` calls, best of `--rounds` rounds, the variants
interleaved within each round.

    python benchmarks/dispatch_overhead.py --json
    python benchmarks/dispatch_overhead.py --part generate --json
    python benchmarks/dispatch_overhead.py --smoke --json
    python benchmarks/dispatch_overhead.py --typecheck --json   # eqzoo under jaxtyping+beartype
"""

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax

_TYPECHECK = "--typecheck" in sys.argv[1:]
# The hook must be installed before eqzoo is first imported.
with jaxtyping.install_import_hook("eqzoo", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))") if _TYPECHECK else contextlib.nullcontext():
    import eqzoo
    from eqzoo import train


def make_case(name: str, batch_size: int, seq_len: int) -> tuple[Any, Callable, dict[str, jax.Array]]:
    """`(model, loss_fn(model, batch, key) -> (loss, aux), device batch)` for a preset."""
    rng = np.random.default_rng(0)
    model = eqzoo.models.create(name, key=jax.random.key(0))
    config = eqzoo.models.get_config(name)
    if isinstance(config, eqzoo.models.MLPConfig):
        batch = {
            "x": rng.standard_normal((batch_size, config.in_features), dtype=np.float32),
            "y": rng.integers(0, config.out_features, batch_size).astype(np.int32),
        }
        loss_fn = train.classification_loss
    else:
        tokens = rng.integers(0, config.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
        batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
        loss_fn = train.lm_loss
    return model, loss_fn, jax.device_put(batch)


def eqzoo_runner(model, loss_fn, optimizer, batch) -> tuple[Callable[[int], None], Callable[[], Any]]:
    state = train.TrainState.create(model, optimizer, key=jax.random.key(1))
    step = train.make_train_step(loss_fn, optimizer)
    holder = {"state": state, "out": None}

    def run(n: int) -> None:
        s = holder["state"]
        for _ in range(n):
            s, metrics = step(s, batch)
        holder["state"], holder["out"] = s, metrics["loss"]

    return run, lambda: holder["out"]


def floor_runner(model, loss_fn, optimizer, batch) -> tuple[Callable[[int], None], Callable[[], Any]]:
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    leaves, treedef = jax.tree.flatten((params, opt_state))

    def flat_step(leaves, batch):
        params, opt_state = jax.tree.unflatten(treedef, leaves)
        loss_of = lambda p: loss_fn(eqx.combine(p, static), batch, None)[0]  # noqa: E731
        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return jax.tree.leaves((params, opt_state)), loss

    step = jax.jit(flat_step, donate_argnums=0)
    holder = {"leaves": leaves, "out": None}

    def run(n: int) -> None:
        lv = holder["leaves"]
        for _ in range(n):
            lv, loss = step(lv, batch)
        holder["leaves"], holder["out"] = lv, loss

    return run, lambda: holder["out"]


def matched_floor_runner(model, loss_fn, optimizer, batch) -> tuple[Callable[[int], None], Callable[[], Any]]:
    """The floor doing the same arithmetic as eqzoo's step: it also carries and splits a PRNG
    key, counts steps and returns the gradient norm and the loss's aux metrics. The gap from
    here to `eqzoo` is host-side dispatch alone."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    carry = (params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.key(1))
    leaves, treedef = jax.tree.flatten(carry)

    def flat_step(leaves, batch):
        params, opt_state, step, key = jax.tree.unflatten(treedef, leaves)
        key, step_key = jax.random.split(key)
        loss_of = lambda p: loss_fn(eqx.combine(p, static), batch, step_key)  # noqa: E731
        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        grad_norm = train.tree_global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        return jax.tree.leaves((params, opt_state, step + 1, key)), metrics

    step = jax.jit(flat_step, donate_argnums=0)
    holder = {"leaves": leaves, "out": None}

    def run(n: int) -> None:
        lv = holder["leaves"]
        for _ in range(n):
            lv, metrics = step(lv, batch)
        holder["leaves"], holder["out"] = lv, metrics["loss"]

    return run, lambda: holder["out"]


def filter_jit_runner(model, loss_fn, optimizer, batch) -> tuple[Callable[[int], None], Callable[[], Any]]:
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, batch):
        loss_of = lambda m: loss_fn(m, batch, None)[0]  # noqa: E731
        loss, grads = eqx.filter_value_and_grad(loss_of)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    holder = {"model": model, "opt_state": opt_state, "out": None}

    def run(n: int) -> None:
        m, o = holder["model"], holder["opt_state"]
        for _ in range(n):
            m, o, loss = step(m, o, batch)
        holder["model"], holder["opt_state"], holder["out"] = m, o, loss

    return run, lambda: holder["out"]


def _loop_call(call: Callable[[], Any]) -> tuple[Callable, tuple, dict]:
    """The compiled decode loop and the arguments `call` (one `generate_batch` call) hands it."""
    from eqzoo.generation import _generate

    loop, seen = _generate._generate_batch_jit, []

    def record(*args, **kwargs):
        seen.append((args, kwargs))
        return loop(*args, **kwargs)

    _generate._generate_batch_jit = record
    try:
        jax.block_until_ready(call())
    finally:
        _generate._generate_batch_jit = loop
    (args, kwargs), = seen
    return loop, args, kwargs


def bench_generate(*, calls: int, rounds: int) -> dict[str, Any]:
    """Per-call latency of `generate_batch` and of its compiled loop alone, in ms."""
    from eqzoo.generation import generate_batch

    model = eqzoo.models.create("tiny-gpt2", key=jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
    settings = {
        "greedy": {},
        "sampling": {"temperature": 0.7, "top_p": 0.9, "eos_token": 3, "key": jax.random.key(0)},
    }
    variants: dict[str, Callable[[], Any]] = {}
    for name, kw in settings.items():
        call = lambda kw=kw: generate_batch(model, prompts, max_new_tokens=4, **kw)  # noqa: E731
        loop, args, kwargs = _loop_call(call)
        variants[f"generate_batch ({name})"] = call
        variants[f"compiled loop alone ({name})"] = lambda loop=loop, args=args, kwargs=kwargs: loop(*args, **kwargs)
    for run in variants.values():  # compiled above; settle
        for _ in range(3):
            jax.block_until_ready(run())
    best = {v: float("inf") for v in variants}
    for _ in range(rounds):
        for v, run in variants.items():  # interleaved, so drift hits all alike
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times.append((time.perf_counter() - t0) * 1e3)
            best[v] = min(best[v], statistics.median(times))
    ms = {v: round(t, 4) for v, t in best.items()}
    return {
        "preset": "tiny-gpt2", "batch_size": 4, "prompt_len": 16, "max_new_tokens": 4,
        "calls_per_round": calls, "rounds": rounds, "ms": ms,
        "overhead_ms": {
            name: round(best[f"generate_batch ({name})"] - best[f"compiled loop alone ({name})"], 4) for name in settings
        },
    }


RUNNERS = {
    "eqzoo": eqzoo_runner,
    "floor": floor_runner,
    "floor_matched": matched_floor_runner,
    "filter_jit": filter_jit_runner,
}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_case(name: str, batch_size: int, seq_len: int, *, steps: int, blocks: int, warmup: int) -> dict[str, Any]:
    model, loss_fn, batch = make_case(name, batch_size, seq_len)
    optimizer = optax.adam(1e-3)
    runners = {}
    for variant, make in RUNNERS.items():
        # A fresh copy each: the donating variants delete the buffers they are given.
        fresh = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, model)
        run, last = make(fresh, loss_fn, optimizer, batch)
        run(warmup)  # compiles, then settles
        jax.block_until_ready(last())
        runners[variant] = (run, last)
    times: dict[str, list[float]] = {v: [] for v in runners}
    cpu: dict[str, list[float]] = {v: [] for v in runners}
    for _ in range(blocks):
        for variant, (run, last) in runners.items():  # interleaved, so drift hits all alike
            c0, t0 = _cpu_seconds(), time.perf_counter()
            run(steps)
            jax.block_until_ready(last())
            times[variant].append((time.perf_counter() - t0) / steps * 1e3)
            cpu[variant].append((_cpu_seconds() - c0) / steps * 1e3)
    ms = {v: statistics.median(t) for v, t in times.items()}
    cpu_ms = {v: statistics.median(t) for v, t in cpu.items()}
    return {
        "batch_size": batch_size,
        **({"seq_len": seq_len} if "gpt" in name else {}),
        "step_ms": {v: round(t, 4) for v, t in ms.items()},
        "step_ms_min": {v: round(min(t), 4) for v, t in times.items()},
        # Process CPU time per step (all threads): steadier than wall time on a busy machine.
        "cpu_ms": {v: round(t, 4) for v, t in cpu_ms.items()},
        "ratio_to_floor": round(ms["eqzoo"] / ms["floor"], 3),
        "ratio_to_floor_matched": round(ms["eqzoo"] / ms["floor_matched"], 3),
        "ratio_to_filter_jit": round(ms["eqzoo"] / ms["filter_jit"], 3),
        "cpu_ratio_to_floor": round(cpu_ms["eqzoo"] / cpu_ms["floor"], 3),
        "cpu_ratio_to_floor_matched": round(cpu_ms["eqzoo"] / cpu_ms["floor_matched"], 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=9, help="timed blocks per variant (median)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="generate calls per round (median)")
    parser.add_argument("--rounds", type=int, default=5, help="generate rounds (best)")
    parser.add_argument("--part", choices=("all", "train", "generate"), default="all", help="which rows to run")
    parser.add_argument("--smoke", action="store_true", help="few steps (a quick check, noisy)")
    parser.add_argument("--typecheck", action="store_true", help="import eqzoo under jaxtyping+beartype")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.blocks, args.warmup, args.calls, args.rounds = 20, 3, 3, 10, 2
    cases = {"mlp-small": (32, 0), "tiny-gpt2": (4, 64)} if args.part != "generate" else {}
    result: dict[str, Any] = {
        "benchmark": "dispatch_overhead",
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "typecheck": _TYPECHECK,
        "steps_per_block": args.steps,
        "blocks": args.blocks,
        "cases": {},
    }
    for name, (batch_size, seq_len) in cases.items():
        result["cases"][name] = bench_case(
            name, batch_size, seq_len, steps=args.steps, blocks=args.blocks, warmup=args.warmup
        )
        if not args.json:
            print(name, json.dumps(result["cases"][name]), file=sys.stderr)
    if cases:
        result["max_ratio_to_floor"] = max(c["ratio_to_floor"] for c in result["cases"].values())
    if args.part != "train":
        result["generate"] = bench_generate(calls=args.calls, rounds=args.rounds)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
