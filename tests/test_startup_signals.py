"""Signals while the gateway starts (issue 12 item 5).

The handlers are installed first thing in serve(), before any slow step: SIGUSR2's and SIGHUP's
default action would end a process that is still discovering its endpoints, and SIGTERM must end
a first discovery round that waits on a silent DNS server (exit 0, at once).
"""
import signal
import time

from dnsserver import DNSTestServer
from support import Gateway, free_port, wait_until


def test_signals_during_first_discovery():
    with DNSTestServer(mode="silent") as dns:
        args = ["start", f"--listen-addr=127.0.0.1:{free_port()}", "--discovery-srv=disc.test",
                f"--dns-server=127.0.0.1:{dns.address[1]}"]
        with Gateway(args, wait_ready=False) as gateway:
            assert wait_until(dns.seen, timeout=20)  # discovery is under way
            for signum in (signal.SIGUSR2, signal.SIGHUP):  # their default action would kill it
                gateway.signal(signum)
                line = f"ignoring signal: still starting signal={signum.name}"
                assert gateway.log.wait_for(line, timeout=10), gateway.log.text()
            assert gateway.proc.poll() is None
            began = time.monotonic()
            gateway.signal(signal.SIGTERM)
            assert gateway.wait() == 0
            assert time.monotonic() - began < 5, "SIGTERM waited for the DNS timeouts"
            assert gateway.log.wait_for("stopping before serving signal=SIGTERM", timeout=5)
