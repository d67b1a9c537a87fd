"""etcd-aware health checks (--health-check etcd) against a real 3-member etcd cluster.

A member that is up but useless still accepts TCP connections: a frozen process (SIGSTOP) because
the kernel completes the handshake from its listen backlog, a member without a leader because it
is alive. Only asking etcd's own GET /health tells them apart (etcd issue #7593). These tests
freeze and kill members by PID and watch the gateway's reaction through its log, its status port
(/endpoints, /health, /metrics) and etcdctl run through it: `-w json` puts the answering member's
id in `header.member_id`, which is how a test sees where a connection went. The sticky policy
keeps every connection on one member, so "the member in use" is well defined.

The cluster is shared by the module and healed before every test; the last test shows the
default TCP mode keeping a frozen member, which is the difference the etcd mode makes.
"""
import json
import re
import socket
import subprocess
import time

import pytest

from etcd_cluster import (EtcdCluster, answered_by, ctl, etcd_cluster,  # noqa: F401  (fixtures)
                          gateway_endpoint, healthy_cluster)
from support import closed_by_peer, read_until, wait_until
from test_status import StatusGateway, endpoints_of, health_of, scrape

pytestmark = pytest.mark.etcd

ETCD_MODE = ["--health-check=etcd", "--health-interval=1s", "--dial-timeout=500ms",
             "--policy=sticky"]
# 3 failed checks 0.9-1.1 s apart, each timing out after 0.8 s: about 3-4 s. The bound is a
# generous "within a few seconds", far below what a hung member would cost a client otherwise.
LEAVE_WITHIN = 10.0
EVENT_TIMEOUT = 20.0  # waiting for a log line: only "did not hang"


def event(gateway, msg, endpoint, timeout=EVENT_TIMEOUT):
    """The log line `<msg> endpoint=<endpoint> ...`, or None."""
    return gateway.log.wait_for(rf"\b{msg} endpoint={re.escape(endpoint)}(?!\d)", timeout)


def watch_sees(cluster, gateway, watch, value: str, timeout: float) -> bool:
    """Put `value` through the gateway (again, bounded) until the watch prints it."""
    deadline = time.monotonic() + timeout
    seen = b""
    for _ in range(100):
        ctl(cluster, gateway, "put", "hc/watched", value)
        seen = read_until(watch.stdout, value.encode(), timeout=0.3, data=seen)
        if value.encode() in seen or time.monotonic() >= deadline:
            break
    return value.encode() in seen


def active_on(gateway, endpoint):
    return endpoints_of(gateway)[endpoint]["active_connections"]


def endpoint_up_gauge(gateway, endpoint):
    return scrape(gateway)["etcd_gateway_endpoint_up"].value(endpoint=endpoint)


def test_sigstopped_member_leaves_the_rotation_and_returns(etcd_cluster):  # noqa: F811
    cluster = etcd_cluster
    with StatusGateway(cluster.endpoints, *ETCD_MODE) as gateway:
        stopped = answered_by(cluster, gateway, "get", "hc/any")
        frozen = cluster.members[stopped].client_addr
        raw = socket.create_connection(gateway.addr, timeout=10)
        watch = cluster.etcdctl_popen(["watch", "hc/watched"], endpoint=gateway_endpoint(gateway),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # Both connections stick to the member in use; the watch is live before the fault.
            assert wait_until(lambda: active_on(gateway, frozen) == 2), endpoints_of(gateway)
            assert watch_sees(cluster, gateway, watch, "before", timeout=15), gateway.log.text()
            # ...and the puts' own connections have finished closing (a half-closed relay to a
            # member frozen a moment later would be evicted too).
            assert wait_until(lambda: active_on(gateway, frozen) == 2), endpoints_of(gateway)

            frozen_at = time.monotonic()
            cluster.stop(stopped)
            line = event(gateway, "endpoint unhealthy", frozen)
            left_after = time.monotonic() - frozen_at
            assert line, gateway.log.text()
            assert left_after < LEAVE_WITHIN, f"left the rotation only after {left_after:.1f}s"
            assert "failures=3" in line, line

            # Its open connections are closed so their clients reconnect elsewhere.
            assert closed_by_peer(raw, timeout=10), "connection to the frozen member kept open"
            closed = event(gateway, "closed connections of unhealthy endpoint", frozen, 5)
            assert closed and "count=2" in closed, gateway.log.text()
            assert watch.poll() is None, "the watch gave up instead of reconnecting"
            assert watch_sees(cluster, gateway, watch, "after", timeout=20), gateway.log.text()

            row = endpoints_of(gateway)[frozen]
            # Still "up": TCP connects complete in the kernel's backlog; only etcd's /health tells.
            assert row["healthy"] is False and row["up"] is True, row
            assert "timeout" in row["last_error"], row
            assert endpoint_up_gauge(gateway, frozen) == 0
            assert health_of(gateway) == (200, {"health": "true"})
            # New connections go elsewhere (sticky now sticks to a healthy member).
            for _ in range(5):
                assert answered_by(cluster, gateway, "get", "hc/any") != stopped

            returned_at = time.monotonic()
            cluster.cont(stopped)
            line = event(gateway, "endpoint healthy", frozen)
            assert line, gateway.log.text()
            assert time.monotonic() - returned_at < LEAVE_WITHIN
            assert endpoints_of(gateway)[frozen]["healthy"] is True
            assert endpoint_up_gauge(gateway, frozen) == 1
            assert len(re.findall(r"endpoint unhealthy endpoint=", gateway.log.text())) == 1, (
                "another member flapped:\n" + gateway.log.text())
        finally:
            raw.close()
            watch.kill()
            watch.wait(timeout=10)
            cluster.cont(stopped)


def test_two_members_killed_survivor_without_leader_health_503(etcd_cluster):  # noqa: F811
    cluster = etcd_cluster
    with StatusGateway(cluster.endpoints, *ETCD_MODE) as gateway:
        survivor = answered_by(cluster, gateway, "get", "hc/any")
        alive = cluster.members[survivor].client_addr
        try:
            for index in range(len(cluster.members)):
                if index != survivor:
                    cluster.kill(index)
            assert event(gateway, "endpoint unhealthy", alive), gateway.log.text()
            assert wait_until(lambda: health_of(gateway)[0] == 503, timeout=EVENT_TIMEOUT)
            assert health_of(gateway) == (503, {"health": "false"})
            # The survivor answers its checks now (no more timeouts): etcd's 503 and reason.
            assert wait_until(
                lambda: endpoints_of(gateway)[alive]["last_error"].startswith("health 503"),
                timeout=EVENT_TIMEOUT), endpoints_of(gateway)[alive]
            rows = endpoints_of(gateway)
            assert not any(row["healthy"] for row in rows.values()), rows
            assert set(scrape(gateway)["etcd_gateway_endpoint_up"].samples.values()) == {0}

            # Connections still reach the reachable member: etcd answers with its own error.
            watch = ctl(cluster, gateway, "watch", "hc/watched", check=False)
            assert watch.returncode != 0
            assert "etcdserver: no leader" in watch.stderr, watch.stderr
            status = ctl(cluster, gateway, "endpoint", "status", "-w", "json")
            reply = json.loads(status.stdout)[0]["Status"]
            assert cluster.index_of(reply["header"]["member_id"]) == survivor, reply
            assert not reply.get("leader") and "etcdserver: no leader" in reply["errors"], reply
        finally:
            cluster.heal()
        # Healed: the members return (2 good checks each) and so does the gateway's /health.
        assert wait_until(lambda: health_of(gateway)[0] == 200, timeout=EVENT_TIMEOUT), (
            gateway.log.text())
        assert wait_until(
            lambda: all(row["healthy"] for row in endpoints_of(gateway).values()),
            timeout=EVENT_TIMEOUT), endpoints_of(gateway)
        assert answered_by(cluster, gateway, "get", "hc/any") in range(len(cluster.members))
    # Last, so that everything above is checked either way: the reason is etcd's own text,
    # {"health":"false","reason":"RAFT NO LEADER"}, as an operator would grep for it.
    assert rows[alive]["last_error"] == "health 503: RAFT NO LEADER", rows[alive]


def test_tcp_mode_keeps_a_sigstopped_member_in_the_rotation(etcd_cluster):  # noqa: F811
    """The default --health-check tcp cannot see a frozen member: documents the difference."""
    cluster = etcd_cluster
    flags = [flag for flag in ETCD_MODE if not flag.startswith("--health-check")]
    with StatusGateway(cluster.endpoints, *flags) as gateway:
        stopped = answered_by(cluster, gateway, "get", "hc/any")
        frozen = cluster.members[stopped].client_addr
        # etcdctl's connection must be fully closed first: half-closed towards a frozen member
        # it would stay open and count below.
        assert wait_until(lambda: active_on(gateway, frozen) == 0), endpoints_of(gateway)
        cluster.stop(stopped)
        try:
            # Watch for longer than the etcd mode needs to evict it (about 3-4 s).
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                row = endpoints_of(gateway)[frozen]
                assert row["healthy"] is True and row["up"] is True, row
                assert health_of(gateway) == (200, {"health": "true"})
                time.sleep(0.2)
            # A new connection still goes to the frozen member, and it is not closed.
            with socket.create_connection(gateway.addr, timeout=10) as client:
                assert wait_until(lambda: active_on(gateway, frozen) == 1), (
                    endpoints_of(gateway))
                assert not closed_by_peer(client, timeout=1.0)
            assert endpoint_up_gauge(gateway, frozen) == 1
            assert not re.search(r"endpoint (unhealthy|down)", gateway.log.text()), (
                gateway.log.text())
        finally:
            cluster.cont(stopped)


def test_tls_members_are_checked_over_tls_against_the_trusted_ca(tmp_path):
    """`--endpoints https://...`: the /health check speaks TLS, verified with --trusted-ca-file."""
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    flags = ["--health-check=etcd", "--health-interval=300ms", "--dial-timeout=500ms"]
    with EtcdCluster(tmp_path / "tls", size=1, tls=True) as cluster:
        urls = [member.client_url for member in cluster.members]
        member = cluster.members[0].client_addr
        with StatusGateway(urls, *flags, f"--trusted-ca-file={cluster.ca_path}") as trusting, \
                StatusGateway(urls, *flags, f"--trusted-ca-file={other_ca}") as distrusting:
            # The distrusting gateway needs 3 checks to give up; the trusting one, started
            # first with the same interval, has made at least as many by then.
            line = event(distrusting, "endpoint unhealthy", member)
            assert line and "certificate verify failed" in line, distrusting.log.text()
            row = endpoints_of(trusting)[member]
            assert row["secure"] is True, row
            assert row["healthy"] is True and row["last_error"] == "", (row, trusting.log.text())
            assert health_of(trusting) == (200, {"health": "true"})
            assert health_of(distrusting) == (503, {"health": "false"})
            # The data path is TLS byte for byte either way: etcdctl verifies the member itself.
            assert answered_by(cluster, trusting, "put", "hc/tls", "v") == 0
            assert "endpoint unhealthy" not in trusting.log.text(), trusting.log.text()
