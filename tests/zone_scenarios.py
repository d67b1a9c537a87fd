"""IPv6 zones end to end (issue 12 item 7), run by test_zones.py inside a private network namespace
whose loopback also holds the link-local LINK_LOCAL: a link-local address is only reachable
with its interface's index in the sockaddr, so these show that the index got there. Nothing
leaves that namespace, and it disappears with its last process.

Each scenario is a plain function that raises AssertionError on failure; run one with
`python3 -c "import zone_scenarios; zone_scenarios.NAME()"`.
"""
import random
import socket
import threading
import time

import dnssrv
import endpoints as ep
from dnsserver import DNSTestServer
from support import Gateway, free_port, ping, resolve
from upstreams import EchoServer

LINK_LOCAL = "fe80::1"
ZONED = LINK_LOCAL + "%lo"
ZONE = """
names.test.      60 IN SOA  ns.names.test. admin.names.test. 1 60 60 60 60
etcd.names.test. 60 IN A    127.0.0.1
"""


def lo_index():
    return socket.if_nametoindex("lo")


def link_local_listener():
    """A listening socket on the link-local address; its port."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.bind((LINK_LOCAL, 0, 0, lo_index()))
    sock.listen(16)
    return sock


def echo_once(listener):
    """Echo the first connection's bytes until EOF, from a thread."""
    def serve():
        conn, _ = listener.accept()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def zone_unreachable_without_scope():
    """The premise: the (host, port) pair that Python makes of `fe80::1%lo` loses the zone."""
    with link_local_listener() as listener, socket.socket(socket.AF_INET6) as client:
        try:
            client.connect((ZONED, listener.getsockname()[1]))
        except OSError:
            return
        raise AssertionError("a zoned pair connected: the namespace is not what we think")


def dial_addresses_reach_a_link_local_listener():
    with link_local_listener() as listener:
        port = listener.getsockname()[1]
        for zone in ("lo", str(lo_index())):
            endpoint = ep.parse_endpoint("[%s%%%s]:%d" % (LINK_LOCAL, zone, port))
            (family, sockaddr), = endpoint.dial_addresses()
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.connect(sockaddr)
                listener.accept()[0].close()


def dns_server_flag_with_a_zone():
    """--dns-server=[fe80::1%lo]:PORT: the gateway's DNS driver, in-process and in the gateway."""
    with DNSTestServer(ZONE, host=ZONED) as dns:
        flag = "[%s]:%d" % (ZONED, dns.address[1])
        servers = dnssrv.parse_dns_servers(flag)
        conf = dnssrv.ResolvConf(nameservers=servers, timeout=2.0, attempts=1)
        machine = dnssrv.AddressLookup("etcd.names.test.", conf, random.Random(),
                                       now=time.monotonic())
        assert resolve(machine).addresses == ("127.0.0.1",)
        with Gateway(["start", "--listen-addr=127.0.0.1:%d" % free_port(),
                      "--endpoints=etcd.names.test:%d" % free_port(),
                      "--dns-server=" + flag]) as gateway:
            assert "etcd.names.test:" in gateway.ready_line
        assert ("udp", "etcd.names.test", "A") in dns.seen()


class Port53DNSServer(DNSTestServer):
    """resolv.conf names no port: in this namespace, port 53 of the link-local address is free."""

    def _bind_pair(self):
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        udp.bind(self.sockaddr(53))
        tcp.bind(self.sockaddr(53))
        tcp.listen(16)
        return udp, tcp


def resolv_conf_nameserver_with_a_zone(resolv_conf_path):
    with open(resolv_conf_path, "w") as stream:
        stream.write("nameserver %s\noptions timeout:2 attempts:1\n" % ZONED)
    preexec = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" /etc/resolv.conf && exec "$@"', resolv_conf_path]
    with Port53DNSServer(ZONE, host=ZONED) as dns:
        with Gateway(["start", "--listen-addr=127.0.0.1:%d" % free_port(),
                      "--endpoints=etcd.names.test:%d" % free_port()], preexec=preexec) as gateway:
            assert "etcd.names.test:" in gateway.ready_line
        assert ("udp", "etcd.names.test", "A") in dns.seen()


def listen_addr_with_a_zone():
    with EchoServer() as echo:
        port = _free_link_local_port()
        with Gateway(["start", "--listen-addr=[%s]:%d" % (ZONED, port),
                      "--endpoints=" + echo.endpoint]):
            assert ping((ZONED, port), b"zoned") == b"zoned"   # getaddrinfo keeps the zone


def _free_link_local_port():
    with link_local_listener() as sock:
        return sock.getsockname()[1]


def endpoint_with_a_zone_is_relayed():
    with link_local_listener() as listener:
        echo_once(listener)
        port = free_port()
        with Gateway(["start", "--listen-addr=127.0.0.1:%d" % port, "--dial-timeout=2s",
                      "--endpoints=[%s]:%d" % (ZONED, listener.getsockname()[1])]):
            assert ping(("127.0.0.1", port), b"zoned", timeout=10) == b"zoned"
