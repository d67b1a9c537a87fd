"""Shared test support: start the gateway as a real process, wait for it, inspect it.

Every helper uses monotonic deadlines (no fixed sleeps) and stops only what it started, by PID.
The fixtures built on these (`echo`, `pyz`) are in conftest.py; the scripted upstreams are in
upstreams.py.
"""
import importlib.util
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gateway

ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"ready to proxy client requests to \[(.*)\]")
IO_TIMEOUT = 20.0  # per blocking socket call: only "did not hang"


def load_script(relative_path: str):
    """A script of the checkout (tools/, bench/: not packages) as a module. Its directory is on
    sys.path only while it loads (a script imports its siblings, as when run), not for the rest
    of the session, where its names could shadow others."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


build_pyz = load_script("tools/build_pyz.py")


def launcher_argv(launcher: str = "module"):
    """The command that starts the gateway: `python -m gateway`, the console script, or the .pyz."""
    if launcher == "module":
        return [sys.executable, "-m", "gateway"]
    if launcher == "script":
        return [str(Path(sys.executable).parent / "etcd-gateway")]
    if launcher == "pyz":
        pyz = ROOT / "dist" / "etcd-gateway.pyz"
        return [sys.executable, str(pyz)]
    raise ValueError(launcher)


def free_port(host="127.0.0.1", family=socket.AF_INET):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_loopback_available() -> bool:
    """True when this machine can bind ::1 (some CI containers have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---- client sockets -------------------------------------------------------------------------

def recv_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def ping(address, payload=b"ping", timeout=IO_TIMEOUT):
    """One request/response on a new connection, with no half-close involved: what came back."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes `sock` (EOF, reset or refusal) within `timeout`, ignoring data;
    False if it is still open then. `timeout=0` asks whether it is closed already."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (socket.timeout, BlockingIOError):
        return False
    except ConnectionError:
        return True


def read_until(stream, needle: bytes, timeout: float, data: bytes = b"") -> bytes:
    """Read a pipe until `needle` is in `data` + what was read, EOF, or the deadline."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while needle not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data


# ---- gateway processes ----------------------------------------------------------------------

class LineReader:
    """Collects a process's stderr lines in a thread so a test can wait for one."""

    def __init__(self, stream):
        self.lines = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream):
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # EOF marker
            self._cond.notify_all()

    def wait_for(self, pattern, timeout=20.0, start=0):
        """Return the first line at index >= start that matches `pattern` (regex), or None on EOF/timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    if line is None:
                        return None
                    if regex.search(line):
                        return line
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def text(self):
        with self._cond:
            return "\n".join(line for line in self.lines if line is not None)


class Gateway:
    """A gateway process started with `args`; `.port` is its listen port."""

    def __init__(self, args, launcher="module", env=None, wait_ready=True, preexec=None, cwd=None,
                 pass_fds=()):
        self.args = list(args)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            (preexec or []) + launcher_argv(launcher) + self.args,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=full_env, cwd=cwd or str(ROOT), pass_fds=pass_fds,
        )
        self.log = LineReader(self.proc.stderr)
        self.ready_line = None
        if wait_ready:
            self.ready_line = self.log.wait_for(READY_RE.pattern, timeout=30)
            if self.ready_line is None:
                self.stop()
                raise AssertionError("gateway did not become ready:\n" + self.log.text())

    @property
    def pid(self):
        return self.proc.pid

    def wait(self, timeout=30):
        return self.proc.wait(timeout=timeout)

    def signal(self, signum):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def gateway_cli(args, launcher="module", timeout=30, env=None):
    """Run the gateway to completion (for flag errors); returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(launcher_argv(launcher) + list(args), capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(ROOT), stdin=subprocess.DEVNULL)


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


IDLE_WINDOW = 1.0  # seconds: 100 clock ticks, enough to tell a sleeping process from a spinning one


def idle_cpu_share(pid, window: float = IDLE_WINDOW) -> float:
    """CPU seconds `pid` uses per wall second over `window` seconds in which the test sends it
    nothing: about 0 for a process asleep in select, about 1 for one that spins."""
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    time.sleep(window)  # the measuring window: what the process does while nothing happens
    return (cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before)


def wait_until(predicate, timeout=20.0, interval=0.02):
    """Poll `predicate` until it returns truthy or the deadline passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---- DNS lookups on the gateway's own driver -------------------------------------------------

RESOLVE_TIMEOUT = 20.0  # only "did not hang": the slowest lookup here takes about a second


def resolve(machine, timeout=RESOLVE_TIMEOUT):
    """Run `machine` (built with now=time.monotonic()) on gateway.DnsDriver and a fresh Reactor,
    as the gateway does; return its result or raise its DNSLookupError. The reactor is closed
    afterwards and the lookup cancelled if it did not finish within `timeout`."""
    reactor = gateway.Reactor()
    finished = []

    def on_done(done_machine):
        finished.append(done_machine)
        reactor.stop()

    driver = gateway.DnsDriver(reactor, machine, on_done)
    try:
        driver.start()
        if not finished:  # start() itself finishes what needs no query (a literal, /etc/hosts)
            reactor.call_later(timeout, reactor.stop)
            reactor.run()
        assert finished == [machine], f"{machine!r} unfinished after {timeout}s"
    finally:
        driver.cancel()
        reactor.close()
    if machine.error is not None:
        raise machine.error
    return machine.result


def health_of(pool, endpoint):
    """The pool's bookkeeping for `endpoint` (tests only: the gateway reads `pool.healths()`)."""
    return next(health for health in pool.healths() if health.endpoint.key == endpoint.key)


# -- the user's pipe budget ------------------------------------------------------------------------
# The kernel charges every pipe's size to its user (/proc/sys/fs/pipe-user-pages-soft) and, past
# the budget, makes new pipes two pages long and refuses to grow them; a process with
# CAP_SYS_RESOURCE or CAP_SYS_ADMIN is exempt. without_pipe_exemption() runs a command without
# those two (util-linux's setpriv: the user stays the same, so root's files stay readable, even
# in a chroot, where a user namespace cannot be made).

SPEND_PIPE_BUDGET = """
import fcntl, os, sys
held = []
while True:  # pipes of %d bytes while they last, then smaller ones until two pages
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    held.append((read_fd, write_fd))
    if fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ) <= 2 * os.sysconf("SC_PAGE_SIZE"):
        break
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, %d)
    except PermissionError:
        pass
    if len(held) > 100000:
        sys.exit("the pipe budget never ran out")
"""

HOLD_UNTIL_STDIN_CLOSES = """
print("spent", flush=True)
sys.stdin.read()
"""


def spend_pipe_budget_script(pipe_bytes: int, then: str = "") -> str:
    """A Python program that spends its user's pipe budget (holding the pipes in `held`), then
    runs `then`."""
    return SPEND_PIPE_BUDGET % (pipe_bytes, pipe_bytes) + then


def without_pipe_exemption(*argv):
    caps = "-sys_resource,-sys_admin"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]


def pipes_of(pid) -> int:
    """How many pipe descriptors process `pid` holds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except FileNotFoundError:
            pass  # closed meanwhile
    return count
