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


@pytest.fixture(autouse=True, scope="module")
def _default_emitters():
    """Compile with XLA:CPU's default fusion emitters, not the older ones the rest of the suite
    compiles with (tests/conftest.py): at -O0 those miscompiled the gradients of NeuralCDE's
    adaptive solves (Bosh3: 8-22% off the finite difference; batched against single series,
    0.59 apart where the default emitters agree within 3e-5). Module-scoped, so the module's own
    fixtures compile this way too; `jax.jit(compiler_options=...)` passes the same override per
    program. A program an earlier test file compiled is reused as it is (JAX's caches are not
    keyed on compile options): only small shared ones."""
    from jax._src import compiler

    original = compiler.get_compile_options

    def with_default_emitters(*args, env_options_overrides=None, **kwargs):
        overrides = {"xla_cpu_use_fusion_emitters": True, **(env_options_overrides or {})}
        return original(*args, env_options_overrides=overrides, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiler, "get_compile_options", with_default_emitters)
        yield


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
