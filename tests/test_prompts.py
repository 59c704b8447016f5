"""Every prompt carries every element the paper's prompt has (../shared/codeclm-method.md,
"What each of the paper's prompts contains"), asserted on the rendered messages: a
template that loses one fails here."""
import json

import pytest

from codeclm_beam.pipelines.cli import main as cli_main
from codeclm_beam.pipelines.commands.prompts import stage_prompts
from codeclm_beam.transforms.prompt_templates import PromptTemplate
from codeclm_beam.records import normalize_skill
from codeclm_beam.records import normalize_skills

# Prompt name -> its messages on the stage's own sample.
STAGES = {name: (lambda stage=stage, sample=sample: stage.prompt(sample))
          for name, (stage, sample) in stage_prompts().items()}

# Stage -> phrases its rendered prompt must contain (case-insensitive), one per element.
ELEMENTS = {
    "encode": [
        "instruction analyser",                        # role
        "use case", "skills (or knowledge)",           # what it asks for
        "no explanation",
        "at most 3 skills",                            # max skills
        "transferable",
        'never use the words "skill" or "knowledge"',  # the ban
        "2-3 words",
    ],
    "decode": [
        "instruction writer",                          # role
        "write 5 new instructions",                    # the count
        "reasonable", "humans can understand and answer",
        "diverse enough",
        "use case: code generation", "skills needed to respond: sql, data analysis",
        "without answering them",
    ],
    "rubrics": [
        "instruction judge with domain expertise",     # role
        "generate 4 domain-specific rubrics",
        "difficulty and complexity",
        "clear, concise and unambiguous",
        "corresponding action", "more challenging",
        "use case: code generation", "skills: sql, data analysis",
        "no explanation",
    ],
    "improve": [
        "instruction improver with domain expertise",  # role
        "more challenging by following the action",
        "reasonable and self-consistent",
        "must not copy the action's words or phrases",
        "use case: code generation", "skills: sql, data analysis",
        "require the query to handle customers with no orders",  # the action itself
    ],
    "judge_filter": [
        "[question]", "[the start of assistant 1's answer]",
        "[the end of assistant 1's answer]", "[the start of assistant 2's answer]",
        "[the end of assistant 2's answer]",
        "helpfulness, relevance, accuracy and level of detail",
        "scale of 1 to 10", "higher score indicates better",
        "order in which the answers were presented does not affect",
        "output only the two scores",
    ],
    "judge_eval": [
        "[question]", "[the start of assistant 1's answer]",
        "[the start of assistant 2's answer]",
        "helpfulness, relevance, accuracy and level of detail",
        "scale of 1 to 10", "higher score indicates better",
        "order in which the answers were presented does not affect",
        "two scores first", "then a comprehensive explanation",
    ],
}


@pytest.mark.parametrize("stage", sorted(ELEMENTS))
def test_each_prompt_carries_every_element(stage):
    text = "\n".join(m.content for m in STAGES[stage]()).lower()
    missing = [element for element in ELEMENTS[stage] if element.lower() not in text]
    assert not missing, f"{stage} prompt lost: {missing}"


def test_a_template_that_loses_an_element_is_caught():
    template = PromptTemplate.load("rubrics")
    broken = PromptTemplate.parse("rubrics", "[user]\n" + template.user.replace(
        " Each rubric must be clear, concise and unambiguous.", ""))
    text = broken.user.format(num_rubrics=4, use_case="x", skills="y").lower()
    assert "clear, concise and unambiguous" not in text


def test_encode_is_few_shot_with_the_papers_three_demonstrations():
    messages = STAGES["encode"]()
    assert [m.role for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    answers = [json.loads(m.content) for m in messages if m.role == "assistant"]
    assert answers == [
        {"use_case": "creative writing", "skills": ["role-play", "sports"]},
        {"use_case": "code generation", "skills": ["python"]},
        {"use_case": "general knowledge question answering",
         "skills": ["academic writing", "machine learning"]}]
    asked = [m.content for m in messages if m.role == "user"]
    assert "sports commentator" in asked[0] and "winning play" in asked[0]
    assert "very large file" in asked[1] and "Python" in asked[1]
    assert "hierarchical encoder" in asked[2] and "cascaded selectors" in asked[2]
    assert "SQL query" in asked[3]


def test_the_rubrics_prompt_has_no_example_actions():
    text = "\n".join(m.content for m in STAGES["rubrics"]()).lower()
    for example in ("swot", "competitor", "for example", "e.g.", "such as"):
        assert example not in text


def test_every_zero_shot_prompt_is_zero_shot():
    for stage in ("decode", "rubrics", "improve", "judge_filter", "judge_eval", "answer"):
        assert "assistant" not in [m.role for m in STAGES[stage]()], stage


def test_prompts_command_prints_every_stage(capsys):
    assert cli_main(["prompts"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"===== {stage} =====" in out
    assert cli_main(["prompts", "improve"]) == 0
    assert "instruction improver" in capsys.readouterr().out


@pytest.mark.parametrize("written, normalised", [
    ("knowledge of python", "python"),
    ("Python programming skills", "python programming"),
    ("Knowledge in market research", "market research"),
    ("in-depth understanding of machine learning", "machine learning"),
    ("strong communication skills", "communication"),
    ("experience with Docker", "docker"),
    ("ability to write SQL queries", "write sql queries"),
    ("  Role-play. ", "role-play"),
    ("natural language understanding", "natural language understanding"),
    ("user experience design", "user experience design"),
    ("deep learning", "deep learning"),
    ("skills", ""),
    ("knowledge", ""),
    ("Skills in creative writing and storytelling for children",
     "creative writing storytelling"),
    ("design of relational database schemas", "design relational database"),
])
def test_skills_are_named_not_described(written, normalised):
    assert normalize_skill(written) == normalised


def test_skills_are_deduplicated_and_capped():
    assert normalize_skills(["Python", "knowledge of python", "SQL skills", "statistics",
                             "writing"], 3) == ("python", "sql", "statistics")
