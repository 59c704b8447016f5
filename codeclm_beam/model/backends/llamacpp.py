"""The embedded backend: llama-cpp-python in the worker process.

One model per process, shared by every stage and thread that names the same file
(each Beam stage gets its own handler, so without this registry a pipeline with a
dozen model stages would load a dozen copies). llama.cpp runs one generation at a
time per model, hence `concurrent = False`, and every generation of a model runs on
that model's one thread (`_EmbeddedModel`).
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import json
import os
import threading
import time
from typing import Optional

from codeclm_beam.model.backends import Backend
from codeclm_beam.model.backends import RawAnswer
from codeclm_beam.model.config import ModelConfig
from codeclm_beam.model.errors import PermanentModelError
from codeclm_beam.model.types import ModelRequest
from codeclm_beam.model.types import Usage

_MODELS: dict[tuple, "_EmbeddedModel"] = {}
_MODELS_LOCK = threading.Lock()

# llama.cpp expands a string's length bounds into nested grammar rules, one a
# character: bounds of a few thousand make a grammar its parser cannot take, and the
# process dies with a segmentation fault. Bounds up to `_GRAMMAR_MAX_LENGTH` stay (the
# child-process CPU test loads one that long): without them a small model fills a
# short field (a use case, a skill) with run-on text until the token limit, and is cut
# and asked again. Longer bounds, patterns and formats are left out of the grammar; the
# model layer still validates every answer against the full schema and re-asks when one
# breaks them.
_GRAMMAR_MAX_LENGTH = 300
_UNSAFE_GRAMMAR_KEYS = frozenset({"pattern", "format"})


def grammar_schema(schema):
    """The schema without the keywords llama.cpp's grammar compiler cannot take."""
    if isinstance(schema, dict):
        return {k: grammar_schema(v) for k, v in schema.items()
                if k not in _UNSAFE_GRAMMAR_KEYS and not (
                    k in ("minLength", "maxLength") and isinstance(v, int)
                    and schema.get("maxLength", 0) > _GRAMMAR_MAX_LENGTH)}
    if isinstance(schema, list):
        return [grammar_schema(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=64)
def _grammar(schema_text: str):
    """The compiled grammar of a schema, once per schema rather than once per request
    (llama-cpp-python converts a `response_format` schema on every call)."""
    from llama_cpp.llama_grammar import JSON_GBNF
    from llama_cpp.llama_grammar import LlamaGrammar
    try:
        return LlamaGrammar.from_json_schema(
            json.dumps(grammar_schema(json.loads(schema_text))), verbose=False)
    except Exception:  # a schema the converter cannot take: any JSON, validated after
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)


@contextlib.contextmanager
def _weights_in_plain_cpu_buffers():
    """Loads weights without llama.cpp's "extra buffer types".

    On a CPU with AMX (Sapphire Rapids and later Xeons, most of today's cloud VMs and
    Dataflow's newer workers), a llama.cpp built with -march=native (as pip builds it)
    repacks Q4_0/Q4_1 weights into its AMX buffer type, and the first decode of the
    shipped SmolLM2 Q4_1 model dies with a segmentation fault in
    ggml_backend_amx_mul_mat (upstream llama.cpp #20824; PR #16315 on wrong results
    from the same path). The same extra buffer types hold the CPU "repack" layouts,
    which have no Q4_1 kernel on x86: for this model, keeping weights in plain CPU
    buffers costs nothing on AVX2 or AVX-512 CPUs, and it makes every x86-64 CPU run
    the same kernels. It is done at load time, in our code, so it holds for any
    llama-cpp-python a user installs with `pip install 'codeclm-beam[local]'`,
    whatever CPU built it.

    `Llama.__init__` takes no such argument; it reads
    `llama_cpp.llama_model_default_params()`, so that one call is wrapped while the
    model loads (under `_MODELS_LOCK`: loads in this process are one at a time).
    """
    import llama_cpp
    low_level = llama_cpp.llama_cpp
    default_params = low_level.llama_model_default_params

    def plain_cpu_params():
        params = default_params()
        params.use_extra_bufts = False
        return params
    low_level.llama_model_default_params = plain_cpu_params
    try:
        yield
    finally:
        low_level.llama_model_default_params = default_params


class _EmbeddedModel:
    """A loaded model and the one thread that runs it.

    llama.cpp's CPU backend runs each computation on an OpenMP thread team that belongs
    to the calling thread. Generations coming from several threads (Beam's bundle
    threads and the model layer's pool) make several teams that spin against each
    other on a small machine: measured about 3x fewer tokens per second on 2 cores.
    One thread per model keeps one team, and replaces a lock.
    """

    def __init__(self, path: str, n_ctx: int, n_threads: int):
        from llama_cpp import Llama
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="codeclm-llamacpp")
        with _weights_in_plain_cpu_buffers():
            # Loaded on the model's own thread, so its first computation is there too.
            self.llama = self._thread.submit(
                Llama, model_path=path, n_ctx=n_ctx, n_threads=n_threads,
                verbose=False).result()

    def run(self, fn, *args, **kwargs):
        return self._thread.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        # At exit the pool has already been shut down (concurrent.futures stops its
        # threads before atexit handlers run): free the model from here.
        self._thread.shutdown(wait=True)
        self.llama.close()


def _load(path: str, n_ctx: int, n_threads: int) -> _EmbeddedModel:
    key = (path, n_ctx, n_threads)
    with _MODELS_LOCK:
        if key not in _MODELS:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                raise PermanentModelError(
                    "llamacpp: models need llama-cpp-python: "
                    "pip install 'codeclm-beam[local]'") from None
            _MODELS[key] = _EmbeddedModel(path, n_ctx, n_threads)
        return _MODELS[key]


@atexit.register
def _close_all():
    # Free models before interpreter teardown, when llama.cpp's finalisers can no
    # longer run cleanly.
    with _MODELS_LOCK:
        for model in _MODELS.values():
            model.close()
        _MODELS.clear()


# The embedded model's threads when the config names none. llama.cpp's threads wait
# for each other at every step, so a thread that shares its core with other work holds
# them all back: on 2 cores with one busy, 2 threads made the demo 293 s, 1 thread 106 s.
# Several processes that each load the model (test workers, a runner's worker
# processes) set the count to share the cores.
THREADS_ENV = "CODECLM_EMBEDDED_THREADS"
# How long the CPUs are watched for the idle ones when the model loads.
IDLE_SAMPLE_S = 0.25


def embedded_threads() -> int:
    """CODECLM_EMBEDDED_THREADS, else the CPUs this process may run on that are idle
    when the model loads (at least one)."""
    if os.environ.get(THREADS_ENV, "").strip().isdigit():
        return max(1, int(os.environ[THREADS_ENV]))
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1)
    idle = _idle_cpus()
    return cpus if idle is None else max(1, min(cpus, int(idle + 0.5)))


def _idle_cpus() -> Optional[float]:
    """CPUs idle over IDLE_SAMPLE_S, from /proc/stat; None where it cannot be read."""
    def times():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all
    try:
        idle_before, total_before = times()
        time.sleep(IDLE_SAMPLE_S)
        idle_after, total_after = times()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_after - total_before
    if elapsed <= 0:
        return None
    return (idle_after - idle_before) / elapsed * (os.cpu_count() or 1)


class LlamaCppBackend(Backend):
    concurrent = False

    def __init__(self, config: ModelConfig):
        path = config.spec.gguf_path()
        n_threads = config.n_threads or embedded_threads()
        self._model = _load(path, config.n_ctx, n_threads)

    def generate(self, request: ModelRequest) -> RawAnswer:
        kwargs = {}
        if request.json_schema_text is not None:
            # llama.cpp constrains sampling by the schema's grammar: the answer is
            # valid JSON of that shape by construction (unless cut off by max_tokens).
            kwargs["grammar"] = _grammar(request.json_schema_text)
        if request.settings.seed is not None:
            kwargs["seed"] = request.settings.seed
        try:
            out = self._model.run(
                self._model.llama.create_chat_completion,
                messages=[{"role": m.role, "content": m.content}
                          for m in request.messages],
                temperature=request.settings.temperature,
                max_tokens=request.settings.max_output_tokens,
                **kwargs)
        except ValueError as e:  # e.g. the prompt exceeds the context window
            raise PermanentModelError(f"llama.cpp: {e}") from e
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return RawAnswer(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=Usage(prompt_tokens=usage.get("prompt_tokens", 0),
                        completion_tokens=usage.get("completion_tokens", 0)))
