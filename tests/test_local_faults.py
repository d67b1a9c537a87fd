"""Faults of this host, not of a member: they must never stop the gateway's own work.

The discovery refresh runs with /etc/resolv.conf made unreadable for real: the gateway runs in a
private mount namespace (`unshare --mount`), in which the test mounts a tmpfs over /etc holding a
copy of /etc/hosts and a *directory* named resolv.conf, and later unmounts it again. The host's
own mounts are never touched.
"""
import shutil
import signal
import subprocess
import urllib.request

import pytest

from support import Gateway, free_port, wait_until
from upstreams import EchoServer


def refreshes(metrics_addr):
    """{result: count} of etcd_gateway_discovery_refreshes_total."""
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("etcd_gateway_discovery_refreshes_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            counts[result] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def in_mount_namespace_of(pid, *argv):
    # -r: the gateway's root too (in a chroot, the namespace's own root is the host's /)
    subprocess.run(["nsenter", "-t", str(pid), "-m", "-r", *argv], check=True, capture_output=True,
                   timeout=30)


@pytest.mark.root  # a private mount namespace (util-linux's unshare, which CI installs)
def test_refresh_survives_an_unreadable_resolv_conf_and_resumes(tmp_path):
    hosts_copy = tmp_path / "hosts"
    shutil.copy("/etc/hosts", hosts_copy)
    break_etc = (f"mount -t tmpfs tmpfs /etc && mkdir /etc/resolv.conf "
                 f"&& cp {hosts_copy} /etc/hosts")
    metrics_addr = f"127.0.0.1:{free_port()}"
    with EchoServer() as echo:
        args = ["start", f"--listen-addr=127.0.0.1:{free_port()}", f"--metrics-addr={metrics_addr}",
                f"--endpoints=localhost:{echo.port}", "--discovery-refresh=0"]
        preexec = ["unshare", "--mount", "--propagation", "private", "--"]
        with Gateway(args, preexec=preexec) as gateway:
            in_mount_namespace_of(gateway.pid, "sh", "-c", break_etc)
            gateway.signal(signal.SIGHUP)
            assert wait_until(lambda: refreshes(metrics_addr).get("error") == 1, timeout=10), \
                gateway.log.text()
            assert gateway.log.wait_for("cannot read the DNS configuration", timeout=10), \
                gateway.log.text()
            in_mount_namespace_of(gateway.pid, "umount", "/etc")
            gateway.signal(signal.SIGHUP)
            assert wait_until(lambda: refreshes(metrics_addr).get("ok") == 1, timeout=10), \
                gateway.log.text()
            assert gateway.proc.poll() is None
