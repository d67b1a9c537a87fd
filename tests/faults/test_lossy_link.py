"""IP-level loss and delay between the gateway and its members (tests/faults/tunlink.py).

Unlike test_network.py's byte-stall relay, packets are really lost here, SYNs and SYN-ACKs
included, so a connect can wait for the kernel to send its SYN again (1 s after the first, then
2 s later, 4 s ...). Layout:

    clients (threads here) -veth-> gateway in namespace A =lossy TUN link=> echo servers in B

The echo servers are tests/upstreams.py EchoServers run by `inns.py echo` inside B. Each scenario
runs once with our gateway and once with the Go gateway (`etcd gateway start`, same flags minus
our extensions); both rows are recorded, only ours is asserted.

A fresh connection: connect to the gateway, send 64 bytes, read them back, close. It fails when
the echo does not come back whole within CLIENT_TIMEOUT (15 s, longer than any dial bound of
ours): reset, EOF, timeout or mismatch. Clients never retry. Scenarios:

(a) one endpoint behind the link, 10 % loss each way, 75 ms +/- 50 ms each way;
(b) three endpoints behind that link;
(c) echo streams (random data in random chunks, read back while sending) through the gateway
    and the link, compared by SHA-256; a stream whose connection ends before any byte came back
    is a failed fresh connection and is tried again (at most STREAM_ATTEMPTS times). No
    half-close: the Go gateway closes both ways on the first EOF, which would hide what loss
    does (the soak and fuzz tests check half-close);
(d) two endpoints behind a link with delay but no loss (so what is measured is the blackhole,
    not SYN loss): every PHASE_SECONDS iptables DROPs (inside B) the member the previous phase
    left in use and lets the other through, while clients keep opening fresh connections. The Go
    gateway has no dial timeout: its clients stuck on the blackholed member are freed by the
    next change of the rules, so its figures there are lower bounds.

Invariants for ours:
* (a), (b), (c): fewer than 1 in 100 fresh connections fail. Below 200 connections (CI size)
  "fewer than 1 %" would mean none; one is allowed there (`allowed_failures`);
* (c): every stream comes back whole and in order;
* (d): a client that connects after the DROP gets its echo within DIAL_TIMEOUT +
  BLACKHOLE_MARGIN (two round trips at the link's worst delay, plus 0.5 s of scheduling).

Today's gateway is expected to fail the loss invariant: it gives up a dial at --dial-timeout
(1 s), just when Linux retransmits a lost SYN, and resets the client. To rerun with other flags
(ours only): FAULTS_GATEWAY_FLAGS="--connect-timeout=5s" pytest tests/faults/test_lossy_link.py
"""
import hashlib
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

from etcd_cluster import etcd_binary
from faults.conftest import ProcessWatch, record_result, scaled
from faults.inns import InNamespace
from faults.tunlink import LossyLink, available
from support import Gateway, LineReader

pytestmark = pytest.mark.faults

BAD_LINK = {"delay": 0.075, "jitter": 0.05, "loss": 0.10}
DIAL_TIMEOUT = 1.0  # ours' default, passed explicitly: it is the bound of scenario (d)
EXTRA_FLAGS = shlex.split(os.environ.get("FAULTS_GATEWAY_FLAGS", ""))
GATEWAY_PORT = 23790  # the namespace is new, so any port is free
CLIENT_TIMEOUT = 15.0
PAYLOAD_BYTES = 64
CONNECTIONS = scaled(150, 600)
CONCURRENCY = scaled(16, 24)
LOAD_SECONDS = scaled(40.0, 150.0)  # a bound only: the count ends the load first
STREAMS = scaled(24, 500)
STREAM_CONCURRENCY = scaled(12, 25)
STREAM_BYTES = (16 * 1024, 128 * 1024)  # each stream's size is drawn from this range
STREAM_ATTEMPTS = 3
STREAM_TIMEOUT = 90.0
PHASES = scaled(4, 12)
PHASE_SECONDS = scaled(3.0, 5.0)
WORST_RTT = 2 * (BAD_LINK["delay"] + BAD_LINK["jitter"])
BLACKHOLE_MARGIN = 2 * WORST_RTT + 0.5
SLOW_SECONDS = 0.9  # a first byte this late waited for at least one SYN retransmission
GATEWAYS = ["ours", "go"]


@pytest.fixture(autouse=True)
def netns_tools():
    reason = available()
    assert reason is None, reason  # a missing tool is a CI set-up bug, never a skip


# ---- gateways ---------------------------------------------------------------------------------

class GoGateway(Gateway):
    """`etcd gateway start` in namespace A; its ready line is JSON, unlike ours."""

    def __init__(self, args, preexec):
        self.args = list(args)
        self.proc = subprocess.Popen(list(preexec) + [etcd_binary("etcd"), "gateway", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.log = LineReader(self.proc.stderr)
        self.ready_line = self.log.wait_for("ready to proxy client requests", timeout=30)
        if self.ready_line is None:
            self.stop()
            raise AssertionError("Go gateway did not become ready:\n" + self.log.text())


def start_gateway(kind: str, link: LossyLink, endpoints: List[str]) -> Gateway:
    listen = f"{link.client_addr}:{GATEWAY_PORT}"
    args = ["start", f"--endpoints={','.join(endpoints)}", f"--listen-addr={listen}"]
    if kind == "ours":
        gateway = Gateway(args + [f"--dial-timeout={int(DIAL_TIMEOUT * 1000)}ms", *EXTRA_FLAGS],
                          preexec=link.exec_prefix_a())
    else:
        gateway = GoGateway(args, preexec=link.exec_prefix_a())
    gateway.addr = (link.client_addr, GATEWAY_PORT)
    return gateway


def gateway_label(kind: str) -> str:
    if kind == "go":
        return "Go gateway"
    return " ".join(["ours", f"--dial-timeout={int(DIAL_TIMEOUT * 1000)}ms", *EXTRA_FLAGS])


# ---- clients ----------------------------------------------------------------------------------

class Outcome(NamedTuple):
    started: float                 # monotonic
    ended: float
    first_byte: Optional[float]    # seconds from the connect call to the first echoed byte
    error: Optional[str]           # None: the echo came back whole


def one_echo(addr, payload: bytes) -> Outcome:
    started = time.monotonic()
    deadline = started + CLIENT_TIMEOUT
    first_byte, reply = None, b""
    try:
        with socket.create_connection(addr, timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(payload)
            while len(reply) < len(payload):
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    return Outcome(started, time.monotonic(), first_byte,
                                   f"EOF after {len(reply)} bytes")
                if first_byte is None:
                    first_byte = time.monotonic() - started
                reply += chunk
    except OSError as exc:
        return Outcome(started, time.monotonic(), first_byte, type(exc).__name__)
    return Outcome(started, time.monotonic(), first_byte, None if reply == payload else "mismatch")


class Clients:
    """`concurrency` threads opening a fresh connection per echo until `total` echoes started,
    `duration` passed or `stop()`."""

    def __init__(self, addr, total: int, concurrency: int, duration: float):
        self.addr, self.total, self.concurrency, self.duration = addr, total, concurrency, duration
        self.outcomes: List[Outcome] = []
        self._next = iter(range(total))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []

    def start(self) -> "Clients":
        self._deadline = time.monotonic() + self.duration
        self._threads = [threading.Thread(target=self._client, daemon=True, name=f"client-{i}")
                         for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def _client(self):
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                index = next(self._next, None)
            if index is None:
                return
            outcome = one_echo(self.addr, f"{index:08d}-".encode().ljust(PAYLOAD_BYTES, b"e"))
            with self._lock:
                self.outcomes.append(outcome)

    def join(self) -> List[Outcome]:
        for thread in self._threads:
            thread.join(self.duration + CLIENT_TIMEOUT + 10)
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        assert not alive, f"clients did not finish: {alive}"
        return sorted(self.outcomes)

    def stop(self) -> List[Outcome]:
        self._stop.set()
        return self.join()


def figures(outcomes: List[Outcome]) -> dict:
    waits = sorted(o.first_byte for o in outcomes if o.error is None)

    def ms(p):
        return round(waits[min(len(waits) - 1, int(p * len(waits)))] * 1000, 1) if waits else None
    failed = [o for o in outcomes if o.error]
    failed_at = sorted(round((o.ended - o.started) * 1000) for o in failed)
    errors = {}
    for o in failed:
        errors[o.error] = errors.get(o.error, 0) + 1
    return {"ops": len(outcomes), "failed_first": len(failed), "failed_final": None,
            "failure_pct": round(100 * len(failed) / len(outcomes), 2) if outcomes else None,
            "slow_1s": sum(1 for w in waits if w >= SLOW_SECONDS),
            "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0), "errors": errors,
            # min, median, max: when the failures came (today's: at the dial timeout)
            "failed_at_ms": [failed_at[0], failed_at[len(failed_at) // 2], failed_at[-1]]
            if failed_at else None}


def allowed_failures(connections: int) -> int:
    """Fewer than 1 in 100; one at most below 200 connections (see the module docstring)."""
    return max(1, (connections - 1) // 100)


def link_figures(link: LossyLink) -> dict:
    stats = link.stats or {}
    ways = [stats.get("a_to_b", {}), stats.get("b_to_a", {})]
    return {"link_packets": sum(w.get("read", 0) for w in ways),
            "link_dropped": sum(w.get("dropped", 0) for w in ways),
            "link_syn_dropped": sum(w.get("syn_dropped", 0) for w in ways),
            "link_overflow": sum(w.get("overflow", 0) for w in ways),
            "kernel_drops": stats.get("kernel_drops")}


def measured(kind, link, watch, row):
    """Record one row with the gateway's idle figures and the link's, while both still run.

    Go's hung dials to a blackhole hold descriptors for minutes: it gets a short wait for them."""
    proc = watch.check(fd_timeout=15.0 if kind == "ours" else 3.0)
    link.read_stats()
    row = record_result(dict(row, **proc, **link_figures(link), gateway=kind,
                             gateway_flags=gateway_label(kind)))
    return row, proc


def label(kind):
    return "Go" if kind == "go" else "ours"


# ---- the link itself --------------------------------------------------------------------------

def connect_latencies(link: LossyLink, endpoint: str, count: int) -> List[Optional[float]]:
    """Plain TCP connects from A to `endpoint` in B (no gateway), 8 at a time."""
    argv = link.exec_prefix_a() + [sys.executable, str(Path(__file__).with_name("inns.py")),
                                   "connect", endpoint, str(count), "8", str(CLIENT_TIMEOUT)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=count * CLIENT_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.stdout.startswith("connects "), result.stderr
    return json.loads(result.stdout.split(" ", 1)[1])


def test_link_delays_each_way():
    with LossyLink(delay=0.05, seed=1) as link, \
            InNamespace(link.exec_prefix_b(), link.addr_b) as echo:
        latencies = connect_latencies(link, echo.endpoints[0], 20)
        stats = link.read_stats()
    # A connect takes one round trip: SYN one way, SYN-ACK back, 50 ms each.
    assert all(t is not None and 0.1 <= t < 0.2 for t in latencies), latencies
    assert stats["a_to_b"]["dropped"] == stats["b_to_a"]["dropped"] == 0, stats


def test_link_loses_syns():
    """At 20 % loss each way a handshake loses its SYN or SYN-ACK with p = 1 - 0.8^2 = 0.36,
    and the connect waits for the kernel to send it again after 1 s (after 3 s for a second loss
    of the SYN; a lost SYN-ACK is also sent again by the listener)."""
    count = 80
    with LossyLink(delay=0.01, jitter=0.005, loss=0.2, seed=2) as link, \
            InNamespace(link.exec_prefix_b(), link.addr_b) as echo:
        latencies = connect_latencies(link, echo.endpoints[0], count)
        stats = link.read_stats()
    done = sorted(t for t in latencies if t is not None)
    retransmitted = [t for t in done if t >= SLOW_SECONDS]
    record_result({"fault": "TUN link itself: 20% loss each way, 10+/-5ms",
                   "load": f"{count} plain connects A->B, 8 at a time", "ops": count,
                   "failed_first": count - len(done), "slow_1s": len(retransmitted),
                   "p50_ms": round(done[len(done) // 2] * 1000, 1), **link_figures(link)})
    assert stats["a_to_b"]["syn_dropped"] and stats["b_to_a"]["syn_dropped"], stats
    assert 0.15 <= len(retransmitted) / count <= 0.6, done
    assert any(t > 1.9 for t in done), done  # a handshake that lost twice
    assert sum(1 for t in done if t < 0.5) > count / 2, done
    assert stats["kernel_drops"] == 0, stats
    assert stats["a_to_b"]["overflow"] == stats["b_to_a"]["overflow"] == 0, stats


# ---- scenarios --------------------------------------------------------------------------------

def run_fresh_connections(kind, endpoint_count, name, seed):
    with LossyLink(seed=seed, **BAD_LINK) as link, \
            InNamespace(link.exec_prefix_b(), link.addr_b, endpoint_count) as echo, \
            start_gateway(kind, link, echo.endpoints) as gateway:
        watch = ProcessWatch(gateway.pid)
        outcomes = Clients(gateway.addr, CONNECTIONS, CONCURRENCY, LOAD_SECONDS).start().join()
        result = figures(outcomes)
        row, proc = measured(kind, link, watch, dict(
            {"fault": f"IP loss 10%/way, 75+/-50ms, {name} ({label(kind)})",
             "load": f"fresh conn per echo, {CONCURRENCY} at a time, client timeout "
                     f"{CLIENT_TIMEOUT:.0f}s"}, **result))
        if kind == "ours":
            allowed = allowed_failures(len(outcomes))
            assert len(outcomes) == CONNECTIONS, row
            assert result["failed_first"] <= allowed, (
                f"{result['failed_first']} of {len(outcomes)} fresh connections failed "
                f"(allowed {allowed}): {result['errors']}; {row}")
            watch.assert_clean(proc, gateway.log.text()[-3000:])


@pytest.mark.parametrize("kind", GATEWAYS)
def test_one_endpoint_behind_lossy_link(kind):
    run_fresh_connections(kind, 1, "1 endpoint", seed=11)


@pytest.mark.parametrize("kind", GATEWAYS)
def test_three_endpoints_behind_lossy_link(kind):
    run_fresh_connections(kind, 3, "3 endpoints", seed=12)


def stream_once(addr, data: bytes, seed: str):
    """Send `data` in random chunks while reading the echo back until all of it came or the
    connection ended: (bytes back, sha256 matches). No half-close: the Go gateway closes both
    ways on the first EOF, and this scenario compares the gateways under loss (the soak and
    fuzz tests check half-close)."""
    deadline = time.monotonic() + STREAM_TIMEOUT
    digest, received = hashlib.sha256(), 0
    try:
        sock = socket.create_connection(addr, timeout=CLIENT_TIMEOUT)
    except OSError:
        return 0, False
    with sock:
        sender = threading.Thread(target=_send_chunks, args=(sock, data, random.Random(seed)),
                                  daemon=True)
        sender.start()
        try:
            while received < len(data):
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
        except OSError:
            pass
        sender.join(STREAM_TIMEOUT)
    return received, received == len(data) and digest.digest() == hashlib.sha256(data).digest()


def _send_chunks(sock, data, rng):
    offset = 0
    try:
        while offset < len(data):
            size = rng.choice((1, 7, 512, 4096, 16384, 65536))
            sock.sendall(data[offset:offset + size])
            offset += size
    except OSError:
        pass  # the receiving side sees the same failure


class Streams:
    """STREAMS echo streams, STREAM_CONCURRENCY at a time; a stream whose connection brought
    nothing back is tried again on a new one, at most STREAM_ATTEMPTS times."""

    def __init__(self, addr):
        self.addr = addr
        self.attempts: List[Outcome] = []
        self.broken, self.unchecked, self.checked_bytes = [], [], 0
        self._lock = threading.Lock()
        self._work = iter(range(STREAMS))

    def run(self) -> "Streams":
        threads = [threading.Thread(target=self._streamer, daemon=True)
                   for _ in range(STREAM_CONCURRENCY)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STREAMS * STREAM_ATTEMPTS * STREAM_TIMEOUT)
        assert not any(thread.is_alive() for thread in threads), "streams did not finish"
        return self

    def _streamer(self):
        while True:
            with self._lock:
                index = next(self._work, None)
            if index is None:
                return
            rng = random.Random(index)
            data = rng.randbytes(rng.randint(*STREAM_BYTES))
            for attempt in range(STREAM_ATTEMPTS):
                if self._attempt(index, attempt, data):
                    break
            else:
                with self._lock:
                    self.unchecked.append(index)

    def _attempt(self, index, attempt, data) -> bool:
        started = time.monotonic()
        received, whole = stream_once(self.addr, data, f"{index}:{attempt}")
        with self._lock:
            # Nothing came back: the connection failed before it relayed (a dial failure).
            self.attempts.append(Outcome(started, time.monotonic(), None,
                                         None if received else "no echo"))
            if whole:
                self.checked_bytes += len(data)
            elif received:
                self.broken.append((index, received, len(data)))
        return received > 0


@pytest.mark.parametrize("kind", GATEWAYS)
def test_streams_through_lossy_link(kind):
    with LossyLink(seed=13, **BAD_LINK) as link, \
            InNamespace(link.exec_prefix_b(), link.addr_b) as echo, \
            start_gateway(kind, link, echo.endpoints) as gateway:
        watch = ProcessWatch(gateway.pid)
        started = time.monotonic()
        streams = Streams(gateway.addr).run()
        elapsed = time.monotonic() - started
        failed = sum(1 for o in streams.attempts if o.error)
        row, proc = measured(kind, link, watch, {
            "fault": f"IP loss 10%/way, 75+/-50ms, echo streams ({label(kind)})",
            "load": f"{STREAMS} streams of {STREAM_BYTES[0] // 1024}-{STREAM_BYTES[1] // 1024} "
                    f"KiB, {STREAM_CONCURRENCY} at a time, up to {STREAM_ATTEMPTS} tries each",
            "ops": len(streams.attempts), "failed_first": failed,
            "failed_final": len(streams.unchecked),
            "failure_pct": round(100 * failed / max(1, len(streams.attempts)), 2),
            "bytes_checked": streams.checked_bytes, "broken_streams": len(streams.broken),
            "elapsed_s": round(elapsed, 1)})
        if kind == "ours":
            assert not streams.broken, f"streams cut or garbled (index, got, sent): {row}"
            assert not streams.unchecked, f"streams that never connected: {streams.unchecked}"
            allowed = allowed_failures(len(streams.attempts))
            assert failed <= allowed, (
                f"{failed} of {len(streams.attempts)} stream connections failed before any "
                f"byte came back (allowed {allowed}); {row}")
            watch.assert_clean(proc, gateway.log.text()[-3000:])


def drop_rule(port):
    return ["INPUT", "-p", "tcp", "--dport", port, "-j", "DROP"]


def new_clients(outcomes, changes, bound):
    """The clients that connected after the first DROP and either finished before the rules
    changed again or had by then waited longer than `bound` (a violation whatever came next).
    Left out, and counted: a client still waiting at a change, and for less than `bound` - the
    change may have blocked the member its connection was already relayed to, which is not a
    dial."""
    counted, left_out = [], 0
    for outcome in outcomes:
        if outcome.started < changes[0]:
            continue
        next_change = next((when for when in changes if when > outcome.started), float("inf"))
        if outcome.ended <= next_change or next_change - outcome.started > bound:
            counted.append(outcome)
        else:
            left_out += 1
    return counted, left_out


@pytest.mark.parametrize("kind", GATEWAYS)
def test_blackholed_member_in_use(kind):
    with LossyLink(seed=14, **dict(BAD_LINK, loss=0.0)) as link, \
            InNamespace(link.exec_prefix_b(), link.addr_b, 2) as echo, \
            start_gateway(kind, link, echo.endpoints) as gateway:
        watch = ProcessWatch(gateway.pid)
        ports = [endpoint.rsplit(":", 1)[1] for endpoint in echo.endpoints]
        clients = Clients(gateway.addr, 100_000, CONCURRENCY,
                          (PHASES + 1) * PHASE_SECONDS + 5).start()
        changes = []  # when the rules changed: each DROP moved, then the heal
        for phase in range(PHASES):
            time.sleep(PHASE_SECONDS)  # the load runs meanwhile; it is what the test waits for
            if phase:
                link.iptables_b("-D", *drop_rule(ports[(phase - 1) % 2]))
            link.iptables_b("-I", *drop_rule(ports[phase % 2]))
            changes.append(time.monotonic())
        time.sleep(PHASE_SECONDS)
        # Heal before stopping: relays caught by the last DROP then finish instead of holding
        # descriptors until TCP gives up.
        link.iptables_b("-D", *drop_rule(ports[(PHASES - 1) % 2]))
        changes.append(time.monotonic())
        outcomes = clients.stop()
        bound = DIAL_TIMEOUT + BLACKHOLE_MARGIN
        new, left_out = new_clients(outcomes, changes, bound)
        result = figures(new)
        everyone = figures(outcomes)
        row, proc = measured(kind, link, watch, dict(
            {"fault": f"DROP member in use every {PHASE_SECONDS:.0f}s, other answers, "
                      f"75+/-50ms no loss ({label(kind)})",
             "load": f"fresh conn per echo, {CONCURRENCY} at a time; new clients only",
             "all_ops": everyone["ops"], "all_failed": everyone["failed_first"],
             "all_errors": everyone["errors"], "left_out": left_out,
             "bound_ms": round(bound * 1000)}, **result))
        if kind == "ours":
            assert result["failed_first"] == 0, row
            assert result["max_ms"] <= bound * 1000, row
            # The scenario did what it claims: clients met the blackhole and waited for the dial.
            assert result["slow_1s"] >= PHASES - 1, row
            watch.assert_clean(proc, gateway.log.text()[-3000:])
