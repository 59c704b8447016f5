"""`codeclm-beam prompts [STAGE]`: each stage's messages, rendered on its own sample
record (`Stage.samples`) exactly as a model is sent them (templates in
`transforms/prompts/`)."""
from __future__ import annotations

import importlib

from codeclm_beam.model import ChatMessage
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.stage import Stage


def stage_prompts() -> dict[str, tuple[Stage, object]]:
    """Prompt name -> (stage, sample record), from every stage module."""
    importlib.import_module("codeclm_beam.transforms").import_stage_modules()
    found = {}
    for stage_class in Stage.registered():
        found.update(stage_class.samples())
    return found


def render(messages: list[ChatMessage]) -> str:
    return "\n".join(f"--- {m.role} ---\n{m.content}" for m in messages)


def prompts_command(argv: list[str]) -> int:
    stages = stage_prompts()
    parser = SuggestingParser(prog="codeclm-beam prompts", description=__doc__)
    parser.add_argument("stage", nargs="?", choices=sorted(stages),
                        help="One stage (default: all).")
    args = parser.parse_args(argv)
    for name in [args.stage] if args.stage else stages:
        stage, sample = stages[name]
        print(f"===== {name} =====\n{render(stage.prompt(sample))}\n")
    return 0
