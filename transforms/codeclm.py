"""`CodecLM`: the whole method as one composite.

    seeds ─Encode─> metadata ─Pool─> pool ─┬─Rubrics─> rubric state ──────────────┐ (side input)
                                           └─Decode─> basic instructions           │
                                                        │                          │
           Round t (t = 1..max_iterations, unrolled: Beam has no data-dependent loops)
           candidates ─Filter─┬─ kept ───────────────────────────────> examples
                              └─ undecided ─Select(needed)─┬─Improve─> candidates of t+1
                                                           └─ not needed ─> rejected
           after the last round: undecided ─> rejected (or kept with --keep_unresolved)

Each round reads the count kept so far as a side input and improves no more candidates
than are still needed (plus `overgenerate_margin`), so no calls are spent once the
dataset is full; the final examples are cut to `num_examples` deterministically.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import apache_beam as beam

from codeclm_beam.model import ModelConfig
from codeclm_beam.records import Candidate
from codeclm_beam.records import Example
from codeclm_beam.records import Rejection
from codeclm_beam.stage import Tally
from codeclm_beam.transforms.contrastive_filter import ContrastiveFilter
from codeclm_beam.transforms.decode import DecodeInstructions
from codeclm_beam.transforms.encode import EncodeMetadata
from codeclm_beam.transforms.improve import ImproveInstructions
from codeclm_beam.transforms.metadata_pool import BuildMetadataPool
from codeclm_beam.transforms.rubrics import GenerateRubrics
from codeclm_beam.transforms.selection import TakeLowestRanked
from codeclm_beam.transforms.selection import stable_rank


@dataclasses.dataclass(frozen=True)
class CodecLMConfig:
    strong: ModelConfig
    target: ModelConfig
    judge: ModelConfig
    num_examples: int = 1000
    # Basic instructions to decode; None means num_examples.
    num_instructions: Optional[int] = None
    overgenerate_margin: int = 0
    num_metadata: int = 200
    max_skills: int = 3
    num_rubrics: int = 4
    max_iterations: int = 4
    threshold: float = 3.0
    score_scale: int = 10
    keep_unresolved: bool = False
    temperature: float = 0.7
    answer_temperature: float = 0.7
    judge_temperature: float = 0.0
    # Answers of the strong and target models.
    max_output_tokens: int = 1024
    # Encode, rubrics, decode and improve: structured answers that must not be cut off.
    codec_max_output_tokens: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError("num_examples must be at least 1")
        if self.max_iterations < 1:
            raise ValueError("max_iterations must be at least 1 (basic generation)")
        if not 0 <= self.threshold < self.score_scale:
            raise ValueError("threshold must lie in [0, score_scale)")
        if self.max_skills < 1 or self.num_rubrics < 1 or self.num_metadata < 1:
            raise ValueError("max_skills, num_rubrics and num_metadata must be >= 1")

    @property
    def basic_instructions(self) -> int:
        return self.num_instructions or self.num_examples


class CodecLMOutput(NamedTuple):
    seed_metadata: beam.PCollection  # Metadata of the seeds (or the user's metadata)
    examples: beam.PCollection  # Example
    rejected: beam.PCollection  # Rejection
    dead_letter: beam.PCollection  # DeadLetter
    metadata_pool: beam.PCollection  # Metadata
    rubrics: beam.PCollection  # RubricSet


def rejection(candidate: Candidate, reason: str) -> Rejection:
    return Rejection(
        candidate_id=candidate.candidate_id, reason=reason,
        instruction=candidate.instruction, iteration=candidate.iteration,
        use_case=candidate.use_case, skills=candidate.skills,
        actions_applied=candidate.actions_applied,
        strong_answer=candidate.strong_answer, target_answer=candidate.target_answer,
        strong_score=candidate.strong_score, target_score=candidate.target_score,
        gap=candidate.gap)


def keep_better_answer(candidate: Candidate, models: dict[str, str]) -> Example:
    source = "strong" if candidate.gap >= 0 else "target"
    return Example(
        example_id=candidate.candidate_id, instruction=candidate.instruction,
        response=candidate.strong_answer if source == "strong" else candidate.target_answer,
        response_source=source, iteration=candidate.iteration,
        use_case=candidate.use_case, skills=candidate.skills,
        actions_applied=candidate.actions_applied, strong_score=candidate.strong_score,
        target_score=candidate.target_score, gap=candidate.gap, **{
            f"{role}_model": uri for role, uri in models.items()})


def example_rank(example: Example) -> int:
    """Earlier iterations first (the cheaper, more typical data), then a stable hash."""
    return (example.iteration << 48) | stable_rank(example.example_id)


def still_needed(kept_so_far: int, num_examples: int, margin: int) -> int:
    needed = num_examples - kept_so_far
    return needed + margin if needed > 0 else 0


class CodecLM(beam.PTransform):
    """PCollection[Seed] (or PCollection[Metadata] with from_metadata=True) ->
    CodecLMOutput."""

    def __init__(self, config: CodecLMConfig, from_metadata: bool = False):
        super().__init__()
        self._config = config
        self._from_metadata = from_metadata

    def expand(self, inputs) -> CodecLMOutput:
        cfg = self._config
        dead_letters = []
        if self._from_metadata:
            metadata = inputs
        else:
            encoded = inputs | "EncodeMetadata" >> EncodeMetadata(
                cfg.strong, cfg.max_skills, cfg.temperature, cfg.codec_max_output_tokens,
                cfg.seed)
            metadata = encoded.output | "CountMetadata" >> Tally("metadata")
            dead_letters.append(encoded.dead_letter)

        pool = (metadata
                | "BuildMetadataPool" >> BuildMetadataPool(
                    cfg.num_metadata, cfg.max_skills, cfg.seed)
                | "CountPool" >> Tally("metadata_pool"))
        rubrics = pool | "GenerateRubrics" >> GenerateRubrics(
            cfg.strong, cfg.num_rubrics, cfg.temperature, cfg.codec_max_output_tokens,
            cfg.seed)
        decoded = pool | "DecodeInstructions" >> DecodeInstructions(
            cfg.strong, cfg.basic_instructions, cfg.temperature,
            cfg.codec_max_output_tokens, cfg.seed)
        dead_letters += [rubrics.dead_letter, decoded.dead_letter]
        rubric_state = rubrics.output | "CountRubrics" >> Tally("rubric_sets")

        candidates = decoded.output | "CountBasic" >> Tally("basic_instructions")
        kept_per_round, rejected = [], []
        models = {"strong": cfg.strong.spec.uri, "target": cfg.target.spec.uri,
                  "judge": cfg.judge.spec.uri}
        for round_number in range(1, cfg.max_iterations + 1):
            name = f"Round{round_number}"
            candidates = candidates | f"{name}/CountCandidates" >> Tally(
                f"round{round_number}.candidates")
            filtered = candidates | f"{name}/ContrastiveFilter" >> ContrastiveFilter(
                cfg.strong, cfg.target, cfg.judge, cfg.threshold, cfg.score_scale,
                cfg.answer_temperature, cfg.judge_temperature, cfg.max_output_tokens,
                cfg.seed)
            kept_per_round.append(filtered.kept | f"{name}/CountKept" >> Tally(
                f"round{round_number}.kept"))
            dead_letters.append(filtered.dead_letter)
            undecided = filtered.undecided | f"{name}/CountUndecided" >> Tally(
                f"round{round_number}.undecided")
            if round_number == cfg.max_iterations:
                if cfg.keep_unresolved:
                    kept_per_round.append(undecided | "KeepUnresolved" >> beam.Map(
                        keep_better_answer, models))
                else:
                    rejected.append(undecided | "RejectUnresolved" >> beam.Map(
                        rejection, "within_threshold"))
                break
            kept_so_far = (kept_per_round
                           | f"{name}/AllKept" >> beam.Flatten()
                           | f"{name}/CountAllKept" >> beam.combiners.Count.Globally()
                           | f"{name}/StillNeeded" >> beam.Map(
                               still_needed, cfg.num_examples, cfg.overgenerate_margin))
            selected = undecided | f"{name}/SelectForImprovement" >> TakeLowestRanked(
                lambda c: stable_rank(str(cfg.seed), c.candidate_id),
                max_limit=cfg.num_examples + cfg.overgenerate_margin, limit=kept_so_far)
            rejected.append(selected.rest
                            | f"{name}/CountNotNeeded" >> Tally(
                                f"round{round_number}.not_needed")
                            | f"{name}/RejectNotNeeded" >> beam.Map(rejection, "not_needed"))
            improved = selected.taken | f"{name}/ImproveInstructions" >> ImproveInstructions(
                cfg.strong, rubric_state, cfg.temperature, cfg.codec_max_output_tokens,
                cfg.seed)
            dead_letters.append(improved.dead_letter)
            candidates = improved.output

        cut = (kept_per_round
               | "AllExamples" >> beam.Flatten()
               | "CutToNumExamples" >> TakeLowestRanked(example_rank, cfg.num_examples))
        rejected.append(cut.rest
                        | "CountSurplus" >> Tally("surplus")
                        | "RejectSurplus" >> beam.Map(_surplus_rejection))
        return CodecLMOutput(
            seed_metadata=metadata,
            examples=cut.taken | "CountExamples" >> Tally("examples"),
            rejected=tuple(rejected) | "AllRejected" >> beam.Flatten(),
            dead_letter=tuple(dead_letters) | "AllDeadLetters" >> beam.Flatten(),
            metadata_pool=pool,
            rubrics=rubric_state)


def _surplus_rejection(example: Example) -> Rejection:
    return Rejection(
        candidate_id=example.example_id, reason="surplus",
        instruction=example.instruction, iteration=example.iteration,
        use_case=example.use_case, skills=example.skills,
        actions_applied=example.actions_applied,
        strong_answer=example.response if example.response_source == "strong" else None,
        target_answer=example.response if example.response_source == "target" else None,
        strong_score=example.strong_score, target_score=example.target_score,
        gap=example.gap)
