"""Command-line parsing shared by every subcommand: a flag is known or refused, never
silently dropped (Beam only logs the flags it cannot parse, then runs with defaults)."""
from __future__ import annotations

import argparse
import difflib


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
