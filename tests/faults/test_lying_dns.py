"""A lying DNS server while discovery refreshes every second, under load.

The gateway finds a real 3-member cluster through SRV records served by tests/dnsserver.py and
refreshes them every second, while the server cycles through: forged replies (wrong ID, wrong
question, right answer from the wrong port, garbage), truncation (TC, full answer only on TCP),
duplicated records, silence, SERVFAIL, REFUSED, a record set that drops a member, a stale set
that brings it back, and one that adds a member that does not exist (a refusing port).

Invariants: no client failure (a client that retries once never fails; one-shot failures are
counted), no acknowledged put lost, the gateway keeps the last good set on every failed refresh,
ends with exactly the final record set, and leaks no descriptor (each refresh opens UDP/TCP
sockets) and does not spin.
"""
import json
import time
import urllib.request
import uuid

import pytest
from dnslib import RR

from dnsserver import DNSTestServer
from etcd_cluster import EtcdCluster
from faults.conftest import ProcessWatch, record_result, scaled
from faults.loadgen import LoadDriver
from faults.scenario import CLIENTS, sleep_until, warm_up
from support import Gateway, free_port, wait_until
from upstreams import RefusingPort

pytestmark = pytest.mark.faults

DOMAIN = "lie.test"
TTL = 1
PHASE_SECONDS = scaled(2.5, 8.0)


def zone(cluster, indices, duplicate=False, extra_ports=()):
    lines = [f"{DOMAIN}. {TTL} IN SOA ns.{DOMAIN}. admin.{DOMAIN}. 1 60 60 60 60"]
    entries = [(f"m{i}.{DOMAIN}", cluster.members[i].client_port) for i in indices]
    entries += [(f"ghost{n}.{DOMAIN}", port) for n, port in enumerate(extra_ports)]
    for name, port in entries:
        srv = f"_etcd-client._tcp.{DOMAIN}. {TTL} IN SRV 0 1 {port} {name}."
        lines += [srv, srv] if duplicate else [srv]
        lines.append(f"{name}. {TTL} IN A 127.0.0.1")
    return RR.fromZone("\n".join(lines))


def endpoints_seen(metrics_addr):
    with urllib.request.urlopen(f"http://{metrics_addr}/endpoints", timeout=5) as reply:
        return {entry["endpoint"] for entry in json.loads(reply.read())}


def test_lying_dns_under_load(tmp_path):
    with EtcdCluster(tmp_path / "etcd") as cluster, RefusingPort() as ghost, \
            DNSTestServer() as dns:
        dns.records = zone(cluster, range(3))
        phases = [
            ("spoof", "spoof", zone(cluster, range(3))),
            ("truncate", "truncate", zone(cluster, range(3))),
            ("duplicates", "normal", zone(cluster, range(3), duplicate=True)),
            ("silent", "silent", None),
            ("servfail", "servfail", None),
            ("drop member 2", "normal", zone(cluster, (0, 1))),
            ("stale set back", "normal", zone(cluster, range(3))),
            ("refused", "refused", None),
            ("ghost member", "spoof", zone(cluster, range(3), extra_ports=(ghost.port,))),
            ("final: members 1, 2", "normal", zone(cluster, (1, 2))),
        ]
        addr, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        host, port = dns.address
        with Gateway(["start", "--listen-addr", addr, "--discovery-srv", DOMAIN,
                      "--insecure-discovery", "--dns-server", f"{host}:{port}",
                      "--discovery-refresh", "1s", "--dial-timeout", "500ms",
                      "--retry-delay", "1s", "--metrics-addr", metrics]) as gateway:
            watch = ProcessWatch(gateway.pid)
            driver = LoadDriver(addr, f"/faults/dns/{uuid.uuid4().hex[:8]}", clients=CLIENTS,
                                duration=PHASE_SECONDS * (len(phases) + 2) + 30)
            driver.start()
            warm_up(driver)
            fault_at = time.monotonic()
            for index, (_name, mode, records) in enumerate(phases):
                if records is not None:
                    dns.records = records  # one assignment: the server thread sees old or new
                dns.mode = mode
                sleep_until(fault_at + (index + 1) * PHASE_SECONDS)
            final = {f"m{i}.{DOMAIN}:{cluster.members[i].client_port}" for i in (1, 2)}
            settled = wait_until(lambda: endpoints_seen(metrics) == final, timeout=10)
            sleep_until(time.monotonic() + PHASE_SECONDS)
            driver.stop()
            checked, checked_bytes, lost = driver.verify_acknowledged(addr)
            log = gateway.log.text()
            figures = driver.figures(fault_at)
            proc = watch.check()
            kept = log.count("keeping the last good set")
            changes = log.count("endpoints changed")
            row = record_result(dict(
                {"fault": "lying DNS, discovery refresh 1s",
                 "load": f"{CLIENTS} clients, conn per op; {len(phases)} DNS phases"},
                **figures, acked_checked=checked, bytes_checked=checked_bytes, lost=len(lost),
                refreshes_failed_kept_set=kept, endpoint_set_changes=changes,
                dns_queries=len(dns.seen()), **proc))
            context = "\n".join(driver.errors()) + "\n--- gateway log ---\n" + log[-5000:]
            assert settled, (endpoints_seen(metrics), final, context)
            assert not lost, lost[:10]
            assert row["failed_final"] == 0 and row["mismatches"] == 0, context
            assert kept > 0 and changes >= 2, context
            assert "Traceback" not in log, context
            watch.assert_clean(proc, context)
