"""Relay in-process: a real Reactor, real loopback sockets, a FakeHost as its RelayHost.

The data path's contract (STYLE.md §6) checked where it is implemented: echo both with splice and
by copying, half-close passed on only after the queue drained, a reset passed on as a reset, the
high-water mark, and the dial plan (a refused or silent endpoint skipped invisibly, all refused:
the client is closed). Every test ends with a descriptor-leak check (inprocess.Loop).
"""
import errno
import os
import select
import socket

import pytest

import gateway
import inprocess
from inprocess import FakeHost, Peer

EVENT_READ = gateway.EVENT_READ
SMALL_BUFFER_BYTES = 16384  # the test's own socket buffers: most of what is in flight is the relay's


@pytest.fixture(params=[
    pytest.param(True, id="epoll", marks=pytest.mark.skipif(
        not hasattr(select, "epoll"), reason="select.epoll is Linux's")),
    pytest.param(False, id="selectors"),  # the reactor's path where there is no epoll
])
def loop(request):
    with inprocess.Loop(use_epoll=request.param) as loop:
        yield loop


@pytest.fixture(params=[
    pytest.param(False, id="copy"),
    pytest.param(True, id="splice", marks=pytest.mark.skipif(
        gateway.splice is None, reason="os.splice needs Linux and Python >= 3.10")),
])
def use_splice(request):
    return request.param


def open_relay(loop, endpoints, use_splice=False, dial_timeout=1.0, rcvbuf=None, connect_timeout=None):
    """A FakeHost, a relay for a fresh client, and the client's Peer."""
    host = FakeHost(loop, endpoints, use_splice=use_splice, dial_timeout=dial_timeout,
                    connect_timeout=connect_timeout)
    test_side, gateway_side = loop.tcp_pair(rcvbuf=rcvbuf)
    client = Peer(loop, test_side)
    return host, host.open(gateway_side), client


def relayed_bytes(relay):
    """What the relay holds for the upstream right now, in its queue or in a pipe."""
    return len(relay.up.queue) + relay.up.piped


def test_echo_round_trip_then_both_half_closes_close_the_relay(loop, use_splice):
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [upstream.endpoint], use_splice)
    payload = os.urandom(3 << 20)
    client.send(payload)
    loop.run_until(lambda: len(client.received) == len(payload), what="the echo")
    assert client.received == payload
    assert relay.up.spliced is relay.down.spliced is use_splice  # bulk is spliced where it can be
    client.shutdown_write()
    loop.run_until(lambda: client.eof, what="EOF passed back")
    assert client.error is None  # closed with FIN, not reset
    assert relay.state is gateway.RelayState.CLOSED
    assert host.reports == [("connected", upstream.endpoint),
                            ("closed", upstream.endpoint, False, (len(payload), len(payload)))]


def keepalive_of(sock):
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))


def test_the_upstream_gets_no_delay_at_once_and_keep_alive_within_a_second(loop):
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [upstream.endpoint])
    short_host, short_lived, short_client = open_relay(loop, [upstream.endpoint])
    loop.run_until(lambda: relay.state is short_lived.state is gateway.RelayState.RELAYING)
    sock = relay.upstream_sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert not keepalive_of(sock)[0]  # a connection that ends within the second never pays for it
    short_client.shutdown_write()
    loop.run_until(lambda: short_lived.state is gateway.RelayState.CLOSED, what="the short one closed")
    loop.clock.advance(1.0)
    loop.run_until(lambda: keepalive_of(sock)[0], what="keep-alive on the upstream")
    assert keepalive_of(sock) == (1, gateway.KEEPALIVE_SECONDS)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == gateway.KEEPALIVE_SECONDS
    client.send(b"still relaying")
    loop.run_until(lambda: client.received == b"still relaying")


def test_half_close_is_passed_on_after_the_queue_drained_and_the_other_way_still_works(loop, use_splice):
    upstream = loop.server(lambda loop, sock: Peer(loop, sock, reading=False), rcvbuf=SMALL_BUFFER_BYTES)
    host, relay, client = open_relay(loop, [upstream.endpoint], use_splice, rcvbuf=SMALL_BUFFER_BYTES)
    loop.run_until(lambda: upstream.accepted)
    server = upstream.accepted[0]
    # Send in small steps until the relay holds bytes the upstream has not taken (the kernel's
    # buffers towards it are full), so that the EOF arrives while a queue is still waiting.
    sent = bytearray()
    while not relayed_bytes(relay):
        chunk = os.urandom(64 * 1024)
        sent += chunk
        client.send(chunk)
        expected = len(sent)
        loop.run_until(lambda n=expected: relay.up.total == n or relayed_bytes(relay),
                       what="the relay reads the chunk")
    client.shutdown_write()
    if not use_splice:  # a pipe that holds bytes is drained before the relay reads on (EOF too)
        loop.run_until(lambda: relay.up.state is gateway.FlowState.DRAINING, what="EOF seen, queue held")
    loop.turns(5)
    assert not server.eof and relayed_bytes(relay)  # the FIN waits behind the queued bytes

    server.resume_reading()
    loop.run_until(lambda: server.eof, what="the upstream sees EOF")
    assert server.received_at_eof == len(sent) and server.received == sent
    assert relay.up.state is gateway.FlowState.SHUT and relay.state is gateway.RelayState.RELAYING

    server.send(b"reply after the client's EOF")
    loop.run_until(lambda: client.received == b"reply after the client's EOF", what="the reply")
    server.shutdown_write()
    loop.run_until(lambda: client.eof)
    assert host.reports[-1] == ("closed", upstream.endpoint, False, (len(sent), 28))


def upstream_events(relay):
    """The masks the reactor hands `relay` for its upstream socket, recorded from now on."""
    masks = []
    handle_io = relay.handle_io

    def recording(sock, mask):
        if sock is relay.upstream_sock:
            masks.append(mask)
        handle_io(sock, mask)
    relay.handle_io = recording
    return masks


def test_an_answer_and_the_fin_behind_it_take_one_wake_up(loop):
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    upstream = loop.server(inprocess.replying(reply))
    host, relay, client = open_relay(loop, [upstream.endpoint])
    loop.run_until(lambda: relay.state is gateway.RelayState.RELAYING)
    masks = upstream_events(relay)
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    loop.run_until(lambda: client.eof, what="the answer and its EOF")
    assert client.received == reply and client.error is None
    if loop.reactor._epoll:  # EPOLLRDHUP: the FIN was in with the answer, so one read took both
        assert masks == [EVENT_READ | gateway.EVENT_CLOSED]
    else:  # selectors cannot tell: the EOF is a read of its own
        assert masks == [EVENT_READ, EVENT_READ]
    client.shutdown_write()
    loop.run_until(lambda: relay.state is gateway.RelayState.CLOSED)
    assert host.reports[-1] == ("closed", upstream.endpoint, False, (18, len(reply)))


def urgent_then_fin(loop, sock):
    """Sends "abc", one byte of urgent data, "def", and its FIN at once."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"abc")
    sock.send(b"!", socket.MSG_OOB)
    sock.sendall(b"def")
    sock.shutdown(socket.SHUT_WR)
    return Peer(loop, sock)


def test_urgent_data_before_the_fin_does_not_cut_the_stream_short(loop):
    # A read stops at the urgent mark: short, although bytes follow. With the FIN already in,
    # that short read must not be taken for the last one (the reactor reports EPOLLPRI then).
    upstream = loop.server(urgent_then_fin)
    host, relay, client = open_relay(loop, [upstream.endpoint])
    loop.run_until(lambda: client.eof, what="the stream and its EOF")
    assert client.received == b"abcdef"  # the urgent byte is out of band, as for any reader


def test_a_reset_from_upstream_reaches_the_client_as_a_reset(loop, use_splice):
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [upstream.endpoint], use_splice)
    client.send(b"ping")
    loop.run_until(lambda: client.received == b"ping")
    upstream.accepted[0].reset()
    loop.run_until(lambda: client.ended, what="the client sees the end")
    assert client.error == errno.ECONNRESET and not client.eof
    assert host.reports[-1] == ("closed", upstream.endpoint, True, (4, 4))


def test_a_reset_from_the_client_reaches_the_upstream_as_a_reset(loop, use_splice):
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [upstream.endpoint], use_splice)
    client.send(b"ping")
    loop.run_until(lambda: client.received == b"ping")
    client.reset()
    loop.run_until(lambda: upstream.accepted[0].ended)
    assert upstream.accepted[0].error == errno.ECONNRESET
    assert host.reports[-1] == ("closed", upstream.endpoint, True, (4, 4))


def test_a_slow_reader_stops_the_relay_at_the_high_water_mark(loop, use_splice):
    upstream = loop.server(lambda loop, sock: Peer(loop, sock, reading=False), rcvbuf=SMALL_BUFFER_BYTES)
    host, relay, client = open_relay(loop, [upstream.endpoint], use_splice, rcvbuf=SMALL_BUFFER_BYTES)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER_BYTES)
    # Far more than the kernel buffers towards a non-reading upstream hold (about 4 MiB: the
    # relay's upstream send buffer grows to net.ipv4.tcp_wmem's maximum).
    payload = os.urandom(16 << 20)
    most_held = [0]

    def paused():
        most_held[0] = max(most_held[0], relayed_bytes(relay))
        return not relay.client_mask & EVENT_READ

    client.send(payload)
    loop.run_until(paused, what="the relay stops reading the client")
    read_so_far = relay.up.total
    loop.turns(10)
    assert relay.up.total == read_so_far  # paused: nothing more read from the client
    assert client.unsent > 0  # and the client is held back by TCP, not by a dropped byte
    if use_splice:
        assert relay.up.piped > 0 and not relay.up.queue  # the pipe is the queue
    else:
        assert len(relay.up.queue) >= gateway.HIGH_WATER_BYTES
    assert most_held[0] <= gateway.HIGH_WATER_BYTES + gateway.RECV_CHUNK_BYTES

    server = upstream.accepted[0]
    server.resume_reading()
    loop.run_until(lambda: paused() is not None and len(server.received) == len(payload), timeout=20,
                   what="the upstream reads everything")
    assert server.received == payload
    assert most_held[0] <= gateway.HIGH_WATER_BYTES + gateway.RECV_CHUNK_BYTES
    assert relay.client_mask & EVENT_READ  # resumed below the low mark


def test_a_refused_endpoint_is_skipped_and_the_next_serves_the_client(loop):
    refused = loop.refusing_endpoint()
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [refused, upstream.endpoint])
    client.send(b"hello")
    loop.run_until(lambda: client.received == b"hello")
    assert host.reports == [("dial_failed", refused, "connection refused"),
                            ("connected", upstream.endpoint)]
    assert relay.endpoint == upstream.endpoint


def test_a_silent_endpoint_is_raced_and_the_next_serves_the_client(loop):
    """After --dial-timeout the next endpoint is tried alongside; the first to connect wins, and
    the silent attempt is handed to the host (it goes on as a probe), not failed."""
    silent = loop.blackhole_endpoint()
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [silent, upstream.endpoint], dial_timeout=0.05,
                                     connect_timeout=5.0)
    client.send(b"hello")  # sent while dialing: it waits in the kernel, unread
    loop.run_until(lambda: client.received == b"hello")
    assert host.reports == [("outlived", silent), ("connected", upstream.endpoint)]


def test_a_lone_silent_endpoint_is_given_up_at_the_connect_timeout(loop):
    silent = loop.blackhole_endpoint()
    host, relay, client = open_relay(loop, [silent], dial_timeout=0.05, connect_timeout=0.2)
    loop.run_until(lambda: client.ended)
    assert host.events() == ["dial_failed", "no_upstream", "closed"]
    assert host.reports[0] == ("dial_failed", silent, "connect timeout after 200ms")


def test_a_failure_moves_on_at_once_without_waiting_for_the_dial_timeout(loop):
    refused = loop.refusing_endpoint()
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [refused, upstream.endpoint], dial_timeout=30.0,
                                     connect_timeout=60.0)
    client.send(b"quick")
    loop.run_until(lambda: client.received == b"quick", timeout=5)
    assert host.events()[:2] == ["dial_failed", "connected"]


def test_all_endpoints_refused_closes_the_client(loop):
    first, second = loop.refusing_endpoint(), loop.refusing_endpoint()
    host, relay, client = open_relay(loop, [first, second])
    loop.run_until(lambda: client.ended)
    assert client.eof and client.error is None and not client.received
    assert host.events() == ["dial_failed", "dial_failed", "no_upstream", "closed"]
    assert host.reports[-1] == ("closed", None, False, (0, 0))  # never relayed to any endpoint


def test_abort_resets_both_sides(loop, use_splice):
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [upstream.endpoint], use_splice)
    client.send(b"ping")
    loop.run_until(lambda: client.received == b"ping")
    relay.abort()
    relay.abort()  # a second call changes nothing
    loop.run_until(lambda: client.ended and upstream.accepted[0].ended)
    assert client.error == errno.ECONNRESET and upstream.accepted[0].error == errno.ECONNRESET
    assert host.events() == ["connected", "closed"]
    assert host.reports[-1] == ("closed", upstream.endpoint, True, (4, 4))


class ExplodingPipes:
    """A pipe pool with a bug."""

    def __init__(self, real):
        self.real = real

    def take(self):
        raise RuntimeError("injected bug")

    def close(self):
        self.real.close()


def test_a_bug_in_the_handler_is_reported_and_resets_that_relay(loop, use_splice):
    upstream = loop.server(inprocess.echo)
    host, relay, client = open_relay(loop, [upstream.endpoint], use_splice)
    if use_splice:
        host.data.pipes = ExplodingPipes(host.data.pipes)
        relay.up.spliced = True  # as after a bulk read: small reads are copied otherwise
    else:
        host.data.recv_buffer = None  # recv_into(None): a TypeError, not an OSError
    client.send(b"ping")
    loop.run_until(lambda: client.ended)
    assert client.error == errno.ECONNRESET
    assert host.events() == ["connected", "relay_failed", "closed"]
    assert isinstance(host.report("relay_failed")[1], (RuntimeError, TypeError))
    assert host.reports[-1][2] is True  # reset


def test_out_of_descriptors_the_client_waits_and_the_dial_is_tried_again(loop):
    upstream = loop.server(inprocess.echo)
    host = FakeHost(loop, [upstream.endpoint])
    test_side, gateway_side = loop.tcp_pair()
    client = Peer(loop, test_side)
    with inprocess.out_of_descriptors():
        relay = host.open(gateway_side)
    assert host.reports == [("local_fault", os.strerror(errno.EMFILE).lower(), False)]
    assert relay.state is gateway.RelayState.DIALING
    client.send(b"still there")
    loop.clock.advance(gateway.ACCEPT_PAUSE_DELAY)
    loop.run_until(lambda: client.received == b"still there")
    assert host.events() == ["local_fault", "connected"]


def test_out_of_descriptors_for_too_long_the_client_is_reset(loop):
    upstream = loop.server(inprocess.echo)
    host = FakeHost(loop, [upstream.endpoint])
    test_side, gateway_side = loop.tcp_pair()
    client = Peer(loop, test_side)
    with inprocess.out_of_descriptors():
        host.open(gateway_side)
        loop.clock.advance(gateway.LOCAL_RETRY_TIMEOUT + 1)
        loop.run_until(lambda: client.ended)
    assert client.error == errno.ECONNRESET
    assert [r[:3] for r in host.reports] == [
        ("local_fault", "too many open files", False), ("local_fault", "too many open files", True),
        ("closed", None, True)]
    assert not upstream.accepted
