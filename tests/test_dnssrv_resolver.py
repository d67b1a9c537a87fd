"""dnssrv's configuration parsing, its lookup machines driven by hand (no sockets, no clock),
and the same machines on the gateway's own driver (gateway.DnsDriver on a gateway.Reactor, as in
production) against a real DNS server on loopback (tests/dnsserver.py)."""
import os
import random
import socket
import time

import pytest

import dnssrv
import gateway
from dnssrv import (CLASS_IN, RCODE_NXDOMAIN, RCODE_REFUSED, RCODE_SERVFAIL, TYPE_A, TYPE_AAAA,
                    TYPE_CNAME, TYPE_SOA, TYPE_SRV, DNSLookupError, Record, ResolvConf)
from dnsserver import DNSTestServer
from support import resolve

S1, S2 = ("192.0.2.1", 53), ("2001:db8::53", 5353)
CONF = ResolvConf(nameservers=(S1, S2), timeout=2.0, attempts=2)


# --- resolv.conf, hosts, --dns-server ------------------------------------------------------

RESOLV_CONF = """\
# comment
; another comment
nameserver 10.0.0.1
nameserver fe80::1%eth0
nameserver not-an-address
nameserver 2001:DB8::1
nameserver 10.0.0.4
domain ignored.example
search Example.COM. corp.example
options ndots:3 timeout:2 attempts:4 rotate unknown:1 ndots:x
"""


def test_parse_resolv_conf():
    conf = dnssrv.parse_resolv_conf(RESOLV_CONF)
    assert conf.nameservers == (("10.0.0.1", 53), ("fe80::1%eth0", 53), ("2001:db8::1", 53))
    assert conf.search == ("example.com", "corp.example")
    assert (conf.ndots, conf.timeout, conf.attempts, conf.rotate) == (3, 2.0, 4, True)


def test_resolv_conf_defaults_and_limits():
    assert dnssrv.parse_resolv_conf("") == ResolvConf()
    assert ResolvConf() == ResolvConf((("127.0.0.1", 53), ("::1", 53)), (), 1, 5.0, 2, False)
    conf = dnssrv.parse_resolv_conf("options timeout:99 attempts:0 ndots:40\n"
                                    "search a.example\ndomain b.example\n")
    assert (conf.timeout, conf.attempts, conf.ndots) == (30.0, 1, 15)
    assert conf.search == ("b.example",)         # the last of search/domain wins, as in glibc


def test_load_resolv_conf_and_hosts_take_their_path(tmp_path):
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.53\noptions attempts:1\n")
    (tmp_path / "hosts").write_text("127.0.0.9 m1.example.com m1\n")
    conf = dnssrv.load_resolv_conf(str(tmp_path / "resolv.conf"))
    assert conf.nameservers == (("127.0.0.53", 53),) and conf.attempts == 1
    assert dnssrv.load_hosts(str(tmp_path / "hosts"))["m1"] == ("127.0.0.9",)
    assert dnssrv.load_resolv_conf(str(tmp_path / "missing")) == ResolvConf()
    assert dnssrv.load_hosts(str(tmp_path / "missing")) == {}


def test_parse_hosts():
    hosts = dnssrv.parse_hosts(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment ignored\n"
        "# 10.0.0.1 commented\nbogus name\n10.0.0.2 M2.Example.com. m2\n10.0.0.2 m2\n\n")
    assert hosts == {"localhost": ("127.0.0.1", "::1"), "ip6-localhost": ("::1",),
                     "m2.example.com": ("10.0.0.2",), "m2": ("10.0.0.2",)}


@pytest.mark.parametrize("text,servers", [
    ("127.0.0.1", (("127.0.0.1", 53),)),
    ("127.0.0.1:5353,[::1]:53", (("127.0.0.1", 5353), ("::1", 53))),
    ("[2001:DB8::1]", (("2001:db8::1", 53),)),
    ("::1", (("::1", 53),)),
    (" 10.0.0.1:54 , 10.0.0.2 ", (("10.0.0.1", 54), ("10.0.0.2", 53))),
])
def test_parse_dns_servers(text, servers):
    assert dnssrv.parse_dns_servers(text) == servers


@pytest.mark.parametrize("text", ["", "127.0.0.1,", "dns.example.com", "127.0.0.1:0",
                                  "127.0.0.1:65536", "127.0.0.1:x", "[::1", "[::1]x",
                                  "[::1]:", "1.2.3.4:53:53", "[dns]:53"])
def test_parse_dns_servers_rejects(text):
    with pytest.raises(ValueError):
        dnssrv.parse_dns_servers(text)


def test_search_names_follow_ndots():
    conf = ResolvConf(search=("a.example", "b.example"), ndots=1)
    assert dnssrv.search_names("m1", conf) == ("m1.a.example", "m1.b.example", "m1")
    assert dnssrv.search_names("m1.corp", conf) == ("m1.corp", "m1.corp.a.example",
                                                    "m1.corp.b.example")
    assert dnssrv.search_names("m1.corp.", conf) == ("m1.corp",)
    assert dnssrv.search_names("m1.corp", conf._replace(ndots=2))[-1] == "m1.corp"


def test_srv_names():
    assert dnssrv.srv_names("example.com.") == (("_etcd-client-ssl._tcp.example.com", True),
                                                ("_etcd-client._tcp.example.com", False))
    assert dnssrv.srv_names("example.com", "prod") == (
        ("_etcd-client-ssl-prod._tcp.example.com", True),
        ("_etcd-client-prod._tcp.example.com", False))


# --- the Lookup machine, driven by hand -------------------------------------------------------


def reply(query, answers=(), additional=(), authority=(), **changes):
    """A well-formed reply to `query`; `changes` override header fields or the question."""
    request = dnssrv.parse_message(query.payload)
    message = request._replace(qr=True, aa=True, ra=True, answers=tuple(answers),
                               additional=tuple(additional), authority=tuple(authority))
    return dnssrv.build_message(message._replace(**changes))


def rr(name, rtype, rdata, ttl=60):
    return Record(name, rtype, CLASS_IN, ttl, rdata)


def only_send(machine):
    sends = machine.take_sends()
    assert len(sends) == 1, sends
    assert machine.take_sends() == []        # each query is handed out exactly once
    return sends[0]


def test_first_query_goes_over_udp_to_the_first_server():
    lookup = dnssrv.Lookup("m1.example.com.", TYPE_A, CONF, random.Random(1), now=100.0)
    query = only_send(lookup)
    assert (query.server, query.transport, query.deadline) == (S1, "udp", 102.0)
    assert lookup.next_deadline() == 102.0 and lookup.waiting() == (query,)
    assert query.wire == query.payload and query.family == socket.AF_INET
    message = dnssrv.parse_message(query.payload)
    assert message.question == dnssrv.Question("m1.example.com", TYPE_A)


def test_forged_and_garbled_replies_are_ignored_until_the_real_one():
    lookup = dnssrv.Lookup("m1.example.com", TYPE_A, CONF, random.Random(2), now=0.0)
    query = only_send(lookup)
    good = [rr("m1.example.com", TYPE_A, "10.0.0.1")]
    request_id = dnssrv.parse_message(query.payload).id
    forged = [
        (("192.0.2.1", 54), reply(query, good)),                         # wrong port
        (("192.0.2.9", 53), reply(query, good)),                         # wrong host
        (S1, reply(query, good, id=request_id ^ 1)),                     # wrong ID
        (S1, reply(query, good, qr=False)),                              # not a response
        (S1, reply(query, good, opcode=2)),                              # not a QUERY
        (S1, reply(query, good, questions=(dnssrv.Question("m2.example.com", TYPE_A),))),
        (S1, reply(query, good, questions=(dnssrv.Question("m1.example.com", TYPE_AAAA),))),
        (S1, reply(query, good, questions=())),
        (S1, b"\x00garbage"),
        (S1, reply(query, good)[:-1]),                                   # truncated
    ]
    for server, payload in forged:
        assert not lookup.feed(server, payload, 1.0)
        assert not lookup.done and lookup.waiting() == (query,)
    assert lookup.feed(("192.0.2.1", 53, 0, 0), reply(query, good), 1.5)
    assert lookup.done and lookup.error is None and lookup.waiting() == ()
    assert lookup.result.values == ("10.0.0.1",) and lookup.result.ttl == 60
    assert not lookup.feed(S1, reply(query, good), 1.6)               # a duplicate: ignored


def test_question_name_compares_case_insensitively():
    lookup = dnssrv.Lookup("M1.Example.com", TYPE_A, CONF, random.Random(3), now=0.0)
    query = only_send(lookup)
    payload = reply(query, questions=(dnssrv.Question("m1.EXAMPLE.COM", TYPE_A),),
                    answers=[rr("m1.example.com", TYPE_A, "10.0.0.1")])
    assert lookup.feed(S1, payload, 0.1) and lookup.result.values == ("10.0.0.1",)


def test_timeouts_walk_attempts_times_servers_with_a_fresh_id_each():
    lookup = dnssrv.Lookup("m1.example.com", TYPE_A, CONF, random.Random(4), now=0.0)
    sent, now = [], 0.0
    while not lookup.done:
        query = only_send(lookup)
        sent.append(query)
        lookup.on_timeout(query.deadline - 0.001)    # too early: nothing happens
        assert lookup.waiting() == (query,)
        now = query.deadline
        lookup.on_timeout(now)
    assert [q.server for q in sent] == [S1, S2, S1, S2]
    assert [q.deadline for q in sent] == [2.0, 4.0, 6.0, 8.0]
    assert sent[1].family == socket.AF_INET6
    assert len({dnssrv.parse_message(q.payload).id for q in sent}) == 4
    assert isinstance(lookup.error, DNSLookupError) and "timeout" in str(lookup.error)
    assert lookup.next_deadline() is None and lookup.result is None


def test_rotate_starts_at_a_random_server():
    conf = CONF._replace(nameservers=(S1, S2, ("192.0.2.3", 53)), rotate=True)
    firsts = {only_send(dnssrv.Lookup("a", TYPE_A, conf, random.Random(seed), 0.0)).server
              for seed in range(30)}
    assert len(firsts) == 3


@pytest.mark.parametrize("rcode", [RCODE_SERVFAIL, RCODE_REFUSED, dnssrv.RCODE_NOTIMP])
def test_server_failure_moves_to_the_next_server(rcode):
    lookup = dnssrv.Lookup("m1.example.com", TYPE_A, CONF, random.Random(5), now=0.0)
    first = only_send(lookup)
    assert lookup.feed(S1, reply(first, rcode=rcode), 0.5)
    second = only_send(lookup)
    assert second.server == S2 and second.deadline == 2.5
    assert lookup.feed(S2, reply(second, [rr("m1.example.com", TYPE_A, "10.0.0.1")]), 0.6)
    assert lookup.result.values == ("10.0.0.1",)


def test_nxdomain_and_empty_answers_are_answers():
    lookup = dnssrv.Lookup("nope.example.com", TYPE_A, CONF, random.Random(6), now=0.0)
    soa = rr("example.com", TYPE_SOA, b"\x00" * 22, ttl=30)
    assert lookup.feed(S1, reply(only_send(lookup), rcode=RCODE_NXDOMAIN, authority=[soa]), 0.1)
    assert lookup.result.rcode == RCODE_NXDOMAIN and lookup.result.records == ()
    assert lookup.result.ttl == 30 and lookup.take_sends() == []
    empty = dnssrv.Lookup("m1.example.com", TYPE_AAAA, CONF, random.Random(6), now=0.0)
    assert empty.feed(S1, reply(only_send(empty)), 0.1)
    assert empty.done and empty.result.rcode == 0 and empty.result.records == ()


def test_lame_referral_moves_to_the_next_server():
    lookup = dnssrv.Lookup("m1.example.com", TYPE_A, CONF, random.Random(7), now=0.0)
    assert lookup.feed(S1, reply(only_send(lookup), aa=False, ra=False), 0.1)
    assert not lookup.done and only_send(lookup).server == S2


def test_truncated_reply_repeats_the_question_over_tcp_to_the_same_server():
    lookup = dnssrv.Lookup("_etcd-client._tcp.example.com", TYPE_SRV, CONF, random.Random(8), 0.0)
    udp = only_send(lookup)
    assert lookup.feed(S1, reply(udp, tc=True), 0.2)
    tcp = only_send(lookup)
    assert (tcp.server, tcp.transport, tcp.deadline) == (S1, "tcp", 2.2)
    assert tcp.wire == dnssrv.tcp_frame(tcp.payload)
    assert not lookup.feed(S1, reply(udp), 0.3)             # the old UDP ID no longer counts
    srv = rr("_etcd-client._tcp.example.com", TYPE_SRV, dnssrv.SRV(0, 1, 2379, "m1.example.com"))
    assert lookup.feed(S1, reply(tcp, [srv], tc=True), 0.4)  # TC over TCP: take what came
    assert lookup.result.values == (dnssrv.SRV(0, 1, 2379, "m1.example.com"),)


def test_driver_errors_move_to_the_next_server():
    lookup = dnssrv.Lookup("m1.example.com", TYPE_A, CONF, random.Random(9), now=0.0)
    first = only_send(lookup)
    lookup.on_error(dnssrv.Query(S1, "udp", first.payload, 2.0), "refused", 0.1)  # not ours
    assert lookup.waiting() == (first,)
    lookup.on_error(first, "connection refused", 0.1)
    assert only_send(lookup).server == S2
    single = dnssrv.Lookup("m1", TYPE_A, CONF._replace(nameservers=(S1,), attempts=1),
                           random.Random(9), now=0.0)
    single.on_error(only_send(single), "connection refused", 0.1)
    assert single.done and "192.0.2.1:53 connection refused" in str(single.error)


def test_no_servers_or_an_unencodable_name_fail_at_once():
    lookup = dnssrv.Lookup("a", TYPE_A, CONF._replace(nameservers=()), random.Random(), 0.0)
    assert lookup.done and "no servers" in str(lookup.error)
    lookup = dnssrv.Lookup("a" * 64, TYPE_A, CONF, random.Random(), 0.0)
    assert lookup.done and "63" in str(lookup.error) and lookup.take_sends() == []


def test_cname_chain_inside_one_reply_keeps_the_lowest_ttl():
    lookup = dnssrv.Lookup("www.example.com", TYPE_A, CONF, random.Random(10), now=0.0)
    answers = [rr("www.example.com", TYPE_CNAME, "web.example.com", ttl=20),
               rr("WEB.example.com", TYPE_CNAME, "m1.example.com", ttl=300),
               rr("m1.example.com", TYPE_A, "10.0.0.1", ttl=100),
               rr("other.example.com", TYPE_A, "10.9.9.9")]
    assert lookup.feed(S1, reply(only_send(lookup), answers), 0.1)
    result = lookup.result
    assert (result.name, result.canonical, result.values, result.ttl) == (
        "www.example.com", "m1.example.com", ("10.0.0.1",), 20)


def test_cname_outside_the_reply_is_asked_for():
    lookup = dnssrv.Lookup("www.example.com", TYPE_A, CONF, random.Random(11), now=0.0)
    cname = rr("www.example.com", TYPE_CNAME, "m1.other.example", ttl=50)
    assert lookup.feed(S1, reply(only_send(lookup), [cname]), 0.1)
    second = only_send(lookup)
    assert second.server == S1
    assert dnssrv.parse_message(second.payload).question.name == "m1.other.example"
    assert lookup.feed(S1, reply(second, [rr("m1.other.example", TYPE_A, "10.0.0.7")]), 0.2)
    assert lookup.result.values == ("10.0.0.7",) and lookup.result.ttl == 50


def test_cname_loops_and_long_chains_stop_at_the_hop_limit():
    lookup = dnssrv.Lookup("a.example", TYPE_A, CONF, random.Random(12), now=0.0)
    loop = [rr("a.example", TYPE_CNAME, "b.example"), rr("b.example", TYPE_CNAME, "a.example")]
    assert lookup.feed(S1, reply(only_send(lookup), loop), 0.1)
    assert lookup.done and "CNAME chain" in str(lookup.error)
    lookup = dnssrv.Lookup("h0.example", TYPE_A, CONF, random.Random(13), now=0.0)
    for hop in range(dnssrv.MAX_CNAME_HOPS + 1):
        assert not lookup.done
        query = only_send(lookup)
        lookup.feed(S1, reply(query, [rr("h%d.example" % hop, TYPE_CNAME,
                                         "h%d.example" % (hop + 1))]), 0.1)
    assert lookup.done and "CNAME chain" in str(lookup.error)


# --- AddressLookup and SRVDiscovery, driven by hand ---------------------------------------------


def answer_all(machine, zone, now=0.5):
    """Play a perfect server: answer every query from `zone` {(name, type): [rdata]}."""
    for _ in range(50):
        sends = machine.take_sends()
        if machine.done or not sends:
            return
        for query in sends:
            question = dnssrv.parse_message(query.payload).question
            found = zone.get((question.name, question.qtype))
            if found == "SERVFAIL":
                machine.feed(query.server, reply(query, rcode=RCODE_SERVFAIL), now)
                continue
            rcode = RCODE_NXDOMAIN if found is None else 0
            records = [rr(question.name, question.qtype, rdata) for rdata in found or ()]
            machine.feed(query.server, reply(query, records, rcode=rcode), now)


def test_address_lookup_literal_hosts_and_search_list():
    conf = CONF._replace(search=("corp.example",), nameservers=(S1,), attempts=1)
    assert dnssrv.AddressLookup("[::1]", conf, random.Random(), 0.0).result == dnssrv.Addresses(
        "[::1]", ("::1",), None, "literal")
    hosts = {"m1": ("10.0.0.1", "::1")}
    lookup = dnssrv.AddressLookup("M1", conf, random.Random(), 0.0, hosts=hosts)
    assert lookup.done and lookup.result.addresses == ("10.0.0.1", "::1")
    assert lookup.take_sends() == []
    lookup = dnssrv.AddressLookup("m1", conf, random.Random(14), 0.0)
    first = lookup.take_sends()
    assert {dnssrv.parse_message(q.payload).question.name for q in first} == {"m1.corp.example"}
    for query in first:
        lookup.feed(S1, reply(query, rcode=RCODE_NXDOMAIN), 0.1)
    second = lookup.take_sends()
    assert len(second) == 2
    for query in second:
        qtype = dnssrv.parse_message(query.payload).question.qtype
        data = "10.0.0.5" if qtype == TYPE_A else "fd00::5"
        lookup.feed(S1, reply(query, [rr("m1", qtype, data, ttl=9 if qtype == TYPE_A else 99)]),
                    0.2)
    assert lookup.result == dnssrv.Addresses("m1", ("10.0.0.5", "fd00::5"), 9, "dns")


def test_address_lookup_without_addresses_is_an_error():
    lookup = dnssrv.AddressLookup("nope.example.", CONF, random.Random(15), 0.0)
    answer_all(lookup, {})
    assert lookup.done and "no address" in str(lookup.error)


SRV_SSL = "_etcd-client-ssl._tcp.example.com"
SRV_PLAIN = "_etcd-client._tcp.example.com"


def test_discovery_uses_glue_and_hosts_before_asking():
    machine = dnssrv.SRVDiscovery(dnssrv.srv_names("example.com"), CONF, random.Random(16), 0.0,
                                  hosts={"m3.example.com": ("10.0.0.3",)})
    queries = machine.take_sends()
    assert sorted(dnssrv.parse_message(q.payload).question.name for q in queries) == [
        SRV_SSL, SRV_PLAIN]
    by_name = {dnssrv.parse_message(q.payload).question.name: q for q in queries}
    records = [rr(SRV_SSL, TYPE_SRV, dnssrv.SRV(0, 10, 2379, target), ttl=60)
               for target in ("m1.example.com.", "m2.example.com", "m3.example.com", ".")]
    glue = [rr("m1.example.com", TYPE_A, "10.0.0.1", ttl=30),
            rr("m1.example.com", TYPE_AAAA, "fd00::1", ttl=90)]
    assert machine.feed(S1, reply(by_name[SRV_SSL], records, additional=glue), 0.1)
    assert machine.feed(S1, reply(by_name[SRV_PLAIN], rcode=RCODE_NXDOMAIN), 0.1)
    asked = {dnssrv.parse_message(q.payload).question[:2] for q in machine.take_sends()}
    assert asked == {("m2.example.com", TYPE_A), ("m2.example.com", TYPE_AAAA)}
    assert not machine.done


def test_discovery_result_and_problems():
    zone = {(SRV_SSL, TYPE_SRV): "SERVFAIL",
            (SRV_PLAIN, TYPE_SRV): [dnssrv.SRV(1, 5, 2379, "m1.example.com"),
                                    dnssrv.SRV(2, 0, 2380, "gone.example.com")],
            ("m1.example.com", TYPE_A): ["10.0.0.1"]}
    machine = dnssrv.SRVDiscovery(dnssrv.srv_names("example.com"),
                                  CONF._replace(nameservers=(S1,), attempts=1),
                                  random.Random(17), 0.0)
    answer_all(machine, zone)
    assert machine.done and machine.error is None
    assert machine.result.endpoints == (
        dnssrv.SRVEndpoint("m1.example.com", ("10.0.0.1",), 2379, 1, 5, False, 60),)
    assert len(machine.result.problems) == 1 and "gone.example.com" in machine.result.problems[0]


def test_discovery_fails_only_when_every_name_fails():
    machine = dnssrv.SRVDiscovery(dnssrv.srv_names("example.com", "prod"),
                                  CONF._replace(nameservers=(S1,), attempts=1),
                                  random.Random(18), 0.0)
    answer_all(machine, {("_etcd-client-ssl-prod._tcp.example.com", TYPE_SRV): "SERVFAIL"})
    assert machine.done and machine.result is None
    message = str(machine.error)
    assert "_etcd-client-ssl-prod._tcp.example.com" in message and "SERVFAIL" in message
    assert "_etcd-client-prod._tcp.example.com: NXDOMAIN" in message


# --- the gateway's driver against a real DNS server on loopback ------------------------------

ZONE = """
$TTL 300
example.com.                    300 IN SOA   ns.example.com. admin.example.com. 1 3600 600 86400 60
_etcd-client-ssl._tcp.example.com. 60 IN SRV 0 10 2379 m1.example.com.
_etcd-client-ssl._tcp.example.com. 60 IN SRV 0 20 2379 m2.example.com.
_etcd-client._tcp.example.com.  70 IN SRV   1 10 22379 m3.example.com.
_etcd-client-prod._tcp.example.com. 70 IN SRV 0 0 32379 m1.example.com.
m1.example.com.                 120 IN A     127.0.0.11
m2.example.com.                 120 IN AAAA  fd00::2
m3.example.com.                 120 IN A     127.0.0.13
m3.example.com.                 120 IN AAAA  fd00::3
www.example.com.                40 IN CNAME  web.example.com.
web.example.com.                50 IN CNAME  m3.example.com.
"""
FAST = ResolvConf(nameservers=(), timeout=0.3, attempts=1)


def conf_for(*servers, **changes):
    return FAST._replace(nameservers=tuple(server.address for server in servers), **changes)




def lookup(name, qtype, conf):
    return dnssrv.Lookup(name, qtype, conf, random.Random(), time.monotonic())


@pytest.fixture
def no_fd_leak():
    before = len(os.listdir("/proc/self/fd"))
    yield
    assert len(os.listdir("/proc/self/fd")) == before     # every query socket closed


def test_driver_start_finishes_at_once_when_no_query_is_needed():
    reactor = gateway.Reactor()
    try:
        done = []
        machine = dnssrv.AddressLookup("[::1]", FAST, random.Random(), reactor.clock())
        driver = gateway.DnsDriver(reactor, machine, done.append)
        assert done == []                       # the constructor never calls back
        driver.start()
        assert done == [machine] and machine.result.addresses == ("::1",)
    finally:
        reactor.close()


def test_driver_cancelled_mid_lookup_closes_its_socket_and_never_calls_back(no_fd_leak):
    with DNSTestServer(ZONE, mode="silent") as silent:
        reactor = gateway.Reactor()
        try:
            done = []
            driver = gateway.DnsDriver(reactor, lookup("m1.example.com", TYPE_A, conf_for(silent)),
                                       done.append)
            driver.start()
            assert reactor.watched() == 1     # the query's UDP socket
            driver.cancel()
            assert reactor.watched() == 0
            reactor.call_later(FAST.timeout * 2, reactor.stop)
            reactor.run()                       # past the query's deadline: nothing fires
            assert done == []
        finally:
            reactor.close()


def test_real_server_srv_discovery_uses_a_glue(no_fd_leak):
    with DNSTestServer(ZONE) as server:
        result = resolve(dnssrv.SRVDiscovery(dnssrv.srv_names("example.com"), conf_for(server),
                                             random.Random(), time.monotonic()))
    endpoints = {(e.target, e.addresses, e.port, e.priority, e.weight, e.secure, e.ttl)
                 for e in result.endpoints}
    assert endpoints == {("m1.example.com", ("127.0.0.11",), 2379, 0, 10, True, 60),
                         ("m2.example.com", ("fd00::2",), 2379, 0, 20, True, 60),
                         ("m3.example.com", ("127.0.0.13", "fd00::3"), 22379, 1, 10, False, 70)}
    assert [q for q in server.seen() if q[2] in ("A", "AAAA")] == []   # all from glue


def test_real_server_without_glue_asks_a_and_aaaa(no_fd_leak):
    with DNSTestServer(ZONE, glue=False) as server:
        result = resolve(dnssrv.SRVDiscovery(dnssrv.srv_names("example.com", "prod"),
                                             conf_for(server), random.Random(), time.monotonic()))
    assert result.endpoints == (
        dnssrv.SRVEndpoint("m1.example.com", ("127.0.0.11",), 32379, 0, 0, False, 70),)
    assert ("udp", "m1.example.com", "AAAA") in server.seen()


def test_real_server_aaaa_and_cname_chains():
    with DNSTestServer(ZONE) as server:
        answer = resolve(lookup("m2.example.com", TYPE_AAAA, conf_for(server)))
        assert answer.values == ("fd00::2",) and answer.ttl == 120
        answer = resolve(lookup("www.example.com", TYPE_A, conf_for(server)))
        assert (answer.canonical, answer.values, answer.ttl) == ("m3.example.com",
                                                                 ("127.0.0.13",), 40)
    with DNSTestServer(ZONE, chase=False) as server:    # one CNAME per reply: ask again
        answer = resolve(lookup("www.example.com", TYPE_A, conf_for(server)))
        assert answer.values == ("127.0.0.13",)
        assert [q[1] for q in server.seen()] == ["www.example.com", "web.example.com",
                                                 "m3.example.com"]


def test_real_server_nxdomain_is_an_answer_and_no_retry():
    with DNSTestServer(ZONE) as server, DNSTestServer(ZONE) as second:
        answer = resolve(lookup("nope.example.com", TYPE_A, conf_for(server, second)))
        assert answer.rcode == RCODE_NXDOMAIN and answer.records == () and answer.ttl == 300
        assert second.seen() == []
        with pytest.raises(DNSLookupError, match="no address"):
            resolve(dnssrv.AddressLookup("nope.example.com.", conf_for(server), random.Random(),
                                         time.monotonic()))


def test_real_servfail_then_the_second_server_answers(no_fd_leak):
    with DNSTestServer(ZONE, mode="servfail") as bad, DNSTestServer(ZONE) as good:
        answer = resolve(lookup("m1.example.com", TYPE_A, conf_for(bad, good)))
        assert answer.values == ("127.0.0.11",)
        assert len(bad.seen()) == 1 and len(good.seen()) == 1


def test_real_truncated_reply_is_repeated_over_tcp(no_fd_leak):
    with DNSTestServer(ZONE, mode="truncate") as server:
        answer = resolve(lookup("_etcd-client-ssl._tcp.example.com", TYPE_SRV, conf_for(server)))
        assert sorted(v.target for v in answer.values) == ["m1.example.com", "m2.example.com"]
        assert [q[0] for q in server.seen()] == ["udp", "tcp"]


def test_real_silent_server_times_out_then_the_next_answers(no_fd_leak):
    with DNSTestServer(ZONE, mode="silent") as silent, DNSTestServer(ZONE) as good:
        started = time.monotonic()
        answer = resolve(lookup("m1.example.com", TYPE_A, conf_for(silent, good)))
        assert time.monotonic() - started >= FAST.timeout
        assert answer.values == ("127.0.0.11",) and len(silent.seen()) == 1
        with pytest.raises(DNSLookupError, match="timeout"):
            resolve(lookup("m1.example.com", TYPE_A, conf_for(silent, attempts=2)))
        assert len(silent.seen()) == 3


def test_real_forged_replies_before_the_answer_are_ignored(no_fd_leak):
    with DNSTestServer(ZONE, mode="spoof") as server:
        answer = resolve(lookup("m1.example.com", TYPE_A, conf_for(server, timeout=10.0)))
        assert answer.values == ("127.0.0.11",)
        assert len(server.seen()) == 1           # taken at once, not after a retry


def test_real_refused_port_moves_on_without_waiting(no_fd_leak):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()
    with DNSTestServer(ZONE) as good:
        conf = FAST._replace(nameservers=(dead, good.address), timeout=10.0)
        started = time.monotonic()
        answer = resolve(lookup("m1.example.com", TYPE_A, conf))
        assert answer.values == ("127.0.0.11",)
        assert time.monotonic() - started < conf.timeout     # ICMP refused, not the timeout


def test_real_ipv6_server_from_a_dns_server_flag():
    with DNSTestServer(ZONE, host="::1") as server:
        servers = dnssrv.parse_dns_servers("[::1]:%d" % server.address[1])
        answer = resolve(lookup("m3.example.com", TYPE_AAAA, FAST._replace(nameservers=servers)))
        assert answer.values == ("fd00::3",)


def test_real_hosts_file_is_consulted_first(tmp_path):
    (tmp_path / "hosts").write_text("127.0.0.99 m1.example.com\n::1 m9.example.com\n")
    hosts = dnssrv.load_hosts(str(tmp_path / "hosts"))
    with DNSTestServer(ZONE, glue=False) as server:
        result = resolve(dnssrv.SRVDiscovery(dnssrv.srv_names("example.com", "prod"),
                                             conf_for(server), random.Random(), time.monotonic(),
                                             hosts=hosts))
        assert result.endpoints[0].addresses == ("127.0.0.99",)
        assert resolve(dnssrv.AddressLookup("m9.example.com", conf_for(server), random.Random(),
                                            time.monotonic(), hosts=hosts)).addresses == ("::1",)
        assert [q[1] for q in server.seen()] == ["_etcd-client-ssl-prod._tcp.example.com",
                                                 "_etcd-client-prod._tcp.example.com"]
