"""Contract tests: Gemini 2.5 and 3 thinking models on Vertex AI.

The loopback server (`benchmarks/fake_model_server.py`) behaves as Google documents
thinking models: per-family budget ranges, levels and defaults, 400 for a setting the
model does not take or for budget and level together, thought tokens that count
against `maxOutputTokens` (with `MAX_TOKENS` and no text when they use it up), and
`thoughtsTokenCount` apart from `candidatesTokenCount`. It is driven through the real
google-genai client and the real Beam DirectRunner.
"""
import collections

import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from google.oauth2.credentials import Credentials

from benchmarks.fake_model_server import FakeModelServer
from benchmarks.fake_model_server import ServerConfig
from codeclm_beam.model import ChatMessage
from codeclm_beam.model import GenerationSettings
from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelFailure
from codeclm_beam.model import ModelRequest
from codeclm_beam.model import ModelResponse
from codeclm_beam.model.thinking import DEFAULT
from codeclm_beam.model.thinking import LEAST
from codeclm_beam.model.thinking import Thinking
from codeclm_beam.model.thinking import ThinkingNotSupported
from codeclm_beam.model.thinking import output_token_limit
from codeclm_beam.model.thinking import resolve_thinking
from codeclm_beam.pipelines.cli import main as cli_main
from tests.helpers import read_jsonl
from tests.helpers import run_generate
from tests.helpers import write_seeds


@pytest.fixture
def vertex_env(monkeypatch):
    monkeypatch.setenv("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-proj")


def server_for(strong_model: str, **config) -> FakeModelServer:
    return FakeModelServer(ServerConfig(accept_rate=0.5, strong_model=strong_model,
                                        max_seconds=300, **config))


# ---- the settings each family takes ---------------------------------------------

@pytest.mark.parametrize("model, setting, stage_default, expected", [
    ("gemini-2.5-pro", None, LEAST, Thinking(budget=128)),
    ("gemini-2.5-pro", None, DEFAULT, Thinking()),
    ("gemini-2.5-pro", "dynamic", LEAST, Thinking(budget=-1)),
    ("gemini-2.5-pro", "32768", LEAST, Thinking(budget=32768)),
    ("gemini-2.5-flash", None, LEAST, Thinking(budget=0)),
    ("gemini-2.5-flash", "24576", DEFAULT, Thinking(budget=24576)),
    ("gemini-2.5-flash-lite", None, LEAST, Thinking(budget=0)),
    ("gemini-2.5-flash-lite", "512", LEAST, Thinking(budget=512)),
    ("gemini-3-pro-preview", None, LEAST, Thinking(level="low")),
    ("gemini-3-pro-preview", "high", LEAST, Thinking(level="high")),
    ("gemini-3-flash-preview", None, LEAST, Thinking(level="minimal")),
    ("gemini-3-flash-preview", "medium", DEFAULT, Thinking(level="medium")),
    ("gemini-3-flash-preview", "default", LEAST, Thinking()),
])
def test_each_family_takes_its_documented_settings(model, setting, stage_default,
                                                   expected):
    assert resolve_thinking("vertex", model, setting, stage_default) == expected


@pytest.mark.parametrize("model, setting, allowed", [
    ("gemini-2.5-pro", "0", "128..32768"),
    ("gemini-2.5-pro", "64", "128..32768"),
    ("gemini-2.5-pro", "low", "thinking_budget"),
    ("gemini-2.5-flash", "30000", "0 (off) or 1..24576"),
    ("gemini-2.5-flash-lite", "256", "512..24576"),
    ("gemini-3-pro-preview", "minimal", "low | high"),
    ("gemini-3-pro-preview", "1024", "low | high"),
    ("gemini-3-flash-preview", "2048", "minimal | low | medium | high"),
])
def test_a_setting_the_model_cannot_take_names_the_model_and_what_it_allows(
        model, setting, allowed):
    with pytest.raises(ThinkingNotSupported) as refused:
        resolve_thinking("vertex", model, setting, LEAST)
    assert model in str(refused.value) and allowed in str(refused.value)


def test_other_backends():
    assert resolve_thinking("openai", "o4", "high", LEAST) == Thinking(level="high")
    assert resolve_thinking("openai", "llama", None, LEAST) == Thinking()
    with pytest.raises(ThinkingNotSupported, match="reasoning effort"):
        resolve_thinking("openai", "o4", "2048", LEAST)
    with pytest.raises(ThinkingNotSupported, match="do not think"):
        resolve_thinking("llamacpp", "smollm2-135m", "low", LEAST)
    with pytest.raises(ThinkingNotSupported, match="both"):
        Thinking(budget=128, level="low")


def test_the_output_limit_leaves_room_for_thinking():
    # The judge's 64 visible tokens plus the thinking each setting allows.
    assert output_token_limit("vertex", "gemini-2.5-pro", 64, Thinking(budget=128)) == 192
    assert output_token_limit("vertex", "gemini-2.5-pro", 64, Thinking()) == 64 + 32768
    assert output_token_limit("vertex", "gemini-2.5-flash-lite", 64, Thinking()) == 64
    assert output_token_limit("vertex", "gemini-3-pro-preview", 64,
                              Thinking(level="low")) == 64 + 4096
    assert output_token_limit("vertex", "gemini-3-flash-preview", 60000,
                              Thinking(level="high")) == 65536  # the model's limit
    assert output_token_limit("llamacpp", "smollm2-135m", 64, Thinking()) == 64


# ---- the server behaves as documented (what the old client ran into) ------------

def test_loopback_server_follows_the_documented_thinking_behaviour():
    with server_for("gemini-2.5-pro") as server:
        client = genai.Client(vertexai=True, project="p", location="us-central1",
                              credentials=Credentials(token="fake"),
                              http_options=types.HttpOptions(base_url=server.base_url))

        def ask(model, **config):
            return client.models.generate_content(
                model=model, contents="Rate these answers.",
                config=types.GenerateContentConfig(**config))

        # 2.5 Pro thinks by default: 32 output tokens go on thoughts, no text at all.
        exhausted = ask("gemini-2.5-pro", max_output_tokens=32)
        candidate = exhausted.candidates[0]
        assert candidate.finish_reason == types.FinishReason.MAX_TOKENS
        assert not (candidate.content and candidate.content.parts)
        assert exhausted.usage_metadata.thoughts_token_count == 32
        assert not exhausted.usage_metadata.candidates_token_count
        # Flash-Lite is off unless asked.
        assert not ask("gemini-2.5-flash-lite").usage_metadata.thoughts_token_count
        for model, thinking in (
                ("gemini-2.5-pro", types.ThinkingConfig(thinking_budget=0)),
                ("gemini-2.5-flash", types.ThinkingConfig(thinking_level="LOW")),
                ("gemini-3-pro-preview", types.ThinkingConfig(thinking_level="MINIMAL")),
                ("gemini-3-flash-preview", types.ThinkingConfig(
                    thinking_budget=128, thinking_level="LOW"))):
            with pytest.raises(genai_errors.ClientError) as refused:
                ask(model, thinking_config=thinking)
            assert refused.value.code == 400


# ---- the model layer --------------------------------------------------------------

def free_text_request(visible: int, thinking: Thinking) -> ModelRequest:
    return ModelRequest.create("r1", [ChatMessage("user", "Explain beam windows.")],
                               GenerationSettings(0.7, visible, thinking, seed=1))


def vertex_client(server, model: str, **settings) -> ModelClient:
    return ModelClient(ModelConfig(
        uri=f"vertex:{model}", project="p", location="us-central1",
        base_url=server.base_url, credentials=Credentials(token="fake"),
        initial_backoff_s=0.01, **settings))


def test_an_answer_cut_at_the_limit_is_re_sent_once_with_more_room():
    with server_for("gemini-2.5-flash-lite") as server:
        client = vertex_client(server, "gemini-2.5-flash-lite")
        # ~75 visible tokens of answer: 50 cut it, the re-send (50 + 50) holds it.
        result = client.call(free_text_request(50, Thinking()))
        assert isinstance(result, ModelResponse), result
        assert result.finish_reason == "STOP"
        assert result.stats.truncation_retries == 1 and result.stats.attempts == 2
        assert [e["max_tokens"] for e in server.log] == [50, 100]


def test_an_answer_still_cut_after_the_re_send_is_a_truncated_failure():
    with server_for("gemini-2.5-pro", answer_words=400) as server:
        client = vertex_client(server, "gemini-2.5-pro")
        # ~750 tokens of answer for 1 visible token beside 128 of thinking, then
        # 1 + 129: cut twice; then the two re-asks with other seeds (a model looping
        # on itself may not loop again) at the first limit, cut too.
        result = client.call(free_text_request(1, Thinking(budget=128)))
        assert isinstance(result, ModelFailure)
        assert result.reason == "truncated" and result.finish_reason == "MAX_TOKENS"
        assert result.error_class == "TruncatedAnswer"
        assert result.stats.truncation_retries == 1 and result.stats.truncated
        assert "1 re-send with more room" in result.message
        assert result.stats.parse_retries == 2
        assert [e["max_tokens"] for e in server.log] == [129, 258, 129, 129]
        assert all(e["thinking"] == {"thinkingBudget": 128} for e in server.log)
        # Every token the server reported is accounted for, thoughts apart.
        assert result.stats.usage.thoughts_tokens == server.usage["thoughts"] > 0
        assert result.stats.usage.completion_tokens == server.usage["candidates"]


def test_with_no_re_sends_allowed_a_cut_answer_says_none_was_made():
    with server_for("gemini-2.5-flash-lite") as server:
        client = vertex_client(server, "gemini-2.5-flash-lite",
                               max_truncation_retries=0, max_parse_retries=0)
        result = client.call(free_text_request(50, Thinking()))
        assert isinstance(result, ModelFailure) and result.reason == "truncated"
        assert "no re-sends with more room" in result.message
        assert [e["max_tokens"] for e in server.log] == [50]


def test_openai_reasoning_effort_passes_through_and_its_tokens_are_split():
    with FakeModelServer(ServerConfig(max_seconds=60)) as server:
        config = ModelConfig(uri=f"openai:o-test@{server.base_url}/v1", thinking="medium")
        request = free_text_request(200, config.thinking_for(DEFAULT))
        result = ModelClient(config).call(request)
        assert isinstance(result, ModelResponse), result
        assert server.log[0]["thinking"] == "medium"
        assert server.log[0]["max_tokens"] == 200 + 16384
        assert result.usage.thoughts_tokens == server.usage["thoughts"] > 0
        assert result.usage.completion_tokens == server.usage["candidates"] > 0


# ---- whole runs ---------------------------------------------------------------------

def thinking_run(tmp_path, server, strong: str, target: str, *extra):
    seeds = write_seeds(tmp_path / "seeds.jsonl", 4)
    out = tmp_path / "out"
    manifest = run_generate([
        "--seeds", seeds, "--output_dir", str(out),
        "--strong_model", f"vertex:{strong}", "--target_model", f"vertex:{target}",
        "--model_base_url", server.base_url, "--vertex_project", "test-proj",
        "--num_examples", "8", "--num_metadata", "4", "--no_report", *extra])
    return manifest, out


def check_contract_run(server, manifest, out):
    examples = read_jsonl(out, "examples")
    rejected = read_jsonl(out, "rejected")
    assert read_jsonl(out, "dead_letter") == []
    assert manifest["accounting"]["balanced"], manifest["accounting"]["checks"]
    # Every pair the judge separates is kept, and only those.
    assert examples and all(server.judge_separates(e["instruction"]) for e in examples)
    assert all(e["gap"] > 3 for e in examples)
    assert not any(server.judge_separates(r["instruction"]) for r in rejected
                   if r["reason"] == "within_threshold")
    # Tokens add up to the server's own count, thoughts apart from visible output.
    totals = manifest["model_calls"]["totals"]
    assert totals["prompt_tokens"] == server.usage["prompt"]
    assert totals["completion_tokens"] == server.usage["candidates"]
    assert totals["thoughts_tokens"] == server.usage["thoughts"] > 0
    assert totals["truncated"] == 0
    by_model = collections.defaultdict(set)
    for entry in server.log:
        by_model[entry["model"]].add(repr(entry["thinking"]))
    return by_model


def test_gemini_2_5_pro_strong_and_judge_with_flash_lite_target(tmp_path, vertex_env):
    with server_for("gemini-2.5-pro") as server:
        manifest, out = thinking_run(tmp_path, server, "gemini-2.5-pro",
                                     "gemini-2.5-flash-lite")
        settings = check_contract_run(server, manifest, out)
    # Codec stages and the judge at the least 2.5 Pro allows; its answers and
    # Flash-Lite's at the model's default (nothing sent).
    assert settings["gemini-2.5-pro"] == {repr({"thinkingBudget": 128}), repr({})}
    assert settings["gemini-2.5-flash-lite"] == {repr({})}
    (judge,) = manifest["model_calls"]["by_stage"]["judge"]["models"].items()
    assert judge[0].startswith("vertex:gemini-2.5-pro@http://127.0.0.1:")
    assert judge[1]["thoughts_tokens"] > 0


def test_gemini_3_pro_strong_and_judge_with_3_flash_target(tmp_path, vertex_env):
    with server_for("gemini-3-pro-preview") as server:
        manifest, out = thinking_run(tmp_path, server, "gemini-3-pro-preview",
                                     "gemini-3-flash-preview", "--target_thinking", "low")
        settings = check_contract_run(server, manifest, out)
    assert settings["gemini-3-pro-preview"] == {repr({"thinkingLevel": "LOW"}), repr({})}
    assert settings["gemini-3-flash-preview"] == {repr({"thinkingLevel": "LOW"})}


@pytest.mark.parametrize("flags, named", [
    (["--judge_thinking", "0"], "gemini-2.5-pro"),
    (["--target_model", "vertex:gemini-3-pro-preview", "--target_thinking", "minimal"],
     "gemini-3-pro-preview"),
])
def test_a_refused_combination_fails_before_any_request(tmp_path, vertex_env, capsys,
                                                        flags, named):
    with server_for("gemini-2.5-pro") as server:
        status = cli_main([
            "generate", "--seeds", write_seeds(tmp_path / "seeds.jsonl", 2),
            "--output_dir", str(tmp_path / "out"),
            "--strong_model", "vertex:gemini-2.5-pro",
            "--target_model", "vertex:gemini-2.5-flash-lite",
            "--model_base_url", server.base_url, *flags])
        assert status == 2
        assert server.log == []
    err = capsys.readouterr().err
    assert named in err and "allows" in err and "Traceback" not in err


def _tokens_charged(monkeypatch) -> list:
    """What the client charges its token quota: the estimate before each call, the
    correction after it."""
    from codeclm_beam.model import TokenBucketRateLimiter
    charged = []
    monkeypatch.setattr(TokenBucketRateLimiter, "allow",
                        lambda self, hits_added=1, tokens=0: charged.append(tokens) or True)
    monkeypatch.setattr(TokenBucketRateLimiter, "charge_tokens",
                        lambda self, tokens: charged.append(tokens))
    return charged


def test_the_vertex_token_quota_is_charged_for_input_tokens_only(monkeypatch):
    # Vertex AI's token quota is generate_content_input_tokens_per_minute_per_base_model:
    # a thinking model's thoughts and answer are billed but not counted there.
    import uuid
    from codeclm_beam.model import QuotaConfig
    charged = _tokens_charged(monkeypatch)
    with server_for("gemini-2.5-flash") as server:
        client = vertex_client(server, "gemini-2.5-flash", quota=QuotaConfig(
            tokens_per_minute=10 ** 9, run_id=uuid.uuid4().hex))
        result = client.call(free_text_request(200, client.config.thinking_for(DEFAULT)))
    assert isinstance(result, ModelResponse) and result.usage.thoughts_tokens > 0
    assert sum(charged) == server.usage["prompt"] == result.usage.prompt_tokens


def test_the_token_quota_is_charged_for_thoughts(monkeypatch):
    import uuid
    from codeclm_beam.model import QuotaConfig
    charged = _tokens_charged(monkeypatch)
    with FakeModelServer(ServerConfig(max_seconds=60)) as server:
        config = ModelConfig(uri=f"openai:o-test@{server.base_url}/v1", thinking="high",
                             quota=QuotaConfig(tokens_per_minute=10 ** 9,
                                               run_id=uuid.uuid4().hex))
        result = ModelClient(config).call(free_text_request(200, config.thinking_for(
            DEFAULT)))
    assert isinstance(result, ModelResponse) and result.usage.thoughts_tokens > 0
    # The estimate paid before the call plus the correction after it: every token the
    # server reported, thoughts included.
    assert sum(charged) == sum(server.usage.values())
