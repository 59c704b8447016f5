"""The batch waves speak only `backends.BatchJobs`: a second provider's batch API (here
an in-memory one, through the `custom:` backend extension point) runs through
`model.batch` unchanged, with the same re-asks, job records and resume."""
from __future__ import annotations

import json

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import BatchAnswers
from codeclm_beam.model.backends import BatchJob
from codeclm_beam.model.backends import BatchJobs
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.batch import _RunJobs
from codeclm_beam.model.config import BatchConfig
from codeclm_beam.model.types import GenerationSettings
from codeclm_beam.model.types import ModelFailure
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.model.types import Usage

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}},
          "required": ["answer"]}
# What the provider did, across backends of one test process.
CALLS: list[tuple[str, int]] = []


class _MemoryJobs(BatchJobs):
    """A provider whose jobs finish at the second look and answer every request; the
    first answer to a request whose text holds "odd" is off its schema."""

    def __init__(self):
        self._jobs: dict[str, dict] = {}

    def _job(self, name: str) -> BatchJob:
        job = self._jobs[name]
        job["looks"] += 1
        done = job["looks"] > 1
        return BatchJob(name=name, state="DONE" if done else "RUNNING",
                        phase="succeeded" if done else "running", finished=done,
                        answered=True, age_s=0.0)

    def submit(self, requests, base, display_name) -> BatchJob:
        name = f"memory/{len(self._jobs)}"
        self._jobs[name] = {"requests": dict(requests), "looks": 0}
        CALLS.append(("submit", len(requests)))
        return self._job(name)

    def get(self, name: str) -> BatchJob:
        return self._job(name)

    def find(self, display_name: str):
        return None

    def cancel(self, name: str) -> None:
        CALLS.append(("cancel", 0))

    def retrieve(self, job: BatchJob, requests) -> BatchAnswers:
        answers = {}
        for label, request in requests.items():
            text = request.messages[-1].content
            odd = "odd" in text and request.settings.seed == 0
            answers[label] = RawAnswer("not json" if odd else json.dumps({"answer": text}),
                                       "STOP", Usage(5, 0, 3))
        return BatchAnswers(answers)


_PROVIDER = _MemoryJobs()


class MemoryBatchBackend(Backend):
    def __init__(self, config):
        pass

    def generate(self, request):
        raise AssertionError("a batch stage sends nothing online")

    def batch_jobs(self):
        return _PROVIDER


def _ask(tmp_path, texts):
    config = ModelConfig(uri="custom:tests.test_batch_interface:MemoryBatchBackend",
                         batch=BatchConfig(batch_dir=str(tmp_path / "jobs"),
                                           poll_initial_s=0.0, poll_max_s=0.0))
    requests = [ModelRequest.create(f"r{i}", [ChatMessage("user", text)],
                                    GenerationSettings(seed=0), SCHEMA)
                for i, text in enumerate(texts)]
    runner = _RunJobs(config, "answer")
    runner.setup()
    return {prediction.example.request_id: prediction.inference
            for _, prediction in runner.process((0, [
                (r.cache_key(config.identity), (r.request_id, r)) for r in requests]))}


def test_a_second_providers_batch_api_runs_through_the_same_waves(tmp_path):
    CALLS.clear()
    results = _ask(tmp_path, ["even one", "odd one", "even two"])
    assert all(isinstance(r, ModelResponse) for r in results.values())
    assert {rid: r.data["answer"] for rid, r in results.items()} == {
        "r0": "even one", "r1": "odd one", "r2": "even two"}
    # One job for every request, a second for the one re-asked with another seed.
    assert CALLS == [("submit", 3), ("submit", 1)]
    assert results["r1"].stats.parse_retries == 1 and results["r1"].stats.attempts == 2
    # A re-run finds both jobs by their records: nothing is submitted again.
    again = _ask(tmp_path, ["even one", "odd one", "even two"])
    assert CALLS == [("submit", 3), ("submit", 1)]
    assert {rid: r.data for rid, r in again.items()} == {
        rid: r.data for rid, r in results.items()}
    assert not [r for r in again.values() if isinstance(r, ModelFailure)]
