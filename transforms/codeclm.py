"""`CodecLM`: the whole method as one composite.

    seeds ─Encode─> metadata ─Pool─> pool ─┬─Rubrics─> rubric state ─────────────────┐ (side input)
                                           └─Decode─> basic instructions             │
                                                 ├─ the first num_examples ─┐        │
                                                 └─ the rest: reserve       │        │
      Round t (t = 1..max_iterations, unrolled: Beam has no data-dependent loops)    │
      candidates ─Screen─┬─ duplicates, contaminated ─> rejected (no call paid)      │
                         └─Filter─┬─ kept ─Screen─────────────────────────> pairs    │
                                  └─ undecided ─┬─Select(slots)─┬─ Improve ─┬─> candidates of t+1
                                      reserve ──┘ (undecided    ├─ fresh ───┘        │
                                                  first)        ├─ reserve of t+1    │
                                                                └─ not needed ─> rejected
      after the last round: undecided ─> rejected (or kept with --keep_unresolved)
      pairs ─> examples, cut to N

The screen (`Screen`) removes duplicates (of one another and of the pairs kept in
earlier rounds) and instructions sharing an n-gram with a benchmark before any answer
or judgement is paid for; the round sizing counts only what was judged, so what it
removed is made up for from the reserve. Kept pairs are screened once more (their
answers too, for contamination) in the round that kept them, so the next round makes up
for those too.

Ask for N, get N: decode makes more basic instructions than round 1 judges (a reserve,
`RESERVE_FACTOR` x N by default, at no extra call: one decode call per entry writes
them all). Round 1 judges N (+ margin). Every later round judges as many candidates
as are still needed divided by the share kept so far (`method.round_slots`): undecided ones
first, improved along their rubrics (the method), then fresh ones from the reserve.
No call is spent once N pairs are kept, and the examples are cut to N
deterministically.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import apache_beam as beam

from codeclm_beam import metrics
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.model import ModelConfig
from codeclm_beam.records import Candidate
from codeclm_beam.records import Example
from codeclm_beam.records import Rejection
from codeclm_beam.stage import DeadLettering
from codeclm_beam.stage import Tally
from codeclm_beam.stage import parts
from codeclm_beam.transforms.contrastive_filter import THRESHOLD
from codeclm_beam.transforms.contrastive_filter import ContrastiveFilter
from codeclm_beam.transforms.decode import Decode
from codeclm_beam.transforms.decode import DecodeInstructions
from codeclm_beam.transforms.decode import MAX_INSTRUCTIONS_PER_DECODE_CALL
from codeclm_beam.transforms.decontaminate import BenchmarkGrams
from codeclm_beam.transforms.decontaminate import Decontaminate
from codeclm_beam.transforms.decontaminate import DecontaminationRule
from codeclm_beam.transforms.dedup import DedupRule
from codeclm_beam.transforms.dedup import DeduplicateInstructions
from codeclm_beam.transforms.encode import Encode
from codeclm_beam.transforms.encode import EncodeMetadata
from codeclm_beam.transforms.improve import Improve
from codeclm_beam.transforms.improve import ImproveInstructions
from codeclm_beam.transforms.judge import AnswerInstruction
from codeclm_beam.transforms.judge import Judge
from codeclm_beam.transforms.metadata_pool import BuildMetadataPool
from codeclm_beam.transforms.rubrics import GenerateRubrics
from codeclm_beam.transforms.rubrics import Rubrics
from codeclm_beam.transforms.selection import CountedLimit
from codeclm_beam.transforms.method import round_slots
from codeclm_beam.transforms.selection import Split
from codeclm_beam.transforms.selection import TakeLowestRanked
from codeclm_beam.transforms.selection import stable_rank

# Default basic instructions per pair wanted: round 1 judges one per pair, the rest is
# the reserve.
RESERVE_FACTOR = 2
# The paper's pool holds 200 entries for runs of 1,000-2,000 pairs (2,000-4,000 basic
# instructions): about ten instructions per decode call.
PAPER_POOL_SIZE = 200
INSTRUCTIONS_PER_ENTRY = 10


def default_pool_size(basic_instructions: int) -> int:
    """The pool a run gets when --num_metadata is not given: one entry per ten basic
    instructions, at most the paper's 200, so a 20-pair pilot pays 8 rubric and decode
    calls instead of 400; and past that, as many entries as keep each decode call
    within MAX_INSTRUCTIONS_PER_DECODE_CALL."""
    return max(1, min(PAPER_POOL_SIZE, math.ceil(basic_instructions / INSTRUCTIONS_PER_ENTRY)),
               math.ceil(basic_instructions / MAX_INSTRUCTIONS_PER_DECODE_CALL))


@dataclasses.dataclass(frozen=True)
class CodecLMConfig:
    strong: ModelConfig
    target: ModelConfig
    judge: ModelConfig
    num_examples: int = 1000
    # Basic instructions to decode; None means RESERVE_FACTOR x num_examples. Those
    # round 1 does not judge are the reserve later rounds draw from.
    num_instructions: Optional[int] = None
    overgenerate_margin: int = 0
    # The metadata pool's size; None means `default_pool_size(basic_instructions)`.
    num_metadata: Optional[int] = None
    # The stages' own parameters, defaulting to the stages' defaults.
    max_skills: int = Encode.max_skills
    num_rubrics: int = Rubrics.num_rubrics
    score_scale: int = Judge.score_scale
    max_iterations: int = 4
    threshold: float = THRESHOLD
    keep_unresolved: bool = False
    # Encode, rubrics, decode and improve: structured answers that must not be cut off.
    codec: GenerationSettings = GenerationSettings()
    # Answers of the strong and target models.
    answers: GenerationSettings = AnswerInstruction.settings
    # The judge's temperature and visible output.
    judging: GenerationSettings = Judge.settings
    seed: int = 0
    # Screens before any answer or judgement is paid for (at the start of every round)
    # and on the final pairs: duplicates (None: off) and contamination (None: off).
    dedup: Optional[DedupRule] = DedupRule()
    decontamination: Optional[DecontaminationRule] = None
    # The final pairs' answers are checked for contamination too (no call is saved
    # there: they are paid for; but a pair whose answer quotes a held-out question is
    # not one to train on).
    decontaminate_answers: bool = True
    # Seeds matching a benchmark are reported and left out of encoding (their metadata
    # would steer decoding towards the benchmark) unless kept.
    keep_contaminated_seeds: bool = False

    def __post_init__(self):
        if self.num_metadata is None:
            object.__setattr__(self, "num_metadata",
                               default_pool_size(self.basic_instructions))
        # ConfigurationError: the CLI prints the message and exits 2.
        if self.num_examples < 1:
            raise ConfigurationError(f"--num_examples must be at least 1, not "
                                     f"{self.num_examples}")
        if self.max_iterations < 1:
            raise ConfigurationError("--max_iterations must be at least 1 (basic "
                                     "generation counts as the first)")
        if not 0 <= self.threshold < self.score_scale:
            raise ConfigurationError("--threshold must lie in [0, --score_scale)")
        if self.max_skills < 1 or self.num_rubrics < 1 or self.num_metadata < 1:
            raise ConfigurationError("--max_skills, --num_rubrics and --num_metadata "
                                     "must be at least 1")

    @property
    def basic_instructions(self) -> int:
        return self.num_instructions or RESERVE_FACTOR * self.num_examples

    @property
    def judge_stage(self) -> Judge:
        return Judge(settings=self.judging, score_scale=self.score_scale)

    @property
    def models(self) -> dict[str, str]:
        return {"strong": self.strong.spec.uri, "target": self.target.spec.uri,
                "judge": self.judge.spec.uri}


def config_default(name: str):
    """CodecLMConfig's default for a field: the command line's default too."""
    return CodecLMConfig.__dataclass_fields__[name].default


class CodecLMOutput(NamedTuple):
    seed_metadata: beam.PCollection  # Metadata of the seeds (or the user's metadata)
    examples: beam.PCollection  # Example
    rejected: beam.PCollection  # Rejection
    metadata_pool: beam.PCollection  # Metadata
    rubrics: beam.PCollection  # RubricSet
    # Removal of each seed matching a benchmark (None: no decontamination).
    seeds_contaminated: Optional[beam.PCollection] = None


def rejection(candidate: Candidate, reason: str) -> Rejection:
    return Rejection.of(candidate, reason)


def keep_better_answer(candidate: Candidate, models: dict[str, str]) -> Example:
    return Example.of(candidate, "strong" if candidate.gap >= 0 else "target", models)


def example_rank(example: Example) -> int:
    """Earlier iterations first (the cheaper, more typical data), then a stable hash."""
    return (example.iteration << 48) | stable_rank(example.example_id)


class _KeptAndJudged(beam.CombineFn):
    """(pairs kept, candidates judged) of both, each record measured by `is_kept_pair`.
    Counted in the round's selection's own combine."""

    def create_accumulator(self):
        return 0, 0

    def add_input(self, counts, kept_pair: bool):
        kept, judged = counts
        return (kept + 1, judged) if kept_pair else (kept, judged + 1)

    def merge_accumulators(self, accumulators):
        kept, judged = zip(*accumulators)
        return sum(kept), sum(judged)

    def extract_output(self, counts):
        return counts


def is_kept_pair(record) -> bool:
    """Kept pairs are Examples, judged candidates Candidates."""
    return isinstance(record, Example)


def record_id(record) -> str:
    """A Candidate's or an Example's id (an example keeps its candidate's)."""
    return record.candidate_id if isinstance(record, Candidate) else record.example_id


# The texts of a kept pair the final screen checks for contamination.
PAIR_TEXTS = ("instruction", "response", "other_response")


class Screen(DeadLettering):
    """Candidates (or kept pairs) -> Split(taken = the rest, rest = Rejections): the
    duplicates (of one another, and of `against`, the candidates judged in earlier
    rounds, each as it read when judged, never an earlier version of itself), then those
    sharing an n-gram with a benchmark, each counted under the names given. With
    neither screen on it adds no stage (rest is None)."""

    def __init__(self, config: CodecLMConfig, rank, counters: tuple[str, str],
                 benchmark=None, against: tuple = (), fields: tuple[str, ...] = ("instruction",),
                 deduplicate: bool = True):
        super().__init__()
        self._cfg = config
        self._deduplicate = deduplicate
        self._rank = rank
        self._counters = counters
        self._benchmark = benchmark
        self._against = tuple(against)
        self._fields = fields

    def expand(self, records) -> Split:
        """`records`: a PCollection, or a tuple of them (taken as their flatten)."""
        cfg, removed = self._cfg, []
        duplicate_counter, contaminated_counter = self._counters
        if cfg.dedup is not None and self._deduplicate:
            deduplicated = records | "Deduplicate" >> DeduplicateInstructions(
                text="instruction", key=record_id, rank=self._rank,
                against=self._against or None, rule=cfg.dedup, lineage=record_id)
            records = deduplicated.kept
            removed.append(deduplicated.removed | "CountDuplicates" >> Tally(duplicate_counter))
        if isinstance(records, tuple):
            records = records | "Records" >> beam.Flatten()
        if cfg.decontamination is not None:
            clean = records | "Decontaminate" >> self.handled(Decontaminate(
                cfg.decontamination, self._fields, key=record_id, benchmark=self._benchmark))
            records = clean.kept
            removed.append(clean.removed | "CountContaminated" >> Tally(contaminated_counter))
        if not removed:
            return Split(records, None)
        rejected = (tuple(removed) | "Removed" >> beam.Flatten()
                    | "Reject" >> beam.Map(lambda r: Rejection.of_removal(r.element, r.removal)))
        return Split(records, rejected)


class RoundOutput(NamedTuple):
    kept: beam.PCollection  # Example
    # Rejections, as several PCollections: flattened once, with every round's, at the
    # end (shape: docs/performance.md, "Composite shapes for the local runner").
    rejected: tuple
    judged: beam.PCollection  # the candidates the screen let through: Candidate
    # None after the last round: Candidates improved and fresh (a tuple of the two),
    # for round t+1, and the basic instructions not judged yet.
    next_candidates: Optional[tuple] = None
    reserve: Optional[beam.PCollection] = None


class Round(DeadLettering):
    """Round t of the method (the method's iteration t for the candidates that began in
    round 1), counting what it keeps, leaves undecided and rejects:

        candidates ─Filter─┬─ kept
                           └─ undecided ─┬─Select(slots)─┬─ undecided ─Improve─┬─> next
                     reserve ────────────┘  (undecided   ├─ fresh ─────────────┘
                                             first)      ├─ reserve of t+1
                                                         └─ undecided, not needed ─> rejected

    The last round rejects what is still undecided (or keeps its better answer with
    keep_unresolved), and the reserve it did not need."""

    def __init__(self, config: CodecLMConfig, number: int, rubric_state, reserve,
                 kept_before: list, judged_before: list, benchmark=None):
        super().__init__()
        self._cfg = config
        self._number = number
        self._rubric_state = rubric_state
        self._reserve = reserve
        self._kept_before = list(kept_before)
        self._judged_before = list(judged_before)
        self._benchmark = benchmark

    def expand(self, candidates) -> RoundOutput:
        cfg, t = self._cfg, self._number
        # Round 1's candidates are a PCollection, a later round's a tuple (improved,
        # fresh): each part is counted and screened where it is made (`parts`).
        counted = tuple(part | f"CountCandidates{i or ''}" >> Tally(
            metrics.in_round(t, "candidates")) for i, part in enumerate(parts(candidates)))
        screened = (counted
                    | "Screen" >> self.handled(Screen(
                        cfg, candidate_rank(cfg.seed),
                        (metrics.in_round(t, "duplicate"), metrics.in_round(t, "contaminated")),
                        self._benchmark, against=self._judged_before)))
        judged = screened.taken
        filtered = judged | "ContrastiveFilter" >> self.handled(ContrastiveFilter(
            cfg.strong, cfg.target, cfg.judge, threshold=cfg.threshold,
            answers=cfg.answers, judging=cfg.judge_stage, run_seed=cfg.seed))
        kept = self._screen_pairs(
            filtered.kept | "CountKept" >> Tally(metrics.in_round(t, "kept")), "Kept")
        undecided = filtered.undecided | "CountUndecided" >> Tally(metrics.in_round(t, "undecided"))
        if t == cfg.max_iterations:
            return self._last(kept, undecided, judged, screened.rest)

        # The undecided are improved (the method) and the slots they leave filled
        # from the reserve: one selection of both, the undecided ranked first.
        selected = ((undecided, self._reserve)
                    | "SelectForNextRound" >> TakeLowestRanked(
                        undecided_first(cfg.seed), max_limit=cfg.basic_instructions,
                        limit=self._slots(judged, kept.taken)))
        improve, fresh = selected.taken | "ToImproveOrFresh" >> beam.Partition(by_judged, 2)
        not_needed, reserve = selected.rest | "NotNeededOrReserve" >> beam.Partition(
            by_judged, 2)
        improved = improve | "ImproveInstructions" >> self.handled(
            ImproveInstructions(cfg.strong, self._rubric_state, Improve(settings=cfg.codec),
                                cfg.seed))
        rejected_not_needed = (not_needed
                               | "CountNotNeeded" >> Tally(metrics.in_round(t, "not_needed"))
                               | "RejectNotNeeded" >> beam.Map(rejection, "not_needed"))
        return RoundOutput(
            kept=kept.taken, judged=judged,
            next_candidates=(improved,
                             fresh | "CountFresh" >> Tally(metrics.in_round(t + 1, "fresh"))),
            reserve=reserve,
            rejected=_present(rejected_not_needed, screened.rest, kept.rest))

    def _screen_pairs(self, pairs, label: str) -> Split:
        """The kept pairs' screen (their answers too), round by round: the next round's
        sizing sees what it removed and makes up for it. Only for contamination: the
        pairs are duplicates of nothing kept, as the candidates they were were not."""
        cfg = self._cfg
        return pairs | f"Screen{label}Pairs" >> self.handled(Screen(
            cfg, example_rank, (metrics.PAIRS_DUPLICATE, metrics.PAIRS_CONTAMINATED),
            self._benchmark, fields=PAIR_TEXTS if cfg.decontaminate_answers
            else ("instruction",), deduplicate=False))

    def _slots(self, judged_now, kept) -> CountedLimit:
        """round_slots, from everything kept and judged up to this round (what the
        screens removed was not judged: the next round makes up for it)."""
        num_examples, margin = self._cfg.num_examples, self._cfg.overgenerate_margin
        return CountedLimit(
            counted=(*self._judged_before, judged_now, *self._kept_before, kept),
            counter=_KeptAndJudged(),
            limit=lambda counts: round_slots(*counts, num_examples=num_examples,
                                             margin=margin),
            measure=is_kept_pair)

    def _last(self, kept, undecided, judged, screened_out) -> RoundOutput:
        cfg = self._cfg
        unused = (self._reserve
                  | "CountReserveUnused" >> Tally(metrics.RESERVE_UNUSED)
                  | "RejectReserveUnused" >> beam.Map(rejection, "not_needed"))
        rejected = [unused, screened_out, kept.rest]
        kept = kept.taken
        if cfg.keep_unresolved:
            unresolved = self._screen_pairs(undecided | "KeepUnresolved" >> beam.Map(
                keep_better_answer, cfg.models), "Unresolved")
            kept = (kept, unresolved.taken) | "KeptAndUnresolved" >> beam.Flatten()
            rejected.append(unresolved.rest)
        else:
            rejected.append(undecided | "RejectUnresolved" >> beam.Map(
                rejection, "within_threshold"))
        return RoundOutput(kept, _present(*rejected), judged)


def _present(*pcolls) -> tuple:
    return tuple(p for p in pcolls if p is not None)


def candidate_rank(seed: int):
    return lambda candidate: stable_rank(str(seed), candidate.candidate_id)


def was_judged(candidate: Candidate) -> bool:
    """Undecided candidates were judged; the reserve's never were."""
    return candidate.strong_score is not None


def by_judged(candidate: Candidate, _) -> int:
    return 0 if was_judged(candidate) else 1


def undecided_first(seed: int):
    """A round's selection order: the undecided (judged) candidates, then the
    reserve's, each in `candidate_rank` order."""
    rank = candidate_rank(seed)
    return lambda candidate: (not was_judged(candidate)) << 48 | rank(candidate)


class Counted(DeadLettering):
    """A stage whose outputs are counted as the flow counter `name`."""

    def __init__(self, stage: beam.PTransform, name: str):
        super().__init__()
        self._stage = stage
        self._name = name

    def expand(self, pcoll) -> beam.PCollection:
        return (pcoll | "Stage" >> self.handled(self._stage)
                | "Count" >> Tally(self._name))


class SeedMetadata(DeadLettering):
    """Seeds -> their encoded metadata; or the user's metadata, as it is."""

    def __init__(self, config: CodecLMConfig, from_metadata: bool):
        super().__init__()
        self._cfg = config
        self._from_metadata = from_metadata

    def expand(self, inputs) -> beam.PCollection:
        cfg = self._cfg
        if self._from_metadata:
            return inputs
        return inputs | "Encode" >> self.handled(Counted(EncodeMetadata(
            cfg.strong, Encode(settings=cfg.codec, max_skills=cfg.max_skills), cfg.seed),
            metrics.METADATA))


class RoundsOutput(NamedTuple):
    kept: beam.PCollection  # Example, from every round
    rejected: tuple  # of PCollections of Rejection (see RoundOutput)


class Rounds(DeadLettering):
    """Round 1 .. max_iterations, unrolled (Beam has no data-dependent loops): each
    round's next candidates are the following round's input."""

    def __init__(self, config: CodecLMConfig, rubric_state, reserve, benchmark=None):
        super().__init__()
        self._cfg = config
        self._rubric_state = rubric_state
        self._reserve = reserve
        self._benchmark = benchmark

    def expand(self, candidates) -> RoundsOutput:
        reserve, kept, judged, rejected = self._reserve, [], [], []
        for number in range(1, self._cfg.max_iterations + 1):
            result = candidates | f"Round{number}" >> self.handled(Round(
                self._cfg, number, self._rubric_state, reserve, kept, judged,
                self._benchmark))
            judged.append(result.judged)
            kept.append(result.kept)
            rejected.extend(result.rejected)
            candidates, reserve = result.next_candidates, result.reserve
        return RoundsOutput(tuple(kept) | "AllKept" >> beam.Flatten(), tuple(rejected))


class CutToNumExamples(beam.PTransform):
    """Kept pairs -> Split(taken = the num_examples lowest-ranked (`example_rank`),
    rest = the surplus, as rejections); both counted."""

    def __init__(self, num_examples: int):
        super().__init__()
        self._num_examples = num_examples

    def expand(self, kept) -> Split:
        cut = kept | "Cut" >> TakeLowestRanked(example_rank, self._num_examples)
        return Split(cut.taken | "CountExamples" >> Tally(metrics.EXAMPLES),
                     cut.rest
                     | "CountSurplus" >> Tally(metrics.SURPLUS)
                     | "RejectSurplus" >> beam.Map(Rejection.of_example, "surplus"))


class CodecLM(DeadLettering):
    """PCollection[Seed] (or PCollection[Metadata] with from_metadata=True) ->
    CodecLMOutput; what failed goes to the error handler (`with_error_handler`)."""

    def __init__(self, config: CodecLMConfig, from_metadata: bool = False):
        super().__init__()
        self._config = config
        self._from_metadata = from_metadata

    def expand(self, inputs) -> CodecLMOutput:
        cfg = self._config
        benchmark = seeds_contaminated = None
        if cfg.decontamination is not None:
            benchmark = inputs.pipeline | "BenchmarkGrams" >> self.handled(
                BenchmarkGrams(cfg.decontamination))
        if benchmark is not None and not self._from_metadata:
            screened = inputs | "ScreenSeeds" >> self.handled(Decontaminate(
                cfg.decontamination, ("instruction",), key="seed_id", benchmark=benchmark))
            seeds_contaminated = (screened.removed
                                  | "CountContaminatedSeeds" >> Tally(
                                      metrics.SEEDS_CONTAMINATED)
                                  | "SeedRemovals" >> beam.Map(lambda removed: removed.removal))
            if not cfg.keep_contaminated_seeds:
                inputs = screened.kept
        metadata = inputs | "SeedMetadata" >> self.handled(
            SeedMetadata(cfg, self._from_metadata))
        built = metadata | "BuildMetadataPool" >> BuildMetadataPool(
            cfg.num_metadata, cfg.max_skills, cfg.seed, with_size=True)
        pool = built.entries | "CountPool" >> Tally(metrics.METADATA_POOL)
        rubrics = pool | "GenerateRubrics" >> self.handled(Counted(GenerateRubrics(
            cfg.strong, Rubrics(settings=cfg.codec, num_rubrics=cfg.num_rubrics),
            cfg.seed), metrics.RUBRIC_SETS))
        basic = pool | "DecodeInstructions" >> self.handled(Counted(DecodeInstructions(
            cfg.strong, cfg.basic_instructions, Decode(settings=cfg.codec), cfg.seed,
            pool_size=built.size), metrics.BASIC_INSTRUCTIONS))
        first = basic | "TakeFirstRound" >> TakeLowestRanked(
            candidate_rank(cfg.seed), cfg.num_examples + cfg.overgenerate_margin)
        rounds = first.taken | "Rounds" >> self.handled(
            Rounds(cfg, rubrics, first.rest, benchmark))
        examples = rounds.kept | "CutToNumExamples" >> CutToNumExamples(cfg.num_examples)
        return CodecLMOutput(
            seed_metadata=metadata, examples=examples.taken,
            rejected=(*rounds.rejected, examples.rest) | "Rejected" >> beam.Flatten(),
            metadata_pool=pool, rubrics=rubrics, seeds_contaminated=seeds_contaminated)
