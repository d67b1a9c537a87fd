"""Member failures under load: a real 3-member etcd cluster, our gateway in front, LoadDriver
clients doing put-then-get through it while one fault is injected.

Per scenario the figures are: ops, failures a client without retries sees (`failed_first`, split
into path failures `conn` and etcd refusals `etcd`), failures a client that retries once sees
(`failed_final`), the longest stretch without a completed op, latencies, acknowledged puts read
back afterwards, and the gateway's descriptors and idle CPU. Invariants:

* no acknowledged put is lost (every acknowledged value is read back after the cluster healed);
* after one member fails, path failures stop within 2 x --dial-timeout of the fault (for a
  member that hangs instead of dying: once the health check has had 3 intervals + a timeout);
* a client that retries once never fails because of a dead member;
* the gateway is alive, returns to its baseline descriptors and is idle when the load stops.
"""
import time
import uuid

import pytest

from etcd_cluster import EtcdCluster
from faults.conftest import ProcessWatch, record_result, scaled
from faults.loadgen import LoadDriver
from support import Gateway, free_port, wait_until

pytestmark = pytest.mark.faults

DIAL_TIMEOUT = 0.5
HEALTH_INTERVAL = 1.0
LOAD_SECONDS = scaled(8.0, 60.0)
FAULT_AT = scaled(2.0, 10.0)          # seconds of steady load before the fault
FAULT_HOLD = scaled(3.0, 20.0)        # how long a member stays dead / frozen
AFTER_FAULT = scaled(2.0, 10.0)       # load after the member is back
CLIENTS = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with EtcdCluster(tmp_path_factory.mktemp("faults-etcd")) as running:
        yield running


@pytest.fixture(autouse=True)
def healed(cluster):
    cluster.heal()
    yield cluster
    cluster.heal()


def start_gateway(endpoints, *extra):
    addr = f"127.0.0.1:{free_port()}"
    gateway = Gateway(["start", "--endpoints", ",".join(endpoints), "--listen-addr", addr,
                       "--dial-timeout", f"{int(DIAL_TIMEOUT * 1000)}ms", "--retry-delay", "1s",
                       *extra])
    gateway.addr = addr
    return gateway


def member_in_use(cluster, driver, since):
    """The member that answered most ops started after `since` (sticky: the only one)."""
    counts = {}
    for op in list(driver.ops):
        if op.ok and op.started >= since and op.member_id:
            counts[op.member_id] = counts.get(op.member_id, 0) + 1
    assert counts, "no op succeeded before the fault:\n" + "\n".join(driver.errors())
    return cluster.index_of(max(counts, key=counts.get))


def warm_up(driver, count=20, timeout=20.0):
    assert wait_until(lambda: driver.successes_since(driver.started) >= count, timeout=timeout), (
        "the load never got going:\n" + "\n".join(driver.errors()))


def sleep_until(instant):
    """Let the load run until `instant` (the load is what the test is waiting for)."""
    remaining = instant - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def finish(name, cluster, gateway, driver, watch, fault_at, load, recover_bound,
           expect_final_failures=False, notes=""):
    """Stop the load, heal the cluster, read everything back and check every invariant."""
    # Load keeps running a while after the last change, so recovery is measured, not assumed.
    sleep_until(max(driver.started + LOAD_SECONDS, time.monotonic() + AFTER_FAULT))
    driver.stop()
    cluster.heal()
    checked, checked_bytes, lost = driver.verify_acknowledged(gateway.addr)
    figures = driver.figures(fault_at)
    proc = watch.check()
    row = record_result(dict({"fault": name, "load": load}, **figures, acked_checked=checked,
                             bytes_checked=checked_bytes, lost=len(lost), **proc, notes=notes))
    context = "\n".join(driver.errors()) + "\n--- gateway log ---\n" + gateway.log.text()[-4000:]
    assert not lost, f"acknowledged puts lost: {lost[:10]}\n{context}"
    assert row["mismatches"] == 0, context
    late_conn = [op for op in driver.ops if op.first_kind == "conn"
                 and op.started > fault_at + recover_bound]
    assert not late_conn, (f"path failures later than {recover_bound}s after the fault:\n"
                           + "\n".join(driver.errors()) + context)
    if not expect_final_failures:
        final = [op for op in driver.ops if not op.ok]
        assert not final, f"a client that retries once failed {len(final)} times:\n{context}"
    watch.assert_clean(proc, context)
    return row


@pytest.mark.parametrize("keepalive", [False, True], ids=["new-conn", "keepalive"])
def test_kill_member_in_use_then_restart(cluster, keepalive):
    with start_gateway(cluster.endpoints) as gateway:
        watch = ProcessWatch(gateway.pid)
        driver = LoadDriver(gateway.addr, f"/faults/kill-in-use/{uuid.uuid4().hex[:8]}",
                            clients=CLIENTS, keepalive=keepalive, duration=LOAD_SECONDS + 30)
        driver.start()
        warm_up(driver)
        sleep_until(driver.started + FAULT_AT)
        victim = member_in_use(cluster, driver, driver.started)
        # A follower, so that this scenario measures the gateway and not an election.
        cluster.move_leader((victim + 1) % 3)
        fault_at = time.monotonic()
        cluster.kill(victim)
        sleep_until(fault_at + FAULT_HOLD)
        cluster.restart(victim)
        finish(f"kill -9 member in use, restart ({'keepalive' if keepalive else 'new conn'})",
               cluster, gateway, driver, watch, fault_at,
               f"{CLIENTS} clients, {'keep-alive' if keepalive else 'conn per op'}",
               recover_bound=2 * DIAL_TIMEOUT)


def test_kill_leader(cluster):
    with start_gateway(cluster.endpoints) as gateway:
        watch = ProcessWatch(gateway.pid)
        driver = LoadDriver(gateway.addr, f"/faults/kill-leader/{uuid.uuid4().hex[:8]}",
                            clients=CLIENTS, duration=LOAD_SECONDS + 30)
        driver.start()
        warm_up(driver)
        sleep_until(driver.started + FAULT_AT)
        in_use = member_in_use(cluster, driver, driver.started)
        # The leader is not the member in use: the clients see the election through a follower.
        cluster.move_leader((in_use + 1) % 3)
        leader = cluster.leader_index()
        fault_at = time.monotonic()
        cluster.kill(leader)
        sleep_until(fault_at + FAULT_HOLD)
        cluster.restart(leader)
        finish("kill -9 leader (not the member in use)", cluster, gateway, driver, watch, fault_at,
               f"{CLIENTS} clients, conn per op", recover_bound=2 * DIAL_TIMEOUT)


def test_hung_member_sigstop_then_sigcont(cluster):
    hang = scaled(5.0, 20.0)
    with start_gateway(cluster.endpoints, "--health-check", "etcd",
                       "--health-interval", f"{int(HEALTH_INTERVAL)}s") as gateway:
        watch = ProcessWatch(gateway.pid)
        driver = LoadDriver(gateway.addr, f"/faults/sigstop/{uuid.uuid4().hex[:8]}",
                            clients=CLIENTS, duration=LOAD_SECONDS + hang + 30, op_timeout=2.0)
        driver.start()
        warm_up(driver)
        sleep_until(driver.started + FAULT_AT)
        victim = member_in_use(cluster, driver, driver.started)
        cluster.move_leader((victim + 1) % 3)
        fault_at = time.monotonic()
        cluster.stop(victim)
        unhealthy = gateway.log.wait_for(r"endpoint unhealthy", timeout=hang + 10)
        sleep_until(fault_at + hang)
        cluster.cont(victim)
        # 3 failed checks, each up to max(dial timeout, interval), then the connections close.
        bound = 3 * HEALTH_INTERVAL + max(DIAL_TIMEOUT, HEALTH_INTERVAL) + 2 * DIAL_TIMEOUT
        row = finish(f"SIGSTOP member in use {hang:.0f}s, SIGCONT (--health-check etcd)",
                     cluster, gateway, driver, watch, fault_at,
                     f"{CLIENTS} clients, conn per op, op timeout 2s", recover_bound=bound,
                     expect_final_failures=True,
                     notes="ops in flight on the frozen member wait for the op timeout; "
                           "until the health check marks it unhealthy new connections still "
                           "reach it (its kernel still accepts)")
        assert unhealthy, "the frozen member was never marked unhealthy:\n" + gateway.log.text()
        late_final = [op for op in driver.ops if not op.ok and op.started > fault_at + bound]
        assert not late_final, "\n".join(driver.errors())
        assert row["failed_final"] <= row["failed_first"]


def test_every_endpoint_down_3s_then_back(cluster):
    outage = 3.0
    with start_gateway(cluster.endpoints) as gateway:
        watch = ProcessWatch(gateway.pid)
        driver = LoadDriver(gateway.addr, f"/faults/all-down/{uuid.uuid4().hex[:8]}",
                            clients=CLIENTS, duration=LOAD_SECONDS + 60)
        driver.start()
        warm_up(driver)
        sleep_until(driver.started + FAULT_AT)
        fault_at = time.monotonic()
        for index in range(3):
            cluster.kill(index)
        sleep_until(fault_at + outage)
        back_at = time.monotonic()
        for index in range(3):
            cluster.restart(index, wait=False)
        cluster.wait_healthy(timeout=30)
        healthy_at = time.monotonic()
        assert wait_until(lambda: driver.successes_since(healthy_at) > 0, timeout=10), (
            "no op succeeded after every member came back:\n" + gateway.log.text()[-3000:])
        first_ok = min(op.ended for op in driver.ops if op.ok and op.started >= back_at)
        row = finish("every endpoint down 3s, then back", cluster, gateway, driver, watch,
                     fault_at, f"{CLIENTS} clients, conn per op",
                     recover_bound=(healthy_at - fault_at) + 2 * DIAL_TIMEOUT,
                     expect_final_failures=True,
                     notes=f"cluster healthy {healthy_at - back_at:.2f}s after the restart; "
                           f"first op through {first_ok - back_at:.2f}s after it")
        late_final = [op for op in driver.ops if not op.ok
                      and op.started > healthy_at + 2 * DIAL_TIMEOUT]
        assert not late_final, "\n".join(driver.errors())
        assert row["failed_final"] > 0  # the outage was real
