"""A deadline on a whole HTTP request, for the backends that speak HTTP through httpx
(OpenAI-compatible servers, google-genai).

httpx's timeouts bound each connect, write and read, not the request: a server that
trickles its answer a few bytes at a time, each within the read timeout, holds the
request (and a concurrency slot) for as long as it likes. This transport fails it once
`--request_timeout` has passed since it was sent, between two chunks of its body, so a
request ends within that timeout plus one read timeout at the most. It wraps httpx's
own transport rather than a thread that abandons the call: the connection is closed,
and the slot is free.

Built for the httpx a client library uses: google-genai uses `httpx`, the openai client
its own fork, `httpx2`, whose requests `httpx`'s transport refuses. A batch job's
answers come from Cloud Storage through Beam's filesystem, whose client is not ours to
wrap: `read_whole_within` bounds those downloads."""
from __future__ import annotations

import functools
import importlib
import threading
import time


def deadline_transport(seconds: float, connections: int, httpx_module: str = "httpx"):
    """A transport of `httpx_module` (`httpx` or `httpx2`) with a deadline of
    `seconds` on each whole request, keeping up to `connections` connections open (the
    model's `--max_concurrency`)."""
    return _classes(httpx_module)(seconds, connections)


@functools.lru_cache(maxsize=None)
def _classes(httpx_module: str):
    httpx = importlib.import_module(httpx_module)

    class BodyBefore(httpx.SyncByteStream):
        def __init__(self, inner, deadline: float, seconds: float, request):
            self._inner, self._deadline = inner, deadline
            self._seconds, self._request = seconds, request

        def __iter__(self):
            for chunk in self._inner:
                if time.monotonic() > self._deadline:
                    raise httpx.ReadTimeout(
                        f"no whole answer within {self._seconds:g} s "
                        "(--request_timeout); the server was still sending",
                        request=self._request)
                yield chunk

        def close(self) -> None:
            self._inner.close()

    class DeadlineTransport(httpx.BaseTransport):
        def __init__(self, seconds: float, connections: int):
            self._seconds = seconds
            # A client given a transport takes the transport's pool, not its own
            # `limits`, and httpx's default pool holds 100 connections, 20 of them kept
            # idle: past 100 requests out, the rest waited inside httpx while the
            # model's concurrency limit counted them as sent (the realistic bench's
            # 256 allowed ran 100 at the server, each answer 3 s later), and every
            # connection past 20 was closed after its answer and opened again.
            self._inner = httpx.HTTPTransport(limits=httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections))

        def handle_request(self, request):
            deadline = time.monotonic() + self._seconds
            response = self._inner.handle_request(request)
            response.stream = BodyBefore(response.stream, deadline, self._seconds,
                                         request)
            return response

        def close(self) -> None:
            self._inner.close()

    return DeadlineTransport


# The slowest download a batch job's answers may come at before it counts as stalled.
MIN_DOWNLOAD_BYTES_PER_S = 1 << 20


def read_whole_within(open_file, seconds: float, what: str) -> bytes:
    """The whole content of `open_file()` (a Beam `FileSystems.open`, so gs:// too), or
    a TransientModelError after `seconds`. The storage clients time out each socket
    read, not a download, so a server that trickles keeps a read alive for ever: the
    read runs in a daemon thread, which is left behind should it stall (a blocked
    socket read cannot be interrupted; it ends with the process or the server)."""
    from codeclm_beam.model.errors import TransientModelError
    outcome: dict = {}

    def read():
        try:
            with open_file() as f:
                outcome["data"] = f.read()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    reader = threading.Thread(target=read, name=f"read {what}", daemon=True)
    reader.start()
    reader.join(seconds)
    if reader.is_alive():
        raise TransientModelError(f"reading {what} took over {seconds:.0f} s "
                                  "(--request_timeout, plus 1 s a MiB): the storage "
                                  "server was still sending")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]
