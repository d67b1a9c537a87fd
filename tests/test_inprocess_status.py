"""StatusPages in-process: /metrics, /health and /endpoints served from a real reactor.

Built with a real endpoint Pool and Stats and a stand-in for the connections (count() and
live_bytes(), all StatusPages reads of them), listening on 127.0.0.1:0 through
gateway.open_listener, asked by a test Peer on the same reactor. The 5 s request timeout is
passed by advancing the loop's clock.
"""
import json
import random

import pytest

import endpoints as ep
import gateway
import inprocess

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@pytest.fixture
def loop():
    with inprocess.Loop() as loop:
        yield loop


class OpenConnections:
    """What StatusPages asks of Connections, with fixed answers."""

    def count(self):
        return 2

    def live_bytes(self):
        return 100, 2000


@pytest.fixture
def pool():
    return ep.Pool(ep.parse_endpoints("127.0.0.1:2379,member-2.etcd.test:2379,https://[::1]:2379"),
                   "sticky", 60.0, random.Random(1))


@pytest.fixture
def pages(loop, pool):
    stats = gateway.Stats()
    stats.connections_total = 7
    stats.client_to_upstream, stats.upstream_to_client = 1000, 30000
    stats.refresh_ok, stats.refresh_error = 4, 1
    pages = gateway.StatusPages(loop.reactor, loop.log, pool, stats, OpenConnections())
    pages.serve(gateway.open_listener("127.0.0.1", 0))
    loop.defer(pages.close)
    return pages


def ask(loop, pages, request):
    """Send `request` (bytes), read until the server closes; returns the Peer."""
    client = loop.connect(pages.listener.sock.getsockname())
    client.send(request)
    loop.run_until(lambda: client.ended, what="the status server's answer")
    return client


def get(loop, pages, path):
    """(status, headers, body) of GET `path`."""
    client = ask(loop, pages, b"GET %s HTTP/1.1\r\nHost: gateway\r\n\r\n" % path.encode())
    assert client.eof and client.error is None
    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert int(headers["Content-Length"]) == len(body) and headers["Connection"] == "close"
    return int(status_line.split()[1]), headers, body


def samples(metrics_text):
    """{'name{labels}': value} of every sample line."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics_text.splitlines() if line and not line.startswith("#")}


def test_metrics_report_counters_live_connections_and_endpoints(loop, pages, pool):
    pool.mark_failed(pool.endpoints[1], loop.clock(), "connection refused")
    status, headers, body = get(loop, pages, "/metrics")
    assert status == 200 and headers["Content-Type"] == METRICS_TYPE
    found = samples(body.decode())
    assert found["etcd_gateway_connections_total"] == 7
    assert found["etcd_gateway_active_connections"] == 2
    # closed connections' bytes (Stats) plus what the open ones moved so far
    assert found['etcd_gateway_bytes_total{direction="client_to_upstream"}'] == 1100
    assert found['etcd_gateway_bytes_total{direction="upstream_to_client"}'] == 32000
    assert found['etcd_gateway_endpoint_up{endpoint="127.0.0.1:2379"}'] == 1
    assert found['etcd_gateway_endpoint_up{endpoint="member-2.etcd.test:2379"}'] == 0
    assert found['etcd_gateway_dial_failures_total{endpoint="member-2.etcd.test:2379"}'] == 1
    assert found['etcd_gateway_endpoint_up{endpoint="[::1]:2379"}'] == 1
    assert found['etcd_gateway_discovery_refreshes_total{result="error"}'] == 1
    assert found["process_open_fds"] > 0
    text = body.decode()
    for name in {key.split("{")[0] for key in found}:
        assert "# HELP %s " % name in text and "# TYPE %s " % name in text


def test_health_is_200_while_an_endpoint_is_usable_and_503_when_none_is(loop, pages, pool):
    assert get(loop, pages, "/health")[::2] == (200, b'{"health":"true"}')
    assert get(loop, pages, "/health?serializable=true")[0] == 200  # the query is ignored
    for endpoint in pool.endpoints:
        pool.mark_failed(endpoint, loop.clock(), "connection refused")
    status, headers, body = get(loop, pages, "/health")
    assert (status, headers["Content-Type"], body) == (503, "application/json", b'{"health":"false"}')


def test_endpoints_lists_each_with_its_health(loop, pages, pool):
    pool.mark_failed(pool.endpoints[0], loop.clock(), 'refused "quoted"')
    status, headers, body = get(loop, pages, "/endpoints")
    assert status == 200 and headers["Content-Type"] == "application/json"
    rows = json.loads(body)
    assert [row["endpoint"] for row in rows] == ["127.0.0.1:2379", "member-2.etcd.test:2379", "[::1]:2379"]
    assert rows[0] == {"endpoint": "127.0.0.1:2379", "address": "127.0.0.1", "addresses": ["127.0.0.1"],
                       "port": 2379, "up": False, "healthy": True, "priority": 0, "weight": 1,
                       "secure": False, "active_connections": 0, "dial_failures": 1,
                       "last_error": 'refused "quoted"', "source": "seed"}
    assert rows[1]["address"] == "member-2.etcd.test" and rows[1]["up"] is True  # unresolved
    assert rows[2]["secure"] is True


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /nope HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"hello\r\n\r\n", 400),
    (b"GET /metrics HTTP/2\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
])
def test_other_requests_get_an_error_status(loop, pages, request_bytes, status):
    client = ask(loop, pages, request_bytes)
    assert client.received.startswith(b"HTTP/1.1 %d " % status)
    if status == 405:
        assert b"\r\nAllow: GET\r\n" in client.received


def test_a_request_over_8_kib_is_dropped_unanswered(loop, pages):
    padding = b"x" * gateway.STATUS_MAX_REQUEST_BYTES
    client = ask(loop, pages, b"GET /metrics HTTP/1.1\r\nX-Padding: " + padding)
    assert not client.received  # closed without an answer (EOF, or a reset for unread bytes)
    assert not pages.listener.connections


def test_a_slow_request_is_dropped_after_the_request_timeout(loop, pages):
    client = loop.connect(pages.listener.sock.getsockname())
    client.send(b"GET /metrics HTTP/1.1\r\n")  # and never the empty line
    loop.run_until(lambda: any(c.request for c in pages.listener.connections))
    loop.turns(3)
    assert not client.ended
    loop.clock.advance(gateway.STATUS_REQUEST_TIMEOUT)
    loop.run_until(lambda: client.ended)
    assert client.eof and not client.received and not pages.listener.connections


def test_closing_the_pages_closes_the_listener_and_open_requests(loop, pages):
    client = loop.connect(pages.listener.sock.getsockname())
    loop.run_until(lambda: pages.listener.connections)
    address = pages.listener.sock.getsockname()
    pages.close()
    loop.run_until(lambda: client.ended)
    with pytest.raises(ConnectionRefusedError):
        loop.connect(address)
