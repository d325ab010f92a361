"""What the training-throughput benchmarks share: the batches they train on and the figures they
report. Imports neither JAX nor eqzoo, so the PyTorch baseline uses it too."""

import json
import math
import os
import sys

import numpy as np

PEAK_TFLOPS_HELP = "peak bf16 dense TFLOP/s for MFU (H100 SXM: 989)"


def token_batches(vocab: int, batch: int, seq: int, count: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed small set of `(inputs, targets)` int32 batches of shape `(batch, seq)`, drawn
    with seed 0: the same tokens in every benchmark, few enough that the loss must fall."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        tok = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
        out.append((tok[:, :-1], tok[:, 1:]))
    return out


def throughput_figures(*, batch: int, seq: int, steps: int, elapsed: float, flops_per_token: float,
                       peak_tflops: float, losses: list[float]) -> dict:
    """tokens/s, ms per step, MFU (`flops_per_token` x tokens/s against `peak_tflops`) and the
    first/last loss of a timed run of `steps` steps that took `elapsed` seconds."""
    tokens_per_s = batch * seq * steps / elapsed
    return {
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * elapsed / steps,
        "mfu": flops_per_token * tokens_per_s / (peak_tflops * 1e12),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_fell": losses[-1] < losses[0],
    }


def mesh_size(spec: str) -> int:
    """The devices a mesh spec (`data=2,context=4`) takes."""
    try:
        return math.prod(int(part.partition("=")[2]) for part in spec.split(","))
    except ValueError:
        raise SystemExit(f"--mesh {spec!r}: write each axis with its size, e.g. --mesh data=2,context=4") from None


def use_fake_cpu_devices(count: int) -> None:
    """Lay meshes on `count` fake CPU devices: sets `XLA_FLAGS` (appended to the caller's) and
    `JAX_PLATFORMS=cpu` unless set. Call before JAX starts its backend (the first computation)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def parse_set(items: list[str]) -> dict:
    """`--set FIELD=VALUE` items as config overrides: JSON values (numbers, true/false) as
    parsed, anything else (names: `--set remat=full`) as a string."""
    overrides = {}
    for item in items:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    return overrides


def report_compiled(benchmark: str, as_json: bool, **fields) -> None:
    """With `--json`, print `{"benchmark": ..., "partial": "compiled", **fields}` as soon as the
    first step has compiled: `gpu_suite.py` keeps a row's last JSON line, so a row killed (its
    timeout, an outer SIGTERM) before its timed steps finish still records its compile time."""
    if as_json:
        print(json.dumps({"benchmark": benchmark, "partial": "compiled", **fields}), flush=True)


def report(result: dict, as_json: bool) -> dict:
    """Print `result` (one JSON line, or one `key: value` per line) and warn if the loss did not
    fall; returns `result`."""
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    if not result["loss_fell"]:
        print("loss did not fall over the run", file=sys.stderr)
    return result
