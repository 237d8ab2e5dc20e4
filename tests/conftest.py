"""Shared fixtures of the sampler tests.

``x64``: run a test in float64 (``jax.enable_x64`` as a context manager, so the flag
never leaks into other tests). Build schedules and mixtures *inside* the test: a
``VPDiscrete`` built under float32 keeps float32 tables.

``compiled_during(fn)``: the programs JAX compiles while ``fn()`` runs, for the tests
that nothing compiles before an error, or again for new values.

A run's processes share a persistent compilation cache (``pytest_configure``).
"""

import logging
import os
import shutil
import tempfile

import jax
import pytest


_JIT_CACHE = "DPMJAX_TESTS_JIT_CACHE"


def pytest_configure(config):
    """Many tests compile the same program through a new closure (a fresh ``model_fn`` per
    test), and the xdist workers compile the same programs: JAX's persistent compilation
    cache compiles each once per run. The directory is made by the first process (the xdist
    controller, whose environment the workers inherit) and removed by it at the end."""
    if os.environ.get("DPMJAX_TESTS_NO_JIT_CACHE"):
        return
    if _JIT_CACHE not in os.environ:
        os.environ[_JIT_CACHE] = config._dpmjax_jit_cache = tempfile.mkdtemp(prefix="dpmjax-tests-jit-")
    jax.config.update("jax_compilation_cache_dir", os.environ[_JIT_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    made = getattr(config, "_dpmjax_jit_cache", None)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop(_JIT_CACHE, None)


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
