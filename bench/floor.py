"""The least Python that relays TCP connections the way the gateway does: a floor, not a product.

    python3 bench/floor.py --listen-addr 127.0.0.1:23790 --endpoints 127.0.0.1:2379

bench/run.py runs it as the proxy `floor` beside ours, so that one run shows how much of our CPU
any Python relay would spend and how much is what the gateway does beyond relaying (plans and
racing dials, health and counters, timeouts, local faults, draining, splice). It makes the same
system calls per short connection as ours (accept, one non-blocking connect that completes inside
connect() on loopback, TCP_NODELAY, epoll with EPOLLRDHUP so that an answer and its FIN go out in
one turn, recv_into/send, shutdown, close) with one dict lookup and one function per event. It
is correct (partial sends queue and pause the reader, a connect that does not complete at once is
waited for, half-closes are passed on, a reset resets both sides) but has no timeouts, one
endpoint, no splice, no logs: never run it in front of anything but a benchmark.
"""
import _socket
import argparse
import errno
import select
import signal
import socket
import sys

IN, OUT, RDHUP = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT, select.EPOLLRDHUP
CHUNK = 65536
NONBLOCK_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
LOCAL_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Side:
    """One socket of a relayed pair: what it reads goes to `peer`, `queue` holds what it still
    has to write, `eof` says it has been read to its end, `mask` is what epoll watches now."""

    __slots__ = ("sock", "fd", "peer", "queue", "eof", "connecting", "mask")

    def __init__(self, sock, connecting=False):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = None
        self.queue = bytearray()
        self.eof = False
        self.connecting = connecting
        self.mask = 0


class Floor:
    """The listener, epoll and every relayed pair; `upstream` is (family, sockaddr)."""

    def __init__(self, listen, upstream):
        self.upstream = upstream
        self.listener = socket.create_server(listen, backlog=4096)
        self.listener.setblocking(False)
        self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted inherit it
        self.family = int(self.listener.family)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.sides = {}  # fd -> Side
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)

    def run(self):
        listen_fd, sides, poll = self.listener.fileno(), self.sides, self.epoll.poll
        while True:
            for fd, events in poll():
                if fd == listen_fd:
                    self.accept()
                    continue
                side = sides.get(fd)
                if side is None:
                    continue  # closed earlier in this batch
                if events & OUT or side.mask == OUT:  # writable, or an error while only writing
                    self.writable(side, events)
                else:
                    self.pump(side, events)

    def accept(self):
        for _ in range(64):
            try:
                fd, _peer = self.listener._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in LOCAL_ERRNOS:
                    return  # the clients wait in the backlog until a relay closes
                continue
            client = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            try:
                upstream = _socket.socket(self.upstream[0], NONBLOCK_STREAM)
            except OSError:
                client.close()
                continue
            code = upstream.connect_ex(self.upstream[1])
            if code not in (0, errno.EINPROGRESS):
                upstream.close()
                client.close()
                continue
            connecting = code == errno.EINPROGRESS and not connected(upstream)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            a, b = Side(client), Side(upstream, connecting)
            a.peer, b.peer = b, a
            self.sides[a.fd] = a
            self.sides[b.fd] = b
            self.update(a)
            self.update(b)

    def pump(self, side, events):
        """Read what `side` has and send it on at once: the path of nearly every event."""
        try:
            count = side.sock.recv_into(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(side, reset=True)
            return
        if count:
            peer = side.peer
            sent = 0
            if not peer.queue and not peer.connecting:
                try:
                    sent = peer.sock.send(self.view[:count])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self.close(side, reset=True)
                    return
            if sent < count:
                peer.queue += self.view[sent:count]
                self.update(side)  # stops reading until the peer has taken it
                self.update(peer)
            if not events & RDHUP or count == CHUNK:
                return  # no FIN yet, or a full read: more may come
        self.eof(side)  # a read of 0, or a short one with the peer's FIN in: that was the last

    def eof(self, side):
        side.eof = True
        if not side.peer.queue:
            self.pass_eof(side)
        if side.fd in self.sides:
            self.update(side)

    def pass_eof(self, side):
        """`side` is read to its end and its peer has written all of it: half-close the peer, or
        close both once the other direction has ended too."""
        peer = side.peer
        if peer.eof and not side.queue:
            self.close(side)
            return
        try:
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def writable(self, side, events):
        if side.connecting:
            if side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.close(side, reset=True)
                return
            side.connecting = False
        if side.queue:
            try:
                sent = side.sock.send(side.queue)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close(side, reset=True)
                return
            del side.queue[:sent]
            if not side.queue:
                source = side.peer  # it may read again, or its EOF can go on now
                if source.eof:
                    self.pass_eof(source)
                    if side.fd not in self.sides:
                        return
                self.update(source)
        self.update(side)
        if events & select.EPOLLIN and side.mask & IN:
            self.pump(side, events)

    def update(self, side):
        reading = not side.eof and not side.connecting and not side.peer.queue
        mask = (IN if reading else 0) | (OUT if side.queue or side.connecting else 0)
        if mask == side.mask:
            return
        if not side.mask:
            self.epoll.register(side.fd, mask)
        elif not mask:
            self.epoll.unregister(side.fd)
        else:
            self.epoll.modify(side.fd, mask)
        side.mask = mask

    def close(self, side, reset=False):
        for one in (side, side.peer):
            if self.sides.pop(one.fd, None) is None:
                continue
            if reset:
                one.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            one.sock.close()  # epoll forgets a closed descriptor


def connected(sock):
    """Whether a connect completed inside connect() (tcp_info's state is ESTABLISHED), as ours asks."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1


def hostport(text):
    """"host:port" or "[v6]:port" as (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-addr", type=hostport, required=True)
    parser.add_argument("--endpoints", type=hostport, required=True)
    options = parser.parse_args(argv)
    host, port = options.endpoints
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    floor = Floor(options.listen_addr, (family, (host, port)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    print("ready to proxy client requests to [%s:%d]" % (host, port), file=sys.stderr, flush=True)
    floor.run()


if __name__ == "__main__":
    main()
