"""End to end: DNS SRV discovery (issue 3) with a real 3-member etcd and a real DNS server.

The members listen on 127.0.0.1; the test DNS server (tests/dnsserver.py, on loopback) names
them in SRV records whose targets have A records (sent as glue too). The gateway is a real
process that finds the members only through DNS (`--dns-server`, or its own /etc/resolv.conf in
a private mount namespace), and etcdctl talks only to the gateway; `-w json` puts the answering
member's id in `header.member_id`, which is how a test sees where a new connection went.
Records are changed while the gateway runs by replacing `DNSTestServer.records` (or `.mode`).
"""
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request

import pytest
from dnslib import RR

from dnsserver import DNSTestServer
from etcd_cluster import EtcdCluster, answered_by, ctl, etcd_cluster  # noqa: F401  (fixture)
from support import READY_RE, Gateway, free_port, gateway_cli, wait_until

pytestmark = pytest.mark.etcd

TTL = 60
# The TLS validation of a discovered member may take max(2 x --dial-timeout, 1s): generous, so
# that a loaded machine is not mistaken for a bad certificate. Dead members refuse at once.
DIAL_TIMEOUT = "2s"
# How fast a changed record set must reach new connections with --discovery-refresh 1s.
CHANGE_DEADLINE = 5.0
# etcdctl attempts while the gateway may still point at a dead member: short, so that a failed
# try leaves room for the next one within CHANGE_DEADLINE.
QUICK_ETCDCTL = ("--dial-timeout", "1s", "--command-timeout", "2s")
# Starts of a secure-discovery gateway in a row: a race at start-up must not hide in luck.
REPEATED_STARTS = 20
# SIGHUP refresh rounds before the socket count is compared with the one after start-up.
SIGHUP_ROUNDS = 9
# resolv.conf has no port: a DNS server for it must listen on port 53 of a spare loopback address.
PORT53_HOSTS = tuple("127.0.%d.53" % n for n in range(9, 29))


# ---- zones ----------------------------------------------------------------------------------

def srv(service, domain, port, target, priority=0, weight=1):
    return f"{service}._tcp.{domain}. {TTL} IN SRV {priority} {weight} {port} {target}."


def soa(domain):
    return f"{domain}. {TTL} IN SOA ns.{domain}. admin.{domain}. 1 60 60 60 60"


def members_zone(cluster, domain, service, indices, target="m{i}.{domain}"):
    """SRV records `service` for the members `indices`, targets with A 127.0.0.1 (and an SOA,
    so that names without records are NXDOMAIN)."""
    lines = [soa(domain)]
    for i in indices:
        name = target.format(i=i, domain=domain)
        lines += [srv(service, domain, cluster.members[i].client_port, name),
                  f"{name}. {TTL} IN A 127.0.0.1"]
    return "\n".join(lines)


def targets(cluster, domain, indices, target="m{i}.{domain}"):
    return {f"{target.format(i=i, domain=domain)}:{cluster.members[i].client_port}"
            for i in indices}


def set_zone(dns, text):
    dns.records = RR.fromZone(text)  # one assignment: the server thread sees old or new


# ---- gateway --------------------------------------------------------------------------------

def dns_flag(dns):
    host, port = dns.address
    return f"{host}:{port}"


class DiscoveryGateway(Gateway):
    """Our gateway finding its endpoints in `domain` (None: only --endpoints in `extra_args`);
    `.addr` is where clients connect."""

    def __init__(self, domain, *extra_args, dns=None, preexec=None):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        args = ["start", "--listen-addr", self.addr, "--dial-timeout", DIAL_TIMEOUT, *extra_args]
        if domain is not None:
            args += ["--discovery-srv", domain]
        if dns is not None:
            args += ["--dns-server", dns_flag(dns)]
        super().__init__(args, preexec=preexec)

    @property
    def ready_targets(self):
        return set(READY_RE.search(self.ready_line).group(1).split(", "))


def member_answering(cluster, gateway):
    """The index of the member answering a serializable get through the gateway (serializable:
    the member answers itself, so the timing is the gateway's and not a raft election's)."""
    return answered_by(cluster, gateway, "get", "e2e/disc", "--consistency=s")


def first_answer_from(cluster, gateway, index, deadline):
    """Poll new etcdctl connections through the gateway until member `index` answers; the
    monotonic time it did, or None if it did not by the deadline."""
    while time.monotonic() < deadline:
        result = cluster.etcdctl([*QUICK_ETCDCTL, "-w", "json", "get", "e2e/disc",
                                  "--consistency=s"], endpoint=gateway.addr, timeout=10)
        if result.returncode == 0:
            if cluster.index_of(json.loads(result.stdout)["header"]["member_id"]) == index:
                answered_at = time.monotonic()
                return answered_at if answered_at <= deadline else None
    return None


def assert_one_line_error(result, *needles):
    """Exit 1, exactly one line on stderr, no traceback, and every needle in that line."""
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("etcd-gateway: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def failing_start(domain, dns, *extra_args):
    return gateway_cli(["start", "--listen-addr", f"127.0.0.1:{free_port()}",
                        "--discovery-srv", domain, "--dns-server", dns_flag(dns),
                        "--dial-timeout", DIAL_TIMEOUT, *extra_args])


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def plain(etcd_cluster):  # noqa: F811
    """The shared plain-text cluster, healed (killed members restarted) before each test."""
    etcd_cluster.heal()
    return etcd_cluster


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """TLS members whose certificate names m0..m2.sec.test and the bare domain dom.test."""
    names = ("m0.sec.test", "m1.sec.test", "m2.sec.test", "dom.test")
    with EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), tls=True, server_names=names) as cluster:
        yield cluster


@pytest.fixture
def dns():
    with DNSTestServer() as server:
        yield server


# ---- discovery at start-up ------------------------------------------------------------------

def test_insecure_discovery_finds_every_member(plain, dns):
    set_zone(dns, members_zone(plain, "plain.test", "_etcd-client", range(3)))
    with DiscoveryGateway("plain.test", "--insecure-discovery", dns=dns) as gateway:
        assert gateway.ready_targets == targets(plain, "plain.test", range(3))
        assert ctl(plain, gateway, "put", "e2e/disc", "v1").stdout.strip() == "OK"
        assert ctl(plain, gateway, "get", "e2e/disc", "--print-value-only").stdout.strip() == "v1"
    asked = {(name, qtype) for _, name, qtype in dns.seen()}
    assert ("_etcd-client-ssl._tcp.plain.test", "SRV") in asked
    assert ("_etcd-client._tcp.plain.test", "SRV") in asked


def test_discovery_srv_name_asks_the_named_service(plain, dns):
    # Plain `_etcd-client` records name member 0: a gateway that ignored the service name
    # would list it; the named service lists members 1 and 2 only.
    zone = "\n".join([members_zone(plain, "named.test", "_etcd-client-blue", (1, 2)),
                      srv("_etcd-client", "named.test", plain.members[0].client_port,
                          "m0.named.test")])
    set_zone(dns, zone)
    with DiscoveryGateway("named.test", "--discovery-srv-name", "blue", "--insecure-discovery",
                          dns=dns) as gateway:
        assert gateway.ready_targets == targets(plain, "named.test", (1, 2))
        assert ctl(plain, gateway, "put", "e2e/disc", "v2").stdout.strip() == "OK"
        assert member_answering(plain, gateway) in (1, 2)
    asked = {name for _, name, _ in dns.seen()}
    assert {"_etcd-client-ssl-blue._tcp.named.test", "_etcd-client-blue._tcp.named.test"} <= asked
    assert "_etcd-client._tcp.named.test" not in asked


def test_secure_discovery_with_the_right_ca(tls_cluster, dns):
    set_zone(dns, members_zone(tls_cluster, "sec.test", "_etcd-client-ssl", range(3)))
    with DiscoveryGateway("sec.test", "--trusted-ca-file", str(tls_cluster.ca_path),
                          dns=dns) as gateway:
        assert gateway.ready_targets == targets(tls_cluster, "sec.test", range(3))
        # etcdctl verifies the member's certificate through the gateway: TLS byte for byte.
        assert ctl(tls_cluster, gateway, "put", "e2e/disc", "tls").stdout.strip() == "OK"
        got = ctl(tls_cluster, gateway, "get", "e2e/disc", "--print-value-only")
        assert got.stdout.strip() == "tls"


def test_every_secure_member_is_validated_on_every_start(tls_cluster, dns):
    # On loopback a connect, and now and then a whole TLS handshake, completes inside the first
    # call: discovery must still wait for every member, whichever finishes first. (Each start
    # makes up to 6 handshakes, member name then domain; a start that listed only the first
    # member to finish, then stopped by itself, was seen in about one start out of six.)
    shape = "x{i}.{domain}"
    set_zone(dns, members_zone(tls_cluster, "dom.test", "_etcd-client-ssl", range(3), shape))
    expected = targets(tls_cluster, "dom.test", range(3), shape)
    for attempt in range(REPEATED_STARTS):
        with DiscoveryGateway("dom.test", "--trusted-ca-file", str(tls_cluster.ca_path),
                              dns=dns) as gateway:
            assert gateway.ready_targets == expected, (attempt, gateway.log.text())
            assert gateway.proc.poll() is None, (attempt, gateway.log.text())


def test_secure_discovery_with_a_wrong_ca_refuses_to_start(tls_cluster, dns, tmp_path):
    import trustme

    wrong_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong_ca))
    set_zone(dns, members_zone(tls_cluster, "sec.test", "_etcd-client-ssl", range(3)))
    result = failing_start("sec.test", dns, "--trusted-ca-file", str(wrong_ca))
    line = assert_one_line_error(result, "_etcd-client-ssl._tcp.sec.test",
                                 "failed TLS validation", "certificate verify failed")
    assert all(name in line for name in targets(tls_cluster, "sec.test", range(3))), line


def test_certificate_for_the_discovery_domain_is_accepted(tls_cluster, dns):
    # Targets x0..x2.dom.test are not in the certificate; the domain dom.test is (etcd's rule).
    shape = "x{i}.{domain}"
    set_zone(dns, members_zone(tls_cluster, "dom.test", "_etcd-client-ssl", range(3), shape))
    with DiscoveryGateway("dom.test", "--trusted-ca-file", str(tls_cluster.ca_path),
                          dns=dns) as gateway:
        assert gateway.ready_targets == targets(tls_cluster, "dom.test", range(3), shape)
        assert ctl(tls_cluster, gateway, "put", "e2e/disc", "dom").stdout.strip() == "OK"


def test_plain_records_need_insecure_discovery(plain, dns):
    set_zone(dns, members_zone(plain, "plain.test", "_etcd-client", range(3)))
    result = failing_start("plain.test", dns)
    assert_one_line_error(result, "insecure", "--insecure-discovery",
                          *targets(plain, "plain.test", range(3)))


def test_nothing_found_names_the_names_and_the_answers(dns):
    set_zone(dns, soa("empty.test"))
    result = failing_start("empty.test", dns)  # no --endpoints: the default is no fallback
    line = assert_one_line_error(result, "_etcd-client-ssl._tcp.empty.test",
                                 "_etcd-client._tcp.empty.test", "NXDOMAIN")
    assert "fallback" not in line and "127.0.0.1:2379" not in line, line


def test_explicit_endpoints_are_the_fallback(plain, dns):
    set_zone(dns, soa("empty.test"))
    with DiscoveryGateway("empty.test", "--endpoints", plain.members[2].client_addr,
                          dns=dns) as gateway:
        warning = gateway.log.wait_for(
            r"warn discovery failed at start-up, using --endpoints as a fallback", timeout=0)
        assert warning is not None and "NXDOMAIN" in warning, gateway.log.text()
        assert gateway.ready_targets == {plain.members[2].client_addr}
        assert member_answering(plain, gateway) == 2


# ---- discovery while running ----------------------------------------------------------------

def test_changed_records_reach_new_connections_within_5s(plain, dns):
    set_zone(dns, members_zone(plain, "live.test", "_etcd-client", [0]))
    with DiscoveryGateway("live.test", "--insecure-discovery", "--discovery-refresh", "1s",
                          dns=dns) as gateway:
        assert member_answering(plain, gateway) == 0
        mark = len(gateway.log.lines)
        changed_at = time.monotonic()
        set_zone(dns, members_zone(plain, "live.test", "_etcd-client", [1]))
        plain.kill(0)
        answered_at = first_answer_from(plain, gateway, 1, changed_at + CHANGE_DEADLINE)
        assert answered_at is not None, gateway.log.text()
        line = gateway.log.wait_for(r"info endpoints changed ", timeout=0, start=mark)
        assert line is not None, gateway.log.text()
        (old,), (new,) = targets(plain, "live.test", [0]), targets(plain, "live.test", [1])
        assert f"added=[{new}]" in line and f"removed=[{old}]" in line, line


def test_refreshed_secure_records_are_validated_before_use(tls_cluster, dns):
    # A new record whose certificate fits neither its target nor the domain is never used (the
    # refresh fails and the last good set stays); a new valid one is, within the deadline.
    set_zone(dns, members_zone(tls_cluster, "sec.test", "_etcd-client-ssl", [0]))
    with DiscoveryGateway("sec.test", "--trusted-ca-file", str(tls_cluster.ca_path),
                          "--discovery-refresh", "1s", dns=dns) as gateway:
        assert member_answering(tls_cluster, gateway) == 0
        mark = len(gateway.log.lines)
        set_zone(dns, members_zone(tls_cluster, "sec.test", "_etcd-client-ssl", [1],
                                   "evil.{domain}"))
        line = gateway.log.wait_for(
            r"warn endpoint refresh failed, keeping the last good set", timeout=10, start=mark)
        assert line is not None, gateway.log.text()
        assert "evil.sec.test" in line and "failed TLS validation" in line, line
        assert member_answering(tls_cluster, gateway) == 0
        changed_at = time.monotonic()
        set_zone(dns, members_zone(tls_cluster, "sec.test", "_etcd-client-ssl", [1]))
        answered_at = first_answer_from(tls_cluster, gateway, 1, changed_at + CHANGE_DEADLINE)
        assert answered_at is not None, gateway.log.text()
        line = gateway.log.wait_for(r"endpoints changed ", timeout=0, start=mark)
        assert line is not None and "evil.sec.test" not in line, gateway.log.text()


def test_failed_refresh_keeps_the_last_good_set(plain, dns):
    set_zone(dns, members_zone(plain, "keep.test", "_etcd-client", (0, 1)))
    with DiscoveryGateway("keep.test", "--insecure-discovery", "--discovery-refresh", "1s",
                          dns=dns) as gateway:
        for mode, zone, reason in (("servfail", None, "SERVFAIL"),
                                   ("normal", soa("keep.test"), "NXDOMAIN")):
            mark = len(gateway.log.lines)
            dns.mode = mode
            if zone is not None:
                set_zone(dns, zone)
            line = gateway.log.wait_for(
                r"warn endpoint refresh failed, keeping the last good set", timeout=10, start=mark)
            assert line is not None and reason in line, gateway.log.text()
            assert member_answering(plain, gateway) in (0, 1)
        assert "endpoints changed" not in gateway.log.text()


def test_sighup_refreshes_at_once(plain, dns):
    set_zone(dns, members_zone(plain, "hup.test", "_etcd-client", [0]))
    with DiscoveryGateway("hup.test", "--insecure-discovery", "--discovery-refresh", "0",
                          dns=dns) as gateway:
        assert member_answering(plain, gateway) == 0
        set_zone(dns, members_zone(plain, "hup.test", "_etcd-client", [2]))
        queries_before = len(dns.seen())
        assert member_answering(plain, gateway) == 0  # --discovery-refresh 0: nothing asked again
        assert len(dns.seen()) == queries_before
        mark = len(gateway.log.lines)
        gateway.signal(signal.SIGHUP)
        assert gateway.log.wait_for(r"refreshing endpoints signal=SIGHUP", timeout=10,
                                    start=mark), gateway.log.text()
        assert gateway.log.wait_for(r"endpoints changed ", timeout=10, start=mark), \
            gateway.log.text()
        assert member_answering(plain, gateway) == 2


def refresh_count(gateway, metrics_addr):
    """etcd_gateway_discovery_refreshes_total summed over results, from the status port."""
    try:
        with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError as exc:  # a gateway that exited by itself is the likely cause: show why
        raise AssertionError(f"GET /metrics: {exc}; gateway exit status "
                             f"{gateway.proc.poll()}\n{gateway.log.text()}") from None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("etcd_gateway_discovery_refreshes_total{"))


def sockets_of(pid):
    """The socket descriptors of process `pid` (pipes are left out: the relay keeps a pool of
    splice pipes on purpose), as (fd, link) pairs."""
    fd_dir = f"/proc/{pid}/fd"
    links = []
    for fd in os.listdir(fd_dir):
        try:
            links.append((int(fd), os.readlink(f"{fd_dir}/{fd}")))
        except OSError:
            continue  # closed while we looked
    return sorted(link for link in links if link[1].startswith("socket:"))


def test_refreshes_leave_no_sockets_behind(tls_cluster, dns):
    # Every SIGHUP round opens DNS sockets and, for the record that never validates, two TLS
    # probes; SERVFAIL rounds end early. None of them may outlive its round.
    zone = "\n".join([members_zone(tls_cluster, "sec.test", "_etcd-client-ssl", [0]),
                      members_zone(tls_cluster, "sec.test", "_etcd-client-ssl", [1],
                                   "evil.{domain}")])
    set_zone(dns, zone)
    metrics_addr = f"127.0.0.1:{free_port()}"
    with DiscoveryGateway("sec.test", "--trusted-ca-file", str(tls_cluster.ca_path),
                          "--discovery-refresh", "0", "--metrics-addr", metrics_addr,
                          dns=dns) as gateway:
        assert gateway.ready_targets == targets(tls_cluster, "sec.test", [0])
        baseline = sockets_of(gateway.pid)
        for round_number in range(SIGHUP_ROUNDS):
            dns.mode = "servfail" if round_number % 3 == 2 else "normal"
            before = refresh_count(gateway, metrics_addr)
            gateway.signal(signal.SIGHUP)
            assert wait_until(lambda count=before: refresh_count(gateway, metrics_addr) > count,
                              timeout=10), \
                (round_number, gateway.log.text())
        assert "endpoints changed" not in gateway.log.text()
        assert member_answering(tls_cluster, gateway) == 0
        assert wait_until(lambda: len(sockets_of(gateway.pid)) <= len(baseline), timeout=10), (
            baseline, sockets_of(gateway.pid))


class MarkerServer:
    """A TCP listener on `host:port` that greets every connection with `MARKER` and closes."""

    MARKER = b"not etcd: the old address\n"

    def __init__(self, host, port):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(self.MARKER)

    def close(self):
        self.stopping.set()
        self.thread.join(10)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recv_all(addr, timeout=10.0):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        data = b""
        while len(data) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    return data


def test_host_names_in_endpoints_are_resolved_again(plain, dns):
    # The name first points at 127.0.0.2, where a marker server holds member 0's port number;
    # then at 127.0.0.1, where member 0 listens.
    port = plain.members[0].client_port
    name_zone = "\n".join([soa("names.test"), f"etcd.names.test. {TTL} IN A {{}}"])
    set_zone(dns, name_zone.format("127.0.0.2"))
    with MarkerServer("127.0.0.2", port), DiscoveryGateway(
            None, "--endpoints", f"etcd.names.test:{port}", "--discovery-refresh", "1s",
            dns=dns) as gateway:
        assert gateway.ready_targets == {f"etcd.names.test:{port}"}
        assert recv_all(gateway.addr) == MarkerServer.MARKER
        mark = len(gateway.log.lines)
        set_zone(dns, name_zone.format("127.0.0.1"))
        line = gateway.log.wait_for(r"endpoints changed ", timeout=10, start=mark)
        assert line is not None, gateway.log.text()
        assert f"etcd.names.test:{port} 127.0.0.2->127.0.0.1" in line, line
        assert member_answering(plain, gateway) == 0


# ---- the default /etc/resolv.conf -----------------------------------------------------------

class Port53DNSServer(DNSTestServer):
    """The test DNS server on port 53 (UDP and TCP): resolv.conf `nameserver` lines have no port."""

    def _bind_pair(self):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((self.host, 53))
            tcp.bind((self.host, 53))
            tcp.listen(16)
        except OSError:
            udp.close()
            tcp.close()
            raise
        return udp, tcp


def port53_dns_server():
    """A Port53DNSServer on the first spare address of PORT53_HOSTS (another run may hold one)."""
    for host in PORT53_HOSTS:
        try:
            return Port53DNSServer(host=host)
        except OSError:
            continue
    pytest.fail(f"port 53 busy on every one of {PORT53_HOSTS}")


def resolv_conf_mounts():
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "resolv.conf" in line]


@pytest.mark.root  # a private mount namespace for our /etc/resolv.conf; port 53
def test_default_resolv_conf_is_honoured(plain, tmp_path):
    # The gateway runs in a private mount namespace where our file is /etc/resolv.conf; no
    # --dns-server. `timeout:1 attempts:1` (honoured too) makes the silent-server refresh fail
    # fast.
    host_resolv_conf = open("/etc/resolv.conf").read()
    host_mounts = resolv_conf_mounts()
    with port53_dns_server() as dns:
        set_zone(dns, members_zone(plain, "rc.test", "_etcd-client", range(3)))
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text(f"nameserver {dns.host}\noptions timeout:1 attempts:1\n")
        preexec = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf)]
        with DiscoveryGateway("rc.test", "--insecure-discovery", "--discovery-refresh", "1s",
                              preexec=preexec) as gateway:
            assert gateway.ready_targets == targets(plain, "rc.test", range(3))
            assert ("udp", "_etcd-client._tcp.rc.test", "SRV") in dns.seen()
            assert ctl(plain, gateway, "put", "e2e/disc", "rc").stdout.strip() == "OK"
            mark = len(gateway.log.lines)
            dns.mode = "silent"
            line = gateway.log.wait_for(
                r"warn endpoint refresh failed, keeping the last good set", timeout=10,
                start=mark)
            assert line is not None and re.search(r"time(d )?out", line), gateway.log.text()
            assert member_answering(plain, gateway) in range(3)
    # The bind mount never reached this namespace.
    assert open("/etc/resolv.conf").read() == host_resolv_conf
    assert resolv_conf_mounts() == host_mounts
