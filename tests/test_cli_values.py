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
