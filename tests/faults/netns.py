"""A network namespace joined to the host by a veth pair, created and removed by a test.

    with NetNS() as ns:            # ip netns add + veth: host 10.213.N.1/30 <-> ns 10.213.N.2/30
        Gateway(args, preexec=ns.exec_prefix())
        ns.iptables("-A", "OUTPUT", ...)   # rules live in the namespace, never on the host

Only `ip` (iproute2) and `iptables` are used, and only inside the namespace, except for the host
end of the veth (its address and link), which disappears with the namespace. `close()` deletes
the namespace (and with it the veth pair) even when the test failed; `available()` says why the
machine cannot run these tests (the fix for CI is `apt-get install iproute2 iptables`).
"""
import itertools
import os
import shutil
import subprocess

_COUNTER = itertools.count()
SUBNET_PREFIX = "10.213"


def _run(argv, check=True):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def available():
    """None when namespaces and iptables work here, else the reason."""
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"`{tool}` is missing: apt-get install -y --no-install-recommends iproute2 iptables"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    return None


class NetNS:
    def __init__(self):
        index = (os.getpid() * 7 + next(_COUNTER)) % 250 + 1
        self.name = f"egwf-{os.getpid()}-{index}"
        self.host_if = f"egwh{os.getpid() % 100000}{index % 10}"[:15]
        self.ns_if = "egwn0"
        self.host_ip = f"{SUBNET_PREFIX}.{index}.1"
        self.ns_ip = f"{SUBNET_PREFIX}.{index}.2"
        self._created = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self):
        _run(["ip", "netns", "add", self.name])
        self._created = True
        _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
              "netns", self.name])
        _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        _run(["ip", "link", "set", self.host_if, "up"])
        _run(["ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if])
        _run(["ip", "-n", self.name, "link", "set", self.ns_if, "up"])
        _run(["ip", "-n", self.name, "link", "set", "lo", "up"])

    def exec_prefix(self):
        """Prepend to an argv to run it inside the namespace (`ip netns exec` execs in place,
        so the PID is the program's own)."""
        return ["ip", "netns", "exec", self.name]

    def iptables(self, *args):
        return _run(self.exec_prefix() + ["iptables", "-w", *args])

    def close(self):
        # Deleting the namespace deletes its end of the veth, which deletes the host end too.
        if self._created:
            _run(["ip", "netns", "del", self.name], check=False)
            self._created = False
        _run(["ip", "link", "del", self.host_if], check=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
