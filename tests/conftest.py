"""Fixtures every test module may use; the helpers behind them are in support.py and
upstreams.py."""
import sys

import pytest

from support import ROOT, build_pyz
from upstreams import EchoServer

# The modules under test (gateway, endpoints, dnssrv) live at the top of the checkout.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def pyz():
    """dist/etcd-gateway.pyz (the `pyz` launcher's path), built once per session from the
    checkout: dist/ is not in git."""
    return build_pyz.build()


@pytest.fixture
def echo():
    """An EchoServer on 127.0.0.1 (upstreams.py); every socket and thread closed at teardown."""
    with EchoServer() as server:
        yield server
