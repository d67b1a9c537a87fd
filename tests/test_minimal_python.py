"""The single file runs where only Debian's python3-minimal is installed (no json, no http).

A cached Debian minbase root (see minimal_root.py) runs dist/etcd-gateway.pyz under chroot,
sharing our network namespace: the gateway must start, proxy a round trip to an echo upstream
in this test process, serve /health and /metrics on --metrics-addr, and exit 0 at SIGTERM.
The same is checked on the host with `python3 -I -S` (no site, no environment, no user paths).

These tests fail, never skip, when the root cannot be built: CI installs debootstrap.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import pytest

import minimal_root
from support import READY_RE, LineReader, free_port, wait_until

# A cold debootstrap downloads ~40 MB; this is a "did not hang" limit, not an expectation.
pytestmark = pytest.mark.timeout(minimal_root.BUILD_TIMEOUT + 300)


@pytest.fixture(scope="module")
def root():
    return minimal_root.ensure_root()


@pytest.fixture
def pyz_in_root(root, pyz):
    """The archive copied into the root's /tmp under a unique name; its path inside the root."""
    inside = "/tmp/etcd-gateway-{}.pyz".format(uuid.uuid4().hex)
    shutil.copy(str(pyz), str(root) + inside)
    yield inside
    os.unlink(str(root) + inside)


class Process:
    """A gateway started from an arbitrary argv; stops only its own PID."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env)
        self.log = LineReader(self.proc.stderr)

    def wait_ready(self):
        line = self.log.wait_for(READY_RE.pattern, timeout=30)
        assert line is not None, "gateway did not become ready:\n" + self.log.text()
        return line

    def terminate_and_wait(self, timeout=30):
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc.stderr.close()


def round_trip(port, payload):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        for chunk in iter(lambda: sock.recv(65536), b""):
            received += chunk
    return received


def http_get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def gateway_args(echo_port, listen_port, metrics_port, extra=()):
    return ["start", "--listen-addr=127.0.0.1:%d" % listen_port,
            "--endpoints=127.0.0.1:%d" % echo_port, "--metrics-addr=127.0.0.1:%d" % metrics_port,
            "--log-level=debug"] + list(extra)


METRIC_LINE_RE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eEIinfNa]+$')


def check_metrics_and_health(metrics_port):
    # /health answers like etcd's own /health once the (only) endpoint is known to be up.
    def healthy():
        status, _, body = http_get(metrics_port, "/health")
        return body if status == 200 else None
    body = wait_until(healthy, timeout=20)
    assert body is not None, http_get(metrics_port, "/health")
    assert json.loads(body) == {"health": "true"}

    status, content_type, body = http_get(metrics_port, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain"), content_type
    samples = {}
    for line in body.splitlines():
        if line.startswith("#") or not line:
            continue
        assert METRIC_LINE_RE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples.get("etcd_gateway_connections_total", 0) >= 1, body
    assert "# TYPE etcd_gateway_connections_total counter" in body
    assert any(name.startswith("etcd_gateway_bytes_total") and value > 0
               for name, value in samples.items()), body
    assert samples.get("process_open_fds", 0) > 0, body


def run_gateway_checks(argv, env, echo, listen_port, metrics_port):
    gateway = Process(argv, env)
    try:
        ready = gateway.wait_ready()
        assert "127.0.0.1:%d" % echo.port in ready
        payload = b"hello from a host with only python3-minimal\n" * 100
        assert round_trip(listen_port, payload) == payload
        assert echo.accepted >= 1
        if metrics_port:
            check_metrics_and_health(metrics_port)
        assert gateway.terminate_and_wait() == 0, gateway.log.text()
        assert gateway.log.wait_for(r"\bstopped\b", timeout=5) is not None, gateway.log.text()
        assert "Traceback" not in gateway.log.text(), gateway.log.text()
        return gateway.log.text()
    finally:
        gateway.kill()


# ---------------------------------------------------------------------------------------------

@pytest.mark.root  # debootstrap and chroot
def test_minimal_root_really_lacks_json_and_http(root):
    # If Debian ever ships these in python3-minimal, the tests below would prove nothing.
    assert sorted(minimal_root.missing_modules(root, ["json", "http", "socket", "selectors"])) == [
        "http", "json"]


@pytest.mark.root  # debootstrap and chroot
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_pyz_in_python3_minimal_root(root, pyz_in_root, echo, log_format):
    listen_port, metrics_port = free_port(), free_port()
    argv = minimal_root.chroot_argv(root, ["/usr/bin/python3", pyz_in_root] + gateway_args(
        echo.port, listen_port, metrics_port, ["--log-format=" + log_format]))
    log = run_gateway_checks(argv, minimal_root.CHROOT_ENV, echo, listen_port, metrics_port)
    if log_format == "json":
        # The gateway writes JSON without the json module (python3-minimal has none): parse it here.
        records = [json.loads(line) for line in log.splitlines()]
        assert {"level", "ts", "msg"} <= set(records[0])
        assert any(record["msg"] == "stopped" for record in records)


def test_pyz_isolated_on_host(pyz, echo):
    listen_port, metrics_port = free_port(), free_port()
    argv = [sys.executable, "-I", "-S", str(pyz)] + gateway_args(echo.port, listen_port, metrics_port)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    run_gateway_checks(argv, env, echo, listen_port, metrics_port)


def test_apt_mirror_is_read_from_both_sources_formats(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://proxy.example:3142/debian bookworm-updates main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert minimal_root.apt_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    assert minimal_root.apt_mirror("bookworm-updates", tmp_path) == "http://proxy.example:3142/debian"
    assert minimal_root.apt_mirror("trixie", tmp_path) == minimal_root.FALLBACK_MIRROR
