"""A load driver: N client threads doing real etcd operations through the gateway.

Each client writes a unique key with a unique value (`PUT /v3/kv/put`), then reads it back
(`POST /v3/kv/range`) and checks the value, over etcd's JSON gateway (grpc-gateway on the client
port: plain HTTP/1.1 with base64 keys and values, so no gRPC client is needed). Two modes:

* `keepalive=False`: every attempt is a new TCP connection (`Connection: close`), so every op
  goes through the gateway's accept, endpoint choice and dial;
* `keepalive=True`: each client keeps one HTTP/1.1 connection and opens a new one only after a
  failure, the way a long-lived etcd client behaves.

A failed attempt (refused, reset, EOF before a whole response, timeout, non-200 status) is retried
once on a new connection after RETRY_BACKOFF (100 ms), and both outcomes are recorded:
`first_error` is what a client without retries would have seen, `error` what a client that
retries once sees. A put counts as acknowledged only when some attempt returned 200; every
acknowledged put must later be read back with `verify_acknowledged`. Every loop is bounded by
an op count and a deadline.
"""
import base64
import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

RECV_BYTES = 65536
MAX_RESPONSE_BYTES = 16 << 20
RETRY_BACKOFF = 0.1


class OpError(Exception):
    """One failed attempt; `kind` is "conn" (the path to etcd failed) or "etcd" (etcd said no)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key with this prefix": the prefix with its last byte + 1."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class HttpConn:
    """One HTTP/1.1 connection to `addr`, requests framed by Content-Length (grpc-gateway's)."""

    def __init__(self, addr: str, timeout: float):
        host, port = addr.rsplit(":", 1)
        self.timeout = timeout
        try:
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except OSError as exc:
            raise OpError("conn", f"connect: {type(exc).__name__}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self):
        self.sock.close()

    def request(self, path: str, body: dict, keepalive: bool) -> dict:
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                f"Connection: {'keep-alive' if keepalive else 'close'}\r\n\r\n")
        try:
            self.sock.sendall(head.encode() + payload)
            status, reply = self._read_response()
        except OSError as exc:
            raise OpError("conn", f"{type(exc).__name__}: {exc}") from None
        try:
            document = json.loads(reply or b"{}")
        except ValueError:
            raise OpError("conn", f"garbled body {reply[:80]!r}") from None
        if status != 200:
            raise OpError("etcd", f"{status} {document.get('message', reply[:80])}")
        return document

    def _fill(self):
        chunk = self.sock.recv(RECV_BYTES)
        if not chunk:
            raise OpError("conn", f"EOF after {len(self.buffer)} bytes of a response")
        self.buffer += chunk
        if len(self.buffer) > MAX_RESPONSE_BYTES:
            raise OpError("conn", "response too large")

    def _read_response(self):
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise OpError("conn", f"garbled status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return int(parts[1]), self._read_chunked()
        return int(parts[1]), self._take(int(headers.get("content-length", "0")))

    def _take(self, length: int) -> bytes:
        while len(self.buffer) < length:
            self._fill()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return data

    def _read_chunked(self) -> bytes:
        """Go's net/http switches to chunked encoding for bodies larger than its buffer."""
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                self._fill()
            size_line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            chunk = self._take(size + 2)
            if size == 0:
                return body  # no trailers from grpc-gateway
            body += chunk[:-2]


@dataclass
class Op:
    client: int
    seq: int
    kind: str                 # "put" | "get"
    key: str
    value: str
    started: float            # monotonic
    ended: float = 0.0
    ok: bool = False
    attempts: int = 0
    first_error: Optional[str] = None
    first_kind: Optional[str] = None   # "conn" | "etcd" | "mismatch"
    error: Optional[str] = None
    member_id: Optional[int] = None


class LoadDriver:
    """`clients` threads doing put-then-get against `addr` until stopped, `max_ops` ops or
    `duration` seconds, whichever comes first."""

    def __init__(self, addr: str, prefix: str, clients: int = 6, keepalive: bool = False,
                 duration: float = 30.0, max_ops: int = 200_000, op_timeout: float = 3.0,
                 pace: float = 0.005, value_bytes: int = 64, seed: int = 0):
        self.addr, self.prefix, self.clients, self.keepalive = addr, prefix, clients, keepalive
        self.duration, self.max_ops, self.op_timeout, self.pace = duration, max_ops, op_timeout, pace
        self.value_bytes = value_bytes
        self.rng = random.Random(seed)
        self.ops: List[Op] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self.started = self.stopped = 0.0

    # -- running ---------------------------------------------------------------------------
    def start(self) -> "LoadDriver":
        self.started = time.monotonic()
        self._deadline = self.started + self.duration
        for index in range(self.clients):
            thread = threading.Thread(target=self._client, args=(index, self.rng.random()),
                                      name=f"load-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self, join_timeout: float = 30.0) -> "LoadDriver":
        self._stop.set()
        for thread in self._threads:
            thread.join(join_timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise AssertionError(f"load clients did not finish in {join_timeout}s: {alive}")
        self.stopped = time.monotonic()
        return self

    def successes_since(self, when: float) -> int:
        with self._lock:
            return sum(1 for op in self.ops if op.ok and op.started >= when)

    def _client(self, index: int, salt: float):
        conn: List[Optional[HttpConn]] = [None]
        seq = 0
        per_client = max(1, self.max_ops // (2 * self.clients))
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline and seq < per_client:
                key = f"{self.prefix}/{index}/{seq}"
                value = f"v-{index}-{seq}-{salt:.12f}-".ljust(self.value_bytes, "x")
                put = self._run(conn, Op(index, seq, "put", key, value, time.monotonic()))
                if put.ok:
                    self._run(conn, Op(index, seq, "get", key, value, time.monotonic()))
                seq += 1
                if self.pace:
                    self._stop.wait(self.pace)
        finally:
            if conn[0] is not None:
                conn[0].close()

    def _run(self, conn, op: Op) -> Op:
        for attempt in (1, 2):
            op.attempts = attempt
            try:
                op.member_id = self._attempt(conn, op)
                op.ok = True
                break
            except OpError as exc:
                if conn[0] is not None:
                    conn[0].close()
                    conn[0] = None
                if attempt == 1:
                    op.first_error, op.first_kind = exc.reason, exc.kind
                    # Back off before the retry, as clients do (grpc-go waits too). Without it a
                    # retry within milliseconds of a SIGKILL can still complete a handshake with
                    # the dying member's listening socket and then be reset by it.
                    self._stop.wait(RETRY_BACKOFF)
                op.error = f"{exc.kind}: {exc.reason}"
        if op.ok:
            op.error = None
        op.ended = time.monotonic()
        with self._lock:
            self.ops.append(op)
        return op

    def _attempt(self, conn, op: Op) -> int:
        if conn[0] is None:
            conn[0] = HttpConn(self.addr, self.op_timeout)
            with self._lock:
                self.connections += 1
        try:
            if op.kind == "put":
                reply = conn[0].request("/v3/kv/put", {"key": b64(op.key), "value": b64(op.value)},
                                        self.keepalive)
            else:
                reply = conn[0].request("/v3/kv/range", {"key": b64(op.key)}, self.keepalive)
                values = [base64.b64decode(kv["value"]).decode() for kv in reply.get("kvs", [])]
                if values != [op.value]:
                    raise OpError("mismatch", f"read {values!r}, wrote {op.value!r}")
        finally:
            if not self.keepalive and conn[0] is not None:
                conn[0].close()
                conn[0] = None
        return int(reply.get("header", {}).get("member_id", 0))

    # -- checking --------------------------------------------------------------------------
    def acknowledged(self) -> Dict[str, str]:
        return {op.key: op.value for op in self.ops if op.kind == "put" and op.ok}

    def verify_acknowledged(self, addr: str, timeout: float = 20.0):
        """Read every key under the prefix (one range, retried until `timeout`) and compare.

        Returns (number of acknowledged puts checked, their bytes, list of lost/wrong keys)."""
        expected = self.acknowledged()
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = HttpConn(addr, 5.0)
                try:
                    reply = conn.request("/v3/kv/range", {"key": b64(self.prefix + "/"),
                                                          "range_end": prefix_end(self.prefix + "/")},
                                         False)
                finally:
                    conn.close()
                break
            except OpError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        stored = {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
                  for kv in reply.get("kvs", [])}
        lost = sorted(key for key, value in expected.items() if stored.get(key) != value)
        return len(expected), sum(len(v) for v in expected.values()), lost

    def figures(self, fault_at: Optional[float] = None) -> dict:
        """Counts, latencies and the longest stretch without a successful op completing."""
        ops = sorted(self.ops, key=lambda op: op.started)
        ok_ends = sorted(op.ended for op in ops if op.ok)
        marks = [self.started] + ok_ends + [self.stopped or time.monotonic()]
        gaps = [(b - a, a) for a, b in zip(marks, marks[1:])]
        longest, gap_at = max(gaps) if gaps else (0.0, self.started)
        latencies = sorted(op.ended - op.started for op in ops if op.ok)

        def pct(p):
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) \
                if latencies else None
        first_failed = [op for op in ops if op.first_error]
        out = {
            "ops": len(ops), "puts_acked": sum(1 for op in ops if op.kind == "put" and op.ok),
            "failed_first": len(first_failed), "failed_final": sum(1 for op in ops if not op.ok),
            "conn_errors_first": sum(1 for op in first_failed if op.first_kind == "conn"),
            "etcd_errors_first": sum(1 for op in first_failed if op.first_kind == "etcd"),
            "mismatches": sum(1 for op in ops if op.first_kind == "mismatch"),
            "connections": self.connections,
            "longest_gap_s": round(longest, 3), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
        }
        if fault_at is not None:
            out["gap_start_after_fault_s"] = round(gap_at - fault_at, 3)
            late = [op.started - fault_at for op in first_failed if op.started >= fault_at]
            out["last_failure_after_fault_s"] = round(max(late), 3) if late else None
        return out

    def errors(self, limit: int = 12) -> List[str]:
        """A sample of failed attempts for assertion messages, final failures first."""
        failed = sorted((op for op in self.ops if op.first_error), key=lambda op: op.ok)
        return [f"{op.kind} {op.key} t={op.started - self.started:.3f}s first={op.first_error!r} "
                f"final={op.error!r}" for op in failed][:limit]
