"""End to end: a real 3-member etcd cluster behind our gateway, driven by etcdctl.

Every etcdctl run names only the gateway as its endpoint, so it makes one gRPC connection
through the gateway; `-w json` puts the answering member's id in `header.member_id`, which is
how these tests see which member a connection reached. The cluster is shared by the module and
healed (stopped members resumed, killed ones restarted) before every test.
"""
import json
import os
import socket
import subprocess
import time
from collections import Counter

import pytest

from etcd_cluster import (EtcdCluster, answered_by, ctl, etcd_cluster,  # noqa: F401  (fixtures)
                          healthy_cluster)
from support import Gateway, closed_by_peer, fd_count, free_port, read_until, wait_until

pytestmark = pytest.mark.etcd

FAILOVER_COMMANDS = 50
POLICY_COMMANDS = 20


class EtcdGateway(Gateway):
    """Our gateway in front of every member of `cluster`; `.addr` is where clients connect."""

    def __init__(self, cluster, *extra_args):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        super().__init__(["start", "--endpoints", ",".join(cluster.endpoints),
                          "--listen-addr", self.addr, "--dial-timeout", "500ms", *extra_args])
        self.baseline_fds = fd_count(self.pid)

    def assert_no_fd_leak(self):
        """Once every client has gone, the gateway holds no more descriptors than at start."""
        fd_dir = f"/proc/{self.pid}/fd"
        assert wait_until(lambda: fd_count(self.pid) <= self.baseline_fds, timeout=10), (
            self.baseline_fds, sorted(os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)))


def test_put_and_get(etcd_cluster):  # noqa: F811
    with EtcdGateway(etcd_cluster) as gateway:
        assert ctl(etcd_cluster, gateway, "put", "e2e/greeting", "hello").stdout.strip() == "OK"
        got = ctl(etcd_cluster, gateway, "get", "e2e/greeting", "--print-value-only")
        assert got.stdout.strip() == "hello"
        # A write through the gateway is visible on every member, not only the one it reached.
        for index in range(len(etcd_cluster.members)):
            direct = etcd_cluster.etcdctl(["get", "e2e/greeting", "--print-value-only"], index)
            assert direct.stdout.strip() == "hello"


def test_watch_receives_event(etcd_cluster):  # noqa: F811
    with EtcdGateway(etcd_cluster) as gateway:
        watch = etcd_cluster.etcdctl_popen(["watch", "e2e/watched"], endpoint=gateway.addr,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # The watch prints nothing once it is registered, so keep writing (bounded in count
            # and time) until an event comes back through the gateway.
            event, seen = b"PUT\ne2e/watched\nv", b""
            for attempt in range(50):
                ctl(etcd_cluster, gateway, "put", "e2e/watched", f"v{attempt}")
                seen = read_until(watch.stdout, b"PUT", timeout=0.2, data=seen)
                if b"PUT" in seen:
                    break
            seen = read_until(watch.stdout, event, timeout=5, data=seen)
            assert event in seen, (seen, watch.poll(), gateway.log.text())
        finally:
            watch.kill()
            watch.wait(timeout=10)
            watch.stdout.close()
            watch.stderr.close()


def test_kill_member_in_use_is_invisible_to_clients(etcd_cluster):  # noqa: F811
    with EtcdGateway(etcd_cluster) as gateway:
        in_use = answered_by(etcd_cluster, gateway, "put", "e2e/failover", "before")
        # Move leadership away first: a leader's death costs a raft election, during which etcd
        # itself may fail writes; this test is about the gateway hiding the dead member.
        if etcd_cluster.leader_index() == in_use:
            etcd_cluster.move_leader((in_use + 1) % len(etcd_cluster.members))
        etcd_cluster.kill(in_use)

        failures, members = [], Counter()
        for n in range(FAILOVER_COMMANDS):
            args = ("put", f"e2e/failover/{n}", str(n)) if n % 2 == 0 else ("get", "e2e/failover")
            result = etcd_cluster.etcdctl(["-w", "json", *args], endpoint=gateway.addr)
            if result.returncode != 0:
                failures.append((n, args, result.stderr.strip()))
                continue
            members[etcd_cluster.index_of(json.loads(result.stdout)["header"]["member_id"])] += 1
        assert not failures, f"{failures}\n--- gateway log ---\n{gateway.log.text()}"
        assert in_use not in members and sum(members.values()) == FAILOVER_COMMANDS
        dead = etcd_cluster.members[in_use].client_addr
        down = gateway.log.wait_for(rf"endpoint down.*endpoint={dead}\b", timeout=5)
        assert down, gateway.log.text()
        gateway.assert_no_fd_leak()


def test_all_members_down_closes_clients_then_service_resumes(etcd_cluster):  # noqa: F811
    with EtcdGateway(etcd_cluster) as gateway:
        ctl(etcd_cluster, gateway, "put", "e2e/outage", "before")
        # A connection that is relayed to a member (an HTTP/1.1 keep-alive exchange proves it).
        established = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        established.sendall(b"GET /health HTTP/1.1\r\nHost: etcd\r\n\r\n")
        assert b"200 OK" in established.recv(4096)

        for index in range(len(etcd_cluster.members)):
            etcd_cluster.kill(index)
        with established:
            assert closed_by_peer(established, timeout=5), "open connection not closed"
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as fresh:
            assert closed_by_peer(fresh, timeout=5), "new connection hangs with every member down"
        assert time.monotonic() - start < 5

        for index in range(len(etcd_cluster.members)):
            etcd_cluster.restart(index, wait=False)
        etcd_cluster.wait_healthy()
        # Members are back: the gateway must serve again without waiting out --retry-delay (1m).
        deadline = time.monotonic() + 20
        while True:
            result = etcd_cluster.etcdctl(["get", "e2e/outage", "--print-value-only"],
                                          endpoint=gateway.addr)
            if result.returncode == 0 or time.monotonic() >= deadline:
                break
        assert result.returncode == 0, f"{result.stderr}\n--- gateway log ---\n{gateway.log.text()}"
        assert result.stdout.strip() == "before"
        assert gateway.proc.poll() is None
        gateway.assert_no_fd_leak()


def test_sticky_policy_keeps_one_member(etcd_cluster):  # noqa: F811
    with EtcdGateway(etcd_cluster) as gateway:  # sticky is the default
        members = Counter(answered_by(etcd_cluster, gateway, "get", "e2e/sticky")
                          for _ in range(POLICY_COMMANDS))
        assert len(members) == 1, members


def test_round_robin_policy_spreads_over_all_members(etcd_cluster):  # noqa: F811
    with EtcdGateway(etcd_cluster, "--policy", "round-robin") as gateway:
        members = Counter(answered_by(etcd_cluster, gateway, "get", "e2e/round-robin")
                          for _ in range(POLICY_COMMANDS))
        assert set(members) == set(range(len(etcd_cluster.members))), members
        # One connection per command, each to the next member: an even spread, give or take one.
        assert max(members.values()) - min(members.values()) <= 1, members


def test_tls_members_are_proxied_byte_for_byte(tmp_path):
    # The gateway never terminates TLS: etcdctl verifies the member's certificate (made for
    # 127.0.0.1) through it, so the handshake itself must cross the relay unchanged.
    with EtcdCluster(tmp_path, tls=True) as cluster, EtcdGateway(cluster) as gateway:
        assert ctl(cluster, gateway, "put", "e2e/tls", "secret").stdout.strip() == "OK"
        got = ctl(cluster, gateway, "get", "e2e/tls", "--print-value-only")
        assert got.stdout.strip() == "secret"
        assert answered_by(cluster, gateway, "get", "e2e/tls") in range(len(cluster.members))
