"""Nothing lost, nothing leaked, round two (issue 23): each defect the hostile probe
found, reproduced as it found it, with the behaviour the README now promises."""
import json
import os

import pytest

from codeclm_beam.model import ModelClient
from codeclm_beam.model import ModelConfig
from codeclm_beam.model import ModelFailure
from codeclm_beam.model import ModelResponse
from codeclm_beam.model import Usage
from codeclm_beam.model.cache import ResponseCache
from codeclm_beam.model.errors import ConfigurationError
from codeclm_beam.pipelines.cli import main as cli_main
from codeclm_beam.pipelines.run.commit import OutputFolder
from codeclm_beam.pipelines.run.commit import read_committed
from codeclm_beam.redact import public_url
from codeclm_beam.redact import redact
from codeclm_beam.redact import register_url_secrets
from codeclm_beam.transforms.encode import Encode
from codeclm_beam.records import Seed
from tests.helpers import calls_by_kind
from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import scripted_models
from tests.helpers import write_seeds
from tests.scripted_backend import read_calls
from tests.scripted_backend import write_scenario


def encode_request(stage: Encode, text: str):
    from codeclm_beam.model import ModelRequest
    seed = Seed(seed_id="s1", instruction=text, source="test")
    return ModelRequest.create("s1", stage.prompt(seed), stage.settings,
                               stage.schema_for(seed))


# ---- 1. recorded names never leave the output folder ---------------------------------

@pytest.mark.parametrize("run_folder", ["../victim", "/tmp", "runs/../../x", "C:\\x"])
def test_a_record_naming_a_folder_outside_the_output_folder_is_refused(tmp_path,
                                                                        run_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"run_folder": run_folder,
                                                   "files": ["x"]}))
    with pytest.raises(ConfigurationError, match="not a run's folder inside"):
        read_committed(str(out))


# ---- 2. a run that delivered nothing keeps the previous dataset ----------------------

def test_a_run_whose_every_call_failed_keeps_the_dataset_and_exits_3(tmp_path, capsys):
    seeds = write_seeds(tmp_path / "s.jsonl", 3)
    models = scripted_models(tmp_path, "strong_wins")
    out = tmp_path / "out"
    args = ["--num_examples", "3", "--num_metadata", "3", "--max_retries", "0"]
    assert cli_main(["generate", *generate_args(tmp_path, models, seeds, out, *args)]) == 0
    before = read_jsonl(out, "examples")
    assert len(before) == 3
    # The strong model refuses every encode request (a 400 each): nothing delivered.
    refusing = scripted_models(tmp_path, "strong_wins",
                               {"strong": {"fail_when": "Instruction:"}})
    status = cli_main(["generate", *generate_args(
        tmp_path, refusing, seeds, out, *args, "--no_cache")])
    err = capsys.readouterr().err
    assert status == 3
    assert "delivered 0 of 3 pairs" in err and "previous run's 3 pairs" in err
    assert "--replace_with_fewer" in err
    assert read_jsonl(out, "examples") == before
    current = (out / "current").resolve()
    refused, = (p for p in (out / "runs").iterdir() if p != current)  # kept for reading
    assert json.loads((refused / "manifest.json").read_text())["not_committed"]
    # The next run that finishes removes it.
    models = scripted_models(tmp_path, "strong_wins")  # the scenario files, as first
    assert cli_main(["generate", *generate_args(tmp_path, models, seeds, out, *args)]) == 0
    assert [p.resolve() for p in (out / "runs").iterdir()] == [(out / "current").resolve()]


# ---- 3. one writer per folder --------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    first = OutputFolder(str(tmp_path / "out"), "run-a", "manifest.json")
    first.claim()
    second = OutputFolder(str(tmp_path / "out"), "run-b", "manifest.json")
    with pytest.raises(ConfigurationError, match="being written by another run.*run-a"):
        second.claim()
    first.release()
    second.claim()  # free again
    second.release()


# ---- 4 and 5. the cache: malformed entries and unusable answers are asked again ------

@pytest.mark.parametrize("entry", [[], {"version": 2, "key": "K"}, "not json{"])
def test_a_malformed_cache_entry_is_a_named_miss_never_a_crash(tmp_path, entry, caplog):
    uri = write_scenario(tmp_path / "s.json", role="strong", log_dir=str(tmp_path / "log"))
    stage = Encode()
    client = ModelClient(ModelConfig(uri=uri, cache_dir=str(tmp_path / "cache")),
                         check=stage.answer_problem)
    request = encode_request(stage, "write a poem about rivers")
    key = request.cache_key(client.identity)
    path = ResponseCache(str(tmp_path / "cache"))._path(key)
    os.makedirs(os.path.dirname(path))
    body = entry if isinstance(entry, str) else json.dumps(entry).replace('"K"', f'"{key}"')
    with open(path, "w") as f:
        f.write(body)
    result = client.call(request)
    assert isinstance(result, ModelResponse) and result.stats.attempts == 1
    assert path in caplog.text and "unusable" in caplog.text
    assert client.call(request).stats.cache_hit  # the fresh answer replaced it


def test_an_answer_the_stage_cannot_use_is_re_asked_and_never_cached(tmp_path):
    uri = write_scenario(tmp_path / "s.json", role="strong", log_dir=str(tmp_path / "log"),
                         unusable_encode_first=1)
    stage = Encode()
    config = ModelConfig(uri=uri, cache_dir=str(tmp_path / "cache"))
    client = ModelClient(config, check=stage.answer_problem)
    request = encode_request(stage, "write a poem about rivers")
    result = client.call(request)
    assert isinstance(result, ModelResponse), result
    assert result.stats.attempts == 2 and result.stats.parse_retries == 1
    assert "knowledge" not in result.data["skills"]
    # A cached answer the stage cannot use (written by an older version, or by hand)
    # is not served: it is asked again.
    cache = ResponseCache(str(tmp_path / "cache"))
    cache.put(request.cache_key(client.identity), ModelResponse(
        text=json.dumps({"use_case": "x", "skills": ["knowledge"]}),
        data={"use_case": "x", "skills": ["knowledge"]}, finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=1)))
    again = client.call(request)
    assert not again.stats.cache_hit and again.stats.attempts == 1
    assert len(read_calls(tmp_path / "log")) == 3
    # Without the stage's rule every re-ask is spent, then a dead letter with why.
    stubborn = write_scenario(tmp_path / "t.json", role="strong",
                              log_dir=str(tmp_path / "log2"), unusable_encode_first=9)
    failure = ModelClient(ModelConfig(uri=stubborn), check=stage.answer_problem).call(
        request)
    assert isinstance(failure, ModelFailure) and failure.attempts == 3
    assert "no usable skill" in failure.message


# ---- 6. credentials in any query parameter -------------------------------------------

def test_every_query_value_but_known_public_ones_is_redacted():
    url = ("https://h.example/v1?api-version=2024-06-01&subscription-key=SUBKEY123"
           "&code=FUNCCODE99&X-Amz-Signature=abcdef123456&region=eu")
    shown = public_url(url)
    for secret in ("SUBKEY123", "FUNCCODE99", "abcdef123456"):
        assert secret not in shown
    assert "api-version=2024-06-01" in shown and "region=eu" in shown
    register_url_secrets(url)
    assert "FUNCCODE99" not in redact("the server said: bad code FUNCCODE99")


# ---- 7. evaluate keeps items whose ids or file names collide -------------------------

def test_repeated_ids_and_same_named_files_are_all_evaluated(tmp_path):
    rows = {"a": [(1, "[WIN] one"), (1, "[WIN] one again"), (2, "[LOSS] two")],
            "b": [(1, "[WIN] other one"), (2, "[EQUAL] other two")]}
    files = []
    for folder, items in rows.items():
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "bench.jsonl"
        path.write_text("".join(json.dumps({"question_id": i, "category": "c",
                                            "turns": [text]}) + "\n"
                                for i, text in items))
        files += ["--benchmark", str(path)]
    scenario = dict(judge="by_instruction", log_dir=str(tmp_path / "calls"))
    status = cli_main(["evaluate", "--output_dir", str(tmp_path / "out"),
                       "--strong_model", write_scenario(tmp_path / "s.json", role="strong",
                                                        **scenario),
                       "--candidate_model", write_scenario(tmp_path / "t.json",
                                                           role="target", **scenario),
                       *files])
    assert status == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    row = summary["candidates"][0]
    assert row["overall"]["total"] == 5
    assert sorted(row["benchmarks"]) == ["a/bench", "b/bench"]
    assert (row["benchmarks"]["a/bench"]["win"], row["benchmarks"]["a/bench"]["loss"]) \
        == (2, 1)
    judged = read_jsonl(tmp_path / "out", "judgements")
    assert sorted(j["item_id"] for j in judged if j["benchmark"] == "a/bench") == \
        ["1", "1@line2", "2"]


# ---- 8. candidates whose two judge calls both failed are in the accounting ------------

def test_candidates_whose_judgements_all_failed_are_counted_lost(tmp_path, capsys):
    models = scripted_models(tmp_path, "strong_wins",
                             {"judge": {"fail_when": "[The Start of Assistant 1"}})
    status = cli_main(["generate", *generate_args(
        tmp_path, models, write_seeds(tmp_path / "s.jsonl", 3), tmp_path / "out",
        "--num_examples", "3", "--num_metadata", "3", "--max_iterations", "1")])
    assert status == 3  # nothing delivered
    assert "delivered nothing" in capsys.readouterr().err
    accounting = json.loads((tmp_path / "out" / "manifest.json").read_text())["accounting"]
    candidates = accounting["candidates"]
    judged = candidates["rounds"][0]["candidates"]
    assert judged == 3 and candidates["lost_to_dead_letters"] == 3
    assert accounting["balanced"], accounting["checks"]
    assert accounting["dead_letters_by_stage"]["judge"] == 6  # both orders of each


# ---- 9. batch answers echoed as Google's sample line: see test_batch_prediction_contract
# (test_answers_are_joined_to_their_requests_even_without_the_echoed_labels: the
# loopback server now echoes `"file_data": null` beside each text part).

# ---- 10. the smaller ones ------------------------------------------------------------

def test_a_byte_order_mark_does_not_cost_the_first_seed(tmp_path):
    from codeclm_beam.rows import jsonl_rows
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "first"}\n{"instruction": "second"}\n')
    with open(path, "rb") as handle:
        rows = [row for _, row in jsonl_rows(str(path), handle)]
    assert rows == [{"instruction": "first"}, {"instruction": "second"}]


def test_split_keeps_one_question_under_two_ids_on_one_side(tmp_path):
    from codeclm_beam.pipelines.commands.split import split_file
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "category": "c", "turns": [
        f"Question {i % 10}?" if i < 20 else f"Other {i}?"]}) + "\n" for i in range(40)))
    result = split_file(str(path), str(tmp_path / "split"), 0.25, seed=1)
    sides = {}
    for part in ("seeds", "eval"):
        for line in open(result["files"][part]):
            sides.setdefault(json.loads(line)["turns"][0], set()).add(part)
    assert all(len(parts) == 1 for parts in sides.values()), sides
    assert result["seeds"] + result["eval"] == 40


@pytest.mark.parametrize("command", [["plan", "{d}", "--num_examples", "10"],
                                     ["report", "{d}"], ["show", "{d}"]])
def test_commands_on_a_folder_without_a_run_say_so(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    assert cli_main([c.format(d=tmp_path / "empty") for c in command]) == 2
    assert "not a finished codeclm-beam run" in capsys.readouterr().err


def test_commands_on_a_manifest_missing_keys_say_so(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"accounting": {}}))
    assert cli_main(["plan", str(tmp_path / "run"), "--num_examples", "10"]) == 2
    assert "lacks" in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    models = scripted_models(tmp_path, "strong_wins")
    status = cli_main(["generate", *generate_args(
        tmp_path, models, write_seeds(tmp_path / "s.jsonl", 2), tmp_path / "out",
        "--num_examples", "2", "--num_metadata", "2")])
    assert status == 2 and "is a file" in capsys.readouterr().err


# ---- fail fast: an unreachable server stops the run before any stage ------------------

def test_an_unreachable_server_stops_generate_at_once_naming_it(tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = scripted_models(tmp_path, "strong_wins")
    models["strong"] = f"openai:m@http://127.0.0.1:{port}/v1"
    status = cli_main(["generate", *generate_args(
        tmp_path, models, write_seeds(tmp_path / "s.jsonl", 2), tmp_path / "out",
        "--num_examples", "2", "--num_metadata", "2")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"--strong_model openai:m@http://127.0.0.1:{port}/v1: cannot be reached" in err
    assert "refused" in err.lower()
    assert not (tmp_path / "out" / "manifest.json").exists()
