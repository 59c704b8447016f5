"""`codeclm-beam report RUN_DIR`: writes a run's report and card again."""
from __future__ import annotations

import json


from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.run.outputs import OutputDirectory
from codeclm_beam.pipelines.report.figures import run_tailoring
from codeclm_beam.pipelines.report.render import write_report
from codeclm_beam.pipelines.run.outputs import read_json
from codeclm_beam.pipelines.run.outputs import read_run_record
from codeclm_beam.pipelines.run.args import SuggestingParser

def report_command(argv: list[str]) -> int:
    parser = SuggestingParser(prog="codeclm-beam report",
                                     description="Rewrite report.html (and a generate "
                                                 "run's dataset card) for a run "
                                                 "directory.")
    parser.add_argument("run_dir")
    parser.add_argument("--prices", default=None,
                        help='JSON file: {"MODEL URI or prefix": {"input": USD per 1M '
                             'tokens, "cached_input": ..., "output": ...}}')
    args = parser.parse_args(argv)
    prices = read_json(args.prices) if args.prices else None
    name, record = read_run_record(args.run_dir, ("manifest.json", "summary.json"))
    outputs = OutputDirectory(args.run_dir, "report", name, force=True)
    outputs.claim()  # no run writes into the folder meanwhile
    try:
        outputs.check()  # names the user's own files, which are not overwritten
        outputs.written = list(record.get("written_files") or [])
        try:
            report = write_report(outputs, record, prices)
        except (KeyError, TypeError) as missing:
            raise ConfigurationError(f"{args.run_dir}/{name} lacks {missing}: not a "
                                     "record this version can report on") from None
        if "tailoring" in record:
            record["tailoring"] = run_tailoring(args.run_dir)
        outputs.commit(record)
    finally:
        outputs.release()
    print(json.dumps({"report": report}, indent=2))
    return 0
