"""The kit the load-under-fault scenarios share: a module's etcd cluster, healed around every
test, our gateway in front of it, and LoadDriver clients started, warmed up and checked the same
way in every scenario (the invariants are listed in test_members.py).

Import the `cluster` and `healed` fixtures into a test module to use them there (`healed` is
autouse); they are not in conftest.py because the fuzz and soak tests need no cluster.
"""
import random
import time
import uuid

import pytest

from etcd_cluster import EtcdCluster
from faults.conftest import ProcessWatch, record_result, scaled
from faults.loadgen import LoadDriver
from support import Gateway, free_port, wait_until

DIAL_TIMEOUT = 0.5
HEALTH_INTERVAL = 1.0
LOAD_SECONDS = scaled(8.0, 60.0)
FAULT_AT = scaled(2.0, 10.0)          # seconds of steady load before the fault
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


def gateway_for(endpoints, listen_host="127.0.0.1", preexec=None, extra=()):
    addr = f"{listen_host}:{free_port() if listen_host == '127.0.0.1' else random.randint(20000, 60000)}"
    gateway = Gateway(["start", "--endpoints", ",".join(endpoints), "--listen-addr", addr,
                       "--dial-timeout", f"{int(DIAL_TIMEOUT * 1000)}ms", "--retry-delay", "1s",
                       *extra], preexec=preexec)
    gateway.addr = addr
    return gateway


def start_load(gateway, name, duration, warm_up_timeout=20.0, **driver_options):
    """Take the gateway's baseline figures, then start CLIENTS clients under a fresh
    /faults/<name>/ prefix and wait until the load got going; returns (watch, driver)."""
    watch = ProcessWatch(gateway.pid)
    driver = LoadDriver(gateway.addr, f"/faults/{name}/{uuid.uuid4().hex[:8]}", clients=CLIENTS,
                        duration=duration, **driver_options)
    driver.start()
    warm_up(driver, timeout=warm_up_timeout)
    return watch, driver


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
    etcd_answered = sum(1 for op in driver.ops if not op.ok and (op.error or "").startswith("etcd:"))
    row = record_result(dict({"fault": name, "load": load}, **figures, acked_checked=checked,
                             etcd_errors_final=etcd_answered,
                             bytes_checked=checked_bytes, lost=len(lost), **proc, notes=notes))
    context = "\n".join(driver.errors()) + "\n--- gateway log ---\n" + gateway.log.text()[-4000:]
    assert not lost, f"acknowledged puts lost: {lost[:10]}\n{context}"
    assert row["mismatches"] == 0, context
    late_conn = [op for op in driver.ops if op.first_kind == "conn"
                 and op.started > fault_at + recover_bound]
    assert not late_conn, (f"path failures later than {recover_bound}s after the fault:\n"
                           + "\n".join(driver.errors()) + context)
    if not expect_final_failures:
        # An answer from etcd itself ("etcdserver: leader changed" during an election) proves the
        # path through the gateway worked; only failures to get any answer count against it.
        final = [op for op in driver.ops if not op.ok
                 and not (op.error or "").startswith("etcd:")]
        assert not final, f"a client that retries once failed {len(final)} times:\n{context}"
    watch.assert_clean(proc, context)
    return row
