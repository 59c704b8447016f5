"""A loopback front for gcp-storage-emulator that enforces Cloud Storage's request
preconditions, which the emulator ignores. Contract-test infrastructure, written from
Cloud Storage's documentation (JSON API, "Request preconditions"), not from our client:

- `ifGenerationMatch=G` on an object write (a media, multipart or resumable upload) or
  delete: the operation happens only if the object's live generation is G; G = 0
  means "only if no live object has that name".
- `ifGenerationNotMatch=G`: only if the live generation is not G.
- A precondition that does not hold fails with HTTP 412 Precondition Failed, an error
  body `{"error": {"code": 412, "message": ..., "errors": [{"reason":
  "conditionNotMet", ...}]}}`, and changes nothing; on a delete of a missing object
  the answer is 404 whatever the precondition.

Everything else is passed through to the emulator unchanged, at the pace a test sets
(`trickled`: a server that sends a download a few bytes at a time). Checking and forwarding
happen under one lock, so a conditional write is atomic as it is on the service.
"""
from __future__ import annotations

import email.parser
import http.client
import http.server
import json
import re
import threading
import time
import urllib.parse

_OBJECT_WRITE_PATH = "/upload/storage/v1/b/"
_OBJECT_PATH = "/storage/v1/b/"
_HOP_BY_HOP = {"connection", "transfer-encoding", "keep-alive", "content-length"}


class PreconditionFront:
    def __init__(self, emulator_host: str, port: int = 0):
        self._emulator = urllib.parse.urlsplit(emulator_host)
        self._emulator_address = emulator_host.rstrip("/")
        self._lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, answer = front.handle(self.command, self.path,
                                                       dict(self.headers), body)
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                pace = front.trickle_pace(self.command, self.path)
                if pace is None:
                    self.wfile.write(answer)
                    return
                piece, every_s = pace
                for start in range(0, len(answer), piece):
                    self.wfile.write(answer[start:start + piece])
                    self.wfile.flush()
                    time.sleep(every_s)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        # Downloads whose path matches a pattern here are sent `piece` bytes every
        # `every_s` seconds: a server that trickles, each read within any timeout.
        self.trickled: dict[str, tuple[int, float]] = {}
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()

    def trickle_pace(self, method: str, path: str):
        if method != "GET" or "alt=media" not in path:
            return None
        name = urllib.parse.unquote(path)
        return next((pace for pattern, pace in self.trickled.items()
                     if re.search(pattern, name)), None)

    # -- the contract

    def handle(self, method: str, path: str, headers: dict, body: bytes):
        url = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(url.query)
        conditions = {k: int(v[0]) for k, v in query.items()
                      if k in ("ifGenerationMatch", "ifGenerationNotMatch")}
        target = self._target(method, url.path, query, headers, body)
        if not conditions or target is None:
            return self._forward(method, path, headers, body)
        with self._lock:
            live = self._live_generation(*target)
            if method == "DELETE" and live == 0:
                return self._forward(method, path, headers, body)  # the emulator's 404
            match = conditions.get("ifGenerationMatch")
            not_match = conditions.get("ifGenerationNotMatch")
            if (match is not None and live != match) or \
                    (not_match is not None and live == not_match):
                return 412, [("Content-Type", "application/json")], json.dumps({
                    "error": {"code": 412, "message": "At least one of the pre-conditions "
                              "you specified did not hold.", "errors": [{
                                  "message": "At least one of the pre-conditions you "
                                  "specified did not hold.", "domain": "global",
                                  "reason": "conditionNotMet", "locationType": "header",
                                  "location": "If-Match"}]}}).encode()
            return self._forward(method, path, headers, body)

    def _target(self, method, path, query, headers, body):
        """(bucket, object) a conditional request writes or deletes, else None."""
        if path.startswith(_OBJECT_WRITE_PATH) and method in ("POST", "PUT"):
            bucket = path[len(_OBJECT_WRITE_PATH):].split("/", 1)[0]
            name = (query.get("name") or [None])[0] or self._name_in_body(headers, body)
            return (bucket, name) if name else None
        if path.startswith(_OBJECT_PATH) and method == "DELETE" and "/o/" in path:
            bucket, _, name = path[len(_OBJECT_PATH):].partition("/o/")
            return bucket, urllib.parse.unquote(name)
        return None

    @staticmethod
    def _name_in_body(headers, body) -> str | None:
        kind = headers.get("Content-Type") or headers.get("content-type") or ""
        try:
            if kind.startswith("multipart/"):
                message = email.parser.BytesParser().parsebytes(
                    b"Content-Type: " + kind.encode() + b"\r\n\r\n" + body)
                first = message.get_payload()[0].get_payload(decode=True)
                return json.loads(first).get("name")
            if kind.startswith("application/json"):
                return json.loads(body or b"{}").get("name")
        except (ValueError, IndexError, AttributeError, TypeError):
            return None
        return None

    def _live_generation(self, bucket: str, name: str) -> int:
        status, _, answer = self._forward(
            "GET", f"{_OBJECT_PATH}{bucket}/o/{urllib.parse.quote(name, safe='')}", {}, b"")
        return int(json.loads(answer)["generation"]) if status == 200 else 0

    def _forward(self, method, path, headers, body):
        connection = http.client.HTTPConnection(self._emulator.hostname,
                                                self._emulator.port, timeout=30)
        try:
            sent = {k: v for k, v in headers.items()
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
            connection.request(method, path, body=body or None, headers=sent)
            response = connection.getresponse()
            # Links the emulator gives (an object's mediaLink) name the front, as the
            # service's name the service: downloads come through here too.
            answer = response.read().replace(self._emulator_address.encode(),
                                             self.address.encode())
            return response.status, response.getheaders(), answer
        finally:
            connection.close()
