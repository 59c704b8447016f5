"""`codeclm-beam prompts [STAGE]`: each stage's messages, rendered on a sample record
exactly as a model is sent them (templates in `transforms/prompts/`)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from codeclm_beam.model import ChatMessage
from codeclm_beam.records import Candidate
from codeclm_beam.records import Metadata
from codeclm_beam.records import Seed
from codeclm_beam.transforms.contrastive_filter import JudgeTask
from codeclm_beam.transforms.contrastive_filter import answer_prompt
from codeclm_beam.transforms.contrastive_filter import judge_prompt
from codeclm_beam.transforms.contrastive_filter import pairwise_judge_prompt
from codeclm_beam.transforms.decode import DecodeTask
from codeclm_beam.transforms.decode import decode_prompt
from codeclm_beam.transforms.encode import encode_prompt
from codeclm_beam.transforms.improve import improve_prompt
from codeclm_beam.transforms.rubrics import rubrics_prompt
from codeclm_beam.pipelines.args import SuggestingParser

SAMPLE_SEED = Seed.of("Write a SQL query that lists the ten customers who spent the most "
                      "last month, with their total.")
SAMPLE_METADATA = Metadata("m-sample", "code generation", ("sql", "data analysis"), "seed")
SAMPLE_CANDIDATE = Candidate.of(
    "Write a SQL query that finds customers whose spending dropped by half from one "
    "month to the next.", SAMPLE_METADATA.use_case, SAMPLE_METADATA.skills)
SAMPLE_ANSWERED = dataclasses.replace(
    SAMPLE_CANDIDATE,
    pending_action="Require the query to handle customers with no orders in a month",
    strong_answer="SELECT ... (the strong model's answer)",
    target_answer="SELECT ... (the target model's answer)")

# Stage -> its messages on the sample, with the method's defaults (3 skills, 4 rubrics,
# a 10-point scale).
STAGES: dict[str, Callable[[], list[ChatMessage]]] = {
    "encode": lambda: encode_prompt(SAMPLE_SEED, 3),
    "decode": lambda: decode_prompt(DecodeTask(SAMPLE_METADATA, 5)),
    "rubrics": lambda: rubrics_prompt(SAMPLE_METADATA, 4),
    "improve": lambda: improve_prompt(SAMPLE_ANSWERED),
    "answer": lambda: answer_prompt(SAMPLE_CANDIDATE),
    "judge_filter": lambda: judge_prompt(JudgeTask(SAMPLE_ANSWERED, True), 10),
    "judge_eval": lambda: pairwise_judge_prompt(
        SAMPLE_CANDIDATE.instruction, "(the candidate's answer)",
        "(the reference model's answer)", 10, explain=True),
}


def render(messages: list[ChatMessage]) -> str:
    return "\n".join(f"--- {m.role} ---\n{m.content}" for m in messages)


def prompts_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam prompts", description=__doc__)
    parser.add_argument("stage", nargs="?", choices=sorted(STAGES),
                        help="One stage (default: all).")
    args = parser.parse_args(argv)
    for stage in [args.stage] if args.stage else STAGES:
        print(f"===== {stage} =====\n{render(STAGES[stage]())}\n")
    return 0
