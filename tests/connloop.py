"""A client that opens a new connection every millisecond, for restart and handover tests.

`ConnectionLoop(address, count)` runs in one thread with a selector: every `interval` it starts a
non-blocking connect to `address`, sends a unique 16-byte payload once connected, waits for the
echo, compares it and closes. Starts do not wait for earlier operations, so a connection queued
in a listen backlog during a restart does not hold back the next ones: the loop sees the switch
the way a fleet of independent clients does. Bounded: `count` operations, each given
`op_timeout`, and the whole loop `count * interval + op_timeout` plus a margin.

Every operation ends in exactly one outcome: `ok`, `refused` (connect refused: nobody listening),
`reset` (connection reset at any step), `eof` (closed before the whole echo came back),
`mismatch` (other bytes came back), `timeout` or `other`. `wait_s` is the time from the connect to
the echo of each `ok` operation: the longest is the longest wait a client saw.
"""
import errno
import selectors
import socket
import threading
import time

PAYLOAD_BYTES = 16
OUTCOMES = ("ok", "refused", "reset", "eof", "mismatch", "timeout", "other")


def _ms(seconds):
    return round(seconds * 1000, 1)


class _Op:
    __slots__ = ("index", "sock", "started", "payload", "received")

    def __init__(self, index, sock, started):
        self.index = index
        self.sock = sock
        self.started = started
        self.payload = b"%016d" % index
        self.received = b""


class ConnectionLoop:
    def __init__(self, address, count, interval=0.001, op_timeout=15.0):
        self.address = address
        self.count = count
        self.interval = interval
        self.op_timeout = op_timeout
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.waits = []  # (started, wait_s) of every ok operation, monotonic seconds
        self.failures = []  # (index, outcome, detail) of the first 20 failed operations
        self.started_ops = 0
        self.elapsed = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # -- control ----------------------------------------------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        """Start no further operations; the ones in flight still finish or time out."""
        self._stop.set()

    def join(self):
        limit = self.count * self.interval * 4 + self.op_timeout + 30
        self._thread.join(limit)
        assert not self._thread.is_alive(), "connection loop did not finish"
        return self

    def done(self):
        with self._lock:
            return sum(self.outcomes.values())

    def wait_for_done(self, count, timeout=30.0):
        deadline = time.monotonic() + timeout
        while self.done() < count and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        return self.done() >= count

    def figures(self, quiet_until=None):
        """Outcome counts and waits; with `quiet_until` (a monotonic instant before the first
        switch) also the longest wait of the operations started before it: the noise floor of
        this machine at that moment, to read the longest wait against."""
        waits = sorted(wait for _, wait in self.waits)
        failed = sum(n for outcome, n in self.outcomes.items() if outcome != "ok")
        figures = dict(self.outcomes, ops=self.done(), failed=failed,
                       longest_wait_ms=_ms(waits[-1]) if waits else None,
                       p99_ms=_ms(waits[int(len(waits) * 0.99) - 1]) if waits else None,
                       median_ms=_ms(waits[len(waits) // 2]) if waits else None,
                       rate_per_s=round(self.done() / self.elapsed) if self.elapsed else None)
        if quiet_until is not None:
            quiet = [wait for started, wait in self.waits if started < quiet_until]
            figures["longest_wait_before_switch_ms"] = _ms(max(quiet)) if quiet else None
        return figures

    # -- the loop ---------------------------------------------------------------------------------

    def _run(self):
        sel = selectors.DefaultSelector()
        begin = time.monotonic()
        hard_deadline = begin + self.count * self.interval * 3 + self.op_timeout + 20
        next_start = begin
        index = 0
        try:
            while time.monotonic() < hard_deadline:
                now = time.monotonic()
                starting = index < self.count and not self._stop.is_set()
                if starting and now >= next_start:
                    self._open(sel, index, now)
                    index += 1
                    # Behind by more than a few intervals (a GIL or CPU stall): do not burst.
                    next_start = max(next_start + self.interval, now - 5 * self.interval)
                    continue
                if not starting and not sel.get_map():
                    break
                timeout = max(0.0, next_start - now) if starting else 0.05
                for key, mask in sel.select(timeout):
                    self._step(sel, key.data, mask)
                self._expire(sel, time.monotonic())
        finally:
            for key in list(sel.get_map().values()):
                self._finish(sel, key.data, "timeout", "loop deadline")
            sel.close()
            self.started_ops = index
            self.elapsed = time.monotonic() - begin

    def _open(self, sel, index, now):
        sock = socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
        sock.setblocking(False)
        op = _Op(index, sock, now)
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sel.register(sock, selectors.EVENT_WRITE, op)  # so _finish can unregister it
            self._finish(sel, op, self._classify(code), errno.errorcode.get(code, code))
            return
        sel.register(sock, selectors.EVENT_WRITE, op)

    def _step(self, sel, op, mask):
        sock = op.sock
        try:
            if mask & selectors.EVENT_WRITE:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._finish(sel, op, self._classify(code), errno.errorcode.get(code, code))
                    return
                sock.send(op.payload)  # 16 bytes into an empty send buffer: never partial
                sel.modify(sock, selectors.EVENT_READ, op)
                return
            data = sock.recv(PAYLOAD_BYTES - len(op.received))
        except OSError as exc:
            self._finish(sel, op, self._classify(exc.errno), repr(exc))
            return
        if not data:
            self._finish(sel, op, "eof", "after %d bytes" % len(op.received))
            return
        op.received += data
        if len(op.received) == PAYLOAD_BYTES:
            ok = op.received == op.payload
            self._finish(sel, op, "ok" if ok else "mismatch", op.received)

    def _expire(self, sel, now):
        for key in list(sel.get_map().values()):
            if now - key.data.started > self.op_timeout:
                self._finish(sel, key.data, "timeout", "%.1fs" % self.op_timeout)

    @staticmethod
    def _classify(code):
        if code == errno.ECONNREFUSED:
            return "refused"
        if code in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
            return "reset"
        return "other"

    def _finish(self, sel, op, outcome, detail):
        sel.unregister(op.sock)
        op.sock.close()
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome == "ok":
                self.waits.append((op.started, time.monotonic() - op.started))
            elif len(self.failures) < 20:
                self.failures.append((op.index, outcome, detail))
