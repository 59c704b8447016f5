"""Beam's DoFn introspection kept per class during our runs
(`pipelines/run/lean.py`) gives Beam's own answer for every DoFn, finds state
where there is state, asks Beam where the class alone does not decide, and is Beam's
own function again outside a run; the garbage collector is paused while a graph is
built, then kept off it until the run ends, and left as it was after; the local
runner's bundles sample their state at a short tick and still count where time went;
side inputs are weighed as Beam weighs them, without its scan of every module; what a
worker pickles for itself stays in its process, and what it gets in Beam's form is read
as Beam reads it."""
import gc
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.worker import statecache
from apache_beam.runners.worker import statesampler
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from apache_beam.utils.counters import CounterFactory
from apache_beam.transforms import userstate
from apache_beam.transforms.userstate import BagStateSpec
from apache_beam.typehints.decorators import IOTypeHints
from apache_beam.typehints.typecheck import TypeCheckWrapperDoFn

from codeclm_beam.pipelines.generate import build_pipeline
from codeclm_beam.pipelines.generate import codeclm_config
from codeclm_beam.pipelines.run import lean
from codeclm_beam.pipelines.run.lean import collector_off_the_graph
from codeclm_beam.pipelines.run.lean import dofn_specs_by_class
from codeclm_beam.pipelines.run.lean import sampler_ticking_briefly
from codeclm_beam.pipelines.run.lean import side_inputs_sized_without_module_scan
from codeclm_beam.records import SAMPLE_CANDIDATE
from codeclm_beam.records import RubricSet
from tests.test_dataflow_dry_run import DRY_RUN
from tests.test_dataflow_dry_run import GENERATE

BEAMS_OWN = userstate.get_dofn_specs
# What swaps Beam's internals is checked on that Beam alone; elsewhere Beam's own stay
# (tested below), so a swap's effect cannot be seen.
on_verified_beam = pytest.mark.skipif(
    not beam.__version__.startswith(lean.VERIFIED_BEAM),
    reason=f"the lean run swaps only on Beam {lean.VERIFIED_BEAM}*")


class _Counting(beam.DoFn):
    BAG = BagStateSpec("seen", beam.coders.StrUtf8Coder())

    def process(self, element, seen=beam.DoFn.StateParam(BAG)):
        yield element


class _Plain(beam.DoFn):
    def process(self, element):
        yield element


def _dofns_of(pipeline) -> list:
    found = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, beam.ParDo):
                found.append(node.transform.fn)
    pipeline.visit(Visitor())
    return found


def test_every_dofn_of_generates_graph_gets_beams_own_answer():
    options = PipelineOptions(DRY_RUN + GENERATE)
    with dofn_specs_by_class():
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, options, codeclm_config(options, "lean-run"),
                       "gs://codeclm-test-bucket/out")
        dofns = _dofns_of(pipeline)
        # Twice: the second answer of each class comes from what was kept.
        kept = [userstate.get_dofn_specs(dofn) for dofn in dofns + dofns]
    assert len(dofns) > 300
    assert kept == [BEAMS_OWN(dofn) for dofn in dofns + dofns]
    assert sum(lean._key(dofn) is not None for dofn in dofns) > 0.9 * len(dofns)


def test_state_is_found_through_what_is_kept_and_the_class_does_not_stand_for_a_wrapper():
    with dofn_specs_by_class():
        states = [userstate.get_dofn_specs(_Counting())[0] for _ in range(2)]
        assert userstate.is_stateful_dofn(_Counting())
        # Beam's runtime type-check wrapper reads the wrapped DoFn's methods: one class,
        # two answers, each Beam's.
        wrapped = [TypeCheckWrapperDoFn(fn, IOTypeHints.empty()) for fn in (_Plain(), _Counting())]
        assert [lean._key(w) for w in wrapped] == [None, None]
        assert [bool(userstate.get_dofn_specs(w)[0]) for w in wrapped] == [False, True]
        # A FlatMap over a bound method: the instance's own process decides.
        assert lean._key(beam.FlatMap(_Counting().process).fn) is None
    assert states == [{_Counting.BAG}, {_Counting.BAG}]


@on_verified_beam
def test_outside_a_run_and_on_another_beam_it_is_beams_own(monkeypatch):
    with dofn_specs_by_class():
        assert userstate.get_dofn_specs is not BEAMS_OWN
        with dofn_specs_by_class():  # nested: the outer one's stays
            inner = userstate.get_dofn_specs
        assert userstate.get_dofn_specs is inner
    assert userstate.get_dofn_specs is BEAMS_OWN
    monkeypatch.setattr(lean, "VERIFIED_BEAM", "0.0.")
    with dofn_specs_by_class():
        assert userstate.get_dofn_specs is BEAMS_OWN


def test_the_collector_is_paused_while_building_and_kept_off_the_graph_until_the_end():
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with collector_off_the_graph() as built:
        assert not gc.isenabled()
        graph = [[] for _ in range(1000)]
        built()
        assert gc.isenabled() and gc.get_freeze_count() > len(graph)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # A build that fails leaves the collector on and nothing frozen.
    with pytest.raises(ValueError):
        with collector_off_the_graph():
            raise ValueError("the build failed")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_collector_someone_else_turned_off_is_left_alone():
    gc.disable()
    try:
        with collector_off_the_graph() as built:
            built()
            assert not gc.isenabled() and gc.get_freeze_count() == 0
        assert not gc.isenabled()
    finally:
        gc.enable()


def _local_run_ticks_at(tick_ms: int) -> None:
    """A local run whose elements are each processed under a state sampler that ticks
    every tick_ms."""
    with beam.Pipeline() as pipeline:
        ticks = (pipeline | beam.Create([1, 2])
                 | beam.Map(lambda _: statesampler.get_current_tracker().sampling_period_ms))
        assert_that(ticks, equal_to([tick_ms] * 2))


@on_verified_beam
def test_the_local_runners_bundles_tick_briefly_within_and_beams_way_outside(monkeypatch):
    with sampler_ticking_briefly():
        _local_run_ticks_at(lean.SAMPLER_TICK_MS)
        # Time is still sampled and put where it went.
        sampler = statesampler.StateSampler("step", CounterFactory())
        state = sampler.scoped_state("Step", "process")
        sampler.start()
        with state:
            time.sleep(0.05)
        sampler.stop()
    assert state.sampled_seconds() >= 0.02
    _local_run_ticks_at(statesampler.DEFAULT_SAMPLING_PERIOD_MS)
    monkeypatch.setattr(lean, "VERIFIED_BEAM", "0.0.")
    with sampler_ticking_briefly():
        assert statesampler.StateSampler is lean._BEAMS_SAMPLER


@on_verified_beam
def test_side_inputs_weigh_what_beam_weighs_them_without_the_module_scan(monkeypatch):
    """The side inputs of generate's rounds (ranks, counts, the rubric state by
    metadata id, candidates) and values holding a module, a function, a class and a
    bound method, the ways to reach a module's globals."""
    rubrics = {f"m{i}": RubricSet(f"m{i}", "code", ("sql",), ("r1", "r2"), ("a1", "a2"))
               for i in range(50)}
    values = [list(range(200)), (12, 40), rubrics, [SAMPLE_CANDIDATE] * 3,
              [gc, _dofns_of, _Plain, _Plain().process, {"text": "x" * 100}]]
    beams = [statecache.get_deep_size(value) for value in values]
    with side_inputs_sized_without_module_scan():
        assert statecache.get_deep_size is not lean._BEAMS_SIZING
        assert [statecache.get_deep_size(value) for value in values] == beams
    assert statecache.get_deep_size is lean._BEAMS_SIZING
    monkeypatch.setattr(lean, "VERIFIED_BEAM", "0.0.")
    with side_inputs_sized_without_module_scan():
        assert statecache.get_deep_size is lean._BEAMS_SIZING


@on_verified_beam
def test_a_workers_own_pickles_stay_in_process_and_beams_are_read_as_beam_reads_them(
        monkeypatch):
    from apache_beam.internal import pickler
    from apache_beam.runners.worker import bundle_processor
    from apache_beam.runners.worker import operations
    from codeclm_beam.pipelines.run.lean import worker_pickles_kept_in_process
    fn_data = (_Plain(), (1,), {"k": "v"}, [], None)
    with worker_pickles_kept_in_process():
        ours = bundle_processor.pickler.dumps(fn_data)
        with pytest.raises(Exception):  # not Beam's form (bz2, base64)
            pickler.loads(ours)
        for encoded in (ours, pickler.dumps(fn_data)):
            fn, args, kwargs, _, _ = operations.pickler.loads(encoded)
            assert isinstance(fn, _Plain) and fn is not fn_data[0]
            assert (args, kwargs) == ((1,), {"k": "v"})
        # A local run's stages (ParDos, a combine, a side input) through them.
        with beam.Pipeline() as pipeline:
            numbers = pipeline | beam.Create([1, 2, 3])
            total = numbers | beam.CombineGlobally(sum)
            shares = numbers | beam.Map(lambda n, t: n / t, beam.pvalue.AsSingleton(total))
            assert_that(shares, equal_to([1 / 6, 2 / 6, 3 / 6]))
    assert bundle_processor.pickler is pickler and operations.pickler is pickler
    monkeypatch.setattr(lean, "VERIFIED_BEAM", "0.0.")
    with worker_pickles_kept_in_process():
        assert bundle_processor.pickler is pickler and operations.pickler is pickler


def test_every_dofn_of_evaluates_graph_gets_beams_own_answer(tmp_path):
    import os

    from codeclm_beam.pipelines.evaluate import build_pipeline as build_evaluate
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "benchmarks")
    options = PipelineOptions([
        "--benchmark", os.path.join(fixtures, "koala.jsonl"),
        "--strong_model", "openai:strong@http://127.0.0.1:9/v1",
        "--candidate_model", "openai:tuned@http://127.0.0.1:9/v1",
        "--output_dir", str(tmp_path / "eval")])
    with dofn_specs_by_class():
        pipeline = beam.Pipeline(options=options)
        build_evaluate(pipeline, options, str(tmp_path / "eval"), "lean-run")
        dofns = _dofns_of(pipeline)
        kept = [userstate.get_dofn_specs(dofn) for dofn in dofns + dofns]
    assert len(dofns) > 20
    assert kept == [BEAMS_OWN(dofn) for dofn in dofns + dofns]


def test_a_library_run_and_a_renamed_private_name_leave_beam_as_it_is(monkeypatch):
    with lean.lean_run(enabled=False) as built:  # generate.run(...) from a library
        built()
        assert userstate.get_dofn_specs is BEAMS_OWN
        assert statesampler.StateSampler is lean._BEAMS_SAMPLER
        assert gc.isenabled() and gc.get_freeze_count() == 0
    # A patch release that renames a private name the sizing relies on: Beam's own.
    monkeypatch.delattr(statecache, "_filter_func")
    with side_inputs_sized_without_module_scan():
        assert statecache.get_deep_size is lean._BEAMS_SIZING
