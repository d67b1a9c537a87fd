"""In-process tests of the HTTP and Prometheus text the gateway reads and writes, all pure:
`parse_health_reply` (etcd's answer to GET /health, for --health-check=etcd), `http_response`
(every status-port answer) and `MetricsText` (/metrics). What they write is read back by the
strict parsers of test_status.py, the same ones that check the real process's status port."""
import math

import pytest
from hypothesis import given, strategies as st

import gateway
from test_status import parse_exposition, parse_response

# ================================================================== etcd's GET /health reply ==


def etcd_reply(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: %d"
            b"\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("reply", [
    etcd_reply(b"200 OK", b'{"health":"true"}'),
    etcd_reply(b"200 OK", b'{"health":"true","reason":""}'),  # etcd 3.5
    etcd_reply(b"200 OK", b'{\n  "health": "true"\n}\n'),
    etcd_reply(b"200 OK", b'{"reason" : "", "health" :\t"true" }'),
    b'HTTP/1.0 200 OK\r\n\r\n{"health":"true"}',
])
def test_health_true_with_200_is_healthy(reply):
    assert gateway.parse_health_reply(reply) == (True, "")


@pytest.mark.parametrize("reply, reason", [
    (etcd_reply(b"503 Service Unavailable", b'{"health":"false","reason":"RAFT NO LEADER"}'),
     "health 503: RAFT NO LEADER"),
    (etcd_reply(b"503 Service Unavailable", b'{"health": "false", "reason" : "NOSPACE"}'),
     "health 503: NOSPACE"),
    (etcd_reply(b"503 Service Unavailable", b'{"health":"true"}'), "health 503"),
    (etcd_reply(b"200 OK", b'{"health":"false","reason":""}'), "health 200"),
    (etcd_reply(b"200 OK", b'{"health":"truest"}'), "health 200"),
    (etcd_reply(b"200 OK", b'{"healthy":"true"}'), "health 200"),
    (etcd_reply(b"200 OK", b""), "health 200"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"hea", "health 200"),  # cut short
    (etcd_reply(b"404 Not Found", b"404 page not found\n"), "health 404"),
    (etcd_reply(b"503 x", b'{"health":"false","reason":"caf\xc3\xa9"}'), "health 503: caf\u00e9"),
    # The body is read as JSON, not searched for a pattern: spaces inside a string count, a
    # "health" nested deeper or inside a string is not the member's, escapes are decoded.
    (etcd_reply(b"200 OK", b'{"health":" true"}'), "health 200"),
    (etcd_reply(b"200 OK", b'{"health":"false","status":{"health":"true"}}'), "health 200"),
    (etcd_reply(b"200 OK", b'{"health":"false","reason":"\\"health\\":\\"true\\""}'),
     'health 200: "health":"true"'),
    (etcd_reply(b"200 OK", b'[{"health":"true"}]'), "health 200"),
    (etcd_reply(b"503 x", b'{"health":"false","reason":"a \\"b\\" \\u00e9"}'), 'health 503: a "b" \u00e9'),
    (etcd_reply(b"503 x", b'{"health":"false","reason":["NOSPACE"]}'), "health 503"),
])
def test_anything_else_is_unhealthy_with_the_status_and_etcds_reason(reply, reason):
    assert gateway.parse_health_reply(reply) == (False, reason)


@pytest.mark.parametrize("reply", [b"", b"\r\n\r\n", b"HTTP/1.1", b"SSH-2.0-OpenSSH_9.2\r\n",
                                   b"\x16\x03\x01\x00\xa5", b"200 OK\r\n\r\n{\"health\":\"true\"}"])
def test_a_reply_that_is_not_http_is_unhealthy(reply):
    assert gateway.parse_health_reply(reply) == (False, "not an HTTP reply")


@given(st.binary(max_size=300))
def test_any_bytes_give_a_verdict_and_health_needs_200(reply):
    ok, reason = gateway.parse_health_reply(reply)
    assert isinstance(ok, bool) and isinstance(reason, str)
    assert ok == (reason == "")
    if ok:
        assert reply.split(b"\r\n", 1)[0].split()[1] == b"200"


# ============================================================= status-port HTTP responses ==

@pytest.mark.parametrize("code", sorted(gateway.HTTP_REASONS))
def test_every_status_response_is_complete_and_closes(code):
    body = "caf\u00e9 \u2603\n".encode()  # Content-Length counts bytes, not characters
    reply = parse_response(gateway.http_response(code, "text/plain; charset=utf-8", body))
    assert (reply.status, reply.body) == (code, body)
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert ("allow" in reply.headers) == (code == 405)  # RFC 9110 15.5.6: 405 must say Allow


def test_405_allows_get_only():
    reply = parse_response(gateway.http_response(405, "text/plain", b"method not allowed\n"))
    assert reply.headers["allow"] == "GET"


# ===================================================================== Prometheus text 0.0.4 ==

def render(*families):
    text = gateway.MetricsText()
    for family in families:
        text.family(*family)
    return text.render().decode()


def test_families_render_help_type_and_samples():
    assert render(("a_total", "counter", "Things.", [((), 3)]),
                  ("b", "gauge", "Per endpoint.", [((("endpoint", "10.0.0.1:2379"),), 1),
                                                   ((("endpoint", "[::1]:2379"),), 0)])) == (
        '# HELP a_total Things.\n# TYPE a_total counter\na_total 3\n'
        '# HELP b Per endpoint.\n# TYPE b gauge\nb{endpoint="10.0.0.1:2379"} 1\n'
        'b{endpoint="[::1]:2379"} 0\n')


def test_a_family_without_samples_still_has_help_and_type():
    families = parse_exposition(render(("c_total", "counter", "None yet.", [])))
    assert (families["c_total"].type, families["c_total"].samples) == ("counter", {})


def test_label_values_are_escaped():
    value = 'a\\b"c\nd'
    families = parse_exposition(render(("e", "gauge", "Odd labels.", [((("name", value),), 1)])))
    assert families["e"].value(name=value) == 1


@pytest.mark.parametrize("value, text", [(0, "0"), (7, "7"), (3.0, "3"), (-1, "-1"), (0.25, "0.25"),
                                         (1700000000.123, "1700000000.123"), (True, "1"),
                                         (2 ** 53 + 1, "9007199254740993"), (math.nan, "NaN"),
                                         (math.inf, "+Inf"), (-math.inf, "-Inf")])
def test_numbers_are_integers_when_whole_and_spelt_as_the_format_wants(value, text):
    assert render(("n", "gauge", "A number.", [((), value)])).endswith("\nn %s\n" % text)


METRIC_NAMES = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,15}", fullmatch=True)
LABEL_NAMES = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,9}", fullmatch=True)
VALUES = st.one_of(st.integers(0, 2 ** 53), st.floats(0, 1e15, allow_nan=False))
FAMILY = st.tuples(
    st.sampled_from(["counter", "gauge"]),
    st.dictionaries(st.tuples(LABEL_NAMES, st.text(max_size=12)), VALUES, max_size=4))


@given(st.dictionaries(METRIC_NAMES, FAMILY, max_size=4))
def test_whatever_is_rendered_parses_back_to_the_same_samples(families):
    rendered = render(*[(name, kind, "Help text.", [(((label, value),), number)
                                                    for (label, value), number in samples.items()])
                        for name, (kind, samples) in families.items()])
    parsed = parse_exposition(rendered)
    assert sorted(parsed) == sorted(families)
    for name, (kind, samples) in families.items():
        assert parsed[name].type == kind and parsed[name].help == "Help text."
        got = {key[1][0]: value for key, value in parsed[name].samples.items()}
        assert got == {pair: float(number) for pair, number in samples.items()}
        assert all(math.isfinite(value) for value in got.values())
