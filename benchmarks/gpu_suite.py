"""The GPU performance table in one command: every row a benchmark run in its own process.

On a machine with one H100/H200 (about 10 minutes of it), from the repository root:

    python benchmarks/gpu_suite.py --out gpu_suite.jsonl --total-budget 540

Each row runs `python benchmarks/<script>.py ... --json` as a subprocess (a fresh JAX, so XLA
flags set for one row never leak into the next), killed after its own timeout (150 s for a
training row, 200 s for generation; `--timeout-scale` multiplies them). Rows run in priority
order, most important first (`--list` prints them). As each row ends, its benchmark JSON plus
`row`, `status` (ok / failed / timeout / skipped), `cmd` (the exact command line, environment
overrides first), `wall_s`, `rc` and, on failure, `stderr_tail` is appended to `--out` as one
line, so a run cut short keeps every row it finished. A row that fails or times out does not
stop the others. With `--total-budget`, a row is started only if the time elapsed plus its
timeout fits in the budget; rows that do not fit are recorded as skipped, and later rows with
shorter timeouts may still run. At the end: a markdown table (tokens/s, step ms, MFU, peak GiB,
compile s) and one JSON line summarising the run, last on stdout (with `--json`, the table goes
to stderr and stdout is that line alone). Exits 1 if any row failed, timed out or was interrupted.

Before the rows, a preflight (a few seconds) imports eqzoo and runs one JAX computation, and
writes what it found (backend, device, jax/jaxlib versions, XLA_FLAGS) as the first line of
`--out`. If JAX's backend is not a GPU (a missing or broken CUDA plugin: every row would run on
the CPU until its timeout), the suite stops there with status 2 (`--allow-cpu` runs anyway). If
JAX fails to start only with eqzoo's XLA flags (`eqzoo.perf.GPU_XLA_FLAGS`: a flag that a newer
XLA no longer knows is fatal), every row runs with `EQZOO_XLA_FLAGS=0` and the record says so.
The budget counts the preflight. SIGTERM (an outer `timeout`) or Ctrl-C kills the running row,
records it as `interrupted` with whatever JSON it had printed (rows run unbuffered, and the
benchmarks print their compile time, and each generation batch, as they go), and still prints
the table and summary. Under an outer time limit, leave a margin:

    timeout 480 python benchmarks/gpu_suite.py --out $OUT/gpu_suite.jsonl --total-budget 450

    python benchmarks/gpu_suite.py --list
    python benchmarks/gpu_suite.py --only gpt2-124m,generate --out gpu_suite.jsonl
    python benchmarks/gpu_suite.py --smoke          # CPU: two tiny rows, exercises this driver
    python benchmarks/gpu_suite.py --tiny           # CPU: every row's own flags at tiny sizes (~5 min)

This driver imports neither JAX nor eqzoo, so it holds no GPU memory while the rows run.
"""

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN_TIMEOUT_S = 150.0
GENERATE_TIMEOUT_S = 200.0
SMOKE_TIMEOUT_S = 120.0
_TAIL = 3000  # characters of a failed row's stderr/stdout kept in its record


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: `python *argv --json`, run from the repository root.

    `env` sets variables for this row only; `env_append` appends to them (space-separated),
    keeping whatever the caller's environment already has, as `XLA_FLAGS` needs.
    """

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    env: tuple[tuple[str, str], ...] = ()
    env_append: tuple[tuple[str, str], ...] = ()


def _train(name: str, *args: str, **kwargs) -> Row:
    return Row(name, ("benchmarks/train_throughput.py", *args), TRAIN_TIMEOUT_S, **kwargs)


GPT2 = ("--preset", "gpt2-124m", "--batch", "16", "--seq", "1024", "--steps", "20", "--warmup", "3")
# The same model and sizes without eqzoo: plain Equinox, and nanoGPT-style PyTorch.
BASELINE = GPT2[2:]

ROWS: tuple[Row, ...] = (
    # The three targets of docs/performance.md (gpt2-124m and llama-1b MFU, gpt2-124m decoding
    # tokens/s), gpt2-124m with fp8 matmuls and the plain-Equinox baseline come first: a short
    # run should measure them.
    _train("gpt2-124m", *GPT2),
    # fp8 training matmuls (eqzoo.quant.prepare_fp8), beside the bf16 row it is measured against:
    # every linear layer's products with e4m3 operands and e5m2 gradients, per-tensor scales
    # each step, which XLA turns into cuBLASLt fp8 GEMMs on Hopper. Not yet measured.
    _train("gpt2-124m-fp8", *GPT2, "--fp8"),
    Row("equinox-baseline", ("benchmarks/equinox_baseline.py", *BASELINE), TRAIN_TIMEOUT_S),
    Row("generate", ("benchmarks/generate_throughput.py", "--preset", "gpt2-124m",
                     "--batches", "1,64", "--new-tokens", "256"), GENERATE_TIMEOUT_S),
    _train("llama-1b", "--preset", "llama-1b", "--batch", "8", "--seq", "2048",
           "--steps", "10", "--warmup", "3"),
    # --require-cuda: a PyTorch without CUDA fails at once rather than train on the CPU until
    # the row's timeout.
    Row("torch-baseline", ("benchmarks/torch_baseline.py", *BASELINE, "--require-cuda"), TRAIN_TIMEOUT_S),
    _train("gpt2-124m-unrolled", *GPT2, "--scan", "false"),
    _train("gpt2-124m-xla-attention", *GPT2, "--attention", "xla"),
    _train("gpt2-124m-full-logits", *GPT2, "--loss", "full"),
    _train("gpt2-124m-no-eqzoo-flags", *GPT2, env=(("EQZOO_XLA_FLAGS", "0"),)),
    _train("gpt2-124m-cublas-gemm", *GPT2,
           env_append=(("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false"),)),
    _train("gpt2-124m-remat-dots", *GPT2, "--remat", "dots_no_batch"),
    # The preset's remat (dots_no_batch) is sized for 8 x 2048 on 80 GB; half the batch fits
    # without remat by the CPU estimate (docs/performance.md): which gives more MFU?
    _train("llama-1b-b4-no-remat", "--preset", "llama-1b", "--batch", "4", "--seq", "2048",
           "--steps", "10", "--warmup", "3", "--remat", "none"),
    # The fused loss's chunk: 128 positions by default here (512 MiB of fp32 logits); larger
    # chunks mean fewer passes over the head's gradient.
    _train("gpt2-124m-loss-chunk-512", *GPT2, "--chunk-size", "512"),
    Row("generate-scan-layers", ("benchmarks/generate_throughput.py", "--preset", "gpt2-124m",
                                 "--batches", "1,64", "--new-tokens", "256", "--layers", "scan"),
        GENERATE_TIMEOUT_S),
    # Decoding reads every weight once per token: int8 linear weights (eqzoo.quant) halve the
    # bf16 bytes, where batch 1 is bound by memory traffic rather than kernel launches.
    Row("generate-int8", ("benchmarks/generate_throughput.py", "--preset", "gpt2-124m",
                          "--batches", "1,64", "--new-tokens", "256", "--quantize", "int8"),
        GENERATE_TIMEOUT_S),
    # Int4 codes packed two to a byte with a bf16 scale per 128 inputs: a quarter of bf16's weight
    # bytes, if XLA fuses the unpacking and scaling into the products rather than writing a
    # bf16 copy of each weight (on CPU it was no faster than int8).
    Row("generate-int4", ("benchmarks/generate_throughput.py", "--preset", "gpt2-124m",
                          "--batches", "1,64", "--new-tokens", "256", "--quantize", "int4", "--group-size", "128"),
        GENERATE_TIMEOUT_S),
    # Long contexts at batch 64: the KV cache (~2.3 GB in bf16 by the last token), not the
    # weights (0.25 GB), is most of what a step reads. An int8 cache (eqzoo.nn.QuantizedKV) holds
    # 53% of the bf16 bytes; does XLA fuse the int8 -> bf16 conversion into the attention
    # products, or pay for a converted copy?
    *(
        Row(f"generate-long{suffix}", ("benchmarks/generate_throughput.py", "--preset", "gpt2-124m",
                                       "--batches", "1,64", "--prompt-len", "768", "--new-tokens", "256", *extra),
            GENERATE_TIMEOUT_S)
        for suffix, extra in (
            ("", ()), ("-int8-cache", ("--cache-dtype", "int8")),
            ("-prefill-via-decode", ("--prefill-via-decode",)),  # the baseline of AbstractLM.prefill (cuDNN)
        )
    ),
    # The image models, last: ViT-B/16 classifying 224x224 images, DiT-XL/2 denoising 32x32x4
    # latents (256 tokens each).
    Row("vit-b16", ("benchmarks/image_throughput.py", "--preset", "vit-b16", "--batch", "256",
                    "--steps", "20", "--warmup", "3"), TRAIN_TIMEOUT_S),
    Row("dit-xl2", ("benchmarks/image_throughput.py", "--preset", "dit-xl2", "--batch", "256",
                    "--steps", "20", "--warmup", "3"), TRAIN_TIMEOUT_S),
    # Mixture of experts: one layer of Mixtral 8x7B (1.7B parameters with the embeddings),
    # its three expert implementations, at batch 2 x 2048 tokens. XLA's estimates
    # (benchmarks/memory_estimate.py, bf16, no remat): 38 GiB dense, 44 GiB ragged, under the
    # 60 GiB JAX takes of an 80 GB H100 by default; two layers at batch 4 needed 74-133 GiB.
    # MFU counts active FLOPs, so "dense" (every expert on every token) pays 4x the expert
    # FLOPs, "capacity" 1.25x, and "ragged" whatever XLA's ragged_dot lowering costs here.
    *(
        _train(f"mixtral-1l-{impl}", "--preset", "mixtral-8x7b", "--set", "num_layers=1",
               "--set", f"moe_implementation={impl}", "--batch", "2", "--seq", "2048",
               "--steps", "10", "--warmup", "3")
        for impl in ("capacity", "dense", "ragged")
    ),
    # Packed documents: 8 of 128 positions per row. cuDNN gets the segment mask as an additive
    # bias (what jax.nn.dot_product_attention does with a boolean mask): its cost against the
    # gpt2-124m row.
    _train("gpt2-124m-packed-8", *GPT2, "--packed-docs", "8"),
    # MoE decoding: at batch 1 each token gathers its 2 of 8 experts' weights
    # (eqzoo.nn.MoE.decode); the second row reads every expert, the baseline.
    *(
        Row(f"generate-mixtral-2l{suffix}", ("benchmarks/generate_throughput.py", "--preset", "mixtral-8x7b",
                                             "--set", "num_layers=2", "--set", "max_seq=4096",
                                             "--batches", "1,64", "--new-tokens", "256", *extra),
            GENERATE_TIMEOUT_S)
        for suffix, extra in (("", ()), ("-all-experts", ("--read-all-experts",)))
    ),
    # Speculative decoding of a trained 6-layer model with a 1-layer draft, against plain
    # decoding: on GPU a round's one-pass check should cost about one step, so its tokens per
    # round should turn into speed, where on CPU (compute-bound) it barely does.
    Row("speculative", ("benchmarks/speculative_decoding.py",), GENERATE_TIMEOUT_S),
    # Continuous batching (serve on a DecodeEngine of 8 slots) against static batches of 8
    # (generate_batch, each group until its longest budget), 32 requests of 8 .. 256 new tokens:
    # on GPU a decode step costs about the same for 8 live rows as for 1, so the static batches'
    # idle rows should turn into the continuous engine's speedup; 8 and 32 steps a host call.
    Row("continuous-batching", ("benchmarks/continuous_batching.py", "--preset", "gpt2-124m",
                                "--steps-per-call", "8,32"), GENERATE_TIMEOUT_S),
    # Gemma, last: Gemma 3 1B runs cuDNN with a lax.cond per layer between its windowed and
    # full calls; Gemma 2 2B soft-caps its attention logits, so it runs XLA's attention.
    _train("gemma3-1b", "--preset", "gemma3-1b", "--batch", "8", "--seq", "2048", "--steps", "10", "--warmup", "3"),
    _train("gemma2-2b", "--preset", "gemma2-2b", "--batch", "8", "--seq", "2048", "--steps", "10", "--warmup", "3"),
)
"""The GPU table, in priority order."""

# The sizes of train_throughput.py --smoke: fewer steps and the loss on random tokens may not fall.
TINY = ("--preset", "tiny-gpt2", "--batch", "4", "--seq", "64", "--steps", "8", "--warmup", "2")

# Two rows: `make test` runs train_throughput.py and generate_throughput.py --smoke on their own,
# so each row here stacks the options the GPU rows add (each one a separate compile, ~12 s of CI's
# CPU a row) on a single run: the driver's logic is the same for one row or eight.
SMOKE_ROWS: tuple[Row, ...] = (
    # Both kinds of environment override, as rows 7 and 8 use them; the packed and MoE rows' options.
    Row("tiny-mixtral-capacity-packed", ("benchmarks/train_throughput.py", "--preset", "tiny-mixtral", *TINY[2:],
                                         "--set", "moe_implementation=capacity", "--packed-docs", "4"),
        SMOKE_TIMEOUT_S, env=(("EQZOO_XLA_FLAGS", "0"),),
        env_append=(("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false"),)),
    # The generate rows' options: int8 weights, an int8 cache, the decode-at-index-0 prefill. At
    # --smoke's sizes but without --smoke, whose streaming section (two more compiles a batch) no
    # GPU row runs and generate_throughput.py --smoke covers; two batches, as the GPU rows have,
    # so the partial line printed after the first is still exercised.
    Row("tiny-generate-int8-prefill-via-decode", ("benchmarks/generate_throughput.py", "--preset", "tiny-gpt2",
                                                  "--batches", "1,4", "--new-tokens", "16", "--repeats", "2",
                                                  "--quantize", "int8", "--cache-dtype", "int8",
                                                  "--prefill-via-decode"), SMOKE_TIMEOUT_S),
)
"""The `--smoke` rows: tiny sizes on CPU, to check this driver in CI."""

# `--tiny`: every GPU row's own command with these appended (argparse keeps an option's last
# value; `--set` overrides are applied in order), so each row's flags run end to end on a CPU
# in seconds before a GPU is spent on them. The shapes keep what a row's flags need (int4's
# group of 128 divides 128; Gemma's windows and mix of windowed and global layers).
_TINY_GPT = ("--set", "num_layers=2", "--set", "embed_dim=128", "--set", "num_heads=2", "--set", "vocab_size=512")
_TINY_LLAMA = ("--set", "num_layers=2", "--set", "embed_dim=128", "--set", "num_heads=4", "--set", "num_kv_heads=2",
               "--set", "hidden_dim=256", "--set", "vocab_size=512")
TINY_SETS: dict[str, tuple[str, ...]] = {
    "gpt2-124m": _TINY_GPT,
    "llama-1b": _TINY_LLAMA,
    "mixtral-8x7b": (*_TINY_LLAMA, "--set", "num_experts=4"),
    "gemma3-1b": (*_TINY_LLAMA, "--set", "head_dim=32", "--set", "query_pre_attn_scalar=32",
                  "--set", "sliding_window=16", "--set", "sliding_window_pattern=2"),
    "gemma2-2b": (*_TINY_LLAMA, "--set", "head_dim=32", "--set", "query_pre_attn_scalar=32", "--set", "sliding_window=16"),
    "vit-b16": ("--set", "num_layers=2", "--set", "embed_dim=64", "--set", "num_heads=2", "--set", "image_size=32"),
    "dit-xl2": ("--set", "num_layers=2", "--set", "embed_dim=64", "--set", "num_heads=2"),
}
"""`--tiny`'s config overrides for each preset a GPU row names."""

_TINY_TRAIN = ("--batch", "2", "--seq", "64", "--steps", "6", "--warmup", "2")
TINY_ARGS: dict[str, tuple[str, ...]] = {
    "train_throughput": _TINY_TRAIN,
    "image_throughput": ("--batch", "2", "--steps", "6", "--warmup", "2"),
    "equinox_baseline": (*_TINY_TRAIN, "--layers", "2", "--embed", "128", "--heads", "2", "--vocab", "512"),
    # eager: Inductor's C++ compile on a CPU takes ~30 s and is not the GPU's (Triton) compile
    "torch_baseline": (*_TINY_TRAIN, "--layers", "2", "--embed", "128", "--heads", "2", "--vocab", "512",
                       "--no-compile"),
    "generate_throughput": ("--batches", "1,2", "--new-tokens", "8", "--repeats", "1"),
    "speculative_decoding": ("--layers", "2", "--width", "64", "--draft-width", "32", "--steps", "10", "--seq", "32",
                             "--batch", "4", "--prompts", "1", "--prompt-len", "8", "--new-tokens", "12",
                             "--num-draft", "2"),
    "continuous_batching": ("--requests", "4", "--slots", "2", "--min-new", "2", "--max-new", "8", "--prompt-len", "8"),
}
"""`--tiny`'s sizes for each benchmark a GPU row runs."""


def tiny_row(row: Row) -> Row:
    """`row` at `--tiny`'s sizes: its own arguments, then `TINY_ARGS` for its script and
    `TINY_SETS` for its preset. Two more changes make the CPU take the GPU's paths where it can:
    `--require-cuda` is dropped (the PyTorch baseline then runs on the CPU), and a generation row
    that leaves `--layers` to the backend decodes with the layers unrolled, as `"auto"` does on
    a GPU. What only a GPU runs (cuDNN attention, fp8 GEMMs, `XLA_FLAGS` for XLA:GPU) is not
    exercised.
    """
    script = Path(row.argv[0]).stem
    if script not in TINY_ARGS:
        raise KeyError(f"gpu_suite: no --tiny sizes for {row.argv[0]} (row {row.name!r}): add them to TINY_ARGS")
    argv = [a for a in row.argv if a != "--require-cuda"]
    extra = list(TINY_ARGS[script])
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else None
    if preset is not None:
        if preset not in TINY_SETS:
            raise KeyError(f"gpu_suite: no --tiny config overrides for preset {preset!r} (row {row.name!r}): "
                           "add them to TINY_SETS")
        extra += TINY_SETS[preset]
    if script == "generate_throughput":
        if "--prompt-len" in argv:
            extra += ["--prompt-len", "24"]
        if "--layers" not in argv:
            extra += ["--layers", "unrolled"]
    return dataclasses.replace(row, argv=(*argv, *extra), timeout_s=SMOKE_TIMEOUT_S)


def row_env(row: Row, base: Mapping[str, str]) -> dict[str, str]:
    """The variables `row` changes, resolved against the environment `base`."""
    changed = dict(row.env)
    for key, value in row.env_append:
        before = changed.get(key, base.get(key, "")).strip()
        changed[key] = f"{before} {value}".strip()
    return changed


def command(row: Row) -> list[str]:
    return [sys.executable, *row.argv, "--json"]


def command_line(row: Row, base: Mapping[str, str]) -> str:
    """The row as one shell line, environment overrides first: paste it to rerun the row."""
    env = [f"{k}={shlex.quote(v)}" for k, v in row_env(row, base).items()]
    return " ".join([*env, shlex.join(command(row))])


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):  # TimeoutExpired keeps bytes even in text mode
        text = text.decode(errors="replace")
    return (text or "")[-_TAIL:]


def _last_json(stdout: str) -> dict | None:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return None
    return out if isinstance(out, dict) else None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


class Interrupted(BaseException):  # noqa: N818 -- raised through, like KeyboardInterrupt
    """A row was stopped by Ctrl-C or SIGTERM; `record` is what it had printed by then."""

    def __init__(self, record: dict):
        super().__init__(record["row"])
        self.record = record


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_row(row: Row, timeout_s: float) -> dict:
    """Runs one row in its own process group, killed (with any children) after `timeout_s`.

    The row's Python runs unbuffered (`PYTHONUNBUFFERED=1`), so the JSON lines a benchmark
    prints as it goes (its compile time; each generation batch) survive a kill.

    **Returns:**

    The row's benchmark JSON (its last JSON line, if it printed one) merged with `status`,
    `rc`, `wall_s`, `timeout_s`, `cmd`, `env` and, unless it passed, the tails of its stderr
    and stdout. On Ctrl-C or SIGTERM the row is killed and `Interrupted` raised with its
    record (status `interrupted`).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **row_env(row, os.environ)}
    start = time.perf_counter()
    proc = subprocess.Popen(command(row), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out, interrupted = False, False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BaseException:  # Ctrl-C or SIGTERM: take the row down with us, keep what it printed
        interrupted = True
    if timed_out or interrupted:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
    wall_s = time.perf_counter() - start
    result = _last_json(stdout) or {}
    if interrupted:
        status = "interrupted"
    elif timed_out:
        status = "timeout"
    elif proc.returncode == 0 and result:
        status = "ok"
    else:
        status = "failed"
    record = {**result, "row": row.name, "status": status, "rc": proc.returncode,
              "wall_s": round(wall_s, 2), "timeout_s": timeout_s,
              "cmd": command_line(row, os.environ), "env": row_env(row, os.environ)}
    if status != "ok":
        record["stderr_tail"] = _tail(stderr)
        record["stdout_tail"] = _tail(stdout)
    if interrupted:
        raise Interrupted(record)
    return record


PREFLIGHT_TIMEOUT_S = 120.0
# What every row does first (import eqzoo, which adds its XLA flags; create JAX's backend; run
# one computation), in seconds rather than a row's timeout, and what it found.
_PREFLIGHT_CODE = """\
import json, os, sys, jax, jaxlib
import eqzoo
from eqzoo.perf import applied_xla_flags
x = jax.numpy.arange(4.0).sum().block_until_ready()
print(json.dumps({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                  "device_count": jax.device_count(), "jax": jax.__version__,
                  "jaxlib": jaxlib.__version__, "python": sys.version.split()[0],
                  "eqzoo_xla_flags": applied_xla_flags(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}))
"""
PREFLIGHT = Row("preflight", ("-c", _PREFLIGHT_CODE), PREFLIGHT_TIMEOUT_S)


def preflight(runner: Callable[[Row, float], dict] = run_row) -> dict:
    """Checks that JAX and eqzoo start, before any row spends its timeout finding out.

    If they fail with eqzoo's XLA flags (an XLA release that no longer knows one aborts at
    backend creation, and would fail every row), it tries again without them (not after a
    timeout, which would spend the budget twice); when that
    works the record says `"eqzoo_xla_flags_dropped": true` and the caller runs every row
    with `EQZOO_XLA_FLAGS=0`.

    **Returns:** the preflight's record (`status`, `backend`, `device`, versions, flags).
    """
    record = runner(PREFLIGHT, PREFLIGHT_TIMEOUT_S)
    # Only a start that failed is tried again: an unknown flag aborts at once, while a start
    # that timed out (a hung driver) would spend another PREFLIGHT_TIMEOUT_S of the budget.
    if record["status"] != "failed" or os.environ.get("EQZOO_XLA_FLAGS", "").strip() == "0":
        return record
    without = runner(dataclasses.replace(PREFLIGHT, env=(("EQZOO_XLA_FLAGS", "0"),)), PREFLIGHT_TIMEOUT_S)
    if without["status"] != "ok":
        return record
    return {**without, "eqzoo_xla_flags_dropped": True, "with_eqzoo_xla_flags": {
        k: record.get(k) for k in ("status", "rc", "stderr_tail")}}


def run_suite(
    rows: list[Row],
    *,
    out: Path,
    total_budget_s: float | None = None,
    timeout_scale: float = 1.0,
    runner: Callable[[Row, float], dict] = run_row,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    run_id: str | None = None,
) -> list[dict]:
    """Runs `rows` in order, appending each record to `out` as it ends; returns the records.

    A row starts only if the time elapsed so far plus its (scaled) timeout fits in
    `total_budget_s`; otherwise it is recorded as skipped and the next row is considered.
    Every record gets `run_id` (default: the start time), which tells runs appended to the
    same file apart.
    """
    run_id = run_id or time.strftime("%Y%m%dT%H%M%S")
    start = time.monotonic()
    records = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows, 1):
        timeout_s = row.timeout_s * timeout_scale
        elapsed = time.monotonic() - start
        head = f"[{i}/{len(rows)}] {row.name}"
        if total_budget_s is not None and elapsed + timeout_s > total_budget_s:
            record = {"row": row.name, "status": "skipped", "timeout_s": timeout_s,
                      "cmd": command_line(row, os.environ),
                      "reason": f"elapsed {elapsed:.0f}s + timeout {timeout_s:.0f}s > "
                                f"total budget {total_budget_s:.0f}s"}
            log(f"{head}: skipped ({record['reason']})")
        else:
            log(f"{head} (timeout {timeout_s:.0f}s): {command_line(row, os.environ)}")
            try:
                record = runner(row, timeout_s)
            except Interrupted as stop:  # recorded, then no further rows
                record = stop.record
            log(f"{head}: {record['status']} in {record.get('wall_s', 0):.1f}s")
        record = {"run_id": run_id, **record}
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        if record["status"] == "interrupted":
            log("interrupted: no further rows")
            break
    return records


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_lines(record: dict) -> list[list[str]]:
    """One table line per training row; one per batch size for a generation row."""
    name, status = record["row"], record["status"]
    if "results" in record:  # generate_throughput: step ms is ms per decoded token
        return [[f"{name} (batch {r.get('batch')})", _fmt(r.get("tokens_per_s"), ",.0f"),
                 _fmt(r.get("ms_per_token"), ".2f"), "-", "-", _fmt(r.get("first_call_s"), ".1f"),
                 status] for r in record["results"]]
    if "speculative" in record:  # speculative_decoding: plain greedy, then each num_draft
        plain = [[f"{name} (greedy, no draft)", _fmt(record.get("greedy_tokens_per_s"), ",.0f"),
                  "-", "-", "-", "-", status]]
        return plain + [[f"{name} (num_draft {r.get('num_draft')}, x{_fmt(r.get('speedup'), '.2f')})",
                         _fmt(r.get("tokens_per_s"), ",.0f"), "-", "-", "-", "-", status]
                        for r in record["speculative"]]
    if "continuous" in record:  # continuous_batching: static batches, then each steps_per_call
        static = [[f"{name} (static batches)", _fmt(record.get("static", {}).get("tokens_per_s"), ",.0f"),
                   "-", "-", "-", "-", status]]
        return static + [[f"{name} ({k}, x{_fmt(r.get('speedup'), '.2f')})", _fmt(r.get("tokens_per_s"), ",.0f"),
                          "-", "-", "-", "-", status] for k, r in record["continuous"].items()]
    mfu = record.get("mfu")
    if "images_per_s" in record:  # image_throughput: images/s in the throughput column
        name, record = f"{name} (images/s)", {**record, "tokens_per_s": record["images_per_s"]}
    return [[name, _fmt(record.get("tokens_per_s"), ",.0f"), _fmt(record.get("step_ms"), ".1f"),
             "-" if mfu is None else f"{100 * mfu:.1f}%", _fmt(record.get("peak_memory_gib"), ".2f"),
             _fmt(record.get("compile_s"), ".1f"), status]]


def markdown_table(records: list[dict]) -> str:
    header = ["row", "tokens/s", "step ms", "MFU", "peak GiB", "compile s", "status"]
    lines = [header, ["---"] * len(header)]
    for record in records:
        lines += table_lines(record)
    text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    return text + (
        "\n\nGeneration rows: step ms is ms per decoded token (one token for every sequence of the "
        "batch); compile s is the first call (compile + one run)."
        if any("results" in r for r in records) else "")


_SUMMARY_KEYS = ("tokens_per_s", "images_per_s", "step_ms", "mfu", "compile_s", "peak_memory_gib", "loss_fell")


def summary(records: list[dict], *, out: Path, elapsed_s: float, args) -> dict:
    counts = {s: 0 for s in ("ok", "failed", "timeout", "skipped", "interrupted")}
    rows = []
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        row = {"row": r["row"], "status": r["status"], "wall_s": r.get("wall_s")}
        row.update({k: r[k] for k in _SUMMARY_KEYS if k in r})
        if "results" in r:
            row["results"] = [{k: g.get(k) for k in ("batch", "tokens_per_s", "ms_per_token")}
                              for g in r["results"]]
        if "speculative" in r:
            row["greedy_tokens_per_s"] = r.get("greedy_tokens_per_s")
            row["speculative"] = [{k: g.get(k) for k in ("num_draft", "tokens_per_s", "speedup", "same_tokens")}
                                  for g in r["speculative"]]
        if "continuous" in r:
            row["static_tokens_per_s"] = r.get("static", {}).get("tokens_per_s")
            row["continuous"] = {name: {k: g.get(k) for k in ("tokens_per_s", "speedup", "same_tokens")}
                                 for name, g in r["continuous"].items()}
        rows.append(row)
    ran = [r for r in records if r.get("device")]
    result = {
        "benchmark": "gpu_suite",
        "smoke": args.smoke,
        "tiny": args.tiny,
        "run_id": records[0]["run_id"] if records else None,
        "out": str(out),
        "device": ran[0]["device"] if ran else None,
        "backend": ran[0].get("backend") if ran else None,
        "git_commit": _git_commit(),
        "elapsed_s": round(elapsed_s, 1),
        "total_budget_s": args.total_budget,
        "timeout_scale": args.timeout_scale,
        **counts,
        "rows": rows,
    }
    if not (args.smoke or args.tiny) and ran and any(r.get("backend") != "gpu" for r in ran):
        result["warning"] = "some rows did not run on a GPU: see each row's backend in --out"
    return result


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def select(rows: tuple[Row, ...], only: str | None) -> list[Row]:
    """The rows named in `only` (comma-separated), in priority order; all rows if None."""
    if not only:
        return list(rows)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = [r.name for r in rows]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"gpu_suite: --only got unknown row(s) {unknown}; the rows are {known} "
                         "(--smoke has its own rows; see --list)")
    return [r for r in rows if r.name in wanted]


def _chosen_rows(p: argparse.ArgumentParser, args) -> list[Row]:
    """The rows `--smoke`, `--tiny` and `--only` pick, in priority order."""
    if args.smoke and args.tiny:
        p.error("--smoke and --tiny are two different sets of rows: pick one")
    rows = select(SMOKE_ROWS if args.smoke else ROWS, args.only)
    return [tiny_row(r) for r in rows] if args.tiny else rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON lines file to append to (default gpu_suite.jsonl; with --smoke, one "
                        "in the temporary directory)")
    p.add_argument("--only", default=None, metavar="ROW[,ROW]", help="run only these rows")
    p.add_argument("--list", action="store_true", help="print the rows and their commands, run none")
    p.add_argument("--total-budget", type=float, default=None, metavar="SECONDS",
                   help="start a row only if elapsed time + its timeout fits in this")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every row's timeout")
    p.add_argument("--smoke", action="store_true", help="tiny rows on CPU (checks this driver)")
    p.add_argument("--tiny", action="store_true",
                   help="every GPU row's own flags at tiny sizes, on the CPU if there is no GPU: a dry run "
                        "that checks each row's options before a GPU is spent on them (see tiny_row)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the rows even if JAX's backend is not a GPU (the preflight stops otherwise)")
    p.add_argument("--no-preflight", action="store_true", help="skip the preflight check")
    p.add_argument("--json", action="store_true",
                   help="stdout is the JSON summary line alone (the table goes to stderr)")
    args = p.parse_args(argv)
    rows = _chosen_rows(p, args)
    if args.list:
        for row in rows:
            print(f"{row.name}\t{row.timeout_s * args.timeout_scale:.0f}s\t"
                  f"{command_line(row, os.environ)}")
        return 0
    out = args.out or (Path(tempfile.gettempdir()) / f"gpu_suite_{'smoke' if args.smoke else 'tiny'}.jsonl"
                       if args.smoke or args.tiny else Path("gpu_suite.jsonl"))
    start = time.monotonic()
    run_id = time.strftime("%Y%m%dT%H%M%S")  # the preflight's record and the rows' alike
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    # SIGTERM (an outer `timeout`) as Ctrl-C: the running row is killed and recorded, and the
    # table and summary are still printed.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        records, pre = [], None
        if not args.no_preflight:
            try:
                pre = preflight()
            except Interrupted as stop:
                pre = stop.record
            pre = {"run_id": run_id, **pre}
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(pre) + "\n")
            log(f"preflight: {pre['status']} in {pre.get('wall_s', 0):.1f}s: backend {pre.get('backend')}, "
                f"{pre.get('device')}, jax {pre.get('jax')}, XLA_FLAGS {pre.get('XLA_FLAGS')!r}")
            stop = None
            if pre["status"] != "ok":
                stop = "JAX or eqzoo failed to start (see the preflight record's stderr_tail in --out)"
            elif pre.get("backend") != "gpu" and not (args.smoke or args.tiny or args.allow_cpu):
                stop = (f"JAX's backend is {pre.get('backend')!r}, not a GPU (no CUDA jaxlib plugin, or it "
                        "failed to load): every row would time out on the CPU. --allow-cpu runs them anyway")
            if stop:
                log(f"gpu_suite: {stop}.")
                print(json.dumps({"benchmark": "gpu_suite", "error": stop, "preflight": pre}), flush=True)
                return 2
            if pre.get("eqzoo_xla_flags_dropped"):
                log("gpu_suite: JAX failed to start with eqzoo's XLA flags and started without them; "
                    "every row runs with EQZOO_XLA_FLAGS=0 (see the preflight record).")
                os.environ["EQZOO_XLA_FLAGS"] = "0"
        budget = None if args.total_budget is None else args.total_budget - (time.monotonic() - start)
        records = run_suite(rows, out=out, total_budget_s=budget, timeout_scale=args.timeout_scale, log=log,
                            run_id=run_id)
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = summary(records, out=out, elapsed_s=time.monotonic() - start, args=args)
    if pre is not None:
        result["preflight"] = {k: pre.get(k) for k in ("backend", "device", "jax", "jaxlib", "XLA_FLAGS", "wall_s")}
        result["preflight"]["eqzoo_xla_flags_dropped"] = bool(pre.get("eqzoo_xla_flags_dropped"))
        if result["device"] is None:  # no row got as far as printing its device
            result["device"], result["backend"] = pre.get("device"), pre.get("backend")
    print(markdown_table(records) + "\n", file=sys.stderr if args.json else sys.stdout, flush=True)
    print(json.dumps(result), flush=True)
    return 1 if result["failed"] or result["timeout"] or result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
