"""The --busy-poll policy (BusyPoll) on its own, and the two ways the Reactor consults it.

BusyPoll is told what each wait brought (`observe`) and how long a sleeping wait took
(`slept`), and answers how long to poll before the next wait sleeps (`window`). Its tests feed
it batches of (fd, handler) pairs; no reactor, no clock. The Reactor's side is checked with a
scripted poll function and a policy stub that records what it was asked.
"""
import socket

import pytest
from hypothesis import given, strategies as st

import gateway

LIMIT = 100e-6


def lone(handler, fd=3):
    """A batch of one event for `handler` on `fd`."""
    return [(fd, handler)]


def see(policy, batch):
    """Tell `policy` what a wait brought, as the reactor does: the lone event's fd and handler."""
    policy.observe(*(batch[0] if len(batch) == 1 else (None, None)))


def conversing(limit=LIMIT, handler="relay", fd=3, gap=40e-6):
    """A policy that has seen `handler`'s lone events on `fd` with a sleep of `gap` between."""
    policy = gateway.BusyPoll(limit)
    see(policy, lone(handler, fd))
    policy.slept(gap)
    see(policy, lone(handler, fd))
    return policy


# ======================================================================================= policy ==

@given(st.floats(0, 1.0), st.floats(1e-6, 1e-3))
def test_spin_window_fits_the_limit_and_covers_short_waits(waited, limit):
    window = gateway.spin_window_after(waited, limit)
    assert 0.0 <= window <= limit
    if waited <= limit:
        assert window >= waited  # the next wait that long is caught by the spin
    elif waited <= 2 * limit:
        assert window == limit  # that wait included our own wake-up: spinning may catch it
    else:
        assert window == 0.0  # sparse traffic: no spinning at all


def test_a_fresh_policy_sleeps_at_once_and_learns_nothing_without_a_conversation():
    policy = gateway.BusyPoll(LIMIT)
    assert policy.window() == 0.0
    policy.slept(10e-6)  # no lone event before this wait: nobody to learn it for
    assert policy.window() == 0.0


def test_a_short_gap_after_a_lone_event_is_learnt_with_a_margin():
    policy = conversing(gap=40e-6)
    assert policy.window() == pytest.approx(50e-6)
    policy.slept(30e-6)
    see(policy, lone("relay"))
    assert policy.window() == pytest.approx(37.5e-6)  # follows the latest gap


@pytest.mark.parametrize("gap, window", [
    (150e-6, LIMIT),  # up to twice the limit: our own wake-up was in it, a full spin may catch it
    (250e-6, 0.0),  # longer: sparse traffic, spinning would only burn CPU
    (0.5, 0.0),
])
def test_a_longer_gap_spins_the_whole_limit_or_not_at_all(gap, window):
    assert conversing(gap=gap).window() == pytest.approx(window)


@pytest.mark.parametrize("batch", [
    lone("another relay"),  # a second conversation takes a turn
    lone("relay") + lone("another relay"),  # two at once: one sleep gathers them
    [],  # a timer was due
], ids=["another-handler", "two-events", "no-events"])
def test_spinning_stops_once_the_conversation_is_not_alone_and_resumes_when_it_is(batch):
    policy = conversing()
    see(policy, batch)
    policy.slept(20e-6)  # learnt for whoever is alone now, if anyone
    see(policy, lone("relay"))
    assert policy.window() == 0.0  # what was learnt before is forgotten
    policy.slept(20e-6)
    see(policy, lone("relay"))
    assert policy.window() == pytest.approx(25e-6)  # alone again: learning anew


def test_the_gap_after_each_descriptor_is_learnt_apart():
    """Request/response: the backend answers at once, the client pauses before its next request.
    Spin for the answer (after the client's event), sleep through the pause (after the backend's)."""
    client, backend = 5, 6
    policy = gateway.BusyPoll(50e-6)
    see(policy, lone("relay", client))  # a request arrived
    for _ in range(3):
        policy.slept(20e-6)  # the backend's answer
        see(policy, lone("relay", backend))
        assert policy.window() == 0.0  # after the backend's event: the client's pause comes
        policy.slept(1e-3)  # the client's pause
        see(policy, lone("relay", client))
        assert policy.window() == pytest.approx(25e-6)  # after the client's: the answer comes


# ================================================================= the reactor consults it ==

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedSelect:
    """A select function answering from a script of (seconds the call takes, events it returns)."""

    def __init__(self, clock, script):
        self.clock, self.script, self.timeouts = clock, list(script), []

    def __call__(self, timeout):
        self.timeouts.append(timeout)
        assert self.script, "select called more often than scripted"
        took, events = self.script.pop(0)
        self.clock.now += took
        return events


class RecordingPolicy:
    """A policy stub with a fixed window that records what the reactor tells it."""

    def __init__(self, window):
        self._window = window
        self.slept_for, self.observed = [], []

    def window(self):
        return self._window

    def slept(self, waited):
        self.slept_for.append(waited)

    def observe(self, lone_fd, lone_handler):
        self.observed.append([(lone_fd, lone_handler)] if lone_fd is not None else [])


def relay_readable(reactor):
    """Register a socket for a handler named "relay": (the poll batch of its readable event, the
    batch the policy should be told of, the sockets to close)."""
    sockets = socket.socketpair()
    reactor.register(sockets[0], gateway.EVENT_READ, "relay")
    fd = sockets[0].fileno()
    return [(fd, gateway.POLL_IN)], lone("relay", fd), sockets


def test_the_reactor_polls_within_the_window_and_returns_what_the_spin_caught():
    clock, policy = FakeClock(), RecordingPolicy(LIMIT)
    reactor = gateway.Reactor(clock=clock, busy_poll=policy)
    events, told, sockets = relay_readable(reactor)
    select = ScriptedSelect(clock, [(10e-6, [])] * 3 + [(10e-6, events)])
    assert reactor._wait(select, 2.0) == events
    assert select.timeouts == [0, 0, 0, 0]  # caught without sleeping
    assert policy.observed == [told] and policy.slept_for == []  # nothing slept: nothing learnt
    reactor.close()
    for sock in sockets:
        sock.close()


@pytest.mark.parametrize("window, timeout, polls, sleep_timeout", [
    # polls while within the window; the sleep keeps the deadline
    (LIMIT, 2.0, 4, pytest.approx(2.0 - 120e-6)),
    (1e-3, 50e-6, 2, 0.0),  # never polls past a due timer
    (0.0, 2.0, 0, 2.0),  # no window: sleeps at once
])
def test_the_reactor_polls_no_longer_than_the_window_or_the_next_timer_then_sleeps(window, timeout, polls,
                                                                                   sleep_timeout):
    clock, policy = FakeClock(), RecordingPolicy(window)
    reactor = gateway.Reactor(clock=clock, busy_poll=policy)
    events, told, sockets = relay_readable(reactor)
    select = ScriptedSelect(clock, [(30e-6, [])] * polls + [(0.5, events)])
    assert reactor._wait(select, timeout) == events
    assert select.timeouts == [0] * polls + [sleep_timeout]
    assert policy.slept_for == [pytest.approx(clock.now)]  # the whole wait, polls included
    assert policy.observed == [told]
    reactor.close()
    for sock in sockets:
        sock.close()
