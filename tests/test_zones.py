"""IPv6 zone ids (issue 12 item 7): `[fe80::1%eth0]:2379` in --endpoints and --listen-addr,
`[fe80::1%eth0]:53` in --dns-server and `nameserver fe80::1%eth0` in resolv.conf carry the
interface's index into the sockaddr; an unknown interface is refused with one line.

The unit tests use `lo`, which every Linux host has. The end-to-end scenarios (zone_scenarios.py)
run in a private network namespace with a link-local address on its loopback."""
import os
import random
import socket
import subprocess
import sys

import pytest

import dnssrv
import endpoints as ep
from support import ROOT, Gateway, free_port, gateway_cli
from test_cli import assert_config_error, assert_usage_error, listen_flag

LO = socket.if_nametoindex("lo")
NO_SUCH_IF = "nosuch0"
TESTS = os.path.dirname(os.path.abspath(__file__))


# -- endpoints and listen addresses ----------------------------------------------------------------

@pytest.mark.parametrize("zone", ["lo", str(LO)])
def test_an_endpoint_zone_becomes_the_scope_id(zone):
    endpoint = ep.parse_endpoint("[fe80::1%%%s]:2379" % zone)
    assert (endpoint.host, endpoint.address) == ("fe80::1%" + zone, "fe80::1%" + zone)
    assert str(endpoint) == "[fe80::1%%%s]:2379" % zone
    assert endpoint.dial_addresses() == [(socket.AF_INET6, ("fe80::1", 2379, 0, LO))]


@pytest.mark.parametrize("text", ["[fe80::1%nosuch0]:2379", "[fe80::1%]:2379",
                                  "[fe80::1%4294967296x]:1", "http://[fe80::1%25nosuch0]:2379"])
def test_an_unknown_or_empty_zone_is_refused(text):
    with pytest.raises(ValueError, match="zone|interface"):
        ep.parse_endpoint(text)


def test_an_interface_gone_since_start_up_dials_unscoped():
    # connect() then fails (EINVAL) and the relay moves on, as for any unroutable address.
    assert ep.socket_address("fe80::1%" + NO_SUCH_IF, 1) == (socket.AF_INET6,
                                                             ("fe80::1", 1, 0, 0))


def test_zones_order_after_the_address():
    endpoint = ep.Endpoint("m1", 1).with_addresses(["fe80::1%lo", "fe80::1", "10.0.0.1"])
    assert endpoint.addresses == ("10.0.0.1", "fe80::1", "fe80::1%lo")


# -- DNS servers -----------------------------------------------------------------------------------

def test_a_dns_server_zone_becomes_the_scope_id():
    assert dnssrv.parse_dns_servers("[fe80::53%lo]:5353,fe80::54%lo,10.0.0.1") == (
        ("fe80::53%lo", 5353, 0, LO), ("fe80::54%lo", 53, 0, LO), ("10.0.0.1", 53))
    with pytest.raises(ValueError, match=NO_SUCH_IF):
        dnssrv.parse_dns_servers("[fe80::53%nosuch0]:53")


def test_resolv_conf_zones_are_looked_up_when_bound():
    conf = dnssrv.parse_resolv_conf("nameserver fe80::53%lo\nnameserver 10.0.0.1\n")
    assert conf.nameservers == (("fe80::53%lo", 53), ("10.0.0.1", 53))     # text stays text
    assert dnssrv.bind_scope_ids(conf).nameservers == (("fe80::53%lo", 53, 0, LO),
                                                       ("10.0.0.1", 53))
    assert dnssrv.bind_scope_ids(dnssrv.bind_scope_ids(conf)) == dnssrv.bind_scope_ids(conf)
    bad = dnssrv.parse_resolv_conf("nameserver fe80::53%nosuch0\n")
    with pytest.raises(ValueError, match="nameserver fe80::53%nosuch0: no network interface"):
        dnssrv.bind_scope_ids(bad)


def test_a_reply_from_a_zoned_server_is_recognised():
    server = ("fe80::53%" + str(LO), 53, 0, LO)        # written with the index...
    conf = dnssrv.ResolvConf(nameservers=(server,), timeout=2.0, attempts=1)
    lookup = dnssrv.Lookup("m1.example.com", dnssrv.TYPE_A, conf, random.Random(1), now=0.0)
    (query,) = lookup.take_sends()
    assert query.server == server and query.family == socket.AF_INET6
    request = dnssrv.parse_message(query.payload)
    reply = dnssrv.build_message(request._replace(qr=True, ra=True, answers=(dnssrv.Record(
        "m1.example.com", dnssrv.TYPE_A, dnssrv.CLASS_IN, 60, "10.0.0.1"),)))
    assert not lookup.feed(("fe80::53%lo", 53, 0, LO + 1), reply, 0.1)   # another interface
    assert lookup.feed(("fe80::53%lo", 53, 0, LO), reply, 0.1)   # ...recvfrom() names it
    assert lookup.result.values == ("10.0.0.1",)


def test_a_zoned_server_is_named_with_its_zone_in_errors():
    conf = dnssrv.ResolvConf(nameservers=(("fe80::53%lo", 53, 0, LO),), timeout=2.0, attempts=1)
    lookup = dnssrv.Lookup("m1.example.com", dnssrv.TYPE_A, conf, random.Random(2), now=0.0)
    lookup.on_timeout(2.0)
    assert "[fe80::53%lo]:53 timeout" in str(lookup.error)


# -- the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [
    "--endpoints=[fe80::1%nosuch0]:2379", "--dns-server=[fe80::53%nosuch0]:53",
    "--metrics-addr=[fe80::1%nosuch0]:23791", "--endpoints=[fe80::1%]:2379",
])
def test_an_unknown_interface_in_a_flag_is_a_usage_error(flag):
    result = gateway_cli(["start", listen_flag(), flag])
    assert_usage_error(result)
    assert "nosuch0" in result.stderr or "empty IPv6 zone" in result.stderr


def test_an_unknown_interface_in_the_listen_address_is_a_usage_error():
    result = gateway_cli(["start", "--listen-addr=[fe80::1%nosuch0]:23790"])
    assert_usage_error(result)
    assert "no network interface named 'nosuch0'" in result.stderr


def with_resolv_conf(path):
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(path)]


def test_an_unknown_interface_in_resolv_conf_refuses_to_start(tmp_path):
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver fe80::53%nosuch0\nnameserver 127.0.0.1\n")
    result = subprocess.run(with_resolv_conf(resolv_conf) + [
        sys.executable, "-m", "gateway", "start", listen_flag(),
        "--endpoints=etcd.names.test:2379"], capture_output=True, text=True, timeout=60,
        cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL)
    assert_config_error(result, "/etc/resolv.conf: nameserver fe80::53%nosuch0: "
                                "no network interface named 'nosuch0'")


def test_an_unknown_interface_in_resolv_conf_is_moot_with_ip_endpoints(tmp_path):
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver fe80::53%nosuch0\n")
    endpoint = f"127.0.0.1:{free_port()}"
    with Gateway(["start", listen_flag(), f"--endpoints={endpoint}"],
                 preexec=with_resolv_conf(resolv_conf)) as gateway:
        assert endpoint in gateway.ready_line


# -- end to end, in a private network namespace -----------------------------------------------------

NETNS = ["unshare", "--net", "sh", "-c",
         'ip link set lo up && ip -6 addr add fe80::1/64 dev lo nodad && exec "$@"', "netns"]


def run_in_private_netns(call):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), TESTS]))
    return subprocess.run(NETNS + [sys.executable, "-c", "import zone_scenarios as s; " + call],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT), env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.root  # a private network namespace (unshare --net)
@pytest.mark.parametrize("scenario", [
    "zone_unreachable_without_scope", "dial_addresses_reach_a_link_local_listener",
    "dns_server_flag_with_a_zone", "listen_addr_with_a_zone",
])
def test_in_a_private_network_namespace(scenario):
    result = run_in_private_netns("s.%s()" % scenario)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.root  # a private network namespace (unshare --net)
def test_resolv_conf_nameserver_with_a_zone_in_a_private_network_namespace(tmp_path):
    result = run_in_private_netns("s.resolv_conf_nameserver_with_a_zone(%r)"
                                  % str(tmp_path / "resolv.conf"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.root  # a private network namespace (unshare --net)
def test_a_zoned_endpoint_is_relayed_in_a_private_network_namespace():
    result = run_in_private_netns("s.endpoint_with_a_zone_is_relayed()")
    assert result.returncode == 0, result.stdout + result.stderr
