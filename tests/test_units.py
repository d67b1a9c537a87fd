"""Unit tests of gateway.py's pure parts: Go durations, CLI parsing, log formatting, timers."""
import io
import json
import select

import pytest
from hypothesis import given, strategies as st

import gateway


@pytest.mark.parametrize("text, seconds", [
    ("0", 0.0), ("1s", 1.0), ("500ms", 0.5), ("1m", 60.0), ("1m30s", 90.0), ("2h45m", 9900.0),
    ("1.5h", 5400.0), ("300us", 0.0003), ("300\u00b5s", 0.0003), ("10ns", 1e-8), (".5s", 0.5),
    ("1h1m1s1ms", 3661.001),
])
def test_parse_duration_accepts_go_syntax(text, seconds):
    assert gateway.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "-1s", "1s ", "s", "1m-1s", "1.2.3s", "1 s", "1S"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        gateway.parse_duration(text)


@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["ms", "s", "m", "h"])),
                min_size=1, max_size=4))
def test_parse_duration_sums_its_parts(parts):
    text = "".join("%d%s" % (n, unit) for n, unit in parts)
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    assert gateway.parse_duration(text) == pytest.approx(sum(n * scale[u] for n, u in parts))


def test_defaults_match_the_go_gateway():
    options = gateway.parse_args(["start"])
    assert options.listen_addr == ("127.0.0.1", 23790)
    assert [str(e) for e in options.endpoints] == ["127.0.0.1:2379"]
    assert options.retry_delay == 60.0
    assert options.insecure_discovery is False
    assert options.discovery_srv == "" and options.discovery_srv_name == ""
    assert options.endpoints_given is False
    assert (options.dial_timeout, options.policy, options.shutdown_timeout) == (1.0, "sticky", 10.0)


def test_flag_forms_and_repeated_endpoints():
    options = gateway.parse_args(["start", "--endpoints", "http://127.0.0.1:1,127.0.0.1:2",
                                  "--endpoints=[::1]:3", "--listen-addr=[::1]:23790",
                                  "--insecure-discovery=false", "--retry-delay", "1m30s"])
    assert [str(e) for e in options.endpoints] == ["127.0.0.1:1", "127.0.0.1:2", "[::1]:3"]
    assert options.listen_addr == ("::1", 23790)
    assert options.insecure_discovery is False
    assert options.retry_delay == 90.0
    assert options.endpoints_given is True
    assert gateway.parse_args(["start", "--insecure-discovery"]).insecure_discovery is True


@pytest.mark.parametrize("argv", [
    ["start", "--bogus"], ["start", "--retry-delay=5x"], ["start", "--endpoints=127.0.0.1"],
    ["start", "--listen-addr=nope"], ["start", "--policy=random"], [], ["stop"],
    ["start", "--endp=127.0.0.1:1"],  # no abbreviations, like pflag
    ["start", "--dial-timeout=0"], ["start", "--health-interval=0s"],  # would be busy loops
    ["start", "--busy-poll=2ms"], ["start", "--busy-poll=-1us"],  # a spin that long is one too
])
def test_usage_errors_exit_2(argv, capsys):
    assert gateway.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_busy_poll_is_50us_by_default_0_turns_it_off_and_takes_go_durations():
    assert gateway.parse_args(["start"]).busy_poll == pytest.approx(50e-6)
    assert gateway.parse_args(["start", "--busy-poll=0"]).busy_poll == 0.0
    assert gateway.parse_args(["start", "--busy-poll=100us"]).busy_poll == pytest.approx(100e-6)
    assert gateway.parse_args(["start", "--busy-poll", "1ms"]).busy_poll == pytest.approx(1e-3)


def test_help_exits_0(capsys):
    assert gateway.main(["start", "--help"]) == 0
    assert "--listen-addr" in capsys.readouterr().out


def test_json_log_lines_parse():
    stream = io.StringIO()
    log = gateway.Log("debug", "json", stream=stream, wall_clock=lambda: 0.5)
    log.info("ready", endpoints=["a:1", "b:2"], count=3, ok=True, text='q"uo\\te\n')
    record = json.loads(stream.getvalue())
    assert record == {"level": "info", "ts": "1970-01-01T00:00:00.500Z", "msg": "ready",
                      "endpoints": ["a:1", "b:2"], "count": 3, "ok": True, "text": 'q"uo\\te\n'}


@given(st.text())
def test_json_strings_round_trip(text):
    assert json.loads(gateway._json_string(text)) == text


def test_text_log_quotes_values_with_spaces_and_respects_level():
    stream = io.StringIO()
    log = gateway.Log("info", "text", stream=stream, wall_clock=lambda: 0.0)
    log.debug("hidden")
    log.warn("endpoint down", endpoint="127.0.0.1:1", reason="connection refused")
    assert stream.getvalue() == ('1970-01-01T00:00:00.000Z warn endpoint down endpoint=127.0.0.1:1 '
                                 'reason="connection refused"\n')


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_rate_limited_log_says_how_many_were_held_back():
    stream, clock = io.StringIO(), FakeClock()
    log = gateway.Log("info", "text", stream=stream, wall_clock=lambda: 0.0, clock=clock)
    for _ in range(5):
        log.limited("warn", "k", 10.0, "accept paused")
    clock.advance(10.0)
    log.limited("warn", "k", 10.0, "accept paused")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].endswith("suppressed=4")


def test_reactor_timers_run_in_order_and_cancelled_ones_do_not():
    clock = FakeClock()
    reactor = gateway.Reactor(clock=clock)
    fired = []
    reactor.call_later(2.0, fired.append, "b")
    reactor.call_later(1.0, fired.append, "a")
    dropped = reactor.call_later(1.5, fired.append, "x")
    reactor.cancel(dropped)
    assert reactor._select_timeout() == 1.0
    clock.advance(2.0)
    reactor._run_due_timers()
    assert fired == ["a", "b"]
    assert reactor._select_timeout() is None
    reactor.close()


def test_reactor_compacts_a_heap_of_cancelled_timers():
    reactor = gateway.Reactor(clock=FakeClock())
    timers = [reactor.call_later(1.0, lambda: None) for _ in range(2000)]
    for timer in timers:
        reactor.cancel(timer)
    assert len(reactor._timers) < 1000
    reactor.close()


POLL_BITS = st.sets(st.sampled_from([gateway.POLL_IN, gateway.POLL_PRI, gateway.POLL_OUT,
                                      gateway.POLL_ERR, gateway.POLL_HUP, gateway.POLL_RDHUP]))


@given(POLL_BITS)
def test_every_report_epoll_can_make_is_translated(bits):
    events = sum(bits)
    mask = gateway._REPORTED[events]
    if bits & {gateway.POLL_PRI, gateway.POLL_ERR, gateway.POLL_HUP}:
        # as selectors does: every registered event, so that the handler's next call tells why;
        # never EVENT_CLOSED, whose short read would not be the last one (urgent data)
        assert mask == gateway.EVENT_READ | gateway.EVENT_WRITE
    else:
        assert bool(mask & gateway.EVENT_READ) == (gateway.POLL_IN in bits)
        assert bool(mask & gateway.EVENT_WRITE) == (gateway.POLL_OUT in bits)
        assert bool(mask & gateway.EVENT_CLOSED) == (gateway.POLL_RDHUP in bits)


def test_a_registration_for_eof_asks_epoll_for_half_closes_and_urgent_data():
    g = gateway
    if hasattr(select, "epoll"):  # the reactor's constants are epoll's own
        assert ((g.POLL_IN, g.POLL_PRI, g.POLL_OUT, g.POLL_ERR, g.POLL_HUP, g.POLL_RDHUP)
                == (select.EPOLLIN, select.EPOLLPRI, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP,
                    select.EPOLLRDHUP))
    assert g._POLL_EVENTS[g.READ_TO_EOF] == g.POLL_IN | g.POLL_RDHUP | g.POLL_PRI
    assert g._POLL_EVENTS[g.EVENT_READ | g.EVENT_WRITE] == g.POLL_IN | g.POLL_OUT


def test_a_failing_timer_is_logged_and_the_loop_goes_on():
    clock, stream = FakeClock(), io.StringIO()
    reactor = gateway.Reactor(clock=clock, log=gateway.Log(stream=stream))
    fired = []
    reactor.call_later(0.0, lambda: 1 / 0)
    reactor.call_later(0.0, fired.append, 1)
    reactor._run_due_timers()
    assert fired == [1] and "ZeroDivisionError" in stream.getvalue()
    reactor.close()


def test_connect_timeout_defaults_to_four_syns_and_may_not_undercut_the_dial_timeout(capsys):
    options = gateway.parse_args(["start"])
    assert (options.dial_timeout, options.connect_timeout) == (1.0, 8.0)
    with pytest.raises(SystemExit) as exited:
        gateway.parse_args(["start", "--dial-timeout=2s", "--connect-timeout=1s"])
    assert exited.value.code == 2
    assert "--connect-timeout (1s) must be at least --dial-timeout (2s)" in capsys.readouterr().err
