"""bench/floor.py, the least Python relay that the benchmark runs beside ours as a floor: its CPU
figure means something only if it relays as correctly as ours on the benchmark's loads (bytes
intact both ways under back-pressure, half-closes passed on, a refused upstream closes the
client)."""
import hashlib
import socket
import subprocess
import sys
import threading

import pytest

from support import IO_TIMEOUT, ROOT, LineReader, closed_by_peer, free_port, ping, recv_exactly
from upstreams import (EchoServer, RefusingPort, ScriptedServer, after_delay,
                       expected_reply_after_eof, reply_after_eof)


@pytest.fixture
def floor_in_front_of():
    """Start bench/floor.py in front of an `--endpoints` value; its (host, port)."""
    started = []

    def start(endpoint):
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor.py"),
                                 f"--listen-addr=127.0.0.1:{port}", f"--endpoints={endpoint}"],
                                stderr=subprocess.PIPE)
        started.append(proc)
        assert LineReader(proc.stderr).wait_for(r"ready to proxy client requests to \[") is not None
        return "127.0.0.1", port

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(IO_TIMEOUT)
        proc.stderr.close()


def test_connections_one_after_another_are_relayed(floor_in_front_of):
    with EchoServer() as echo:
        address = floor_in_front_of(echo.endpoint)
        for n in range(200):
            assert ping(address, b"request %d" % n) == b"request %d" % n
        assert echo.served == 200


def test_bulk_both_ways_at_once_arrives_intact(floor_in_front_of):
    """32 MiB echoed to a client that reads only after a pause: the echo server, unable to send,
    stops reading at 256 KiB unsent, so the relay queues in both directions and stops reading
    each side until its queue drains."""
    payload = bytes(range(256)) * (32 * 4096)
    with EchoServer() as echo:
        address = floor_in_front_of(echo.endpoint)
        with socket.create_connection(address, timeout=IO_TIMEOUT) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            sender.join(0.5)  # not reading yet: the point is the back-pressure
            echoed = recv_exactly(sock, len(payload))
            sender.join(IO_TIMEOUT)
            sock.shutdown(socket.SHUT_WR)
            assert closed_by_peer(sock, IO_TIMEOUT)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("upstream_delay", [0.0, 0.5])
def test_half_close_reaches_the_upstream_after_the_last_byte(floor_in_front_of, upstream_delay):
    """The upstream answers only after the client's EOF, with a digest of what arrived; with a
    delay, more than loopback's socket buffers hold waits for it: the relay queues what the
    upstream did not take and stops reading the client until the queue drains."""
    data = bytes(range(256)) * (32 * 4096)  # 32 MiB
    with ScriptedServer(after_delay(reply_after_eof, upstream_delay)) as server:
        address = floor_in_front_of(server.endpoint)
        with socket.create_connection(address, timeout=IO_TIMEOUT) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            reply = bytearray()
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                reply += chunk
        assert server.next_result() == (len(data), hashlib.sha256(data).hexdigest())
    assert bytes(reply) == expected_reply_after_eof(data)


def test_a_refused_upstream_closes_the_client(floor_in_front_of):
    with RefusingPort() as refusing:
        address = floor_in_front_of(refusing.endpoint)
        with socket.create_connection(address, timeout=IO_TIMEOUT) as sock:
            assert closed_by_peer(sock, IO_TIMEOUT)
