"""What building and running a pipeline costs in Python, kept down for the CLI's own
local runs (`codeclm-beam generate` and `evaluate` pass `lean=True`; a library caller's
process, with its own pipelines in other threads, is never touched): Beam's DoFn introspection answered once per DoFn class, the
cyclic garbage collector kept off the graph built, and, in the local runner, the state
sampler ticking briefly, side inputs sized without a scan of every module, and the
DoFns a stage's worker pickles for itself kept uncompressed.

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
time. `tests/test_lean_run.py` checks the kept answers against Beam's for every DoFn of
generate's graph.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import threading
import types

import apache_beam
from apache_beam.internal import cloudpickle_pickler
from apache_beam.internal import pickler
from apache_beam.runners.worker import bundle_processor
from apache_beam.runners.worker import operations
from apache_beam.runners.worker import statecache
from apache_beam.runners.worker import statesampler
from apache_beam.transforms import userstate

# The Beam whose get_dofn_specs, state sampler and state cache this was checked
# against: on another, Beam's own are used.
VERIFIED_BEAM = "2.77."
_BEAMS_DOFN_SPECS = userstate.get_dofn_specs
_LOCK = threading.Lock()


def _on_verified_beam() -> bool:
    return apache_beam.__version__.startswith(VERIFIED_BEAM)


def _has(module, *names: str) -> bool:
    """Every private name a swap relies on is where it was checked: Beam keeps no
    promise about them, so a patch release that renames one gets Beam's own."""
    return all(hasattr(module, name) for name in names)


@contextlib.contextmanager
def _in_place_of_beams(module, name: str, beams_own, ours, relies_on: bool = True):
    """Within: `module.name` is `ours`, on the verified Beam, where every private name
    ours relies on exists (`relies_on`) and where Beam's own is in place (a nested use
    keeps the outer one's); Beam's own again after."""
    with _LOCK:
        swapped = (_on_verified_beam() and relies_on
                   and getattr(module, name, None) is beams_own)
        if swapped:
            setattr(module, name, ours)
    try:
        yield
    finally:
        if swapped:
            with _LOCK:
                setattr(module, name, beams_own)


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
            return _BEAMS_DOFN_SPECS(dofn)
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = _BEAMS_DOFN_SPECS(dofn)
        states, timers = answer
        # Copies: Beam's callers get sets of their own, as from Beam.
        return set(states), set(timers)
    return get_dofn_specs


def dofn_specs_by_class():
    """Within: Beam's get_dofn_specs answered once per DoFn class (see the module).
    Outside, and on a Beam other than the verified one, Beam's own function."""
    return _in_place_of_beams(userstate, "get_dofn_specs", _BEAMS_DOFN_SPECS, _specs_by_class({}))


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


# Beam's state sampler (how the msec counters learn where a bundle's time went) wakes
# every 2 ms at a bundle's start, each tick 1.2x the last up to 200 ms, and at the end
# of every bundle waits out the tick it is in (a thread join; the Cython sampler has no
# way to wake it). The ramp (apache/beam#5466) spares bundles of a few milliseconds,
# not the ones that call a model: the local runner's bundle that answers and judges a
# round ran 0.2-0.7 s and then waited up to 54 ms, while the next stage waited on it,
# and 0.31-0.34 s in all over a bench run's 100 bundles (docs/performance.md). At a
# steady 2 ms tick the wait is at most 2 ms (0.08-0.09 s in all), the sampling as
# fine as at a bundle's start, and a tick costs no GIL (it sleeps and counts without).
SAMPLER_TICK_MS = 2
_BEAMS_SAMPLER = statesampler.StateSampler


class _ShortTickSampler(_BEAMS_SAMPLER):
    def __init__(self, prefix, counter_factory, sampling_period_ms=SAMPLER_TICK_MS):
        super().__init__(prefix, counter_factory, min(sampling_period_ms, SAMPLER_TICK_MS))


def sampler_ticking_briefly():
    """Within: the bundles this process runs (the local runner's) sample their state
    every SAMPLER_TICK_MS (see above); Beam's own sampler outside, and on a Beam other
    than the verified one. A Dataflow job's workers are other processes: untouched."""
    return _in_place_of_beams(statesampler, "StateSampler", _BEAMS_SAMPLER, _ShortTickSampler)


# The local runner's state cache weighs each side input it loads (a stage's first
# read of it) with objsize, which by default first gathers the globals of every loaded
# module, about 3,100 in a run, to leave them out: 1.8 ms a load, 60 loads a bench
# run, most of them while the next stage waits. Beam's filter already leaves out
# modules, functions and classes, the ways a cached value reaches those globals,
# so the weights are the same without the scan (tests/test_lean_run.py compares them).
_BEAMS_SIZING = getattr(statecache, "get_deep_size", None)


def _deep_size_without_module_scan(*objs) -> int:
    return statecache.objsize.get_deep_size(
        *objs, get_size_func=statecache._size_func,
        get_referents_func=statecache._get_referents_func,
        filter_func=statecache._filter_func, exclude_modules_globals=False)


def side_inputs_sized_without_module_scan():
    """Within: the state cache weighs what it loads without the scan (see above);
    Beam's own sizing outside, and on a Beam other than the verified one."""
    return _in_place_of_beams(
        statecache, "get_deep_size", _BEAMS_SIZING, _deep_size_without_module_scan,
        _has(statecache, "objsize", "_size_func", "_get_referents_func", "_filter_func"))


# The local runner's worker, building a stage, unpickles each ParDo's DoFn from the
# stage's description, pickles it again with its windowing (cloudpickle, bz2 at level
# 9, base64: Beam's form for what travels between processes), and the operation then
# unpickles that three times more (its constructor, its setup, its output hints): per
# ParDo one bz2 compression and four decompressions, about half of the 40-60 ms a
# round's model stage took to build while the run waited on it (docs/performance.md).
# What the worker pickles for itself never leaves its process: kept as cloudpickle's
# bytes under a prefix that base64 text never has, and read back without bz2; what
# comes from the runner (Beam's form) is read as Beam reads it.
_IN_PROCESS = b"\x00in-process\x00"


class _InProcessPickles:
    """Beam's `pickler` as the worker's bundle_processor and operations use it."""

    @staticmethod
    def dumps(o, enable_trace=True, use_zlib=False, **unused) -> bytes:
        return _IN_PROCESS + cloudpickle_pickler._dumps(o)

    @staticmethod
    def loads(encoded, enable_trace=True, use_zlib=False):
        if isinstance(encoded, bytes) and encoded.startswith(_IN_PROCESS):
            return cloudpickle_pickler._loads(encoded[len(_IN_PROCESS):])
        return pickler.loads(encoded, enable_trace=enable_trace, use_zlib=use_zlib)


@contextlib.contextmanager
def worker_pickles_kept_in_process():
    """Within: the DoFns this process's bundle processors pickle for themselves are
    kept uncompressed (see above); Beam's pickler outside, on a Beam other than the
    verified one, and where Beam pickles with dill. A Dataflow job's workers are other
    processes: untouched."""
    relies_on = (_has(cloudpickle_pickler, "_dumps", "_loads")
                 and getattr(pickler, "desired_pickle_lib", None) is cloudpickle_pickler)
    with _in_place_of_beams(bundle_processor, "pickler", pickler, _InProcessPickles,
                            relies_on), \
            _in_place_of_beams(operations, "pickler", pickler, _InProcessPickles,
                               relies_on):
        yield


@contextlib.contextmanager
def lean_run(enabled: bool = True):
    """All of the above, as `generate` and `evaluate` build and run when the CLI asks
    (`enabled`): yields `built`, to call once the graph is built and before it runs."""
    if not enabled:
        yield lambda: None
        return
    with dofn_specs_by_class(), sampler_ticking_briefly(), \
            side_inputs_sized_without_module_scan(), worker_pickles_kept_in_process(), \
            collector_off_the_graph() as built:
        yield built
