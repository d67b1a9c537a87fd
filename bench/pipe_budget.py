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
import gateway  # noqa: E402
import run as bench  # noqa: E402  (bench/run.py: proxies' command lines, ports, CPU time)
from support import (HOLD_UNTIL_STDIN_CLOSES, pipes_of, spend_pipe_budget_script,  # noqa: E402
                     without_pipe_exemption)


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
    settings = bench.Settings(rounds=args.rounds, load_seconds=args.seconds, idle_conns=0,
                              proxy_nofile=0, python=sys.executable, etcdbin=bench.find_etcdbin(None),
                              workloads=[], baseline=args.baseline)
    backend = bench.free_port()
    server = subprocess.Popen(["taskset", "-c", "0", "iperf3", "-s", "-B", "127.0.0.1", "-p", str(backend)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder = None
    try:
        for budget in ("free", "spent"):
            if budget == "spent":
                spend = spend_pipe_budget_script(gateway.SPLICE_PIPE_BYTES, HOLD_UNTIL_STDIN_CLOSES)
                holder = subprocess.Popen(without_pipe_exemption(sys.executable, "-c", spend),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert holder.stdout.readline() == "spent\n"
            for rnd in range(args.rounds):
                for name in proxies[rnd % len(proxies):] + proxies[:rnd % len(proxies)]:
                    run_proxy(name, budget, rnd, settings, backend)
    finally:
        for proc in (holder, server):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=30)
    return 0


def run_proxy(name, budget, rnd, settings, backend):
    port = bench.free_port()
    argv = without_pipe_exemption(*bench.proxy_argv(name, port, backend, settings, HERE))
    cwd = settings.baseline if name == "ours-base" else HERE.parent
    proxy = subprocess.Popen(["taskset", "-c", "1"] + argv, cwd=str(cwd),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.poll(lambda: bench.tcp_sockets(port, "0A") > 0, 30, f"{name} to listen")
        for reverse in (False, True):
            bench.wait_iperf3_idle(backend)
            figures = load(proxy, port, reverse, settings.load_seconds)
            print(f"[round {rnd + 1}/{settings.rounds}] budget {budget} {'down' if reverse else 'up':<4} "
                  f"{name:<9} {figures['gbps']:6.2f} Gbit/s cpu {figures['cpu_us']:7.1f} µs/MB "
                  f"pipes {figures['pipes']}", file=sys.stderr, flush=True)
    finally:
        proxy.kill()
        proxy.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
