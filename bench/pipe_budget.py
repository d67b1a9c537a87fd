"""Bulk through a gateway whose user's pipe budget is spent, against the same with the budget free.

    python3 bench/pipe_budget.py [--rounds 3] [--baseline ../old-checkout] 2> bench/runs/DATE-pipe-budget.log

The kernel charges every pipe's size to its user (/proc/sys/fs/pipe-user-pages-soft, 64 MiB by
default) and past that budget makes new pipes two pages long and refuses to grow them; a process
with CAP_SYS_RESOURCE or CAP_SYS_ADMIN is exempt. Every proxy here runs without those two
(util-linux's setpriv), so a non-root gateway is what is measured, and a holder process of the
same user spends the budget for the "spent" loads. One iperf3 stream each way per load (core 0),
the proxy alone on core 1; printed per load: Gbit/s, the proxy's CPU per MB, and how many pipes
the proxy held in the middle of the load.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]
import run as bench  # noqa: E402  (bench/run.py: ports, CPU time, the Go gateway's binary)
from support import (HOLD_UNTIL_STDIN_CLOSES, pipes_of, spend_pipe_budget_script,  # noqa: E402
                     without_pipe_exemption)

PIPE_BYTES = 256 * 1024


def proxy_argv(name: str, listen: int, backend: int, etcdbin: Path, baseline: Path) -> list:
    flags = [f"--listen-addr=127.0.0.1:{listen}", f"--endpoints=127.0.0.1:{backend}"]
    if name == "go":
        return [str(etcdbin / "etcd"), "gateway", "start", *flags]
    tree = baseline if name == "ours-base" else HERE.parent
    return [sys.executable, str(tree / "gateway.py"), "start", *flags]


def load(proxy: subprocess.Popen, port: int, reverse: bool, seconds: int) -> dict:
    before = bench.cpu_seconds(proxy.pid)
    client = subprocess.Popen(["taskset", "-c", "0", "iperf3", "-c", "127.0.0.1", "-p", str(port),
                               "-t", str(seconds), "-J"] + (["-R"] if reverse else []),
                              stdout=subprocess.PIPE, text=True)
    time.sleep(seconds / 2)
    pipes = pipes_of(proxy.pid)
    out, _ = client.communicate(timeout=seconds + 30)
    received = json.loads(out)["end"]["sum_received"]
    megabytes = received["bytes"] / 1e6
    return {"gbps": received["bits_per_second"] / 1e9, "pipes": pipes,
            "cpu_us": (bench.cpu_seconds(proxy.pid) - before) * 1e6 / megabytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout whose gateway runs as ours-base")
    args = parser.parse_args()
    proxies = ["go", "ours"] + (["ours-base"] if args.baseline else [])
    etcdbin = bench.find_etcdbin(None)
    backend = bench.free_port()
    server = subprocess.Popen(["taskset", "-c", "0", "iperf3", "-s", "-B", "127.0.0.1", "-p", str(backend)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder = None
    try:
        for budget in ("free", "spent"):
            if budget == "spent":
                spend = spend_pipe_budget_script(PIPE_BYTES, HOLD_UNTIL_STDIN_CLOSES)
                holder = subprocess.Popen(without_pipe_exemption(sys.executable, "-c", spend),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert holder.stdout.readline() == "spent\n"
            for rnd in range(args.rounds):
                for name in proxies[rnd % len(proxies):] + proxies[:rnd % len(proxies)]:
                    run_proxy(name, budget, rnd, args, etcdbin, backend)
    finally:
        for proc in (holder, server):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=30)
    return 0


def run_proxy(name, budget, rnd, args, etcdbin, backend):
    port = bench.free_port()
    argv = without_pipe_exemption(*proxy_argv(name, port, backend, etcdbin, args.baseline))
    proxy = subprocess.Popen(["taskset", "-c", "1"] + argv,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.poll(lambda: bench.tcp_sockets(port, "0A") > 0, 30, f"{name} to listen")
        for reverse in (False, True):
            bench.poll(lambda: bench.tcp_sockets(backend, "01") == 0, 30, "iperf3 to be idle")
            time.sleep(0.2)
            figures = load(proxy, port, reverse, args.seconds)
            print(f"[round {rnd + 1}/{args.rounds}] budget {budget} {'down' if reverse else 'up':<4} "
                  f"{name:<9} {figures['gbps']:6.2f} Gbit/s cpu {figures['cpu_us']:7.1f} µs/MB "
                  f"pipes {figures['pipes']}", file=sys.stderr, flush=True)
    finally:
        proxy.kill()
        proxy.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
