"""Faults of this host, not of a member: they must never stop the gateway's own work.

The discovery refresh runs with /etc/resolv.conf made unreadable for real: the gateway runs in a
private mount namespace (`unshare --mount`), in which the test mounts a tmpfs over /etc holding a
copy of /etc/hosts and a *directory* named resolv.conf, and later unmounts it again. The host's
own mounts are never touched.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

import gateway
from support import (HOLD_UNTIL_STDIN_CLOSES, ROOT, Gateway, free_port, pipes_of, recv_exactly,
                     spend_pipe_budget_script, wait_until, without_pipe_exemption)
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


# ----------------------------------------------------------------------- the user's pipe budget --
# The tests spend the budget for real in processes of their own (support.spend_pipe_budget_script,
# run without_pipe_exemption) and free it when these exit.

def test_a_spent_pipe_budget_makes_the_pool_answer_copy_and_ask_again_later():
    script = spend_pipe_budget_script(gateway.SPLICE_PIPE_BYTES, """
import gateway
pool = gateway.PipePool()
descriptors = len(os.listdir("/proc/self/fd"))
spent = pool.take()
kept_none = len(os.listdir("/proc/self/fd")) == descriptors
for read_fd, write_fd in held:
    os.close(read_fd)
    os.close(write_fd)
meanwhile = [pool.take() for _ in range(gateway.PIPE_RETRY_TAKES)]
again = pool.take()
print(spent, kept_none, meanwhile.count(None), again[2] if again else None)
""")
    done = subprocess.run(without_pipe_exemption(sys.executable, "-c", script), capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr
    spent, kept_none, refused, capacity = done.stdout.split()
    assert spent == "None" and kept_none == "True"  # the two-page pipe was closed, not handed out
    assert int(refused) == gateway.PIPE_RETRY_TAKES  # without asking the kernel each time
    assert int(capacity) == gateway.SPLICE_PIPE_BYTES  # the budget is back: a full pipe again


def echo_bulk(port, size):
    """Send `size` random bytes through the gateway to an echo server; what came back."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        received = recv_exactly(sock, size)
        sender.join(timeout=30)
    return payload, received


def test_with_the_pipe_budget_spent_bulk_is_copied_intact_and_no_small_pipe_is_kept():
    upstream = EchoServer()
    port = free_port()
    gw = Gateway(["start", f"--listen-addr=127.0.0.1:{port}", f"--endpoints={upstream.endpoint}"],
                 preexec=without_pipe_exemption())
    holder = None
    try:
        before = pipes_of(gw.pid)  # its stderr is one
        # The budget free: bulk is spliced, and the pipes stay in the gateway's pool for a while.
        sent, received = echo_bulk(port, 8 << 20)
        assert received == sent
        assert pipes_of(gw.pid) >= before + 2
        assert wait_until(lambda: pipes_of(gw.pid) == before, timeout=30)  # trimmed once idle
        # Spent by another process of the same user: the same load is copied, through no pipe.
        script = spend_pipe_budget_script(gateway.SPLICE_PIPE_BYTES, HOLD_UNTIL_STDIN_CLOSES)
        holder = subprocess.Popen(without_pipe_exemption(sys.executable, "-c", script), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "spent\n"
        sent, received = echo_bulk(port, 8 << 20)
        assert received == sent
        assert pipes_of(gw.pid) == before
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(timeout=30)
        gw.stop()
        upstream.close()
