"""Fuzz of the relay's data path: random byte streams through the gateway to an echo upstream,
checked by hash, on both data paths (splice and recv/send copy).

Each hypothesis example is a scenario of 1..MAX_STREAMS concurrent connections. For every stream
hypothesis draws a small plan (size 0..MAX_STREAM_BYTES, a seed, the largest write and read,
whether the client reads slowly, when the client half-closes, whether the upstream half-closes
first) and a seeded PRNG expands it into the bytes, the write and read sizes and the pauses, so a
failing plan replays exactly and megabytes never pass through hypothesis.

The client side is one selector loop over all streams of a scenario (full duplex, so an echo
cannot deadlock it). A slow reader stops reading for a while, so the gateway's high-water mark
and back-pressure towards the writer are exercised; writers pause at random too. The client
half-closes right after its last byte ("eager"), after a random share of the echo has come back
("after_echo"), or never ("never": it closes once the whole echo is in). The upstream echoes and
passes the client's EOF on, or half-closes first: the first HEADER_BYTES of a stream name the
offset at which it shuts its write side and then only reads on to EOF.

Checked for every stream: the upstream received every byte in order (SHA-256) and then EOF; the
client received exactly the expected echo in order (SHA-256), then EOF and never a reset; no send
failed. After all scenarios the gateway's descriptor count is back to its baseline and it is idle.
"""
import hashlib
import random
import selectors
import socket
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.conftest import ProcessWatch, record_result, scaled
from support import IO_TIMEOUT, Gateway, free_port
from test_relay import DATA_PATHS
from upstreams import ScriptedServer

pytestmark = pytest.mark.faults

MiB = 1 << 20
EXAMPLES = scaled(64, 256)               # scenarios per data path: ~25 s each in CI
MAX_STREAMS = 6                         # concurrent connections per scenario
MAX_STREAM_BYTES = 6 * MiB
MAX_CALLS = 2048                        # per stream and direction: 1-byte writes stay for small streams
HEADER_BYTES = 8                        # big-endian offset of the upstream's half-close
NEVER = (1 << 64) - 1
UPSTREAM_READ_BYTES = 256 * 1024
SCENARIO_TIMEOUT = 60.0                 # "did not hang", far above the second one takes
STALL_TIMEOUT = 10.0                    # no byte moved for this long (pauses are < 0.3 s): stuck
MAX_LOOP_STEPS = 2_000_000              # the client loop's count bound, next to its time bound
PAUSE_BUDGET = 0.5                      # seconds a stream may spend paused, reading and writing
SLOW_READ_STALL = (0.05, 0.3)           # a slow reader's first stall: the high-water mark fills


@dataclass(frozen=True)
class Plan:
    """One stream as hypothesis draws it; `seed` expands it into bytes and timing."""
    size: int
    seed: int
    max_write: int
    max_read: int
    slow_reader: bool
    client_close: str          # "eager" | "after_echo" | "never"
    echo_fraction: float       # after_echo: share of the echo read before the half-close
    upstream_close: object     # None, or the share of the stream after which the upstream shuts

    @property
    def close_at(self) -> int:
        """Where the upstream half-closes; streams too short for the header are echoed whole."""
        if self.upstream_close is None or self.size < HEADER_BYTES:
            return NEVER
        return int(self.upstream_close * self.size)

    @property
    def echo_bytes(self) -> int:
        return min(self.close_at, self.size)

    @property
    def shut_mode(self) -> str:
        # The upstream holds a stream shorter than the header until EOF (it cannot know its
        # half-close offset before), so such a client must half-close at once.
        return self.client_close if self.size >= HEADER_BYTES else "eager"

    def data(self) -> bytes:
        data = bytearray(random.Random(self.seed).randbytes(self.size))
        if self.size >= HEADER_BYTES:
            data[:HEADER_BYTES] = self.close_at.to_bytes(HEADER_BYTES, "big")
        return bytes(data)


sizes = st.one_of(st.integers(0, 16), st.integers(0, 256 * 1024),
                  st.integers(0, MAX_STREAM_BYTES), st.just(MAX_STREAM_BYTES))
plans = st.builds(
    Plan, size=sizes, seed=st.integers(0, 2**32 - 1),
    max_write=st.sampled_from([1, 7, 1000, 4096, 65536, 300_000, MiB]),
    max_read=st.sampled_from([1, 13, 4096, 65536, MiB]),
    slow_reader=st.booleans(),
    client_close=st.sampled_from(["eager", "after_echo", "never"]),
    echo_fraction=st.floats(0, 1),
    upstream_close=st.one_of(st.none(), st.floats(0, 1)))
scenarios = st.lists(plans, min_size=2, max_size=MAX_STREAMS)


def echo_until_offset(conn):
    """Upstream: echo the stream up to the offset its header names, then shut the write side and
    read on to EOF (a stream shorter than the header is echoed whole at EOF). Returns
    (bytes received, sha256 hex of them)."""
    digest, head = hashlib.sha256(), bytearray()
    received = echoed = 0
    close_at = None
    while True:
        data = conn.recv(UPSTREAM_READ_BYTES)
        if not data:
            break
        digest.update(data)
        received += len(data)
        if close_at is None:
            head += data
            if len(head) < HEADER_BYTES:
                continue
            close_at, data = int.from_bytes(head[:HEADER_BYTES], "big"), bytes(head)
        if echoed < close_at:
            conn.sendall(data[:close_at - echoed])
            echoed += min(len(data), close_at - echoed)
            if echoed >= close_at:
                conn.shutdown(socket.SHUT_WR)  # the upstream half-closes first
    if close_at is None:
        conn.sendall(head)
    if close_at is None or echoed < close_at:
        conn.shutdown(socket.SHUT_WR)  # pass the client's EOF on
    return received, digest.hexdigest()


class Stream:
    """The client side of one plan: a non-blocking socket driven by `run_scenario`'s loop."""

    def __init__(self, plan: Plan, address, now: float):
        self.plan = plan
        self.data = memoryview(plan.data())
        self.rng = random.Random(plan.seed ^ 0x5EED)  # timing, independent of the content
        self.max_write = max(plan.max_write, -(-plan.size // MAX_CALLS))
        self.max_read = max(plan.max_read, -(-plan.echo_bytes // MAX_CALLS))
        self.sent = self.received = 0
        self.digest = hashlib.sha256()
        self.eof = self.shut = self.finished = False
        self.error = None
        self.pause_left = PAUSE_BUDGET
        self.read_after = now + (self.pause(*SLOW_READ_STALL) if plan.slow_reader else 0.0)
        self.write_after = now
        self.mask = 0
        self.sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        self.sock.setblocking(False)

    def pause(self, low: float, high: float) -> float:
        length = min(self.pause_left, self.rng.uniform(low, high))
        self.pause_left -= length
        return length

    def wanted_mask(self, now: float) -> int:
        mask = 0
        if not self.eof and now >= self.read_after:
            mask |= selectors.EVENT_READ
        if self.sent < len(self.data) and now >= self.write_after:
            mask |= selectors.EVENT_WRITE
        return mask

    def next_wakeup(self, now: float) -> float:
        """When a pause of this stream ends (inf when none is pending)."""
        pending = [instant for instant, waiting in ((self.read_after, not self.eof),
                                                    (self.write_after, self.sent < len(self.data)))
                   if waiting and instant > now]
        return min(pending, default=float("inf"))

    def on_events(self, events: int, now: float) -> None:
        try:
            if events & selectors.EVENT_READ:
                self.on_readable(now)
            if events & selectors.EVENT_WRITE:
                self.on_writable(now)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # reset, broken pipe: never expected on this path
            self.error = f"{type(exc).__name__} after {self.sent} sent, {self.received} received"

    def on_readable(self, now: float) -> None:
        piece = self.sock.recv(self.rng.randint(1, self.max_read))
        if not piece:
            self.eof = True
            return
        self.digest.update(piece)
        self.received += len(piece)
        if self.plan.slow_reader and self.rng.random() < 0.2:
            self.read_after = now + self.pause(0.001, 0.05)

    def on_writable(self, now: float) -> None:
        size = self.rng.randint(1, self.max_write)
        self.sent += self.sock.send(self.data[self.sent:self.sent + size])
        if self.rng.random() < 0.03:
            self.write_after = now + self.pause(0.001, 0.02)

    def step(self) -> None:
        """Half-close and finish when the plan says so (called before every wait)."""
        mode = self.plan.shut_mode
        if self.finished:
            return
        if self.error is None and self.sent == len(self.data) and not self.shut:
            threshold = int(self.plan.echo_fraction * self.plan.echo_bytes)
            if mode == "eager" or (mode == "after_echo" and (self.eof or self.received >= threshold)):
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self.error = f"half-close failed: {exc!r}"
                self.shut = True
        whole_echo = mode == "never" and self.received >= self.plan.echo_bytes
        done_writing = self.sent == len(self.data) and (self.shut or mode == "never")
        self.finished = self.error is not None or (done_writing and (self.eof or whole_echo))

    def problems(self, upstream_results) -> list:
        plan, found = self.plan, []
        expected_echo = hashlib.sha256(self.data[:plan.echo_bytes]).hexdigest()
        if self.error:
            found.append(self.error)
        if self.received != plan.echo_bytes or self.digest.hexdigest() != expected_echo:
            found.append(f"echo: {self.received} bytes (sha256 {self.digest.hexdigest()[:12]}), "
                         f"expected {plan.echo_bytes} (sha256 {expected_echo[:12]})")
        if plan.shut_mode != "never" and not self.eof:
            found.append("no EOF after the last byte")
        if (len(self.data), hashlib.sha256(self.data).hexdigest()) not in upstream_results:
            found.append(f"upstream did not receive the {len(self.data)} bytes whole, then EOF")
        return found

    def __repr__(self):
        return (f"<Stream {self.plan} sent={self.sent} received={self.received} eof={self.eof} "
                f"shut={self.shut} error={self.error}>")


def apply_mask(selector, stream: Stream, now: float) -> None:
    """Register what the stream wants now, touching the selector only when it changed."""
    mask = 0 if stream.finished else stream.wanted_mask(now)
    if mask == stream.mask:
        return
    if not stream.mask:
        selector.register(stream.sock, mask, stream)
    elif not mask:
        selector.unregister(stream.sock)
    else:
        selector.modify(stream.sock, mask, stream)
    stream.mask = mask


def drive(streams) -> None:
    """Run every stream to its end: bounded in time (SCENARIO_TIMEOUT, STALL_TIMEOUT) and steps."""
    deadline = time.monotonic() + SCENARIO_TIMEOUT
    progress, progress_at = None, time.monotonic()
    with selectors.DefaultSelector() as selector:
        for _ in range(MAX_LOOP_STEPS):
            now = time.monotonic()
            for stream in streams:
                stream.step()  # before waiting: a stream may have to half-close first
                apply_mask(selector, stream, now)
            live = [stream for stream in streams if not stream.finished]
            if not live:
                return
            moved = [(stream.sent, stream.received, stream.eof) for stream in streams]
            if moved != progress:
                progress, progress_at = moved, now
            assert now < deadline, f"scenario unfinished after {SCENARIO_TIMEOUT}s: {live}"
            assert now - progress_at < STALL_TIMEOUT, f"no progress for {STALL_TIMEOUT}s: {live}"
            wakeup = min(min(stream.next_wakeup(now) for stream in live), deadline,
                         progress_at + STALL_TIMEOUT)
            for key, events in selector.select(wakeup - now):
                key.data.on_events(events, now)
        raise AssertionError(f"scenario still running after {MAX_LOOP_STEPS} steps: {streams}")


def upstream_results(upstream, count: int) -> list:
    results = [upstream.next_result(timeout=SCENARIO_TIMEOUT) for _ in range(count)]
    errors = [result for result in results if isinstance(result, Exception)]
    assert not errors, f"upstream handler failed: {errors!r}"
    return results


def run_scenario(target, scenario, totals) -> None:
    while not target.upstream.results.empty():  # what a failed example left behind
        target.upstream.results.get_nowait()
    now = time.monotonic()
    streams = []
    try:
        for plan in scenario:
            streams.append(Stream(plan, target.address, now))
        drive(streams)
    finally:
        for stream in streams:
            stream.sock.close()
    results = upstream_results(target.upstream, len(streams))
    bad = [f"{stream!r}: {'; '.join(found)}" for stream in streams
           for found in [stream.problems(results)] if found]
    totals["streams"] += len(streams)
    totals["bytes_up"] += sum(len(stream.data) for stream in streams)
    totals["bytes_echoed"] += sum(stream.received for stream in streams)
    totals["upstream_first"] += sum(stream.plan.echo_bytes < stream.plan.size for stream in streams)
    totals["slow_readers"] += sum(stream.plan.slow_reader for stream in streams)
    totals["bad"] += len(bad)
    assert not bad, "\n".join(bad)


@dataclass
class Target:
    gateway: Gateway
    upstream: ScriptedServer
    address: tuple


@pytest.fixture(params=sorted(DATA_PATHS))
def target(request):
    """A gateway on one data path in front of the echo_until_offset upstream."""
    with ScriptedServer(echo_until_offset) as upstream:
        port = free_port()
        with Gateway(["start", "--endpoints", upstream.endpoint,
                      "--listen-addr", f"127.0.0.1:{port}"], env=DATA_PATHS[request.param]) as gw:
            gw.data_path = request.param
            yield Target(gw, upstream, ("127.0.0.1", port))


def test_random_streams_with_half_close_arrive_whole(target):
    watch = ProcessWatch(target.gateway.pid)
    totals = dict.fromkeys(["scenarios", "streams", "bytes_up", "bytes_echoed",
                            "upstream_first", "slow_readers", "bad"], 0)
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(scenarios)
    def prop(scenario):
        totals["scenarios"] += 1
        try:
            run_scenario(target, scenario, totals)
        except AssertionError:
            # Printed at once: shrinking a stuck scenario takes STALL_TIMEOUT per attempt.
            print(f"\nFUZZ FAILURE ({target.gateway.data_path}) scenario={scenario!r}")
            raise

    prop()
    proc = watch.check()
    checked = totals["bytes_up"] + totals["bytes_echoed"]
    record_result(dict({"fault": f"fuzz: random streams + half-close ({target.gateway.data_path})",
                        "load": f"{totals['scenarios']} scenarios of 2-{MAX_STREAMS} concurrent "
                                f"streams, 0-{MAX_STREAM_BYTES // MiB} MiB each"},
                       ops=totals["streams"], failed_first=totals["bad"],
                       failed_final=totals["bad"], bytes_checked=checked,
                       upstream_half_closed_first=totals["upstream_first"],
                       slow_readers=totals["slow_readers"],
                       seconds=round(time.monotonic() - started, 1), **proc))
    log = target.gateway.log.text()
    assert "Traceback" not in log, log[-3000:]
    watch.assert_clean(proc, log[-3000:])
