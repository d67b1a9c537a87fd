"""Every address of an endpoint's name (issue 12 item 4): kept in one fixed order, so that a DNS
answer that only came back shuffled is no change; what the data path dials; and the discovery
glue that fills them from real DNS answers."""
import ipaddress
import random
import socket

import pytest
from dnslib import RR
from hypothesis import given, strategies as st

import endpoints as ep
import gateway
from dnsserver import DNSTestServer
from support import health_of, Gateway, free_port, wait_until
from test_discovery_e2e import refresh_count

V4 = ["10.0.0.9", "10.0.0.10", "192.0.2.1", "127.0.0.2"]
V6 = ["fd00::2", "2001:db8::1", "::1"]


# -- the order ------------------------------------------------------------------------------------

def test_ipv4_first_then_ipv6_each_by_value_repeats_once():
    endpoint = ep.Endpoint("m1.example", 2379).with_addresses(V6 + V4 + ["10.0.0.9", "::1"])
    assert endpoint.addresses == ("10.0.0.9", "10.0.0.10", "127.0.0.2", "192.0.2.1",
                                  "::1", "2001:db8::1", "fd00::2")
    assert endpoint.address == "10.0.0.9"        # the preferred one, for compatibility
    assert endpoint.dial_host == "10.0.0.9"


def test_no_addresses_is_unresolved():
    endpoint = ep.Endpoint("m1.example", 2379).with_addresses(())
    assert (endpoint.address, endpoint.addresses, endpoint.dial_addresses()) == ("", (), [])


def test_literals_carry_themselves():
    assert ep.parse_endpoint("10.0.0.1:2379").addresses == ("10.0.0.1",)
    assert ep.parse_endpoint("[::1]:2379").addresses == ("::1",)
    assert ep.parse_endpoint("m1.example:2379").addresses == ()


addresses_lists = st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
                           min_size=1, max_size=8)


@given(addresses_lists, st.randoms())
def test_a_shuffled_answer_is_the_same_endpoint(addresses, rng):
    shuffled = list(addresses)
    rng.shuffle(shuffled)
    first = ep.Endpoint("m1.example", 2379).with_addresses(addresses)
    again = ep.Endpoint("m1.example", 2379).with_addresses(shuffled)
    assert first == again
    assert ep.readdressed([first], [again]) == []


@given(addresses_lists)
def test_the_order_is_ipv4_first_then_by_value(addresses):
    ordered = ep.order_addresses(addresses)
    parsed = [ipaddress.ip_address(text) for text in ordered]
    assert [(a.version, a.packed) for a in parsed] == sorted({(a.version, a.packed)
                                                              for a in parsed})
    assert set(ordered) == set(addresses)
    assert ep.order_addresses(ordered) == ordered


@given(addresses_lists, addresses_lists)
def test_readdressed_tells_a_changed_set(before, after):
    old = ep.Endpoint("m1.example", 2379).with_addresses(before)
    new = ep.Endpoint("m1.example", 2379).with_addresses(after)
    changed = ep.readdressed([old], [new])
    assert changed == ([] if set(before) == set(after) else [(old, new)])


def test_readdressed_leaves_out_added_and_removed_endpoints():
    one = ep.Endpoint("m1.example", 2379).with_addresses(["10.0.0.1"])
    two = ep.Endpoint("m2.example", 2379).with_addresses(["10.0.0.2"])
    assert ep.readdressed([one], [two]) == []
    assert ep.readdressed([one, two], [one._replace(address="10.0.0.3", addresses=())]) == [
        (one, one._replace(address="10.0.0.3", addresses=()))]


def test_pool_keeps_health_and_choice_across_a_shuffled_answer():
    endpoints = [ep.Endpoint("m%d.example" % i, 2379).with_addresses(["10.0.%d.1" % i,
                                                                       "10.0.%d.2" % i])
                 for i in range(3)]
    pool = ep.Pool(endpoints, "sticky", retry_delay=5.0, rng=random.Random(1))
    pool.mark_failed(endpoints[2], now=0.0, reason="refused")
    plan = pool.plan()
    shuffled = [ep.Endpoint(e.host, e.port).with_addresses(reversed(e.addresses))
                for e in endpoints]
    assert pool.replace(shuffled) == ([], [])
    assert pool.plan() == plan
    assert not health_of(pool, shuffled[2]).up and health_of(pool, shuffled[2]).dial_failures == 1


# -- what the data path dials ---------------------------------------------------------------------

def test_dial_addresses_are_families_and_sockaddrs_in_order():
    endpoint = ep.Endpoint("m1.example", 2379).with_addresses(["fd00::1", "10.0.0.1"])
    assert endpoint.dial_addresses() == [(socket.AF_INET, ("10.0.0.1", 2379)),
                                         (socket.AF_INET6, ("fd00::1", 2379, 0, 0))]


def test_dial_addresses_of_an_endpoint_built_by_hand():
    # Before with_addresses existed, endpoints carried only `address` (or an IP as the host).
    assert ep.Endpoint("m1", 1, address="10.0.0.1").dial_addresses() == [
        (socket.AF_INET, ("10.0.0.1", 1))]
    assert ep.Endpoint("::1", 1).dial_addresses() == [(socket.AF_INET6, ("::1", 1, 0, 0))]
    assert ep.Endpoint("m1", 1).dial_addresses() == []


# -- filled from real DNS answers by the gateway's own discovery -----------------------------------

ZONE = """
multi.test.       60 IN SOA  ns.multi.test. admin.multi.test. 1 60 60 60 60
m.multi.test.     60 IN A    127.0.0.3
m.multi.test.     60 IN AAAA fd00::3
m.multi.test.     60 IN A    127.0.0.2
_etcd-client._tcp.multi.test. 60 IN SRV 0 1 2379 m.multi.test.
"""


def discover(tmp_path, *flags):
    """One discovery round of the gateway's EndpointSource, driven by its own reactor."""
    (tmp_path / "resolv.conf").write_text("options timeout:2 attempts:1\n")
    (tmp_path / "hosts").write_text("")
    options = gateway.parse_args(["start", *flags])
    log = gateway.Log("error")
    reactor = gateway.Reactor(log=log)
    source = gateway.EndpointSource(reactor, options, None, str(tmp_path / "resolv.conf"),
                                    str(tmp_path / "hosts"))
    try:
        return gateway.first_discovery(reactor, source, options, log)
    finally:
        source.cancel()
        reactor.close()


@pytest.mark.parametrize("glue", [True, False], ids=["srv-glue", "srv-then-a-aaaa"])
def test_discovered_members_carry_every_address(tmp_path, glue):
    with DNSTestServer(ZONE, glue=glue) as dns:
        found = discover(tmp_path, "--discovery-srv=multi.test", "--insecure-discovery",
                         "--dns-server=%s:%d" % dns.address)
    assert [(e.host, e.addresses, e.address) for e in found] == [
        ("m.multi.test", ("127.0.0.2", "127.0.0.3", "fd00::3"), "127.0.0.2")]


def test_host_names_in_endpoints_carry_every_address(tmp_path):
    with DNSTestServer(ZONE) as dns:
        found = discover(tmp_path, "--endpoints=m.multi.test:2379,127.0.0.9:2379",
                         "--dns-server=%s:%d" % dns.address)
    assert [(e.host, e.addresses) for e in found] == [
        ("m.multi.test", ("127.0.0.2", "127.0.0.3", "fd00::3")), ("127.0.0.9", ("127.0.0.9",))]


# -- a running gateway: a shuffled answer is no change, a new address is -----------------------------

def zone_with(*addresses):
    return "\n".join(["multi.test. 60 IN SOA ns.multi.test. admin.multi.test. 1 60 60 60 60"]
                     + ["m.multi.test. 60 IN A %s" % address for address in addresses])


@pytest.mark.slow  # waits for refresh rounds
def test_a_refresh_that_only_shuffles_the_answer_changes_nothing():
    metrics_addr = f"127.0.0.1:{free_port()}"
    with DNSTestServer(zone_with("127.0.0.3", "127.0.0.2")) as dns, Gateway([
            "start", f"--listen-addr=127.0.0.1:{free_port()}",
            f"--endpoints=m.multi.test:{free_port()}", "--dns-server=%s:%d" % dns.address,
            "--discovery-refresh=1s", f"--metrics-addr={metrics_addr}"]) as gateway:
        mark = len(gateway.log.lines)
        before = refresh_count(gateway, metrics_addr)
        dns.records = RR.fromZone(zone_with("127.0.0.2", "127.0.0.3"))
        assert wait_until(lambda: refresh_count(gateway, metrics_addr) >= before + 2, timeout=15)
        assert [line for line in gateway.log.lines[mark:] if "endpoints changed" in line] == []
        dns.records = RR.fromZone(zone_with("127.0.0.4"))     # a real change is still seen
        line = gateway.log.wait_for("endpoints changed", timeout=15, start=mark)
        assert line is not None and "127.0.0.2/127.0.0.3->127.0.0.4" in line, gateway.log.text()
