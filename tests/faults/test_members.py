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

import pytest

from faults.conftest import scaled
from faults.scenario import (CLIENTS, DIAL_TIMEOUT, FAULT_AT, HEALTH_INTERVAL,  # noqa: F401
                             LOAD_SECONDS, finish, gateway_for, healed, member_in_use,
                             sleep_until, start_load)
from etcd_cluster import ELECTION_TIMEOUT_MS
from support import wait_until

pytestmark = pytest.mark.faults

FAULT_HOLD = scaled(3.0, 20.0)        # how long a member stays dead / frozen
ETCD_REQUEST_TIMEOUT = 5.0 + 2 * ELECTION_TIMEOUT_MS / 1000  # etcd's ServerConfig.ReqTimeout


@pytest.mark.parametrize("keepalive", [False, True], ids=["new-conn", "keepalive"])
def test_kill_member_in_use_then_restart(cluster, keepalive):
    with gateway_for(cluster.endpoints) as gateway:
        watch, driver = start_load(gateway, "kill-in-use", LOAD_SECONDS + 30, keepalive=keepalive)
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
    with gateway_for(cluster.endpoints) as gateway:
        # A put forwarded to the dead leader waits for etcd's own request timeout (5 s + 2
        # election timeouts) before etcd answers it; a client that gave up sooner would count
        # etcd's wait as a failed path (a CI run saw one retry time out at 3 s this way).
        watch, driver = start_load(gateway, "kill-leader", LOAD_SECONDS + 30,
                                   op_timeout=ETCD_REQUEST_TIMEOUT + 2.0)
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
               f"{CLIENTS} clients, conn per op, op timeout {driver.op_timeout:g}s",
               recover_bound=2 * DIAL_TIMEOUT)


def test_hung_member_sigstop_then_sigcont(cluster):
    hang = scaled(5.0, 20.0)
    with gateway_for(cluster.endpoints, extra=("--health-check", "etcd",
                     "--health-interval", f"{int(HEALTH_INTERVAL)}s")) as gateway:
        watch, driver = start_load(gateway, "sigstop", LOAD_SECONDS + hang + 30, op_timeout=2.0)
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
    with gateway_for(cluster.endpoints) as gateway:
        watch, driver = start_load(gateway, "all-down", LOAD_SECONDS + 60)
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
