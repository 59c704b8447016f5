"""The generate pipeline survives a Dataflow dry run offline: the whole job is built
(every DoFn, side input and coder pickled) and validated, and nothing is submitted.
The built job is then inspected: the method's stages are there by name, and the rubric
state and the kept count reach their consumers as side inputs."""
import os
import re

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from codeclm_beam.pipelines.generate import build_pipeline
from codeclm_beam.pipelines.generate import codeclm_config
from tests.helpers import run_generate

DRY_RUN = ["--runner=DataflowRunner", "--project=codeclm-test-project",
           "--region=us-central1", "--temp_location=gs://codeclm-test-bucket/tmp",
           "--staging_location=gs://codeclm-test-bucket/stage", "--no_auth",
           "--dry_run=True", "--sdk_location=container"]
GENERATE = ["--seeds", "gs://codeclm-test-bucket/seeds/*.jsonl",
            "--output_dir", "gs://codeclm-test-bucket/out",
            "--strong_model", "vertex:gemini-2.5-flash",
            "--target_model", "openai:target@http://10.0.0.2:8000/v1",
            "--max_num_workers", "4", "--max_requests_per_minute", "600",
            "--export_format", "vertex"]


def test_generate_cli_path_passes_a_dataflow_dry_run():
    result = run_generate(DRY_RUN + GENERATE)
    assert result["submitted"] is False


def test_the_dry_run_from_the_command_line_ends_with_status_0(capfd, caplog):
    from codeclm_beam.pipelines.cli import main
    # As the README has it: the package staged from --setup_file, with nothing logged
    # as an error on the way (Beam builds the sdist with `python -m build`).
    setup_file = os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py")
    assert main(["generate", *GENERATE, *DRY_RUN, "--setup_file", setup_file]) == 0
    captured = capfd.readouterr()  # the sdist is built in a child process
    logged, out = caplog.text + captured.err, captured.out
    assert "No module named build" not in logged
    assert "cannot be directly executed" not in logged
    assert "job built and validated, not submitted" in out
    # The summary: the method's stages, the side inputs, the quota's share per VM and
    # the worker setup.
    assert "CodecLM: SeedMetadata, BuildMetadataPool, CountPool, GenerateRubrics" in out
    assert "Rounds" in out and "WriteExamples" in out
    side_inputs = int(re.search(r"side inputs read by (\d+) steps", out).group(1))
    assert side_inputs >= 7  # pool size, three improve steps, three selections...
    assert "requests per minute: 600 for the job, 150 per VM" in out
    assert "quota over 4 VM(s)" in out and "max_num_workers 4" in out


def test_the_built_dataflow_job_has_the_method_stages_and_side_inputs():
    options = PipelineOptions(DRY_RUN + GENERATE)
    pipeline = beam.Pipeline(options=options)
    config = codeclm_config(options, "dry-run")
    build_pipeline(pipeline, options, config, "gs://codeclm-test-bucket/out")
    job = pipeline.run().job
    transforms = job.proto_pipeline.components.transforms
    names = {t.unique_name for t in transforms.values()}
    for stage in ("ReadSeeds", "CodecLM/SeedMetadata/Encode", "CodecLM/BuildMetadataPool",
                  "CodecLM/GenerateRubrics", "CodecLM/DecodeInstructions",
                  "CodecLM/Rounds/Round1/ContrastiveFilter/JudgeBothOrders",
                  "CodecLM/Rounds/Round1/ImproveInstructions",
                  "CodecLM/Rounds/Round3/ImproveInstructions",
                  "CodecLM/Rounds/Round4/ContrastiveFilter",
                  "CodecLM/CutToNumExamples", "WriteExamples", "WriteDeadLetters"):
        assert any(n == stage or n.startswith(stage + "/") for n in names), stage
    assert not any(n.startswith("CodecLM/Rounds/Round4/ImproveInstructions")
                   for n in names)

    def side_input_consumers(fragment):
        found = []
        for t in transforms.values():
            if fragment in t.unique_name and t.spec.urn == "beam:transform:pardo:v1":
                payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
                if payload.side_inputs:
                    found.append(t.unique_name)
        return found

    # The rubric state is read by every round's improve step...
    for round_number in (1, 2, 3):
        assert side_input_consumers(
            f"Round{round_number}/ImproveInstructions/ChooseAction"), round_number
    # ...and each round's selection reads how many pairs are still needed.
    for round_number in (1, 2, 3):
        assert side_input_consumers(
            f"Round{round_number}/SelectForNextRound/Split"), round_number
    # The job-wide quota of 600 RPM is split over --max_num_workers=4 VMs.
    assert config.strong.quota.num_vms == 4
    assert config.strong.quota.per_vm(600) == 150


def test_evaluate_passes_a_dataflow_dry_run_with_its_stages():
    import os
    from codeclm_beam.pipelines import evaluate
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "benchmarks")
    argv = DRY_RUN + ["--benchmark", os.path.join(fixtures, "vicuna.jsonl"),
                      "--benchmark", os.path.join(fixtures, "koala.jsonl"),
                      "--output_dir", "gs://codeclm-test-bucket/eval",
                      "--strong_model", "vertex:gemini-2.5-pro",
                      "--candidate_model", "openai:before@http://10.0.0.2:8000/v1",
                      "--candidate_model", "openai:after@http://10.0.0.3:8000/v1"]
    assert evaluate.run(argv)["submitted"] is False
    options = PipelineOptions(argv)
    pipeline = beam.Pipeline(options=options)
    evaluate.build_pipeline(pipeline, options)
    names = {t.unique_name for t in
             pipeline.run().job.proto_pipeline.components.transforms.values()}
    for stage in ("ReadBenchmarks", "JudgeAgainstReference/AnswerReference",
                  "JudgeAgainstReference/Candidate0/JudgeBothOrders/Judge",
                  "JudgeAgainstReference/Candidate1/JudgeBothOrders/Judge",
                  "WriteJudgements"):
        assert any(n == stage or n.startswith(stage + "/") for n in names), stage


def test_a_launch_that_does_not_wait_reports_the_job_as_submitted(tmp_path):
    # The Flex Template launcher runs generate with wait=False: the job is submitted
    # and the caller must not be told otherwise. Here the DirectRunner stands in. No
    # one is there to commit its outputs: they stay in its run folder, and nothing
    # already in --output_dir is touched.
    from codeclm_beam.pipelines.run.commit import OutputFolder
    from codeclm_beam.pipelines.run.manifest import run_pipeline
    (tmp_path / "out" / "examples").mkdir(parents=True)
    (tmp_path / "out" / "examples" / "mine.jsonl").write_text("{}\n")
    outputs = OutputFolder(str(tmp_path / "out"), "r1", "manifest.json")
    pipeline = beam.Pipeline(options=PipelineOptions([]))
    _ = pipeline | beam.Create([1])
    result, returned = run_pipeline(pipeline, PipelineOptions([]), outputs,
                                    "codeclm-beam generate", "r1", wait=False)
    assert returned["submitted"] is True and returned["run_id"] == "r1"
    assert returned["outputs"] == outputs.run_dir
    assert (tmp_path / "out" / "examples" / "mine.jsonl").exists()
    result.wait_until_finish()
