"""A user's first hour, round two (issue 28): each thing that got in the way, reproduced
as it was found, with the behaviour the README now promises."""
import glob
import json
import os
import re
import shlex

import pytest

from codeclm_beam import metrics
from codeclm_beam.metrics import RunCounters
from codeclm_beam.pipelines.cli import main as cli_main
from codeclm_beam.pipelines.commands.plan import Pilot
from codeclm_beam.pipelines.commands.plan import plan
from codeclm_beam.pricing import run_cost
from codeclm_beam.transforms.codeclm import default_pool_size
from tests.helpers import generate_args
from tests.helpers import read_jsonl
from tests.helpers import scripted_models
from tests.helpers import write_seeds
from tests.loopback import RecordingServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# The README is the front door; the rest of what a user reads is under docs/.
DOCUMENTATION = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PRICES = {"custom:": {"input": 1.0, "cached_input": 0.1, "output": 4.0}}


def manifest_of(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---- 1. fail fast --------------------------------------------------------------------

def openai_server(models_status=200, listed=("served-model",), chat_status=200):
    """An OpenAI-compatible server as OpenAI documents it: GET /v1/models lists the
    served models; a chat request for a model it does not serve is a 404
    (`model_not_found`); a bad key is a 401 on every path."""
    def respond(method, path, body, headers):
        if path.endswith("/v1/models"):
            if models_status != 200:
                return models_status, {"error": {"message": "Incorrect API key provided",
                                                  "type": "invalid_request_error",
                                                  "code": "invalid_api_key"}}, {}
            return 200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "org"}
                for name in listed]}, {}
        if chat_status != 200 or body.get("model") not in listed:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not "
                                   "exist", "type": "invalid_request_error",
                                   "code": "model_not_found"}}, {}
        return 200, {"id": "x", "object": "chat.completion", "created": 0,
                     "model": body["model"], "choices": [{"index": 0, "finish_reason":
                     "length", "message": {"role": "assistant", "content": "p"}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                               "total_tokens": 2}}, {}
    return RecordingServer(respond)


@pytest.mark.parametrize("server, model, said", [
    (dict(models_status=401), "served-model", "refused the credentials (401)"),
    (dict(), "other-model", "does not know model 'other-model' (404); the server "
                            "serves served-model"),
])
def test_an_unauthorised_or_unknown_model_stops_generate_before_any_stage(
        tmp_path, capsys, server, model, said):
    models = scripted_models(tmp_path, "strong_wins")
    with openai_server(**server).running() as fake:
        models["target"] = f"openai:{model}@{fake.base_url}/v1"
        status = cli_main(["generate", *generate_args(
            tmp_path, models, write_seeds(tmp_path / "s.jsonl", 2), tmp_path / "out",
            "--num_examples", "2")])
    err = capsys.readouterr().err
    assert status == 2
    line, = [l for l in err.splitlines() if "--target_model" in l]
    assert said in line and f"openai:{model}@{fake.base_url}/v1" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
    # Asked once: the model list, then (not listed) one request of one token.
    chats = [r for r in fake.requests if r["path"].endswith("/chat/completions")]
    assert len(chats) <= 1 and all(c["body"]["max_tokens"] == 1 for c in chats)


def vertex_server(status: int, reason: str) -> RecordingServer:
    """Vertex AI's publishers.models.get as Google documents its errors: a google.rpc
    Status with the HTTP code, a message and the canonical status name."""
    def respond(method, path, body, headers):
        return status, {"error": {"code": status, "message": f"{reason} ({path})",
                                  "status": {403: "PERMISSION_DENIED",
                                             404: "NOT_FOUND"}[status]}}, {}
    return RecordingServer(respond)


@pytest.mark.parametrize("status, said", [
    (403, "refused the credentials (403 PERMISSION_DENIED); the account needs Vertex AI "
          "User"),
    (404, "does not know model 'gemini-9-flash' (404 NOT_FOUND)"),
])
def test_vertex_contract_the_model_check_names_refused_credentials_and_unknown_models(
        tmp_path, capsys, monkeypatch, status, said):
    monkeypatch.setenv("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-proj")
    models = scripted_models(tmp_path, "strong_wins")
    with vertex_server(status, "Permission denied" if status == 403 else
                       "Publisher Model was not found").running() as fake:
        models["judge"] = "vertex:gemini-9-flash"
        status_code = cli_main(["generate", *generate_args(
            tmp_path, models, write_seeds(tmp_path / "s.jsonl", 2), tmp_path / "out",
            "--num_examples", "2", "--model_base_url", fake.base_url)])
    err = capsys.readouterr().err
    assert status_code == 2
    line, = [l for l in err.splitlines() if "--judge_model" in l]
    assert said in line
    asked, = fake.requests  # one metadata read, no generateContent
    assert asked["method"] == "GET"
    assert asked["path"].endswith("/publishers/google/models/gemini-9-flash")


def test_a_run_whose_calls_mostly_fail_stops_with_the_reason_and_resumes(tmp_path, capsys):
    seeds = write_seeds(tmp_path / "s.jsonl", 14)
    out = tmp_path / "out"
    # The strong model refuses every encode request (a 400 each) after this point.
    failing = scripted_models(tmp_path, "strong_wins",
                              {"strong": {"fail_when": "Instruction:"}})
    status = cli_main(["generate", *generate_args(
        tmp_path, failing, seeds, out, "--num_examples", "2", "--max_retries", "0",
        "--max_concurrency", "1")])
    err = capsys.readouterr().err
    assert status == 4
    stopped, = [l for l in err.splitlines() if "stopped:" in l]
    assert "10 of the last 10 calls to custom:tests.scripted_backend" in stopped and "refused" in stopped
    assert "--max_error_share 0.5" in stopped and "resume" in stopped
    assert not (out / "manifest.json").exists()
    # The same command with the cause fixed runs to the end.
    fixed = scripted_models(tmp_path, "strong_wins")
    assert cli_main(["generate", *generate_args(
        tmp_path, fixed, seeds, out, "--num_examples", "2")]) == 0


def test_progress_shows_retries_as_they_happen_and_kept_as_delivered():
    from codeclm_beam.pipelines.run.progress import Snapshot
    from codeclm_beam.pipelines.run.progress import describe
    counters = RunCounters.from_pairs([
        ((metrics.FLOW, metrics.in_round(2, "candidates")), 4),
        ((metrics.FLOW, metrics.EXAMPLES), 4),  # all unresolved, kept anyway
        ((metrics.model_namespace("judge", "m"), "elements"), 8)])
    line = describe(Snapshot(counters, {}, 30.0, None, (3, (4.0, "m: 503 busy"))), 4, 20)
    assert "kept 4/4" in line
    assert "retries 3 (last 0m04s ago: m: 503 busy)" in line
    assert "kept" not in describe(Snapshot(counters, {}, 1.0), None, None)


# ---- 2. usage that survives the cache -------------------------------------------------

def test_a_cached_rerun_keeps_what_its_answers_cost(tmp_path, capsys):
    seeds = write_seeds(tmp_path / "s.jsonl", 4)
    models = scripted_models(tmp_path, "half")
    out = tmp_path / "out"
    args = generate_args(tmp_path, models, seeds, out, "--num_examples", "4",
                         "--num_metadata", "2")
    assert cli_main(["generate", *args]) == 0
    first = manifest_of(out)
    assert cli_main(["generate", *args, "--export_format", "openai"]) == 0
    printed = capsys.readouterr().out
    again = manifest_of(out)
    paid, now = first["model_calls"]["totals"], again["model_calls"]["totals"]
    assert paid["requests"] > 0 and now["requests"] == 0
    assert now["paid_before_requests"] == paid["requests"]
    for kind in metrics.TOKEN_KINDS:
        assert now[kind] == 0 and now[f"paid_before_{kind}"] == paid[kind]
    # The money: what the first run paid, the re-run paid before.
    cost_then = run_cost(first["model_calls"]["by_stage"], {}, PRICES)
    cost_now = run_cost(again["model_calls"]["by_stage"], {}, PRICES)
    assert cost_now["usd"] == 0 and cost_now["usd_before"] == cost_then["usd"] > 0
    assert "paid before" in printed
    # plan projects the same from either run.
    from_first = plan(Pilot.from_manifest(first), num_examples=1000, prices=PRICES)
    from_rerun = plan(Pilot.from_manifest(again), num_examples=1000, prices=PRICES)
    for figure in ("total_requests", "total_tokens", "cost_usd"):
        assert from_rerun[figure] == from_first[figure] and from_first[figure]
    html = (out / "report.html").read_text()
    assert "paid before" in html and "cost paid before" in html


# ---- 3. --preview and the pool sized to the run ----------------------------------------

def test_the_default_pool_scales_with_the_run():
    assert [default_pool_size(b) for b in (4, 40, 2000, 4000, 200_000)] == \
        [1, 4, 200, 200, 3125]


def test_preview_runs_every_stage_on_a_few_pairs_and_promotes_nothing(tmp_path, capsys):
    seeds = write_seeds(tmp_path / "s.jsonl", 6)
    models = scripted_models(tmp_path, "strong_wins")
    out = tmp_path / "out"
    status = cli_main(["generate", *generate_args(tmp_path, models, seeds, out,
                                                  "--preview", "2")])
    printed = capsys.readouterr().out
    assert status == 0
    assert re.search(r"--preview: 2 of 2 pairs in [\d.]+ s from 2 seeds \(of 6\), a pool "
                     r"of \d+ entries", printed)
    assert printed.count("      answer (strong, judged") == 2
    # Nothing committed: the folder holds the cache and the lock file, nothing else.
    assert sorted(p.name for p in out.iterdir()) == [".lock", "cache"]
    assert any((out / "cache").rglob("*.json"))
    # A judge that separates nothing (one model on both sides): the preview says what
    # to add rather than only "0 of 2".
    tie = tmp_path / "tie"
    tie.mkdir()
    models = scripted_models(tie, "tie")
    cli_main(["generate", *generate_args(tie, models, seeds, tie / "out", "--preview", "2")])
    printed = capsys.readouterr().out
    assert "0 of 2 pairs" in printed and "--keep_unresolved keeps the better answer" in \
        printed


# ---- 4. README commands run as written -------------------------------------------------

def readme_block(after: str, page: str = README) -> str:
    """The first ```bash block after the line holding `after`, as one command line."""
    text = open(page).read()
    block = text[text.index(after):].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ")


@pytest.mark.parametrize("page", [README, os.path.join(ROOT, "docs", "dataflow.md")],
                         ids=["README", "docs/dataflow.md"])
def test_the_readme_dataflow_dry_run_runs_offline_as_written(capsys, monkeypatch, page):
    monkeypatch.chdir(ROOT)  # the README runs from a checkout (--setup_file ./setup.py)
    words = shlex.split(readme_block("# Run on Dataflow", page))
    assert words[:2] == ["codeclm-beam", "generate"]
    assert cli_main(["generate", *words[2:], "--dry_run=True", "--no_auth"]) == 0
    assert "job built and validated, not submitted" in capsys.readouterr().out
    # A placeholder that is no bucket name is refused at once, naming the flag.
    words = [w.replace("my-bucket", "MY_BUCKET") for w in words]
    assert cli_main(["generate", *words[2:], "--dry_run=True", "--no_auth"]) == 2
    assert "--seeds gs://MY_BUCKET/seeds.jsonl: 'MY_BUCKET' is not a Cloud Storage " \
           "bucket name" in capsys.readouterr().err


def test_the_readme_flex_template_parameters_name_models_its_image_can_run():
    from codeclm_beam.model.errors import ConfigurationError
    from codeclm_beam.pipelines.commands.templates import template_argv
    line = readme_block("## Flex Template", os.path.join(ROOT, "docs", "dataflow.md"))
    parameters = re.search(r"--parameters (\S+)", line).group(1).split(",")
    argv = [f"--{p}" for p in parameters]
    assert template_argv(argv) == argv
    without_target = [a for a in argv if not a.startswith("--target_model=")]
    with pytest.raises(ConfigurationError, match="target_model=llamacpp:smollm2-135m: "
                                                 "the Flex Template's image has no llama"):
        template_argv(without_target)


def test_jobs_list_without_credentials_is_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud application-default file
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # not on Google Cloud
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    assert cli_main(["jobs", "list", "--project", "my-project"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("codeclm-beam jobs: error: the Dataflow API needs Google Cloud "
                          "credentials") and "\n" not in err


# ---- 7. the demo's first screen and `show` ---------------------------------------------

def test_a_judge_that_separated_nothing_is_said_first_and_show_opens_on_a_kept_pair(
        tmp_path, capsys):
    seeds = write_seeds(tmp_path / "s.jsonl", 3)
    models = scripted_models(tmp_path, "tie")
    out = tmp_path / "out"
    assert cli_main(["generate", *generate_args(
        tmp_path, models, seeds, out, "--num_examples", "2", "--num_metadata", "2",
        "--max_iterations", "2", "--keep_unresolved")]) == 0
    printed = capsys.readouterr().out
    assert "note: the judge separated none of the" in printed
    assert "pairs are unresolved candidates kept by --keep_unresolved" in printed
    html = (out / "report.html").read_text()
    first_card = html[html.index("What you got"):html.index("What it cost")]
    assert "The judge separated none of the" in first_card
    assert cli_main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    kept_ids = {e["example_id"] for e in read_jsonl(out, "examples")}
    assert shown.startswith("kept pair ") and shown.split()[2] in kept_ids


def test_evaluate_builds_without_beams_yield_and_return_warning():
    from apache_beam.transforms.core import _check_fn_use_yield_and_return

    from codeclm_beam.transforms.evaluate import contests
    assert not _check_fn_use_yield_and_return(contests)


def readme_commands() -> list[str]:
    """Every `codeclm-beam ...` line of the README's and the docs' bash blocks,
    continuations joined, comments and [optional] parts dropped."""
    text = "\n".join(open(page).read() for page in DOCUMENTATION)
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", re.sub(r"\[[^\]]*\]", "", line)).strip()
            if line.startswith("codeclm-beam "):
                lines.append(line)
    return lines


def test_the_readme_commands_that_need_no_cloud_run_as_written(tmp_path, capsys,
                                                               monkeypatch):
    """split, plan and show as the README writes them, in a folder laid out as the
    README assumes (a benchmark file, a pilot run, the demo's output)."""
    monkeypatch.chdir(tmp_path)
    # Vicuna's layout at its size (80 questions in categories of 10), so that a 20%
    # split leaves rows on both sides, as the real file does.
    with open("vicuna.jsonl", "w") as f:
        for qid in range(1, 81):
            f.write(json.dumps({"question_id": qid, "category": f"c{qid % 8}",
                                "turns": [f"[WIN] Question {qid} of the benchmark?"]})
                    + "\n")
    seeds = write_seeds(tmp_path / "pilot_seeds.jsonl", 6)
    models = scripted_models(tmp_path, "half")
    for run in ("out/pilot", "out/demo"):
        assert cli_main(["generate", *generate_args(tmp_path, models, seeds, run,
                                                    "--num_examples", "6")]) == 0
    capsys.readouterr()
    ran = []
    for line in readme_commands():
        words = shlex.split(line)[1:]
        if words[0] in ("split", "plan", "show"):
            # `show out/demo c9c4efbf` names one record of the README's own run.
            if words[0] == "show" and len(words) > 2:
                words[2] = read_jsonl("out/demo", "examples")[0]["example_id"][:8]
            assert cli_main(words) == 0, line
            ran.append(words[0])
    assert sorted(ran) == ["plan", "show", "show", "split", "split"]
    assert os.path.exists("data/vicuna/vicuna.seeds.jsonl")
