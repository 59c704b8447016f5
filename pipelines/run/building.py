"""What building a pipeline costs in Python, kept down for our own runs (`generate`,
`evaluate`): Beam's DoFn introspection answered once per DoFn class, and the cyclic
garbage collector kept off the graph built.

Beam 2.77's `userstate.get_dofn_specs` finds a DoFn's state and timer parameters by
calling `inspect.signature` on every method the DoFn has (about 32, most of them
`DoFn`'s own), and Beam asks it again for the same DoFn twice per ParDo while a graph
is built, four times while the graph is converted for a runner, and once more in every
bundle processor the local runner builds. For generate's graph that was about 1 s of
the 2.2-2.9 s before a local run's first request, and about 1 s of the 4.7-5.4 s the
whole run took (side by side, docs/performance.md). apache/beam#9925 proposed the
same memo in Beam itself and was closed as stale; this keeps it for the length of our
own runs only.

The answer is kept only where the DoFn's class alone decides it: the instance holds no
bound methods of its own (an instance's `process` can be one), which class attributes
the instance shadows is part of the key (a `Map`'s DoFn shadows `process` with a plain
function, which Beam then does not inspect), and the class reads its methods no other
way (an `_inspect_*` hook for a method it has, as Beam's runtime type-check wrappers
do; its own `__getattribute__` or `__dir__`). Every other DoFn is asked of Beam each
time. `tests/test_building.py` checks the kept answers against Beam's for every DoFn of
generate's graph.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import threading
import types

import apache_beam
from apache_beam.transforms import userstate

# The Beam whose get_dofn_specs this was checked against: on another, Beam answers.
VERIFIED_BEAM = "2.77."
_BEAMS_OWN = userstate.get_dofn_specs
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1024)
def _hooked_methods(cls):
    """The methods `cls` has `_inspect_NAME` hooks for, or None where it reads its
    attributes its own way. Of the class alone, so made once per class: `dir` is most
    of what a key costs."""
    if (cls.__getattribute__ is not object.__getattribute__
            or cls.__dir__ is not object.__dir__):
        return None
    return tuple(name[len("_inspect_"):] for name in dir(cls) if name.startswith("_inspect_"))


def _key(dofn):
    """What Beam's answer depends on, or None where that is more than the class."""
    cls = type(dofn)
    hooked = _hooked_methods(cls)
    if hooked is None:
        return None
    own = getattr(dofn, "__dict__", None) or {}
    if any(isinstance(value, types.MethodType) for value in own.values()):
        return None
    # Beam reads a method through its `_inspect_NAME` hook, which may depend on the
    # instance, but only a method it inspects: one the instance has as a bound method.
    if any(isinstance(getattr(dofn, name, None), types.MethodType) for name in hooked):
        return None
    return cls, tuple(sorted(name for name in own if hasattr(cls, name)))


def _specs_by_class(answers: dict):
    def get_dofn_specs(dofn):
        key = _key(dofn)
        if key is None:
            return _BEAMS_OWN(dofn)
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = _BEAMS_OWN(dofn)
        states, timers = answer
        # Copies: Beam's callers get sets of their own, as from Beam.
        return set(states), set(timers)
    return get_dofn_specs


@contextlib.contextmanager
def dofn_specs_by_class():
    """Within: Beam's get_dofn_specs answered once per DoFn class (see the module).
    Outside, and on a Beam other than the verified one, Beam's own function. Nested
    uses keep the outermost one's."""
    with _LOCK:
        ours = (apache_beam.__version__.startswith(VERIFIED_BEAM)
                and userstate.get_dofn_specs is _BEAMS_OWN)
        if ours:
            userstate.get_dofn_specs = _specs_by_class({})
    try:
        yield
    finally:
        if ours:
            with _LOCK:
                userstate.get_dofn_specs = _BEAMS_OWN


@contextlib.contextmanager
def collector_off_the_graph():
    """Within: Python's cyclic garbage collector paused until `built()` is called, and
    what is alive then (the graph, the imports) frozen out of its collections until
    the end. Building generate's graph allocates enough to trigger a full
    collection, and running it more among its pauses, 0.1-0.17 s each: each walks
    every object the process holds. After the freeze each walks only what the run
    made since (docs/performance.md). Left alone where the collector is already off
    or something else froze objects."""
    ours = gc.isenabled() and not gc.get_freeze_count()
    if ours:
        gc.disable()
    frozen = False

    def built():
        nonlocal frozen
        if ours and not frozen:
            gc.freeze()
            frozen = True
            gc.enable()
    try:
        yield built
    finally:
        if ours:
            gc.enable()
            gc.unfreeze()


@contextlib.contextmanager
def built_lean():
    """Both of the above, as `generate` and `evaluate` run: yields `built`, to call once
    the graph is built and before it runs."""
    with dofn_specs_by_class(), collector_off_the_graph() as built:
        yield built
