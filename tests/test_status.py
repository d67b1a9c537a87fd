"""The status port (--metrics-addr) and the logs, against the gateway as a real process.

/metrics is read by a small strict parser of the Prometheus text exposition format 0.0.4 written
here (no client library: the point is to check the bytes the gateway writes). /health and
/endpoints are parsed with json.loads. The robustness tests are the issue's promise that a
client of the status port can never stall or crash the gateway: oversized, silent, trickling,
idle-by-the-hundred and random-bytes clients, each followed by a proxied round trip and a scrape.

Every test starts its own gateway and scripted upstreams (tests/upstreams.py); every loop is
bounded in count and time; the only long waits are those whose subject is the 5 s status timeout
and the 5 s log rate limit.
"""
import json
import math
import os
import random
import re
import selectors
import signal
import socket
import struct
import time
from typing import Dict, NamedTuple, Tuple

import pytest

from support import (IO_TIMEOUT, Gateway, closed_by_peer, fd_count, free_port, idle_cpu_share,
                     ping, recv_exactly, rss_bytes, wait_until)
from upstreams import EchoServer, RefusingPort, ScriptedServer

STATUS_TIMEOUT = 5.0  # documented: a status request slower than this is dropped
ENDPOINT_KEYS = {"endpoint", "address", "addresses", "port", "up", "healthy", "priority", "weight", "secure",
                 "active_connections", "dial_failures", "last_error", "source"}
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# ==================================================================== Prometheus text 0.0.4 ==

METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN")
TIMESTAMP_RE = re.compile(r"-?\d+")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


class ExpositionError(AssertionError):
    pass


class Family:
    def __init__(self, name):
        self.name = name
        self.help = None
        self.type = None
        self.samples: Dict[Tuple, float] = {}  # (sample name, sorted label pairs) -> value

    def value(self, **labels):
        return self.samples[(self.name, tuple(sorted(labels.items())))]

    def label_values(self, label):
        return sorted(dict(key[1])[label] for key in self.samples)


def _unescape(text, allowed, line_no):
    """Undo the format's backslash escapes; any other escape is an error."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            if index + 1 >= len(text) or text[index + 1] not in allowed:
                raise ExpositionError(f"line {line_no}: bad escape in {text!r}")
            out.append(allowed[text[index + 1]])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _parse_labels(text, line_no):
    """`{a="x",b="y"}` at the start of `text` -> (label pairs, rest of the text)."""
    labels, index = {}, 1
    while True:
        if text[index:index + 1] == "}":
            return labels, text[index + 1:]
        match = LABEL_NAME_RE.match(text, index)
        if not match or text[match.end():match.end() + 2] != '="':
            raise ExpositionError(f"line {line_no}: bad label at {text[index:]!r}")
        name = match.group()
        if name.startswith("__") or name in labels:
            raise ExpositionError(f"line {line_no}: reserved or repeated label {name!r}")
        index = match.end() + 2
        start = index
        while index < len(text) and text[index] != '"':
            index += 2 if text[index] == "\\" else 1
        if index >= len(text):
            raise ExpositionError(f"line {line_no}: unterminated label value")
        labels[name] = _unescape(text[start:index], {"\\": "\\", '"': '"', "n": "\n"}, line_no)
        index += 1
        if text[index:index + 1] == ",":
            index += 1
        elif text[index:index + 1] != "}":
            raise ExpositionError(f"line {line_no}: expected , or }} after a label value")


def _parse_float(text, line_no):
    if not FLOAT_RE.fullmatch(text):
        raise ExpositionError(f"line {line_no}: bad value {text!r}")
    return float(text)


def _family_of(families, sample_name):
    if sample_name in families:
        return families[sample_name]
    for family in families.values():
        for suffix in SUFFIXES.get(family.type, ()):
            if sample_name == family.name + suffix:
                return family
    return None


def _parse_descriptor(families, finished, parts, line_no) -> Family:
    """A `# HELP name text` or `# TYPE name type` line."""
    keyword, name = parts[1], parts[2]
    if not METRIC_NAME_RE.fullmatch(name):
        raise ExpositionError(f"line {line_no}: bad metric name {name!r}")
    family = families.setdefault(name, Family(name))
    if name in finished or family.samples:
        raise ExpositionError(f"line {line_no}: {keyword} for {name} after its samples")
    if keyword == "HELP":
        if family.help is not None:
            raise ExpositionError(f"line {line_no}: second HELP for {name}")
        family.help = _unescape(parts[3] if len(parts) > 3 else "", {"\\": "\\", "n": "\n"},
                                line_no)
    elif family.type is not None or len(parts) != 4 or parts[3] not in TYPES:
        raise ExpositionError(f"line {line_no}: bad or second TYPE line for {name}")
    else:
        family.type = parts[3]
    return family


def _parse_sample(families, finished, line, line_no) -> Family:
    """`name{labels} value [timestamp]`."""
    match = METRIC_NAME_RE.match(line)
    if not match:
        raise ExpositionError(f"line {line_no}: bad sample line {line!r}")
    sample_name, rest = match.group(), line[match.end():]
    labels = {}
    if rest.startswith("{"):
        labels, rest = _parse_labels(rest, line_no)
    fields = rest.split(" ")
    if len(fields) not in (2, 3) or fields[0] != "":
        raise ExpositionError(f"line {line_no}: expected ' value [timestamp]': {line!r}")
    value = _parse_float(fields[1], line_no)
    if len(fields) == 3 and not TIMESTAMP_RE.fullmatch(fields[2]):
        raise ExpositionError(f"line {line_no}: bad timestamp {fields[2]!r}")
    family = _family_of(families, sample_name) or families.setdefault(sample_name,
                                                                       Family(sample_name))
    if family.name in finished:
        raise ExpositionError(f"line {line_no}: {family.name} samples are not grouped")
    key = (sample_name, tuple(sorted(labels.items())))
    if key in family.samples:
        raise ExpositionError(f"line {line_no}: repeated sample {line!r}")
    if family.type == "counter" and not value >= 0:
        raise ExpositionError(f"line {line_no}: counter {sample_name} is {value}")
    family.samples[key] = value
    return family


def parse_exposition(text: str) -> Dict[str, Family]:
    """Parse Prometheus text format 0.0.4 strictly; raises ExpositionError on any deviation."""
    if not text.endswith("\n"):
        raise ExpositionError("the last line must end with a newline")
    families: Dict[str, Family] = {}
    finished = set()  # families whose group of lines has ended: none of their lines may follow
    current = None
    for line_no, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue  # a plain comment: it neither opens nor closes a group
            family = _parse_descriptor(families, finished, parts, line_no)
        elif line:
            family = _parse_sample(families, finished, line, line_no)
        else:
            continue  # empty lines are ignored
        if current is not None and family.name != current:
            finished.add(current)
        current = family.name
    return families


VALID_EXPOSITION = ('# HELP a_total Help with \\\\ and \\n.\n# TYPE a_total counter\n'
                    'a_total{path="/x\\"y\\\\z\\n",code="200",} 3 1700000000000\n'
                    '# a plain comment\n\nb:ratio -1.5e-3\nc NaN\nd +Inf\n')


def test_exposition_parser_accepts_the_format():
    families = parse_exposition(VALID_EXPOSITION)
    assert families["a_total"].help == "Help with \\ and \n."
    assert families["a_total"].value(path='/x"y\\z\n', code="200") == 3
    assert families["b:ratio"].value() == -1.5e-3
    assert math.isnan(families["c"].value()) and families["d"].value() == math.inf


@pytest.mark.parametrize("bad", [
    "a 1",  # no final newline
    "1a 1\n",  # name starts with a digit
    "a{b=\"1\"} x\n",  # value is not a float
    "a{b=1} 1\n",  # unquoted label value
    "a{b=\"\\t\"} 1\n",  # unknown escape
    "a{b=\"1\",b=\"2\"} 1\n",  # repeated label
    "a{__b=\"1\"} 1\n",  # reserved label name
    "a{b=\"1\"  1\n",  # unterminated label set
    "a  1\n",  # two spaces
    "a 1\nb 1\na 2\n",  # samples of a family not grouped
    "a 1\n# TYPE a counter\n",  # TYPE after the samples
    "# TYPE a counter\n# TYPE a counter\na 1\n",  # second TYPE
    "# TYPE a fancy\na 1\n",  # unknown type
    "# TYPE a counter\na -1\n",  # negative counter
    "a 1\na 2\n",  # repeated sample
])
def test_exposition_parser_rejects(bad):
    with pytest.raises(ExpositionError):
        parse_exposition(bad)


# ======================================================================== HTTP and gateways ==

class Response(NamedTuple):
    status: int
    headers: Dict[str, str]
    body: bytes


def recv_all(sock, timeout=IO_TIMEOUT):
    """Everything until EOF (a reset after data counts as the end too)."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def parse_response(data: bytes) -> Response:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response: {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, code, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        assert colon, f"bad header line {line!r}"
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body), (headers, body[:200])
    assert headers.get("connection") == "close", headers
    return Response(int(code), headers, body)


def request(addr, raw: bytes) -> Response:
    with socket.create_connection(addr, timeout=IO_TIMEOUT) as sock:
        sock.sendall(raw)
        return parse_response(recv_all(sock))


def get(addr, path, method="GET") -> Response:
    return request(addr, f"{method} {path} HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n\r\n".encode())


def scrape(gateway) -> Dict[str, Family]:
    reply = get(gateway.status_addr, "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4"), reply.headers
    return parse_exposition(reply.body.decode("utf-8"))


def endpoints_of(gateway):
    reply = get(gateway.status_addr, "/endpoints")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json", reply
    return {row["endpoint"]: row for row in json.loads(reply.body)}


def health_of(gateway):
    reply = get(gateway.status_addr, "/health")
    assert reply.headers["content-type"] == "application/json", reply
    return reply.status, json.loads(reply.body)


class StatusGateway(Gateway):
    """A gateway with --metrics-addr; `.addr` is the proxy port, `.status_addr` the status port."""

    def __init__(self, endpoints, *flags, wait_ready=True, preexec=None):
        self.addr = ("127.0.0.1", free_port())
        self.status_addr = ("127.0.0.1", free_port())
        super().__init__(["start", "--listen-addr=%s:%d" % self.addr,
                          "--metrics-addr=%s:%d" % self.status_addr,
                          "--endpoints=" + ",".join(endpoints), *flags], wait_ready=wait_ready,
                         preexec=preexec)

    def status_served(self):
        try:
            return get(self.status_addr, "/health").status in (200, 503)
        except OSError:
            return False


@pytest.fixture
def refusing():
    with RefusingPort() as port:
        yield port


def round_trip(addr, payload=b"ping"):
    """One echoed request/response through the proxy port on a fresh connection."""
    return ping(addr, payload, IO_TIMEOUT) == payload


def fd_baseline(gateway):
    """Descriptors of an idle gateway after one round trip: the relay may keep spare splice
    pipes for the next connection, which is not a leak."""
    assert round_trip(gateway.addr, b"warm-up")
    assert wait_until(lambda: scrape(gateway)["etcd_gateway_active_connections"].value() == 0,
                      timeout=10)
    return fd_count(gateway.pid)


def assert_fds_back(gateway, baseline):
    fd_dir = f"/proc/{gateway.pid}/fd"
    assert wait_until(lambda: fd_count(gateway.pid) <= baseline, timeout=10), (
        baseline, sorted(os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)))


# ===================================================================================== /metrics ==

REQUIRED = {  # family -> (type, the label sets every scrape must show)
    "etcd_gateway_connections_total": ("counter", None),
    "etcd_gateway_active_connections": ("gauge", None),
    "etcd_gateway_bytes_total": ("counter", "direction"),
    "etcd_gateway_dial_failures_total": ("counter", "endpoint"),
    "etcd_gateway_endpoint_up": ("gauge", "endpoint"),
    "etcd_gateway_endpoint_active_connections": ("gauge", "endpoint"),
    "etcd_gateway_discovery_refreshes_total": ("counter", "result"),
    "process_start_time_seconds": ("gauge", None),
    "process_open_fds": ("gauge", None),
    "process_resident_memory_bytes": ("gauge", None),
}


def test_metrics_parse_with_every_required_family(echo, refusing):
    started = time.time()
    with StatusGateway([echo.endpoint, refusing.endpoint]) as gateway:
        ready = time.time()
        families = scrape(gateway)
        fds, rss = fd_count(gateway.pid), rss_bytes(gateway.pid)
    for name, (kind, label) in REQUIRED.items():
        assert name in families, f"{name} missing; got {sorted(families)}"
        family = families[name]
        assert family.type == kind and family.help, (name, family.type, family.help)
        expected_labels = {
            None: [()], "direction": [("client_to_upstream",), ("upstream_to_client",)],
            "endpoint": sorted([(echo.endpoint,), (refusing.endpoint,)]),
            "result": [("error",), ("ok",)],
        }[label]
        assert sorted(tuple(v for _, v in key[1]) for key in family.samples) == expected_labels, (
            name, family.samples)
    assert families["etcd_gateway_connections_total"].value() == 0
    assert families["etcd_gateway_discovery_refreshes_total"].value(result="ok") == 0
    assert started - 1 <= families["process_start_time_seconds"].value() <= ready + 1
    # The scrape's own connection is open while the gateway counts: allow a few descriptors.
    assert abs(families["process_open_fds"].value() - fds) <= 3, (families["process_open_fds"], fds)
    assert 0.5 * rss <= families["process_resident_memory_bytes"].value() <= 2 * rss


def test_counters_follow_the_traffic(echo, refusing):
    payload = os.urandom(300_000)
    with StatusGateway([refusing.endpoint, echo.endpoint], "--policy=round-robin") as gateway:
        with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as client:
            client.sendall(payload)
            assert recv_exactly(client, len(payload)) == payload
            # Open: the gauges count it and the byte counters include its bytes already.
            live = scrape(gateway)
            assert live["etcd_gateway_active_connections"].value() == 1
            active = live["etcd_gateway_endpoint_active_connections"]
            assert active.value(endpoint=echo.endpoint) == 1
            assert active.value(endpoint=refusing.endpoint) == 0
            bytes_total = live["etcd_gateway_bytes_total"]
            assert bytes_total.value(direction="client_to_upstream") == len(payload)
            assert bytes_total.value(direction="upstream_to_client") == len(payload)
        for _ in range(4):
            assert round_trip(gateway.addr, b"x" * 1000)

        def settled():
            families = scrape(gateway)
            return families if families["etcd_gateway_active_connections"].value() == 0 else None
        after = wait_until(settled, timeout=10, interval=0.05)
        assert after, "active connections never went back to 0"
        assert after["etcd_gateway_connections_total"].value() == 5
        bytes_total = after["etcd_gateway_bytes_total"]
        assert bytes_total.value(direction="client_to_upstream") == len(payload) + 4000
        assert bytes_total.value(direction="upstream_to_client") == len(payload) + 4000
        assert after["etcd_gateway_endpoint_active_connections"].value(endpoint=echo.endpoint) == 0
        # The refusing endpoint was tried (round robin) and then marked down for the retry delay.
        failures = after["etcd_gateway_dial_failures_total"]
        assert failures.value(endpoint=refusing.endpoint) >= 1
        assert failures.value(endpoint=echo.endpoint) == 0
        up = after["etcd_gateway_endpoint_up"]
        assert up.value(endpoint=refusing.endpoint) == 0 and up.value(endpoint=echo.endpoint) == 1
        row = endpoints_of(gateway)[refusing.endpoint]
        assert row["dial_failures"] == failures.value(endpoint=refusing.endpoint)
    assert echo.served == 5


# ================================================================================ /health ==

def test_health_flips_to_503_when_every_endpoint_is_down_and_back():
    upstream = EchoServer(listening=False)  # bound but refusing until start_listening()
    try:
        with StatusGateway([upstream.endpoint], "--retry-delay=500ms") as gateway:
            # Nothing has failed yet: the endpoint is presumed up, as the Go gateway does.
            assert health_of(gateway) == (200, {"health": "true"})
            with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as client:
                assert closed_by_peer(client, IO_TIMEOUT), "client held although every endpoint refused"
            assert gateway.log.wait_for(rf"endpoint down.*{upstream.endpoint}", 10)
            assert health_of(gateway) == (503, {"health": "false"})

            upstream.start_listening()  # the endpoint comes back; the probe finds it
            assert wait_until(lambda: health_of(gateway)[0] == 200, timeout=10, interval=0.05), (
                gateway.log.text())
            assert health_of(gateway) == (200, {"health": "true"})
            assert gateway.log.wait_for(rf"endpoint up.*{upstream.endpoint}", 5)
            assert round_trip(gateway.addr)

            upstream.close()  # stop the upstream: its port now refuses again
            with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as client:
                assert closed_by_peer(client, IO_TIMEOUT)
            assert wait_until(lambda: health_of(gateway)[0] == 503, timeout=10, interval=0.05)
            assert health_of(gateway) == (503, {"health": "false"})
    finally:
        upstream.close()


def test_health_is_200_while_one_of_several_endpoints_is_up(echo, refusing):
    with StatusGateway([refusing.endpoint, echo.endpoint], "--policy=round-robin") as gateway:
        for _ in range(3):
            assert round_trip(gateway.addr)
        assert endpoints_of(gateway)[refusing.endpoint]["up"] is False
        assert health_of(gateway) == (200, {"health": "true"})


# ============================================================================== /endpoints ==

def test_endpoints_lists_every_endpoint_with_the_documented_keys(echo, refusing):
    with StatusGateway([echo.endpoint, refusing.endpoint], "--policy=round-robin") as gateway:
        reply = get(gateway.status_addr, "/endpoints")
        rows = json.loads(reply.body)
        assert [row["endpoint"] for row in rows] == [echo.endpoint, refusing.endpoint]
        for row in rows:
            assert set(row) == ENDPOINT_KEYS, row
            assert row["address"] == "127.0.0.1" and row["endpoint"] == f"127.0.0.1:{row['port']}"
            assert row["up"] is True and row["healthy"] is True and row["secure"] is False
            assert isinstance(row["priority"], int) and isinstance(row["weight"], int)
            assert row["active_connections"] == 0 and row["dial_failures"] == 0
            assert row["last_error"] == ""
        with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as held:
            held.sendall(b"held")
            assert recv_exactly(held, 4) == b"held"
            for _ in range(3):  # round robin reaches the refusing endpoint at least once
                assert round_trip(gateway.addr)
            # The round trips' relays close a few hops after their clients do: poll.
            assert wait_until(
                lambda: endpoints_of(gateway)[echo.endpoint]["active_connections"] == 1,
                timeout=10, interval=0.02), endpoints_of(gateway)
            rows = endpoints_of(gateway)
        down = rows[refusing.endpoint]
        assert down["up"] is False and down["dial_failures"] >= 1
        assert "refused" in down["last_error"], down
        assert rows[echo.endpoint]["up"] is True and rows[echo.endpoint]["last_error"] == ""


def test_other_paths_404_other_methods_405(echo):
    with StatusGateway([echo.endpoint]) as gateway:
        for path in ("/", "/metric", "/health/x", "/endpoints.json", "/%00", "/" + "a" * 2000):
            assert get(gateway.status_addr, path).status == 404, path
        assert get(gateway.status_addr, "/health?verbose=1").status == 200
        for method in ("POST", "PUT", "DELETE", "HEAD"):
            reply = get(gateway.status_addr, "/metrics", method=method)
            assert reply.status == 405, (method, reply)
            assert reply.headers.get("allow") == "GET", reply.headers
        body = b"x=1"
        post = request(gateway.status_addr, b"POST /health HTTP/1.1\r\nHost: gw\r\n"
                       b"Content-Length: 3\r\n\r\n" + body)
        assert post.status == 405
        http10 = request(gateway.status_addr, b"GET /health HTTP/1.0\r\n\r\n")
        assert http10.status == 200 and json.loads(http10.body) == {"health": "true"}
        for garbled in (b"GET\r\n\r\n", b"GET /health\r\n\r\n", b"GET /health SPDY/3\r\n\r\n"):
            assert request(gateway.status_addr, garbled).status == 400, garbled
        assert round_trip(gateway.addr)


# ============================================================================= robustness ==

def test_request_over_8_kib_without_blank_line_is_dropped(echo):
    with StatusGateway([echo.endpoint]) as gateway:
        baseline = fd_baseline(gateway)
        with socket.create_connection(gateway.status_addr, timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (9 * 1024))
            sent_at = time.monotonic()
            data = recv_all(sock)
            elapsed = time.monotonic() - sent_at
        assert data == b"", f"an oversized request got an answer: {data[:200]!r}"
        # Dropped for its size, not by the 5 s timeout.
        assert elapsed < STATUS_TIMEOUT - 1, f"dropped only after {elapsed:.2f}s"
        assert scrape(gateway) and round_trip(gateway.addr)
        assert_fds_back(gateway, baseline)


def _watch_until_closed(socks, since, timeout):
    """Wait until the peer closes every socket; returns [seconds from `since` until it was
    closed, or None]."""
    started = time.monotonic()
    closed_after = [None] * len(socks)
    with selectors.DefaultSelector() as sel:
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, index)
        deadline = started + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                try:
                    if key.fileobj.recv(4096):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                closed_after[key.data] = time.monotonic() - since
                sel.unregister(key.fileobj)
    return closed_after


STATUS_MAX_CONNECTIONS = 16  # documented: one more status client makes the oldest go


@pytest.mark.slow  # the clients the cap spares wait out the 5 s status timeout
def test_silent_status_clients_hold_few_descriptors_and_never_stall_a_scrape(echo):
    silent_count = 200
    with StatusGateway([echo.endpoint]) as gateway:
        baseline = fd_baseline(gateway)
        socks = []
        try:
            for _ in range(silent_count):  # silent: connect and say nothing
                socks.append(socket.create_connection(gateway.status_addr, timeout=IO_TIMEOUT))
            # Each newcomer beyond the cap makes the oldest go: the descriptors stay bounded,
            # and a scrape is served at once, not after the silent crowd timed out.
            for _ in range(10):
                began = time.monotonic()
                assert health_of(gateway) == (200, {"health": "true"})
                assert round_trip(gateway.addr, b"while silent clients wait")
                assert time.monotonic() - began < 1.0, "a scrape or round trip stalled"
                assert fd_count(gateway.pid) <= baseline + STATUS_MAX_CONNECTIONS + 2
            closed_after = _watch_until_closed(socks, time.monotonic(), timeout=STATUS_TIMEOUT + 15)
        finally:
            for sock in socks:
                sock.close()
        assert None not in closed_after, f"{closed_after.count(None)} status clients never dropped"
        assert round_trip(gateway.addr) and scrape(gateway)
        assert_fds_back(gateway, baseline)


@pytest.mark.slow  # waits out the 5 s status timeout
def test_a_silent_client_alone_is_dropped_after_5s(echo):
    with StatusGateway([echo.endpoint]) as gateway:
        with socket.create_connection(gateway.status_addr, timeout=IO_TIMEOUT) as silent:
            opened = time.monotonic()
            closed_after = _watch_until_closed([silent], opened, timeout=STATUS_TIMEOUT + 15)
        assert STATUS_TIMEOUT - 1.0 <= closed_after[0] <= STATUS_TIMEOUT + 10, closed_after


def test_bare_lf_requests_are_answered(echo):
    with StatusGateway([echo.endpoint]) as gateway:
        reply = request(gateway.status_addr, b"GET /health HTTP/1.0\nHost: gw\n\n")
        assert reply.status == 200 and json.loads(reply.body) == {"health": "true"}


def test_unread_request_bytes_do_not_turn_the_reply_into_a_reset(echo):
    """A client that sends more than the request (a body, a pipelined request) still gets the
    whole reply: the gateway reads and drops the rest before it closes."""
    with StatusGateway([echo.endpoint]) as gateway:
        for _ in range(20):
            with socket.create_connection(gateway.status_addr, timeout=IO_TIMEOUT) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n" + b"x" * 20000)
                time.sleep(0.05)  # the subject: the extra bytes arrive before the reply is read
                data = bytearray()
                while True:  # to EOF: a reset (what closing with unread bytes sends) fails here
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            assert parse_response(bytes(data)).status == 200


def test_health_is_503_while_draining(echo):
    with StatusGateway([echo.endpoint], "--shutdown-timeout=10s") as gateway:
        with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as held:
            held.sendall(b"keeps the gateway draining")
            recv_exactly(held, 26)
            gateway.proc.send_signal(signal.SIGTERM)
            assert gateway.log.wait_for("shutting down", timeout=10), gateway.log.text()
            assert health_of(gateway) == (503, {"health": "false", "reason": "shutting down"})


def test_scrape_while_out_of_descriptors_waits_without_spinning(echo):
    """Out of descriptors, a pending scrape waits in the status port's backlog: the gateway
    must not spin on that readable listener, and serves the scrape once descriptors free up."""
    with StatusGateway([echo.endpoint], preexec=["prlimit", "--nofile=48:48", "--"]) as gateway:
        clients = []
        try:
            for _ in range(40):  # two descriptors each: more than the gateway has left
                sock = socket.create_connection(gateway.addr, timeout=IO_TIMEOUT)
                sock.setblocking(False)
                clients.append(sock)
            assert wait_until(lambda: fd_count(gateway.pid) >= 46, timeout=10)
            scraper = socket.create_connection(gateway.status_addr, timeout=IO_TIMEOUT)
            scraper.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            share = idle_cpu_share(gateway.pid)  # the point of the test: what it does meanwhile
            assert share < 0.5, f"{share:.0%} of a CPU out of descriptors"
        finally:
            for sock in clients:
                sock.close()
        with scraper:
            reply = parse_response(recv_all(scraper))
        assert reply.status == 200, reply
        assert gateway.proc.poll() is None


def _random_bytes(rng, size):
    return bytes(rng.getrandbits(8) for _ in range(size))


def _random_request(rng):
    kind = rng.randrange(6)
    if kind == 0:
        return _random_bytes(rng, rng.randrange(0, 3000))
    if kind == 1:
        return _random_bytes(rng, rng.randrange(0, 300)) + b"\r\n\r\n"
    if kind == 2:  # a request line with random parts
        method = rng.choice([b"GET", b"get", b"POST", b"", b"G\x00T", _random_bytes(rng, 5)])
        path = rng.choice([b"/metrics", b"/health", b"/endpoints", b"", b"*", b"/\xff\xfe",
                           _random_bytes(rng, rng.randrange(1, 50))])
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1 extra"])
        return b" ".join(p for p in (method, path, version) if p) + b"\r\n\r\n"
    if kind == 3:  # valid request, then junk that must be ignored
        return b"GET /health HTTP/1.1\r\n\r\n" + _random_bytes(rng, rng.randrange(0, 9000))
    if kind == 4:  # lone newlines, NULs, headers without colons
        return b"GET /metrics HTTP/1.1\n\n\x00\r\nno colon\r\n\r\n"
    return b"\r\n\r\n"


def test_random_bytes_cannot_crash_or_leak(echo):
    rng = random.Random(5)
    with StatusGateway([echo.endpoint]) as gateway:
        baseline = fd_baseline(gateway)
        deadline = time.monotonic() + 60
        for attempt in range(300):
            assert time.monotonic() < deadline, f"only {attempt} random clients in 60 s"
            payload = _random_request(rng)
            # A request without its blank line would wait out the 5 s timeout (tested above):
            # end those with a half-close or a reset instead.
            complete = b"\r\n\r\n" in payload or len(payload) > 8192
            ending = rng.choice(["read", "half-close", "reset"] if complete
                                else ["half-close", "reset"])
            with socket.create_connection(gateway.status_addr, timeout=IO_TIMEOUT) as sock:
                try:
                    sock.sendall(payload)
                except OSError:  # the gateway already dropped an oversized request
                    continue
                if ending == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    continue
                try:
                    if ending == "half-close":
                        sock.shutdown(socket.SHUT_WR)
                    reply = recv_all(sock)
                except OSError:  # dropped (oversized) before we finished: no reply to check
                    reply = b""
            if reply:
                assert parse_response(reply).status in (200, 400, 404, 405, 503), (payload, reply)
            assert gateway.proc.poll() is None, f"gateway died on {payload[:100]!r}"
        assert round_trip(gateway.addr) and scrape(gateway)
        assert_fds_back(gateway, baseline)
    assert "Traceback" not in gateway.log.text()


# ========================================================================================= logs ==

def _odd_health_reply(conn):
    """An etcd-like /health reply whose reason has spaces (as etcd's "RAFT NO LEADER" does), a
    backslash, control characters (escaped, as Go's encoding/json writes them) and non-ASCII
    bytes; formatted with spaces after the colons."""
    conn.settimeout(IO_TIMEOUT)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    body = b'{"health":"false", "reason": "no leader back\\\\slash\\u0001bell\\u0007caf\xc3\xa9"}'
    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return data


def test_json_log_lines_parse_with_json_loads(refusing):
    with ScriptedServer(_odd_health_reply) as odd:
        gateway = StatusGateway([odd.endpoint, refusing.endpoint], "--log-format=json",
                                "--log-level=debug", "--health-check=etcd",
                                "--health-interval=200ms", "--dial-timeout=500ms",
                                "--policy=round-robin")
        with gateway:
            assert gateway.log.wait_for(rf'"endpoint unhealthy".*{odd.endpoint}', 10), (
                gateway.log.text())
            assert gateway.log.wait_for(rf'"endpoint unhealthy".*{refusing.endpoint}', 10)
            # Every endpoint unhealthy: clients still reach a reachable one and get its answer
            # (round robin: one of the two starts with the refusing endpoint, which goes down).
            for _ in range(2):
                reply = request(gateway.addr, b"GET /health HTTP/1.1\r\nHost: member\r\n\r\n")
                assert reply.status == 503
            assert health_of(gateway) == (503, {"health": "false"})
            assert gateway.log.wait_for(r'"connection closed"', 10)
            gateway.signal(signal.SIGTERM)
            assert gateway.wait(timeout=30) == 0
            assert gateway.log.wait_for(r'"stopped"', 5)
    records = []
    for line in gateway.log.text().splitlines():
        record = json.loads(line)  # the subject of the test: every line is one JSON object
        assert isinstance(record, dict)
        assert record["level"] in ("debug", "info", "warn", "error"), record
        assert TS_RE.match(record["ts"]), record
        assert isinstance(record["msg"], str) and record["msg"], record
        records.append(record)
    messages = {record["msg"] for record in records}
    for msg in ("starting etcd-gateway", "endpoint unhealthy", "endpoint down",
                "connection closed", "shutting down", "stopped"):
        assert msg in messages, (msg, sorted(messages))
    assert any(msg.startswith("ready to proxy client requests to [") for msg in messages)
    odd_reasons = [r["reason"] for r in records
                   if r["msg"] == "endpoint unhealthy" and r["endpoint"] == odd.endpoint]
    # etcd's reason text survives intact: spaces, a backslash, control characters.
    assert odd_reasons and "no leader back\\slash\x01bell\x07caf\u00e9" in odd_reasons[0], odd_reasons
    closed = next(r for r in records if r["msg"] == "connection closed")
    assert isinstance(closed["bytes_in"], int) and isinstance(closed["bytes_out"], int), closed


GO_DURATION_RE = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _fields(line):
    """key=value pairs of a text log line (values may be quoted)."""
    return {m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
            for m in re.finditer(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S+))', line)}


def test_debug_logs_connection_closed_with_bytes_endpoint_and_duration(echo):
    with StatusGateway([echo.endpoint], "--log-level=debug") as gateway:
        with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as client:
            client.sendall(b"a" * 5000)
            assert recv_exactly(client, 5000)
            client.sendall(b"b" * 123)
            assert recv_exactly(client, 123)
        line = gateway.log.wait_for(r"\bdebug connection closed\b", 10)
        assert line, gateway.log.text()
    fields = _fields(line)
    assert fields["endpoint"] == echo.endpoint, line
    assert fields["bytes_in"] == "5123" and fields["bytes_out"] == "5123", line
    assert GO_DURATION_RE.match(fields["duration"]), line


@pytest.mark.parametrize("level", ["warn", "error"])
def test_log_level_hides_lower_levels(echo, refusing, level):
    gateway = StatusGateway([refusing.endpoint, echo.endpoint], f"--log-level={level}",
                            "--policy=round-robin", wait_ready=False)
    with gateway:
        # No ready line at this level (it is info): wait until the status port answers.
        assert wait_until(gateway.status_served, timeout=30, interval=0.05), gateway.log.text()
        for _ in range(3):  # round robin: one of these dials the refusing endpoint
            assert round_trip(gateway.addr)
        assert endpoints_of(gateway)[refusing.endpoint]["dial_failures"] >= 1
        gateway.signal(signal.SIGTERM)
        assert gateway.wait(timeout=30) == 0
        assert wait_until(lambda: None in gateway.log.lines, timeout=10)  # stderr fully read
    lines = gateway.log.text().splitlines()
    assert not [line for line in lines if re.search(r"Z (debug|info) ", line)], lines
    warns = [line for line in lines if " warn endpoint down " in line]
    if level == "warn":
        assert len(warns) == 1 and refusing.endpoint in warns[0], lines
        assert all(re.search(r"Z (warn|error) ", line) for line in lines), lines
    else:
        assert lines == [], lines


@pytest.mark.slow  # waits out the 5 s log rate limit
def test_repeated_identical_errors_are_rate_limited():
    with RefusingPort() as first, RefusingPort() as second:
        with StatusGateway([first.endpoint, second.endpoint]) as gateway:
            pattern = r"no endpoint reachable"
            clients = 0
            burst_end = time.monotonic() + 10
            while clients < 100 and time.monotonic() < burst_end:
                with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as client:
                    assert closed_by_peer(client, IO_TIMEOUT)
                clients += 1
            assert gateway.log.wait_for(pattern, 5)
            # Keep clients coming (bounded) until the limiter lets the next line through.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if gateway.log.wait_for(r"no endpoint reachable.*suppressed=", 0.1):
                    break
                with socket.create_connection(gateway.addr, timeout=IO_TIMEOUT) as client:
                    assert closed_by_peer(client, IO_TIMEOUT)
                clients += 1
            limited = [line for line in gateway.log.text().splitlines() if pattern in line]
            downs = [line for line in gateway.log.text().splitlines() if "endpoint down" in line]
    assert len(limited) == 2, limited
    assert "suppressed=" not in limited[0]
    suppressed = int(re.search(r"suppressed=(\d+)", limited[1]).group(1))
    assert 1 + suppressed + 1 == clients, (clients, limited)
    # Each endpoint goes down once; later failed dials of a down endpoint are not news.
    assert len(downs) == 2 and first.endpoint in downs[0] + downs[1], downs
