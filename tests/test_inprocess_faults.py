"""Faults of this host, or of one address, in-process (issue 12): none may be blamed on a member.

* Out of descriptors during a probe or an etcd health check (RLIMIT_NOFILE lowered for real):
  the endpoint is not marked down, not counted unhealthy, and its clients are not evicted.
* Out of ephemeral ports (EADDRNOTAVAIL from connect(), for real: a private network namespace
  whose ip_local_port_range holds four ports, run in a child process): the client waits and is
  served once a port is free; the member is never marked down.
* A name with two addresses, one of them refusing: the client is served by the other and the
  endpoint stays up; the next client goes straight to the address that answered.
"""
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest

import endpoints as ep
import gateway
import inprocess
from test_inprocess_gateway import echoes, etcd_member, start_gateway, client_of, UNHEALTHY_REPLY
from support import health_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def loop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with inprocess.Loop() as loop:
        yield loop


def test_out_of_descriptors_a_probe_marks_nothing(loop):
    member = socket.socket()
    loop.defer(member.close)
    member.bind(("127.0.0.1", 0))  # refused until it listens
    down = inprocess.endpoint_of(member)
    upstream = loop.server(inprocess.echo)
    gw = start_gateway(loop, [down, upstream.endpoint], "--retry-delay=2s")
    assert echoes(loop, client_of(loop, gw))
    health = health_of(gw.pool, down)
    failures = health.dial_failures
    member.listen(8)  # the member is back, but this host cannot open a socket to see it
    with inprocess.out_of_descriptors():
        loop.clock.advance(2.0)
        loop.run_until(lambda: "cannot probe endpoint" in loop.log_text(), what="the probe fails locally")
    assert health.dial_failures == failures and health.last_error == "connection refused"
    loop.clock.advance(2.0)
    loop.run_until(lambda: health.up, what="the next probe, with descriptors, brings it up")


def test_out_of_descriptors_health_checks_neither_count_nor_evict(loop):
    reply = [UNHEALTHY_REPLY]
    member = loop.server(etcd_member(reply))
    gw = start_gateway(loop, [member.endpoint], "--health-check=etcd", "--health-interval=1s")
    client = client_of(loop, gw)
    assert echoes(loop, client)
    health = health_of(gw.pool, member.endpoint)
    loop.run_until(lambda: health.check_failures == 1, what="the first (real) failed check")
    with inprocess.out_of_descriptors():
        for _ in range(4):  # more than failures_to_leave checks, each failing locally
            loop.clock.advance(1.0)
            loop.turns(20)
    assert health.check_failures == 1 and health.healthy and health.up
    assert "cannot check endpoint" in loop.log_text()
    assert echoes(loop, client, b"still relayed")  # not evicted


def test_a_name_with_one_address_down_is_served_by_the_other(loop):
    answering = socket.socket()
    loop.defer(answering.close)
    answering.bind(("127.0.0.3", 0))
    port = answering.getsockname()[1]
    refusing = socket.socket()  # the same port on 127.0.0.2: bound, never listening
    loop.defer(refusing.close)
    refusing.bind(("127.0.0.2", port))
    answering.listen(8)
    answering.setblocking(False)
    name = ep.Endpoint("member.test", port).with_addresses(["127.0.0.3", "127.0.0.2"])
    assert name.address == "127.0.0.2"  # tried first: the lower address
    pool = ep.Pool([name], "sticky", 60.0, random.Random(1))
    host = inprocess.FakeHost(loop, [name])
    host.dial_order = pool.dial_order
    accepted = []

    class Accept:
        def handle_io(self, sock, mask):
            conn, _ = sock.accept()
            accepted.append(inprocess.Peer(loop, conn, echo=True))

        def handle_failure(self, exc):
            raise exc

    loop.reactor.register(answering, gateway.EVENT_READ, Accept())
    loop.defer(lambda: loop.reactor.unregister(answering))
    for payload in (b"first", b"second"):
        test_side, gateway_side = loop.tcp_pair()
        client = inprocess.Peer(loop, test_side)
        relay = host.open(gateway_side)
        client.send(payload)
        loop.run_until(lambda c=client, p=payload: c.received == p, what="the echo through 127.0.0.3")
        assert relay.address == (socket.AF_INET, ("127.0.0.3", port))
        pool.connection_opened(name, relay.address)  # what Connections reports to the pool
        client.close()
    assert "dial_failed" not in host.events()  # one address refused, the endpoint never failed
    assert pool.dial_order(name)[0] == (socket.AF_INET, ("127.0.0.3", port))


PORTS_SCRIPT = textwrap.dedent("""
    import socket, subprocess, sys
    sys.path[:0] = [%(root)r, %(tests)r]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("40000 40003")  # a handful of ephemeral ports in this namespace
    import gateway, inprocess
    loop = inprocess.Loop()
    upstream = loop.server(inprocess.echo)
    holders = []
    while len(holders) < 10:  # take every port there is
        try:
            holders.append(socket.create_connection(upstream.sock.getsockname()))
        except OSError:
            break
    assert 0 < len(holders) < 10, holders
    host = inprocess.FakeHost(loop, [upstream.endpoint])
    test_side, gateway_side = socket.socketpair()
    client = inprocess.Peer(loop, test_side)
    relay = host.open(gateway_side)
    assert host.events() == ["local_fault"], host.reports
    assert "dial_failed" not in host.events()
    holders.pop().close()  # a port frees up (loopback may reuse it from TIME_WAIT at once, or later)
    loop.clock.advance(gateway.ACCEPT_PAUSE_DELAY)
    client.send(b"served")
    loop.run_until(lambda: client.received == b"served")
    events = host.events()
    assert set(events[:events.index("connected")]) == {"local_fault"}, host.reports
    print("REASON", host.reports[0][1])
    for sock in holders:
        sock.close()
    client.close()
    loop.close(check_leaks=False)
""")


@pytest.mark.root  # a private network namespace (util-linux's unshare, which CI installs)
def test_out_of_ephemeral_ports_the_client_waits_and_no_member_is_blamed():
    script = PORTS_SCRIPT % {"root": ROOT, "tests": os.path.join(ROOT, "tests")}
    result = subprocess.run(["unshare", "--net", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REASON " + os.strerror(99).lower() in result.stdout  # EADDRNOTAVAIL
