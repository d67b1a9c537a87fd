"""In-process test support: the gateway's objects on a real Reactor with real loopback sockets.

No subprocess and no sleep: a test builds what it needs on one `Loop`, then runs the reactor
until a condition holds, failing after a bounded (real-time) deadline. Everything the test side
needs runs on that same reactor, in the test's own thread:

- `Loop`: the reactor, whose clock is monotonic time plus an offset a test may `advance()` (so a
  5 s request timeout or a retry delay passes at once), `run_until()`, a log captured in a
  string, and cleanup of everything handed out, ending with a descriptor-leak check.
- `Peer`: the test's end of a stream: sends what it is given, records what arrives, EOF, reset.
  As an upstream it may echo (passing a half-close on once its queue drained, as the relay must),
  answer one request, or stop reading.
- `Server`: a 127.0.0.1 listener (port 0) on the reactor that hands each client to a factory.
- `FakeHost`: a `gateway.RelayHost` in a few lines that records every report.
- `refusing_endpoint()`, `blackhole_endpoint()`: connects refused at once / never answered.
- `out_of_descriptors()`: RLIMIT_NOFILE lowered so that the next descriptor fails with EMFILE.
"""
import contextlib
import io
import os
import resource
import socket
import ssl
import struct
import time

import endpoints as ep
import gateway

EVENT_READ, EVENT_WRITE = gateway.EVENT_READ, gateway.EVENT_WRITE
CHECK_INTERVAL = 0.002  # how often run_until looks at its condition (real seconds)
SEND_SLICE_BYTES = 1 << 20


def open_fds():
    """The open descriptors (with the one listdir itself used, the lowest free one then)."""
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


class SteppingClock:
    """Monotonic time plus an offset the test advances: timers due far ahead fire at once,
    while everything else (select timeouts, the run_until deadline) still runs in real time."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return time.monotonic() + self.offset

    def advance(self, seconds):
        self.offset += seconds


class Loop:
    """One test's reactor and everything built on it; `close()` releases all of it and then
    checks that no descriptor was left open and that nothing was logged at error level."""

    def __init__(self, use_epoll=None):
        self.fds_before = open_fds()
        self.clock = SteppingClock()
        self.log_stream = io.StringIO()
        self.log = gateway.Log("debug", stream=self.log_stream)
        self.reactor = gateway.Reactor(clock=self.clock, log=self.log, use_epoll=use_epoll)
        self._cleanups = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(check_leaks=exc_type is None)

    def defer(self, cleanup):
        """Run `cleanup()` when the loop closes (last deferred, first run)."""
        self._cleanups.append(cleanup)

    def log_text(self):
        return self.log_stream.getvalue()

    # -- running --------------------------------------------------------------------------------

    def run_until(self, predicate, timeout=5.0, what=""):
        """Run the reactor until `predicate()` is true; fail the test after `timeout` seconds."""
        if predicate():
            return
        deadline = time.monotonic() + timeout
        outcome = []
        pending = [None]

        def check():
            if predicate():
                outcome.append(True)
            elif time.monotonic() > deadline:
                outcome.append(False)
            else:
                pending[0] = self.reactor.call_later(CHECK_INTERVAL, check)
                return
            self.reactor.stop()

        pending[0] = self.reactor.call_later(0.0, check)
        try:
            self.reactor.run()
        finally:
            self.reactor.cancel(pending[0])
        if not outcome:  # something else stopped the reactor (a drained shutdown)
            assert predicate(), "the reactor stopped before: %s" % (what or predicate)
            return
        assert outcome[-1], "timed out after %.1fs waiting for: %s" % (timeout, what or predicate)

    def run_until_stopped(self, timeout=5.0):
        """Run until something in the gateway stops the reactor (shutdown drained)."""
        expired = []
        timer = self.reactor.call_later(timeout, lambda: (expired.append(True), self.reactor.stop()))
        try:
            self.reactor.run()
        finally:
            self.reactor.cancel(timer)
        assert not expired, "the reactor did not stop within %.1fs" % timeout

    def turns(self, count=10):
        """Let events flow for `count` check intervals: for asserting that something does NOT
        happen (a paused relay reads nothing more), which no condition can wait for."""
        seen = [0]

        def counted():
            seen[0] += 1
            return seen[0] > count

        self.run_until(counted, what="%d turns" % count)

    # -- sockets --------------------------------------------------------------------------------

    def tcp_pair(self, rcvbuf=None):
        """(test side, gateway side) of a fresh loopback TCP connection; the gateway side is
        non-blocking, as Connections.open makes every accepted client. `rcvbuf` bounds the
        gateway side's receive buffer (set on the listener, so the accepted socket inherits it)."""
        with socket.socket() as listener:
            if rcvbuf:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            test_side = socket.create_connection(listener.getsockname())
            gateway_side, _ = listener.accept()
        gateway_side.setblocking(False)
        self.defer(test_side.close)
        self.defer(gateway_side.close)  # a no-op once the relay closed it
        return test_side, gateway_side

    def connect(self, address, **peer_options):
        """A Peer connected to `address` (a blocking connect: loopback answers at once)."""
        sock = socket.create_connection(address, timeout=5.0)
        return Peer(self, sock, **peer_options)

    def server(self, factory=None, rcvbuf=None):
        return Server(self, factory or echo, rcvbuf=rcvbuf)

    def refusing_endpoint(self):
        """An endpoint whose connects are refused at once: bound, never listening, and kept
        bound until the loop closes so that nobody else takes the port meanwhile."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.defer(sock.close)
        return endpoint_of(sock)

    def blackhole_endpoint(self):
        """An endpoint whose connects neither succeed nor fail (a member behind a dead link).

        Linux drops a SYN when the listener's accept queue is full (tcp_abort_on_overflow=0), so
        the dialer keeps waiting. listen(0) leaves room for one connection; the fillers take it.
        TCP_INFO of a listening socket reports the queue length (tcpi_unacked) and the backlog
        (tcpi_sacked), so fullness is checked, not guessed from a timeout."""
        listener = socket.socket()
        self.defer(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(8):
            info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            queued, backlog = struct.unpack_from("II", info, 24)
            if queued > backlog:
                return endpoint_of(listener)
            filler = socket.socket()
            self.defer(filler.close)
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        raise AssertionError("the blackhole's accept queue did not fill")

    # -- the end --------------------------------------------------------------------------------

    def close(self, check_leaks=True):
        while self._cleanups:
            self._cleanups.pop()()
        self.reactor.close()
        if check_leaks:
            # Error-level lines mark bugs: a timer, a handler or its failure handler raised.
            errors = [line for line in self.log_text().splitlines() if line.split(" ")[1] == "error"]
            assert not errors, "errors logged:\n" + "\n".join(errors)
            leaked = sorted(set(open_fds()) - set(self.fds_before))
            assert not leaked, "descriptors left open: %s" % [_describe_fd(fd) for fd in leaked]


def _describe_fd(fd):
    try:
        return "%d -> %s" % (fd, os.readlink("/proc/self/fd/%d" % fd))
    except OSError:
        return str(fd)


def endpoint_of(sock):
    host, port = sock.getsockname()[:2]
    return ep.parse_endpoint(ep.format_hostport(host, port))


@contextlib.contextmanager
def out_of_descriptors():
    """Lower RLIMIT_NOFILE to the lowest free descriptor, so that the next socket(), pipe() or
    accept() fails with EMFILE; restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open("/dev/null", os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ========================================================================== the test's streams ==

class Peer:
    """The test's end of a TCP stream, driven by the reactor.

    `received` holds every byte read; `eof` is set at EOF (`received_at_eof` says how many bytes
    had arrived by then); `error` is the errno of a failed read or send (ECONNRESET: a reset).
    `echo=True` sends back what arrives and passes EOF on once everything was sent back;
    `reply=bytes` answers the first request (ended by an empty line) and then closes its write
    side; `reading=False` leaves the bytes in the kernel (a slow reader) until resume_reading()."""

    def __init__(self, loop, sock, echo=False, reply=None, reading=True):
        self.reactor = loop.reactor
        self.sock = sock
        sock.setblocking(False)
        self.echo = echo
        self.reply = reply
        self.reading = reading
        self.received = bytearray()
        self.received_at_eof = None
        self.eof = False
        self.error = None
        self.sent = 0
        self._out = bytearray()
        self._out_offset = 0
        self._shut_pending = self.shut = False
        self.mask = 0
        loop.defer(self.close)
        self._update()

    def __repr__(self):
        return "<Peer received=%d sent=%d eof=%s error=%s>" % (len(self.received), self.sent,
                                                                self.eof, self.error)

    @property
    def unsent(self):
        return len(self._out) - self._out_offset

    def send(self, data):
        self._out += data
        self._flush()
        self._update()

    def shutdown_write(self):
        """Half-close once everything queued was sent."""
        self._shut_pending = True
        self._flush()
        self._update()

    def pause_reading(self):
        self.reading = False
        self._update()

    def resume_reading(self):
        self.reading = True
        self._update()

    def reset(self):
        """Close with RST (SO_LINGER 0)."""
        if self.sock is not None:
            self._unregister()
            gateway.abort(self.sock)
            self.sock = None

    def close(self):
        if self.sock is not None:
            self._unregister()
            self.sock.close()
            self.sock = None

    @property
    def ended(self):
        return self.eof or self.error is not None

    # -- events ----------------------------------------------------------------------------------

    def handle_io(self, sock, mask):
        if mask & EVENT_WRITE:
            self._flush()
        if mask & EVENT_READ and self.sock is not None:
            self._read()
        self._update()

    def handle_failure(self, exc):
        self.error = exc  # a bug in this helper: the test's assertions on `error` will show it
        self.close()

    def _read(self):
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.error = exc.errno
            return
        if not data:
            self.eof = True
            self.received_at_eof = len(self.received)
            if self.echo:
                self.shutdown_write()
            return
        self.received += data
        if self.echo:
            self._out += data
            self._flush()
        elif self.reply is not None and b"\r\n\r\n" in self.received:
            self._out += self.reply
            self.reply = None
            self._shut_pending = True
            self._flush()

    def _flush(self):
        while self.sock is not None and self.unsent and self.error is None:
            chunk = self._out[self._out_offset:self._out_offset + SEND_SLICE_BYTES]
            try:
                count = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error = exc.errno
                return
            self._out_offset += count
            self.sent += count
            if count < len(chunk):
                return
        if not self.unsent:
            del self._out[:]
            self._out_offset = 0
            if self._shut_pending and not self.shut and self.sock is not None:
                self.shut = True
                self.sock.shutdown(socket.SHUT_WR)

    def _update(self):
        if self.sock is None:
            return
        mask = 0
        if self.reading and not self.eof and self.error is None:
            mask |= EVENT_READ
        if self.unsent and self.error is None:
            mask |= EVENT_WRITE
        if mask == self.mask:
            return
        if not self.mask:
            self.reactor.register(self.sock, mask, self)
        elif not mask:
            self.reactor.unregister(self.sock)
        else:
            self.reactor.modify(self.sock, mask, self)
        self.mask = mask

    def _unregister(self):
        if self.mask:
            self.reactor.unregister(self.sock)
            self.mask = 0


def echo(loop, sock):
    return Peer(loop, sock, echo=True)


def silent(loop, sock):
    """Accepts, reads, says nothing (an upstream that hangs before answering)."""
    return Peer(loop, sock)


def replying(reply):
    """A factory of peers answering the first request with `reply`, then closing their write side."""
    return lambda loop, sock: Peer(loop, sock, reply=reply)


class Server:
    """A 127.0.0.1 listener on the reactor; each accepted socket becomes `factory(loop, sock)`,
    kept in `accepted`. `rcvbuf` is inherited by the accepted sockets."""

    def __init__(self, loop, factory, rcvbuf=None):
        self.loop = loop
        self.factory = factory
        self.accepted = []
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.endpoint = endpoint_of(self.sock)
        self.address = self.sock.getsockname()
        loop.reactor.register(self.sock, EVENT_READ, self)
        loop.defer(self.close)

    def handle_io(self, sock, mask):
        while True:
            try:
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted.append(self.factory(self.loop, client))

    def handle_failure(self, exc):
        self.loop.log.error("test server failed", error=repr(exc))

    def close(self):
        if self.sock is not None:
            self.loop.reactor.unregister(self.sock)
            self.sock.close()
            self.sock = None


class TlsPeer:
    """The server side of TLS on the reactor; `handshake_error` says how the handshake failed
    (None once it succeeded). With `reply`, it answers the first request (ended by an empty
    line) and closes; otherwise it waits for the client to go away."""

    def __init__(self, loop, sock, context, reply=None):
        self.reactor = loop.reactor
        sock.setblocking(False)
        self.sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.reply = reply
        self.request = bytearray()
        self.handshaken = False
        self.handshake_error = None
        self.reactor.register(self.sock, EVENT_READ, self)
        loop.defer(self.close)

    def handle_io(self, sock, mask):
        try:
            if not self.handshaken:
                self.sock.do_handshake()
                self.handshaken = True
            data = self.sock.recv(4096)
        except ssl.SSLWantWriteError:
            self.reactor.modify(self.sock, EVENT_WRITE, self)
            return
        except ssl.SSLWantReadError:
            self.reactor.modify(self.sock, EVENT_READ, self)
            return
        except OSError as exc:
            if not self.handshaken:
                self.handshake_error = exc
            self.close()
            return
        self.request += data
        if not data:
            self.close()
        elif self.reply is not None and b"\r\n\r\n" in self.request:
            self.sock.send(self.reply)  # small: one TLS record, the socket buffer takes it
            self.close()

    def handle_failure(self, exc):
        self.handshake_error = exc
        self.close()

    def close(self):
        if self.sock is not None:
            self.reactor.unregister(self.sock)
            self.sock.close()
            self.sock = None


# ============================================================================= the relay's host ==

class FakeHost(gateway.RelayHost):
    """A RelayHost in a few lines: a fixed plan, and every report kept as a tuple in `reports`."""

    def __init__(self, loop, endpoints, use_splice=False, dial_timeout=1.0, connect_timeout=None):
        self.reactor = loop.reactor
        self.data = gateway.DataPath(use_splice, gateway.KeepAliveLater(self.reactor))
        self.dial_timeout = dial_timeout
        self.connect_timeout = connect_timeout or dial_timeout
        self.endpoints = list(endpoints)
        self.reports = []
        self.relays = []
        loop.defer(self.close)

    def open(self, client_sock, peer=("127.0.0.1", 1)):
        relay = gateway.Relay(self, client_sock, peer)
        self.relays.append(relay)
        relay.start()
        return relay

    def events(self):
        return [report[0] for report in self.reports]

    def report(self, event):
        """The one report of kind `event` (there must be exactly one)."""
        found = [report for report in self.reports if report[0] == event]
        assert len(found) == 1, self.reports
        return found[0]

    def close(self):
        for relay in self.relays:
            relay.abort()  # a no-op for a closed relay
        self.data.close()

    # -- RelayHost ---------------------------------------------------------------------------------

    def plan(self):
        return list(self.endpoints)

    def relay_connected(self, relay):
        self.reports.append(("connected", relay.endpoint))

    def dial_failed(self, endpoint, reason):
        self.reports.append(("dial_failed", endpoint, reason))

    def attempt_outlived(self, dial):
        self.reports.append(("outlived", dial.endpoint))
        dial.cancel()

    def local_fault(self, relay, reason, giving_up):
        self.reports.append(("local_fault", reason, giving_up))

    def no_upstream(self, relay):
        self.reports.append(("no_upstream",))

    def relay_failed(self, relay, exc):
        self.reports.append(("relay_failed", exc))

    def relay_closed(self, relay, endpoint, reset, bytes_up, bytes_down):
        assert (bytes_up, bytes_down) == relay.bytes_moved()
        self.reports.append(("closed", endpoint, reset, (bytes_up, bytes_down)))
