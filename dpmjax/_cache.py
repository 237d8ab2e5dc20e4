"""Caches that never keep a user's function or arrays alive.

``jax.jit`` caches a compiled program per jitted function; a jitted function that closes
over a user's model would keep the model (and every array it captures) alive as long as
the cache holds the function. Here each compiled program is stored under its owner (the
model function, or the schedule of a solver's tables), which is held *weakly*, and the
program reaches the user's functions only through weak references: when the user drops
the model, the entry, its jitted function and its compiled executables go with it.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Callable

import jax

__all__ = ["table_of", "compiled", "committed_like"]

#: id(owner) -> (weak reference to the owner, its table)
_TABLES: dict = {}


def table_of(owner) -> dict:
    """A dict that lives as long as ``owner`` does (by identity; ``TypeError`` if ``owner``
    cannot be referenced weakly)."""
    k = id(owner)
    entry = _TABLES.get(k)
    if entry is not None and entry[0]() is owner:
        return entry[1]

    def drop(ref, k=k):
        if _TABLES.get(k, (None,))[0] is ref:
            del _TABLES[k]

    table = {}
    _TABLES[k] = (weakref.ref(owner, drop), table)
    return table


def _weak(fn):
    """A weak reference to ``fn`` (``None`` stays ``None``); a bound method is referenced
    through its object, so ``model.apply`` stays cached while ``model`` lives."""
    if fn is None:
        return None
    if inspect.ismethod(fn):
        return weakref.WeakMethod(fn)
    return weakref.ref(fn)


def _owner(fn):
    return fn.__self__ if inspect.ismethod(fn) else fn


class _Strong:
    """A reference to a function that cannot be referenced weakly (held for one call only)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self):
        return self.fn


def compiled(body: Callable, fns: tuple, static, **jit_kwargs):
    """``jax.jit`` of ``body(refs, static, *args)``, cached under ``fns[0]`` (held weakly).

    ``fns`` are the user's functions (the model, a classifier, a hook; ``None`` where absent);
    ``body`` receives them as ``refs``, callables returning them (weak references), and
    ``static``, a hashable description of the program that refers to no user object. A
    function that cannot be referenced weakly gets a fresh, uncached ``jax.jit`` (it compiles
    on every call)."""
    try:
        refs = tuple(_weak(f) for f in fns)
        table = table_of(_owner(fns[0]))
    except TypeError:
        strong = tuple(None if f is None else _Strong(f) for f in fns)
        return jax.jit(functools.partial(body, strong, static), **jit_kwargs)
    key = (body, refs, static, tuple(sorted(jit_kwargs.items())))
    fn = table.get(key)
    if fn is None:
        fn = table[key] = jax.jit(functools.partial(body, refs, static), **jit_kwargs)
    return fn


def committed_like(tree, inputs):
    """``tree`` committed to the one device that holds the arrays of ``inputs`` (unchanged
    when they span several devices).

    A loop that feeds a compiled program's outputs back as its inputs (an optimiser's state)
    should start from arrays placed as those outputs are: ``jax.jit`` commits its outputs to
    the device of its committed inputs (a model's parameters read from a checkpoint are
    committed), and whether an argument is committed is part of the key of its compiled
    program. A freshly made start (``jnp.zeros``, ``optax``'s ``init``) is not committed,
    so without this the program compiles twice: for the start and for every later step."""
    devices = {d for a in jax.tree_util.tree_leaves(inputs) if isinstance(a, jax.Array) for d in a.sharding.device_set}
    if len(devices) != 1:
        return tree
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(devices.pop()))
