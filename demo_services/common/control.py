"""A small HTTP control endpoint on loopback (stdlib, its own thread): JSON in, JSON out.

Routes are ``(method, path) -> handler(body) -> (status, doc)``; a handler raising ValueError
answers 400 with the message. Used for each replica's sickness and the load generator's
pause/resume.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[Any], tuple[int, Any]]
MAX_BODY_BYTES = 64 * 1024


class ControlServer:
    def __init__(self, host: str, port: int, routes: dict[tuple[str, str], Handler]) -> None:
        self.routes = routes
        owner = self

        class _Req(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                path = self.path.split("?", 1)[0]
                handler = owner.routes.get((self.command, path))
                if handler is None:
                    known = sorted(f"{m} {p}" for m, p in owner.routes)
                    return self._send(404, {"error": f"no route {self.command} {path}",
                                            "routes": known})
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    return self._send(413, {"error": "body too large"})
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw.strip() else None
                except ValueError as exc:
                    return self._send(400, {"error": f"not JSON: {exc}"})
                try:
                    status, doc = handler(body)
                except ValueError as exc:
                    return self._send(400, {"error": str(exc)})
                self._send(status, doc)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def _send(self, status: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self.httpd = ThreadingHTTPServer((host, port), _Req)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="control",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
