"""Each CodecLM stage alone on TestPipeline, driven by the scripted backend."""
import apache_beam as beam
from apache_beam.transforms.error_handling import CollectingErrorHandler
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelConfig
from codeclm_beam.records import Candidate
from codeclm_beam.records import Metadata
from codeclm_beam.records import RubricSet
from codeclm_beam.records import Seed
from codeclm_beam.transforms import BuildMetadataPool
from codeclm_beam.transforms import ContrastiveFilter
from codeclm_beam.transforms import DecodeInstructions
from codeclm_beam.transforms import EncodeMetadata
from codeclm_beam.transforms import GenerateRubrics
from codeclm_beam.transforms import ImproveInstructions
from codeclm_beam.transforms.decode import TOKENS_PER_INSTRUCTION
from codeclm_beam.transforms.decode import Decode
from codeclm_beam.transforms.encode import Encode
from codeclm_beam.transforms.rubrics import Rubrics
from codeclm_beam.records import make_metadata
from codeclm_beam.records import normalize_skills
from codeclm_beam.transforms.metadata_pool import build_metadata_pool
from tests.helpers import scripted_models
from tests.scripted_backend import read_calls


@pytest.fixture
def models(tmp_path):
    return {role: ModelConfig(uri) for role, uri in
            scripted_models(tmp_path, "strong_wins").items()}


def models_for(tmp_path, judge):
    return {role: ModelConfig(uri) for role, uri in
            scripted_models(tmp_path, judge).items()}


def test_encode_normalises_metadata(models):
    seeds = [Seed("s1", "Python sorting Lists quickly", "f:1"),
             Seed("s2", "poem", "f:2")]
    with TestPipeline() as p:
        with CollectingErrorHandler() as dead_letters:
            out = (p | beam.Create(seeds) | EncodeMetadata(
                models["strong"], Encode(max_skills=2)).with_error_handler(dead_letters))
        assert_that(out | beam.Map(lambda m: (m.seed_id, m.use_case, m.skills,
                                                      m.origin)),
                    equal_to([("s1", "python tasks", ("sorting", "lists"), "seed"),
                              ("s2", "poem tasks", ("writing",), "seed")]),
                    label="metadata")
        # "poem" alone: the scripted model answers skills ["knowledge", "writing"];
        # "knowledge" may never stand as a skill, "writing" remains.
        assert_that(dead_letters.output(), equal_to([]), label="no dead letters")


def test_skill_normalisation_rules():
    assert normalize_skills(["Python Skills", "  Market   Research ", "knowledge",
                             "skill", "python"], 3) == ("python", "market research")
    with pytest.raises(ValueError):
        make_metadata("code", ["knowledge", "skills"], "seed", 3)


def test_metadata_pool_keeps_originals_and_is_reproducible():
    entries = [make_metadata(uc, sk, "seed", 3, f"s{i}") for i, (uc, sk) in enumerate([
        ("code generation", ["python", "algorithms"]),
        ("code generation", ["sql"]),
        ("creative writing", ["poetry", "imagery"]),
    ])]
    pool = build_metadata_pool(entries, 10, 3, seed=7)
    assert len(pool) == 10
    assert {m.metadata_id for m in entries} <= {m.metadata_id for m in pool}
    assert len({m.metadata_id for m in pool}) == 10
    assert pool == build_metadata_pool(list(reversed(entries)), 10, 3, seed=7)
    assert pool != build_metadata_pool(entries, 10, 3, seed=8)
    mixed = [m for m in pool if m.origin == "mix"]
    skills = {"python", "algorithms", "sql", "poetry", "imagery"}
    assert all(1 <= len(m.skills) <= 3 and set(m.skills) <= skills for m in mixed)
    assert all(m.use_case in ("code generation", "creative writing") for m in mixed)
    # More originals than asked for: every original is kept, as the method does.
    larger = build_metadata_pool(entries, 2, 3, seed=1)
    assert {m.metadata_id for m in larger} == {m.metadata_id for m in entries}
    assert all(m.origin == "seed" for m in larger)


def test_metadata_pool_transform(models):
    entries = [make_metadata(f"use case {i}", [f"skill{i}", "shared"], "seed", 3, f"s{i}")
               for i in range(3)]
    with TestPipeline() as p:
        pool = p | beam.Create(entries) | BuildMetadataPool(num_metadata=6, seed=1)
        assert_that(pool | beam.combiners.Count.Globally(), equal_to([6]))


def test_rubrics_once_per_entry(models):
    pool = [Metadata(f"m{i}", "code generation", ("python",), "seed") for i in range(3)]
    with TestPipeline() as p:
        out = p | beam.Create(pool) | GenerateRubrics(models["strong"], Rubrics(num_rubrics=4))
        assert_that(out | beam.Map(lambda r: (r.metadata_id, len(r.rubrics),
                                                      len(r.actions))),
                    equal_to([(f"m{i}", 4, 4) for i in range(3)]))


def test_decode_splits_instructions_equally(models):
    pool = [Metadata(f"m{i}", f"use case {i}", ("python",), "seed") for i in range(3)]
    with TestPipeline() as p:
        out = p | beam.Create(pool) | DecodeInstructions(models["strong"], 7)
        # ceil(7 / 3) = 3 per entry
        assert_that(out | beam.Map(lambda c: (c.metadata_id, c.iteration))
                    | beam.combiners.Count.PerElement(),
                    equal_to([((f"m{i}", 1), 3) for i in range(3)]))


def test_a_request_schema_is_made_once_per_answer_type_not_per_name():
    # The variants of one answer share a class name: each keeps its own schema, made
    # once and handed to every request of its stage.
    from codeclm_beam.transforms.decode import decode_answer
    three, four = decode_answer(3), decode_answer(4)
    assert three.__name__ == four.__name__
    assert three.request_schema() is three.request_schema()
    assert [answer.request_schema()["properties"]["instructions"]["minItems"]
            for answer in (three, four)] == [3, 4]
    assert "$defs" not in three.request_schema() and "title" not in three.request_schema()


def test_decode_output_limit_grows_with_the_count(tmp_path, models):
    # 12 instructions in one answer need more than the 1024-token floor; a fixed limit
    # would truncate the JSON into a parse failure on a real model.
    pool = [Metadata("m0", "use case", ("python",), "seed")]
    with TestPipeline() as p:
        out = (p | beam.Create(pool)
               | DecodeInstructions(models["strong"], 12, Decode(
                   settings=GenerationSettings(max_output_tokens=1024))))
        assert_that(out | beam.combiners.Count.Globally(), equal_to([12]))
    limits = [c["max_output_tokens"] for c in read_calls(tmp_path / "calls")
              if c["kind"] == "decode"]
    assert limits == [12 * TOKENS_PER_INSTRUCTION]


def candidate(i, **kw):
    return Candidate(f"c{i}", f"Do task {i}.", "m0", "code generation", ("python",), **kw)


@pytest.mark.parametrize("judge,kept,source,gap", [
    ("strong_wins", 2, "strong", 7.0), ("target_wins", 2, "target", -7.0),
    ("tie", 0, None, 0.0)])
def test_contrastive_filter_gap_rule(tmp_path, judge, kept, source, gap):
    m = models_for(tmp_path, judge)
    with TestPipeline() as p:
        out = (p | beam.Create([candidate(0), candidate(1)])
               | ContrastiveFilter(m["strong"], m["target"], m["judge"], threshold=3.0))
        assert_that(out.kept | beam.Map(lambda e: (e.response_source, e.gap)),
                    equal_to([(source, gap)] * kept), label="kept")
        assert_that(out.undecided | beam.Map(lambda c: (c.strong_score, c.target_score,
                                                         bool(c.strong_answer))),
                    equal_to([(6.0, 6.0, True)] * (2 - kept)), label="undecided")


def test_contrastive_filter_threshold_is_inclusive(tmp_path):
    m = models_for(tmp_path, "strong_wins")  # gap 7
    with TestPipeline() as p:
        out = (p | beam.Create([candidate(0)])
               | ContrastiveFilter(m["strong"], m["target"], m["judge"], threshold=7.0))
        assert_that(out.kept, equal_to([]), label="kept")
        assert_that(out.undecided | beam.Map(lambda c: c.gap), equal_to([7.0]),
                    label="undecided")


def test_improve_applies_a_fresh_action_and_records_the_chain(models):
    rubric = RubricSet("m0", "code generation", ("python",), ("r1", "r2"),
                       ("add tests", "add types"))
    start = candidate(0, iteration=2, actions_applied=("add tests",),
                      history=("Do task.",))
    orphan = Candidate("c9", "Orphan.", "m-missing", "x", ("y",))
    with TestPipeline() as p:
        state = p | "Rubrics" >> beam.Create([rubric])
        with CollectingErrorHandler() as dead_letters:
            out = (p | beam.Create([start, orphan])
                   | ImproveInstructions(models["strong"], state).with_error_handler(
                       dead_letters))
        assert_that(out | beam.Map(lambda c: (
            c.candidate_id, c.iteration, c.actions_applied, c.history, c.instruction)),
            equal_to([("c0", 3, ("add tests", "add types"), ("Do task.", "Do task 0."),
                       "Do task 0. Also: add types.")]), label="improved")
        assert_that(dead_letters.output() | beam.Map(lambda d: (d.stage, d.element_id,
                                                           d.error_class)),
                    equal_to([("improve", "c9", "LookupError")]), label="dead")


def test_selections_take_the_lowest_ranks_up_to_a_limit_known_at_run_time():
    """A round's limit is worked out at run time from what is counted elsewhere (with
    nothing counted, from the count of nothing); an empty input takes nothing, a tuple
    of inputs is taken as their flatten, and max_limit bounds a larger limit."""
    from codeclm_beam.transforms.selection import CountedLimit
    from codeclm_beam.transforms.selection import TakeLowestRanked
    rank = lambda n: n  # noqa: E731
    with TestPipeline() as p:
        counted = p | "Counted" >> beam.Create(["a", "b", "c"])
        nothing = (p | "Nothing" >> beam.Create([], reshuffle=False).with_output_types(int))
        count = beam.combiners.CountCombineFn()
        three = CountedLimit((counted,), count, lambda n: n)
        many = ((p | "Many" >> beam.Create([50, 10, 40]), p | "More" >> beam.Create([20, 30]))
                | "FromMany" >> TakeLowestRanked(rank, 10, three))
        by_default = (p | "Few" >> beam.Create([9, 1, 8, 2])
                      | "ByDefault" >> TakeLowestRanked(
                          rank, 10, CountedLimit((nothing,), count, lambda n: n + 2)))
        none = nothing | "FromNone" >> TakeLowestRanked(rank, 10, three)
        capped = (p | "Capped" >> beam.Create([5, 4, 3])
                  | "FromCapped" >> TakeLowestRanked(rank, 1, three))
        assert_that(many.taken, equal_to([10, 20, 30]), label="many taken")
        assert_that(many.rest, equal_to([40, 50]), label="many rest")
        assert_that(by_default.taken, equal_to([1, 2]), label="default taken")
        assert_that(by_default.rest, equal_to([8, 9]), label="default rest")
        assert_that(none.taken, equal_to([]), label="none taken")
        assert_that(capped.taken, equal_to([3]), label="capped taken")
        assert_that(capped.rest, equal_to([4, 5]), label="capped rest")


def test_a_counted_limit_combines_each_counted_records_measure_not_the_record():
    """The counted PCollections of a round's selection are every record of the rounds
    before; the combine gets each one's measure, taken where the record is made, so
    the record is not moved to it (before the measure the counter got the records,
    and summing them failed)."""
    from codeclm_beam.transforms.selection import CountedLimit
    from codeclm_beam.transforms.selection import TakeLowestRanked
    with TestPipeline() as p:
        counted = p | "Kinds" >> beam.Create(["kept", "judged", "kept"])
        kept_twice = CountedLimit((counted,), beam.CombineFn.from_callable(sum),
                                  lambda kept: kept, measure=lambda r: r == "kept")
        taken = (p | "Ranks" >> beam.Create([7, 5, 6]) | TakeLowestRanked(
            lambda n: n, 10, kept_twice)).taken
        assert_that(taken, equal_to([5, 6]))
