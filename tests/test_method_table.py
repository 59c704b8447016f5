"""The method is written once (transforms/method.py): a stage added to a copy of the
table is priced by `plan`, accounted for by the manifest and placed by the progress
display, with no other edit."""
from codeclm_beam import metrics
from codeclm_beam.metrics import RunCounters
from codeclm_beam.pipelines.commands.plan import Pilot
from codeclm_beam.pipelines.commands.plan import plan
from codeclm_beam.pipelines.run.manifest import accounting
from codeclm_beam.pipelines.run.manifest import estimated_cost
from codeclm_beam.pipelines.run.progress import STAGE_ORDER
from codeclm_beam.pipelines.run.progress import Snapshot
from codeclm_beam.transforms.method import JUDGED
from codeclm_beam.transforms.method import METHOD
from codeclm_beam.transforms.method import ModelStage
from codeclm_beam.transforms.method import calls_per
from codeclm_beam.transforms.method import stage_names

# A critique of each pair by the judge, once per judged candidate, before improve.
CRITIQUE = ModelStage("critique", "judge", JUDGED, 1, in_round=True)
WITH_CRITIQUE = (*METHOD[:6], CRITIQUE, METHOD[6])


def measured(stage: str, elements: int, tokens: int = 100) -> dict:
    return {"models": {"vertex:gemini-2.5-flash": {
        "elements": elements, "requests": elements, "cache_hits": 0,
        "prompt_tokens": tokens * elements, "completion_tokens": tokens * elements}}}


def test_the_table_is_the_method_the_composite_runs():
    assert stage_names() == ("encode", "rubrics", "decode", "answer_strong",
                             "answer_target", "judge", "improve")
    assert calls_per(JUDGED) == 4  # both answers, a judgement in each order
    assert STAGE_ORDER[:7] == stage_names()


def test_a_stage_added_to_a_copy_of_the_table_is_planned_accounted_and_shown():
    judged, pool, seeds = 10, 2, 3
    by_stage = {name: measured(name, n) for name, n in (
        ("encode", seeds), ("rubrics", pool), ("decode", pool),
        ("answer_strong", judged), ("answer_target", judged), ("judge", 2 * judged),
        ("critique", judged))}
    pilot = Pilot(accept_by_round=(1.0,), seeds=seeds, num_metadata=pool,
                  basic_instructions=judged, max_iterations=1, keep_unresolved=False,
                  by_stage=by_stage)
    # plan: the new stage's calls and cost, at one a judged candidate.
    result = plan(pilot, num_examples=judged, num_instructions=judged, num_seeds=seeds,
                  num_metadata=pool, method=WITH_CRITIQUE)
    requests = {s["stage"]: s["requests"] for s in result["stages"]}
    assert requests["critique"] == judged and requests["judge"] == 2 * judged
    assert result["calls_bounds"]["all_kept_in_round_1"] == seeds + 2 * pool + 5 * judged
    # The manifest: its cost counted under its role, a removed candidate saves its
    # call too, and a candidate it loses to a dead letter is accounted for.
    record = {"model_calls": {"by_stage": by_stage}, "billing": {}}
    assert "judge" in estimated_cost(record, WITH_CRITIQUE)["by_role"]
    counters = RunCounters.from_pairs([
        ((metrics.FLOW, metrics.in_round(1, "candidates")), judged),
        ((metrics.FLOW, metrics.in_round(1, "duplicate")), 2),
        ((metrics.FLOW, metrics.BASIC_INSTRUCTIONS), judged),
        ((metrics.DEAD_LETTERS, "critique"), 1)])
    with_critique = accounting(counters, 1, True, method=WITH_CRITIQUE)
    assert with_critique["screening"]["calls_saved"] == 2 * 5
    assert with_critique["candidates"]["lost_to_dead_letters"] == 1
    assert accounting(counters, 1, True)["candidates"]["lost_to_dead_letters"] == 0
    # The progress display: the stages at work in the table's order.
    snapshot = Snapshot(counters, {"improve": 1, "critique": 2}, 5.0,
                        order=stage_names(WITH_CRITIQUE))
    assert snapshot.stages() == ["critique", "improve"]


def test_a_judgement_missing_an_order_with_no_dead_letter_unbalances_the_manifest():
    # 10 judged, 7 kept, 3 contests reached the verdict with one order missing. With
    # the judge's dead letters for them (one or both orders each) the run balances;
    # with none, an answer was lost inside the runner, and the manifest says so
    # instead of counting the 3 as lost to dead letters.
    def run(judge_dead_letters: int) -> dict:
        return accounting(RunCounters.from_pairs([
            ((metrics.FLOW, metrics.BASIC_INSTRUCTIONS), 10),
            ((metrics.FLOW, metrics.in_round(1, "candidates")), 10),
            ((metrics.FLOW, metrics.in_round(1, "kept")), 7),
            ((metrics.FLOW, metrics.EXAMPLES), 7),
            ((metrics.FLOW, metrics.incomplete("judge")), 3),
            ((metrics.DEAD_LETTERS, "judge"), judge_dead_letters)]), 1, True)
    check = "judge: incomplete <= dead letters <= 2 x incomplete"
    for dead_letters, holds in ((0, False), (2, False), (3, True), (6, True), (7, False)):
        result = run(dead_letters)
        assert result["candidates"]["lost_to_dead_letters"] == 3
        assert result["checks"][check] is holds and result["balanced"] is holds, dead_letters
