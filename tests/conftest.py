import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from codeclm_beam.model.uri import ModelSpec

# Worker processes of the multi-processing DirectRunner import the scripted backend
# from tests/, so they need the repository root on their path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


# Each pytest-xdist worker's embedded model decodes on its share of the cores: two
# workers each decoding on both cores of a 2-core machine oversubscribe it, and with
# anything else running (a CPU burner, another build) a decode slows tenfold.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    os.environ.setdefault("CODECLM_EMBEDDED_THREADS", str(max(
        1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


# The test under way, for `make test` to name should a native library kill the process
# (pytest's faulthandler prints the stack; this names the test in one line).
# One file a pytest-xdist worker.
RUNNING_TEST = os.path.join(ROOT, ".pytest_cache", "running-test"
                            + os.environ.get("PYTEST_XDIST_WORKER", ""))


def pytest_runtest_logstart(nodeid, location):
    os.makedirs(os.path.dirname(RUNNING_TEST), exist_ok=True)
    with open(RUNNING_TEST, "w") as f:
        f.write(nodeid)


def pytest_sessionfinish(session, exitstatus):
    with contextlib.suppress(OSError):
        os.remove(RUNNING_TEST)


@pytest.fixture(scope="session")
def smollm2_path():
    return ModelSpec.parse("llamacpp:smollm2-135m").gguf_path()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(smollm2_path, tmp_path_factory):
    """The real llama_cpp.server serving SmolLM2 on 127.0.0.1, for the session (its
    weights in plain CPU buffers: `tests/llama_server.py`)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.llama_server", "--model", smollm2_path,
             "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "4096", "--n_threads", "2"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("llama_cpp.server did not start:\n"
                                       + log.read_text()[-3000:])
                time.sleep(0.5)
        yield base + "/v1"
    finally:
        proc.terminate()
        with contextlib.suppress(Exception):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="session")
def gcs_front():
    """A real Cloud Storage emulator (gcp-storage-emulator) on 127.0.0.1 for the
    session, holding the bucket `codeclm-test`, behind a front that enforces the
    generation preconditions the emulator ignores (tests/gcs_preconditions.py) and can
    trickle downloads; yields the front."""
    from gcp_storage_emulator.server import create_server

    from tests.gcs_preconditions import PreconditionFront
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True,
                           default_bucket="codeclm-test")
    server.start()
    front = PreconditionFront(f"http://127.0.0.1:{port}")
    try:
        yield front
    finally:
        front.stop()
        server.stop()


@pytest.fixture(scope="session")
def gcs_emulator(gcs_front):
    """The front's address, for STORAGE_EMULATOR_HOST, which google-cloud-storage (and
    so Beam's gs:// filesystem) honours."""
    return gcs_front.address


@pytest.fixture
def cloud(monkeypatch, gcs_emulator):
    """Vertex AI on a loopback server and Cloud Storage on the emulator, as the contract
    tests reach them: anonymous Cloud Storage calls (no wait for credentials), a fake
    access token for Vertex AI, and a project and location."""
    from apache_beam.internal.gcp.auth import _Credentials
    monkeypatch.setattr(_Credentials, "_credentials_init", True)
    monkeypatch.setattr(_Credentials, "_credentials", None)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("CODECLM_VERTEX_ACCESS_TOKEN", "fake-token-for-loopback")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-proj")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "us-central1")
