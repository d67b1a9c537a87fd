"""AddressLookup when one family is slow or never answered (issue 12 item 6): driven by hand with
a fake clock, and through the real gateway against a DNS server that drops AAAA queries."""
import random
import time

import pytest

import dnssrv
from dnssrv import CLASS_IN, RCODE_NXDOMAIN, TYPE_A, TYPE_AAAA, Record, ResolvConf
from dnsserver import DNSTestServer
from support import Gateway, free_port

SERVER = ("192.0.2.1", 53)
CONF = ResolvConf(nameservers=(SERVER,), timeout=5.0, attempts=2)
GRACE = dnssrv.FAMILY_GRACE_DELAY


def sends_by_type(machine):
    return {dnssrv.parse_message(query.payload).question.qtype: query
            for query in machine.take_sends()}


def reply(query, *addresses, ttl=60, rcode=0):
    request = dnssrv.parse_message(query.payload)
    qtype = request.question.qtype
    records = tuple(Record(request.question.name, qtype, CLASS_IN, ttl, address)
                    for address in addresses)
    return dnssrv.build_message(request._replace(qr=True, aa=True, ra=True, rcode=rcode,
                                                 answers=records))


def test_once_a_is_in_aaaa_gets_only_the_grace():
    lookup = dnssrv.AddressLookup("m1.example.com.", CONF, random.Random(1), now=0.0)
    queries = sends_by_type(lookup)
    assert lookup.next_deadline() == CONF.timeout
    assert lookup.feed(SERVER, reply(queries[TYPE_A], "10.0.0.1", ttl=30), 0.1)
    assert not lookup.done
    assert lookup.next_deadline() == 0.1 + GRACE      # not the AAAA query's 5 s
    lookup.on_timeout(0.1 + GRACE / 2)
    assert not lookup.done and lookup.waiting() == (queries[TYPE_AAAA],)
    lookup.on_timeout(0.1 + GRACE)
    assert lookup.done and lookup.error is None
    assert lookup.result == dnssrv.Addresses("m1.example.com.", ("10.0.0.1",), 30, "dns")
    assert lookup.waiting() == () and lookup.take_sends() == []   # the AAAA socket can go
    assert lookup.next_deadline() is None


def test_a_family_answering_within_the_grace_is_kept():
    lookup = dnssrv.AddressLookup("m1.example.com.", CONF, random.Random(2), now=0.0)
    queries = sends_by_type(lookup)
    assert lookup.feed(SERVER, reply(queries[TYPE_AAAA], "fd00::1"), 1.0)
    assert lookup.next_deadline() == 1.0 + GRACE
    assert lookup.feed(SERVER, reply(queries[TYPE_A], "10.0.0.1"), 1.0 + GRACE * 0.9)
    assert lookup.done and lookup.result.addresses == ("10.0.0.1", "fd00::1")


def test_an_empty_family_starts_no_grace():
    """No records for A is no reason to hurry AAAA: it may be the only family the name has."""
    lookup = dnssrv.AddressLookup("m6.example.com.", CONF, random.Random(3), now=0.0)
    queries = sends_by_type(lookup)
    assert lookup.feed(SERVER, reply(queries[TYPE_A]), 0.1)
    assert lookup.next_deadline() == CONF.timeout
    lookup.on_timeout(0.1 + GRACE)
    assert not lookup.done
    assert lookup.feed(SERVER, reply(queries[TYPE_AAAA], "fd00::6"), 4.0)
    assert lookup.done and lookup.result.addresses == ("fd00::6",)


def test_a_failed_family_after_the_other_answered_is_no_error():
    lookup = dnssrv.AddressLookup("m1.example.com.", CONF._replace(attempts=1), random.Random(4),
                                  now=0.0)
    queries = sends_by_type(lookup)
    assert lookup.feed(SERVER, reply(queries[TYPE_AAAA], rcode=2), 0.05)   # SERVFAIL: gives up
    assert lookup.feed(SERVER, reply(queries[TYPE_A], "10.0.0.1"), 0.1)
    assert lookup.done and lookup.result.addresses == ("10.0.0.1",)


def test_grace_applies_per_search_name():
    conf = CONF._replace(search=("corp.example",))
    lookup = dnssrv.AddressLookup("m1", conf, random.Random(5), now=0.0)
    first = sends_by_type(lookup)
    for query in first.values():
        assert lookup.feed(SERVER, reply(query, rcode=RCODE_NXDOMAIN), 0.1)
    second = sends_by_type(lookup)
    assert {dnssrv.parse_message(q.payload).question.name for q in second.values()} == {"m1"}
    assert lookup.feed(SERVER, reply(second[TYPE_A], "10.0.0.1"), 0.2)
    lookup.on_timeout(0.2 + GRACE)
    assert lookup.done and lookup.result.addresses == ("10.0.0.1",)


# -- through the gateway, against a real DNS server on loopback ----------------------------------

ZONE = """
names.test.      60 IN SOA  ns.names.test. admin.names.test. 1 60 60 60 60
etcd.names.test. 60 IN A    127.0.0.1
etcd.names.test. 60 IN AAAA ::1
"""
RESOLV_TIMEOUT, RESOLV_ATTEMPTS = 5, 2


def with_resolv_conf(path):
    """Run the gateway in a private mount namespace where `path` is /etc/resolv.conf, so that the
    timeout and attempts a dropped AAAA would cost do not depend on this machine's file."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(path)]


@pytest.mark.root  # a private mount namespace for its own resolv.conf
def test_gateway_starts_at_once_when_aaaa_queries_are_dropped(tmp_path):
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\noptions timeout:%d attempts:%d\n"
                           % (RESOLV_TIMEOUT, RESOLV_ATTEMPTS))
    with DNSTestServer(ZONE, mode="drop-aaaa") as dns:
        host, port = dns.address
        started = time.monotonic()
        with Gateway(["start", f"--listen-addr=127.0.0.1:{free_port()}",
                      f"--endpoints=etcd.names.test:{free_port()}",
                      f"--dns-server={host}:{port}"],
                     preexec=with_resolv_conf(resolv_conf)) as gateway:
            elapsed = time.monotonic() - started
            assert "etcd.names.test:" in gateway.ready_line
        assert ("udp", "etcd.names.test", "AAAA") in dns.seen()
    # Without the grace: the AAAA query's 5 s x 2 attempts before the ready line.
    assert elapsed < RESOLV_TIMEOUT, elapsed


# -- the smallest TTL of what was used, for the caller's refresh schedule -------------------------

def test_address_lookup_min_ttl_is_the_smallest_record_ttl_used():
    lookup = dnssrv.AddressLookup("m1.example.com.", CONF, random.Random(6), now=0.0)
    queries = sends_by_type(lookup)
    lookup.feed(SERVER, reply(queries[TYPE_A], "10.0.0.1", "10.0.0.2", ttl=40), 0.1)
    lookup.feed(SERVER, reply(queries[TYPE_AAAA], "fd00::1", ttl=25), 0.1)
    assert lookup.result.min_ttl == lookup.result.ttl == 25
    literal = dnssrv.AddressLookup("10.0.0.9", CONF, random.Random(7), now=0.0)
    assert literal.result.min_ttl is None
    hosts = dnssrv.AddressLookup("m9", CONF, random.Random(8), 0.0, hosts={"m9": ("10.0.0.9",)})
    assert hosts.result.min_ttl is None


def test_address_lookup_min_ttl_leaves_out_a_family_cut_off_by_the_grace():
    lookup = dnssrv.AddressLookup("m1.example.com.", CONF, random.Random(9), now=0.0)
    queries = sends_by_type(lookup)
    lookup.feed(SERVER, reply(queries[TYPE_A], "10.0.0.1", ttl=40), 0.1)
    lookup.on_timeout(0.1 + GRACE)
    assert lookup.result.min_ttl == 40


def srv_endpoint(target, ttl):
    return dnssrv.SRVEndpoint(target, ("10.0.0.1",), 2379, 0, 1, False, ttl)


def test_discovery_min_ttl_is_the_smallest_endpoint_ttl():
    result = dnssrv.Discovery((srv_endpoint("m1", 60), srv_endpoint("m2", 15),
                               srv_endpoint("m3", None)), ("m4: no address",))
    assert result.min_ttl == 15
    assert dnssrv.Discovery((), ()).min_ttl is None


def test_discovery_min_ttl_counts_srv_glue_and_address_records():
    srv_name = "_etcd-client._tcp.example.com"
    machine = dnssrv.SRVDiscovery([(srv_name, False)], CONF, random.Random(10), now=0.0)
    (srv_query,) = machine.take_sends()
    request = dnssrv.parse_message(srv_query.payload)
    records = (Record(srv_name, dnssrv.TYPE_SRV, CLASS_IN, 300,
                      dnssrv.SRV(0, 1, 2379, "m1.example.com")),
               Record(srv_name, dnssrv.TYPE_SRV, CLASS_IN, 300,
                      dnssrv.SRV(0, 1, 2379, "m2.example.com")))
    glue = (Record("m1.example.com", TYPE_A, CLASS_IN, 120, "10.0.0.1"),)
    machine.feed(SERVER, dnssrv.build_message(request._replace(
        qr=True, aa=True, ra=True, answers=records, additional=glue)), 0.1)
    queries = sends_by_type(machine)          # m2 has no glue: A and AAAA are asked
    machine.feed(SERVER, reply(queries[TYPE_A], "10.0.0.2", ttl=45), 0.2)
    machine.feed(SERVER, reply(queries[TYPE_AAAA]), 0.2)
    assert machine.done and len(machine.result.endpoints) == 2
    assert machine.result.min_ttl == 45
