"""The plugin inside pipelines that are not ours (issue 44): a user's own reads, maps,
options and ErrorHandler around EncodeMetadata -> DecodeInstructions ->
ContrastiveFilter, on the multi-processing DirectRunner and in Beam YAML; and an import
that leaves the host process as it found it. `.ci/run` runs this file under both ends
of the supported range."""
import json
import os
import subprocess
import sys
import textwrap

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.error_handling import ErrorHandler

from codeclm_beam.model import ModelConfig
from codeclm_beam.records import Seed
from codeclm_beam.transforms import BuildMetadataPool
from codeclm_beam.transforms import ContrastiveFilter
from codeclm_beam.transforms import DecodeInstructions
from codeclm_beam.transforms import EncodeMetadata
from tests.helpers import scripted_models

PROMPTS = ["Write a haiku about rivers.", "Plan a budget for a week of travel.",
           "Explain recursion to a child.", "FAIL: refuse this one."]


class UsersOptions(PipelineOptions):
    """The user's own option class, beside ours in one Beam parser."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Not required: every option class of a process meets in one Beam parser.
        parser.add_argument("--my_prompts", default=None)
        parser.add_argument("--my_out", default=None)


def _lines(folder: str, prefix: str) -> list[str]:
    found = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix):
            with open(os.path.join(folder, name)) as f:
                found.extend(line for line in f.read().splitlines() if line)
    return found


def my_failure_line(dead) -> str:
    return json.dumps({"stage": dead.stage, "why": dead.message})


def my_pair_line(example) -> str:
    return json.dumps({"instruction": example.instruction, "response": example.response})


def my_screen(candidate) -> bool:
    return len(candidate.instruction) < 2000


def test_stages_in_a_users_pipeline_on_the_multiprocessing_runner(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    models = scripted_models(tmp_path, "strong_wins",
                             {"strong": {"fail_when": "FAIL: refuse"}})
    strong, target = ModelConfig(models["strong"]), ModelConfig(models["target"])
    out = str(tmp_path / "mine")
    options = PipelineOptions([
        f"--my_prompts={prompts}", f"--my_out={out}", "--runner=DirectRunner",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    mine = options.view_as(UsersOptions)
    with beam.Pipeline(options=options) as p, ErrorHandler(
            beam.Map(my_failure_line)
            | "MyDeadLetterSink" >> beam.io.WriteToText(f"{out}/my_failures")) as failures:
        seeds = (p | "MyRead" >> beam.io.ReadFromText(mine.my_prompts)
                 | "MyClean" >> beam.Map(str.strip)
                 | "MySeeds" >> beam.Map(Seed.of, source="mine"))
        metadata = seeds | EncodeMetadata(strong).with_error_handler(failures)
        pool = metadata | BuildMetadataPool(num_metadata=3, seed=0)
        instructions = pool | DecodeInstructions(strong, num_instructions=3
                                                 ).with_error_handler(failures)
        filtered = (instructions
                    | "MyScreen" >> beam.Filter(my_screen)
                    | ContrastiveFilter(strong, target, judge=strong, threshold=3
                                        ).with_error_handler(failures))
        (filtered.kept | "MyPairs" >> beam.Map(my_pair_line)
         | "MyWrite" >> beam.io.WriteToText(f"{out}/my_pairs"))
    pairs = [json.loads(line) for line in _lines(out, "my_pairs")]
    failed = [json.loads(line) for line in _lines(out, "my_failures")]
    assert len(pairs) == 3 and all(pair["response"] for pair in pairs)
    # The seed the strong model refused: a dead letter in the user's own sink.
    assert [f["stage"] for f in failed] == ["encode"] and "scripted 400" in failed[0]["why"]


_USERS_YAML = """
pipeline:
  transforms:
    - type: ReadFromText
      config: {path: "%(prompts)s"}
    - type: MapToFields
      input: ReadFromText
      config:
        language: python
        fields:
          seed_id: "'mine-' + str(abs(hash(line)))"
          instruction: line
          source: "'mine'"
    - type: EncodeMetadata
      input: MapToFields
      config:
        model: "%(strong)s"
        error_handling: {output: failed}
    - type: BuildMetadataPool
      input: EncodeMetadata
      config: {num_metadata: 3}
    - type: DecodeInstructions
      input: BuildMetadataPool
      config:
        model: "%(strong)s"
        num_instructions: 3
        error_handling: {output: failed}
    - type: ContrastiveFilter
      input: DecodeInstructions
      config:
        strong_model: "%(strong)s"
        target_model: "%(target)s"
        error_handling: {output: failed}
    - type: WriteToJson
      input: ContrastiveFilter.kept
      config: {path: "%(out)s/my_pairs.jsonl"}
    - type: Flatten
      input: [EncodeMetadata.failed, DecodeInstructions.failed, ContrastiveFilter.failed]
    - type: WriteToJson
      name: MyFailures
      input: Flatten
      config: {path: "%(out)s/my_failures.jsonl"}
providers:
  - include: "%(providers)s"
"""


def test_stages_in_a_users_beam_yaml_pipeline(tmp_path, monkeypatch):
    from apache_beam.yaml import main as yaml_main
    # Stages without model_options cache under ./codeclm_cache: the user's folder.
    monkeypatch.chdir(tmp_path)

    from codeclm_beam.transforms.beam_yaml import PROVIDERS
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    models = scripted_models(tmp_path, "strong_wins",
                             {"strong": {"fail_when": "FAIL: refuse"}})
    out = tmp_path / "mine"
    pipeline = tmp_path / "mine.yaml"
    pipeline.write_text(_USERS_YAML % {
        "prompts": prompts, "strong": models["strong"], "target": models["target"],
        "out": out, "providers": PROVIDERS})
    yaml_main.run(argv=[f"--yaml_pipeline_file={pipeline}", "--runner=DirectRunner"])
    pairs = [json.loads(line) for line in _lines(str(out), "my_pairs")]
    failed = [json.loads(line) for line in _lines(str(out), "my_failures")]
    assert len(pairs) == 3 and all(pair["response"] for pair in pairs)
    assert [f["stage"] for f in failed] == ["encode"]


_IMPORT_PROBE = textwrap.dedent("""
    import gc, json, logging, sys, threading

    def logging_tree():
        loggers = {"": logging.getLogger()}
        loggers.update((name, logger) for name, logger in
                       logging.Logger.manager.loggerDict.items()
                       if isinstance(logger, logging.Logger))
        return {name: [logger.level, logger.propagate, logger.disabled,
                       [type(f).__name__ for f in logger.filters],
                       [type(h).__name__ for h in logger.handlers]]
                for name, logger in loggers.items()}

    def module_state(prefixes):
        return {name: {key: id(value) for key, value in vars(module).items()}
                for name, module in list(sys.modules.items())
                if name.startswith(prefixes) and module is not None}

    # Everything Beam and the libraries we use bring, imported first: what changes
    # after is ours alone.
    for name in json.loads(sys.argv[1]):
        try:
            __import__(name)
        except Exception:
            pass  # not importable by name (a finder, __mp_main__): nothing to compare
    known = set(logging.Logger.manager.loggerDict)
    prefixes = ("apache_beam", "httpx", "google", "logging", "openai", "tenacity")
    before = (logging_tree(), module_state(prefixes), gc.isenabled(),
              gc.get_freeze_count(), sorted(t.name for t in threading.enumerate()))
    import codeclm_beam, codeclm_beam.transforms, codeclm_beam.model
    import codeclm_beam.model.backends, codeclm_beam.transforms.beam_yaml
    after = (logging_tree(), module_state(prefixes), gc.isenabled(),
             gc.get_freeze_count(), sorted(t.name for t in threading.enumerate()))
    # Loggers our modules create for themselves (getLogger(__name__)) are ours.
    ours = lambda tree: {k: v for k, v in tree.items()
                         if k in known or not k.startswith("codeclm_beam")}
    changed = {
        "loggers": [k for k in set(before[0]) | set(ours(after[0]))
                    if before[0].get(k) != ours(after[0]).get(k)],
        "modules": [f"{m}.{k}" for m, names in before[1].items()
                    for k, v in names.items() if after[1].get(m, {}).get(k) != v],
        "gc": [before[2], after[2], before[3], after[3]],
        "threads": [before[4], after[4]]}
    print(json.dumps(changed))
""")


def test_importing_the_library_leaves_the_host_alone(tmp_path):
    # Which third-party modules the library pulls in, from a first interpreter.
    listed = subprocess.run(
        [sys.executable, "-c", "import sys, json; import codeclm_beam.transforms, "
         "codeclm_beam.model.backends, codeclm_beam.transforms.beam_yaml; "
         "print(json.dumps(sorted(m for m in sys.modules if not m.startswith("
         "('codeclm_beam', 'tests', '__main__')))))"],
        capture_output=True, text=True, check=True)
    probe = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, listed.stdout.strip()],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    changed = json.loads(probe.stdout.strip().splitlines()[-1])
    assert changed["loggers"] == [] and changed["modules"] == []
    assert changed["gc"][0] == changed["gc"][1] and changed["gc"][2] == changed["gc"][3]
    assert changed["threads"][0] == changed["threads"][1]


_LIBRARY_PROBE = textwrap.dedent("""
    import importlib, pkgutil, sys
    import codeclm_beam, codeclm_beam.transforms
    for package in (codeclm_beam, codeclm_beam.transforms):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not module.name.startswith("codeclm_beam.pipelines"):
                importlib.import_module(module.name)
    print(sorted(name for name in sys.modules if name.startswith("codeclm_beam.pipelines")))
""")


def test_the_library_imports_nothing_of_the_application():
    # Every module of the library (the core and the stages) imported: none of the
    # CLI's. And the README's example imports the library only.
    done = subprocess.run([sys.executable, "-c", _LIBRARY_PROBE], capture_output=True,
                          text=True, check=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
    root = os.path.dirname(os.path.dirname(__file__))
    for page in ("README.md", "docs/library.md"):
        text = open(os.path.join(root, page)).read()
        example = text[text.index("# Using single stages in your own pipeline"):]
        example = example.split("```python\n", 1)[1].split("```", 1)[0]
        imports = [line for line in example.splitlines() if "codeclm_beam" in line
                   and line.startswith(("from ", "import "))]
        assert imports and not any("pipelines" in line for line in imports), (page, imports)
