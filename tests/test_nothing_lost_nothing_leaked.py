"""Nothing lost, nothing leaked: the cases of issue 17, each run as a user would run
them (the CLI, a scripted or loopback model), with the behaviour asserted."""
import base64
import json
import os
import time

import pytest

from benchmarks.fake_model_server import FakeModelServer
from benchmarks.fake_model_server import ServerConfig
from codeclm_beam.pipelines.cli import main as cli_main
from tests.helpers import calls_by_kind
from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import scripted_models
from tests.helpers import write_seeds
from tests.scripted_backend import write_scenario

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "benchmarks")


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` but the response cache, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not str(p.relative_to(folder)).startswith("cache/")}


def generate(tmp_path, *extra, judge="strong_wins", per_role=None, seeds=None):
    models = scripted_models(tmp_path, judge, per_role)
    seeds = seeds or write_seeds(tmp_path / "seeds.jsonl", 4)
    return cli_main(["generate", *generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_metadata", "4",
        "--num_examples", "4", *extra)])


# ---- output safety -------------------------------------------------------------------

def test_a_typo_in_seeds_leaves_the_previous_run_whole(tmp_path, capsys):
    assert generate(tmp_path) == 0
    before = snapshot(tmp_path / "out")
    assert "manifest.json" in before and "report.html" in before
    calls = sum(calls_by_kind(tmp_path).values())
    status = generate(tmp_path, seeds=str(tmp_path / "seeds.jsnol"))
    assert status == 2
    assert "seeds.jsnol: no file matches" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == before
    assert sum(calls_by_kind(tmp_path).values()) == calls  # no model call


def test_a_failed_run_leaves_the_previous_outputs_whole(tmp_path):
    assert generate(tmp_path) == 0
    before = snapshot(tmp_path / "out")
    with pytest.raises(Exception, match="scripted crash"):
        generate(tmp_path, "--num_examples", "3", per_role={"target": {"crash": True}})
    assert snapshot(tmp_path / "out") == before  # the failed run's folder is gone too


def test_a_folder_of_yours_is_refused_and_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    for name, text in (("examples/my_gold.jsonl", '{"gold": 1}\n'),
                       ("export/final.json", "[]"), ("README.md", "# my notes\n")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    mine = snapshot(out)
    assert generate(tmp_path) == 2
    err = capsys.readouterr().err
    assert "README.md" in err and "examples/my_gold.jsonl" in err and "--force" in err
    assert snapshot(out) == mine
    assert generate(tmp_path, "--force") == 0
    after = snapshot(out)
    assert all(after[name] == data for name, data in mine.items())  # kept, unchanged
    record = json.loads((out / "manifest.json").read_text())
    assert "report.html" in record["files"] and (out / "report.html").is_file()
    # The run's own examples/ lies in its folder; the user's keeps its name and bytes.
    assert (out / record["run_folder"] / "examples").is_dir()


def test_a_failed_evaluate_leaves_its_previous_summary_whole(tmp_path):
    def evaluate(**target):
        return cli_main([
            "evaluate", "--benchmark", os.path.join(FIXTURES, "koala.jsonl"),
            "--output_dir", str(tmp_path / "eval"), "--bootstrap_samples", "10",
            "--strong_model", write_scenario(tmp_path / "s.json", role="strong",
                                             judge="by_instruction",
                                             log_dir=str(tmp_path / "calls")),
            "--candidate_model", write_scenario(tmp_path / "t.json", role="target",
                                                judge="by_instruction",
                                                log_dir=str(tmp_path / "calls"), **target)])
    assert evaluate() == 0
    before = snapshot(tmp_path / "eval")
    with pytest.raises(Exception, match="scripted crash"):
        evaluate(crash=True)
    assert snapshot(tmp_path / "eval") == before


# ---- credentials ------------------------------------------------------------------------

PASSWORD = "pa@ss-Wd-1234"  # holds an '@'
KEY = "QUERYKEY-98765"


def test_credentials_in_model_urls_never_leave_the_process(tmp_path, capfd):
    # A server that repeats the request's headers in its errors, 20% of the time.
    config = ServerConfig(accept_rate=0.5, fault_rate=0.2,
                          faults=("status_500", "status_503"), echo_headers_in_errors=True)
    with FakeModelServer(config) as server:
        host = server.base_url.partition("://")[2]
        strong = f"openai:strong@http://alice:{PASSWORD}@{host}/v1"
        target = f"openai:target@http://{host}/v1?key={KEY}"
        status = cli_main(["generate", "--seeds", write_seeds(tmp_path / "s.jsonl", 3),
                           "--output_dir", str(tmp_path / "out"), "--strong_model", strong,
                           "--target_model", target, "--num_examples", "3",
                           "--num_metadata", "3", "--max_retries", "0"])
    assert status == 0
    assert any(e["outcome"] != "ok" for e in server.log), "the echoing errors happened"
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    printed = "".join(capfd.readouterr())
    for secret in (PASSWORD, KEY, basic):
        assert secret not in printed
        for path in (tmp_path / "out").rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), (secret, path)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["models"]["strong"] == f"openai:strong@http://{host}/v1"
    assert manifest["options"]["target_model"] == \
        f"openai:target@http://{host}/v1?key=[REDACTED]"
    assert read_jsonl(tmp_path / "out", "dead_letter"), "errors were written, redacted"


def test_an_invalid_uri_does_not_print_its_password(tmp_path, capsys):
    status = cli_main(["generate", "--seeds", write_seeds(tmp_path / "s.jsonl", 1),
                       "--output_dir", str(tmp_path / "out"),
                       "--strong_model", f"openai:m@ftp://bob:{PASSWORD}@host/v1"])
    assert status == 2
    err = capsys.readouterr().err
    assert "openai:MODEL@http(s)://HOST/v1" in err and PASSWORD not in err


# ---- text that is not valid Unicode -------------------------------------------------------

def test_lone_surrogates_are_dead_letters_never_crashes(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in (
        "lone \ud800 here", "poem about rain", "python sorting question",
        "email to a colleague")))
    # The strong model answers anything about poems with a lone surrogate.
    for extra in ([], ["--no_cache"]):
        out = tmp_path / ("out" + "".join(extra))
        models = scripted_models(tmp_path, "strong_wins",
                                 {"strong": {"surrogate_when": "poem"}})
        assert cli_main(["generate", *generate_args(
            tmp_path, models, str(seeds), out, "--num_metadata", "3",
            "--num_examples", "3", *extra)]) == 0
        dead = read_jsonl(out, "dead_letter")
        by_stage = {(d["stage"], d["reason"]) for d in dead}
        assert ("read_seeds", "bad_input") in by_stage
        assert any(stage != "read_seeds" and reason == "schema"
                   for stage, reason in by_stage)
        assert any("lone surrogate" in d["message"] for d in dead)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["accounting"]["balanced"]


def test_nul_is_one_rule_for_seeds_and_answers(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in (
        "a NUL \u0000 here", "poem about rain", "python sorting question",
        "email to a colleague")))
    # The strong model puts NUL in every answer about poems (free text and JSON).
    models = scripted_models(tmp_path, "strong_wins", {"strong": {"nul_when": "poem"}})
    out = tmp_path / "out"
    assert cli_main(["generate", *generate_args(
        tmp_path, models, str(seeds), out, "--num_metadata", "3", "--num_examples", "3",
        "--export_format", "openai")]) == 0
    dead = read_jsonl(out, "dead_letter")
    assert {(d["stage"], d["reason"]) for d in dead if "NUL" in d["message"]} >= {
        ("read_seeds", "bad_input"), ("encode", "schema")}
    written = "".join(p.read_text() for p in out.joinpath("current").resolve().rglob(
        "*.jsonl") if "dead_letter" not in str(p))
    assert "\\u0000" not in written and "\x00" not in written
    assert json.loads((out / "manifest.json").read_text())["accounting"]["balanced"]


def test_evaluate_reads_like_generate(tmp_path, capsys):
    bench = tmp_path / "evol.jsonl"
    bench.write_text("\n".join(json.dumps(row) for row in (
        {"idx": 0, "Instruction": "[WIN] Compute 2 + 2."},
        {"idx": 1, "Skill": "Math"},  # no instruction
        {"idx": 2, "Instruction": "[LOSS] lone \ud800 surrogate"},
        {"idx": 3, "Instruction": "[WIN] Name a prime."})) + "\n")
    scripted = {role: write_scenario(tmp_path / f"{role}.json", role=role,
                                     judge="by_instruction", log_dir=str(tmp_path / "c"))
                for role in ("strong", "target")}
    status = cli_main(["evaluate", "--benchmark", str(bench), "--output_dir",
                       str(tmp_path / "out"), "--strong_model", scripted["strong"],
                       "--candidate_model", scripted["target"], "--bootstrap_samples",
                       "10"])
    assert status == 0
    dead = {d["element_id"].rpartition(":")[2]: d
            for d in read_jsonl(tmp_path / "out", "dead_letter")}
    assert set(dead) == {"2", "3"} and {d["reason"] for d in dead.values()} == {
        "bad_input"}
    assert "no 'Instruction' field" in dead["2"]["message"]
    assert "lone surrogate" in dead["3"]["message"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["candidates"][0]["overall"]["win"] == 2
    # A file whose layout cannot be told names the flag that exists.
    (tmp_path / "odd.jsonl").write_text('{"query_text": "x"}\n')
    assert cli_main(["evaluate", "--benchmark", str(tmp_path / "odd.jsonl"),
                     "--output_dir", str(tmp_path / "out2")]) == 2
    assert "--evaluate_instruction_field" in capsys.readouterr().err


# ---- guards ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("", "no rows"),
    ('{"instruction": ""}\n{"text": 5}\n', "none of its 2 rows is usable"),
])
def test_an_input_with_nothing_usable_stops_before_any_call(tmp_path, capsys, content,
                                                            message):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(content)
    assert generate(tmp_path, seeds=str(seeds)) == 2
    err = capsys.readouterr().err
    assert message in err and str(seeds) in err
    assert calls_by_kind(tmp_path) == {} and not (tmp_path / "out").exists()


def test_sizes_no_model_call_can_return_are_refused_with_the_arithmetic(tmp_path, capsys):
    assert generate(tmp_path, "--num_examples", "1000000000") == 2
    err = capsys.readouterr().err
    assert "2,000,000,000 basic instructions" in err
    assert "500,000,000 instructions per decode call" in err
    assert "raise --num_metadata to at least 31,250,000" in err
    assert generate(tmp_path, "--max_output_tokens", "128000000000") == 2
    assert "65,536" in capsys.readouterr().err
    assert calls_by_kind(tmp_path) == {}


def test_gs_paths_without_credentials_fail_within_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    started = time.monotonic()
    assert generate(tmp_path, seeds="gs://some-bucket/seeds.jsonl") == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "gcloud auth application-default login" in err
    assert "GOOGLE_APPLICATION_CREDENTIALS" in err


@pytest.mark.parametrize("command, typo, suggestion", [
    (["generate", "--seeds", "SEEDS"], "--num_exmaples", "--num_examples"),
    (["evaluate", "--benchmark", os.path.join(FIXTURES, "koala.jsonl")],
     "--candiate_model", "--candidate_model"),
    (["plan", "RUN", "--num_examples", "5"], "--num_instrucions", "--num_instructions"),
    (["split", os.path.join(FIXTURES, "koala.jsonl"), "--output_dir", "OUT"],
     "--seed_fractoin", "--seed_fraction"),
])
def test_a_mistyped_option_is_refused_with_a_suggestion(tmp_path, capsys, command, typo,
                                                        suggestion):
    argv = [str(tmp_path / "s.jsonl") if a == "SEEDS" else
            str(tmp_path) if a in ("RUN", "OUT") else a for a in command]
    write_seeds(tmp_path / "s.jsonl", 1)
    with pytest.raises(SystemExit) as exited:
        cli_main([*argv, typo, "3"])
    assert exited.value.code == 2
    assert f"unknown option {typo}; did you mean '{suggestion}'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_beam_options_still_pass_through(tmp_path):
    assert generate(tmp_path, "--direct_num_workers", "1",
                    "--direct_running_mode", "in_memory") == 0
