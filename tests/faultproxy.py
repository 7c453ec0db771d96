"""An HTTP/1.1 proxy on 127.0.0.1 that sits between an S3 client and a real S3 server and injects faults.

Requests whose path contains `target` are counted; the faults follow a fixed schedule over that count, so a
test is deterministic: `schedule[n % len(schedule)]` is "ok", "drop" (close the connection without a reply,
as a reset or a dying load balancer does) or "503" (an S3 SlowDown reply). Everything else is forwarded.
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str, target: str, schedule: list[str]):
        up = urlparse(upstream)
        self.upstream = (up.hostname, up.port)
        self.target, self.schedule = target, list(schedule)
        self.counts = {"ok": 0, "drop": 0, "503": 0}
        self._n, self._lock = 0, threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, path: str) -> str:
        if self.target not in path:
            return "ok"
        with self._lock:
            action = self.schedule[self._n % len(self.schedule)]
            self._n += 1
            self.counts[action] += 1
        return action

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy._fault(self.path)
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
