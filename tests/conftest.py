"""Shared fixtures of the sampler tests.

``x64``: run a test in float64 (``jax.enable_x64`` as a context manager, so the flag
never leaks into other tests). Build schedules and mixtures *inside* the test: a
``VPDiscrete`` built under float32 keeps float32 tables.

``compiled_during(fn)``: the programs JAX compiles while ``fn()`` runs, for the tests
that nothing compiles before an error, or again for new values.
"""

import logging

import jax
import pytest


#: dpmjax's own compiled programs (solver tables, fixed-step and adaptive samplers, fitting).
#: Eager JAX operations (a schedule's finiteness check, ``jax.random.key``) compile one-op
#: kernels the first time they run in a process; the "before anything compiles" tests
#: look for these programs.
LIBRARY_PROGRAMS = ("jit(_build)", "jit(_fixed_program)", "jit(_adaptive_program)", "jit(_refine)",
                    "jit(_start_losses)", "jit(_model_outputs)", "jit(time_grid)", "jit(_ems_rows)")


def library_programs(messages):
    """The compile messages of ``messages`` that are dpmjax's own programs."""
    return [m for m in messages if any(name in m for name in LIBRARY_PROGRAMS)]


class _Compiles(logging.Handler):
    """Collects JAX's "Compiling <name> ..." log records (``jax.log_compiles``)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        if "Compiling" in record.getMessage():
            self.messages.append(record.getMessage())


def compiled_during(fn):
    """The "Compiling ..." messages JAX logs while ``fn()`` runs (its result is blocked on)."""
    handler, logger = _Compiles(), logging.getLogger("jax")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            jax.block_until_ready(fn())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return handler.messages


# ``jax.enable_x64`` is the context manager of recent jax; the declared minimum jax has it
# under ``jax.experimental`` (the minimum-versions run of .ci/run uses this fixture too).
if hasattr(jax, "enable_x64"):
    _enable_x64 = jax.enable_x64
else:
    from jax.experimental import enable_x64 as _enable_x64


@pytest.fixture
def x64():
    with _enable_x64(True):
        yield
