"""systemd integration: the sd_notify protocol the unit's Type=notify relies on, and the unit file.

systemd passes $NOTIFY_SOCKET (a unix datagram socket; a leading "@" means the abstract
namespace) and waits for READY=1 before it starts units ordered after ours; STOPPING=1 tells it
that the SIGTERM was seen and shutdown is under way. Here the test plays systemd's part.
"""
import os
import shlex
import shutil
import signal
import socket
import subprocess

import pytest

from support import ROOT, Gateway, free_port, gateway_cli

UNIT = ROOT / "contrib" / "etcd-gateway.service"
SOCKET_UNIT = ROOT / "contrib" / "etcd-gateway.socket"


def notify_socket(tmp_path, abstract):
    """Bind the datagram socket systemd would; return (socket, value for $NOTIFY_SOCKET)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = "etcd-gateway-test-{}-{}".format(os.getpid(), id(sock))
        sock.bind("\0" + name)
        value = "@" + name
    else:
        path = str(tmp_path / "notify")
        sock.bind(path)
        value = path
    sock.settimeout(30)
    return sock, value


def receive_until(sock, wanted):
    """Collect datagrams until one carries the assignment `wanted`; return all of them."""
    seen = []
    while True:
        datagram = sock.recv(4096).decode()  # socket.timeout fails the test with a clear error
        seen.append(datagram)
        if wanted in datagram.split("\n"):
            return seen


@pytest.mark.parametrize("launcher", ["module", "pyz"])
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_and_stopping_are_notified(request, tmp_path, echo, launcher, abstract):
    if launcher == "pyz":
        request.getfixturevalue("pyz")
    sock, value = notify_socket(tmp_path, abstract)
    with sock:
        listen_port = free_port()
        args = ["start", "--listen-addr=127.0.0.1:%d" % listen_port, "--endpoints=" + echo.endpoint]
        with Gateway(args, launcher=launcher, env={"NOTIFY_SOCKET": value}) as gateway:
            receive_until(sock, "READY=1")
            # READY=1 means clients can connect now. (The echo upstream passes the close on, so
            # the relay ends at once and shutdown need not wait for it.)
            socket.create_connection(("127.0.0.1", listen_port), timeout=10).close()
            gateway.signal(signal.SIGTERM)
            receive_until(sock, "STOPPING=1")
            assert gateway.wait() == 0, gateway.log.text()


def test_without_notify_socket_nothing_breaks(echo):
    env = {"NOTIFY_SOCKET": ""}
    args = ["start", "--listen-addr=127.0.0.1:%d" % free_port(), "--endpoints=" + echo.endpoint]
    with Gateway(args, env=env) as gateway:
        gateway.signal(signal.SIGTERM)
        assert gateway.wait() == 0, gateway.log.text()


# ---------------------------------------------------------------------------------------------
# The unit file

def unit_settings(path=UNIT):
    """[section] -> {key: [values]} with backslash continuations joined, as systemd reads it."""
    sections, section, pending = {}, None, ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_is_notify_and_hardened():
    service = unit_settings()["Service"]
    expected = {"Type": "notify", "Restart": "on-failure", "DynamicUser": "yes",
                "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                "PrivateTmp": "yes", "LimitNOFILE": "65536"}
    for key, value in expected.items():
        assert service.get(key) == [value], key
    assert "WantedBy" in unit_settings()["Install"]


def test_unit_execstart_runs_the_pyz_with_valid_flags():
    argv = shlex.split(unit_settings()["Service"]["ExecStart"][0])
    assert argv[:3] == ["/usr/bin/python3", "/usr/local/lib/etcd-gateway.pyz", "start"]
    assert "--listen-addr=127.0.0.1:23790" in argv
    assert any(arg.startswith("--endpoints=") for arg in argv)
    # Every flag of the unit is one the gateway's parser knows (checked without starting it).
    usage = gateway_cli(["start", "--help"]).stdout
    for arg in argv[3:]:
        assert arg.split("=", 1)[0] in usage, arg


def test_unit_reload_is_the_live_handover():
    service = unit_settings()["Service"]
    assert service["ExecReload"] == ["/bin/kill -USR2 $MAINPID"]
    # The old process sends MAINPID= while it is the main process; the new one stays silent
    # until it is: no need to let every process of the unit speak.
    assert service["NotifyAccess"] == ["main"]


def test_socket_unit_passes_the_proxy_port_of_the_service():
    socket_unit = unit_settings(SOCKET_UNIT)
    execstart = shlex.split(unit_settings()["Service"]["ExecStart"][0])
    assert "--listen-addr=" + socket_unit["Socket"]["ListenStream"][0] in execstart
    assert socket_unit["Socket"]["FileDescriptorName"] == ["proxy"]
    assert socket_unit["Install"]["WantedBy"] == ["sockets.target"]


@pytest.mark.parametrize("units", [[UNIT], [SOCKET_UNIT, UNIT]], ids=["service", "service+socket"])
def test_units_pass_systemd_analyze_verify(tmp_path, units):
    """systemd's own check, for the service alone and with the socket unit (systemd need not be
    running: CI installs the systemd package for systemd-analyze)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install systemd"
    for unit in units:
        shutil.copy(unit, tmp_path / unit.name)
    result = subprocess.run([analyze, "verify"] + [str(tmp_path / unit.name) for unit in units],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stdout + result.stderr
