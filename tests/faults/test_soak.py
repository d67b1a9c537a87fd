"""Soak: many short connections (some resetting, some half-closing first) and 1,000 long-lived
ones through the gateway to a loopback echo upstream, sized by time.

Short connections come from worker processes (so the test's own GIL is not the bottleneck), each
running a few threads: connect, send a unique line, then one of
  * "close":      read the echo, close;
  * "half-close": shutdown(SHUT_WR), read the echo until EOF (the half-close must pass through);
  * "reset":      close with SO_LINGER 0 right after sending (the gateway must pass on a reset).
Every echo of the first two kinds must match. The long-lived connections echo a line at the start
and at the end, then half-close. The soak runs in two rounds: descriptors must return to the
baseline after each, and RSS must not grow from round 1 to round 2 (growth that repeats is a leak;
the first round's is the allocator warming up).
"""
import multiprocessing
import os
import random
import socket
import struct
import threading
import time

import pytest

from faults.conftest import ProcessWatch, record_result, scaled
from support import Gateway, free_port, rss_bytes, wait_until
from upstreams import EchoServer

pytestmark = pytest.mark.faults

ROUND_SECONDS = scaled(12.0, 30.0)
ROUNDS = 2
WORKERS = 2
THREADS_PER_WORKER = 4
LONG_LIVED = 1000
RSS_GROWTH_LIMIT = 8 << 20   # between rounds


def _short_connections(addr, seconds, seed, results):
    """One worker thread: short connections until the deadline; counts into `results`."""
    host, port = addr.rsplit(":", 1)
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    counts = {"close": 0, "half-close": 0, "reset": 0, "mismatch": 0, "error": 0}
    n = 0
    while time.monotonic() < deadline:
        kind = rng.choices(("close", "half-close", "reset"), (6, 3, 1))[0]
        line = f"{seed}-{n}-{kind}\n".encode()
        n += 1
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(line)
            if kind == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                counts[kind] += 1
                continue
            if kind == "half-close":
                sock.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < len(line) or kind == "half-close":
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
            sock.close()
            counts[kind if got == line else "mismatch"] += 1
        except OSError:
            counts["error"] += 1
    results.put(counts)


def _worker(addr, seconds, seed, results):
    threads = [threading.Thread(target=_short_connections, args=(addr, seconds, seed * 100 + i,
                                                                  results))
               for i in range(THREADS_PER_WORKER)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)


def run_round(addr, seconds, seed):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(addr, seconds, seed * 10 + w, results))
             for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    totals = {}
    for _ in range(WORKERS * THREADS_PER_WORKER):
        for key, value in results.get(timeout=seconds + 120).items():
            totals[key] = totals.get(key, 0) + value
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0, proc.exitcode
    return totals


def fd_kinds(pid):
    kinds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = os.readlink(f"/proc/{pid}/fd/{fd}").split(":")[0]
        except OSError:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def open_long_lived(addr, count):
    host, port = addr.rsplit(":", 1)
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=10)
        socks.append(sock)
    return socks


def echo_check(sock, line):
    sock.sendall(line)
    got = b""
    while len(got) < len(line):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got == line


def test_soak_short_and_long_lived_connections():
    with EchoServer() as echo:
        addr = f"127.0.0.1:{free_port()}"
        with Gateway(["start", "--endpoints", echo.endpoint, "--listen-addr", addr]) as gateway:
            watch = ProcessWatch(gateway.pid)
            base_sockets = fd_kinds(gateway.pid).get("socket", 0)
            started = time.monotonic()
            long_lived = open_long_lived(addr, LONG_LIVED)
            long_ok = sum(echo_check(s, f"long-{i}-a\n".encode()) for i, s in enumerate(long_lived))
            totals, rss_after = {}, []
            for round_index in range(ROUNDS):
                counts = run_round(addr, ROUND_SECONDS, round_index + 1)
                for key, value in counts.items():
                    totals[key] = totals.get(key, 0) + value
                if round_index == ROUNDS - 1:
                    for i, sock in enumerate(long_lived):
                        long_ok += echo_check(sock, f"long-{i}-b\n".encode())
                        sock.shutdown(socket.SHUT_WR)
                        long_ok += sock.recv(16) == b""  # the upstream's half-close came through
                        sock.close()
                wait_until(lambda r=round_index: echo.open_count <= (0 if r == ROUNDS - 1
                                                       else LONG_LIVED), timeout=30)
                # While relays are open the gateway may keep a few idle splice pipes (PipePool),
                # so mid-soak only sockets are counted; at the end every descriptor is.
                if round_index == ROUNDS - 1:
                    fds_back = wait_until(lambda: watch.fds() <= watch.baseline_fds, timeout=30)
                else:
                    fds_back = wait_until(lambda: fd_kinds(gateway.pid).get("socket", 0)
                                          <= base_sockets + 2 * LONG_LIVED, timeout=30)
                assert fds_back, (f"descriptors did not return after round {round_index + 1}: "
                                  f"{fd_kinds(gateway.pid)}, baseline {watch.baseline_fds}")
                rss_after.append(rss_bytes(gateway.pid))
            elapsed = time.monotonic() - started
            short = totals["close"] + totals["half-close"] + totals["reset"]
            proc = watch.check()
            row = record_result(dict(
                {"fault": "soak: short + 1,000 long-lived connections",
                 "load": f"{WORKERS}x{THREADS_PER_WORKER} client threads, {ROUNDS}x{ROUND_SECONDS:.0f}s"},
                ops=short + totals["mismatch"] + totals["error"], failed_first=totals["error"],
                failed_final=totals["error"] + totals["mismatch"], mismatches=totals["mismatch"],
                short_connections=short, resets=totals["reset"], half_closes=totals["half-close"],
                rate_per_s=round(short / (ROUNDS * ROUND_SECONDS)), long_lived_ok=long_ok,
                rss_round1_kib=rss_after[0] // 1024, rss_round2_kib=rss_after[-1] // 1024,
                duration_s=round(elapsed, 1), **proc))
            assert totals["mismatch"] == 0 and totals["error"] == 0, totals
            assert long_ok == 3 * LONG_LIVED, long_ok
            assert rss_after[-1] - rss_after[0] < RSS_GROWTH_LIMIT, rss_after
            watch.assert_clean(proc, gateway.log.text()[-3000:])
            assert row["short_connections"] > 0
