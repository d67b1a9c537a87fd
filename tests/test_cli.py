"""The command line as an operator meets it: exit codes, one-line errors, the ready line.

Every test runs once per launcher (`python -m gateway`, the `etcd-gateway` console script, ...):
they all call the same `main()`, and this is where we check that they really behave the same.
Bad flags exit 2 with usage; bad configuration exits 1 with exactly one line and never a traceback.
"""
import importlib.util
import json
import socket

import pytest

from support import ROOT, Gateway, free_port, gateway_cli, ipv6_loopback_available
from upstreams import EchoServer

# Every way of starting the gateway: `python -m gateway`, the console script, the single file.
LAUNCHERS = ["module", "script", "pyz"]


@pytest.fixture(scope="session")
def built_pyz():
    """dist/ is not in git: build the single file once per session before the pyz launcher runs."""
    spec = importlib.util.spec_from_file_location("build_pyz", str(ROOT / "tools" / "build_pyz.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


@pytest.fixture(params=LAUNCHERS)
def launcher(request):
    if request.param == "pyz":
        request.getfixturevalue("built_pyz")
    return request.param


def assert_usage_error(result):
    assert result.returncode == 2, result.stderr
    assert "usage" in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def assert_config_error(result, *fragments):
    """Exit 1 with exactly one line on stderr that mentions every fragment."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def listen_flag():
    return f"--listen-addr=127.0.0.1:{free_port()}"


def exchange_once(port, payload=b"via the cli test"):
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            data = sock.recv(4096)
            if not data:
                return received
            received += data


# -- exit 2: the command line itself is wrong ---------------------------------------------------

@pytest.mark.parametrize("args", [
    ["start", "--no-such-flag"],
    ["start", "--no-such-flag=1", "--endpoints=127.0.0.1:2379"],
    ["no-such-command"],
], ids=["bare", "with-value", "command"])
def test_unknown_flag_or_command_exits_2_with_usage(launcher, args):
    assert_usage_error(gateway_cli(args, launcher=launcher))


@pytest.mark.parametrize("flag", ["--retry-delay=5x", "--retry-delay=10", "--dial-timeout=fast",
                                  "--shutdown-timeout=1h-"])
def test_bad_duration_exits_2(launcher, flag):
    assert_usage_error(gateway_cli(["start", listen_flag(), flag], launcher=launcher))


@pytest.mark.parametrize("endpoint", ["127.0.0.1:notaport", "127.0.0.1:70000", "[::1:2379"])
def test_malformed_endpoint_exits_2(launcher, endpoint):
    assert_usage_error(gateway_cli(["start", listen_flag(), f"--endpoints={endpoint}"],
                                   launcher=launcher))


# -- exit 1: the flags parse but the configuration cannot work ------------------------------------

def test_listen_address_in_use_exits_1_with_one_line(launcher):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = gateway_cli(["start", f"--listen-addr=127.0.0.1:{port}",
                              f"--endpoints=127.0.0.1:{free_port()}"], launcher=launcher)
    assert_config_error(result, str(port))


def test_no_endpoints_exits_1(launcher):
    assert_config_error(gateway_cli(["start", listen_flag(), "--endpoints="], launcher=launcher))


SELF_CASES = [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("0.0.0.0", "127.0.0.2")]
if ipv6_loopback_available():
    SELF_CASES += [("[::1]", "[::1]"), ("[::]", "[::1]")]


@pytest.mark.parametrize("listen_host,endpoint_host", SELF_CASES)
def test_endpoint_that_is_the_gateway_itself_exits_1(launcher, listen_host, endpoint_host):
    """Any local address is "the gateway itself" when it listens on a wildcard."""
    port = free_port("::1", socket.AF_INET6) if "[" in listen_host else free_port()
    other = f"127.0.0.1:{free_port()}"
    result = gateway_cli(["start", f"--listen-addr={listen_host}:{port}",
                          f"--endpoints={other},{endpoint_host}:{port}"], launcher=launcher)
    assert_config_error(result, str(port))


def test_unresolvable_endpoint_exits_1(launcher):
    result = gateway_cli(["start", listen_flag(), "--endpoints=no-such-member.invalid:2379"],
                         launcher=launcher, timeout=60)
    assert_config_error(result, "no-such-member.invalid")


# -- success paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["start", "--help"]], ids=["top", "start"])
def test_help_exits_0(launcher, args):
    result = gateway_cli(args, launcher=launcher)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "usage" in output.lower()
    assert ("--endpoints" if "start" in args else "start") in output


def test_ready_line_lists_every_endpoint(launcher):
    endpoints = [f"127.0.0.1:{free_port()}", f"127.0.0.2:{free_port()}"]
    if ipv6_loopback_available():
        endpoints.append(f"[::1]:{free_port('::1', socket.AF_INET6)}")
    with Gateway(["start", listen_flag(), "--endpoints=" + ",".join(endpoints)],
                 launcher=launcher) as gateway:
        assert f"[{', '.join(endpoints)}]" in gateway.ready_line, gateway.ready_line


def test_scheme_prefixes_are_stripped(launcher):
    with EchoServer() as echo:
        other = f"127.0.0.1:{free_port()}"
        port = free_port()
        with Gateway(["start", f"--listen-addr=127.0.0.1:{port}",
                      f"--endpoints=http://{echo.endpoint},https://{other}"],
                     launcher=launcher) as gateway:
            assert f"[{echo.endpoint}, {other}]" in gateway.ready_line, gateway.ready_line
            assert "http" not in gateway.ready_line
            # Sticky may pick the refused endpoint first; the gateway fails over invisibly.
            assert exchange_once(port) == b"via the cli test"
            assert echo.served == 1


@pytest.mark.parametrize("form", ["equals", "space"])
def test_flag_value_forms_both_accepted(launcher, form):
    with EchoServer() as echo:
        port = free_port()
        flags = {"--listen-addr": f"127.0.0.1:{port}", "--endpoints": echo.endpoint,
                 "--retry-delay": "1m30s", "--dial-timeout": "500ms", "--policy": "round-robin"}
        args = ["start"]
        for name, value in flags.items():
            args += [f"{name}={value}"] if form == "equals" else [name, value]
        with Gateway(args, launcher=launcher) as gateway:
            assert echo.endpoint in gateway.ready_line
            assert exchange_once(port) == b"via the cli test"


def test_default_endpoint_is_the_local_etcd(launcher):
    """Like `etcd gateway start`: without --endpoints the gateway proxies to 127.0.0.1:2379."""
    with Gateway(["start", listen_flag()], launcher=launcher) as gateway:
        assert "[127.0.0.1:2379]" in gateway.ready_line, gateway.ready_line


def test_ready_line_in_json_format(launcher):
    endpoints = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with Gateway(["start", listen_flag(), "--endpoints=" + ",".join(endpoints),
                  "--log-format=json"], launcher=launcher) as gateway:
        record = json.loads(gateway.ready_line)
        assert record["level"] == "info"
        assert record["msg"] == f"ready to proxy client requests to [{', '.join(endpoints)}]"
