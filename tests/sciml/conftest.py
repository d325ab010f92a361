"""Fixtures for the sciml tests."""

import contextlib

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
