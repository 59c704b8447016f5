"""The method's shape, written once: which model stages CodecLM runs, which model each
calls, how many calls each makes for what, whether it is part of a round, and the
rule that sizes the rounds. The composite (`codeclm.py`) runs it; the run's manifest,
the progress display and its ETA, `plan` and the call budget all read it from here, so
a stage added to the method is added to this table and to the composite, nowhere else.

    seeds ─encode─> metadata ─pool─┬─rubrics─> rubric sets
                                   └─decode──> basic instructions ─┐
         ┌─────────────────────────────────────────────────────────┘
         └─> round t: answer_strong, answer_target, judge (both orders)
                      ─> kept | undecided ─improve─> round t+1
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple

# What a stage's calls are counted per.
SEED = "seed"
POOL_ENTRY = "pool entry"
JUDGED = "judged candidate"
IMPROVED = "improved candidate"
UNITS = (SEED, POOL_ENTRY, JUDGED, IMPROVED)


@dataclasses.dataclass(frozen=True)
class ModelStage:
    name: str  # its counters' name: the manifest's, the progress display's, plan's
    role: str  # the model it calls: strong, target or judge (--ROLE_model)
    per: str  # what its calls are counted per (UNITS)
    calls: int  # model calls per such element
    in_round: bool  # runs in every filter/improve round

    def __post_init__(self):
        if self.per not in UNITS:
            raise ValueError(f"stage {self.name}: per must be one of {UNITS}")


# In the order a run reaches them.
METHOD = (
    ModelStage("encode", "strong", SEED, 1, in_round=False),
    ModelStage("rubrics", "strong", POOL_ENTRY, 1, in_round=False),
    ModelStage("decode", "strong", POOL_ENTRY, 1, in_round=False),
    ModelStage("answer_strong", "strong", JUDGED, 1, in_round=True),
    ModelStage("answer_target", "target", JUDGED, 1, in_round=True),
    # Each candidate is judged in both answer orders.
    ModelStage("judge", "judge", JUDGED, 2, in_round=True),
    ModelStage("improve", "strong", IMPROVED, 1, in_round=True),
)


def stage_names(method: tuple[ModelStage, ...] = METHOD) -> tuple[str, ...]:
    return tuple(stage.name for stage in method)


def roles(method: tuple[ModelStage, ...] = METHOD) -> dict[str, str]:
    """Stage name -> the role whose model it calls."""
    return {stage.name: stage.role for stage in method}


def calls_per(unit: str, method: tuple[ModelStage, ...] = METHOD) -> int:
    """The model calls one element of `unit` costs over the whole method (a judged
    candidate: both answers and both judgements)."""
    return sum(stage.calls for stage in method if stage.per == unit)


def elements(counts: Mapping[str, float],
             method: tuple[ModelStage, ...] = METHOD) -> dict[str, float]:
    """Stage name -> the calls it makes, for so many of each unit."""
    return {stage.name: stage.calls * counts.get(stage.per, 0) for stage in method}


# ---- the round rule ---------------------------------------------------------------

# The least share of judged candidates a round assumes will be kept: a round judges at
# most 1 / MIN_YIELD times what is still needed.
MIN_YIELD = 0.25


def round_slots(kept_so_far: float, judged_so_far: float, num_examples: int,
                margin: int) -> int:
    """How many candidates the next round judges: the pairs still needed divided by
    the share of judged candidates kept so far (at least MIN_YIELD), plus the margin;
    0 once num_examples pairs are kept."""
    needed = num_examples - kept_so_far
    if needed <= 0:
        return 0
    share = kept_so_far / judged_so_far if judged_so_far else 1.0
    return math.ceil(round(needed / max(MIN_YIELD, share), 6)) + margin


class ExpectedRounds(NamedTuple):
    """Expected candidates judged and improved in each round that runs (improved: for
    the next round; the rest of a round's slots are filled with fresh ones from the
    reserve), and the pairs written."""
    judged: list[float]
    improved: list[float]
    pairs: float


def simulate_rounds(accept: tuple[float, ...], basic: float, wanted: float, margin: int,
                    keep_unresolved: bool) -> ExpectedRounds:
    """Expected counts under the rule the composite follows: round 1 judges `wanted`
    (+ margin) of the basic instructions; each later round judges `round_slots`
    candidates, undecided ones improved first, then fresh ones from the reserve.
    `accept`: the share of judged candidates kept in each round."""
    entering = min(float(basic), float(wanted + margin))
    reserve = float(basic) - entering
    judged, improved, kept, total_judged, undecided = [], [], 0.0, 0.0, 0.0
    for number, rate in enumerate(accept, start=1):
        if entering <= 0:
            break
        judged.append(entering)
        kept += entering * rate
        total_judged += entering
        undecided = entering * (1 - rate)
        if number == len(accept):
            break
        slots = round_slots(kept, total_judged, wanted, margin)
        if slots <= 0:
            break
        improving = min(undecided, slots)
        fresh = min(reserve, slots - improving)
        reserve -= fresh
        improved.append(improving)
        entering = improving + fresh
    ran_every_round = len(judged) == len(accept)
    unresolved = undecided if keep_unresolved and ran_every_round else 0.0
    return ExpectedRounds(judged, improved, min(float(wanted), kept + unresolved))


def projected_elements(rounds: ExpectedRounds, seeds: float, pool: float,
                       method: tuple[ModelStage, ...] = METHOD) -> dict[str, float]:
    """Stage name -> its calls in a run of so many seeds and pool entries whose rounds
    go as `rounds` projects: the call budget."""
    return elements({SEED: seeds, POOL_ENTRY: pool, JUDGED: sum(rounds.judged),
                     IMPROVED: sum(rounds.improved)}, method)
