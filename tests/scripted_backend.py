"""A scripted, deterministic model backend for pipeline-logic tests (tests only).

Used through the model layer's extension point, `custom:tests.scripted_backend:
ScriptedBackend@SCENARIO.json`, so everything above the wire (RunInference, retries,
cache, quotas, metrics, stages) is the real code. The scenario file says which role the
backend plays and how the judge scores; every call is appended to a log file per process
so tests can count calls across the multi-processing DirectRunner's workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time

from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.errors import TransientModelError
from codeclm_beam.model.types import Usage

STRONG_PREFIX = "STRONG ANSWER:"
TARGET_PREFIX = "TARGET ANSWER:"


def _with_nul(data):
    if isinstance(data, str):
        return data + "\x00"
    if isinstance(data, list):
        return [_with_nul(v) for v in data]
    if isinstance(data, dict):
        return {k: _with_nul(v) for k, v in data.items()}
    return data


def write_scenario(path, **scenario) -> str:
    with open(path, "w") as f:
        json.dump(scenario, f)
    return f"custom:tests.scripted_backend:ScriptedBackend@{path}"


def read_calls(log_dir) -> list[dict]:
    calls = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith("calls-"):
            with open(os.path.join(log_dir, name)) as f:
                calls.extend(json.loads(line) for line in f if line.strip())
    return sorted(calls, key=lambda call: call["time"])


class ScriptedBackend(Backend):
    def __init__(self, config):
        with open(config.spec.base_url) as f:
            self.scenario = json.load(f)
        self.role = self.scenario.get("role", "strong")
        self.log_dir = self.scenario["log_dir"]
        os.makedirs(self.log_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._failures_left = dict(self.scenario.get("fail_first", {}))
        if self.scenario.get("crash"):
            raise RuntimeError("scripted crash: the model cannot be loaded")

    def _log(self, kind, request):
        line = json.dumps({"kind": kind, "role": self.role, "pid": os.getpid(),
                           "time": time.time(), "id": request.request_id,
                           "max_output_tokens": request.settings.max_output_tokens,
                           "key": request.cache_key("scripted"),
                           "prompt": request.messages[-1].content})
        with self._lock, open(os.path.join(self.log_dir, f"calls-{os.getpid()}.jsonl"),
                              "a") as f:
            f.write(line + "\n")

    def generate(self, request) -> RawAnswer:
        schema = request.json_schema or {}
        props = schema.get("properties", {})
        kind = ("encode" if "use_case" in props else
                "rubrics" if "rubrics" in props else
                "decode" if "instructions" in props else
                "improve" if "instruction" in props else
                "judge" if "assistant_1_score" in props else
                "answer" if not schema else "other")
        self._log(kind, request)
        delay = self.scenario.get("latency_s", 0)
        if delay:
            time.sleep(delay)
        user = request.messages[-1].content
        with self._lock:
            left = self._failures_left.get(kind, 0)
            if left:
                self._failures_left[kind] = left - 1
        if left:
            raise TransientModelError("scripted 503", status=503)
        if self.scenario.get("fail_when") and self.scenario["fail_when"] in user:
            raise PermanentModelError("scripted 400", status=400)
        data = getattr(self, "_" + kind)(request, user, schema)
        text = data if isinstance(data, str) else json.dumps(data)
        if self.scenario.get("surrogate_when") and self.scenario["surrogate_when"] in user:
            text = text + " \ud800"  # a lone surrogate, as a broken server may send
        if self.scenario.get("nul_when") and self.scenario["nul_when"] in user:
            # NUL in free text, and escaped inside a JSON answer's strings.
            text = (text + "\x00" if isinstance(data, str)
                    else json.dumps(_with_nul(data)))
        return RawAnswer(text, "STOP", Usage(prompt_tokens=len(user) // 4 + 1,
                                             completion_tokens=len(text) // 4 + 1))

    def _encode(self, request, user, schema):
        with self._lock:
            unusable = self.scenario.get("unusable_encode_first", 0)
            self.scenario["unusable_encode_first"] = max(0, unusable - 1)
        if unusable:  # schema-valid, but no skill survives the stage's rules
            return {"use_case": "writing", "skills": ["knowledge", "skills"]}
        instruction = user.split("Instruction:\n", 1)[1].split("\n\nGive exactly")[0]
        words = re.findall(r"[a-z]+", instruction.lower())
        topic = words[0] if words else "general"
        max_skills = schema["properties"]["skills"]["maxItems"]
        skills = [f"{w} Skills" for w in words[1:1 + max_skills]] or ["knowledge", "writing"]
        return {"use_case": f"  {topic.upper()} Tasks ", "skills": skills}

    def _rubrics(self, request, user, schema):
        n = schema["properties"]["rubrics"]["minItems"]
        return {"rubrics": [{"rubric": f"rubric {i}", "action": f"add constraint {i}"}
                            for i in range(n)]}

    def _decode(self, request, user, schema):
        n = schema["properties"]["instructions"]["minItems"]
        use_case = re.search(r"(?i)use case: (.*)", user).group(1)
        # Each names its own subject: instructions that differ by a number alone are
        # near duplicates, and deduplication would keep one of them.
        # (of its entry: two entries of one use case differ by their skills).
        instructions = [f"Do {use_case} task number {i} on {_subject(user, i)}."
                        for i in range(n)]
        # Planted duplicates: every k-th instruction repeats the one before it, in
        # other case and punctuation, or with a word more (a near duplicate).
        every = self.scenario.get("duplicate_every")
        for i in range(every - 1, n, every) if every else ():
            before = instructions[i - 1]
            instructions[i] = (before.upper() + "!!" if (i // every) % 2 == 0
                               else "Please " + before.lower())
        planted = self.scenario.get("decode_plants")
        if planted:  # a benchmark question, copied as a strong model might
            instructions[0] = planted
        return {"instructions": instructions}

    def _improve(self, request, user, schema):
        instruction = user.split("Instruction:\n", 1)[1].split("\n\nAction:")[0]
        action = user.split("Action:\n", 1)[1].split("\n")[0]
        return {"instruction": f"{instruction} Also: {action}."}

    def _answer(self, request, user, schema):
        prefix = STRONG_PREFIX if self.role == "strong" else TARGET_PREFIX
        quoted = self.scenario.get("answer_quotes")
        if quoted and _first_time(os.path.join(self.log_dir, "quoted")):
            # The first answer of the run (of any worker) quotes this, as if from memory.
            return f"{prefix} {user[:60]} As asked elsewhere: {quoted}"
        return f"{prefix} {user[:60]}"

    def _judge(self, request, user, schema):
        scores = self._scores(user)
        if "explanation" in schema["properties"]:
            scores["explanation"] = (f"Assistant 1 scored {scores['assistant_1_score']}, "
                                     f"Assistant 2 {scores['assistant_2_score']}.")
        return scores

    def _scores(self, user):
        first = user.split("[The Start of Assistant 1's Answer]\n", 1)[1]
        strong_first = first.startswith(STRONG_PREFIX)
        if self.scenario.get("judge") == "by_instruction":
            return self._judge_by_instruction(user, strong_first)
        if self.scenario.get("judge") == "by_marker":
            second = user.split("[The Start of Assistant 2's Answer]\n", 1)[1]
            return {"assistant_1_score": _marker_score(first),
                    "assistant_2_score": _marker_score(second)}
        verdict = self.scenario.get("judge", "tie")
        if verdict == "half":
            # About half the instructions are separated, the others tie: a fixed
            # half, by the instruction's hash, so improving one redraws it.
            question = user.split("[Question]\n", 1)[1].split("\n\n[The Start")[0]
            digest = hashlib.sha256(question.encode()).digest()[0]
            verdict = "strong_wins" if digest % 2 == 0 else "tie"
        strong, target = {"strong_wins": (9, 2), "tie": (6, 6),
                          "target_wins": (2, 9)}[verdict]
        if strong_first:
            return {"assistant_1_score": strong, "assistant_2_score": target}
        return {"assistant_1_score": target, "assistant_2_score": strong}

    def _judge_by_instruction(self, user, strong_first):
        """The question names the verdict: [WIN]/[LOSS] for the target (candidate) in
        both orders, [FIRST]/[SECOND] for whichever answer stands first/second (position
        bias: a tie after the swap), [EQUAL] for equal scores."""
        question = user.split("[Question]\n", 1)[1].split("\n\n[The Start")[0]
        high, low = 9, 3
        if "[WIN]" in question or "[LOSS]" in question:
            target_wins = "[WIN]" in question
            target, strong = (high, low) if target_wins else (low, high)
            first, second = (strong, target) if strong_first else (target, strong)
        elif "[FIRST]" in question:
            first, second = high, low
        elif "[SECOND]" in question:
            first, second = low, high
        else:
            first, second = 5, 5
        return {"assistant_1_score": first, "assistant_2_score": second}

    def _other(self, request, user, schema):
        return {k: 1 for k in schema.get("properties", {})} if schema else "ok"


def _first_time(flag: str) -> bool:
    """True for the first caller in any process: the one that creates `flag`."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


_SUBJECT_WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet",
                  "harbor", "iris", "juniper", "kestrel", "lagoon", "meadow", "nectar",
                  "orchid", "prairie", "quartz", "raven", "sierra", "tundra", "umber",
                  "violet", "willow", "yarrow", "zephyr", "aurora", "bramble", "cobalt")


def _subject(prompt: str, i: int) -> str:
    """Six words of its own for decode's i-th instruction of a prompt."""
    digest = hashlib.sha256(f"{prompt}/{i}".encode()).digest()
    return " ".join(f"{_SUBJECT_WORDS[b % len(_SUBJECT_WORDS)]}{b % 13}" for b in digest[:6])


def _marker_score(answer: str) -> int:
    """`by_marker` judging: an answer that says TUNED is good, BASE is poor, anything
    else (the reference) in between."""
    answer = answer.split("\n\n[The End", 1)[0]
    return 9 if "TUNED" in answer else 2 if "BASE" in answer else 5
