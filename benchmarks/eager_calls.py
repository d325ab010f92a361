"""Eager (un-jitted) calls of a stacked model: XLA compilations and seconds of the first call and
of the calls after it, forward and `jax.grad`.

Called eagerly, a stack of layers runs op by op (`eqzoo.nn.Stacked`: a scan of each call's new
closure would be compiled again on every call), so calls after the first compile nothing.

    python benchmarks/eager_calls.py --json                                  # tiny-llama, 5 calls
    python benchmarks/eager_calls.py --json --preset tiny-gpt2 --calls 5
    python benchmarks/eager_calls.py --smoke --json                          # forward, 2 calls

Prints one JSON line per mode (`forward`, `grad`): `first_compiles`, `first_s`, `later_calls`,
`later_compiles`, `later_s`.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

import eqzoo


def _counter():
    count = [0]

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    return count


def _measure(fn, calls: int, count) -> dict:
    before, start = count[0], time.perf_counter()
    jax.block_until_ready(fn())
    first = {"first_compiles": count[0] - before, "first_s": round(time.perf_counter() - start, 3)}
    before, start = count[0], time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn())
    return first | {"later_calls": calls, "later_compiles": count[0] - before, "later_s": round(time.perf_counter() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--calls", type=int, default=5, help="calls after the first")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="forward only, 2 calls (CI)")
    parser.add_argument("--json", action="store_true", help="print JSON lines (the only output format)")
    args = parser.parse_args()
    count = _counter()
    model = eqzoo.models.create(args.preset, key=jax.random.key(0))
    tokens = jnp.arange(args.seq, dtype=jnp.int32) % model.config.vocab_size
    modes = {"forward": lambda: model(tokens)}
    if not args.smoke:
        loss = lambda m: jnp.mean(m(tokens).astype(jnp.float32) ** 2)  # noqa: E731
        modes["grad"] = lambda: jax.grad(loss)(model)
    calls = 2 if args.smoke else args.calls
    for mode, fn in modes.items():
        record = {"benchmark": "eager_calls", "preset": args.preset, "mode": mode, "seq": args.seq,
                  "backend": jax.default_backend()} | _measure(fn, calls, count)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
