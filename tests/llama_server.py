"""`python -m tests.llama_server ARGS`: llama_cpp.server (the real OpenAI-compatible
server) with the model's weights in plain CPU buffers, as the embedded backend loads
them: llama.cpp's default load crashes on the first decode on CPUs with AMX (see
`codeclm_beam/model/backends/llamacpp.py`)."""
from llama_cpp.server.__main__ import main

from codeclm_beam.model.backends.llamacpp import _weights_in_plain_cpu_buffers

if __name__ == "__main__":
    with _weights_in_plain_cpu_buffers():
        main()
