"""A model server on 127.0.0.1 for measurement and fault-tolerance tests.

It speaks the OpenAI-compatible chat API (`POST /v1/chat/completions`) and Vertex AI's
`generateContent` REST path, and behaves like a paid, imperfect service:

- latency drawn from a lognormal distribution (mean and spread set), or given by its
  median and 99th percentile, drawn per request content and delivery (seeded: the
  same run waits as long on every repeat);
- quotas in requests and tokens per minute (sliding 60 s window; tokens are a
  request's input tokens, as Vertex AI's `generate_content_input_tokens_per_minute_per_
  base_model` counts them), answering 429 when exceeded: `RESOURCE_EXHAUSTED` with a
  `google.rpc.RetryInfo` detail on Vertex AI's path, `Retry-After` on OpenAI's;
- injected faults at set rates: 500/503, hangs past the client's timeout, dropped
  connections, malformed or truncated JSON bodies, answers that violate the schema;
- answers that satisfy the requested JSON schema (for the subset of JSON Schema the
  pipeline uses), deterministic in the request, so a retried request gets the same
  answer;
- judge scores that make a chosen share of instructions "accepted": the answer of the
  model named `strong_model` gets 9 and the other 2 for those, both 5 otherwise;
- Gemini thinking as Vertex AI documents it for the 2.5 and 3 families (`VERTEX_MODELS`):
  each family's budget ranges, levels and defaults, 400 INVALID_ARGUMENT for a setting
  the model does not take or for budget and level together, thought tokens that count
  against `maxOutputTokens` (when they use it up: `finishReason: MAX_TOKENS` and a
  candidate with no text parts), `thoughtsTokenCount` in `usageMetadata` apart from
  `candidatesTokenCount`; and OpenAI-style reasoning (`reasoning_effort`) whose tokens
  count inside `completion_tokens` and `completion_tokens_details.reasoning_tokens`,
  with `finish_reason: length` at the limit;
- Vertex AI batch prediction (`batchPredictionJobs`: create, get, list, cancel) over Cloud
  Storage (a real emulator, through google-cloud-storage and STORAGE_EMULATOR_HOST):
  a job reads its JSONL input, stays JOB_STATE_PENDING, then RUNNING, answers each
  line exactly as generateContent would (the same answers) and writes
  `predictions.jsonl` (`status`, `processed_time`, `request`, `response` per line,
  in no particular order) under `outputInfo.gcsOutputDirectory`; it ends SUCCEEDED,
  PARTIALLY_SUCCEEDED (some lines carry an error `status`) or FAILED (`error`), and a
  cancelled job exports the lines it finished. Faults on demand (`batch_fault`): fail,
  partial, stuck (pending until cancelled), malformed (one output line cut), schema
  (some answers ignore their JSON schema, as users report of batch mode);
- Vertex AI tuning jobs (`tuningJobs`: create, get, list with a labels filter, cancel)
  over Cloud Storage: a job checks its request (base model and kind of tuning, gs://
  files, adapter size, labels: 400 INVALID_ARGUMENT), stays PENDING, then RUNNING
  while it reads and checks its JSONL line by line (a bad line, or a file over the
  documented limits, fails the job with the line and the reason), reports its data
  statistics and the hyperparameters it chose, and ends SUCCEEDED with the tuned model
  deployed to an endpoint (`endpoints.get`, and generateContent there: answers under
  the endpoint's name that the judge scores as the strong model's on
  `tuned_recovery` of the questions it separates), FAILED (`tuning_fault="fail"`) or,
  cancelled, CANCELLED; an ended job cannot be cancelled (400 FAILED_PRECONDITION);
- totals of the tokens it reported (`usage`), to check a client's accounting against;
- a log of every request with its outcome; and it stops by itself after a request count
  or a time limit.

    python benchmarks/fake_model_server.py --port 8700 --rpm 600 --latency_mean 0.5 \\
        --fault_rate 0.2 --max_seconds 300
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import random
import statistics
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any, Optional, Sequence

FAULTS = ("status_500", "status_503", "hang", "drop", "malformed", "truncated", "schema",
          "html")
BATCH_FAULTS = ("fail", "partial", "stuck", "malformed", "schema")
_BATCH_PATH = re.compile(r"/projects/([^/]+)/locations/([^/]+)/batchPredictionJobs"
                         r"(?:/([^/:]+))?(:cancel)?$")
_VERTEX_MODEL_PATH = re.compile(r"/publishers/google/models/([^/:]+)$")
_VERTEX_PATH = re.compile(r"/projects/[^/]+/locations/([^/]+)/publishers/google/models/"
                          r"([^/:]+):generateContent$")
_TUNING_PATH = re.compile(r"/projects/([^/]+)/locations/([^/]+)/tuningJobs"
                          r"(?:/([^/:]+))?(:cancel)?$")
# A tuned model's endpoint: endpoints.get, and its generateContent.
_ENDPOINT_PATH = re.compile(r"/projects/([^/]+)/locations/([^/]+)/endpoints/([^/:]+)"
                            r"(:generateContent)?$")
# Flex PayGo: a generateContent request with this header is served from shared
# capacity at half price, on the global endpoint only.
FLEX_HEADER = "X-Vertex-AI-LLM-Shared-Request-Type"
_WORDS = ("model data answer quality pipeline beam token judge instruction response "
          "metadata rubric action skill use case strong target improve filter").split()


@dataclasses.dataclass(frozen=True)
class VertexModel:
    """A Gemini family's thinking, as Google's model pages describe it."""
    budget_range: Optional[tuple[int, int]]  # positive budgets it takes (2.5)
    can_switch_off: bool
    levels: tuple[str, ...]  # thinking levels it takes (3)
    default: str  # "dynamic", "off" or a level


# Model name prefix -> documented thinking; most specific first. A model not listed
# here does not think, and its thinkingConfig is ignored.
VERTEX_MODELS = (
    ("gemini-2.5-flash-lite", VertexModel((512, 24576), True, (), "off")),
    ("gemini-2.5-flash", VertexModel((1, 24576), True, (), "dynamic")),
    ("gemini-2.5-pro", VertexModel((128, 32768), False, (), "dynamic")),
    ("gemini-3-flash", VertexModel(None, False, ("MINIMAL", "LOW", "MEDIUM", "HIGH"),
                                   "HIGH")),
    ("gemini-3-pro", VertexModel(None, False, ("LOW", "HIGH"), "HIGH")),
)
# Documented output limit of these models, and the default when none is asked.
VERTEX_MAX_OUTPUT_TOKENS = 65536
# Thought tokens spent at each depth: (least, most), drawn per request. Google gives
# no token counts for levels; these only need to be plausible and large enough that
# a few dozen output tokens cannot hold them.
THINKING_SPAN = {"dynamic": (300, 2000), "MINIMAL": (0, 60), "LOW": (100, 600),
                 "MEDIUM": (600, 2000), "HIGH": (1500, 5000)}
OPENAI_REASONING_SPAN = {"none": (0, 0), "minimal": (0, 60), "low": (100, 600),
                         "medium": (600, 2000), "high": (1500, 5000)}


class InvalidArgument(Exception):
    """What Vertex AI answers with 400 INVALID_ARGUMENT."""


def vertex_model(model: str) -> Optional[VertexModel]:
    for prefix, card in VERTEX_MODELS:
        if model.startswith(prefix):
            return card
    return None


def vertex_thinking_depth(model: str, thinking_config: dict) -> tuple[str, Optional[int]]:
    """(depth, budget cap) of one request, or InvalidArgument. Depth is "off",
    "dynamic" or a level; the cap is an explicit 2.5 budget."""
    card = vertex_model(model)
    budget = thinking_config.get("thinkingBudget")
    level = thinking_config.get("thinkingLevel")
    if card is None:
        return "off", None
    if budget is not None and level is not None:
        raise InvalidArgument("thinking_budget and thinking_level cannot both be set")
    if level is not None:
        if not card.levels:
            raise InvalidArgument(f"thinking_level is not supported by {model}; use "
                                  "thinking_budget")
        if str(level).upper() not in card.levels:
            raise InvalidArgument(f"thinking_level {level} is not supported by {model}")
        return str(level).upper(), None
    if budget is not None:
        budget = int(budget)
        if card.levels:  # Gemini 3 accepts budgets for backwards compatibility
            return ("dynamic", None) if budget < 0 else ("dynamic", budget)
        if budget == -1:
            return "dynamic", None
        if budget == 0:
            if not card.can_switch_off:
                raise InvalidArgument(f"Budget 0 is invalid. {model} only works in "
                                      "thinking mode.")
            return "off", None
        low, high = card.budget_range
        if not low <= budget <= high:
            raise InvalidArgument(f"The thinking budget {budget} is invalid. Please "
                                  f"choose a value between {low} and {high}.")
        return "dynamic", budget
    return card.default, None


def thought_tokens(depth: str, budget: Optional[int], key: int) -> int:
    if depth == "off":
        return 0
    low, high = THINKING_SPAN[depth]
    spent = low + key % (high - low + 1)
    return spent if budget is None else min(spent, budget)


@dataclasses.dataclass
class ServerConfig:
    latency_mean: float = 0.0  # seconds; 0 answers at once
    latency_sigma: float = 0.5  # lognormal spread
    # Or a long tail given as users see it: the median and the 99th percentile of a
    # lognormal (3 s and 30 s: half the answers within 3 s, one in a hundred over 30 s).
    latency_median: Optional[float] = None
    latency_p99: Optional[float] = None
    rpm: Optional[float] = None
    tpm: Optional[float] = None
    # Each model its own quota, as Vertex AI's are per base model; else one for all.
    quota_per_model: bool = False
    # A capacity that changes while the server runs, as a dynamic shared quota does
    # (Vertex AI's Standard PayGo): ((seconds since start, requests per minute), ...),
    # served as a token bucket holding `capacity_burst_s` of it. A request over it is
    # answered 429 RESOURCE_EXHAUSTED at once and with no Retry-After, as Vertex AI
    # answers when shared capacity runs out (its docs ask for backoff instead).
    capacity_schedule: tuple[tuple[float, float], ...] = ()
    capacity_burst_s: float = 1.0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    hang_seconds: float = 30.0
    accept_rate: float = 0.5  # share of instructions the judge separates clearly
    strong_model: str = "strong"
    # What GET /v1/models lists (chat requests are answered under any name).
    served_models: tuple[str, ...] = ("strong", "target", "judge", "m")
    answer_words: int = 40
    max_requests: Optional[int] = None
    max_seconds: Optional[float] = None
    seed: int = 0
    echo_headers_in_errors: bool = False  # a careless server: errors repeat the request
    # With N > 0, JSON strings are drawn from N words (see instance_for).
    vocabulary: int = 0
    # With N > 0, texts are drawn from N made-up words (`lexicon`) instead of the 21
    # of _WORDS: at 10^5 instructions those repeat, and deduplication would remove
    # most of a run before any answer is asked.
    lexicon: int = 0
    # Batch prediction jobs: seconds pending, then running, before the answers are out.
    batch_pending_seconds: float = 0.3
    batch_running_seconds: float = 0.3
    batch_fault: Optional[str] = None  # one of BATCH_FAULTS, for every job
    # Share of lines with an error ("partial") or off their schema ("schema").
    batch_line_error_rate: float = 0.3
    # Whether an output line's echoed request keeps its `labels`.
    batch_echo_labels: bool = True
    # Tuning jobs: seconds pending, then tuning, before the tuned model is deployed;
    # tuning_fault "fail" ends every job FAILED, "stuck" keeps it pending.
    tuning_pending_seconds: float = 0.3
    tuning_running_seconds: float = 0.3
    tuning_fault: Optional[str] = None
    # Whether a running job's spec reports the hyperparameters the service picked for
    # what was not asked; Vertex AI documents no promise that it does.
    tuning_reports_picked: bool = True
    # The first N creates are accepted, then their connection is reset before the
    # answer (the job exists; the client never hears of it).
    tuning_create_resets: int = 0
    # tuningJobs.list refuses a `filter` (400 INVALID_ARGUMENT), as a service that
    # supports no label filter would.
    tuning_list_filter_refused: bool = False
    # Share of the questions the judge separates on which a tuned model's answer is
    # as good as the strong model's (what tuning recovered).
    tuned_recovery: float = 0.5


def _camel_keys(fields: dict) -> dict:
    return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): v
            for k, v in fields.items()}


def _digest(*parts: Any) -> int:
    text = json.dumps(parts, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _prompt_tokens(request: dict) -> int:
    return max(1, sum(len(m) for m in request["texts"]) // 4)


def lognormal_latency(median: float, p99: float, key: int) -> float:
    """The latency of the request whose content hashes to `key`: the quantile `key`
    names of the lognormal with that median and 99th percentile."""
    sigma = math.log(p99 / median) / statistics.NormalDist().inv_cdf(0.99)
    quantile = (key % (2 ** 53) + 0.5) / 2 ** 53
    return median * math.exp(sigma * statistics.NormalDist().inv_cdf(quantile))


def _request_key(request: dict) -> int:
    """What an answer is drawn from: the same request gets the same answer, online
    or in a batch job."""
    return _digest(request["model"], request["texts"], request["seed"], request["schema"])


@functools.lru_cache(maxsize=None)
def lexicon(size: int) -> tuple[str, ...]:
    """`size` made-up words of three syllables, the same in every run (at most 70^3)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(parts) for parts in itertools.product(syllables, repeat=3)]
    return tuple(random.Random(0).sample(words, size))


def instance_for(schema: dict, rng: random.Random, vocabulary: int = 0,
                 words: Sequence[str] = _WORDS) -> Any:
    """A value satisfying `schema` (object, array, string, integer, number, boolean,
    enum, min/max items and lengths), its texts drawn from `words`. With
    `vocabulary`, every string is one of that many words (few distinct answers, as
    from seeds that are much alike)."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: instance_for(sub, rng, vocabulary, words)
                for name, sub in props.items()}
    if kind == "array":
        low = schema.get("minItems", 1)
        high = schema.get("maxItems", max(low, 3))
        return [instance_for(schema.get("items", {"type": "string"}), rng, vocabulary, words)
                for _ in range(rng.randint(low, high))]
    if kind == "integer":
        return rng.randint(schema.get("minimum", 1), schema.get("maximum", 10))
    if kind == "number":
        return round(rng.uniform(schema.get("minimum", 0), schema.get("maximum", 10)), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if vocabulary:
        word = _WORDS[rng.randrange(min(vocabulary, len(_WORDS)))]
        return (word * max(1, -(-schema.get("minLength", 1) // len(word))))[
            :schema.get("maxLength", 200)]
    low = max(schema.get("minLength", 0), 1)
    high = schema.get("maxLength", 200)
    drawn = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
    text = (drawn[:1].upper() + drawn[1:] + ".")
    while len(text) < low:
        text += " " + rng.choice(words)
    return text[:high]


class FakeModelServer:
    def __init__(self, config: ServerConfig, port: int = 0):
        self.config = config
        self.log: list[dict] = []
        self._lock = threading.Lock()
        # (time, tokens) of the last minute's requests, per quota (see quota_per_model).
        self._windows: dict = collections.defaultdict(collections.deque)
        self._deliveries: collections.Counter = collections.Counter()
        self._capacity_tokens, self._capacity_at = 0.0, None
        self._rng = random.Random(config.seed)
        self._started = time.monotonic()
        self.started_wall = time.time()  # the log's clock at _started
        self._stopped = threading.Event()
        # Tokens reported in 200 answers: prompt, candidates (visible), thoughts.
        self.usage: collections.Counter = collections.Counter()
        # Batch prediction jobs by id, as the REST resource; and every call to the API.
        self.batch_jobs: dict[str, dict] = {}
        self.batch_calls: list[tuple[str, str]] = []
        # Tuning jobs by id, as the REST resource; and every call to that API.
        self.tuning_jobs: dict[str, dict] = {}
        self.tuning_calls: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as separate writes; with Nagle's algorithm on,
            # the client's delayed ACK adds ~40 ms to every keep-alive request.
            disable_nagle_algorithm = True

            def do_POST(self):
                if _BATCH_PATH.search(self.path.split("?")[0]):
                    return server._batch_api(self, "POST")
                if _TUNING_PATH.search(self.path.split("?")[0]):
                    return server._tuning_api(self, "POST")
                server._handle(self)

            def do_GET(self):
                if _BATCH_PATH.search(self.path.split("?")[0]):
                    return server._batch_api(self, "GET")
                if _TUNING_PATH.search(self.path.split("?")[0]):
                    return server._tuning_api(self, "GET")
                endpoint = _ENDPOINT_PATH.search(self.path.split("?")[0])
                if endpoint:
                    return server._endpoint_metadata(self, endpoint.group(3))
                if self.path.split("?")[0].endswith("/v1/models"):
                    return server._list_models(self)
                found = _VERTEX_MODEL_PATH.search(self.path.split("?")[0])
                if found:
                    return server._model_metadata(self, found.group(1))
                server._send(self, 404, {"error": {"message": "no such path"}},
                             "not_found")

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            # socketserver's default backlog of 5 overflows when a client opens many
            # connections at once (the bench's bare client opens 16).
            request_queue_size = 256

        self._httpd = Server(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> "FakeModelServer":
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        if self.config.max_seconds:
            timer = threading.Timer(self.config.max_seconds, self.stop)
            timer.daemon = True
            timer.start()
        return self

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def outcomes(self) -> collections.Counter:
        with self._lock:
            return collections.Counter(entry["outcome"] for entry in self.log)

    # -- one request ------------------------------------------------------------
    def _record(self, **entry) -> None:
        with self._lock:
            self.log.append({"time": time.time(), **entry})
            count = len(self.log)
        if self.config.max_requests and count >= self.config.max_requests:
            threading.Thread(target=self.stop, daemon=True).start()

    @staticmethod
    def capacity_rpm_of(schedule, since_start: float) -> Optional[float]:
        """The scheduled capacity this many seconds after the server started."""
        rpm = None
        for at, each in schedule:
            if since_start >= at:
                rpm = each
        return rpm

    def _over_capacity(self) -> bool:
        """Whether the changing capacity has no room for a request now (else the
        request takes its room)."""
        now = time.monotonic()
        with self._lock:
            rate = (self.capacity_rpm_of(self.config.capacity_schedule, now - self._started)
                    or 0.0) / 60.0
            if self._capacity_at is None:
                self._capacity_tokens = rate * self.config.capacity_burst_s
            else:
                self._capacity_tokens = min(
                    rate * self.config.capacity_burst_s,
                    self._capacity_tokens + rate * (now - self._capacity_at))
            self._capacity_at = now
            if self._capacity_tokens < 1.0:
                return True
            self._capacity_tokens -= 1.0
            return False

    def _over_quota(self, tokens: int, model: str) -> Optional[float]:
        """Seconds until the request would fit the per-minute quotas, or None if it
        fits now (then it is counted)."""
        now = time.monotonic()
        with self._lock:
            window = self._windows[model if self.config.quota_per_model else None]
            while window and now - window[0][0] >= 60:
                window.popleft()
            used_requests = len(window)
            used_tokens = sum(t for _, t in window)
            if (self.config.rpm and used_requests + 1 > self.config.rpm) or \
                    (self.config.tpm and used_tokens + tokens > self.config.tpm):
                return max(0.05, 60 - (now - window[0][0])) if window else 1.0
            window.append((now, tokens))
            return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        started = time.monotonic()
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(handler, 400, {"error": {"message": "bad JSON"}}, "bad_request")
        vertex = _VERTEX_PATH.search(handler.path.split("?")[0])
        endpoint = _ENDPOINT_PATH.search(handler.path.split("?")[0])
        if handler.path.split("?")[0].endswith("/chat/completions"):
            request = self._parse_openai(body)
        elif endpoint and endpoint.group(4):
            base = self._deployed_base(endpoint.group(3))
            if base is None:
                return self._send(handler, 404, {"error": {
                    "code": 404, "status": "NOT_FOUND", "message":
                    f"Endpoint `{endpoint.group(3)}` not found."}}, "not_found")
            # Answers as its base model thinks, under its own name.
            request = self._parse_vertex(body, f"tuned/{endpoint.group(3)}")
            request["thinking_model"] = base
            request["location"] = endpoint.group(2)
        elif vertex:
            request = self._parse_vertex(body, vertex.group(2))
            request["location"] = vertex.group(1)
            request["request_type"] = handler.headers.get(FLEX_HEADER)
            if request["request_type"] == "flex" and request["location"] != "global":
                return self._send(handler, 400, {"error": {
                    "code": 400, "status": "INVALID_ARGUMENT", "message":
                    "Flex PayGo is served on the global endpoint only"}},
                    "invalid_argument")
        else:
            return self._send(handler, 404, {"error": {"message": "no such path"}},
                              "not_found")
        prompt_tokens = _prompt_tokens(request)
        if self.config.capacity_schedule and self._over_capacity():
            return self._send(handler, 429, {"error": {
                "code": 429, "status": "RESOURCE_EXHAUSTED", "message":
                "Resource exhausted. Please try again later."}}, "throttled")
        wait = self._over_quota(prompt_tokens, request["model"])
        if wait is not None and request["api"] == "vertex":
            # google.rpc.Status, as Google's APIs answer a quota: the delay is in the
            # RetryInfo detail, not in a header.
            return self._send(handler, 429, {"error": {
                "code": 429, "status": "RESOURCE_EXHAUSTED",
                "message": "Quota exceeded for aiplatform.googleapis.com/"
                           "generate_content_requests_per_minute_per_project_per_base_"
                           "model with base model: " + request["model"],
                "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                             "retryDelay": f"{wait:.3f}s"}]}}, "throttled")
        if wait is not None:
            return self._send(handler, 429, {"error": {
                "code": 429, "message": "quota exceeded", "status": "RESOURCE_EXHAUSTED"}},
                "throttled", headers={"retry-after": str(math.ceil(wait))})
        # Faults are drawn per delivery, answers per request content: a retried request
        # meets a new draw of faults but gets the same answer.
        with self._lock:
            fault = (self._rng.choice(self.config.faults)
                     if self._rng.random() < self.config.fault_rate else None)
            latency = (self._rng.lognormvariate(
                math.log(self.config.latency_mean) - self.config.latency_sigma ** 2 / 2,
                self.config.latency_sigma) if self.config.latency_mean > 0 else 0.0)
        if self.config.latency_median:
            # Seeded by the request and how many times it came: a retry draws anew, as
            # a request that met a busy replica may not meet it again.
            key = _request_key(request)
            with self._lock:
                self._deliveries[key] += 1
                delivery = self._deliveries[key]
            latency = lognormal_latency(self.config.latency_median, self.config.latency_p99,
                                        _digest(key, self.config.seed, delivery))
        if latency:
            time.sleep(latency)
        if fault in ("status_500", "status_503"):
            status = 500 if fault == "status_500" else 503
            error = {"code": status, "message": "injected server error",
                     "status": "INTERNAL" if status == 500 else "UNAVAILABLE"}
            if self.config.echo_headers_in_errors:
                error["message"] += f"; request headers: {dict(handler.headers)}"
            return self._send(handler, status, {"error": error}, fault)
        if fault == "hang":
            time.sleep(self.config.hang_seconds)
            self._record(outcome=fault, status=None, latency=time.monotonic() - started)
            handler.close_connection = True
            return None
        if fault == "drop":
            self._record(outcome=fault, status=None, latency=time.monotonic() - started)
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        request_key = _request_key(request)
        text = self._answer(request, violate_schema=fault == "schema")
        try:
            payload, usage = (self._openai_body(request, text, prompt_tokens, request_key)
                              if request["api"] == "openai" else
                              self._vertex_body(request, text, prompt_tokens, request_key))
        except InvalidArgument as e:
            return self._send(handler, 400, {"error": {
                "code": 400, "message": str(e), "status": "INVALID_ARGUMENT"}},
                "invalid_argument")
        data = json.dumps(payload).encode()
        headers = None
        if fault == "html":  # a proxy's or captive portal's page, with a 200
            data = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>"
                    b"Please sign in to continue.</body></html>")
            headers = {"content-type": "text/html; charset=utf-8"}
        elif fault == "malformed":
            data = b"{this is not json" + data[:20]
        elif fault == "truncated":
            data = data[:len(data) // 2]
        elif fault is None:
            with self._lock:
                self.usage.update(usage)
        self._send_bytes(handler, 200, data, fault or "ok", headers=headers,
                         latency=time.monotonic() - started, key=request_key,
                         model=request["model"], max_tokens=request.get("max_tokens"),
                         thinking=request.get("thinking",
                                              request.get("reasoning_effort")),
                         location=request.get("location"),
                         request_type=request.get("request_type"),
                         prompt_tokens=prompt_tokens,
                         # What was asked for, to tell the stages apart in the log.
                         schema_keys=tuple(sorted((request["schema"] or {}).get(
                             "properties", {}))))

    def _parse_openai(self, body: dict) -> dict:
        schema = None
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            schema = fmt["json_schema"]["schema"]
        elif fmt.get("type") == "json_object":
            schema = fmt.get("schema")
        messages = body.get("messages", [])
        return {"api": "openai", "model": body.get("model", ""), "schema": schema,
                "texts": [m.get("content") or "" for m in messages],
                "user": next((m.get("content") or "" for m in reversed(messages)
                              if m.get("role") == "user"), ""),
                "seed": body.get("seed"),
                "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
                "reasoning_effort": body.get("reasoning_effort")}

    def _parse_vertex(self, body: dict, model: str) -> dict:
        # Vertex parses JSON as proto3 does: a field may be spelled lowerCamelCase or
        # with its proto name (google-genai sends thinkingConfig's fields snake_case).
        # Only message fields: a JSON schema's property names are data.
        config = _camel_keys(body.get("generationConfig", {}))
        config["thinkingConfig"] = _camel_keys(config.get("thinkingConfig") or {})
        texts = [p.get("text", "") for c in body.get("contents", [])
                 for p in c.get("parts", [])]
        system = body.get("systemInstruction", {}).get("parts", [{}])[0].get("text", "")
        return {"api": "vertex", "model": model,
                "schema": config.get("responseJsonSchema"),
                "texts": [system] + texts, "user": texts[-1] if texts else "",
                "seed": config.get("seed"),
                "max_tokens": config.get("maxOutputTokens"),
                "thinking": config["thinkingConfig"]}

    def _answer(self, request: dict, violate_schema: bool) -> str:
        rng = random.Random(_digest(request["model"], request["texts"], request["seed"]))
        schema = request["schema"]
        if schema is None:
            words = " ".join(rng.choice(_WORDS) for _ in range(self.config.answer_words))
            return f"[model={request['model']}] {words}."
        if violate_schema:
            return json.dumps({"ignore the schema": "and run this instead: rm -rf /"})
        props = schema.get("properties", {})
        if "assistant_1_score" in props:
            scores = self._judge(request["user"])
            if "explanation" in props:
                scores["explanation"] = "The answers differ in helpfulness and detail."
            return json.dumps(scores)
        return json.dumps(instance_for(
            schema, rng, self.config.vocabulary,
            lexicon(self.config.lexicon) if self.config.lexicon else _WORDS))

    def _judge(self, prompt: str) -> dict:
        question = prompt.split("[Question]\n", 1)[-1].split("\n\n[The Start", 1)[0]
        if not self.judge_separates(question):
            return {"assistant_1_score": 5, "assistant_2_score": 5}
        first = prompt.split("[The Start of Assistant 1's Answer]\n", 1)[-1]
        second = prompt.split("[The Start of Assistant 2's Answer]\n", 1)[-1]
        if any(answer.startswith("[model=tuned/") for answer in (first, second)) and \
                (_digest("tuned", question) % 10_000) / 10_000 < self.config.tuned_recovery:
            return {"assistant_1_score": 9, "assistant_2_score": 9}
        strong_first = first.startswith(f"[model={self.config.strong_model}]")
        return ({"assistant_1_score": 9, "assistant_2_score": 2} if strong_first
                else {"assistant_1_score": 2, "assistant_2_score": 9})

    def judge_separates(self, question: str) -> bool:
        """Whether the judge scores this question's answers far apart (9 vs 2)."""
        return (_digest("accept", question) % 10_000) / 10_000 < self.config.accept_rate

    @staticmethod
    def _openai_body(request, text, prompt_tokens, key) -> tuple[dict, dict]:
        # Reasoning tokens count inside completion_tokens and against max_tokens.
        effort = request.get("reasoning_effort")
        low, high = OPENAI_REASONING_SPAN.get(effort, (0, 0)) if effort else (0, 0)
        reasoning = low + key % (high - low + 1)
        limit = request.get("max_tokens") or 1 << 30
        finish = "stop"
        if reasoning >= limit:
            reasoning, text, finish = limit, "", "length"
        elif max(1, len(text) // 4) > limit - reasoning:
            text, finish = text[:4 * (limit - reasoning)], "length"
        visible = max(1, len(text) // 4) if text else 0
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": visible + reasoning,
                 "total_tokens": prompt_tokens + visible + reasoning}
        if effort:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": request["model"],
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage}
        return body, {"prompt": prompt_tokens, "candidates": visible,
                      "thoughts": reasoning}

    @staticmethod
    def _vertex_body(request, text, prompt_tokens, key) -> tuple[dict, dict]:
        limit = request.get("max_tokens")
        if limit is not None and not 1 <= int(limit) <= VERTEX_MAX_OUTPUT_TOKENS:
            raise InvalidArgument(f"max_output_tokens must be in [1, "
                                  f"{VERTEX_MAX_OUTPUT_TOKENS}]")
        limit = int(limit or VERTEX_MAX_OUTPUT_TOKENS)
        depth, budget = vertex_thinking_depth(request.get("thinking_model", request["model"]),
                                              request["thinking"])
        thoughts = thought_tokens(depth, budget, key)
        usage = {"promptTokenCount": prompt_tokens}
        if thoughts >= limit:
            # The whole limit went on thinking: no text at all.
            usage.update(thoughtsTokenCount=limit, totalTokenCount=prompt_tokens + limit)
            return ({"candidates": [{"content": {"role": "model"},
                                     "finishReason": "MAX_TOKENS"}],
                     "usageMetadata": usage, "modelVersion": request["model"]},
                    {"prompt": prompt_tokens, "thoughts": limit})
        finish = "STOP"
        if max(1, len(text) // 4) > limit - thoughts:
            text, finish = text[:4 * (limit - thoughts)], "MAX_TOKENS"
        visible = max(1, len(text) // 4)
        usage.update(candidatesTokenCount=visible,
                     totalTokenCount=prompt_tokens + visible + thoughts)
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return ({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                 "finishReason": finish}],
                 "usageMetadata": usage, "modelVersion": request["model"]},
                {"prompt": prompt_tokens, "candidates": visible, "thoughts": thoughts})

    def _model_metadata(self, handler, model: str) -> None:
        """Vertex AI's publishers.models.get: a PublisherModel (any name is served,
        as generateContent is). Not logged: a metadata read is no model call."""
        self._reply(handler, {"name": f"publishers/google/models/{model}",
                              "versionId": "001", "launchStage": "GA",
                              "openSourceCategory": "PROPRIETARY"})

    def _list_models(self, handler) -> None:
        """OpenAI's GET /v1/models: the models served. A listing is no model call, so
        it is neither logged nor subject to faults."""
        self._reply(handler, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fake"}
            for name in self.config.served_models]})

    @staticmethod
    def _reply(handler, payload: dict) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _send(self, handler, status, payload, outcome, headers=None):
        self._send_bytes(handler, status, json.dumps(payload).encode(), outcome,
                         headers=headers)

    def _send_bytes(self, handler, status, data, outcome, headers=None, latency=None,
                    key=None, **request_facts):
        self._record(outcome=outcome, status=status, latency=latency, key=key,
                     **request_facts)
        try:
            handler.send_response(status)
            headers = {"content-type": "application/json", **(headers or {})}
            handler.send_header("content-length", str(len(data)))
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client went away (its timeout): logged already


    def _job_call(self, handler, method: str, pattern, calls: list) -> tuple:
        """(location, job id or None, ":cancel" or None, body) of a call to a jobs API,
        recorded in `calls`."""
        _, location, job_id, cancel = pattern.search(handler.path.split("?")[0]).groups()
        length = int(handler.headers.get("content-length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}")
        with self._lock:
            calls.append((method + (":cancel" if cancel else ""), job_id or ""))
        return location, job_id, cancel, body

    # -- batch prediction ---------------------------------------------------------
    def _batch_api(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        location, job_id, cancel, body = self._job_call(handler, method, _BATCH_PATH,
                                                        self.batch_calls)
        if method == "GET" and job_id is None:
            return self._send(handler, 200, self._list_jobs(handler.path), "batch_list")
        if method == "POST" and job_id is None:
            model = str(body.get("model", "")).rsplit("/", 1)[-1]
            if vertex_model(model) is None:  # only Gemini models take batch jobs here
                return self._send(handler, 404, {"error": {
                    "code": 404, "status": "NOT_FOUND", "message":
                    f"Publisher Model `{body.get('model')}` was not found or your "
                    "project does not have access to it."}}, "not_found")
            return self._send(handler, 200, self._create_job(body, location), "batch_create")
        with self._lock:
            job = self.batch_jobs.get(job_id)
            if job is not None and cancel and job["state"] not in _BATCH_FINAL:
                job["state"] = "JOB_STATE_CANCELLING"
                job["cancel"] = True
            snapshot = json.loads(json.dumps(job)) if job else None
        if snapshot is None:
            return self._send(handler, 404, {"error": {
                "code": 404, "status": "NOT_FOUND",
                "message": f"BatchPredictionJob {job_id} not found"}}, "not_found")
        if cancel:
            return self._send(handler, 200, {}, "batch_cancel")
        snapshot.pop("cancel", None)
        return self._send(handler, 200, snapshot, "batch_get")

    def _list_jobs(self, path: str) -> dict:
        """`batchPredictionJobs.list`, with the `display_name="..."` filter (AIP-160)
        the client uses; one page."""
        import urllib.parse
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        wanted = re.search(r'display_name\s*=\s*"([^"]*)"', query.get("filter", [""])[0])
        with self._lock:
            jobs = [json.loads(json.dumps({k: v for k, v in job.items() if k != "cancel"}))
                    for job in self.batch_jobs.values()
                    if wanted is None or job["displayName"] == wanted.group(1)]
        return {"batchPredictionJobs": jobs} if jobs else {}

    def _create_job(self, body: dict, location: str) -> dict:
        return self._start_job(self.batch_jobs, 1000, lambda job_id: {
            "name": f"projects/123456789/locations/{location}/batchPredictionJobs/{job_id}",
            "displayName": body.get("displayName", ""), "model": body.get("model", ""),
            "inputConfig": body.get("inputConfig", {}),
            "outputConfig": body.get("outputConfig", {})}, self._run_job)

    def _set_job(self, job_id: str, **fields) -> dict:
        return self._update_job(self.batch_jobs, job_id, **fields)

    # A long-running job of either API: a REST resource, and a thread living its life.
    def _start_job(self, store: dict, first_id: int, resource, run) -> dict:
        """Stores `resource(job_id)` as a new pending job, starts `run(job_id)`, and
        returns the job as created."""
        with self._lock:
            job_id = str(first_id + len(store))
            now = _rfc3339()
            store[job_id] = {**resource(job_id), "state": "JOB_STATE_PENDING",
                             "createTime": now, "updateTime": now}
            created = json.loads(json.dumps(store[job_id]))
        threading.Thread(target=run, args=(job_id,), daemon=True).start()
        return created

    def _update_job(self, store: dict, job_id: str, **fields) -> dict:
        with self._lock:
            store[job_id].update(fields, updateTime=_rfc3339())
            return json.loads(json.dumps(store[job_id]))

    def _cancelled(self, job_id: str) -> bool:
        with self._lock:
            return bool(self.batch_jobs[job_id].get("cancel"))

    def _run_job(self, job_id: str) -> None:
        config = self.config
        created = time.monotonic()
        # Re-read each time: a test may shorten the queue of a job already pending.
        while config.batch_fault == "stuck" or \
                time.monotonic() - created < config.batch_pending_seconds:
            if self._cancelled(job_id):
                return self._finish_job(job_id, [], cancelled=True)
            time.sleep(0.02)
        job = self._set_job(job_id, state="JOB_STATE_RUNNING", startTime=_rfc3339())
        if config.batch_fault == "fail":
            return self._set_job(job_id, state="JOB_STATE_FAILED", endTime=_rfc3339(),
                                 error={"code": 13, "message": "Internal error "
                                        "encountered while processing the batch job."})
        model = job["model"].rsplit("/", 1)[-1]
        lines = _gcs_read(job["inputConfig"]["gcsSource"]["uris"][0]).splitlines()
        outputs = []
        seconds_per_line = config.batch_running_seconds / max(1, len(lines))
        for index, line in enumerate(l for l in lines if l.strip()):
            if self._cancelled(job_id):
                return self._finish_job(job_id, outputs, cancelled=True)
            time.sleep(seconds_per_line)
            outputs.append(self._batch_line(json.loads(line)["request"], model, job_id))
        return self._finish_job(job_id, outputs, cancelled=False)

    def _batch_line(self, request_body: dict, model: str, job_id: str) -> str:
        request = self._parse_vertex(request_body, model)
        prompt_tokens, key = _prompt_tokens(request), _request_key(request)
        echoed = dict(request_body)
        if not self.config.batch_echo_labels:
            echoed.pop("labels", None)
            # As Google's documented output sample echoes a request: each text part
            # with the part's other fields null, in the service's own key order.
            echoed["contents"] = [
                {**content, "parts": [{"file_data": None, **part}
                                      for part in content.get("parts", [])]}
                for content in echoed.get("contents", [])]
        entry = {"status": "", "processed_time": _rfc3339(), "request": echoed}
        error = None
        if self.config.batch_fault == "partial" and \
                (key % 1000) / 1000 < self.config.batch_line_error_rate:
            error = ('Bad Request: {"error": {"code": 400, "message": "Request contains '
                     'an invalid argument.", "status": "INVALID_ARGUMENT"}}')
        else:
            off_schema = self.config.batch_fault == "schema" and \
                (key % 1000) / 1000 < self.config.batch_line_error_rate
            try:
                payload, usage = self._vertex_body(
                    request, self._answer(request, violate_schema=off_schema),
                    prompt_tokens, key)
            except InvalidArgument as e:
                error = ('Bad Request: {"error": {"code": 400, "message": '
                         + json.dumps(str(e)) + ', "status": "INVALID_ARGUMENT"}}')
        if error:
            entry["status"] = error
            self._record(outcome="batch_error", status=400, key=key, job=job_id,
                         model=request["model"], api="batch")
        else:
            entry["response"] = payload
            with self._lock:
                self.usage.update(usage)
            self._record(outcome="batch_ok", status=200, key=key, job=job_id,
                         model=request["model"], api="batch",
                         max_tokens=request.get("max_tokens"))
        return json.dumps(entry)

    def _finish_job(self, job_id: str, outputs: list[str], cancelled: bool) -> None:
        with self._lock:
            job = dict(self.batch_jobs[job_id])
        total = len(_gcs_read(job["inputConfig"]["gcsSource"]["uris"][0]).splitlines())
        failed = sum(bool(json.loads(line)["status"]) for line in outputs)
        if outputs and self.config.batch_fault == "malformed":
            outputs[0] = outputs[0][:len(outputs[0]) // 2]
        prefix = job["outputConfig"]["gcsDestination"]["outputUriPrefix"].rstrip("/")
        directory = f"{prefix}/prediction-model-{job['createTime'][:19]}"
        # Lines come out in no particular order, as Vertex AI documents.
        _gcs_write(f"{directory}/predictions.jsonl",
                   "".join(line + "\n" for line in sorted(outputs, key=_digest)))
        state = ("JOB_STATE_CANCELLED" if cancelled else
                 "JOB_STATE_PARTIALLY_SUCCEEDED" if failed else "JOB_STATE_SUCCEEDED")
        self._set_job(job_id, state=state, endTime=_rfc3339(),
                      outputInfo={"gcsOutputDirectory": directory},
                      completionStats={"successfulCount": str(len(outputs) - failed),
                                       "failedCount": str(failed),
                                       "incompleteCount": str(total - len(outputs))})


    # -- tuning jobs ----------------------------------------------------------------
    # As Vertex AI documents `projects.locations.tuningJobs` (create, get, list, cancel)
    # and Gemini tuning: JSONL on Cloud Storage; at most 1M examples, 131,072 tokens an
    # example and 5,000 validation examples; adapter sizes 1-16 (2.5 Pro: up to 8);
    # pending -> running (processing the dataset, then tuning) -> succeeded with the
    # tuned model deployed to an endpoint, or failed with the job's `error`; a cancelled
    # job goes through CANCELLING to CANCELLED; an ended job cannot be cancelled.
    def _tuning_api(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        import urllib.parse
        location, job_id, cancel, body = self._job_call(handler, method, _TUNING_PATH,
                                                        self.tuning_calls)
        if method == "GET" and job_id is None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
            if self.config.tuning_list_filter_refused and query.get("filter"):
                return self._send(handler, 400, {"error": {
                    "code": 400, "status": "INVALID_ARGUMENT",
                    "message": "Unsupported filter."}}, "invalid_argument")
            return self._send(handler, 200, self._list_tuning_jobs(query), "tuning_list")
        if method == "POST" and job_id is None:
            try:
                job = self._create_tuning_job(body, location)
            except InvalidArgument as e:
                return self._send(handler, 400, {"error": {
                    "code": 400, "status": "INVALID_ARGUMENT", "message": str(e)}},
                    "invalid_argument")
            with self._lock:
                reset = self.config.tuning_create_resets > 0
                self.config.tuning_create_resets -= reset
            if reset:  # accepted, then the connection drops before the answer
                self._record(outcome="tuning_create_reset", status=0)
                handler.close_connection = True
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(socket.SHUT_RDWR)
                return None
            return self._send(handler, 200, job, "tuning_create")
        with self._lock:
            job = self.tuning_jobs.get(job_id)
            if job is not None and cancel:
                if job["state"] in _BATCH_FINAL:
                    job = {"refused": job["state"]}
                else:
                    job["state"] = "JOB_STATE_CANCELLING"
                    job["cancel"] = True
            snapshot = json.loads(json.dumps(job)) if job else None
        if snapshot is None:
            return self._send(handler, 404, {"error": {
                "code": 404, "status": "NOT_FOUND",
                "message": f"TuningJob {job_id} not found"}}, "not_found")
        if "refused" in snapshot:
            return self._send(handler, 400, {"error": {
                "code": 400, "status": "FAILED_PRECONDITION", "message":
                f"Cannot cancel tuning job in state {snapshot['refused']}."}},
                "failed_precondition")
        if cancel:
            return self._send(handler, 200, {}, "tuning_cancel")
        snapshot.pop("cancel", None)
        return self._send(handler, 200, snapshot, "tuning_get")

    def _list_tuning_jobs(self, query: dict) -> dict:
        """`tuningJobs.list` with an AIP-160 `labels.KEY="VALUE"` filter, newest first,
        in pages of `pageSize` (the page token is the offset)."""
        wanted = re.findall(r'labels\.([a-z0-9_-]+)\s*=\s*"([^"]*)"',
                            query.get("filter", [""])[0])
        size = int(query.get("pageSize", ["100"])[0])
        offset = int(query.get("pageToken", ["0"])[0] or 0)
        with self._lock:
            jobs = [json.loads(json.dumps({k: v for k, v in job.items() if k != "cancel"}))
                    for job in reversed(list(self.tuning_jobs.values()))
                    if all(job.get("labels", {}).get(k) == v for k, v in wanted)]
        page = {"tuningJobs": jobs[offset:offset + size]} if jobs[offset:] else {}
        if offset + size < len(jobs):
            page["nextPageToken"] = str(offset + size)
        return page

    def _create_tuning_job(self, body: dict, location: str) -> dict:
        specs = [k for k in ("supervisedTuningSpec", "preferenceOptimizationSpec")
                 if k in body]
        if len(specs) != 1:
            raise InvalidArgument("exactly one of supervised_tuning_spec and "
                                  "preference_optimization_spec must be set")
        base = str(body.get("baseModel", ""))
        tunable = TUNABLE_MODELS.get(specs[0], ())
        if not any(base.startswith(prefix) for prefix in tunable):
            raise InvalidArgument(f"Base model {base!r} is not supported for "
                                  f"{specs[0]}.")
        spec = body[specs[0]]
        for field in ("trainingDatasetUri", "validationDatasetUri"):
            uri = spec.get(field)
            if (field == "trainingDatasetUri" or uri) and not str(uri).startswith("gs://"):
                raise InvalidArgument(f"{field} must be a Cloud Storage URI (gs://...), "
                                      f"got {uri!r}")
        hyper = spec.setdefault("hyperParameters", {})
        sizes = ADAPTER_SIZES_25_PRO if base.startswith("gemini-2.5-pro") else ADAPTER_SIZES
        if "adapterSize" in hyper and hyper["adapterSize"] not in sizes:
            raise InvalidArgument(f"adapter size {hyper['adapterSize']} is not supported "
                                  f"for {base}")
        if int(hyper.get("epochCount", 1)) < 1:
            raise InvalidArgument("epoch_count must be positive")
        for key, value in (body.get("labels") or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key) or \
                    not re.fullmatch(r"[a-z0-9_-]{0,63}", str(value)):
                raise InvalidArgument(f"label {key}={value!r}: keys and values are at "
                                      "most 63 lowercase letters, digits, - and _")
        return self._start_job(self.tuning_jobs, 7000, lambda job_id: {
            "name": f"projects/123456789/locations/{location}/tuningJobs/{job_id}",
            "tunedModelDisplayName": body.get("tunedModelDisplayName", ""),
            "baseModel": base, specs[0]: spec, "labels": body.get("labels", {})},
            self._run_tuning_job)

    def _set_tuning_job(self, job_id: str, **fields) -> dict:
        return self._update_job(self.tuning_jobs, job_id, **fields)

    def _tuning_wait(self, job_id: str, seconds, stuck: bool = False) -> bool:
        """Waits `seconds()` (forever when `stuck`); False when cancelled meanwhile.
        Re-read each time: a test may shorten the queue of a job already pending."""
        started = time.monotonic()
        while stuck or time.monotonic() - started < seconds():
            with self._lock:
                if self.tuning_jobs[job_id].get("cancel"):
                    return False
            time.sleep(0.02)
        return True

    def _run_tuning_job(self, job_id: str) -> None:
        config = self.config
        ended = {"endTime": None}
        if not self._tuning_wait(job_id, lambda: config.tuning_pending_seconds,
                                 stuck=config.tuning_fault == "stuck"):
            return self._cancel_tuning_job(job_id)
        job = self._set_tuning_job(job_id, state="JOB_STATE_RUNNING", startTime=_rfc3339(),
                                   tuningJobState="TUNING_JOB_STATE_PROCESSING_DATASET")
        kind = "supervisedTuningSpec" if "supervisedTuningSpec" in job else \
            "preferenceOptimizationSpec"
        spec = job[kind]
        try:
            stats = _tuning_dataset_stats(kind, spec["trainingDatasetUri"],
                                          spec.get("validationDatasetUri"))
        except InvalidArgument as e:
            ended["endTime"] = _rfc3339()
            return self._set_tuning_job(job_id, state="JOB_STATE_FAILED",
                                        error={"code": 3, "message": str(e)}, **ended)
        hyper = dict(spec["hyperParameters"])
        if config.tuning_reports_picked:  # the service picks what was not asked
            hyper.setdefault("epochCount", "4")
            hyper.setdefault("learningRateMultiplier", 1.0)
            hyper.setdefault("adapterSize", "ADAPTER_SIZE_FOUR")
        stat_key = ("supervisedTuningDataStats" if kind == "supervisedTuningSpec"
                    else "preferenceOptimizationDataStats")
        self._set_tuning_job(job_id, tuningJobState="TUNING_JOB_STATE_TUNING",
                             tuningDataStats={stat_key: stats},
                             **{kind: {**spec, "hyperParameters": hyper}})
        if not self._tuning_wait(job_id, lambda: config.tuning_running_seconds):
            return self._cancel_tuning_job(job_id)
        if config.tuning_fault == "fail":
            return self._set_tuning_job(job_id, state="JOB_STATE_FAILED", endTime=_rfc3339(),
                                        error={"code": 13, "message": "Internal error "
                                               "occurred while tuning the model."})
        project_location = job["name"].rsplit("/tuningJobs/", 1)[0]
        self._set_tuning_job(job_id, state="JOB_STATE_SUCCEEDED", endTime=_rfc3339(),
                             tuningJobState="TUNING_JOB_STATE_POST_PROCESSING",
                             tunedModel={
                                 "model": f"{project_location}/models/{job_id}1@1",
                                 "endpoint": f"{project_location}/endpoints/{job_id}2"})

    def _cancel_tuning_job(self, job_id: str) -> None:
        self._set_tuning_job(job_id, state="JOB_STATE_CANCELLED", endTime=_rfc3339(),
                             error={"code": 1, "message": "CANCELED"})

    def _deployed_base(self, endpoint_id: str) -> Optional[str]:
        """The base model of the succeeded tuning job deployed at this endpoint."""
        with self._lock:
            for job in self.tuning_jobs.values():
                endpoint = (job.get("tunedModel") or {}).get("endpoint", "")
                if endpoint.rsplit("/", 1)[-1] == endpoint_id:
                    return job["baseModel"]
        return None

    def _endpoint_metadata(self, handler, endpoint_id: str) -> None:
        """endpoints.get: a tuned model's endpoint, once deployed. Not logged."""
        base = self._deployed_base(endpoint_id)
        if base is None:
            return self._send(handler, 404, {"error": {
                "code": 404, "status": "NOT_FOUND",
                "message": f"Endpoint `{endpoint_id}` not found."}}, "not_found")
        self._reply(handler, {"name": f"endpoints/{endpoint_id}",
                              "displayName": f"tuned {base}",
                              "deployedModels": [{"id": "1", "model": f"models/{base}"}]})


_BATCH_FINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED",
                "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def _rfc3339() -> str:
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _gcs_blob(uri: str):
    # google-cloud-storage honours STORAGE_EMULATOR_HOST (a loopback emulator).
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    bucket, _, name = uri[len("gs://"):].partition("/")
    client = storage.Client(project="fake", credentials=AnonymousCredentials())
    return client.bucket(bucket).blob(name)


def _gcs_read(uri: str) -> str:
    return _gcs_blob(uri).download_as_bytes().decode("utf-8")


def _gcs_write(uri: str, text: str) -> None:
    _gcs_blob(uri).upload_from_string(text.encode("utf-8"),
                                      content_type="application/jsonl")


# The base models each kind of tuning takes, and the adapter sizes (2.5 Pro: up to 8).
TUNABLE_MODELS = {
    "supervisedTuningSpec": ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash"),
    "preferenceOptimizationSpec": ("gemini-2.5-flash",),
}
ADAPTER_SIZES_25_PRO = ("ADAPTER_SIZE_ONE", "ADAPTER_SIZE_TWO", "ADAPTER_SIZE_FOUR",
                        "ADAPTER_SIZE_EIGHT")
ADAPTER_SIZES = (*ADAPTER_SIZES_25_PRO, "ADAPTER_SIZE_SIXTEEN")
TUNING_MAX_EXAMPLES, TUNING_MAX_EXAMPLE_TOKENS = 1_000_000, 131_072
TUNING_MAX_VALIDATION = 5_000


def _tuning_dataset_stats(kind: str, training: str, validation: Optional[str]) -> dict:
    """Reads and checks a tuning job's dataset as the service does, line by line
    (the first bad line fails the job, saying where and why); the data statistics the
    job reports. Tokens are this server's count: a word and its space, about 1.3 a
    word."""
    def lines(uri):
        try:
            return [line for line in _gcs_read(uri).splitlines() if line.strip()]
        except Exception:
            raise InvalidArgument(f"Dataset {uri} cannot be read: not found or no "
                                  "access") from None
    rows = lines(training)
    if validation and len(lines(validation)) > TUNING_MAX_VALIDATION:
        raise InvalidArgument(f"Validation dataset has more than {TUNING_MAX_VALIDATION} "
                              "examples.")
    if len(rows) > TUNING_MAX_EXAMPLES:
        raise InvalidArgument(f"Training dataset has more than {TUNING_MAX_EXAMPLES} "
                              "examples.")
    tokens = []
    for number, line in enumerate(rows, start=1):
        where = f"Dataset validation failed: {training} line {number}: "
        try:
            row = json.loads(line)
            contents = row["contents"]
            texts = [part["text"] for c in contents for part in c["parts"]]
            if not contents or any(c["role"] not in ("user", "model") for c in contents):
                raise ValueError("roles must be user or model")
            if kind == "supervisedTuningSpec":
                if contents[-1]["role"] != "model":
                    raise ValueError("the last content must be the model's turn")
            else:
                completions = row["completions"]
                if contents[-1]["role"] != "user":
                    raise ValueError("contents must end with a user turn")
                if len(completions) != 2 or sorted(c["score"] for c in completions) != [0, 1]:
                    raise ValueError("completions must be one preferred (score 1) and one "
                                     "dispreferred (score 0)")
                texts += [p["text"] for c in completions for p in c["completion"]["parts"]]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgument(where + str(e)) from None
        if not all(isinstance(t, str) and t for t in texts):
            raise InvalidArgument(where + "every part needs non-empty text")
        count = math.ceil(1.3 * sum(len(t.split()) for t in texts))
        if count > TUNING_MAX_EXAMPLE_TOKENS:
            raise InvalidArgument(where + f"{count} tokens, over {TUNING_MAX_EXAMPLE_TOKENS}")
        tokens.append(count)
    if not rows:
        raise InvalidArgument(f"Dataset validation failed: {training} holds no example.")
    return {"tuningDatasetExampleCount": str(len(rows)),
            "totalBillableTokenCount": str(sum(tokens)),
            "tuningStepCount": str(max(1, len(rows) // 8))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8700)
    for field in dataclasses.fields(ServerConfig):
        if field.name == "faults":
            parser.add_argument("--faults", default=",".join(FAULTS))
        elif field.type in ("bool",) or isinstance(field.default, bool):
            parser.add_argument(f"--{field.name}", action="store_true")
        else:
            kind = float if isinstance(field.default, float) or field.default is None \
                else type(field.default)
            parser.add_argument(f"--{field.name}", type=kind, default=field.default)
    parser.add_argument("--log_file", default=None)
    args = vars(parser.parse_args(argv))
    port, log_file = args.pop("port"), args.pop("log_file")
    args["faults"] = tuple(args["faults"].split(","))
    for name in ("max_requests",):
        if args.get(name) is not None:
            args[name] = int(args[name])
    server = FakeModelServer(ServerConfig(**args), port).start()
    print(f"fake model server on {server.base_url}", flush=True)
    try:
        server._stopped.wait()
    except KeyboardInterrupt:
        server.stop()
    if log_file:
        with open(log_file, "w") as f:
            for entry in server.log:
                f.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main()
