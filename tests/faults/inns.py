"""Small programs a test runs inside a network namespace (a thread cannot change its namespace
without ctypes, a process started with `ip netns exec` can).

    ip netns exec NS python tests/faults/inns.py echo HOST COUNT
        COUNT tests/upstreams.py EchoServers bound to HOST; prints `endpoints E1,E2,...` once they
        listen, serves until SIGTERM or SIGINT, then prints `served {json}` and exits.
    ip netns exec NS python tests/faults/inns.py connect HOST:PORT COUNT CONCURRENCY TIMEOUT
        COUNT TCP connects, CONCURRENCY at a time, each bounded by TIMEOUT seconds; prints
        `connects {json}`: one latency in seconds per connect, null for a failed one.

`InNamespace` is the test-side handle of the echo form: it waits for the endpoints line and
stops the process by PID.
"""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def serve_echo(host: str, count: int) -> int:
    sys.path.insert(0, str(TESTS))
    from upstreams import EchoServer

    servers = [EchoServer(host=host) for _ in range(count)]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print("endpoints " + ",".join(server.endpoint for server in servers), flush=True)
    while not stop.wait(3600):  # the signal handler sets it; the main thread only waits
        pass
    served = [server.served for server in servers]
    for server in servers:
        server.close()
    print("served " + json.dumps(served), flush=True)
    return 0


def measure_connects(addr: str, count: int, concurrency: int, timeout: float) -> int:
    host, port = addr.rsplit(":", 1)
    latencies = [None] * count
    indexes = iter(range(count))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                index = next(indexes, None)
            if index is None:
                return
            started = time.monotonic()
            try:
                with socket.create_connection((host, int(port)), timeout=timeout):
                    latencies[index] = time.monotonic() - started
            except OSError:
                pass

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * count)  # each connect is bounded by `timeout`
    print("connects " + json.dumps(latencies), flush=True)
    return 0


def main(argv) -> int:
    if argv[:1] == ["echo"]:
        return serve_echo(argv[1], int(argv[2]))
    if argv[:1] == ["connect"]:
        return measure_connects(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


class InNamespace:
    """`inns.py echo` run with `exec_prefix`; `.endpoints` lists where its servers listen."""

    def __init__(self, exec_prefix, host: str, count: int = 1):
        self.proc = subprocess.Popen(
            list(exec_prefix) + [sys.executable, __file__, "echo", host, str(count)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # printed once every server listens, or the process died
        self.served = None
        if not line.startswith("endpoints "):
            self.stop()
            raise RuntimeError(f"echo servers did not start: {line!r} {self.proc.stderr.read()}")
        self.endpoints = line.split()[1].split(",")
        self.served = None

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, timeout: float = 15.0):
        # Imported here: this file also runs as a script in the namespace, without the package.
        from faults.relay import stop_and_read_report

        self.served = stop_and_read_report(self.proc, "served ", timeout) or self.served
        return self.served

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
