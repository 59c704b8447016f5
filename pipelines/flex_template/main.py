"""Flex Template entry point: builds the generate pipeline and submits it to Dataflow.

The launcher does not wait for the job; watch it with the Dataflow console (the
manifest is written by `codeclm-beam generate`, which waits, not by template launches).
"""
import logging
import sys

from codeclm_beam.pipelines.generate import run
from codeclm_beam.pipelines.templates import launcher_argv

if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run(argv=launcher_argv(sys.argv[1:]), wait=False)
