"""A loopback HTTP server for contract tests: it speaks a real wire protocol on
127.0.0.1 and records every request, so the real client library can be driven at it."""
from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Callable

# (method, path, json body, headers) -> (status, json body, extra headers)
Responder = Callable[[str, str, dict, dict], tuple[int, dict, dict]]


class RecordingServer:
    def __init__(self, responder: Responder):
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as separate writes; with Nagle's algorithm on,
            # the client's delayed ACK adds ~40 ms to every keep-alive request.
            disable_nagle_algorithm = True

            def _handle(self, method):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append(
                        {"method": method, "path": self.path, "body": body,
                         "headers": headers})
                status, payload, extra = responder(method, self.path, body, headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._handle("POST")

            def do_GET(self):
                self._handle("GET")

            def do_PUT(self):
                self._handle("PUT")

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
