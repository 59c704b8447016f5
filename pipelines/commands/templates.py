"""Dataflow Flex Template metadata, generated from the CLI's own options so the two
cannot drift (tests compare pipelines/flex_template/metadata.json with this).

    python -m codeclm_beam.pipelines.commands.templates > pipelines/flex_template/metadata.json
"""
from __future__ import annotations

import argparse
import json

from codeclm_beam.pipelines.run.args import option_actions
from codeclm_beam.pipelines.generate import OPTION_VIEWS

# Parameters a Dataflow launch must give; everything else has a default.
REQUIRED = {"output_dir"}


def flex_template_metadata() -> dict:
    parameters = []
    for action in option_actions(*OPTION_VIEWS):
        help_text = action.help or action.dest.replace("_", " ")
        if action.default not in (None, [], False, "") and not isinstance(
                action, argparse._StoreTrueAction):
            help_text += f" Default: {action.default}."
        if action.choices:
            help_text += f" One of: {', '.join(map(str, action.choices))}."
        parameter = {"name": action.dest,
                     "label": action.dest.replace("_", " ").capitalize(),
                     "helpText": help_text,
                     "isOptional": action.dest not in REQUIRED}
        if isinstance(action, argparse._StoreTrueAction):
            parameter["regexes"] = ["^(true|false)$"]
        parameters.append(parameter)
    return {
        "name": "codeclm-beam generate",
        "description": "CodecLM: tailored synthetic instruction-response pairs from seed "
                       "instructions (or use case + skills metadata), with a strong "
                       "model as the codec.",
        "parameters": parameters,
    }


def launcher_argv(argv: list[str]) -> list[str]:
    """Flex Templates pass every parameter as --name=value, booleans as "true"/"false";
    our switches take no value, so "--keep_unresolved=true" becomes the bare flag and
    "=false" drops it."""
    switches = {action.dest for action in option_actions(*OPTION_VIEWS)
                if isinstance(action, argparse._StoreTrueAction)}
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name.lstrip("-") in switches:
            if value.strip().lower() == "true":
                out.append(name)
            continue
        out.append(arg)
    return out


def template_argv(argv: list[str]) -> list[str]:
    """The launcher's arguments as `generate` takes them, refused when a model needs
    what the template's image does not install: the image holds the core package
    only, without llama.cpp, and the target's default is the embedded model."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from codeclm_beam.model.errors import ConfigurationError
    from codeclm_beam.model.uri import ModelSpec
    from codeclm_beam.options import ModelOptions

    argv = launcher_argv(argv)
    models = PipelineOptions(argv).view_as(ModelOptions)
    for role in ("strong", "target", "judge"):
        uri = getattr(models, f"{role}_model")
        if uri and ModelSpec.parse(uri).backend == "llamacpp":
            raise ConfigurationError(
                f"{role}_model={uri}: the Flex Template's image has no llama.cpp (its "
                "workers call remote models); give the parameter an openai: or vertex: "
                f"model{' (the target defaults to the embedded model)' if role == 'target' else ''}")
    return argv


if __name__ == "__main__":
    print(json.dumps(flex_template_metadata(), indent=2))
