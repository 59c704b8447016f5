"""Command-line parsing shared by every subcommand: a flag is known or refused, never
silently dropped (Beam only logs the flags it cannot parse, then runs with defaults);
and the options only the CLI's runs read (the library's are `codeclm_beam.options`)."""
from __future__ import annotations

import argparse
import difflib

from apache_beam.options.pipeline_options import PipelineOptions


class _HelpWithDefaults(argparse.HelpFormatter):
    """`--help` shows each flag's default (those that have one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, [], "")
                and action.default is not argparse.SUPPRESS and action.option_strings):
            text += " (default: %(default)s)"
        return text


class SuggestingParser(argparse.ArgumentParser):
    """argparse, with prefixes of flags not taken for the flag (`--num_ex` is not
    `--num_examples`), unknown flags refused with the nearest known one, defaults in
    `--help`, and an error as one line (the usage of a command with fifty flags buries
    the line that matters)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        known, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_message(unknown, self))
        return known


def unknown_message(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """Beam's own wording and suggestion for a flag no parser knows."""
    flags = [o for action in parser._actions for o in action.option_strings]
    first = next((u for u in unknown if u.startswith("-")), unknown[0])
    message = f"unknown option {first}"
    if first.startswith("--"):
        close = difflib.get_close_matches(first.split("=", 1)[0], flags)
        if close:
            message += f"; did you mean '{close[0]}'?"
    return message + " (nothing was run)"


# ---- the options only the CLI's runs read ---------------------------------------

class RunOptions(PipelineOptions):
    """Flags every codeclm-beam pipeline shares (Beam parses all option classes with one
    parser, so a flag may be defined in one class only)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("run")
        group.add_argument("--output_dir", default="out",
                           help="Where outputs go (local or gs://).")
        group.add_argument("--no_report", action="store_true", default=False,
                           help="Do not write report.html and the dataset card.")
        group.add_argument("--force", action="store_true", default=False,
                           help="Write into an --output_dir that holds files no run "
                                "wrote (they are kept as they are).")
        group.add_argument("--replace_with_fewer", action="store_true", default=False,
                           help="Replace the run already in --output_dir even when this "
                                "one delivers less than half its pairs (generate) or "
                                "judgements (evaluate) (default: such a run keeps the "
                                "previous one current and exits 3).")
        group.add_argument("--quiet", action="store_true", default=False,
                           help="No live progress while a local run works (it goes to "
                                "stderr: a status line on a terminal, a line every 10 s "
                                "and at each stage change elsewhere).")


class ViewedOnce(PipelineOptions):
    """Options that make each view once. Beam makes a view by parsing every flag again
    (about 1 ms with this CLI's flags), and while a graph is built Beam 2.77 asks for one
    on every type check (`is_consistent_with` reads TypeOptions): some 2,800 views, half
    of building generate's graph. A view shares these options' values (set through any
    view, seen by all), so one view per class serves every call. `new_pipeline` gives a
    pipeline its options this way; it defines no flags of its own."""

    def view_as(self, cls):
        # PipelineOptions.__setattr__ takes option names only, hence __dict__.
        views = self.__dict__.setdefault("_views", {})
        if cls not in views:
            views[cls] = super().view_as(cls)
        return views[cls]

    def __getstate__(self):
        # Views are rebuilt where the options are unpickled, not shipped with them.
        state = dict(super().__getstate__())
        state.pop("_views", None)
        return state


def is_dry_run(options: PipelineOptions) -> bool:
    """A Dataflow dry run: the job is built offline, nothing is read, written or sent."""
    return bool(options.get_all_options().get("dry_run"))


def option_actions(*views: type[PipelineOptions]) -> list[argparse.Action]:
    """The flags these option classes define, as argparse actions, in order: what the
    manifest records and the Flex Template declares."""
    parser = argparse.ArgumentParser(add_help=False)
    for view in views:
        view._add_argparse_args(parser)
    return list(parser._actions)
