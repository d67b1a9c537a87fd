"""Member sync's rules in process: a real Reactor, Gateway and Pool, and scripted members that
answer POST /v3/cluster/member/list with whatever reply a test sets.

What a real cluster rarely shows on demand: a failed or empty answer keeps the last good set
(the set is never empty), a discovery refresh replaces the seeds but not the synced set, seeds
stay behind the synced members as the fallback, plain members are refused under secure
discovery, and the member asked is a usable synced one.
"""
import io
import random
import socket
import time

import pytest

import endpoints as ep
import gateway
from upstreams import ScriptedServer

ROUND_TIMEOUT = 10.0  # "did not hang"


def member_json(name, url, learner=False):
    return ('{"ID":"1","name":"%s","peerURLs":["http://127.0.0.1:1"],"clientURLs":["%s"]%s}'
            % (name, url, ',"isLearner":true' if learner else ""))


def http_reply(body, status="200 OK"):
    return ("HTTP/1.0 %s\r\nContent-Type: application/json\r\n\r\n%s" % (status, body)).encode()


class FakeMembers:
    """`count` scripted members; every one answers the member list with `self.reply`."""

    def __init__(self, count):
        self.reply = http_reply('{"members":[]}')
        self.asked = []
        self.broken = set()  # indices of members that close the connection without a word
        self.servers = [ScriptedServer(self._answer) for _ in range(count)]
        self.addrs = [server.endpoint for server in self.servers]

    def _answer(self, conn):
        conn.settimeout(10)
        request = b""
        while not request.endswith(b"\r\n\r\n{}"):
            chunk = conn.recv(4096)
            if not chunk:
                return None
            request += chunk
        port = conn.getsockname()[1]
        self.asked.append(port)
        if port in {self.port(i) for i in self.broken}:
            return request
        conn.sendall(self.reply)
        conn.shutdown(socket.SHUT_WR)
        return request

    def port(self, index):
        return int(self.addrs[index].rsplit(":", 1)[1])

    def list_members(self, *indices, learners=()):
        members = [member_json("m%d" % i, "http://" + self.addrs[i]) for i in indices]
        members += [member_json("l%d" % i, "http://" + self.addrs[i], learner=True) for i in learners]
        self.reply = http_reply('{"header":{},"members":[%s]}' % ",".join(members))

    def close(self):
        for server in self.servers:
            server.close()


@pytest.fixture
def members():
    fake = FakeMembers(4)
    yield fake
    fake.close()


class InProcess:
    """A Gateway with member sync on, in this process; its log goes to `self.log_text()`."""

    def __init__(self, seeds, *flags):
        self.options = gateway.parse_args(["start", "--endpoints=" + ",".join(seeds),
                                           "--auto-sync-interval=1h", *flags])
        self.stream = io.StringIO()
        self.log = gateway.Log(stream=self.stream)
        self.reactor = gateway.Reactor(log=self.log)
        self.pool = ep.Pool(self.options.endpoints, "sticky", 60.0, random.Random(1))
        self.gateway = gateway.Gateway(self.reactor, self.pool, self.log, self.options)
        self.sync = self.gateway.sync

    def round(self):
        """One sync round, run to its end."""
        self.sync.sync_now()
        self.wait_for_round()

    def wait_for_round(self):
        """Run the reactor until the round under way (if any: on loopback one may end inside
        sync_now) has ended."""
        deadline = time.monotonic() + ROUND_TIMEOUT

        def poll():
            if not self.sync.busy or time.monotonic() > deadline:
                self.reactor.stop()
            else:
                self.reactor.call_later(0.005, poll)
        poll()
        if self.sync.busy:
            self.reactor.run()
        assert not self.sync.busy, "the round did not end"

    def rows(self):
        """(endpoint, source, priority) of the pool, as /endpoints shows them."""
        return [(str(h.endpoint), self.gateway.status.source_of(h.endpoint), h.endpoint.priority)
                for h in self.pool.healths()]

    def log_text(self):
        return self.stream.getvalue()

    def close(self):
        self.gateway.close()
        self.reactor.close()


@pytest.fixture
def make_gateway():
    made = []

    def make(*args, **kwargs):
        made.append(InProcess(*args, **kwargs))
        return made[-1]
    yield make
    for each in made:
        each.close()


def test_members_become_the_set_with_the_seed_behind(members, make_gateway):
    gw = make_gateway([members.addrs[0]])
    members.list_members(1, 2, learners=[3])
    gw.round()
    a = members.addrs
    assert gw.rows() == [(a[1], "synced", 0), (a[2], "synced", 0), (a[0], "seed", 65536)]
    assert gw.gateway.stats.sync_ok == 1
    assert 'cause="member sync"' in gw.log_text()
    # The seed is a member again: synced, and no longer behind.
    members.list_members(0, 1, 2)
    gw.round()
    assert gw.rows() == [(a[0], "synced", 0), (a[1], "synced", 0), (a[2], "synced", 0)]
    assert "reranked=" in gw.log_text().splitlines()[-1]


@pytest.mark.parametrize("reply, reason", [
    (http_reply('{"error":"etcdserver: no leader","message":"etcdserver: no leader"}',
                "503 Service Unavailable"), "HTTP 503: etcdserver: no leader"),
    (http_reply('{"members":[%s]}' % member_json("l", "http://127.0.0.1:9", learner=True)),
     "names no usable member"),
    (http_reply('{"members":[{"ID":"7","peerURLs":["http://127.0.0.1:1"]}]}'),
     "names no usable member"),
    (http_reply('{"members":[%s]}' % member_json("u", "unix://s:0")), "names no usable member"),
    (http_reply('{"members":'), "not a JSON member list"),
    (b"", "not an HTTP reply"),
])
def test_a_failed_or_empty_answer_keeps_the_last_good_set(members, make_gateway, reply, reason):
    gw = make_gateway([members.addrs[0]])
    members.list_members(0, 1)
    gw.round()
    good = gw.rows()
    members.reply = reply
    gw.round()
    assert gw.rows() == good
    assert (gw.gateway.stats.sync_ok, gw.gateway.stats.sync_error) == (1, 1)
    last = gw.log_text().splitlines()[-1]
    assert "member sync failed, keeping the last good set" in last and reason in last, last


def test_a_failure_before_any_good_round_keeps_the_seeds(members, make_gateway):
    gw = make_gateway([members.addrs[0], members.addrs[1]])
    members.reply = http_reply("{}")
    gw.round()
    assert [row[1:] for row in gw.rows()] == [("seed", 0), ("seed", 0)]
    assert gw.gateway.stats.sync_error == 1


def test_a_discovery_refresh_replaces_the_seeds_not_the_synced_set(members, make_gateway):
    a = members.addrs
    gw = make_gateway([a[0]])
    members.list_members(1, 2)
    gw.round()
    gw.gateway._refreshed([ep.parse_endpoint(a[3]), ep.parse_endpoint(a[1])], None)
    assert gw.rows() == [(a[1], "synced", 0), (a[2], "synced", 0), (a[3], "seed", 65536)]
    assert gw.sync.seeds == [ep.parse_endpoint(a[3]), ep.parse_endpoint(a[1])]


def test_plain_members_are_refused_under_secure_discovery(members, make_gateway):
    gw = make_gateway([members.addrs[0]], "--discovery-srv=example.test")
    members.list_members(1, 2)
    gw.round()
    assert [row[1] for row in gw.rows()] == ["seed"]
    text = gw.log_text()
    assert "is insecure (allowed by --insecure-discovery)" in text, text
    assert "names no usable member" in text, text


def test_insecure_discovery_allows_plain_members(members, make_gateway):
    gw = make_gateway([members.addrs[0]], "--discovery-srv=example.test", "--insecure-discovery")
    members.list_members(1, 2)
    gw.round()
    assert [row[1] for row in gw.rows()] == ["synced", "synced", "seed"]


def test_the_member_asked_is_a_usable_synced_one(members, make_gateway):
    a = members.addrs
    gw = make_gateway([a[0]])
    members.list_members(1, 2, 3)
    gw.round()
    asked_before = len(members.asked)
    gw.pool.mark_failed(ep.parse_endpoint(a[1]), 0.0, "test")
    for _ in range(gw.pool.failures_to_leave):
        gw.pool.record_check(ep.parse_endpoint(a[2]), False)  # up, but unhealthy
    for _ in range(6):
        gw.round()
    assert set(members.asked[asked_before:]) == {members.port(3)}, members.asked


def test_a_member_that_gives_no_list_is_followed_by_the_next_in_the_same_round(members,
                                                                              make_gateway):
    a = members.addrs
    gw = make_gateway([a[0]])
    members.list_members(1, 2, 3)
    gw.round()
    for index in (2, 3):
        for _ in range(gw.pool.failures_to_leave):
            gw.pool.record_check(ep.parse_endpoint(a[index]), False)  # up, but unhealthy
    members.broken = {1}  # the only healthy synced member: asked first
    asked_before = len(members.asked)
    gw.round()
    # Then the healthy seed, before the members that etcd's checks call unhealthy.
    assert members.asked[asked_before:] == [members.port(1), members.port(0)], members.asked
    assert (gw.gateway.stats.sync_ok, gw.gateway.stats.sync_error) == (2, 0)
    # Nobody answers: every member (and the seed behind them) asked once, one failure.
    members.broken = {0, 1, 2, 3}
    asked_before = len(members.asked)
    gw.round()
    assert sorted(members.asked[asked_before:]) == sorted(members.port(i) for i in range(4))
    assert gw.gateway.stats.sync_error == 1
    last = gw.log_text().splitlines()[-1]
    assert "member sync failed" in last and last.count("asked 127.0.0.1:") == 4, last


def test_sighup_syncs_and_refreshes(members, make_gateway):
    gw = make_gateway([members.addrs[0]])
    members.list_members(0, 1)
    gw.gateway.refresh_now(int(gateway.signal.SIGHUP))  # IP endpoints: nothing to refresh
    gw.wait_for_round()
    assert [row[1] for row in gw.rows()] == ["synced", "synced"]
    assert "syncing members signal=SIGHUP" in gw.log_text()
    assert "nothing to refresh" not in gw.log_text()


@pytest.mark.parametrize("text, seconds", [("0", 0.0), ("1s", 1.0), ("1m30s", 90.0)])
def test_auto_sync_interval_is_off_or_at_least_a_second(text, seconds):
    assert gateway.parse_args(["start", "--auto-sync-interval=" + text]).auto_sync_interval == seconds


@pytest.mark.parametrize("text", ["500ms", "1ns", "999ms", "-1s", "x"])
def test_a_shorter_auto_sync_interval_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as caught:
        gateway.parse_args(["start", "--auto-sync-interval=" + text])
    assert caught.value.code == 2
    assert "--auto-sync-interval" in capsys.readouterr().err


def test_off_by_default_no_sync_and_every_endpoint_a_seed():
    options = gateway.parse_args(["start"])
    assert options.auto_sync_interval == 0.0
    reactor = gateway.Reactor(log=gateway.Log(stream=io.StringIO()))
    try:
        pool = ep.Pool(options.endpoints, "sticky", 60.0, random.Random(1))
        gw = gateway.Gateway(reactor, pool, reactor.log, options)
        assert gw.sync is None and b'"source":"seed"' in gw.status.render_endpoints()
        gw.close()
    finally:
        reactor.close()


def test_host_names_resolve_one_by_one(members, make_gateway):
    # A name that does not resolve drops its member, not the round; the DNS server is a closed
    # loopback port, so the lookup fails at once. localhost comes from /etc/hosts.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        dns = "127.0.0.1:%d" % closed.getsockname()[1]
    gw = make_gateway([members.addrs[0]], "--dns-server=" + dns)
    port = members.addrs[1].rsplit(":", 1)[1]
    members.reply = http_reply('{"members":[%s,%s,%s]}' % (
        member_json("a", "http://localhost:" + port), member_json("b", "http://no-such.invalid:1"),
        member_json("c", "http://" + members.addrs[2])))
    gw.round()
    assert [row[:2] for row in gw.rows()] == [
        ("localhost:" + port, "synced"), (members.addrs[2], "synced"), (members.addrs[0], "seed")]
    assert gw.pool.healths()[0].endpoint.address in ("127.0.0.1", "::1")
    text = gw.log_text()
    assert "ignoring members of the member list" in text and "no-such.invalid" in text, text
