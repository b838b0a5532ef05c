"""A small fault-injecting HTTP proxy in front of the loopback S3 server.

Requests for keys containing a `flaky` marker fail with 503 SlowDown the first N times; keys
containing a `broken` marker always fail with 500 InternalError. Further faults are injected per
S3 operation with `inject(op, key_contains, status, times)`: e.g. 403 AccessDenied to every object
GET, or 503 to the one DELETE of a compaction's old file; `inject(..., pattern=regex, skip=n)`
fails exactly the (n+1)-th request whose key matches (the fault matrix picks one request of a
recorded run this way). `throttle(every=4)` answers 503 SlowDown to every 4th request of any kind.
Everything else is forwarded byte for byte, so boto3, pyarrow and DuckDB talk S3 to it exactly as
to AWS.

Keys as the proxy reports and matches them: "/bucket/key" for object requests, "/bucket/<prefix>"
for a LIST (its prefix parameter), and the space-separated keys of a batch delete.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

SLOW_DOWN = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"""
INTERNAL = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>"""
ACCESS_DENIED = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"""

ERROR_BODIES = {500: INTERNAL, 503: SLOW_DOWN, 403: ACCESS_DENIED}
DROP = 0  # a fault "status" that closes the connection without any answer

# S3 operations as the proxy tells them apart (what a fault is injected into).
OPERATIONS = ("GET", "HEAD", "PUT", "COPY", "POST", "DELETE", "LIST")


def s3_operation(method: str, path: str, headers) -> str:
    """GET (object), HEAD, PUT (object or part), COPY (server-side), POST (multipart), DELETE (one
    object, or a batch: DeleteObjects), LIST."""
    key_path, _, query = path.partition("?")
    is_bucket_level = key_path.strip("/").count("/") == 0
    if method == "GET" and (is_bucket_level or "list-type" in query):
        return "LIST"
    if method == "PUT" and headers.get("x-amz-copy-source"):
        return "COPY"
    if method == "POST" and query.split("&")[0].split("=")[0] == "delete":
        return "DELETE"
    return method


def batch_delete_keys(body: bytes | None) -> list[str]:
    import re
    from html import unescape

    return [unescape(k) for k in re.findall(r"<Key>(.*?)</Key>", (body or b"").decode("utf-8", "replace"))]


@dataclass
class Fault:
    op: str  # one of OPERATIONS, or "*" for any
    key_contains: str  # substring of "/bucket/key" ("" = every key)
    status: int  # 403, 500, 503, or DROP
    times: int | None  # None = every matching request
    served: int = 0
    pattern: "re.Pattern[str] | None" = None  # when set: the whole key must match it
    skip: int = 0  # let this many matching requests through before failing
    seen: int = 0

    def matches(self, op: str, key_path: str) -> bool:
        """Called once per request (under the proxy's lock): counts the matches it lets through."""
        if self.op not in ("*", op) or self.key_contains not in key_path:
            return False
        if self.pattern is not None and not self.pattern.fullmatch(key_path):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        return self.times is None or self.served < self.times


class FaultyS3Proxy:
    def __init__(self, upstream: str, flaky_marker: str = "flaky", flaky_failures: int = 3, broken_marker: str = "broken"):
        self.upstream = urlparse(upstream)
        self.flaky_marker, self.flaky_failures, self.broken_marker = flaky_marker, flaky_failures, broken_marker
        self.failures_served: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.operations: list[tuple[str, str]] = []  # (operation, /bucket/key) of every request, in order
        self.faults: list[Fault] = []
        self.throttle_every = 0  # answer 503 SlowDown to every n-th request (0 = off)
        self.throttled = 0
        self._count = 0
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
                op = s3_operation(self.command, path, self.headers)
                key_path = unquote(path.partition("?")[0])
                if op == "LIST":
                    prefix = parse_qs(path.partition("?")[2]).get("prefix", [""])[0]
                    key_path = key_path.rstrip("/") + "/" + prefix
                if op == "DELETE" and self.command == "POST":
                    # A batch delete matches a fault when any of its keys does.
                    key_path = " ".join(f"{key_path.rstrip('/')}/{k}" for k in batch_delete_keys(body)) or key_path
                with proxy._lock:
                    proxy.requests[path] += 1
                    proxy.operations.append((op, key_path))
                    proxy._count += 1
                    fail = None
                    if proxy.throttle_every and proxy._count % proxy.throttle_every == 0:
                        fail = 503
                        proxy.throttled += 1
                    elif op == "GET" and proxy.broken_marker in path:
                        fail = 500
                    elif op == "GET" and proxy.flaky_marker in path and proxy.failures_served[path] < proxy.flaky_failures:
                        fail = 503
                    else:
                        for fault in proxy.faults:
                            if fault.matches(op, key_path):
                                fault.served += 1
                                fail = fault.status
                                break
                    if fail is not None:
                        proxy.failures_served[path] += 1
                if fail == DROP:
                    self.close_connection = True
                    return
                if fail is not None:
                    payload = ERROR_BODIES[fail]
                    self.send_response(fail)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
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
                # A HEAD answer has no body but tells the object's size: pass that on unchanged.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def inject(self, op: str, key_contains: str = "", status: int = 503, times: int | None = None,
               pattern: str | None = None, skip: int = 0) -> Fault:
        """Answer `status` (or drop the connection) to matching requests; `times=None`: every one.
        `pattern`: a regex the whole key must match; `skip`: matching requests let through first."""
        if op != "*" and op not in OPERATIONS:
            raise ValueError(f"unknown S3 operation {op!r}: one of {OPERATIONS} or '*'")
        if status not in (DROP, *ERROR_BODIES):
            raise ValueError(f"unknown fault status {status!r}: one of {sorted(ERROR_BODIES)} or DROP")
        fault = Fault(op, key_contains, status, times, pattern=re.compile(pattern) if pattern else None, skip=skip)
        with self._lock:
            self.faults.append(fault)
        return fault

    def throttle(self, every: int) -> None:
        """Answer 503 SlowDown to every `every`-th request, of any kind (0 turns it off)."""
        with self._lock:
            self.throttle_every, self._count = every, 0

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            self.throttle_every = 0

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
