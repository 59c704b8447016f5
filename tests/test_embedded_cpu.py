"""The embedded model on this machine's CPU, loaded in a child process: a native crash
(llama.cpp's AMX path segfaults on the shipped Q4_1 model) is a failed test with its
signal and output, not a dead suite. Where the CPU has AMX, the weights must not sit in
an AMX buffer; forcing llama.cpp's default load shows the check can see one."""
import json
import os
import signal
import subprocess
import sys

import pytest

# The embedded llama.cpp model: the `local` extra (not in the compatibility pass).
pytestmark = pytest.mark.embedded

# Runs in the child: collects llama.cpp's own log (it names the buffer type that holds
# the weights: "CPU_AMX model buffer size = ..." or "CPU model buffer size = ..."),
# loads the model, and, unless told only to load, answers one schema-bound request.
CHILD = r"""
import ctypes, json, sys
import llama_cpp

log = []

@llama_cpp.llama_log_callback
def collect(level, text, user_data):
    log.append(text.decode("utf-8", "replace"))

llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
mode = sys.argv[1]
if mode == "llama_cpp_default":  # llama.cpp's own load: extra buffer types allowed
    from codeclm_beam.model.uri import ModelSpec
    llama_cpp.Llama(model_path=ModelSpec.parse("llamacpp:smollm2-135m").gguf_path(),
                    n_ctx=512, n_threads=2, verbose=False)
    answer = None
else:
    from codeclm_beam.model import ChatMessage, GenerationSettings, ModelClient
    from codeclm_beam.model import ModelConfig, ModelRequest, ModelResponse
    client = ModelClient(ModelConfig(uri="llamacpp:smollm2-135m"))
    result = client.call(ModelRequest.create(
        "cpu", [ChatMessage("user", "Name a colour.")],
        GenerationSettings(temperature=0.7, max_output_tokens=32, seed=3),
        # As long a string bound as the embedded backend keeps in a grammar.
        {"type": "object", "properties": {"colour": {"type": "string", "minLength": 1,
                                                     "maxLength": 300}},
         "required": ["colour"]}))
    assert isinstance(result, ModelResponse), result
    answer = result.data
buffers = [line.strip() for line in "".join(log).splitlines()
           if "model buffer size" in line]
print("RESULT " + json.dumps({"answer": answer, "buffers": buffers}))
"""


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read().split()
    except OSError:
        return False


def run_child(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(__file__) + "/..")
    if proc.returncode < 0:
        pytest.fail(f"the embedded model crashed the process with "
                    f"{signal.Signals(-proc.returncode).name} ({mode}):\n"
                    f"{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_embedded_model_answers_on_this_cpu_with_weights_off_amx():
    result = run_child("codeclm")
    assert isinstance(result["answer"]["colour"], str)
    assert result["buffers"], "llama.cpp logged no model buffer: the check sees nothing"
    assert not [b for b in result["buffers"] if "AMX" in b], result["buffers"]


@pytest.mark.skipif(not cpu_has_amx(), reason="this CPU has no AMX")
def test_the_check_sees_weights_in_amx_when_llama_cpp_loads_by_default():
    # Load only: the first decode on this path is what crashes.
    result = run_child("llama_cpp_default")
    assert [b for b in result["buffers"] if "AMX" in b], result["buffers"]
