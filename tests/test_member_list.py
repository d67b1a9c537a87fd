"""Member sync's pure parts: the strict JSON parser and the rules that turn etcd's member list
into endpoints (gateway.parse_json, member_endpoints, parse_member_list_reply).

python3-minimal has no `json` module, so the gateway parses etcd's replies with its own parser,
everywhere. Here it is compared with `json` on generated documents, on every way `json.dumps`
writes them, and on generated near-JSON text: the same value (same types too: 1 is not 1.0 nor
True), or both refuse. The only intended differences: NaN/Infinity (not JSON, refused) and
nesting deeper than JSON_MAX_DEPTH (refused).
"""
import json
import math

import pytest
from hypothesis import given, settings, strategies as st

import gateway
from gateway import JsonError, member_endpoints, parse_json, parse_member_list_reply


def strict_loads(text):
    """`json.loads` without its non-standard NaN/Infinity."""
    def refuse(name):
        raise ValueError("not JSON: " + name)
    return json.loads(text, parse_constant=refuse)


def same(a, b) -> bool:
    """Equal and of the same types all the way down (-0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def outcome(parse, text):
    try:
        return ("ok", parse(text))
    except ValueError:  # JsonError and json.JSONDecodeError are ValueErrors
        return ("error", None)


SCALARS = (st.none() | st.booleans() | st.integers() | st.text()
           | st.floats(allow_nan=False, allow_infinity=False))
DOCUMENTS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                         | st.dictionaries(st.text(), inner, max_size=5), max_leaves=25)


@given(DOCUMENTS, st.booleans(), st.sampled_from([None, 0, 2]),
       st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
def test_same_value_as_json_for_what_json_dumps_writes(document, ensure_ascii, indent, separators):
    text = json.dumps(document, ensure_ascii=ensure_ascii, indent=indent, separators=separators)
    assert same(parse_json(text), json.loads(text))
    assert same(parse_json(" \n" + text + "\r\t"), json.loads(text))


NEAR_JSON = st.lists(st.sampled_from([
    "{", "}", "[", "]", ",", ":", '"', "\\", "\\u", "\\ud83d", "\\ude00", "\\ud800", "\\n", "\\x",
    "0", "1", "9", "-", "+", ".", "e", "E", "00", "true", "false", "null", "tru", "NaN",
    "Infinity", " ", "\n", "\t", "\r", "\x0b", "\x00", "\x1f", "a", "\u00e9", "\ud800", "\U0001f600",
    "\u0663", "\ufeff", '"a"', '"k":', "1.5", "-0", "1e5", "[]", "{}"]), max_size=14).map("".join)


@settings(max_examples=2000)
@given(NEAR_JSON)
def test_same_outcome_as_json_on_near_json_text(text):
    ours, theirs = outcome(parse_json, text), outcome(strict_loads, text)
    assert ours[0] == theirs[0], (text, ours, theirs)
    assert same(ours[1], theirs[1]), (text, ours, theirs)


@pytest.mark.parametrize("text, value", [
    ('"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate pair is one character
    ('"\\ud800"', "\ud800"), ('"\\ud800\\u0041"', "\ud800A"),  # lone surrogates kept, as json does
    ('"\\/\\b\\f\\n\\r\\t\\"\\\\"', '/\b\f\n\r\t"\\'),
    ("-0", 0), ("-0.0", -0.0), ("1E2", 100.0), ("1e400", math.inf),
    ('{"a": 1, "a": 2}', {"a": 2}),  # a repeated name: the last wins, as in json
    ("[" * gateway.JSON_MAX_DEPTH + "]" * gateway.JSON_MAX_DEPTH, None),
])
def test_accepts(text, value):
    if value is None:
        value = json.loads(text)
    assert same(parse_json(text), value)


@pytest.mark.parametrize("text, offset", [
    ("", 0), ("  ", 2), ("NaN", 0), ("-Infinity", 0), ("[1,]", 3), ('{"a":1,}', 7), ("01", 1),
    ("1.", 1), (".5", 0), ("+1", 0), ("-", 0), ('"\x01"', 1), ('"abc', 4), ('"\\x"', 1),
    ('"\\u12"', 3), ('"\\u١٢٣٤"', 3), ("\u0661", 0), ("[1] 2", 4), ("{1: 2}", 1), ('{"a" 1}', 5),
    ("\ufeff{}", 0), ("tru", 0), ("[" * (gateway.JSON_MAX_DEPTH + 1), gateway.JSON_MAX_DEPTH),
])
def test_refuses_with_the_offset(text, offset):
    with pytest.raises(JsonError) as caught:
        parse_json(text)
    assert caught.value.offset == offset, caught.value


def test_a_number_too_long_for_int_is_refused_as_json_refuses_it():
    text = "1" * 5000  # past Python's default int_max_str_digits (4300)
    assert outcome(parse_json, text)[0] == outcome(strict_loads, text)[0]


# ---- the member list ----------------------------------------------------------------------

# etcd 3.5.1's reply (curl -X POST -d '{}' .../v3/cluster/member/list) while a member added
# with `etcdctl member add` had not started yet: no name and no clientURLs.
ETCD_REPLY = (
    b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nGrpc-Metadata-Content-Type: '
    b'application/grpc\r\nContent-Length: 532\r\n\r\n'
    b'{"header":{"cluster_id":"18304919874050123684","member_id":"12792651045719721822",'
    b'"raft_term":"2"},"members":[{"ID":"1783061995622387135","peerURLs":["http://127.0.0.1:1"]},'
    b'{"ID":"3857870030543356572","name":"m2","peerURLs":["http://127.0.0.1:35385"],'
    b'"clientURLs":["http://127.0.0.1:39155"]},{"ID":"4284950622960090172","name":"m1",'
    b'"peerURLs":["http://127.0.0.1:59787"],"clientURLs":["http://127.0.0.1:54923"]},'
    b'{"ID":"12792651045719721822","name":"m0","peerURLs":["http://127.0.0.1:51297"],'
    b'"clientURLs":["http://127.0.0.1:55541"]}]}')


def names(endpoints):
    return [str(endpoint) for endpoint in endpoints]


def test_etcd_reply_gives_the_started_members_in_order():
    endpoints, problems = parse_member_list_reply(ETCD_REPLY, prefer_secure=False)
    assert names(endpoints) == ["127.0.0.1:39155", "127.0.0.1:54923", "127.0.0.1:55541"]
    assert all(e.address == "127.0.0.1" and not e.secure for e in endpoints)
    assert problems == []


def member(name="m", urls=(), **extra):
    entry = {"ID": "1", "name": name, "peerURLs": ["http://10.0.0.1:2380"], **extra}
    if urls:
        entry["clientURLs"] = list(urls)
    return entry


def test_learners_and_members_not_started_are_skipped_silently():
    endpoints, problems = member_endpoints([
        member("voter", ["http://10.0.0.1:2379"]),
        member("learner", ["http://10.0.0.2:2379"], isLearner=True),
        member("", ["http://10.0.0.3:2379"]),  # name "" : not started (no name published)
        {"ID": "4", "peerURLs": ["http://10.0.0.4:2380"]},
        member("no-urls"),
        member("learner-false", ["http://10.0.0.5:2379"], isLearner=False),
    ], prefer_secure=False)
    assert names(endpoints) == ["10.0.0.1:2379", "10.0.0.5:2379"]
    assert problems == []


def test_one_endpoint_per_member_preferring_the_scheme_that_answered():
    urls = ["unix://etcd.sock:0", "https://10.0.0.1:2379", "http://10.0.0.1:2380"]
    (secure,), _ = member_endpoints([member("m", urls)], prefer_secure=True)
    (plain,), _ = member_endpoints([member("m", urls)], prefer_secure=False)
    assert (str(secure), secure.secure) == ("10.0.0.1:2379", True)
    assert (str(plain), plain.secure) == ("10.0.0.1:2380", False)
    # No URL of the preferred scheme: the first that parses.
    (only,), _ = member_endpoints([member("m", ["bogus", "https://h.example:2379"])], False)
    assert (str(only), only.secure, only.address) == ("h.example:2379", True, "")


def test_ip_urls_are_addresses_and_names_wait_for_resolution():
    endpoints, _ = member_endpoints([member("a", ["https://[::1]:2379/"]),
                                     member("b", ["http://etcd-1.example:2379"])], False)
    assert [(e.host, e.address, e.secure) for e in endpoints] == [
        ("::1", "::1", True), ("etcd-1.example", "", False)]


@pytest.mark.parametrize("urls", [["unix://localhost:0"], ["unixs://x:1"], ["ftp://10.0.0.1:21"],
                                  ["http://10.0.0.1"], ["10.0.0.1:2379"], ["http://:2379"], [7]])
def test_a_member_without_a_usable_url_is_a_problem(urls):
    endpoints, problems = member_endpoints([member("lonely", urls)], False)
    assert endpoints == [] and len(problems) == 1 and "lonely" in problems[0], problems


def test_malformed_entries_and_repeated_urls_are_problems():
    endpoints, problems = member_endpoints([
        "not an object", member("a", ["http://10.0.0.1:2379"]),
        member("b", ["http://10.0.0.1:2379"]), {"name": 5, "clientURLs": ["http://10.0.0.9:1"]},
        {"name": "c", "clientURLs": "http://10.0.0.2:2379"}], False)
    assert names(endpoints) == ["10.0.0.1:2379"]
    assert len(problems) == 4, problems


URLS = st.sampled_from(["http://10.0.0.%d:2379" % i for i in range(4)]
                       + ["https://10.0.0.%d:2379" % i for i in range(4)]
                       + ["unix://s:0", "https://h%d.example:1" % 1, "junk"])
MEMBERS = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["", "m0", "m1", "m2"]),
                                          "clientURLs": st.lists(URLS, max_size=3)},
                                         optional={"isLearner": st.booleans()}), max_size=6)


@given(MEMBERS, st.booleans())
def test_member_rules_hold_for_any_list(members, prefer_secure):
    endpoints, problems = member_endpoints(members, prefer_secure)
    assert len({e.key for e in endpoints}) == len(endpoints)
    voters = [m for m in members if m["name"] and m["clientURLs"] and not m.get("isLearner")]
    assert len(endpoints) + len(problems) == len(voters)  # each voter: one endpoint or a reason
    for endpoint in endpoints:
        owners = [m for m in voters if any(str(endpoint) in url for url in m["clientURLs"])]
        assert owners, endpoint


@pytest.mark.parametrize("reply, reason", [
    (b"HTTP/1.0 503 Service Unavailable\r\n\r\n"
     b'{"error":"etcdserver: no leader","code":14,"message":"etcdserver: no leader"}',
     "HTTP 503: etcdserver: no leader"),
    (b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\n404 page not found\n",
     "HTTP 404, not a JSON member list"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n{}", "cut short"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding"),
    (b"SSH-2.0-OpenSSH\r\n", "not an HTTP reply"),
    (b"HTTP/1.0 200 OK\r\n\r\n[]", "HTTP 200"),
    (b'HTTP/1.0 200 OK\r\n\r\n{"members": {}}', "not a list"),
    (b'HTTP/1.0 200 OK\r\n\r\n{"members": [}', "not a JSON member list"),
    (b'HTTP/1.0 200 OK\r\n\r\n\xff', "not a JSON member list"),
])
def test_replies_that_are_not_a_member_list(reply, reason):
    with pytest.raises(ValueError) as caught:
        parse_member_list_reply(reply, prefer_secure=False)
    assert reason in str(caught.value)


def test_an_answer_without_members_gives_no_endpoint():
    assert parse_member_list_reply(b'HTTP/1.0 200 OK\r\n\r\n{"header":{}}', False) == ([], [])


def test_the_request_is_http_1_0_with_an_empty_json_body():
    request = gateway.member_list_request(gateway.ep.parse_endpoint("[::1]:2379"))
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v3/cluster/member/list HTTP/1.0\r\n")
    assert b"\r\nHost: [::1]:2379\r\n" in head and b"\r\nContent-Length: 2\r\n" in head
    assert body == b"{}"
