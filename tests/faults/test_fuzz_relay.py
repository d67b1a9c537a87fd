"""Random byte streams in random chunk sizes, with a random half-close moment, through the gateway
to a loopback echo upstream, checked by hash (hypothesis chooses the data, the chunking, how many
bytes to read back before half-closing, and pauses between writes)."""
import hashlib
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.conftest import ProcessWatch, record_result, scaled
from support import Gateway, free_port
from upstreams import EchoServer

pytestmark = pytest.mark.faults

EXAMPLES = scaled(60, 600)


@pytest.fixture(scope="module")
def echo_gateway():
    with EchoServer() as echo:
        addr = f"127.0.0.1:{free_port()}"
        with Gateway(["start", "--endpoints", echo.endpoint, "--listen-addr", addr]) as gateway:
            gateway.addr = addr
            yield gateway


streams = st.tuples(
    st.lists(st.binary(min_size=1, max_size=70000), max_size=12),   # the chunks, in order
    st.floats(0, 1),                                                  # read-back before EOF
    st.lists(st.sampled_from([0, 0, 0, 0.001, 0.01]), max_size=12),   # pauses between chunks
)


def run_stream(addr, chunks, read_fraction, pauses):
    data = b"".join(chunks)
    host, port = addr.rsplit(":", 1)
    got = bytearray()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        for index, chunk in enumerate(chunks):
            sock.sendall(chunk)
            if index < len(pauses) and pauses[index]:
                time.sleep(pauses[index])  # the timing is the input being fuzzed
            # Read some echo before the half-close, so EOF can arrive mid-stream.
            while len(got) < int(read_fraction * (sum(map(len, chunks[:index + 1])))):
                piece = sock.recv(65536)
                assert piece, "EOF before the half-close"
                got += piece
        sock.shutdown(socket.SHUT_WR)
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            got += piece
    return len(data), hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_random_streams_with_half_close_arrive_whole(echo_gateway):
    watch = ProcessWatch(echo_gateway.pid)
    totals = {"streams": 0, "bytes": 0, "bad": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(streams)
    def prop(stream):
        size, ok = run_stream(echo_gateway.addr, *stream)
        totals["streams"] += 1
        totals["bytes"] += size
        totals["bad"] += not ok
        assert ok

    prop()
    proc = watch.check()
    record_result(dict({"fault": "fuzz: random streams + half-close via gateway",
                        "load": f"{EXAMPLES} hypothesis streams"},
                       ops=totals["streams"], failed_first=totals["bad"],
                       failed_final=totals["bad"], bytes_checked=totals["bytes"], **proc))
    watch.assert_clean(proc, echo_gateway.log.text()[-3000:])
