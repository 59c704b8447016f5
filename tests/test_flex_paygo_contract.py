"""Contract test: Flex PayGo through the real google-genai client against the loopback
Vertex AI server. Vertex AI documents Flex PayGo as the same generateContent request
with the header `X-Vertex-AI-LLM-Shared-Request-Type: flex`, served on the global
endpoint only (the loopback server answers 400 INVALID_ARGUMENT elsewhere) and billed
at half the online price."""
import pytest

from benchmarks.fake_model_server import FakeModelServer
from benchmarks.fake_model_server import ServerConfig
from codeclm_beam.model import ChatMessage
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelRequest
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.cli import main
from codeclm_beam.pipelines.commands.plan import Pilot
from codeclm_beam.pipelines.commands.plan import plan
from tests.helpers import read_jsonl
from tests.helpers import run_generate
from tests.helpers import write_seeds


@pytest.fixture
def vertex_env(monkeypatch):
    monkeypatch.setenv("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-proj")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "europe-west4")


def test_a_flex_run_sends_every_request_as_flex_on_the_global_endpoint_at_half_price(
        tmp_path, vertex_env):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    out = tmp_path / "out"
    with FakeModelServer(ServerConfig(accept_rate=0.5, strong_model="gemini-2.5-flash",
                                      max_seconds=300)) as server:
        manifest = run_generate([
            "--seeds", seeds, "--output_dir", str(out), "--vertex_mode", "flex",
            "--strong_model", "vertex:gemini-2.5-flash",
            "--target_model", "vertex:gemini-2.5-flash-lite",
            "--model_base_url", server.base_url, "--num_examples", "4",
            "--num_metadata", "2", "--max_iterations", "2", "--no_report"])
        log = list(server.log)
    assert log and {(e["outcome"], e["request_type"], e["location"]) for e in log} == {
        ("ok", "flex", "global")}
    assert manifest["accounting"]["balanced"] and read_jsonl(out, "dead_letter") == []
    assert set(manifest["billing"].values()) == {"flex"}
    cost = manifest["cost"]
    assert cost["usd"] == cost["by_mode"]["flex"] > 0
    assert cost["by_mode"]["online"] == pytest.approx(2 * cost["by_mode"]["flex"],
                                                      abs=2e-4)

    # `plan` prices the same projected calls in each mode, side by side.
    projected = plan(Pilot.from_manifest(manifest), num_examples=1_000_000)
    by_mode = projected["cost_usd_by_mode"]
    assert by_mode["online"] == pytest.approx(2 * by_mode["flex"], rel=1e-3)
    assert by_mode["batch"] == by_mode["flex"]


def test_online_requests_carry_no_flex_header_and_keep_their_region(vertex_env):
    request = ModelRequest.create("r1", [ChatMessage("user", "Name a prime.")])
    with FakeModelServer(ServerConfig(max_seconds=60)) as server:
        for mode in ("online", "flex"):
            ModelClient(ModelConfig(f"vertex:gemini-2.5-flash#{mode}",
                                    base_url=server.base_url, vertex_mode=mode,
                                    cache_dir=None)).call(request)
        log = list(server.log)
    assert [(e["request_type"], e["location"]) for e in log] == [
        (None, "europe-west4"), ("flex", "global")]


def test_flex_in_a_region_is_refused_before_any_request(tmp_path, vertex_env, capsys):
    with pytest.raises(ConfigurationError, match="global endpoint"):
        ModelConfig("vertex:gemini-2.5-flash", vertex_mode="flex",
                    location="us-central1")
    assert main(["generate", "--seeds", write_seeds(tmp_path / "s.jsonl", 2),
                 "--output_dir", str(tmp_path / "out"), "--vertex_mode", "flex",
                 "--vertex_location", "us-central1",
                 "--strong_model", "vertex:gemini-2.5-flash"]) == 2
    assert "global endpoint" in capsys.readouterr().err
