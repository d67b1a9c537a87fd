"""Flag values the gateway refuses or accepts, seen as an operator sees them: exit 2 with usage
for a value that cannot be right, the ready line for one that is (issue 14). One launcher is
enough here: test_cli.py checks that every launcher runs the same main()."""
import pytest

from support import Gateway, free_port, gateway_cli
from test_cli import assert_usage_error, listen_flag


@pytest.mark.parametrize("value", ["1ns", "999ms", "0.5s", "0.999999s"])
def test_discovery_refresh_under_a_second_is_a_usage_error(value):
    result = gateway_cli(["start", listen_flag(), f"--discovery-refresh={value}"])
    assert_usage_error(result)
    assert "--discovery-refresh" in result.stderr and "at least 1s" in result.stderr


@pytest.mark.parametrize("value", ["0", "1s", "1000ms"])
def test_discovery_refresh_of_zero_or_a_second_starts(value):
    endpoint = f"127.0.0.1:{free_port()}"
    with Gateway(["start", listen_flag(), f"--endpoints={endpoint}",
                  f"--discovery-refresh={value}"]) as gateway:
        assert endpoint in gateway.ready_line


ARABIC_2379 = "\u0662\u0663\u0667\u0669"
ARABIC_5 = "\u0665"


@pytest.mark.parametrize("flag", [
    f"--endpoints=10.0.0.1:{ARABIC_2379}",
    f"--retry-delay={ARABIC_5}s",
    f"--dial-timeout={ARABIC_5}00ms",
    f"--listen-addr=127.0.0.1:{ARABIC_2379}",
    f"--metrics-addr=127.0.0.1:{ARABIC_2379}",
    f"--dns-server=127.0.0.1:{ARABIC_5}3",
], ids=["endpoints", "retry-delay", "dial-timeout", "listen-addr", "metrics-addr", "dns-server"])
def test_digits_of_other_scripts_are_a_usage_error(flag):
    args = ["start", flag] if flag.startswith("--listen-addr") else ["start", listen_flag(), flag]
    assert_usage_error(gateway_cli(args))


def test_endpoint_urls_of_any_scheme_and_case_keep_host_and_port():
    plain, secure = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with Gateway(["start", listen_flag(), f"--endpoints=HTTP://{plain}/v3,HTTPS://{secure}"]) \
            as gateway:
        assert f"[{plain}, {secure}]" in gateway.ready_line, gateway.ready_line
