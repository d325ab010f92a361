"""Test configuration: 8 fake CPU devices and strict dtype promotion, set before JAX computes;
XLA:CPU's code generator at -O0."""

import contextlib
import gc
import os

# The suite compiles over a thousand small programs on CI's 2 cores, and compiling, not running,
# is most of its time: LLVM at -O0 compiles them ~30% faster (measured on the sliding-cache and
# Gemma decoding tests: 56 s against 82 s). XLA's own HLO passes (fusion, layout) are the same;
# the machine code may round differently in the last bits. The benchmarks' smoke runs that
# `make test` runs afterwards compile at -O0 too (scripts/_run_scripts.py); the examples run at
# the default level (some train long enough that -O0's slower code costs more than its faster
# compile: neural_ode.py --smoke, 37 s of CPU against 24 s). An
# `--xla_backend_optimization_level` in XLA_FLAGS is left as it is.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

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


# Seconds each test file took (setup + call + teardown summed, `--durations=0` of `make test`'s
# pytest command on the 2-core machine, partly loaded; files under 15 s left out). `make test`
# runs the files on two workers in the order below (`--dist loadfile --no-loadscope-reorder`):
# the costliest first, so that no long file starts near the end and runs alone while the other
# worker idles (xdist's own order started the docs-snippet files, a few tests of minutes each,
# about 17 minutes into a 21-minute run). Then the files not listed, most tests first. Only the
# order depends on these figures: every file still runs, and a stale figure costs wall time only.
# sharding/test_moe, models/test_mixtral and models/test_lm_models: their figures scaled by the
# ratio of one solo run of the file after/before its eager model calls were compiled (0.80-0.87);
# generation/test_generate, test_prefill, test_sliding_cache, models/test_gemma, test_packing and
# train/test_preference likewise, after their one-off eager forwards were compiled and
# test_generate's short decodes reused its NEW-token loops (0.61-0.93, one solo run each).
FILE_COSTS = {
    "tests/models/test_presets_contract.py": 355, "tests/docs/test_snippets.py": 299,
    "tests/docs/test_snippets_2.py": 285, "tests/generation/test_generate.py": 142,
    "tests/hf/test_generate.py": 174, "tests/peft/test_lora.py": 160,
    "tests/examples/test_examples_smoke.py": 142, "tests/sharding/test_moe.py": 136,
    "tests/models/test_mixtral.py": 136, "tests/models/test_lm_models.py": 124,
    "tests/sharding/test_equivalence.py": 124,
    "tests/bayes/test_inference.py": 95, "tests/quant/test_int4.py": 89,
    "tests/models/test_diffusion_models.py": 86, "tests/generation/test_speculative.py": 85,
    "tests/sciml/test_cde.py": 83, "tests/hf/test_load.py": 79, "tests/nn/test_moe.py": 70,
    "tests/quant/test_quant.py": 67, "tests/sharding/test_context.py": 56,
    "tests/nn/test_kv_cache_dtype.py": 55, "tests/models/test_gemma.py": 51,
    "tests/generation/test_sliding_cache.py": 43, "tests/sharding/test_train.py": 52,
    "tests/generation/test_prefill.py": 34, "tests/sciml/test_node.py": 50, "tests/train/test_losses.py": 42,
    "tests/models/test_packing.py": 25, "tests/peft/test_lora_experts.py": 39, "tests/sciml/test_pinn.py": 35,
    "tests/generation/test_engine.py": 32, "tests/bayes/test_last_layer.py": 30,
    "tests/nn/test_attention.py": 30, "tests/diffusion/test_sample.py": 29,
    "tests/train/test_preference.py": 21, "tests/generation/test_stream.py": 23,
    "tests/train/test_train_step.py": 19, "tests/nn/test_stacked.py": 19,
    "tests/generation/test_processors.py": 19, "tests/checkpoint/test_resume.py": 17,
    "tests/sharding/test_distributed.py": 17, "tests/bayes/test_model.py": 17, "tests/models/test_vit.py": 17,
    "tests/quant/test_fp8.py": 17, "tests/nn/test_norms_mlp.py": 16,
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
