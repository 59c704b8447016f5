"""`codeclm-beam yaml FILE`: a Beam YAML pipeline of codeclm stages, run as the CLI
runs its own: live progress, Beam's noise filtered, and a closing summary of the model
calls and dead letters by stage. The pipeline is built by Beam's own YAML entry point
(`apache_beam.yaml.main`), so a file that runs here runs there unchanged."""
from __future__ import annotations

import sys

import apache_beam as beam

from codeclm_beam.metrics import RunCounters
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.pipelines.run.progress import progress_for


def summary(counters: RunCounters) -> str:
    totals = counters.model_calls()["totals"]
    lines = [f"codeclm-beam yaml finished: {totals.get('requests', 0)} model requests, "
             f"{totals.get('cache_hits', 0)} cache hits, "
             f"{totals.get('failures', 0)} calls failed for good (each a dead letter "
             "in its stage's error_handling output)"]
    for stage, numbers in counters.stage_totals().items():
        elements, failed = numbers.get("elements", 0), numbers.get("failures", 0)
        lines.append(f"  {stage}: {elements - failed} answered, {failed} failed "
                     f"({numbers.get('requests', 0)} requests, "
                     f"{numbers.get('cache_hits', 0)} from the cache)")
    return "\n".join(lines)


def yaml_command(argv: list[str]) -> int:
    try:
        from apache_beam.yaml.main import build_pipeline_components_from_argv
    except ImportError as missing:  # Beam YAML's own needs (pandas, jinja2...)
        raise ConfigurationError(
            f"Beam YAML cannot load ({missing}): pip install 'codeclm-beam[yaml]' "
            "(make test installs it; make demo does not)") from None
    parser = SuggestingParser(
        prog="codeclm-beam yaml",
        description="Run a Beam YAML pipeline of codeclm stages with live progress. "
                    "Other flags (--jinja_variables, --runner, ...) go to Beam.")
    parser.add_argument("pipeline_file", help="The Beam YAML pipeline file.")
    known, beam_args = parser.parse_known_args(argv)
    options, construct, display_data = build_pipeline_components_from_argv(
        [f"--yaml_pipeline_file={known.pipeline_file}", *beam_args])
    pipeline = beam.Pipeline(options=options, display_data=display_data)
    construct(pipeline)
    with progress_for(options):
        result = pipeline.run()
        result.wait_until_finish()
    print(summary(RunCounters.from_result(result)))
    return 0


if __name__ == "__main__":
    sys.exit(yaml_command(sys.argv[1:]))
