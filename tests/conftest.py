"""Test configuration: 8 fake CPU devices and strict dtype promotion, set before JAX computes;
XLA:CPU's fast-compiling code generator (scripts/_run_scripts.py's `FAST_COMPILE_FLAGS`)."""

import contextlib
import gc
import os

# The suite compiles about 13,600 small programs on CI's 2 cores, and compiling, not running, is
# two thirds of its time. Two XLA:CPU settings make compiling much cheaper:
# - `--xla_backend_optimization_level=0`: LLVM at -O0 (the sliding-cache and Gemma decoding tests
#   took 56 s against 82 s);
# - `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's older LLVM emitters instead of its MLIR
#   fusion emitters. With -O0, a tiny-llama train step compiled in 0.58 s against 1.68 s and its
#   `create` in 0.56 s against 1.0 s; the whole suite (`make test`'s pytest command) ran in 934 s
#   against 1,616 s. Without -O0 the older emitters save nothing (tests/models/test_lm_models.py:
#   31 s of compiling against 34 s).
# XLA's HLO passes (fusion, layout) are the same; the machine code rounds differently in the last
# bits, so two programs that agreed bit for bit may differ by an ulp. One known miscompile at this
# pair of settings (jaxlib 0.10.2, the version constraints.txt pins): the gradients of NeuralCDE's
# adaptive diffrax solves (a Bosh3 solve's 8-22% off its finite difference); a plain ODE's were
# right, and the default emitters are right for both. So tests/sciml compiles with the default
# emitters (its conftest.py overrides the setting per program, whatever XLA_FLAGS says). Users'
# programs compile with XLA's defaults: set either flag in XLA_FLAGS (e.g.
# `XLA_FLAGS=--xla_cpu_use_fusion_emitters=true pytest ...`) to run the tests with it; the value
# given is kept. A jaxlib that drops a flag aborts at start ("Unknown flag in XLA_FLAGS"): remove
# it from scripts/_run_scripts.py's `FAST_COMPILE_FLAGS` then. The benchmarks' smoke runs
# (scripts/_run_scripts.py), the docs pages (a subprocess of tests/docs/_snippets.py, with this
# environment) and the examples the tests run in process (scripts/run_examples.py's
# RUN_IN_TESTS) compile the same way; the examples scripts/run_examples.py runs itself use the
# defaults (some train long enough that -O0's slower code costs more than it saves).


def _fast_compile_env():
    """scripts/_run_scripts.py's `fast_compile_env`, the one place the settings are listed
    (`FAST_COMPILE_FLAGS`), loaded by path: scripts/ is not a package."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "_run_scripts.py"
    spec = importlib.util.spec_from_file_location("_eqzoo_run_scripts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fast_compile_env


os.environ["XLA_FLAGS"] = _fast_compile_env()(os.environ)["XLA_FLAGS"]

import jax  # noqa: E402
import jaxtyping  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after a test module once the process holds many mappings.

    XLA:CPU maps each executable's machine code into its own memory regions, and JAX keeps every
    executable it compiled: a pytest worker that runs half the suite would pass Linux's default
    limit of 65,530 mappings per process (`vm.max_map_count`; ~30,000 after 160 tests) and then
    crash with a segfault inside the next compile, the next mmap having failed. Below
    `MAP_LIMIT` mappings the programs are kept, so the next modules reuse the ones they share
    (tiny models' initialisers, small eager ops): ~2% of the CPU time of tests/nn and
    tests/generation against clearing after every module.
    """
    yield
    if _mappings() > MAP_LIMIT:
        jax.clear_caches()
        gc.collect()


MAP_LIMIT = 20_000
"""Mappings of the process above which `_free_compiled_programs` drops the compiled programs:
a third of Linux's default `vm.max_map_count`, so one module's compiles cannot reach it."""


def _mappings() -> int:
    """How many memory mappings this process holds (`/proc/self/maps` lines; "many" where the
    file cannot be read, so the programs are then dropped after every module)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 1 << 30


@pytest.fixture(scope="session")
def create():
    """`eqzoo.models.create` itself, which builds in one compiled program per initialisation
    (a new key, or a config differing only in fields that cannot change the arrays, reuses it)
    and draws the eager build's arrays bit for bit. Pass `jit=False` for tests of the eager
    path or of build-time type checks inside the constructors."""
    from eqzoo import models

    return models.create


@pytest.fixture
def unchecked():
    """A context manager that turns jaxtyping/beartype checks off, to reach eqzoo's own
    validation of arguments that the annotations already reject (e.g. a bad `Literal`)."""

    @contextlib.contextmanager
    def off():
        before = jaxtyping.config.jaxtyping_disable
        jaxtyping.config.update("jaxtyping_disable", True)
        try:
            yield
        finally:
            jaxtyping.config.update("jaxtyping_disable", before)

    return off


class CompileLog:
    """Collects the "Compiling <name> ..." records `jax.log_compiles` emits, one per XLA
    compilation (those whose message contains `containing`, when given), as `compiled`.

    Compiled programs outlive a test module (`_free_compiled_programs`), so a program an
    earlier module compiled may already be cached: "nothing compiles" (`compiled == []`) holds
    either way, but a test that counts compiles (`len(log.compiled) == 1`) calls
    `jax.clear_caches()` first."""

    def __init__(self, containing: str | None = None):
        self.containing = containing

    def __enter__(self):
        import logging

        self.compiled = []
        log = self

        class Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if msg.startswith("Compiling ") and (log.containing is None or log.containing in msg):
                    log.compiled.append(msg[:80])

        self._handler = Handler(level=logging.DEBUG)
        self._logger = logging.getLogger("jax")
        self._level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)
        self._ctx = jax.log_compiles(True)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)


@pytest.fixture
def compile_log():
    """`CompileLog`: `with compile_log() as log: ...` then `log.compiled` (the XLA compilations
    in the block; `compile_log("flat_step")` keeps the train steps' only)."""
    return CompileLog


# Seconds each test file took (setup + call + teardown summed, from `make test`'s pytest command
# on the 2-core machine with nothing else running; files under 10 s left out). `make test` runs
# the files on two workers in the order below (`--dist loadfile --no-loadscope-reorder`): the
# costliest first, so that no long file starts near the end and runs alone while the other worker
# idles (xdist's own order started the docs-snippet files, a few tests of minutes each, about 17
# minutes into a 21-minute run). Then the files not listed, most tests first. Only the order
# depends on these figures: every file still runs, and a stale figure costs wall time only.
# Measured with the older XLA:CPU emitters (above), tests/sciml with the default ones, as each runs.
FILE_COSTS = {
    "tests/sciml/test_cde.py": 106, "tests/models/test_presets_contract.py": 85,
    "tests/examples/test_examples_smoke.py": 80, "tests/docs/test_snippets.py": 79,
    "tests/sharding/test_moe.py": 70, "tests/sciml/test_node.py": 69, "tests/docs/test_snippets_2.py": 64,
    "tests/quant/test_quant.py": 62, "tests/generation/test_speculative.py": 61, "tests/nn/test_moe.py": 56,
    "tests/models/test_mixtral.py": 55, "tests/bayes/test_inference.py": 54,
    "tests/models/test_diffusion_models.py": 53, "tests/peft/test_lora.py": 49,
    "tests/nn/test_kv_cache_dtype.py": 49, "tests/sharding/test_equivalence.py": 45,
    "tests/sharding/test_context.py": 43, "tests/quant/test_int4.py": 42, "tests/sciml/test_pinn.py": 40,
    "tests/generation/test_generate.py": 40, "tests/models/test_lm_models.py": 39,
    "tests/generation/test_prefill.py": 38, "tests/sharding/test_train.py": 37, "tests/hf/test_generate.py": 33,
    "tests/generation/test_sliding_cache.py": 31, "tests/generation/test_engine.py": 28,
    "tests/checkpoint/test_resume.py": 26, "tests/peft/test_lora_experts.py": 25, "tests/train/test_losses.py": 25,
    "tests/models/test_packing.py": 24, "tests/quant/test_fp8.py": 22, "tests/bayes/test_last_layer.py": 20,
    "tests/hf/test_load.py": 19, "tests/bayes/test_model.py": 18, "tests/sharding/test_distributed.py": 18,
    "tests/diffusion/test_sample.py": 17, "tests/generation/test_processors.py": 16, "tests/models/test_gemma.py": 15,
    "tests/nn/test_attention.py": 13, "tests/models/test_vit.py": 13, "tests/sharding/test_fused_loss.py": 13,
    "tests/generation/test_stream.py": 12, "tests/nn/test_stacked.py": 11, "tests/hf/test_save.py": 10,
    "tests/train/test_train_step.py": 10,
}


def pytest_collection_modifyitems(config, items):
    """Order the collected tests by file: the costliest of `FILE_COSTS` first, then the files
    with the most tests; within a file, the tests keep their order."""
    counts: dict[str, int] = {}
    for item in items:
        file = item.nodeid.split("::", 1)[0]
        counts[file] = counts.get(file, 0) + 1

    def rank(item):
        file = item.nodeid.split("::", 1)[0]
        return (-FILE_COSTS.get(file, 0), -counts[file], file)

    items.sort(key=rank)  # stable: a file's tests keep their order
