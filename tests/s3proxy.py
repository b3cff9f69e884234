"""A counting layer in front of the tests' S3 server, on 127.0.0.1: every request is forwarded as
it came (headers, signature and body unchanged) and recorded (method, path, query, status, bytes),
so that tests can count what the code asks of object storage. ``fail_next`` makes it answer the
next GETs of a key prefix with an error, as a throttling or flaky store does; ``flaky`` makes it
answer a share of every kind of request with a throttling or server error, at random."""

from __future__ import annotations

import http.client
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


@dataclass
class Request:
    t: float
    method: str
    path: str     # /bucket/key, unquoted
    query: str
    status: int
    sent: int     # request body bytes
    received: int  # response body bytes


class CountingProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.faults: list[list] = []  # [path prefix, GETs left to fail, status]
        self.flaky_rate, self.flaky_rng = 0.0, random.Random(0)  # a share of all requests refused
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _fault(self) -> int | None:
                path = unquote(urlsplit(self.path).path)
                with proxy.lock:
                    if proxy.flaky_rate and proxy.flaky_rng.random() < proxy.flaky_rate:
                        status = proxy.flaky_rng.choice((503, 500))  # throttled, or a server error
                        proxy.requests.append(Request(time.time(), self.command, path, "", status, 0, 0))
                        return status
                if self.command != "GET":
                    return None
                with proxy.lock:
                    for f in proxy.faults:
                        if f[1] > 0 and path.startswith(f[0]):
                            f[1] -= 1
                            proxy.requests.append(Request(time.time(), "GET", path, "", f[2], 0, 0))
                            return f[2]
                return None

            def _forward(self):
                body = self._body()
                status = self._fault()
                if status is not None:
                    code = {403: b"AccessDenied", 503: b"SlowDown"}.get(status, b"InternalError")
                    msg = b"<Error><Code>" + code + b"</Code><Message>injected by the test proxy</Message></Error>"
                    self.send_response_only(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                # One handler per client connection (one thread): it keeps its own upstream connection.
                for attempt in range(2):
                    if getattr(self, "_up", None) is None:
                        self._up = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                    try:
                        self._up.request(self.command, self.path, body=body or None, headers=headers)
                        resp = self._up.getresponse()
                        data = resp.read()
                        break
                    except (http.client.HTTPException, ConnectionError, OSError):
                        self._up.close()
                        self._up = None
                        if attempt:
                            raise
                u = urlsplit(self.path)
                with proxy.lock:  # recorded before the client has its answer: counts are never late
                    proxy.requests.append(Request(time.time(), self.command, unquote(u.path), u.query,
                                                  resp.status, len(body), len(data)))
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="s3-proxy")
        self.thread.start()

    def mark(self) -> int:
        """Position in the request log, to count what happens after it."""
        with self.lock:
            return len(self.requests)

    def since(self, mark: int = 0, prefix: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.requests[mark:] if r.path.startswith(prefix)]

    def fail_next(self, prefix: str, times: int, status: int = 503) -> None:
        """Answer the next ``times`` GETs of paths under ``prefix`` (/bucket/key) with ``status``."""
        with self.lock:
            self.faults.append([prefix, times, status])

    def flaky(self, rate: float, seed: int = 0) -> None:
        """Answer a share ``rate`` of all requests (any method, any key; 0: none) with 503 SlowDown
        or 500 InternalError, drawn at random from ``seed``, as an overloaded store does."""
        with self.lock:
            self.flaky_rate, self.flaky_rng = rate, random.Random(seed)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()
            self.flaky_rate = 0.0

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
