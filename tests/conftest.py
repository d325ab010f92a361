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


# Test files that take long for their few tests, started first. `make test` runs the files on two
# workers in this order (`--dist loadfile --no-loadscope-reorder`), the others after them, most
# tests first (xdist's own order). xdist's order alone started the docs-snippet files (a few
# tests, minutes each: they run every page's code in a subprocess) about 17 minutes into a
# 21-minute run, so they ran alone at the end. Only the order changes: every file still runs.
START_FIRST = (
    "tests/docs/test_snippets.py",
    "tests/docs/test_snippets_2.py",
    "tests/examples/test_examples_smoke.py",
)


def pytest_collection_modifyitems(config, items):
    """Order the collected tests by file: `START_FIRST`'s files first, then the files with the
    most tests; within a file, the tests keep their order."""
    counts: dict[str, int] = {}
    for item in items:
        file = item.nodeid.split("::", 1)[0]
        counts[file] = counts.get(file, 0) + 1

    def rank(item):
        file = item.nodeid.split("::", 1)[0]
        first = START_FIRST.index(file) if file in START_FIRST else len(START_FIRST)
        return (first, -counts[file], file)

    items.sort(key=rank)  # stable: a file's tests keep their order
