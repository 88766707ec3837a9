"""An HTTP reverse proxy that injects API faults, for testing clients of an OpenAI-compatible server.

    with FaultProxy("http://127.0.0.1:8080/v1", fault_rate=0.5, seed=0) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, ...)   # same path as the upstream base URL
        ...
        proxy.stats()   # requests, faults by kind, upstream completions and deliveries per request body

Each request the proxy receives is faulted or not on a deterministic schedule: a `random.Random(seed)`
draw per request (probability `fault_rate`, at most `max_consecutive` faults in a row, so that a client
with enough retries always gets through), and the faulted requests cycle through `kinds` in order. The
n-th request received always gets the same treatment; which of several concurrent requests is the n-th
one is up to the client.

Fault kinds (before: the upstream never sees the request; after: the upstream completed it, i.e. it
was paid for, and the client does not get the answer, except for "slow"):
    429       before  429 Too Many Requests with `Retry-After: 0` or `1` (alternating)
    500       before  500 Internal Server Error (JSON error body)
    503       before  503 Service Unavailable (JSON error body)
    drop      before  the connection is closed without any response
    truncate  after   status and headers with the full Content-Length, half the body, then close
    slow      after   the full answer, `slow_delay` seconds late (meant to stay under the client's timeout)
    stall     after   nothing for `stall_delay` seconds (meant to exceed the client's timeout), then the
                      answer if the client is still there

Standard library only. Binds 127.0.0.1 on a free port and serves from a background thread.
"""

import collections
import hashlib
import http.client
import http.server
import json
import random
import socket
import threading
import time
import urllib.parse

KINDS = ("429", "500", "503", "drop", "truncate", "slow")
BEFORE_UPSTREAM = {"429", "500", "503", "drop"}
ALL_KINDS = (*KINDS, "stall")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization", "content-length", "host", "accept-encoding"}


def body_hash(body: bytes) -> str:
    """The identity of a request: the hash of its JSON body with sorted keys (bytes if not JSON)."""
    try:
        body = json.dumps(json.loads(body), sort_keys=True).encode()
    except ValueError:
        pass
    return hashlib.sha256(body).hexdigest()[:16]


class FaultProxy:
    """Reverse proxy in front of `upstream` (a base URL such as http://127.0.0.1:PORT/v1)."""

    def __init__(self, upstream: str, fault_rate: float = 0.5, kinds=KINDS, seed: int = 0,
                 max_consecutive: int = 3, slow_delay: float = 2.0, stall_delay: float = 5.0,
                 upstream_timeout: float = 600.0):
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown or not kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {ALL_KINDS}")
        if not 0 <= fault_rate <= 1:
            raise ValueError("fault_rate must be between 0 and 1")
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL (got {upstream!r})")
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.path_prefix = parsed.path.rstrip("/")
        self.fault_rate, self.kinds, self.seed = fault_rate, tuple(kinds), seed
        self.max_consecutive, self.slow_delay, self.stall_delay = max_consecutive, slow_delay, stall_delay
        self.upstream_timeout = upstream_timeout
        self.lock = threading.Lock()
        self.server = self.thread = None
        self.reset()

    # --- schedule and bookkeeping ---------------------------------------------------------------------

    def reset(self, seed: int | None = None):
        """Zero every counter and restart the fault schedule (from `seed`, default the constructor's)."""
        with self.lock:
            self.rng = random.Random(self.seed if seed is None else seed)
            self.received = 0           # requests received from the client
            self.forwarded = 0          # requests sent upstream
            self.completed = 0          # upstream answered 200: a completed (paid) call
            self.delivered = 0          # full 200 answers that reached the client
            self.faults = collections.Counter()              # kind -> injected
            self.completed_by_body = collections.Counter()   # body hash -> upstream completions
            self.delivered_by_body = collections.Counter()   # body hash -> full answers delivered
            self.lost_by_body = collections.Counter()        # body hash -> completions lost by a fault after upstream
            self.abandoned_by_body = collections.Counter()   # body hash -> unfaulted answers the client left before
            self.upstream_seconds_max = 0.0                   # the slowest forwarded request's upstream time
            self.statuses = collections.Counter()            # upstream status -> count
            self.schedule = []                                # (request number, kind or None, body hash)
            self._consecutive = 0
            self._cycle = 0
            self._retry_after = 0

    def _decide(self, digest: str):
        with self.lock:
            self.received += 1
            draw = self.rng.random()  # one draw per request, so the schedule depends only on the count
            kind = None
            if self._consecutive < self.max_consecutive and draw < self.fault_rate:
                kind = self.kinds[self._cycle % len(self.kinds)]
                self._cycle += 1
                self.faults[kind] += 1
                self._consecutive += 1
            else:
                self._consecutive = 0
            self.schedule.append((self.received, kind, digest))
            retry_after = str(self._retry_after)
            if kind == "429":
                self._retry_after = 1 - self._retry_after
            return kind, retry_after

    def stats(self) -> dict:
        with self.lock:
            faulted = sum(self.faults.values())
            failed = faulted - self.faults["slow"]  # "slow" still answers in full
            return {"received": self.received, "forwarded": self.forwarded, "completed": self.completed,
                    "delivered": self.delivered, "faults": dict(self.faults), "faulted": faulted,
                    "fault_share": faulted / self.received if self.received else 0.0,
                    "failed_share": failed / self.received if self.received else 0.0,
                    "completed_by_body": dict(self.completed_by_body),
                    "delivered_by_body": dict(self.delivered_by_body),
                    "lost_by_body": dict(self.lost_by_body), "abandoned_by_body": dict(self.abandoned_by_body),
                    "upstream_seconds_max": self.upstream_seconds_max,
                    "upstream_statuses": dict(self.statuses)}

    # --- server ---------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path_prefix}"

    def __enter__(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real API servers; faults close the connection

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._handle(self, b"")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                proxy._handle(self, self.rfile.read(length) if length else b"")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="fault-proxy", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _forward(self, handler, body: bytes, digest: str):
        """Send the request upstream; return (status, reason, headers, body). Counts a 200 as completed."""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = f"{self.upstream_host}:{self.upstream_port}"
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port,
                                                timeout=self.upstream_timeout)
        with self.lock:
            self.forwarded += 1
        start = time.monotonic()
        try:
            connection.request(handler.command, handler.path, body=body if handler.command != "GET" else None,
                               headers=headers)
            reply = connection.getresponse()
            data = reply.read()
            result = reply.status, reply.reason, reply.getheaders(), data
        finally:
            connection.close()
        with self.lock:
            self.upstream_seconds_max = max(self.upstream_seconds_max, time.monotonic() - start)
            self.statuses[result[0]] += 1
            if result[0] == 200 and handler.command == "POST":
                self.completed += 1
                self.completed_by_body[digest] += 1
        return result

    def _handle(self, handler, body: bytes):
        digest = body_hash(body)
        kind, retry_after = self._decide(digest) if handler.command == "POST" else (None, "0")
        status = None  # the upstream's, once forwarded
        try:
            if kind in ("429", "500", "503"):
                status = int(kind)
                message = {"429": "rate limited", "500": "internal error", "503": "overloaded"}[kind]
                payload = json.dumps({"error": {"message": f"{message} (injected by fault_proxy)",
                                                "type": "injected_fault", "code": status}}).encode()
                handler.send_response(status)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(payload)))
                if kind == "429":
                    handler.send_header("Retry-After", retry_after)
                handler.end_headers()
                handler.wfile.write(payload)
                handler.wfile.flush()
                return
            if kind == "drop":
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            status, reason, headers, data = self._forward(handler, body, digest)
            if kind in ("truncate", "stall") and status == 200:
                with self.lock:
                    self.lost_by_body[digest] += 1  # the stalled answer is sent late, but nobody waits for it
            if kind == "slow":
                time.sleep(self.slow_delay)
            if kind == "stall":
                time.sleep(self.stall_delay)
            handler.send_response(status, reason)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP:
                    handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(data)))
            if kind == "truncate":
                handler.send_header("Connection", "close")
                handler.end_headers()
                handler.wfile.write(data[:len(data) // 2])
                handler.wfile.flush()
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
            if status == 200 and handler.command == "POST" and kind != "stall":
                with self.lock:
                    self.delivered += 1
                    self.delivered_by_body[digest] += 1
        except OSError:  # the client went away (after a timeout of its own): nothing to answer
            handler.close_connection = True
            if kind not in ("truncate", "stall") and status == 200 and handler.command == "POST":
                with self.lock:
                    self.abandoned_by_body[digest] += 1
