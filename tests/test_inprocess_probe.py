"""Dial and Probe in-process, and parse_health_reply.

Dial and Probe on a real Reactor against loopback servers on the same reactor: a connect that
completes inside start(), refused, timed out (a blackhole endpoint and the loop's clock advanced
past the timeout: no real wait), cancelled, out of descriptors; a probe's plain connect, HTTP
exchange, TLS handshake (trustme certificates), oversized reply, and its `connected` and
`local_failure` flags.
"""
import errno
import os
import ssl

import pytest
import trustme

import endpoints as ep
import gateway
import inprocess
from inprocess import TlsPeer

EMFILE_REASON = os.strerror(errno.EMFILE).lower()
HEALTHY_REPLY = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n'
                 b'{"health":"true","reason":""}\n')


@pytest.fixture
def loop():
    with inprocess.Loop() as loop:
        yield loop


class Outcomes(list):
    """An on_done that records its calls, and whether one came from inside start()."""

    starting = False

    def __call__(self, *args):
        self.append(args + (self.starting,))

    def start(self, operation):
        self.starting = True
        try:
            operation.start()
        finally:
            self.starting = False
        return operation


# ========================================================================================= Dial ==

def test_a_loopback_dial_completes_inside_start(loop):
    server = loop.server(inprocess.silent)
    done = Outcomes()
    dial = done.start(gateway.Dial(loop.reactor, server.endpoint, 1.0, done))
    # Linux completes a loopback handshake inside connect(): the fast path skips the selector.
    assert len(done) == 1
    finished, sock, reason, inside_start = done[0]
    assert finished is dial and reason is None and inside_start
    try:
        assert gateway.is_connected(sock) and sock.getpeername() == server.address
    finally:
        sock.close()
    assert dial.sock is None and dial.timer is None


def test_a_refused_dial_says_why(loop):
    done = Outcomes()
    dial = done.start(gateway.Dial(loop.reactor, loop.refusing_endpoint(), 1.0, done))
    loop.run_until(lambda: done)
    assert done == [(dial, None, "connection refused", done[0][3])]
    assert not dial.local_failure


def test_a_dial_into_a_blackhole_times_out(loop):
    done = Outcomes()
    dial = done.start(gateway.Dial(loop.reactor, loop.blackhole_endpoint(), 10.0, done))
    assert not done and dial.sock is not None  # waiting for the SYN's answer
    loop.turns(3)
    assert not done
    loop.clock.advance(10.0)
    loop.run_until(lambda: done)
    assert done == [(dial, None, "connect timeout after 10s", False)]
    assert dial.sock is None and not dial.local_failure


def test_a_cancelled_dial_closes_its_socket_and_never_calls_back(loop):
    done = Outcomes()
    dial = done.start(gateway.Dial(loop.reactor, loop.blackhole_endpoint(), 10.0, done))
    fd = dial.sock.fileno()
    dial.cancel()
    assert dial.sock is None
    with pytest.raises(OSError):
        os.fstat(fd)  # closed (nothing else opened a descriptor since)
    loop.clock.advance(20.0)  # past the timeout: the cancelled timer must not fire
    loop.turns(3)
    dial.cancel()  # twice is harmless
    assert not done


def test_out_of_descriptors_a_dial_fails_as_a_local_failure(loop):
    server = loop.server(inprocess.silent)
    done = Outcomes()
    with inprocess.out_of_descriptors():
        dial = done.start(gateway.Dial(loop.reactor, server.endpoint, 1.0, done))
    assert done == [(dial, None, EMFILE_REASON, True)]
    assert dial.local_failure


# ======================================================================================== Probe ==

def probe(loop, endpoint, timeout=5.0, **options):
    """Start a Probe; returns it with its Outcomes (on_done gets probe, ok, reply, reason)."""
    done = Outcomes()
    return done.start(gateway.Probe(loop.reactor, endpoint, timeout, done, **options)), done


def test_a_tcp_only_probe_succeeds_once_connected(loop):
    server = loop.server(inprocess.silent)
    tcp, done = probe(loop, server.endpoint)
    loop.run_until(lambda: done)
    assert done == [(tcp, True, b"", "", True)]  # loopback: finished inside start()
    assert tcp.connected and not tcp.local_failure and tcp.phase is gateway.ProbePhase.CLOSED


def test_a_probe_sends_its_request_and_reads_the_reply_until_eof(loop):
    server = loop.server(inprocess.replying(HEALTHY_REPLY))
    request = gateway.health_request(server.endpoint)
    health, done = probe(loop, server.endpoint, request=request)
    loop.run_until(lambda: done)
    assert done == [(health, True, HEALTHY_REPLY, "", False)]
    assert server.accepted[0].received == request
    host = str(server.endpoint).encode()
    assert request.startswith(b"GET /health?serializable=true HTTP/1.1\r\nHost: %s\r\n" % host)
    assert gateway.parse_health_reply(done[0][2]) == (True, "")


def test_a_reply_larger_than_the_limit_fails_the_probe(loop):
    oversized = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * gateway.PROBE_MAX_REPLY_BYTES
    server = loop.server(inprocess.replying(oversized))
    health, done = probe(loop, server.endpoint, request=b"GET / HTTP/1.1\r\n\r\n")
    loop.run_until(lambda: done)
    (_, ok, reply, reason, _), = done
    assert not ok and reason == "reply larger than %d bytes" % gateway.PROBE_MAX_REPLY_BYTES
    assert health.connected


def test_a_silent_server_times_the_probe_out_after_connecting(loop):
    server = loop.server(inprocess.silent)
    health, done = probe(loop, server.endpoint, timeout=10.0, request=b"GET /health HTTP/1.1\r\n\r\n")
    loop.run_until(lambda: server.accepted and server.accepted[0].received.endswith(b"\r\n\r\n"))
    assert not done
    loop.clock.advance(10.0)
    loop.run_until(lambda: done)
    assert done == [(health, False, b"", "timeout after 10s", False)]
    assert health.connected and not health.local_failure


def test_a_probe_into_a_blackhole_times_out_unconnected(loop):
    silent, done = probe(loop, loop.blackhole_endpoint(), timeout=10.0)
    loop.clock.advance(10.0)
    loop.run_until(lambda: done)
    (_, ok, _, reason, _), = done
    # The probe's own timer and its dial's are both due: either may be the one that tells.
    assert not ok and reason in ("timeout after 10s", "connect timeout after 10s")
    assert not silent.connected


def test_a_refused_probe_is_not_connected(loop):
    refused, done = probe(loop, loop.refusing_endpoint())
    loop.run_until(lambda: done)
    assert done[0][1:4] == (False, b"", "connection refused")
    assert not refused.connected and not refused.local_failure


def test_out_of_descriptors_a_probe_fails_as_a_local_failure(loop):
    server = loop.server(inprocess.silent)
    with inprocess.out_of_descriptors():
        local, done = probe(loop, server.endpoint)
    assert done == [(local, False, b"", EMFILE_REASON, True)]
    assert local.local_failure and not local.connected


def test_a_cancelled_probe_never_calls_back(loop):
    server = loop.server(inprocess.silent)
    health, done = probe(loop, server.endpoint, timeout=10.0, request=b"GET / HTTP/1.1\r\n\r\n")
    loop.run_until(lambda: server.accepted)
    health.cancel()
    loop.clock.advance(20.0)
    loop.turns(3)
    assert not done and health.sock is None


# ------------------------------------------------------------------------------------------ TLS --

@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def tls_server(loop, ca, identity="127.0.0.1", reply=None):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(identity).configure_cert(context)
    return loop.server(lambda loop, sock: TlsPeer(loop, sock, context, reply=reply))


def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_a_tls_probe_completes_a_verified_handshake(loop, ca):
    server = tls_server(loop, ca)
    tls, done = probe(loop, server.endpoint, tls_context=client_context(ca))
    loop.run_until(lambda: done and server.accepted and server.accepted[0].sock is None)
    assert done[0][1:4] == (True, b"", "")
    assert server.accepted[0].handshaken and server.accepted[0].handshake_error is None


def test_a_tls_probe_can_ask_for_health_over_tls(loop, ca):
    server = tls_server(loop, ca, reply=HEALTHY_REPLY)
    secure = server.endpoint._replace(secure=True)
    health, done = probe(loop, secure, tls_context=client_context(ca), request=gateway.health_request(secure))
    loop.run_until(lambda: done)
    assert done[0][1:4] == (True, HEALTHY_REPLY, "")


def test_a_tls_probe_rejects_a_certificate_from_another_ca(loop, ca):
    server = tls_server(loop, trustme.CA())
    tls, done = probe(loop, server.endpoint, tls_context=client_context(ca))
    loop.run_until(lambda: done and server.accepted and server.accepted[0].sock is None)
    (_, ok, _, reason, _), = done
    assert not ok and reason.startswith("certificate verify failed")
    assert tls.connected  # reachable, but not who it claims to be
    assert server.accepted[0].handshake_error is not None


def test_a_tls_probe_checks_the_name_it_is_given(loop, ca):
    server = tls_server(loop, ca, identity="member-1.etcd.test")
    tls, done = probe(loop, server.endpoint, tls_context=client_context(ca),
                      server_hostname="member-2.etcd.test")
    loop.run_until(lambda: done)
    assert not done[0][1] and "certificate verify failed" in done[0][3]
    right, done = probe(loop, server.endpoint, tls_context=client_context(ca),
                        server_hostname="member-1.etcd.test")
    loop.run_until(lambda: done)
    assert done[0][1:4] == (True, b"", "")


# ============================================================================ parse_health_reply ==

@pytest.mark.parametrize("reply, expected", [
    (HEALTHY_REPLY, (True, "")),
    (b'HTTP/1.1 200 OK\r\n\r\n{ "health" : "true" }', (True, "")),
    (b'HTTP/1.0 200 OK\r\n\r\n{"health":\n"true"}', (True, "")),
    (b'HTTP/1.1 503 Service Unavailable\r\n\r\n{"health":"false","reason":"RAFT NO LEADER"}',
     (False, "health 503: RAFT NO LEADER")),
    (b'HTTP/1.1 200 OK\r\n\r\n{"health":"false","reason":""}', (False, "health 200")),
    (b'HTTP/1.1 200 OK\r\n\r\n{"health":"false", "reason" : "ALARM NOSPACE"}',
     (False, "health 200: ALARM NOSPACE")),
    (b'HTTP/1.1 200 OK\r\n\r\n', (False, "health 200")),
    (b'HTTP/1.1 404 Not Found\r\n\r\n404 page not found\n', (False, "health 404")),
    (b'HTTP/1.1 200 OK\r\n\r\n{"health":true}', (False, "health 200")),  # a string in etcd's JSON
    (b"", (False, "not an HTTP reply")),
    (b"SSH-2.0-OpenSSH_9.6\r\n", (False, "not an HTTP reply")),
    (b"\x15\x03\x01\x00\x02\x02\x46", (False, "not an HTTP reply")),  # a TLS alert: an https member
])
def test_parse_health_reply(reply, expected):
    assert gateway.parse_health_reply(reply) == expected


def test_health_request_names_the_endpoint_and_closes():
    request = gateway.health_request(ep.parse_endpoint("[::1]:2379"))
    assert request.startswith(b"GET /health?serializable=true HTTP/1.1\r\nHost: [::1]:2379\r\n")
    assert b"\r\nConnection: close\r\n" in request and request.endswith(b"\r\n\r\n")
