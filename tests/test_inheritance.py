"""Unit tests of the pure parts of socket activation and the live handover (issue 15).

`parse_inheritance` reads sd_listen_fds(3)'s LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES (and the
handover's two variables), `encode_endpoints` / `decode_endpoints` carry the endpoint set to the
new process, `restart_command` rebuilds the command line, `place_descriptors` moves descriptors
to 3, 4, ... without clobbering (checked in a forked child, as the gateway uses it).
"""
import fcntl
import os
import socket
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import endpoints as ep
import gateway
from gateway import (Inheritance, decode_endpoints, encode_endpoints, parse_inheritance,
                     place_descriptors, restart_command)

PID = 4242


def env(**values):
    return {key: str(value) for key, value in values.items()}


# -- parse_inheritance --------------------------------------------------------------------------

def test_nothing_inherited_without_the_variables():
    assert parse_inheritance({}, PID) == Inheritance({}, -1, None)
    assert parse_inheritance(env(LISTEN_FDS=1), PID).listeners == {}  # no LISTEN_PID: not ours
    assert parse_inheritance(env(LISTEN_PID=PID), PID).listeners == {}


def test_variables_of_another_process_are_ignored():
    # sd_listen_fds(3): LISTEN_PID names the process the descriptors are for; a child that
    # inherited the variables must not take its parent's descriptors.
    assert parse_inheritance(env(LISTEN_PID=PID + 1, LISTEN_FDS=1), PID).listeners == {}
    assert parse_inheritance(env(LISTEN_PID=PID + 1, LISTEN_FDS=7), PID).listeners == {}


@pytest.mark.parametrize("names", [None, "", "proxy", "status", "unknown", "whatever:extra"])
def test_one_socket_is_the_proxy_whatever_its_name(names):
    environ = env(LISTEN_PID=PID, LISTEN_FDS=1)
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    assert parse_inheritance(environ, PID) == Inheritance({"proxy": 3}, -1, None)


@pytest.mark.parametrize("names, expected", [("proxy:status", {"proxy": 3, "status": 4}),
                                             ("status:proxy", {"status": 3, "proxy": 4})])
def test_two_sockets_are_named(names, expected):
    environ = env(LISTEN_PID=PID, LISTEN_FDS=2, LISTEN_FDNAMES=names)
    assert parse_inheritance(environ, PID).listeners == expected


@pytest.mark.parametrize("names", [None, "", "proxy", "proxy:proxy", "proxy:metrics",
                                   "unknown:unknown", "proxy:status:x"])
def test_two_sockets_without_the_two_names_are_refused(names):
    environ = env(LISTEN_PID=PID, LISTEN_FDS=2)
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    with pytest.raises(ValueError, match="proxy:status"):
        parse_inheritance(environ, PID)


@pytest.mark.parametrize("count", [0, 3, 4, 1000000000])
def test_other_counts_are_refused(count):
    with pytest.raises(ValueError, match="LISTEN_FDS=%d" % count):
        parse_inheritance(env(LISTEN_PID=PID, LISTEN_FDS=count), PID)


@pytest.mark.parametrize("name, value", [("LISTEN_FDS", ""), ("LISTEN_FDS", "-1"), ("LISTEN_FDS", " 1"),
                                         ("LISTEN_FDS", "+1"), ("LISTEN_FDS", "1x"),
                                         ("LISTEN_FDS", "\u0661"), ("LISTEN_PID", "abc"),
                                         ("LISTEN_PID", "")])
def test_malformed_numbers_are_refused(name, value):
    environ = env(LISTEN_PID=PID, LISTEN_FDS=1)
    environ[name] = value
    with pytest.raises(ValueError, match=name):
        parse_inheritance(environ, PID)


def test_a_handover_adds_the_channel_after_the_listeners_and_the_endpoints():
    endpoints = [ep.Endpoint("etcd-1.example.com", 2379, 0, 10, "10.0.0.1", True, "etcd-1.example.com")]
    environ = env(LISTEN_PID=PID, LISTEN_FDS=2, LISTEN_FDNAMES="proxy:status",
                  ETCD_GATEWAY_HANDOVER_FD=5,
                  ETCD_GATEWAY_HANDOVER_ENDPOINTS=encode_endpoints(endpoints))
    assert parse_inheritance(environ, PID) == Inheritance({"proxy": 3, "status": 4}, 5, endpoints)


@pytest.mark.parametrize("fd", ["3", "5", "-1", "x", ""])
def test_a_channel_anywhere_else_is_refused(fd):
    environ = env(LISTEN_PID=PID, LISTEN_FDS=1, ETCD_GATEWAY_HANDOVER_FD=fd)
    with pytest.raises(ValueError, match="ETCD_GATEWAY_HANDOVER_FD"):
        parse_inheritance(environ, PID)


def test_a_handover_for_another_process_is_ignored_too():
    environ = env(LISTEN_PID=PID + 1, LISTEN_FDS=1, ETCD_GATEWAY_HANDOVER_FD=4,
                  ETCD_GATEWAY_HANDOVER_ENDPOINTS="garbage")
    assert parse_inheritance(environ, PID) == Inheritance({}, -1, None)


# -- the endpoint set ---------------------------------------------------------------------------

EXAMPLES = [
    ep.Endpoint("10.0.0.1", 2379, address="10.0.0.1"),
    ep.Endpoint("etcd.example.com", 2379, 10, 0, "192.0.2.7", False, ""),
    ep.Endpoint("m1.example.com.", 12379, 0, 65535, "2001:db8::1", True, "example.com"),
    ep.Endpoint("::1", 2379, address="::1"),
    ep.Endpoint("unresolved.example", 1, address=""),
]


def test_the_endpoint_set_survives_the_trip():
    assert decode_endpoints(encode_endpoints(EXAMPLES)) == EXAMPLES


hosts = st.one_of(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
                  st.ip_addresses().map(str))


@given(st.lists(st.builds(lambda host, port, priority, weight, address, secure, tls_name:
                          ep.Endpoint(host, port, priority, weight, address, secure, tls_name),
                          hosts, st.integers(1, 65535), st.integers(0, 65535), st.integers(0, 65535),
                          st.one_of(st.just(""), st.ip_addresses().map(str)), st.booleans(),
                          st.one_of(st.just(""), hosts)), min_size=1, max_size=8))
def test_any_endpoint_set_survives_the_trip(endpoints):
    assert decode_endpoints(encode_endpoints(endpoints)) == endpoints


@pytest.mark.parametrize("text", [
    "", "h 2379 0 1 10.0.0.1 0", "h 2379 0 1 10.0.0.1 0  extra", "h 0 0 1 10.0.0.1 0 ",
    "h 65536 0 1 10.0.0.1 0 ", "h 2379 0 65536 10.0.0.1 0 ", "h 2379 -1 1 10.0.0.1 0 ",
    "h 2379 0 1 not-an-ip 0 ", "h 2379 0 1 10.0.0.1 2 ", "h 2379 0 1 10.0.0.1 yes ",
    "bad_host! 2379 0 1 10.0.0.1 0 ", " 2379 0 1 10.0.0.1 0 ", "h 2379 0 1 10.0.0.1 0 bad!name",
    "h 2379 0 1 10.0.0.1 0 ,", "h\t2379 0 1 10.0.0.1 0 ",
])
def test_malformed_endpoint_sets_are_refused(text):
    with pytest.raises(ValueError):
        decode_endpoints(text)


# -- the command line ---------------------------------------------------------------------------

ARGS = ["start", "--listen-addr=127.0.0.1:23790"]


@pytest.mark.parametrize("orig_argv, argv, way_in", [
    # python3 -X dev -m gateway start ...
    (["python3", "-X", "dev", "-m", "gateway"] + ARGS, ["/src/gateway.py"] + ARGS,
     ["-X", "dev", "-m", "gateway"]),
    # the console script: its shebang interpreter runs it
    (["/usr/bin/python3", "/usr/local/bin/etcd-gateway"] + ARGS, ["/usr/local/bin/etcd-gateway"] + ARGS,
     ["/usr/local/bin/etcd-gateway"]),
    # python3 -I etcd-gateway.pyz start ...
    (["python3", "-I", "/usr/local/lib/etcd-gateway.pyz"] + ARGS, ["/usr/local/lib/etcd-gateway.pyz"] + ARGS,
     ["-I", "/usr/local/lib/etcd-gateway.pyz"]),
])
def test_restart_command_keeps_the_way_in_and_the_options(orig_argv, argv, way_in):
    command = restart_command("/usr/bin/python3", orig_argv, argv, argv[1:])
    assert command == ["/usr/bin/python3"] + way_in + ARGS


def test_restart_command_uses_the_arguments_main_was_given():
    command = restart_command("/py", ["py", "-m", "gateway", "start"], ["/g.py", "start"], ["start", "--x"])
    assert command == ["/py", "-m", "gateway", "start", "--x"]


def test_restart_command_without_orig_argv_runs_the_file():
    # Python 3.8 and 3.9: `-m gateway` has set sys.argv[0] to gateway.py's path.
    assert restart_command("/py", None, ["/src/gateway.py"] + ARGS, ARGS, ["-O"]) == \
        ["/py", "-O", "/src/gateway.py"] + ARGS


@pytest.mark.parametrize("executable, argv", [("", ["/g.py"]), ("/py", ["-c"]), ("/py", [""]), ("/py", [])])
def test_restart_command_refuses_what_it_cannot_rebuild(executable, argv):
    with pytest.raises(ValueError):
        restart_command(executable, None, argv, ARGS)


def test_interpreter_options_of_this_interpreter():
    options = gateway.interpreter_options()
    assert all(option.startswith("-") for option in options)
    if sys.flags.optimize:
        assert "-" + "O" * sys.flags.optimize in options


def test_this_process_would_be_run_again_the_same_way():
    command = restart_command(sys.executable, getattr(sys, "orig_argv", None), sys.argv, sys.argv[1:],
                              gateway.interpreter_options())
    assert command[0] == sys.executable and command[-len(sys.argv) + 1:] == sys.argv[1:]


# -- descriptors --------------------------------------------------------------------------------

@pytest.mark.parametrize("sitting_at", [(3, 4, 5), (5, 3, 4), (4, 5, 3), (5, 4, 3), (9, 3, 4)])
def test_place_descriptors_never_clobbers(sitting_at):
    """Three sockets sitting at `sitting_at` in a forked child end at 3, 4, 5 in order, though a
    naive dup2 of the first onto 3 would clobber another one still to be moved."""
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        pid = os.fork()
        if pid == 0:
            try:
                high = [fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 100) for a, _ in pairs]
                for fd, target in zip(high, sitting_at):
                    os.dup2(fd, target)
                place_descriptors(list(sitting_at))
                for position, fd in enumerate((3, 4, 5)):
                    assert os.get_inheritable(fd)
                    os.write(fd, b"%d" % position)
            except BaseException:
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        for position, (_, peer) in enumerate(pairs):
            peer.settimeout(5)
            assert peer.recv(1) == b"%d" % position
    finally:
        for a, b in pairs:
            a.close()
            b.close()
