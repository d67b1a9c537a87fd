"""Fuzz dnssrv.parse_message: any bytes give a Message or one DNSFormatError, quickly.

Inputs are raw random bytes and, mostly, real replies (dnslib-built, compressed, with SRV, glue,
CNAME chains) with random byte flips, insertions, deletions and truncations, which get past the
header and into names, pointers and rdata. CI runs a few thousand; the documented long run is

    FAULTS_DNS_EXAMPLES=1000000 python -m pytest tests/faults/test_fuzz_dns.py -q -m faults -s
"""
import os
import time

import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, SRV, TXT, A, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnssrv
from faults.conftest import record_result, scaled

pytestmark = pytest.mark.faults

EXAMPLES = int(os.environ.get("FAULTS_DNS_EXAMPLES", scaled(20_000, 200_000)))
# A parse is microseconds; a whole CPU second means unbounded work (a pointer loop, say). CPU
# time, not wall time: a descheduled process on a busy CI machine is not a slow parser.
SLOW_PARSE_SECONDS = 1.0


def _seed_messages():
    """Well-formed replies that exercise compression, every record type we parse, and glue."""
    seeds = []
    srv = DNSRecord.question("_etcd-client._tcp.example.com", "SRV").reply()
    for i in range(3):
        target = f"m{i}.example.com"
        srv.add_answer(RR("_etcd-client._tcp.example.com", QTYPE.SRV, ttl=30,
                          rdata=SRV(0, 10, 2379 + i, target)))
        srv.add_ar(RR(target, QTYPE.A, ttl=30, rdata=A(f"127.0.0.{i + 1}")))
        srv.add_ar(RR(target, QTYPE.AAAA, ttl=30, rdata=AAAA("::1")))
    seeds.append(srv.pack())
    chain = DNSRecord.question("www.example.com", "A").reply()
    chain.add_answer(RR("www.example.com", QTYPE.CNAME, rdata=CNAME("web.example.com")))
    chain.add_answer(RR("web.example.com", QTYPE.A, rdata=A("192.0.2.1")))
    chain.add_auth(RR("example.com", QTYPE.TXT, rdata=TXT(["x" * 40, "y"])))
    seeds.append(chain.pack())
    seeds.append(dnssrv.build_query(0x1234, "_etcd-server-ssl._tcp.example.com", dnssrv.TYPE_SRV))
    return seeds


SEEDS = _seed_messages()
edits = st.lists(st.tuples(st.sampled_from("flip insert delete truncate"), st.integers(0, 600),
                           st.integers(0, 255)), min_size=1, max_size=6)


def mutate(data: bytes, steps) -> bytes:
    out = bytearray(data)
    for op, where, value in steps:
        where = where % (len(out) + 1)
        if op == "flip" and where < len(out):
            out[where] = value
        elif op == "insert":
            out[where:where] = bytes([value])
        elif op == "delete":
            del out[where:where + 1 + value % 4]
        elif op == "truncate":
            del out[where:]
    return bytes(out)


inputs = st.one_of(
    st.binary(max_size=600),
    st.builds(mutate, st.sampled_from(SEEDS), edits),
)
COUNTS = {"examples": 0, "parsed": 0, "format_errors": 0, "slowest_s": 0.0}


def check_parse(data: bytes):
    started = time.thread_time()
    try:
        message = dnssrv.parse_message(data)
    except dnssrv.DNSFormatError as exc:
        assert 0 <= exc.offset <= len(data), (exc, data)
        COUNTS["format_errors"] += 1
    else:
        assert isinstance(message, dnssrv.Message)
        COUNTS["parsed"] += 1
    elapsed = time.thread_time() - started
    COUNTS["examples"] += 1
    COUNTS["slowest_s"] = max(COUNTS["slowest_s"], elapsed)
    assert elapsed < SLOW_PARSE_SECONDS, (elapsed, data)


@pytest.mark.timeout(4 * 3600)
def test_parse_message_never_raises_anything_but_format_error():
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs)
    def prop(data):
        check_parse(data)

    prop()
    record_result({"fault": "fuzz: dnssrv.parse_message", "load": f"{EXAMPLES} hypothesis inputs",
                   "ops": COUNTS["examples"], "failed_final": 0, "failed_first": 0,
                   "parsed": COUNTS["parsed"], "format_errors": COUNTS["format_errors"],
                   "slowest_parse_ms": round(COUNTS["slowest_s"] * 1000, 2),
                   "duration_s": round(time.monotonic() - started, 1)})
