"""Scripted upstream servers for the loopback integration tests.

Each server runs in background threads of the test process, binds port 0 on loopback, exposes
`.endpoint` ("127.0.0.1:PORT" or "[::1]:PORT", the form `--endpoints` takes) and is a context
manager whose exit closes every socket it opened and joins every thread it started.

- `EchoServer`: one selectors thread echoing any number of connections, passing half-close on
  (EOF from the peer -> shutdown(SHUT_WR) once the echo queue drained). It can start bound but not
  listening (connects are refused) and `start_listening()` later: an endpoint that comes back.
- `ScriptedServer(handler)`: a blocking server that runs `handler(conn)` in a thread per
  connection and queues what the handler returns (or raises) for the test to inspect. The
  handlers below script the awkward cases: reply only after the client's EOF, shut the write
  side first, reset, push N bytes with a checksum, observe how the peer went away.
- `Blackhole`: a listener whose accept queue is full, so further SYNs are dropped and a connect
  neither succeeds nor fails (a member behind a dead link).
- `RefusingPort`: a port that is bound but not listening, so connects are refused at once and
  the port cannot be reused by anyone else while the test runs.
"""
import hashlib
import queue
import selectors
import socket
import struct
import threading
import time

JOIN_TIMEOUT = 10.0
ECHO_HIGH_WATER_BYTES = 256 * 1024
CHUNK_BYTES = 1 << 20


def endpoint_of(sock):
    """The `--endpoints` form of a bound socket's address."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bound_socket(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


def reset_close(sock):
    """Close so that the peer sees a reset (RST) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_until_eof(sock, digest=None):
    """Read until EOF; returns the byte count, feeding `digest` if given."""
    total = 0
    while True:
        data = sock.recv(CHUNK_BYTES)
        if not data:
            return total
        total += len(data)
        if digest is not None:
            digest.update(data)


def pattern_chunks(total_bytes, seed=0, chunk_bytes=CHUNK_BYTES):
    """Deterministic, non-repeating-looking data: a fixed pseudo-random block with a chunk counter
    in front of every chunk, so a dropped, duplicated or reordered chunk changes the checksum."""
    block = hashlib.shake_256(seed.to_bytes(8, "big")).digest(chunk_bytes)
    sent = 0
    index = 0
    while sent < total_bytes:
        size = min(chunk_bytes, total_bytes - sent)
        chunk = (index.to_bytes(8, "big") + block[8:])[:size]
        yield chunk
        sent += size
        index += 1


class RefusingPort:
    """A loopback port that refuses connections (bound, never listening)."""

    def __init__(self, host="127.0.0.1"):
        self.sock = _bound_socket(host)
        self.endpoint = endpoint_of(self.sock)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Blackhole:
    """A listener whose accept queue is full: connects to it hang (SYNs are dropped).

    listen(0), then connect filler sockets (kept open, never accepted) until one does not
    complete; that proves the queue is full. Linux drops a SYN when the accept queue is full
    (tcp_abort_on_overflow=0, the default), so the dialer sees neither success nor refusal.
    """

    MAX_FILLERS = 64
    PROBE_TIMEOUT = 0.3

    def __init__(self, host="127.0.0.1"):
        self.sock = _bound_socket(host)
        self.sock.listen(0)
        self.endpoint = endpoint_of(self.sock)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        try:
            self._fill()
        except BaseException:
            self.close()
            raise

    def _fill(self):
        address = self.sock.getsockname()
        for _ in range(self.MAX_FILLERS):
            filler = socket.socket(self.sock.family, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(address)
            with selectors.DefaultSelector() as sel:
                sel.register(filler, selectors.EVENT_WRITE)
                done = sel.select(self.PROBE_TIMEOUT)
            if not done:
                filler.close()  # this SYN went unanswered: the queue is full
                return
            if filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                filler.close()
                raise RuntimeError("blackhole listener refused a filler connection")
            self.fillers.append(filler)
        raise RuntimeError(f"accept queue still not full after {self.MAX_FILLERS} connections")

    def release(self):
        """Accept what the queue holds, so that the next SYN (a retransmission) finds room."""
        self.sock.setblocking(False)
        while True:
            try:
                accepted, _ = self.sock.accept()
            except BlockingIOError:
                return
            self.fillers.append(accepted)

    def accept_next(self, timeout):
        """The next connection to arrive after release(), or None after `timeout` seconds."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
        accepted, _ = self.sock.accept()
        accepted.setblocking(True)
        return accepted

    def close(self):
        for filler in self.fillers:
            filler.close()
        self.fillers.clear()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _EchoConn:
    __slots__ = ("sock", "pending", "eof", "got_data")

    def __init__(self, sock):
        self.sock = sock
        self.pending = bytearray()
        self.eof = False
        self.got_data = False


class EchoServer:
    """Echo every connection from one selectors thread; counts what it saw.

    `served` counts connections that carried at least one byte (a health probe that only
    connects does not count); `open_count` / `peak_open` count accepted connections not yet closed.
    """

    def __init__(self, host="127.0.0.1", listening=True, backlog=4096):
        self.sock = _bound_socket(host)
        self.sock.setblocking(False)
        self.endpoint = endpoint_of(self.sock)
        self.port = self.sock.getsockname()[1]
        self.backlog = backlog
        self.accepted = 0
        self.served = 0
        self.open_count = 0
        self.peak_open = 0
        self._lock = threading.Lock()
        self._commands = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"echo-{self.port}", daemon=True)
        self._thread.start()
        if listening:
            self.start_listening()

    def start_listening(self):
        """Turn a refusing port into a listening echo server (an endpoint that comes back)."""
        self.sock.listen(self.backlog)
        self._command("listen")

    def _command(self, command):
        self._commands.put(command)
        self._wake_w.send(b"x")

    # -- the server thread -------------------------------------------------------------------
    def _run(self):
        while not self._stopping:
            for key, events in self._selector.select():
                if key.data == "wake":
                    self._on_wake()
                elif key.data == "listener":
                    self._on_accept()
                else:
                    self._on_conn(key.data, events)
        for conn in list(self._conns):
            self._close(conn)
        self._selector.close()

    def _on_wake(self):
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while not self._commands.empty():
            command = self._commands.get()
            if command == "listen":
                self._selector.register(self.sock, selectors.EVENT_READ, "listener")
            elif command == "stop":
                self._stopping = True

    def _on_accept(self):
        for _ in range(256):  # bounded: let established connections make progress too
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: try again on the next wake-up
                return
            sock.setblocking(False)
            conn = _EchoConn(sock)
            self._conns.add(conn)
            with self._lock:
                self.accepted += 1
                self.open_count += 1
                self.peak_open = max(self.peak_open, self.open_count)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _on_conn(self, conn, events):
        try:
            if events & selectors.EVENT_READ:
                self._read(conn)
            if conn.pending:
                sent = conn.sock.send(conn.pending)
                del conn.pending[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset or broken pipe: the peer is gone
            self._close(conn)
            return
        if conn.eof and not conn.pending:
            # Everything echoed and the peer will send nothing more: pass the half-close on.
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._close(conn)
            return
        mask = 0 if conn.eof or len(conn.pending) >= ECHO_HIGH_WATER_BYTES else selectors.EVENT_READ
        if conn.pending:
            mask |= selectors.EVENT_WRITE
        self._selector.modify(conn.sock, mask, conn)

    def _read(self, conn):
        data = conn.sock.recv(ECHO_HIGH_WATER_BYTES)
        if not data:
            conn.eof = True
            return
        if not conn.got_data:
            conn.got_data = True
            with self._lock:
                self.served += 1
        conn.pending += data

    def _close(self, conn):
        self._selector.unregister(conn.sock)
        conn.sock.close()
        self._conns.discard(conn)
        with self._lock:
            self.open_count -= 1

    # -- the test side -----------------------------------------------------------------------
    def close(self):
        if self._thread.is_alive():
            self._command("stop")
            self._thread.join(JOIN_TIMEOUT)
        self._wake_r.close()
        self._wake_w.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ScriptedServer:
    """Run `handler(conn)` for every accepted connection in its own thread.

    What a handler returns (or the exception it raises) is queued; `next_result()` takes it.
    """

    def __init__(self, handler, host="127.0.0.1"):
        self.handler = handler
        self.sock = _bound_socket(host)
        self.sock.listen(128)
        self.endpoint = endpoint_of(self.sock)
        self.port = self.sock.getsockname()[1]
        self.results = queue.Queue()
        self._conns = []
        self._threads = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"scripted-{self.port}",
                                          daemon=True)
        self._acceptor.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the listener was shut down by close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        try:
            result = self.handler(conn)
        except Exception as exc:  # handed to the test, which decides whether it is a failure
            result = exc
        finally:
            conn.close()
        self.results.put(result)

    def next_result(self, timeout=30.0):
        """The next handler result; raises AssertionError if none arrives in time."""
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no upstream handler finished within {timeout}s") from None

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self._acceptor.join(JOIN_TIMEOUT)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv/send
            except OSError:
                pass
        for thread in threads:
            thread.join(JOIN_TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- handlers for ScriptedServer ---------------------------------------------------------------

def reply_after_eof(conn):
    """Read until the client's EOF, then reply: sha256 of what arrived + 1 MiB, then close.

    Returns (bytes received, sha256 hex of them). The reply depends on everything received, so
    it can only be right if it was sent after the EOF passed through.
    """
    digest = hashlib.sha256()
    received = recv_until_eof(conn, digest)
    conn.sendall(digest.digest())
    for chunk in pattern_chunks(1 << 20, seed=received):
        conn.sendall(chunk)
    return received, digest.hexdigest()


def after_delay(handler, delay):
    """`handler`, started only after `delay` seconds of not reading (back-pressure on the sender)."""
    def delayed(conn):
        time.sleep(delay)  # the point: the upstream is slow to read
        return handler(conn)
    return delayed


def expected_reply_after_eof(data):
    return hashlib.sha256(data).digest() + b"".join(pattern_chunks(1 << 20, seed=len(data)))


GREETING_BYTES = 256 * 1024


def shut_write_first(conn):
    """Send a greeting, shut the write side, then read until EOF.

    Returns (bytes received, sha256 hex): the client must still reach us after our half-close.
    """
    for chunk in pattern_chunks(GREETING_BYTES, seed=7):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    digest = hashlib.sha256()
    return recv_until_eof(conn, digest), digest.hexdigest()


def greeting():
    return b"".join(pattern_chunks(GREETING_BYTES, seed=7))


def reset_after_first_bytes(conn):
    """Wait for the first bytes, then reset the connection."""
    data = conn.recv(4096)
    reset_close(conn)
    return data


def observe_peer(conn):
    """Acknowledge the first bytes with b"ok", then report how the peer went away.

    Returns ("eof" | "reset", bytes received).
    """
    received = len(conn.recv(4096))
    conn.sendall(b"ok")
    try:
        received += recv_until_eof(conn)
    except ConnectionResetError:
        return "reset", received
    return "eof", received


def pusher(total_bytes, seed=1):
    """A handler that pushes `total_bytes` and closes; returns (bytes sent, sha256 hex)."""
    def push(conn):
        digest = hashlib.sha256()
        sent = 0
        for chunk in pattern_chunks(total_bytes, seed=seed):
            conn.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        # Wait for the client's EOF so our close cannot turn into a reset of unread data.
        recv_until_eof(conn)
        return sent, digest.hexdigest()
    return push
