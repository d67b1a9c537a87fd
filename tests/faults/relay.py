"""A user-space TCP relay that emulates a bad network path, for kernels without `tc netem`.

    python tests/faults/relay.py --listen 127.0.0.1:0 --connect 127.0.0.1:2379 \
        --delay 0.075 --jitter 0.05 --loss 0.10 --loss-stall 0.2 --seed 1

prints `listening HOST:PORT` on stdout once it accepts, and on SIGTERM `stats {json}` (connections,
bytes each way, stalls) before it exits. One thread, one selector, a timer heap.

What it emulates (TCP cannot lose bytes in user space without corrupting the stream, so loss is
modelled as what TCP makes of it):

* delay: every chunk read from one side is delivered to the other `delay +/- jitter` seconds
  later (uniform), never before the chunk read ahead of it, so the byte order holds;
* loss: with probability `loss` a chunk is "lost" and retransmitted: it (and so everything behind
  it) is held back a further `loss_stall` seconds, the way an RTO stalls a real connection;
* EOF travels behind the data as a half-close, a reset as a reset (SO_LINGER 0).
Reads pause while more than HIGH_WATER_BYTES wait in one direction (back-pressure).
"""
import argparse
import heapq
import json
import random
import selectors
import signal
import socket
import struct
import sys
import time

HIGH_WATER_BYTES = 1 << 20
RECV_BYTES = 64 * 1024
EOF, RESET = "eof", "reset"


def parse_addr(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


class Direction:
    """Bytes from `src` waiting for their delivery time to `dst`."""

    def __init__(self, relay, src, dst):
        self.relay, self.src, self.dst = relay, src, dst
        self.due = []          # [(when, bytes | EOF | RESET)] in delivery order
        self.ready = bytearray()
        self.queued = 0
        self.last_when = 0.0
        self.read_done = False
        self.shut = False
        self.pair = None       # the Pair this direction belongs to


class Pair:
    """The two directions of one relayed connection: `up` reads the client, `down` the upstream."""

    def __init__(self, up, down):
        self.up, self.down = up, down
        up.pair = down.pair = self

    def reading(self, sock):
        return self.up if sock is self.up.src else self.down

    def writing(self, sock):
        return self.down if sock is self.up.src else self.up


class Relay:
    def __init__(self, listen, connect, delay, jitter, loss, loss_stall, seed):
        self.connect_addr = connect
        self.delay, self.jitter, self.loss, self.loss_stall = delay, jitter, loss, loss_stall
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(listen, backlog=1024)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.timers = []   # (when, seq, Direction)
        self.seq = 0
        self.stats = {"connections": 0, "bytes_up": 0, "bytes_down": 0, "stalls": 0, "resets": 0}
        self.running = True
        self.masks = {}        # socket -> its current selector mask (0: unregistered)
        self.pairs = {}        # socket -> Pair

    # -- plumbing ------------------------------------------------------------------------------
    def run(self):
        while self.running:
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else 0.5
            for key, mask in self.sel.select(min(timeout, 0.5)):
                if key.data is None:
                    self.accept()
                else:
                    self.on_io(key.fileobj, key.data, mask)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, direction = heapq.heappop(self.timers)
                self.deliver(direction)

    def accept(self):
        for _ in range(64):
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                upstream = socket.create_connection(self.connect_addr, timeout=2.0)
            except OSError:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            self.stats["connections"] += 1
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = Pair(Direction(self, client, upstream), Direction(self, upstream, client))
            for sock in (client, upstream):
                self.masks[sock] = selectors.EVENT_READ
                self.pairs[sock] = pair
                self.sel.register(sock, selectors.EVENT_READ, pair)

    def on_io(self, sock, pair, mask):
        if mask & selectors.EVENT_READ:
            self.read(pair.reading(sock))
        if mask & selectors.EVENT_WRITE and sock in self.masks:
            self.flush(pair.writing(sock))

    def schedule(self, direction, item):
        now = time.monotonic()
        when = now + max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
        if self.loss and self.rng.random() < self.loss:
            when += self.loss_stall
            self.stats["stalls"] += 1
        when = max(when, direction.last_when)  # never overtake: TCP delivers in order
        direction.last_when = when
        direction.due.append((when, item))
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, direction))

    def read(self, direction):
        try:
            data = direction.src.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = None
        if data:
            direction.queued += len(data)
            self.stats["bytes_up" if direction is direction.pair.up else "bytes_down"] += len(data)
            self.schedule(direction, data)
        else:
            direction.read_done = True
            self.schedule(direction, EOF if data == b"" else RESET)
        self.update(direction.src)

    def deliver(self, direction):
        now = time.monotonic()
        while direction.due and direction.due[0][0] <= now:
            _, item = direction.due.pop(0)
            if item is RESET:
                self.reset_pair(direction)
                return
            if item is EOF:
                direction.shut = True
            else:
                direction.ready += item
        self.flush(direction)

    def flush(self, direction):
        if direction.dst not in self.masks:
            return
        if direction.ready:
            try:
                sent = direction.dst.send(direction.ready)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.reset_pair(direction)
                return
            del direction.ready[:sent]
            direction.queued -= sent
        if not direction.ready and direction.shut and not direction.due:
            try:
                direction.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            direction.shut = "done"
        self.update(direction.dst)
        self.update(direction.src)

    def update(self, sock):
        """Recompute a socket's interest from both directions; close the pair when both ended."""
        if sock not in self.masks:
            return
        pair = self.pairs[sock]
        inbound, outbound = pair.reading(sock), pair.writing(sock)
        if inbound.shut == "done" and outbound.shut == "done":
            self.close_pair(pair, reset=False)
            return
        mask = 0
        if not inbound.read_done and inbound.queued < HIGH_WATER_BYTES:
            mask |= selectors.EVENT_READ
        if outbound.ready:
            mask |= selectors.EVENT_WRITE
        if mask != self.masks[sock]:
            if self.masks[sock] == 0:
                self.sel.register(sock, mask, pair)
            elif mask == 0:
                self.sel.unregister(sock)
            else:
                self.sel.modify(sock, mask, pair)
            self.masks[sock] = mask

    def reset_pair(self, direction):
        self.stats["resets"] += 1
        self.close_pair(direction.pair, reset=True)

    def close_pair(self, pair, reset):
        for direction in (pair.up, pair.down):
            sock = direction.src
            direction.due.clear()
            direction.ready.clear()
            self.pairs.pop(sock, None)
            if sock not in self.masks:
                continue
            if self.masks.pop(sock):
                self.sel.unregister(sock)
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--loss-stall", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    relay = Relay(parse_addr(args.listen), parse_addr(args.connect), args.delay, args.jitter,
                  args.loss, args.loss_stall, args.seed)

    def stop(signum, frame):
        relay.running = False
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = relay.listener.getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    relay.run()
    print("stats " + json.dumps(relay.stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def stop_and_read_report(proc, prefix: str, timeout: float):
    """SIGTERM a helper process started with stdout=PIPE (killed if it lingers) and return the
    JSON of its last stdout line starting with `prefix` (its figures), or None."""
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=timeout)
    report = None
    for line in out.splitlines():
        if line.startswith(prefix):
            report = json.loads(line[len(prefix):])
    return report


class RelayProcess:
    """Test-side handle: run this file as a child process; `.endpoint` is where it listens.

    `stop()` sends SIGTERM and returns its stats; it kills by PID after a deadline."""

    def __init__(self, connect, listen="127.0.0.1:0", preexec=(), **options):
        import subprocess

        argv = list(preexec) + [sys.executable, __file__, "--listen", listen, "--connect", connect]
        for name, value in options.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the relay prints it at once, or dies
        if not line.startswith("listening "):
            self.stop()
            raise AssertionError(f"relay did not start: {line!r} {self.proc.stderr.read()}")
        self.endpoint = line.split()[1]
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.stats = None

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            self.stats = stop_and_read_report(self.proc, "stats ", timeout) or self.stats
        return self.stats

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
