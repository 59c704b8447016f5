"""Evaluation you can trust: each candidate is asked itself (model identity), the judge
says whether it is also a contestant, and an item that could not be judged is counted
as failed, never dropped."""
import json
import os

import pytest

from codeclm_beam.model import ChatMessage
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model.cache import ResponseCache
from codeclm_beam.model.types import ModelResponse
from codeclm_beam.model.types import Usage
from codeclm_beam.model.uri import ModelSpec
from codeclm_beam.pipelines.cli import main as cli_main
from tests.helpers import read_jsonl
from tests.loopback import RecordingServer
from tests.scripted_backend import write_scenario

EVOL = os.path.join(os.path.dirname(__file__), "fixtures", "benchmarks",
                    "evol_instruct.jsonl")


def chat_server(marker: str) -> RecordingServer:
    """An OpenAI-compatible server for model "llama" whose answers say `marker`."""
    def respond(method, path, body, headers):
        if method == "GET" and path.endswith("/v1/models"):
            return 200, {"object": "list", "data": [
                {"id": "llama", "object": "model", "created": 0, "owned_by": "me"}]}, {}
        question = body["messages"][-1]["content"]
        return 200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"{marker} answer to: {question}"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}, {}
    return RecordingServer(respond)


def chat_requests(server: RecordingServer) -> list[dict]:
    """The chat calls a server answered (the model check's listing aside)."""
    return [r for r in server.requests if r["path"].endswith("/chat/completions")]


def scripted(tmp_path, role, judge="by_marker", **scenario):
    return write_scenario(tmp_path / f"{role}.json", role=role, judge=judge,
                          log_dir=str(tmp_path / "calls"), **scenario)


def evaluate(tmp_path, *flags):
    out = tmp_path / "out"
    status = cli_main(["evaluate", "--benchmark", EVOL, "--output_dir", str(out),
                       "--strong_model", scripted(tmp_path, "strong"),
                       "--bootstrap_samples", "50", *flags])
    return status, out


def test_two_hosts_serving_one_model_name_are_each_asked(tmp_path, capsys):
    base, tuned = chat_server("BASE"), chat_server("TUNED")
    with base.running(), tuned.running():
        base_uri = f"openai:llama@{base.base_url}/v1"
        tuned_uri = f"openai:llama@{tuned.base_url}/v1"
        status, out = evaluate(tmp_path, "--candidate_model", base_uri,
                               "--candidate_model", tuned_uri,
                               "--judge_model", scripted(tmp_path, "judge"))
    assert status == 0
    # Five items: each server answered each item once.
    assert len(chat_requests(base)) == 5 and len(chat_requests(tuned)) == 5
    judgements = read_jsonl(out, "judgements")
    by_model = {uri: [j for j in judgements if j["candidate_model"] == uri]
                for uri in (base_uri, tuned_uri)}
    assert all(j["candidate_answer"].startswith("BASE") and j["outcome"] == "loss"
               for j in by_model[base_uri]) and len(by_model[base_uri]) == 5
    assert all(j["candidate_answer"].startswith("TUNED") and j["outcome"] == "win"
               for j in by_model[tuned_uri]) and len(by_model[tuned_uri]) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["differences"][0]["difference"] == 100.0
    assert summary["judge_independence"].startswith("independent judge")
    assert "self-judged" not in (out / "crr.md").read_text()


def test_the_same_model_twice_is_refused_unless_tagged(tmp_path, capsys):
    server = chat_server("BASE")
    with server.running():
        uri = f"openai:llama@{server.base_url}/v1"
        status, _ = evaluate(tmp_path, "--candidate_model", uri, "--candidate_model", uri)
        assert status == 2 and server.requests == []
        assert "#rev=" in capsys.readouterr().err
        status, out = evaluate(tmp_path, "--candidate_model", uri + "#rev=a",
                               "--candidate_model", uri + "#rev=b")
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["candidates"] == [uri + "#rev=a", uri + "#rev=b"]


def test_a_failed_judgement_is_counted_and_sets_the_exit_status(tmp_path, capsys):
    judge = scripted(tmp_path, "judge", judge="by_instruction",
                     fail_when="quicksort")  # item 1's instruction
    flags = ["--candidate_model", scripted(tmp_path, "target", judge="by_instruction"),
             "--judge_model", judge]
    status, out = evaluate(tmp_path, *flags)
    assert status == 3
    assert "20.0% of the items" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    cell = summary["candidates"][0]["benchmarks"]["evol_instruct"]
    assert (cell["win"], cell["tie"], cell["loss"], cell["failed"]) == (1, 3, 0, 1)
    assert cell["judged"] == 4 and cell["total"] == 5 and cell["crr"] == 100.0
    failed = [j for j in read_jsonl(out, "judgements") if j["outcome"] == "failed"]
    assert [j["item_id"] for j in failed] == ["1"]
    assert {d["stage"] for d in read_jsonl(out, "dead_letter")} == {"eval_judge"}
    assert "(1/3/0/1)" in (out / "crr.md").read_text()
    status, _ = evaluate(tmp_path, *flags, "--max_failed_share", "0.25")
    assert status == 0


def test_a_gguf_replaced_in_place_is_another_model(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"A" * 1000)
    first = ModelConfig(uri=f"llamacpp:{path}").identity
    os.utime(path, ns=(1, 1))
    same_content_other_time = ModelConfig(uri=f"llamacpp:{path}").identity
    path.write_bytes(b"GGUF" + b"B" * 1000)  # same name, same size, new weights
    os.utime(path, ns=(1, 1))
    replaced = ModelConfig(uri=f"llamacpp:{path}").identity
    (tmp_path / "other").mkdir()
    moved = tmp_path / "other" / "model.gguf"
    moved.write_bytes(path.read_bytes())
    os.utime(moved, ns=(1, 1))
    elsewhere = ModelConfig(uri=f"llamacpp:{moved}").identity
    assert len({first, same_content_other_time, replaced, elsewhere}) == 4
    assert str(path) in first

    # The cache is keyed by identity: the old answer is a miss for the new file.
    request = ModelRequest.create("r", [ChatMessage("user", "hi")])
    cache = ResponseCache(str(tmp_path / "cache"))
    cache.put(request.cache_key(first), ModelResponse("old", None, "stop", Usage(1, 0, 1)))
    assert cache.get(request.cache_key(first)).text == "old"
    assert cache.get(request.cache_key(replaced)) is None


@pytest.mark.parametrize("uri, identity", [
    ("openai:m@http://user:pw@host:8000/v1", "openai:m@http://host:8000/v1"),
    ("openai:m@http://host:8000/v1#rev=ckpt-1200", "openai:m@http://host:8000/v1#rev=ckpt-1200"),
    ("vertex:gemini-2.5-flash", "vertex:gemini-2.5-flash"),
])
def test_identity_names_address_and_tag_but_no_credentials(uri, identity):
    assert ModelSpec.parse(uri).identity == identity
    assert ModelConfig(uri=uri).identity == identity


def test_an_endpoint_override_is_part_of_a_vertex_identity():
    a = ModelConfig(uri="vertex:gemini-2.5-flash", base_url="http://127.0.0.1:1")
    b = ModelConfig(uri="vertex:gemini-2.5-flash", base_url="http://127.0.0.1:2")
    assert a.identity != b.identity
