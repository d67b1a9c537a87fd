"""Fleet awareness (issue 14): the gateway runs on every host, so whatever it sends on a timer is
multiplied by the fleet. Health checks ask etcd's serializable /health; health checks and probes
of failed endpoints are jittered.

In-process tests drive HealthMonitor with a fake clock and a seeded random.Random and read the
reactor's timers instead of waiting; a simulated fleet of gateways started in the same instant
shows the spread. Loopback tests run the gateway as a process against a scripted HTTP upstream
(the request line it sends, the replies it parses) and against real etcd 3.5.1 (which ignores
`serializable`).
"""
import io
import json
import random
import socket
import threading
import urllib.request

import pytest

import endpoints as ep
import gateway
from etcd_cluster import etcd_cluster  # noqa: F401  (fixture)
from test_status import StatusGateway, endpoints_of

JITTER = gateway.FLEET_JITTER
EVENT_TIMEOUT = 20.0  # waiting for a log line: only "did not hang"



class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def run_timers_until(reactor, clock, horizon):
    """Fire the reactor's timers in order, moving the fake clock to each, up to `horizon`."""
    for _ in range(100000):  # bounded: a timer loop that never ends fails instead of hanging
        timeout = reactor._select_timeout()
        if timeout is None or clock.now + timeout > horizon:
            return
        clock.now += timeout
        reactor._run_due_timers()
    raise AssertionError("timers kept firing")


def close_all(owner, reactor):
    owner.close()
    reactor.close()
    reactor.selector.close()  # Reactor.close() leaves the selector to its owner


def quiet_log():
    return gateway.Log(stream=io.StringIO())


def new_monitor(seed, *flags, endpoints=(), now=0.0):
    clock = FakeClock(now)
    reactor = gateway.Reactor(clock=clock)
    options = gateway.parse_args(["start", *flags])
    pool = ep.Pool(list(endpoints), "sticky", options.retry_delay, random.Random(0))
    monitor = gateway.HealthMonitor(reactor, pool, quiet_log(), options, None, lambda e: 0,
                                    random.Random(seed))
    return clock, reactor, monitor


# ---- health checks ------------------------------------------------------------------------------

def test_the_health_request_is_serializable():
    request = gateway.health_request(ep.parse_endpoint("10.0.0.1:2379"))
    assert request.startswith(b"GET /health?serializable=true HTTP/1.1\r\nHost: 10.0.0.1:2379\r\n")
    assert request.endswith(b"\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("reply, expected", [
    # etcd >= 3.5.3 always sends "reason"; 3.5.1 leaves it out when healthy.
    (b'HTTP/1.1 200 OK\r\n\r\n{"health":"true","reason":""}', (True, "")),
    (b'HTTP/1.1 200 OK\r\n\r\n{"health":"true"}', (True, "")),
    (b'HTTP/1.1 503 Service Unavailable\r\n\r\n{"health":"false","reason":"ALARM NOSPACE"}',
     (False, "health 503: ALARM NOSPACE")),
])
def test_serializable_and_linearizable_replies_parse_alike(reply, expected):
    assert gateway.parse_health_reply(reply) == expected


def check_times(seed, interval, horizon):
    """The instants one gateway's health-check rounds run, started at 0 (an empty pool: only the
    timers run; each round checks every endpoint at once)."""
    clock, reactor, monitor = new_monitor(seed, "--health-check=etcd",
                                          "--health-interval=%gs" % interval)
    times = []
    run_round = monitor._run_health_checks

    def recorded():
        times.append(clock.now)
        run_round()

    monitor._run_health_checks = recorded
    monitor.start()
    run_timers_until(reactor, clock, horizon)
    close_all(monitor, reactor)
    return times


def test_a_fleet_started_at_once_checks_spread_over_the_interval():
    interval, horizon, fleet, bucket = 5.0, 60.0, 1000, 0.5
    per_gateway = [check_times(seed, interval, horizon) for seed in range(fleet)]
    # Each gateway: the first round anywhere in the first interval, then 0.9-1.1 intervals apart,
    # so its rate stays one round per interval on average.
    for times in per_gateway:
        assert 0.0 <= times[0] < interval
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all((1 - JITTER) * interval <= g <= (1 + JITTER) * interval for g in gaps), gaps
    rounds = sum(len(times) for times in per_gateway)
    assert rounds == pytest.approx(fleet * horizon / interval, rel=0.03)
    # The fleet: no half second carries more than twice its share (without the random phase,
    # all 1,000 would fall into the first one, and again every 5 s).
    counts = {}
    for times in per_gateway:
        for when in times:
            counts[int(when / bucket)] = counts.get(int(when / bucket), 0) + 1
    share = fleet * bucket / interval
    assert max(counts.values()) <= 2 * share, sorted(counts.items())


def test_the_check_pace_is_reproducible_from_the_seed():
    assert check_times(7, 1.0, 20.0) == check_times(7, 1.0, 20.0)
    assert check_times(7, 1.0, 20.0) != check_times(8, 1.0, 20.0)


# ---- probes of failed endpoints -----------------------------------------------------------------

def test_probes_wait_the_retry_delay_plus_a_random_part_of_it():
    endpoint, other = ep.parse_endpoint("127.0.0.1:1"), ep.parse_endpoint("127.0.0.1:2")
    retry_delay, failed_at = 60.0, 100.0
    waits = []
    for seed in range(200):
        clock, reactor, monitor = new_monitor(seed, endpoints=(endpoint, other), now=failed_at)
        monitor.endpoint_failed(endpoint, "connection refused")
        first = monitor.probe_timer
        waits.append(first.when - failed_at)
        # Another endpoint failing later does not postpone (nor re-draw) the probe already due.
        clock.now += 10.0
        monitor.endpoint_failed(other, "connection refused")
        assert monitor.probe_timer is first
        close_all(monitor, reactor)
    # Never before --retry-delay (the endpoint stays out that long), at most 10 % after it, and
    # the draws use that room: a fleet that saw a member fail together probes it apart.
    assert all(retry_delay <= wait <= retry_delay * (1 + JITTER) for wait in waits)
    assert max(waits) - min(waits) > 0.8 * JITTER * retry_delay


def test_a_probe_due_later_than_the_timer_is_not_lost():
    # The timer fires before the (postponed) deadline: nothing is due, the next one is armed.
    endpoint = ep.parse_endpoint("127.0.0.1:1")
    clock, reactor, monitor = new_monitor(3, "--retry-delay=10s", endpoints=(endpoint,))
    monitor.endpoint_failed(endpoint, "connection refused")
    clock.now = 5.0
    monitor.endpoint_failed(endpoint, "connection refused")  # down until 15 s now
    run_timers_until(reactor, clock, 11.5)
    timer = monitor.probe_timer
    assert timer is not None and not timer.cancelled and 15.0 <= timer.when <= 16.0
    close_all(monitor, reactor)


# ---- loopback: a scripted etcd /health ------------------------------------------------------------

class HealthUpstream:
    """An HTTP server standing in for an etcd member's /health: records every request head and
    answers with `reply` (status line and JSON body), then closes, as etcd does for
    `Connection: close`."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.reply = ("200 OK", '{"health":"true","reason":""}')
        self.heads = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self._thread.join(10)

    def requests(self):
        with self._lock:
            return list(self.heads)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._answer(conn)
                except OSError:
                    pass

    def _answer(self, conn):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        with self._lock:
            self.heads.append(head.decode("latin-1"))
            status, body = self.reply
        conn.sendall(("HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                      "\r\n%s" % (status, len(body), body)).encode())


def test_the_gateway_asks_a_serializable_health_and_acts_on_the_reply():
    flags = ["--health-check=etcd", "--health-interval=100ms", "--dial-timeout=500ms"]
    with HealthUpstream() as member, StatusGateway([member.endpoint], *flags) as gw:
        member.reply = ("503 Service Unavailable", '{"health":"false","reason":"ALARM NOSPACE"}')
        line = gw.log.wait_for(r"endpoint unhealthy endpoint=%s" % member.endpoint, EVENT_TIMEOUT)
        assert line and 'reason="health 503: ALARM NOSPACE"' in line, gw.log.text()
        row = endpoints_of(gw)[member.endpoint]
        assert row["healthy"] is False and row["last_error"] == "health 503: ALARM NOSPACE"
        member.reply = ("200 OK", '{"health":"true","reason":""}')  # etcd >= 3.5.3's shape
        assert gw.log.wait_for(r"endpoint healthy endpoint=%s" % member.endpoint, EVENT_TIMEOUT)
        heads = member.requests()
    assert len(heads) >= 5
    for head in heads:
        lines = head.split("\r\n")
        assert lines[0] == "GET /health?serializable=true HTTP/1.1", head
        assert "Host: %s" % member.endpoint in lines and "Connection: close" in lines, head


# ---- real etcd 3.5.1 ------------------------------------------------------------------------------

def test_etcd_answers_the_serializable_health_check(etcd_cluster):  # noqa: F811
    member = etcd_cluster.members[0].client_addr
    with urllib.request.urlopen(f"http://{member}/version", timeout=10) as reply:
        version = json.loads(reply.read())["etcdserver"]
    with urllib.request.urlopen(f"http://{member}/health?serializable=true", timeout=10) as reply:
        assert reply.status == 200, version
        assert json.loads(reply.read())["health"] == "true", version
    # The parameter is new in 3.5.3; older members ignore it and check linearizably, which is
    # what the leaderless-member test of test_health_checks.py relies on.
    assert version.startswith("3."), version
