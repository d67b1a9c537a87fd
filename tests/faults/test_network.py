"""Network faults between the gateway and the members.

* A bad path (this kernel has no `tc netem`): every member sits behind tests/faults/relay.py
  adding 75 ms +/- 50 ms per chunk and "10 % loss" (a lost chunk stalls its direction 200 ms,
  as a TCP retransmission does). Load must see no failure; echo streams through the gateway and
  the same relay must arrive whole and in order. The relay stalls bytes of connections it has
  already accepted, so it never loses a SYN: IP-level loss, SYNs included, is in
  test_lossy_link.py (tests/faults/tunlink.py).
* A member cut off: the gateway runs inside a network namespace the test creates (veth pair),
  reaching the members through plain relays on the host end; `iptables` inside the namespace
  then DROPs (blackhole) or REJECTs with a reset (cut off loudly) the member in use, and removes
  the rule again. The host's firewall is never touched.
"""
import contextlib
import hashlib
import random
import socket
import threading
import time

import pytest

from faults.conftest import record_result, scaled
from faults.netns import NetNS, available
from faults.relay import RelayProcess
from faults.scenario import (CLIENTS, DIAL_TIMEOUT, FAULT_AT, HEALTH_INTERVAL,  # noqa: F401
                             finish, gateway_for, healed, member_in_use, sleep_until,
                             start_load)
from upstreams import EchoServer

pytestmark = pytest.mark.faults

BAD_PATH = {"delay": 0.075, "jitter": 0.05, "loss": 0.10, "loss_stall": 0.2}
ECHO_STREAMS = scaled(8, 40)
ECHO_BYTES = scaled(256 * 1024, 1 << 20)


def echo_stream(addr, size, seed):
    """Send `size` random bytes in random chunks, half-close, read the echo; True if it matches."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sender = threading.Thread(target=_send_chunks, args=(sock, data, rng), daemon=True)
        sender.start()
        digest, received = hashlib.sha256(), 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        sender.join(30)
    return received == size and digest.digest() == hashlib.sha256(data).digest(), received


def _send_chunks(sock, data, rng):
    offset = 0
    while offset < len(data):
        size = rng.choice((1, 7, 512, 4096, 65536, 300000))
        sock.sendall(data[offset:offset + size])
        offset += size
    sock.shutdown(socket.SHUT_WR)


def test_bad_path_delay_and_loss(cluster):
    load_seconds = scaled(10.0, 60.0)
    with contextlib.ExitStack() as stack:
        relays = [stack.enter_context(RelayProcess(m.client_addr, seed=i, **BAD_PATH))
                  for i, m in enumerate(cluster.members)]
        gateway = stack.enter_context(gateway_for([r.endpoint for r in relays]))
        watch, driver = start_load(gateway, "badpath", load_seconds, warm_up_timeout=30,
                                   op_timeout=5.0)
        sleep_until(driver.started + load_seconds)
        driver.stop()
        checked, checked_bytes, lost = driver.verify_acknowledged(gateway.addr)
        # Byte streams through the same gateway and a bad-path relay to an echo upstream.
        echo = stack.enter_context(EchoServer())
        echo_relay = stack.enter_context(RelayProcess(echo.endpoint, seed=9, **BAD_PATH))
        echo_gateway = stack.enter_context(gateway_for([echo_relay.endpoint]))
        results = [echo_stream(echo_gateway.addr, ECHO_BYTES, seed) for seed in range(ECHO_STREAMS)]
        stats = [r.stop() for r in relays + [echo_relay]]
        figures = driver.figures()
        proc = watch.check()
        row = record_result(dict(
            {"fault": "delay 75+/-50ms, 10% loss (user-space relay)",
             "load": f"{CLIENTS} clients, conn per op; {ECHO_STREAMS} echo streams"},
            **figures, acked_checked=checked, bytes_checked=checked_bytes + sum(n for _, n in results),
            lost=len(lost), echo_mismatches=sum(1 for ok, _ in results if not ok),
            relay_stalls=sum(s["stalls"] for s in stats if s), **proc,
            notes="loss emulated as a 200 ms stall of the direction (a TCP retransmission)"))
        context = "\n".join(driver.errors()) + "\n" + gateway.log.text()[-3000:]
        assert not lost, lost[:10]
        assert row["failed_final"] == 0 and row["mismatches"] == 0, context
        assert all(ok for ok, _ in results), results
        watch.assert_clean(proc, context)


@pytest.mark.parametrize("rule", ["DROP", "REJECT"], ids=["blackhole-drop", "cut-off-reset"])
def test_member_in_use_cut_off_in_netns(cluster, rule):
    reason = available()
    assert reason is None, reason  # a missing tool is a CI set-up bug, never a skip
    hold = scaled(4.0, 20.0)
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(NetNS())
        relays = [stack.enter_context(RelayProcess(m.client_addr, listen=f"{ns.host_ip}:0"))
                  for m in cluster.members]
        gateway = stack.enter_context(gateway_for(
            [r.endpoint for r in relays], listen_host=ns.ns_ip, preexec=ns.exec_prefix(),
            extra=("--health-check", "etcd", "--health-interval", f"{int(HEALTH_INTERVAL)}s")))
        watch, driver = start_load(gateway, f"netns-{rule}", scaled(8.0, 60.0) + hold + 30,
                                   op_timeout=3.0)
        sleep_until(driver.started + FAULT_AT)
        victim = member_in_use(cluster, driver, driver.started)
        cluster.move_leader((victim + 1) % 3)
        port = str(relays[victim].port)
        target = ["-j", rule] + (["--reject-with", "tcp-reset"] if rule == "REJECT" else [])
        rules = [["OUTPUT", "-p", "tcp", "-d", ns.host_ip, "--dport", port, *target],
                 ["INPUT", "-p", "tcp", "-s", ns.host_ip, "--sport", port, *target]]
        fault_at = time.monotonic()
        for spec in rules:
            ns.iptables("-I", *spec)
        sleep_until(fault_at + hold)
        for spec in rules:
            ns.iptables("-D", *spec)
        # DROP: in-flight requests hang until the health check (3 x 1s) closes their connections
        # or the client's 3 s op timeout; new connections dial past it within the dial timeout.
        bound = 2 * DIAL_TIMEOUT if rule == "REJECT" else 2 * DIAL_TIMEOUT + 3.0
        victim_id = cluster.members[victim].id
        during = [op for op in driver.ops if fault_at + hold / 2 < op.started < fault_at + hold]
        assert during and all(op.member_id != victim_id for op in during if op.ok), (
            "the rule did not take the member in use out of service")
        finish(f"iptables {rule} member in use {hold:.0f}s (netns)", cluster, gateway, driver,
               watch, fault_at, f"{CLIENTS} clients, conn per op, via veth", recover_bound=bound,
               notes="rule on the relay port, inside the namespace")
