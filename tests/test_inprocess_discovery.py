"""EndpointSource, DnsDriver and TlsValidation in-process, and a Gateway's discovery refresh.

The gateway's reactor runs in the test's thread; the DNS server is tests/dnsserver.py (dnslib,
its own thread, UDP and TCP on a 127.0.0.1 port given with --dns-server); TLS members are
TlsPeers on the reactor with trustme certificates. resolv.conf and the hosts file are the
test's own files. A silent server's timeouts pass by advancing the loop's clock.
"""
import random
import ssl

import pytest
import trustme
from dnslib import RR

import endpoints as ep
import gateway
import inprocess
from dnsserver import DNSTestServer
from inprocess import TlsPeer
from support import health_of

HOSTS = "127.0.0.1 localhost\n127.0.0.7 pinned.etcd.test\n"


@pytest.fixture
def loop():
    with inprocess.Loop() as loop:
        yield loop


@pytest.fixture
def dns(loop):
    """Start a DNSTestServer for a zone; stopped before the loop's leak check."""
    def start(zone, mode="normal"):
        server = DNSTestServer(zone, mode=mode).__enter__()
        loop.defer(server.close)
        return server
    return start


@pytest.fixture
def files(tmp_path):
    resolv_conf, hosts = tmp_path / "resolv.conf", tmp_path / "hosts"
    resolv_conf.write_text("options timeout:1 attempts:1\n")  # servers come from --dns-server
    hosts.write_text(HOSTS)
    return str(resolv_conf), str(hosts)


def source(loop, files, flags, server=None, tls_context=None):
    argv = ["start"] + flags
    if server is not None:
        argv.append("--dns-server=%s:%d" % server.address)
    options = gateway.parse_args(argv)
    found = gateway.EndpointSource(loop.reactor, options, tls_context, *files)
    loop.defer(found.cancel)
    return found


def refresh(loop, found, advancing=False):
    """One discovery round: (endpoints, error). `advancing` moves the clock on by 0.5 s at every
    check, so that DNS timeouts pass without waiting for them."""
    outcome = []
    found.refresh(lambda endpoints, error: outcome.append((endpoints, error)))
    loop.run_until(lambda: outcome or (advancing and loop.clock.advance(0.5)), what="the round")
    assert len(outcome) == 1
    return outcome[0]


def test_ip_literals_need_no_lookup_and_are_returned_at_once(loop, files):
    found = source(loop, files, ["--endpoints=127.0.0.1:2379,[::1]:2380"])
    assert not found.dynamic
    outcome = []
    found.refresh(lambda endpoints, error: outcome.append((endpoints, error)))
    assert outcome == [(ep.parse_endpoints("127.0.0.1:2379,[::1]:2380"), None)]


def test_host_names_resolve_from_the_hosts_file_and_dns(loop, files, dns):
    server = dns("etcd-1.test. 60 IN A 127.0.0.5\n")
    found = source(loop, files, ["--endpoints=pinned.etcd.test:2379,etcd-1.test:2379,127.0.0.9:2379"],
                   server)
    assert found.dynamic
    endpoints, error = refresh(loop, found)
    assert error is None
    assert [(e.host, e.address) for e in endpoints] == [
        ("pinned.etcd.test", "127.0.0.7"), ("etcd-1.test", "127.0.0.5"), ("127.0.0.9", "127.0.0.9")]
    assert ("udp", "etcd-1.test", "A") in server.seen()
    assert not [q for q in server.seen() if q[1].startswith("pinned")]  # the hosts file answered


def test_a_name_dns_does_not_know_fails_the_round(loop, files, dns):
    server = dns("etcd-1.test. 60 IN A 127.0.0.5\n")
    endpoints, error = refresh(loop, source(loop, files, ["--endpoints=nowhere.test:2379"], server))
    assert endpoints is None
    assert error == ("cannot resolve endpoint nowhere.test:2379: nowhere.test: "
                     "no address (no A or AAAA records)")


def test_a_silent_dns_server_times_out(loop, files, dns):
    server = dns("", mode="silent")
    endpoints, error = refresh(loop, source(loop, files, ["--endpoints=etcd-1.test:2379"], server),
                               advancing=True)
    assert endpoints is None and error.startswith("cannot resolve endpoint etcd-1.test:2379: ")
    assert "etcd-1.test A: no usable answer (%s:%d timeout)" % server.address in error
    assert server.seen()  # it was asked


SRV_ZONE = """
_etcd-client._tcp.example.test. 60 IN SRV 0 10 2379 m1.example.test.
_etcd-client._tcp.example.test. 60 IN SRV 1 20 2380 m2.example.test.
m1.example.test. 60 IN A 127.0.0.11
m2.example.test. 60 IN A 127.0.0.12
"""


def test_srv_discovery_with_insecure_records(loop, files, dns):
    server = dns(SRV_ZONE)
    endpoints, error = refresh(loop, source(
        loop, files, ["--discovery-srv=example.test", "--insecure-discovery"], server))
    assert error is None
    assert endpoints == [ep.Endpoint("m1.example.test", 2379, 0, 10).with_addresses(["127.0.0.11"]),
                         ep.Endpoint("m2.example.test", 2380, 1, 20).with_addresses(["127.0.0.12"])]
    asked = {(name, qtype) for _, name, qtype in server.seen()}
    assert {("_etcd-client-ssl._tcp.example.test", "SRV"), ("_etcd-client._tcp.example.test", "SRV")} <= asked


def test_insecure_records_are_refused_without_insecure_discovery(loop, files, dns):
    endpoints, error = refresh(loop, source(loop, files, ["--discovery-srv=example.test"], dns(SRV_ZONE)))
    assert endpoints is None
    assert error.startswith("DNS SRV discovery found no usable endpoint (asked _etcd-client-ssl._tcp."
                            "example.test, _etcd-client._tcp.example.test): ")
    assert "m1.example.test:2379 is insecure" in error and "--insecure-discovery" in error


# -- secure records: TlsValidation ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def tls_member(loop, ca, *names, reply=None):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return loop.server(lambda loop, sock: TlsPeer(loop, sock, context, reply=reply))


def secure_zone(*members):
    lines = []
    for name, server in members:
        lines.append("_etcd-client-ssl._tcp.sec.test. 60 IN SRV 0 10 %d %s.sec.test."
                     % (server.address[1], name))
        lines.append("%s.sec.test. 60 IN A 127.0.0.1" % name)
    return "\n".join(lines) + "\n"


def trusting(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_secure_records_are_used_only_after_a_verified_handshake(loop, files, dns, ca):
    good = tls_member(loop, ca, "m1.sec.test")
    by_domain = tls_member(loop, ca, "sec.test")  # etcd's rule: the domain's name is accepted too
    impostor = tls_member(loop, trustme.CA(), "m3.sec.test")
    server = dns(secure_zone(("m1", good), ("m2", by_domain), ("m3", impostor)))
    found = source(loop, files, ["--discovery-srv=sec.test"], server, tls_context=trusting(ca))
    endpoints, error = refresh(loop, found)
    assert error is None
    assert sorted((e.host, e.port, e.tls_name, e.secure) for e in endpoints) == [
        ("m1.sec.test", good.address[1], "m1.sec.test", True),
        ("m2.sec.test", by_domain.address[1], "sec.test", True)]

    handshakes = len(good.accepted)
    again, error = refresh(loop, found)  # validated once: not checked again, and the name kept
    assert error is None and sorted(again) == sorted(endpoints) and len(good.accepted) == handshakes


def test_a_member_certified_for_the_domain_passes_etcd_checks_after_a_refresh_too(loop, files, dns, ca):
    """The name a member was validated for is the name its health checks verify; a refresh
    that skips the validation (done once) must not drop it."""
    member = tls_member(loop, ca, "sec.test", reply=b'HTTP/1.1 200 OK\r\n\r\n{"health":"true"}')
    found = source(loop, files, ["--discovery-srv=sec.test", "--health-check=etcd", "--health-interval=1s"],
                   dns(secure_zone(("m1", member))), tls_context=trusting(ca))
    endpoints, _ = refresh(loop, found)
    pool = ep.Pool(endpoints, "sticky", 60.0, random.Random(1))
    gw = gateway.Gateway(loop.reactor, pool, loop.log, found.options, found.tls_context)
    loop.defer(gw.close)
    gw.health.start()
    gw.start_refreshes(found, 30.0)
    entry = health_of(pool, endpoints[0])

    def idle():  # the clock is advanced between checks only: a jump would time one out
        return not gw.health.health_checks

    loop.run_until(lambda: entry.check_successes == 1 and idle(), what="the first check")
    loop.clock.advance(30.0)
    loop.run_until(lambda: gw.stats.refresh_ok == 1 and idle(), what="the refresh")
    for _ in range(2):
        checks = len(member.accepted)
        loop.clock.advance(1.0)
        loop.run_until(lambda c=checks: len(member.accepted) > c and idle(), what="a check")
        assert entry.check_failures == 0, entry.last_error
    assert pool.endpoints[0].tls_name == "sec.test"


def test_no_member_passing_validation_fails_the_round_with_the_reasons(loop, files, dns, ca):
    impostor = tls_member(loop, trustme.CA(), "m1.sec.test")
    server = dns(secure_zone(("m1", impostor)))
    endpoints, error = refresh(loop, source(loop, files, ["--discovery-srv=sec.test"], server,
                                            tls_context=trusting(ca)))
    assert endpoints is None
    assert "m1.sec.test:%d failed TLS validation (m1.sec.test: certificate verify failed" % (
        impostor.address[1]) in error
    assert "sec.test: certificate verify failed" in error  # the domain was tried too


# -- start-up and refresh ----------------------------------------------------------------------

def test_first_discovery_falls_back_to_the_given_endpoints(loop, files, dns):
    server = dns("etcd-1.test. 60 IN A 127.0.0.5\n")  # no SRV records
    found = source(loop, files, ["--discovery-srv=example.test", "--endpoints=etcd-1.test:2379"], server)
    endpoints = gateway.first_discovery(loop.reactor, found, found.options, loop.log)
    assert [(e.host, e.address) for e in endpoints] == [("etcd-1.test", "127.0.0.5")]
    assert "warn discovery failed at start-up, using --endpoints as a fallback" in loop.log_text()


def test_a_gateway_refresh_applies_changed_records(loop, files, dns):
    server = dns(SRV_ZONE)
    found = source(loop, files, ["--discovery-srv=example.test", "--insecure-discovery"], server)
    endpoints, _ = refresh(loop, found)
    pool = ep.Pool(endpoints, "sticky", 60.0, random.Random(1))
    gw = gateway.Gateway(loop.reactor, pool, loop.log, found.options)
    loop.defer(gw.close)
    gw.start_refreshes(found, 30.0)
    server.records = RR.fromZone(SRV_ZONE.replace("m2.example.test", "m3.example.test"))
    loop.clock.advance(30.0)
    loop.run_until(lambda: gw.stats.refresh_ok == 1, what="the refresh")
    assert [e.host for e in pool.endpoints] == ["m1.example.test", "m3.example.test"]
    assert "info endpoints changed " in loop.log_text()
    assert "added=[m3.example.test:2380] removed=[m2.example.test:2380]" in loop.log_text()
