"""Fixtures for the sciml tests."""

import contextlib

import equinox as eqx
import jax
import jaxtyping
import pytest


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


def _build(make, key, *args, **kwargs):
    """`make(*args, key=key, **kwargs)` initialised under one `jit`: eager initialisation
    compiles every small random op separately, which dominates the time of tiny tests."""
    return eqx.filter_jit(lambda k: make(*args, key=k, **kwargs))(key)


@pytest.fixture
def build():
    """Initialise a module under `jit`: `build(eqx.nn.MLP, key, 2, 2, 8, 1)`."""
    return _build


@pytest.fixture(scope="module")
def build_module():
    """`build` for module-scoped fixtures."""
    return _build


@pytest.fixture(autouse=True)
def _fast_compiles():
    """Compile without most XLA optimisations: these tests run tiny problems, where XLA's
    optimisation passes (not the solves) take most of the time."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def optimized():
    """Undo `_fast_compiles` for a test whose run time, not its compile time, dominates."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
