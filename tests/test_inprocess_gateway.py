"""Gateway, Connections and HealthMonitor in-process, built from parsed command-line options.

A Gateway on the test's reactor with a real endpoint Pool, listening on 127.0.0.1:0 through
gateway.open_listener; clients and etcd-member stand-ins are Peers on the same reactor. Retry
delays, health intervals and the shutdown timeout pass by advancing the loop's clock.
"""
import errno
import random
import signal
import socket

import pytest

import endpoints as ep
import gateway
import inprocess
from inprocess import Peer
from support import health_of

UNHEALTHY_REPLY = (b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n'
                   b'{"health":"false","reason":"RAFT NO LEADER"}')
HEALTHY_REPLY = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"health":"true","reason":""}'


@pytest.fixture
def loop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # begin_shutdown tells systemd, if any
    with inprocess.Loop() as loop:
        yield loop


def start_gateway(loop, endpoints, *flags):
    """A Gateway for `--endpoints=...` and `flags`, listening on 127.0.0.1:0 (--listen-addr takes
    no port 0), its health monitor started, as gateway.serve does."""
    options = gateway.parse_args(["start", "--endpoints=" + ",".join(str(e) for e in endpoints)]
                                 + list(flags))
    pool = ep.Pool(options.endpoints, options.policy, options.retry_delay, random.Random(1))
    gw = gateway.Gateway(loop.reactor, pool, loop.log, options)
    loop.defer(gw.close)
    gw.connections.listen(gateway.open_listener("127.0.0.1", 0))
    gw.health.start()
    return gw


def client_of(loop, gw):
    return loop.connect(gw.connections.listen_address())


def echoes(loop, client, payload=b"ping"):
    before = len(client.received)
    client.send(payload)
    loop.run_until(lambda: len(client.received) == before + len(payload), what="the echo")
    return client.received[before:] == payload


def etcd_member(health_reply):
    """A stand-in for an etcd member: answers GET /health with `health_reply[0]` (a list, so a
    test can change it) and echoes any other client. A probe connects and sends inside its
    start(), so its request is already there when the member accepts."""
    def factory(loop, sock):
        try:
            head = sock.recv(11, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            head = b""
        if head == b"GET /health":
            return Peer(loop, sock, reply=health_reply[0])
        return Peer(loop, sock, echo=True)
    return factory


# ================================================================================== Connections ==

def test_a_client_is_relayed_and_counted(loop):
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [upstream.endpoint])
    client = client_of(loop, gw)
    assert echoes(loop, client, b"x" * 100000)
    health = health_of(gw.pool, upstream.endpoint)
    assert (gw.connections.count(), health.active, gw.stats.connections_total) == (1, 1, 1)
    assert gw.connections.live_bytes() == (100000, 100000)
    client.shutdown_write()
    loop.run_until(lambda: client.eof and not gw.connections.count())
    assert health.active == 0
    assert (gw.stats.client_to_upstream, gw.stats.upstream_to_client) == (100000, 100000)
    assert (f"connection closed endpoint={upstream.endpoint} bytes_in=100000 bytes_out=100000 "
            "reset=False") in loop.log_text()


def test_a_refused_endpoint_is_marked_down_the_client_served_elsewhere_and_a_probe_brings_it_back(loop):
    member = socket.socket()  # bound, not listening yet: connects are refused
    loop.defer(member.close)
    member.bind(("127.0.0.1", 0))
    down = inprocess.endpoint_of(member)
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [down, upstream.endpoint], "--retry-delay=2s")
    client = client_of(loop, gw)
    assert echoes(loop, client)
    health = health_of(gw.pool, down)
    assert not health.up and health.last_error == "connection refused"
    assert f"warn endpoint down endpoint={down}" in loop.log_text()

    loop.clock.advance(2.0)  # the probe is due: still refused
    loop.run_until(lambda: health.dial_failures == 2, what="the first probe fails")
    assert not health.up

    member.listen(8)  # the member is back
    loop.clock.advance(2.0)
    loop.run_until(lambda: health.up, what="the second probe succeeds")
    assert f'endpoint up endpoint={down} reason="connect succeeded"' in loop.log_text()


def test_out_of_descriptors_accepting_pauses_then_resumes(loop):
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [upstream.endpoint])
    client = client_of(loop, gw)  # waits in the backlog
    listener = gw.connections.listener
    with inprocess.out_of_descriptors():
        loop.run_until(lambda: listener.paused, what="accept fails with EMFILE")
    assert "warn accept paused reason=\"too many open files\"" in loop.log_text()
    loop.clock.advance(gateway.ACCEPT_PAUSE_DELAY)
    assert echoes(loop, client)
    assert not listener.paused


def test_a_relay_out_of_descriptors_pauses_the_listener(loop):
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [upstream.endpoint])
    client = client_of(loop, gw)
    test_side, gateway_side = loop.tcp_pair()
    with inprocess.out_of_descriptors():
        gw.connections.open(gateway_side, ("127.0.0.1", 1))  # its dial fails with EMFILE
    assert gw.connections.listener.paused
    assert "warn cannot dial upstream, client waits" in loop.log_text()
    waiting = Peer(loop, test_side)
    loop.clock.advance(gateway.ACCEPT_PAUSE_DELAY)
    assert echoes(loop, waiting) and echoes(loop, client)


# ===================================================================================== shutdown ==

def test_sigterm_stops_accepting_and_the_reactor_stops_when_the_last_client_leaves(loop):
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [upstream.endpoint])
    address = gw.connections.listen_address()
    client = client_of(loop, gw)
    assert echoes(loop, client)
    loop.reactor.add_signal_handler(signal.SIGTERM, gw.begin_shutdown)  # as serve() does
    signal.raise_signal(signal.SIGTERM)  # the wake-up socket gets it to the loop
    loop.run_until(lambda: gw.shutting_down, what="SIGTERM dispatched")
    assert "info shutting down signal=SIGTERM active=1" in loop.log_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address)
    assert echoes(loop, client)  # the open connection is still served
    client.shutdown_write()
    loop.run_until_stopped()
    assert not gw.connections.count()
    loop.run_until(lambda: client.ended)  # the relay closed with FIN just before the stop
    assert client.eof and client.error is None


def test_without_connections_shutdown_stops_the_reactor_at_once(loop):
    gw = start_gateway(loop, [loop.refusing_endpoint()])
    loop.reactor.call_later(0.0, gw.begin_shutdown, signal.SIGTERM)
    loop.run_until_stopped()
    assert gw.connections.listen_address() is None


def test_connections_left_at_the_shutdown_timeout_are_reset(loop):
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [upstream.endpoint], "--shutdown-timeout=10s")
    client = client_of(loop, gw)
    assert echoes(loop, client)
    loop.reactor.call_later(0.0, gw.begin_shutdown, signal.SIGTERM)
    loop.run_until(lambda: gw.shutting_down)
    loop.clock.advance(10.0)
    loop.run_until_stopped()
    loop.run_until(lambda: client.ended)
    assert client.error == errno.ECONNRESET
    assert "warn shutdown timeout: closing open connections active=1" in loop.log_text()


# ================================================================================ HealthMonitor ==

def monitor(loop, endpoints, *flags):
    options = gateway.parse_args(["start"] + list(flags))
    pool = ep.Pool(endpoints, options.policy, options.retry_delay, random.Random(1))
    evicted = []
    health = gateway.HealthMonitor(loop.reactor, pool, loop.log, options, None,
                                   lambda endpoint: evicted.append(endpoint) or 0)
    loop.defer(health.close)
    return health, pool, evicted


def test_a_failed_endpoint_is_probed_after_the_retry_delay_and_comes_back(loop):
    server = loop.server(inprocess.silent)
    health, pool, _ = monitor(loop, [server.endpoint], "--retry-delay=1s")
    health.endpoint_failed(server.endpoint, "connection refused")
    assert not health_of(pool, server.endpoint).up and not pool.any_usable()
    loop.turns(3)
    assert not server.accepted  # not before the retry delay
    loop.clock.advance(1.0)
    loop.run_until(lambda: health_of(pool, server.endpoint).up, what="the probe")
    assert not health.probing
    loop.run_until(lambda: server.accepted)  # the probe's connection, closed already


def test_etcd_checks_take_an_unhealthy_member_out_after_three_failures_and_back_after_two(loop):
    reply = [UNHEALTHY_REPLY]
    member = loop.server(etcd_member(reply))
    health, pool, evicted = monitor(loop, [member.endpoint], "--health-check=etcd", "--health-interval=1s")
    entry = health_of(pool, member.endpoint)
    health.start()
    for failures in (1, 2, 3):
        loop.run_until(lambda f=failures: entry.check_failures == f, what="check %d" % failures)
        loop.clock.advance(1.0)
    assert not entry.healthy and entry.last_error == "health 503: RAFT NO LEADER"
    assert evicted == [member.endpoint]
    assert f"warn endpoint unhealthy endpoint={member.endpoint}" in loop.log_text()

    reply[0] = HEALTHY_REPLY
    loop.run_until(lambda: entry.check_successes == 1)
    assert not entry.healthy  # one success is not enough: no flapping
    loop.clock.advance(1.0)
    loop.run_until(lambda: entry.healthy)
    assert f"info endpoint healthy endpoint={member.endpoint}" in loop.log_text()


def test_an_unreachable_member_found_by_a_health_check_is_marked_down(loop):
    refused = loop.refusing_endpoint()
    health, pool, _ = monitor(loop, [refused], "--health-check=etcd", "--health-interval=1s")
    health.start()
    loop.run_until(lambda: not health_of(pool, refused).up)
    assert health_of(pool, refused).last_error == "connection refused"


def test_an_unhealthy_members_clients_are_evicted_and_status_says_so(loop):
    member = loop.server(etcd_member([UNHEALTHY_REPLY]))
    gw = start_gateway(loop, [member.endpoint], "--health-check=etcd", "--health-interval=1s")
    gw.status.serve(gateway.open_listener("127.0.0.1", 0))
    client = client_of(loop, gw)
    assert echoes(loop, client)
    entry = health_of(gw.pool, member.endpoint)
    for failures in (1, 2):
        loop.run_until(lambda f=failures: entry.check_failures == f)
        loop.clock.advance(1.0)
    loop.run_until(lambda: client.ended, what="the eviction")
    assert client.error == errno.ECONNRESET
    assert f"closed connections of unhealthy endpoint endpoint={member.endpoint} count=1" in loop.log_text()
    status = loop.connect(gw.status.listener.sock.getsockname())
    status.send(b"GET /health HTTP/1.1\r\n\r\n")
    loop.run_until(lambda: status.ended)
    assert status.received.startswith(b"HTTP/1.1 503 ")


def test_shutdown_relays_the_clients_already_waiting_in_the_backlog(loop):
    """Closing the only descriptor of a listening socket resets the clients queued in its
    backlog: begin_shutdown accepts and relays them first."""
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [upstream.endpoint], "--shutdown-timeout=10s")
    queued = [client_of(loop, gw) for _ in range(5)]  # connected; the loop has not accepted them
    for index, client in enumerate(queued):
        client.send(b"queued %d" % index)
    gw.begin_shutdown(signal.SIGTERM)
    assert gw.connections.listener is None  # no longer accepting
    for index, client in enumerate(queued):
        loop.run_until(lambda c=client, i=index: c.received == b"queued %d" % i, what="the echo")
        assert client.error is None
