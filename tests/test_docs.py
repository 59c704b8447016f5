"""The README is the front door to docs/: every link it holds leads somewhere, and its
map names every page. (The pages' own links are checked by `make docs`, strict.)"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_links() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if not target.startswith(("http://", "https://"))]


def test_every_link_of_the_readme_leads_to_a_file_of_the_checkout():
    links = readme_links()
    assert links
    missing = [link for link in links
               if not os.path.isfile(os.path.join(ROOT, link.split("#", 1)[0]))]
    assert missing == []


def test_the_readme_map_names_every_page_of_the_documentation():
    pages = {f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs"))
             if name.endswith(".md")}
    linked = {link.split("#", 1)[0] for link in readme_links()}
    assert pages - linked == set()


def test_the_readme_pipeline_example_runs_as_written_with_its_models_swapped(tmp_path):
    # The scripted backend in place of the two model URIs, a temporary folder in place
    # of out/mine: the rest runs as a user pastes it.
    from tests.helpers import read_jsonl
    from tests.helpers import scripted_models
    models = scripted_models(tmp_path, "strong_wins")
    text = open(os.path.join(ROOT, "README.md")).read()
    code = text[text.index("## Using single stages in your own pipeline"):]
    code = code.split("```python\n", 1)[1].split("```", 1)[0]
    for written, swapped in (('"vertex:gemini-2.5-flash"', repr(models["strong"])),
                             ('"openai:my-7b@http://127.0.0.1:8000/v1"',
                              repr(models["target"])),
                             ("out/mine", str(tmp_path / "mine"))):
        assert written in code
        code = code.replace(written, swapped)
    exec(compile(code, "README.md", "exec"), {})
    pairs = read_jsonl(tmp_path / "mine", "pairs")
    assert [p["instruction"] for p in pairs] == [
        "Explain HTTP/3 to a CTO in three paragraphs."]
    assert pairs[0]["response_source"] == "strong"
    assert read_jsonl(tmp_path / "mine", "dead_letter") == []
