"""`codeclm-beam prompts [STAGE]`: each stage's messages, rendered on a sample record
exactly as a model is sent them (templates in `transforms/prompts/`)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from codeclm_beam.model import ChatMessage
from codeclm_beam.records import Candidate
from codeclm_beam.records import Metadata
from codeclm_beam.records import Seed
from codeclm_beam.transforms.contrastive_filter import contest
from codeclm_beam.transforms.decode import Decode
from codeclm_beam.transforms.decode import DecodeTask
from codeclm_beam.transforms.encode import Encode
from codeclm_beam.transforms.improve import Improve
from codeclm_beam.transforms.judge import AnswerInstruction
from codeclm_beam.transforms.judge import Contest
from codeclm_beam.transforms.judge import Judge
from codeclm_beam.transforms.judge import JudgeTask
from codeclm_beam.transforms.rubrics import Rubrics
from codeclm_beam.pipelines.run.args import SuggestingParser

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
    "encode": lambda: Encode(max_skills=3).prompt(SAMPLE_SEED),
    "decode": lambda: Decode().prompt(DecodeTask(SAMPLE_METADATA, 5)),
    "rubrics": lambda: Rubrics(num_rubrics=4).prompt(SAMPLE_METADATA),
    "improve": lambda: Improve().prompt(SAMPLE_ANSWERED),
    "answer": lambda: AnswerInstruction().prompt(SAMPLE_CANDIDATE),
    "judge_filter": lambda: Judge(score_scale=10).prompt(
        JudgeTask(contest(SAMPLE_ANSWERED), True)),
    "judge_eval": lambda: Judge(score_scale=10, explain=True).prompt(JudgeTask(Contest(
        "sample", SAMPLE_CANDIDATE.instruction, "(the candidate's answer)",
        "(the reference model's answer)", ("candidate", "reference")), True)),
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
