"""Shared fixtures of the sampler tests.

``x64``: run a test in float64 (``jax.enable_x64`` as a context manager, so the flag
never leaks into other tests). Build schedules and mixtures *inside* the test: a
``VPDiscrete`` built under float32 keeps float32 tables.
"""

import jax
import pytest


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
