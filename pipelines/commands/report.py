"""`codeclm-beam report RUN_DIR`: writes a run's report and card again.

Committed like any run: the current run's files are carried into a new run folder
(hard links on a local disk, server-side copies on gs://) beside the new report, and
the pointer moves to it; killed at any moment, the folder shows the run as it was."""
from __future__ import annotations

import os
import uuid

from apache_beam.io.filesystems import FileSystems

from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.report.figures import run_tailoring
from codeclm_beam.pipelines.report.render import write_report
from codeclm_beam.pipelines.run.args import SuggestingParser
from codeclm_beam.pipelines.run.commit import OutputFolder
from codeclm_beam.pipelines.run.commit import read_committed
from codeclm_beam.pipelines.run.commit import read_json
from codeclm_beam.pipelines.run.commit import run_in_folder

# What the report writes anew: never carried over from the run it reports on.
REPORT_FILES = ("report.html", "README.md")


def report_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam report",
                              description="Rewrite report.html (and a generate run's "
                                          "dataset card) for a run directory.")
    parser.add_argument("run_dir")
    parser.add_argument("--prices", default=None,
                        help='JSON file: {"MODEL URI or prefix": {"input": USD per 1M '
                             'tokens, "cached_input": ..., "output": ...}}')
    args = parser.parse_args(argv)
    prices = _prices(args.prices) if args.prices else None
    current = read_committed(args.run_dir, ("manifest.json", "summary.json"))
    record = dict(current.record)
    outputs = OutputFolder(args.run_dir, uuid.uuid4().hex[:12], current.name, force=True)

    def work():
        _carry_over(current, outputs)
        try:
            report = write_report(outputs, record, prices)
        except (KeyError, TypeError) as missing:
            raise ConfigurationError(f"{args.run_dir}/{current.name} lacks {missing}: "
                                     "not a record this version can report on") from None
        if "tailoring" in record:
            record["tailoring"] = run_tailoring(outputs.run_dir)
        record["report"] = report
        outputs.commit(record)
        return report
    report = run_in_folder(outputs, True, work)
    print(f"codeclm-beam report: wrote {report}")
    return 0


def _prices(path: str) -> dict:
    try:
        prices = read_json(path)
    except FileNotFoundError:
        raise ConfigurationError(f"--prices {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"--prices {path}: not a JSON file ({e})") from None
    if not isinstance(prices, dict):
        raise ConfigurationError(f"--prices {path}: not a JSON object of model prices")
    return prices


def _carry_over(current, outputs: OutputFolder) -> None:
    for relative in current.record.get("files") or []:
        if relative in (current.name, *REPORT_FILES):
            continue
        source, target = current.path(*relative.split("/")), outputs.path(relative)
        if "://" in target:
            FileSystems.copy([source], [target])
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(source, target, follow_symlinks=False)  # the same immutable bytes
        except OSError:
            FileSystems.copy([source], [target])
