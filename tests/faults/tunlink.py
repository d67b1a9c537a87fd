"""A lossy, delaying IP link between two network namespaces a test creates, for kernels without
`tc netem`.

    with LossyLink(delay=0.075, jitter=0.05, loss=0.10, seed=1) as link:
        Gateway(args, preexec=link.exec_prefix_a())     # listens on link.client_addr
        Popen(link.exec_prefix_b() + [...])             # servers bind link.addr_b
        link.iptables_b("-I", "INPUT", ...)             # rules live in namespace B only
        link.read_stats()                               # what the mover moved and dropped
    link.stats                                          # the final figures, after close()

Layout (N: a third octet whose 10.214.N.0/29 no host interface uses; names start `egwt`):

    host 10.214.N.1 =veth= 10.214.N.2 [ns A] 10.214.N.5 =TUN= mover =TUN= 10.214.N.6 [ns B]

The veth pair is the clients' door into A and loses nothing. The lossy part is between the two
TUN devices: every IP packet A sends towards 10.214.N.6 is read by the mover process (this file
run as a program), which writes it into B's TUN device later or never, and the same the other way.

What it emulates: `tc qdisc add dev X root netem delay D J loss L` on both ends of the link:

* loss: each packet, each way, is dropped with probability `loss`, independently (netem's default
  loss model). A TCP SYN or SYN-ACK is a packet like any other, so a connect can lose its SYN and
  wait for the kernel to send it again (1 s after the first, then 2 s later, 4 s ...), which the
  user-space relay (relay.py) cannot show;
* delay: each packet that survives is delivered `delay + uniform(-jitter, +jitter)` seconds after
  it was read (netem's distribution when none is named), each packet independently, so a later
  packet can overtake an earlier one: reordering is allowed, as in netem with jitter and no rate;
* a queue of at most LIMIT_PACKETS per direction (netem's default `limit 1000`); a packet beyond it
  is dropped and counted as `overflow`, not as loss;
* no bandwidth limit, duplication or corruption. MTU 1500 and no offloads, so each read is one
  packet; IPv6 address generation is off on the TUN devices so only the test's traffic crosses.

Reproducible: each direction draws from its own `random.Random` seeded from (seed, direction), two
draws per packet (fate, then delay), so the k-th packet of a direction always meets the same fate
whatever the other direction does. Which packet is the k-th still depends on timing (retransmit
timers, concurrency), so runs are statistically, not bit-for-bit, alike.

The mover creates both TUN devices in the namespace it runs in (the host's) and prints `ready`;
`LossyLink` then moves each device into its namespace (`ip link set DEV netns NS`: an open TUN
descriptor keeps working after the move). On SIGUSR1 the mover prints `stats {json}`, on SIGTERM
too, and exits; closing its descriptors deletes the devices. Per direction the figures add up:
read = moved + dropped + overflow + write_errors + in_flight (still queued when asked).

Only `ip`, `iptables` and /dev/net/tun are used, and nothing outside the namespaces changes except
the host end of the veth, which goes with namespace A.
"""
import argparse
import fcntl
import heapq
import itertools
import json
import os
import random
import selectors
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), linux/if_tun.h
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # packets are bare IP, no 4-byte packet-information header
READ_BYTES = 65536
READ_BATCH = 64  # packets per readiness event, so one busy direction cannot starve the other
LIMIT_PACKETS = 1000  # netem's default queue limit
TCP = 6
SYN = 0x02


def open_tun(name: str) -> int:
    """Create TUN device `name` in this process's namespace; returns its non-blocking descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def is_tcp_syn(packet: bytes) -> bool:
    """True for a TCP segment with SYN set (a SYN or a SYN-ACK), IPv4 or extension-free IPv6."""
    if len(packet) < 40:
        return False
    version = packet[0] >> 4
    if version == 4 and packet[9] == TCP:
        tcp_at = (packet[0] & 0x0F) * 4
    elif version == 6 and packet[6] == TCP:
        tcp_at = 40
    else:
        return False
    return len(packet) > tcp_at + 13 and bool(packet[tcp_at + 13] & SYN)


class Direction:
    """Packets read from `src_fd`, waiting to be written to `dst_fd`, and their counts."""

    def __init__(self, name: str, src_fd: int, dst_fd: int, seed):
        self.name, self.src_fd, self.dst_fd = name, src_fd, dst_fd
        self.rng = random.Random(f"{seed}:{name}")
        self.queued = 0
        self.counts = dict.fromkeys(("read", "moved", "dropped", "overflow", "write_errors",
                                     "bytes_moved", "syn_read", "syn_dropped"), 0)


class Mover:
    """Moves packets between two TUN descriptors with netem's delay, jitter and loss.

    One thread, one selector, one timer heap of (when, seq, direction, packet); `clock` is
    injectable. `stop()` ends `run()` and `request_report()` makes it print its figures; both only
    set a flag, so a signal handler may call them (the signal's byte on `wake_fd` wakes the loop).
    """

    def __init__(self, fd_a: int, fd_b: int, delay: float, jitter: float, loss: float, seed,
                 clock=time.monotonic):
        self.delay, self.jitter, self.loss, self.clock = delay, jitter, loss, clock
        self.directions = [Direction("a_to_b", fd_a, fd_b, seed),
                           Direction("b_to_a", fd_b, fd_a, seed)]
        self.timers = []
        self.seq = itertools.count()
        self.queue_peak = 0
        self.running = True
        self.report_wanted = False

    def stop(self):
        self.running = False

    def request_report(self):
        self.report_wanted = True

    def report(self):
        print("stats " + json.dumps(self.stats(), sort_keys=True), flush=True)

    def run(self, wake_fd: int) -> None:
        with selectors.DefaultSelector() as sel:
            for direction in self.directions:
                sel.register(direction.src_fd, selectors.EVENT_READ, direction)
            sel.register(wake_fd, selectors.EVENT_READ, None)
            while self.running:
                timeout = max(0.0, self.timers[0][0] - self.clock()) if self.timers else None
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        os.read(wake_fd, 512)  # a signal: its handler already set a flag
                    else:
                        self.receive(key.data)
                self.deliver_due()
                if self.report_wanted:
                    self.report_wanted = False
                    self.report()

    def receive(self, direction: Direction) -> None:
        for _ in range(READ_BATCH):
            try:
                packet = os.read(direction.src_fd, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            self.decide(direction, packet)

    def decide(self, direction: Direction, packet: bytes) -> None:
        counts = direction.counts
        counts["read"] += 1
        syn = is_tcp_syn(packet)
        counts["syn_read"] += syn
        # Both draws happen for every packet, so a packet's fate does not shift later delays.
        lost = direction.rng.random() < self.loss
        lag = max(0.0, self.delay + direction.rng.uniform(-self.jitter, self.jitter))
        if lost:
            counts["dropped"] += 1
            counts["syn_dropped"] += syn
            return
        if direction.queued >= LIMIT_PACKETS:
            counts["overflow"] += 1
            return
        direction.queued += 1
        self.queue_peak = max(self.queue_peak, direction.queued)
        heapq.heappush(self.timers, (self.clock() + lag, next(self.seq), direction, packet))

    def deliver_due(self) -> None:
        now = self.clock()
        while self.timers and self.timers[0][0] <= now:
            _, _, direction, packet = heapq.heappop(self.timers)
            direction.queued -= 1
            try:
                os.write(direction.dst_fd, packet)
            except OSError:  # the device went down (namespace deleted): the packet is gone
                direction.counts["write_errors"] += 1
                continue
            direction.counts["moved"] += 1
            direction.counts["bytes_moved"] += len(packet)

    def stats(self) -> dict:
        out = {direction.name: dict(direction.counts, in_flight=direction.queued)
               for direction in self.directions}
        out["queue_peak"] = self.queue_peak
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-a", required=True)
    parser.add_argument("--dev-b", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--seed", default="0")
    args = parser.parse_args(argv)
    fd_a, fd_b = open_tun(args.dev_a), open_tun(args.dev_b)
    mover = Mover(fd_a, fd_b, args.delay, args.jitter, args.loss, args.seed)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: mover.stop())
    signal.signal(signal.SIGUSR1, lambda *_: mover.request_report())
    print("ready", flush=True)
    mover.run(wake_r)
    mover.report()
    return 0


# ---- the test side ----------------------------------------------------------------------------

SUBNET_PREFIX = "10.214"  # tests/faults/netns.py uses 10.213
_COUNTER = itertools.count()


def _run(argv, check=True):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def available():
    """None when this machine can build the link, else the reason."""
    from faults.netns import available as netns_available

    reason = netns_available()
    if reason is None and not os.path.exists("/dev/net/tun"):
        reason = "/dev/net/tun is missing (modprobe tun)"
    return reason


def _free_block() -> int:
    """A third octet N whose 10.214.N.0/29 no host interface uses (another run's link, say)."""
    used = _run(["ip", "-4", "-o", "addr", "show"]).stdout
    start = (os.getpid() * 7 + next(_COUNTER)) % 250
    for step in range(250):
        block = (start + step) % 250 + 1
        if f" {SUBNET_PREFIX}.{block}." not in used:
            return block
    raise RuntimeError(f"every {SUBNET_PREFIX}.N.0/29 is in use on this host")


class LossyLink:
    """Namespaces A and B joined by the lossy TUN link, A joined to the host by a veth pair.

    `client_addr` (A's veth end) is where host-side clients reach a server in A; `addr_a` and
    `addr_b` are the two ends of the lossy link. `close()` stops the mover by PID (keeping its
    figures in `stats`) and deletes both namespaces, also when the test failed.
    """

    def __init__(self, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0, seed=0):
        self.delay, self.jitter, self.loss, self.seed = delay, jitter, loss, seed
        block, pid = _free_block(), os.getpid()
        self.ns_a, self.ns_b = f"egwt-{pid}-{block}-a", f"egwt-{pid}-{block}-b"
        tag = f"egwt{pid:x}x{block:x}"  # at most 14 characters: IFNAMSIZ is 16 with the NUL
        self.host_if, self.tun_a, self.tun_b = tag + "h", tag + "a", tag + "b"
        self.host_addr = f"{SUBNET_PREFIX}.{block}.1"
        self.client_addr = f"{SUBNET_PREFIX}.{block}.2"
        self.addr_a = f"{SUBNET_PREFIX}.{block}.5"
        self.addr_b = f"{SUBNET_PREFIX}.{block}.6"
        self.mover = None
        self.stats = None
        self._namespaces = []
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def __repr__(self):
        return (f"<LossyLink {self.addr_a}<->{self.addr_b} delay={self.delay} "
                f"jitter={self.jitter} loss={self.loss} seed={self.seed}>")

    def _create(self):
        self.mover = subprocess.Popen(
            [sys.executable, __file__, "--dev-a", self.tun_a, "--dev-b", self.tun_b,
             "--delay", str(self.delay), "--jitter", str(self.jitter), "--loss", str(self.loss),
             "--seed", str(self.seed)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.mover.stdout.readline()  # the mover prints it at once, or dies
        if line.strip() != "ready":
            raise RuntimeError(f"the mover did not start: {line!r} {self.mover.stderr.read()}")
        for ns in (self.ns_a, self.ns_b):
            _run(["ip", "netns", "add", ns])
            self._namespaces.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "egwtc0",
              "netns", self.ns_a])
        _run(["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if])
        _run(["ip", "link", "set", self.host_if, "up"])
        _run(["ip", "-n", self.ns_a, "addr", "add", f"{self.client_addr}/30", "dev", "egwtc0"])
        _run(["ip", "-n", self.ns_a, "link", "set", "egwtc0", "up"])
        for ns, dev, addr in ((self.ns_a, self.tun_a, self.addr_a),
                              (self.ns_b, self.tun_b, self.addr_b)):
            _run(["ip", "link", "set", dev, "netns", ns])
            _run(["ip", "-n", ns, "link", "set", dev, "addrgenmode", "none"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])

    @property
    def pid(self):
        return self.mover.pid if self.mover else None

    def exec_prefix_a(self):
        """Prepend to an argv to run it in namespace A (`ip netns exec` execs in place, so the PID
        is the program's own)."""
        return ["ip", "netns", "exec", self.ns_a]

    def exec_prefix_b(self):
        return ["ip", "netns", "exec", self.ns_b]

    def iptables_b(self, *args):
        return _run(self.exec_prefix_b() + ["iptables", "-w", *args])

    def kernel_drops(self) -> int:
        """Packets the kernel dropped at the TUN devices (their queue was full: the mover lagged).
        """
        total = 0
        for ns, dev in ((self.ns_a, self.tun_a), (self.ns_b, self.tun_b)):
            result = _run(["ip", "-n", ns, "-s", "-j", "link", "show", dev], check=False)
            if result.returncode == 0:
                stats = json.loads(result.stdout)[0].get("stats64", {})
                total += stats.get("tx", {}).get("dropped", 0)
        return total

    def read_stats(self, timeout: float = 10.0) -> dict:
        """The mover's figures so far (SIGUSR1), with the kernel's drops; also kept in `stats`."""
        self.mover.send_signal(signal.SIGUSR1)
        with selectors.DefaultSelector() as sel:
            sel.register(self.mover.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise RuntimeError(f"the mover (pid {self.mover.pid}) did not report in {timeout}s")
        line = self.mover.stdout.readline()  # the mover writes the whole line at once
        if not line.startswith("stats "):
            raise RuntimeError(f"the mover said {line!r}")
        self.stats = dict(json.loads(line[6:]), kernel_drops=self.kernel_drops())
        return self.stats

    def close(self):
        if self.mover is not None and self.mover.poll() is None:
            kernel_drops = self.kernel_drops() if self._namespaces else 0
            self.mover.send_signal(signal.SIGTERM)
            try:
                out, _ = self.mover.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.mover.kill()
                out, _ = self.mover.communicate(timeout=10)
            for line in out.splitlines():
                if line.startswith("stats "):
                    self.stats = dict(json.loads(line[6:]), kernel_drops=kernel_drops)
        for ns in self._namespaces:  # deleting A deletes its veth end, and so the host end
            _run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()
        _run(["ip", "link", "del", self.host_if], check=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    sys.exit(main())
