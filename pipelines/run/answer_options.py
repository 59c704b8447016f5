"""`AnswerOptions`: how the models answer and the judge scores, in `generate` and
`evaluate`; the defaults are the stages' own."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from codeclm_beam.transforms.judge import AnswerInstruction
from codeclm_beam.transforms.judge import Judge
from codeclm_beam.options import COUNT
from codeclm_beam.options import TEMPERATURE


# The answers' settings where no flag sets them: the answer stage's own.
ANSWERS = AnswerInstruction.settings


class AnswerOptions(PipelineOptions):
    """How the models answer and the judge scores: the same flags in `generate`
    (contrastive filtering) and `evaluate` (CRR)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("answers and judging")
        group.add_argument("--answer_temperature", type=TEMPERATURE, default=ANSWERS.temperature,
                           help="Temperature of the answers being compared.")
        group.add_argument("--judge_temperature", type=TEMPERATURE,
                           default=Judge.settings.temperature)
        group.add_argument("--max_output_tokens", type=COUNT,
                           default=ANSWERS.max_output_tokens,
                           help="Longest visible answer of the models being compared "
                                "(a thinking model gets its thinking allowance on top).")
