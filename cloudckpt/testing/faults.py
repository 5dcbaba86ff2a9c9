"""A fault-injecting HTTP proxy on 127.0.0.1, in front of any test server (moto, the GCS emulator).

    with FaultProxy("127.0.0.1", moto_port) as proxy:
        proxy.inject(status=503, times=3, method="PUT")        # the next 3 PUTs get 503 SlowDown
        proxy.inject(drop=True, times=1, path_re=r"partNumber")  # one upload_part loses its socket
        proxy.inject(drop_answer=True, method="PUT", path_re="manifest")  # done, answer lost
        proxy.inject(cut_body=1000, method="GET")       # a GET's answer dies after 1,000 bytes
        proxy.inject(ignore_range=True, method="GET")   # the server answers 200 with it all
        ... point the client at f"http://127.0.0.1:{proxy.port}" ...

Requests that match no active rule are forwarded unchanged. Faults happen on the server path:
the client sees real HTTP answers and real dropped connections.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}

_S3_BODIES = {
    503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
}


@dataclass
class Rule:
    """Fault ``times`` matching requests (``None``: forever)."""

    status: int | None = None
    times: int | None = 1
    method: str | None = None
    path_re: str | None = None
    delay: float | None = None
    drop: bool = False
    drop_answer: bool = False  # forward the request, then drop the connection unanswered
    cut_body: int | None = None  # answer, send this many bytes of the body, then drop
    ignore_range: bool = False  # forward without its Range header (a server that ignores it)
    body: bytes | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method and self.method != method:
            return False
        return not (self.path_re and not re.search(self.path_re, path))


@dataclass
class Seen:
    method: str
    path: str
    fault: str | None


@dataclass
class _State:
    target: tuple[str, int]
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, format: str, *args: Any) -> None:  # quiet
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

    def _handle(self) -> None:
        body = self._body()
        st = self.state
        rule = None
        with st.lock:
            for r in st.rules:
                if r.matches(self.command, self.path):
                    r.hits += 1
                    rule = r
                    break
            fault = None
            if rule is not None:
                fault = (
                    "drop"
                    if rule.drop
                    else "drop_answer"
                    if rule.drop_answer
                    else "cut_body"
                    if rule.cut_body is not None
                    else "ignore_range"
                    if rule.ignore_range
                    else (f"{rule.status}" if rule.status else "delay")
                )
            st.seen.append(Seen(self.command, self.path, fault))
        if rule is not None and rule.delay:
            time.sleep(rule.delay)
        if rule is not None and rule.drop:
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the socket die mid-request
            return
        if rule is not None and rule.status:
            payload = rule.body if rule.body is not None else _S3_BODIES.get(rule.status, b"")
            self.send_response(rule.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*st.target, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Host"] = f"{st.target[0]}:{st.target[1]}"
        headers["Content-Length"] = str(len(body))
        if rule is not None and rule.ignore_range:
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if rule is not None and rule.drop_answer:  # the server did it; the client never hears
            conn.close()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        # a HEAD answer has no body but the object's length (what size() reads)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if rule is not None and rule.cut_body is not None:  # the answer dies part-way
            self.wfile.write(data[: rule.cut_body])
            self.wfile.flush()
            conn.close()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle


class FaultProxy:
    """A threaded reverse proxy to ``host:port`` that injects the faults it is told to."""

    def __init__(self, host: str, port: int) -> None:
        self._state = _State((host, port))
        handler = type("Handler", (_Handler,), {"state": self._state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, **kwargs: Any) -> Rule:
        """Add a fault rule (see :class:`Rule`); rules are tried in the order added."""
        rule = Rule(**kwargs)
        with self._state.lock:
            self._state.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._state.lock:
            self._state.rules.clear()
            self._state.seen.clear()

    @property
    def seen(self) -> list[Seen]:
        with self._state.lock:
            return list(self._state.seen)
