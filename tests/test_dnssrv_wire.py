"""dnssrv's DNS wire format: against dnslib, round trips, malformed input, mutations."""
import struct

import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, SOA, SRV, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

import dnssrv
from dnssrv import (CLASS_IN, TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_SOA, TYPE_SRV, TYPE_TXT,
                    DNSFormatError, Message, Question, Record)


def header(qd=0, an=0, ns=0, ar=0, qid=0x1234, flags=0x8180):
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


def dnslib_reply():
    """A real reply as a server would send it: compressed names in every section."""
    request = DNSRecord.question("_etcd-client._tcp.Example.com", "SRV")
    reply = request.reply()
    reply.add_answer(RR("_etcd-client._tcp.example.com", QTYPE.SRV, ttl=60,
                        rdata=SRV(0, 10, 2379, "m1.example.com")))
    reply.add_answer(RR("_etcd-client._tcp.example.com", QTYPE.SRV, ttl=61,
                        rdata=SRV(1, 5, 22379, "m2.example.com")))
    reply.add_auth(RR("example.com", QTYPE.SOA, ttl=300,
                      rdata=SOA("ns.example.com", "admin.example.com", (1, 2, 3, 4, 5))))
    reply.add_ar(RR("m1.example.com", QTYPE.A, ttl=120, rdata=A("10.0.0.1")))
    reply.add_ar(RR("m2.example.com", QTYPE.AAAA, ttl=121, rdata=AAAA("2001:db8::2")))
    reply.add_ar(RR("www.example.com", QTYPE.CNAME, ttl=7, rdata=CNAME("m1.example.com")))
    return request.header.id, reply.pack()


# --- against an independent implementation ------------------------------------------------


def test_build_query_is_what_dnslib_reads():
    parsed = DNSRecord.parse(dnssrv.build_query(0xBEEF, "_etcd-client._tcp.example.com.",
                                                TYPE_SRV))
    assert parsed.header.id == 0xBEEF and parsed.header.rd == 1 and parsed.header.qr == 0
    assert str(parsed.q.qname) == "_etcd-client._tcp.example.com."
    assert parsed.q.qtype == QTYPE.SRV and len(parsed.rr) == 0


def test_build_query_without_recursion_desired():
    assert DNSRecord.parse(dnssrv.build_query(1, "a.b", TYPE_A, rd=False)).header.rd == 0


def test_parse_a_compressed_reply_from_dnslib():
    qid, data = dnslib_reply()
    message = dnssrv.parse_message(data)
    assert (message.id, message.qr, message.aa, message.ra, message.tc) == (qid, True, True, True,
                                                                             False)
    assert message.rcode == dnssrv.RCODE_NOERROR and message.opcode == 0
    assert message.question == Question("_etcd-client._tcp.Example.com", TYPE_SRV, CLASS_IN)
    assert [r.rdata for r in message.answers] == [
        dnssrv.SRV(0, 10, 2379, "m1.example.com"), dnssrv.SRV(1, 5, 22379, "m2.example.com")]
    assert [r.ttl for r in message.answers] == [60, 61]
    assert message.authority[0].rtype == TYPE_SOA
    assert isinstance(message.authority[0].rdata, bytes)          # other types are kept raw
    assert [(r.name, r.rtype, r.rdata, r.ttl) for r in message.additional] == [
        ("m1.example.com", TYPE_A, "10.0.0.1", 120),
        ("m2.example.com", TYPE_AAAA, "2001:db8::2", 121),
        ("www.example.com", TYPE_CNAME, "m1.example.com", 7)]


def test_message_round_trip_keeps_everything():
    _, data = dnslib_reply()
    message = dnssrv.parse_message(data)
    assert dnssrv.parse_message(dnssrv.build_message(message)) == message
    # and dnslib reads our (uncompressed) encoding the same way
    assert DNSRecord.parse(dnssrv.build_message(message)) == DNSRecord.parse(data)


def test_odd_bytes_in_labels_are_escaped_never_a_unicode_error():
    wire = header(qd=1) + b"\x04a.\\\xff\x00" + struct.pack("!HH", TYPE_A, CLASS_IN)
    message = dnssrv.parse_message(wire)
    assert message.question.name == "a\\.\\\\\\255"
    assert dnssrv.build_message(message) == wire


def test_tcp_frame_reader_reassembles_split_frames():
    reader = dnssrv.TCPFrameReader()
    framed = dnssrv.tcp_frame(b"hello world")
    assert framed[:2] == b"\x00\x0b"
    assert reader.feed(framed[:1]) is None
    assert reader.feed(framed[1:5]) is None
    assert reader.feed(framed[5:]) == b"hello world"


def test_encoding_rejects_bad_names():
    for name in ("a" * 64 + ".com", "a..b", ".".join(["a" * 63] * 4), "caf\u00e9.com"):
        with pytest.raises(ValueError):
            dnssrv.encode_name(name)
    assert len(dnssrv.encode_name(".".join(["a" * 63] * 3 + ["a" * 61]))) == 255
    assert dnssrv.encode_name(".") == b"\x00" == dnssrv.encode_name("")


# --- malformed messages ---------------------------------------------------------------------

QUESTION_TAIL = struct.pack("!HH", TYPE_A, CLASS_IN)


def answer_a(rdlength, rdata, name=b"\xc0\x0c"):
    return name + struct.pack("!HHIH", TYPE_A, CLASS_IN, 60, rdlength) + rdata


GOOD_QUESTION = b"\x01a\x00" + QUESTION_TAIL
MALFORMED = {
    "empty": (b"", "header"),
    "short header": (b"\x00" * 11, "header"),
    "question missing": (header(qd=1), "truncated name"),
    "pointer to itself": (header(qd=1) + b"\xc0\x0c" + QUESTION_TAIL, "strictly backwards"),
    "pointer loop": (header(qd=1) + b"\x01a\xc0\x0c" + QUESTION_TAIL, "strictly backwards"),
    "forward pointer": (header(qd=1) + b"\xc0\x12" + QUESTION_TAIL + b"\x01a\x00",
                        "strictly backwards"),
    "pointer past the end": (header(qd=1) + b"\xc0\xff" + QUESTION_TAIL, "past the end"),
    "truncated pointer": (header(qd=1) + b"\xc0", "truncated compression pointer"),
    "label too long": (header(qd=1) + b"\x40" + b"a" * 64 + b"\x00" + QUESTION_TAIL, "63"),
    "reserved label type": (header(qd=1) + b"\x80" + QUESTION_TAIL, "63"),
    "name too long": (header(qd=1) + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + QUESTION_TAIL, "255"),
    "truncated label": (header(qd=1) + b"\x05ab", "truncated label"),
    "question without type": (header(qd=1) + b"\x01a\x00\x00", "question type"),
    "rdlength overrun": (header(qd=1, an=1) + GOOD_QUESTION + answer_a(10, b"\x01\x02\x03\x04"),
                         "rdlength past the end"),
    "A rdata of 5 bytes": (header(qd=1, an=1) + GOOD_QUESTION + answer_a(5, b"\x01" * 5),
                           "A rdata of 5 bytes"),
    "SRV name beyond rdlength": (
        header(qd=1, an=1) + GOOD_QUESTION + b"\xc0\x0c"
        + struct.pack("!HHIH", TYPE_SRV, CLASS_IN, 60, 7) + b"\x00\x01\x00\x02\x00\x03\x01a\x00",
        "rdata does not match rdlength"),
    "SRV rdata longer than its name": (
        header(qd=1, an=1) + GOOD_QUESTION + b"\xc0\x0c"
        + struct.pack("!HHIH", TYPE_SRV, CLASS_IN, 60, 10) + b"\x00\x01\x00\x02\x00\x03\x00junk",
        "rdata does not match rdlength"),
    "answer count too high": (header(qd=1, an=3) + GOOD_QUESTION + answer_a(4, b"\x01" * 4),
                              "truncated name"),
    "trailing junk": (header(qd=1) + GOOD_QUESTION + b"\x00", "trailing bytes"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_raises_one_error_with_offset(case):
    data, reason = MALFORMED[case]
    with pytest.raises(DNSFormatError, match=reason) as caught:
        dnssrv.parse_message(data)
    assert isinstance(caught.value, ValueError)
    assert 0 <= caught.value.offset <= len(data)


def test_name_of_exactly_255_bytes_is_accepted():
    name = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61 + b"\x00"
    assert len(name) == 255
    message = dnssrv.parse_message(header(qd=1) + name + QUESTION_TAIL)
    assert len(message.question.name) == 253


def test_backward_pointer_into_an_earlier_name_is_fine():
    # question "a.b", answer name = label "x" + pointer to "b" (offset 14) inside the question
    data = (header(qd=1, an=1) + b"\x01a\x01b\x00" + QUESTION_TAIL
            + answer_a(4, b"\x7f\x00\x00\x01", name=b"\x01x\xc0\x0e"))
    assert dnssrv.parse_message(data).answers[0].name == "x.b"


# --- properties -----------------------------------------------------------------------------

labels = st.binary(min_size=1, max_size=63)
wire_names = st.lists(labels, max_size=6).map(
    lambda parts: b"".join(bytes([len(p)]) + p for p in parts) + b"\x00").filter(
    lambda wire: len(wire) <= 255)


@given(wire_names, st.integers(0, 0xFFFF), st.sampled_from([TYPE_A, TYPE_SRV, TYPE_TXT, 0xFFFF]))
def test_any_wire_name_survives_parse_and_build(wire_name, qid, qtype):
    data = header(qd=1, qid=qid, flags=0x0100) + wire_name + struct.pack("!HH", qtype, CLASS_IN)
    assert dnssrv.build_message(dnssrv.parse_message(data)) == data


text_names = st.lists(st.from_regex(r"[a-z0-9_][a-z0-9_-]{0,20}", fullmatch=True),
                      min_size=1, max_size=5).map(".".join)
ttls = st.integers(0, 2 ** 31 - 1)


def record_of(rtype, rdata):
    return st.builds(lambda name, ttl, data: Record(name, rtype, CLASS_IN, ttl, data),
                     text_names, ttls, rdata)


srv_rdata = st.builds(dnssrv.SRV, st.integers(0, 65535), st.integers(0, 65535),
                      st.integers(0, 65535), text_names)
records = st.one_of(record_of(TYPE_A, st.ip_addresses(v=4).map(str)),
                    record_of(TYPE_AAAA, st.ip_addresses(v=6).map(str)),
                    record_of(TYPE_CNAME, text_names), record_of(TYPE_SRV, srv_rdata),
                    record_of(TYPE_TXT, st.binary(max_size=40)))
messages = st.builds(
    Message, id=st.integers(0, 0xFFFF), qr=st.booleans(), opcode=st.integers(0, 15),
    aa=st.booleans(), tc=st.booleans(), rd=st.booleans(), ra=st.booleans(),
    rcode=st.integers(0, 15),
    questions=st.lists(st.builds(Question, text_names, st.integers(0, 0xFFFF),
                                 st.integers(0, 0xFFFF)), max_size=2).map(tuple),
    answers=st.lists(records, max_size=4).map(tuple),
    authority=st.lists(records, max_size=2).map(tuple),
    additional=st.lists(records, max_size=3).map(tuple))


@given(messages)
def test_message_round_trip(message):
    assert dnssrv.parse_message(dnssrv.build_message(message)) == message


def _parse_or_format_error(data):
    try:
        dnssrv.parse_message(data)
    except DNSFormatError as exc:
        assert 0 <= exc.offset <= len(data)


@settings(max_examples=400)
@given(st.data())
def test_mutated_real_replies_only_ever_raise_the_one_error(data):
    _, reply = dnslib_reply()
    mutated = bytearray(reply)
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if action == "flip":
            mutated[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            mutated[position] = data.draw(st.sampled_from([0, 0x3F, 0x40, 0xC0, 0xFF]))
        elif action == "insert":
            mutated.insert(position, data.draw(st.integers(0, 255)))
        elif len(mutated) > 1:
            del mutated[position]
    _parse_or_format_error(bytes(mutated))


def test_every_truncation_of_a_real_reply_is_a_format_error():
    _, reply = dnslib_reply()
    for length in range(len(reply)):
        with pytest.raises(DNSFormatError):
            dnssrv.parse_message(reply[:length])


@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_ever_raise_the_one_error(data):
    _parse_or_format_error(data)


@given(st.binary(min_size=12, max_size=12), st.binary(max_size=300))
def test_arbitrary_bodies_after_a_header_only_ever_raise_the_one_error(head, body):
    _parse_or_format_error(head + body)
