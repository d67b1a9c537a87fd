"""What the command line accepts as an endpoint, a port, a duration (issue 14): URLs of any scheme
reduced to their host and port as the Go gateway does, and ASCII digits only, everywhere."""
import pytest
from hypothesis import given, strategies as st

import dnssrv
import endpoints as ep
import gateway


@pytest.mark.parametrize("text, host, port, secure", [
    ("HTTP://h.example:2379/v3", "h.example", 2379, False),
    ("HTTPS://h.example:2379", "h.example", 2379, True),
    ("hTTpS://10.0.0.1:2379/", "10.0.0.1", 2379, True),
    ("unix://localhost:2379", "localhost", 2379, False),
    ("etcd+grpc.v3-x://h:1", "h", 1, False),
    ("http://user:secret@10.0.0.1:2379/path?query=1#fragment", "10.0.0.1", 2379, False),
    ("http://10.0.0.1:2379?x", "10.0.0.1", 2379, False),
    ("https://[::1]:2379/v3", "::1", 2379, True),
    ("http://[fe80::1%251]:2379", "fe80::1%1", 2379, False),     # RFC 6874: %25 is "%"
])
def test_any_scheme_in_any_case_leaves_host_and_port(text, host, port, secure):
    endpoint = ep.parse_endpoint(text)
    assert (endpoint.host, endpoint.port, endpoint.secure) == (host, port, secure)


@pytest.mark.parametrize("text", [
    "http://", "HTTP://h", "http://h:", "http:///v3", "1http://h:2379", "http//h:2379",
    "https://h:2379:1", "http://[::1:2379",
])
def test_urls_without_a_host_and_port_are_refused(text):
    with pytest.raises(ValueError):
        ep.parse_endpoint(text)


def test_https_in_capitals_is_no_ipv6_address():
    # It used to be refused as "IPv6 address ... must be written as [ADDR]:PORT".
    assert ep.parse_endpoint("HTTPS://h:2379").secure


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-",
               max_size=8),
       st.sampled_from("aAzZ"),
       st.sampled_from(["", "/", "/v3", "/v3/kv?x=1", "#f", "?q"]))
def test_every_scheme_is_stripped(rest, first, tail):
    scheme = first + rest
    endpoint = ep.parse_endpoint("%s://10.0.0.1:2379%s" % (scheme, tail))
    assert (endpoint.host, endpoint.port) == ("10.0.0.1", 2379)
    assert endpoint.secure == (scheme.lower() == "https")


# -- ASCII digits only ----------------------------------------------------------------------------

ARABIC_2379 = "\u0662\u0663\u0667\u0669"      # what int() reads as 2379
FULLWIDTH_53 = "\uff15\uff13"


@pytest.mark.parametrize("text", [
    "10.0.0.1:" + ARABIC_2379, "[::1]:" + ARABIC_2379, "http://10.0.0.1:" + ARABIC_2379,
    "h:" + FULLWIDTH_53, "\u0661\u0660.0.0.1:2379", "h\u0662.example:2379", "\u00e9t.example:1",
])
def test_endpoints_take_ascii_digits_and_names_only(text):
    with pytest.raises(ValueError):
        ep.parse_endpoint(text)
    with pytest.raises(ValueError):
        ep.split_hostport(text)


@pytest.mark.parametrize("text", ["\u0665s", "1m\u0663\u0660s", "\uff15ms", "1.\u0665s"])
def test_durations_take_ascii_digits_only(text):
    with pytest.raises(ValueError):
        gateway.parse_duration(text)


@pytest.mark.parametrize("text", ["127.0.0.1:" + FULLWIDTH_53, "[::1]:\u0665\u0663",
                                  "\u0661\u0662\u0667.0.0.1"])
def test_dns_servers_take_ascii_digits_only(text):
    with pytest.raises(ValueError):
        dnssrv.parse_dns_servers(text)


def test_resolv_conf_options_take_ascii_digits_only():
    conf = dnssrv.parse_resolv_conf("options ndots:\u0663 timeout:\u0661 attempts:\u0665\n")
    assert (conf.ndots, conf.timeout, conf.attempts) == (1, 5.0, 2)     # the defaults


def test_name_escapes_take_ascii_digits_only():
    assert dnssrv.encode_name("a\\065b") == b"\x03aAb\x00"
    with pytest.raises(ValueError):
        dnssrv.encode_name("a\\\u0660\u0666\u0665b")


@given(st.text(min_size=1, max_size=6))
def test_a_port_is_accepted_only_in_ascii_digits(port_text):
    try:
        _, port = ep.split_hostport("10.0.0.1:" + port_text)
    except ValueError:
        return
    assert port_text.isascii() and str(port) == port_text.lstrip("0")
