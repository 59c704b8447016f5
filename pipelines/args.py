"""Command-line parsing shared by every subcommand: a flag is known or refused, never
silently dropped (Beam only logs the flags it cannot parse, then runs with defaults)."""
from __future__ import annotations

import argparse
import difflib


class SuggestingParser(argparse.ArgumentParser):
    """argparse, with prefixes of flags not taken for the flag (`--num_ex` is not
    `--num_examples`), and unknown flags refused with the nearest known one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
