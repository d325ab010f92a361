"""Fixtures for the sciml tests."""

import equinox as eqx
import jax
import pytest


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
