"""Flex Template entry point: builds the generate pipeline and submits it to Dataflow.

The launcher does not wait for the job; watch it with the Dataflow console (the
manifest is written by `codeclm-beam generate`, which waits, not by template launches).
"""
import logging
import sys

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.cli import setup_logging
from codeclm_beam.pipelines.generate import run
from codeclm_beam.pipelines.commands.templates import template_argv

if __name__ == "__main__":
    setup_logging(logging.INFO)
    try:
        run(argv=template_argv(sys.argv[1:]), wait=False)
    except ConfigurationError as error:
        print(f"codeclm-beam flex template: error: {error}", file=sys.stderr)
        sys.exit(2)
