"""A ThreadingHTTPServer on 127.0.0.1 that hands each request to an app function and logs it."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Seen:
    """One request as the server got it."""
    method: str
    path: str  # without the query, percent-decoded
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int = 0
    sent: int = 0  # body bytes written back

    def json(self):
        return json.loads(self.body)

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, [default])[0]


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunk: int = 64 * 1024
    delay: float = 0.0  # seconds between chunks: a slow body
    drop_after: int | None = None  # close the connection after this many body bytes
    stall: tuple[int, float] | None = None  # (after this many bytes, pause this long), once
    length: int | None = None  # Content-Length to announce (default: the body's)


def json_reply(doc, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                 json.dumps(doc).encode())


class LoopbackServer:
    def __init__(self, app: Callable[[Seen], Reply]):
        self.app = app
        self.log: list[Seen] = []
        self.in_flight = 0  # requests being answered right now
        self.max_in_flight = 0  # the most at once so far
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: pytest shows failures, not traffic
                pass

            def handle_one(self):
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.answer()
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                seen = Seen(self.command, unquote(parts.path),
                            parse_qs(parts.query, keep_blank_values=True),
                            {k.lower(): v for k, v in self.headers.items()}, body)
                with server._lock:
                    server.log.append(seen)
                reply = server.app(seen)
                seen.status = reply.status
                self.send_response(reply.status)
                headers = dict(reply.headers)
                headers.setdefault("Content-Length", str(
                    reply.length if reply.length is not None else len(reply.body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command == "HEAD":
                    return
                try:
                    self._write_body(seen, reply)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away (or was killed)

            def _write_body(self, seen: Seen, reply: Reply) -> None:
                data, stalled = reply.body, False
                for start in range(0, len(data), reply.chunk):
                    piece = data[start:start + reply.chunk]
                    if reply.drop_after is not None and seen.sent + len(piece) > reply.drop_after:
                        piece = piece[:max(0, reply.drop_after - seen.sent)]
                        self.wfile.write(piece)
                        seen.sent += len(piece)
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if reply.stall and not stalled and seen.sent >= reply.stall[0]:
                        stalled = True
                        self.wfile.flush()
                        time.sleep(reply.stall[1])
                    self.wfile.write(piece)
                    seen.sent += len(piece)
                    if reply.delay:
                        self.wfile.flush()
                        time.sleep(reply.delay)

            do_GET = do_POST = do_HEAD = do_PUT = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # a short poll: closing the server (every test does) waits for at most one poll
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def requests(self, path_prefix: str = "", method: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.log if s.path.startswith(path_prefix)
                    and (method is None or s.method == method)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
