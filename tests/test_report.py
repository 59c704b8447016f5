"""Reports: the tailoring figure, the dataset card, and report.html rendered in a real
headless Chromium (plots decoded, no script errors, a non-blank screenshot)."""
import json
import os
import shutil
import subprocess

import pytest

from codeclm_beam.pipelines.evaluate import run as run_evaluate
from codeclm_beam.pipelines.report.figures import jensen_shannon
from codeclm_beam.pipelines.report.figures import tailoring
from tests.helpers import generate_args
from tests.helpers import run_generate
from tests.helpers import scripted_models
from tests.helpers import write_seeds
from tests.scripted_backend import write_scenario

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "benchmarks")


def test_jensen_shannon_bounds():
    assert jensen_shannon({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0.0
    assert jensen_shannon({"a": 1.0}, {"b": 1.0}) == 1.0
    assert 0 < jensen_shannon({"a": 0.9, "b": 0.1}, {"a": 0.1, "b": 0.9}) < 1


def test_tailoring_figure():
    seeds = [{"use_case": "code", "skills": ["python", "sql"]},
             {"use_case": "poem", "skills": ["rhyme"]}]
    kept = [{"use_case": "code", "skills": ["python"]},
            {"use_case": "code", "skills": ["python", "rhyme"]}]
    figure = tailoring(seeds, kept)
    assert figure["seed_skill_coverage"] == round(2 / 3, 4)
    assert 0 < figure["use_case_js_divergence"] < 1


def render(path, tmp_path):
    """(body attributes after load, screenshot path) from headless Chromium."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does "
                    "it): report.html was written but not rendered")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom",
                                  f"file://{path}"],
                         capture_output=True, text=True, timeout=120).stdout
    body = dom[dom.index("<body"):dom.index(">", dom.index("<body"))]
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}",
                            f"file://{path}"], capture_output=True, timeout=120)
    return body, shot


def assert_rendered(body, shot, plots):
    from PIL import Image
    assert f'data-plots="{plots}"' in body, body
    assert f'data-plots-decoded="{plots}"' in body, body
    assert "data-errors" not in body, body
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 50  # not a blank page


def test_generate_report_renders_in_chromium(tmp_path):
    models = scripted_models(tmp_path, "strong_wins")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 6)
    manifest = run_generate(generate_args(tmp_path, models, seeds, tmp_path / "out",
                                          "--num_metadata", "8", "--num_examples", "10",
                                          "--num_instructions", "16"))
    out = tmp_path / "out"
    assert manifest["tailoring"]["seed_skill_coverage"] == 1.0
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["tailoring"] == manifest["tailoring"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\npretty_name:") and "arXiv" not in card.split("---")[1]
    assert "@inproceedings{wang2024codeclm" in card and "## Limitations" in card
    assert "10 instruction–response pairs" in card
    html = (out / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "")  # self-contained
    body, shot = render(out / "report.html", tmp_path)
    assert_rendered(body, shot, plots=5)


def test_evaluate_report_renders_in_chromium(tmp_path):
    log = str(tmp_path / "calls")
    uris = {r: write_scenario(tmp_path / f"{r}.json", role=r, judge="by_instruction",
                              log_dir=log) for r in ("strong", "target")}
    run_evaluate(["--output_dir", str(tmp_path / "eval"), "--strong_model", uris["strong"],
                  "--candidate_model", uris["target"],
                  "--benchmark", os.path.join(FIXTURES, "vicuna.jsonl"),
                  "--benchmark", os.path.join(FIXTURES, "koala.jsonl")])
    body, shot = render(tmp_path / "eval" / "report.html", tmp_path)
    assert_rendered(body, shot, plots=1)


def test_no_report_flag(tmp_path):
    models = scripted_models(tmp_path, "strong_wins")
    seeds = write_seeds(tmp_path / "seeds.jsonl", 3)
    run_generate(generate_args(tmp_path, models, seeds, tmp_path / "out",
                               "--num_metadata", "3", "--num_examples", "3",
                               "--no_report"))
    assert not (tmp_path / "out" / "report.html").exists()
    # The card stays: it is the dataset's index (its configs name the data files).
    assert "config_name: sft" in (tmp_path / "out" / "README.md").read_text()


def test_the_report_counts_what_the_table_and_chart_show(tmp_path):
    # One model on both sides: every candidate stays within the threshold and
    # --keep_unresolved keeps the better answer; one seed's encode fails for good.
    models = scripted_models(tmp_path, "tie", {"strong": {"fail_when": "number1 "}})
    seeds = write_seeds(tmp_path / "seeds.jsonl", 3)
    manifest = run_generate(generate_args(
        tmp_path, models, seeds, tmp_path / "out", "--num_metadata", "2",
        "--num_examples", "2", "--num_instructions", "4", "--max_iterations", "1",
        "--keep_unresolved", "--max_retries", "0", "--overgenerate_margin", "2"))
    html = (tmp_path / "out" / "report.html").read_text()
    assert sum(manifest["accounting"]["dead_letters_by_stage"].values()) == 1
    assert ">1 dead letter<" in html and "1 dead letters" not in html
    assert "<code>--keep_unresolved</code>" in html
    surplus = manifest["accounting"]["candidates"]["surplus"]
    assert surplus and f"{surplus} of them cut as surplus beyond the 2 asked" in html
    # The rounds table shows the pairs --keep_unresolved kept, as the chart does.
    kept_anyway = manifest["accounting"]["candidates"]["unresolved_after_last_round"]
    assert kept_anyway and "kept anyway (<code>--keep_unresolved</code>)" in html
    assert f"<td class='n'>{kept_anyway}</td></tr>" in html
