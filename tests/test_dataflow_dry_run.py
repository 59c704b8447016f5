"""The generate pipeline survives a Dataflow dry run offline: the whole job is built
(every DoFn, side input and coder pickled) and validated, and nothing is submitted."""
from tests.helpers import run_generate

DRY_RUN = ["--runner=DataflowRunner", "--project=codeclm-test-project", "--region=us-central1",
           "--temp_location=gs://codeclm-test-bucket/tmp", "--staging_location=gs://codeclm-test-bucket/stage",
           "--no_auth", "--dry_run=True", "--sdk_location=container"]


def test_generate_passes_a_dataflow_dry_run():
    result = run_generate(DRY_RUN + [
        "--seeds", "gs://codeclm-test-bucket/seeds/*.jsonl", "--output_dir", "gs://codeclm-test-bucket/out",
        "--strong_model", "vertex:gemini-2.5-flash", "--target_model",
        "openai:target@http://10.0.0.2:8000/v1", "--max_num_workers", "4",
        "--max_requests_per_minute", "600", "--export_format", "vertex"])
    assert result["submitted"] is False
