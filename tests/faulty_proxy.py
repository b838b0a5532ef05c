"""A small fault-injecting HTTP proxy in front of the loopback S3 server.

Requests for keys containing a `flaky` marker fail with 503 SlowDown the first N times; keys
containing a `broken` marker always fail with 500 InternalError. Everything else is forwarded
byte for byte, so boto3 talks S3 to it exactly as to AWS.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"""
INTERNAL = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>"""


class FaultyS3Proxy:
    def __init__(self, upstream: str, flaky_marker: str = "flaky", flaky_failures: int = 3, broken_marker: str = "broken"):
        self.upstream = urlparse(upstream)
        self.flaky_marker, self.flaky_failures, self.broken_marker = flaky_marker, flaky_failures, broken_marker
        self.failures_served: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = self.path
                is_get_object = self.command == "GET" and "list-type" not in path and path.count("/") >= 2
                with proxy._lock:
                    proxy.requests[path] += 1
                    fail = None
                    if is_get_object and proxy.broken_marker in path:
                        fail = (500, INTERNAL)
                    elif is_get_object and proxy.flaky_marker in path and proxy.failures_served[path] < proxy.flaky_failures:
                        fail = (503, SLOW_DOWN)
                    if fail:
                        proxy.failures_served[path] += 1
                if fail:
                    status, payload = fail
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() in ("transfer-encoding", "connection", "content-length"):
                        continue
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
