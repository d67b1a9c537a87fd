"""Unit and property tests of endpoints.py: parsing, RFC 2782 choice, policies, health bookkeeping."""
import collections
import random

import pytest
from hypothesis import given, settings, strategies as st

import endpoints as ep
from support import health_of


# -- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, host, port, address", [
    ("127.0.0.1:2379", "127.0.0.1", 2379, "127.0.0.1"),
    ("http://127.0.0.1:2379", "127.0.0.1", 2379, "127.0.0.1"),
    ("https://10.0.0.1:2379/", "10.0.0.1", 2379, "10.0.0.1"),
    ("[::1]:2379", "::1", 2379, "::1"),
    ("http://[::1]:22379", "::1", 22379, "::1"),
    ("etcd-1.example.com:2379", "etcd-1.example.com", 2379, ""),
    ("localhost:1", "localhost", 1, ""),
    (" 127.0.0.1:65535 ", "127.0.0.1", 65535, "127.0.0.1"),
])
def test_parse_endpoint_accepts(text, host, port, address):
    endpoint = ep.parse_endpoint(text)
    assert (endpoint.host, endpoint.port, endpoint.address) == (host, port, address)


@pytest.mark.parametrize("text", [
    "127.0.0.1", "127.0.0.1:", ":2379", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x",
    "::1:2379", "[::1]", "[::1]2379", "[nonsense]:2379", "host name:2379", "bad_label..x:1",
    "http://", "a" * 64 + ".com:1",
])
def test_parse_endpoint_rejects(text):
    with pytest.raises(ValueError):
        ep.parse_endpoint(text)


def test_parse_endpoints_splits_dedupes_and_skips_empty_items():
    parsed = ep.parse_endpoints("127.0.0.1:1,, http://127.0.0.1:1,[::1]:2")
    assert [str(e) for e in parsed] == ["127.0.0.1:1", "[::1]:2"]
    assert ep.parse_endpoints("") == []


@given(st.ip_addresses(), st.integers(1, 65535))
def test_format_and_parse_round_trip(address, port):
    text = ep.format_hostport(str(address), port)
    endpoint = ep.parse_endpoint(text)
    assert (endpoint.host, endpoint.port) == (str(address), port)
    assert str(endpoint) == text


# -- RFC 2782 choice -----------------------------------------------------------------------------

def _eps(*weights, priority=0):
    return [ep.Endpoint("10.0.0.%d" % i, 2379, priority=priority, weight=w) for i, w in enumerate(weights)]


def test_equal_weights_split_evenly_unlike_the_go_gateway():
    rng = random.Random(1)
    candidates = _eps(1, 1)
    counts = collections.Counter(ep.choose_weighted(candidates, rng).host for _ in range(4000))
    assert 1800 < counts["10.0.0.0"] < 2200 and 1800 < counts["10.0.0.1"] < 2200


def test_weights_are_proportional():
    rng = random.Random(2)
    candidates = _eps(10, 30)
    counts = collections.Counter(ep.choose_weighted(candidates, rng).host for _ in range(8000))
    assert 0.2 < counts["10.0.0.0"] / 8000 < 0.3


def test_zero_weight_is_chosen_only_rarely():
    rng = random.Random(3)
    candidates = _eps(0, 50)
    counts = collections.Counter(ep.choose_weighted(candidates, rng).host for _ in range(5100))
    assert 0 < counts["10.0.0.0"] < 300


def test_all_zero_weights_are_uniform():
    rng = random.Random(4)
    candidates = _eps(0, 0, 0)
    counts = collections.Counter(ep.choose_weighted(candidates, rng).host for _ in range(3000))
    assert all(800 < counts[e.host] < 1200 for e in candidates)


@given(st.lists(st.integers(0, 100), min_size=1, max_size=8), st.integers(0, 2 ** 32))
def test_choice_is_always_a_candidate_with_positive_weight_when_any(weights, seed):
    candidates = _eps(*weights)
    chosen = ep.choose_weighted(candidates, random.Random(seed))
    assert chosen in candidates
    if any(weights) and chosen.weight == 0:
        assert chosen is sorted(candidates, key=lambda e: e.weight != 0)[0]


def test_lowest_priority_class_only():
    low = _eps(1, 1, priority=10)
    high = [ep.Endpoint("10.1.0.1", 2379, priority=20, weight=100)]
    assert ep.lowest_priority_class(low + high) == low
    assert ep.lowest_priority_class([]) == []


# -- policies and health ---------------------------------------------------------------------

def _pool(policy, n=3, retry_delay=10.0, seed=0):
    endpoints = [ep.Endpoint("127.0.0.%d" % (i + 1), 2379, address="127.0.0.%d" % (i + 1)) for i in range(n)]
    return endpoints, ep.Pool(endpoints, policy, retry_delay, random.Random(seed))


def test_sticky_keeps_one_endpoint_until_it_fails():
    endpoints, pool = _pool("sticky")
    first = pool.plan()[0]
    assert all(pool.plan()[0] == first for _ in range(50))
    assert pool.mark_failed(first, now=100.0, reason="connection refused") is True
    second = pool.plan()[0]
    assert second != first
    assert all(pool.plan()[0] == second for _ in range(50))


def test_sticky_choice_is_random_across_pools():
    chosen = {_pool("sticky", seed=seed)[1].plan()[0].host for seed in range(40)}
    assert len(chosen) == 3


def test_round_robin_visits_every_endpoint_in_turn():
    endpoints, pool = _pool("round-robin")
    firsts = [pool.plan()[0] for _ in range(9)]
    assert collections.Counter(firsts) == {e: 3 for e in endpoints}
    assert firsts[:3] == firsts[3:6]


def test_plan_lists_up_endpoints_then_down_ones_each_once():
    endpoints, pool = _pool("sticky")
    pool.mark_failed(endpoints[0], now=0.0, reason="refused")
    plan = pool.plan()
    assert sorted(plan, key=str) == sorted(endpoints, key=str)
    assert plan[-1] == endpoints[0]


def test_all_down_still_plans_every_endpoint():
    endpoints, pool = _pool("round-robin")
    for i, endpoint in enumerate(endpoints):
        pool.mark_failed(endpoint, now=float(i), reason="refused")
    assert pool.plan() == endpoints  # oldest failure first
    assert not any(health.up for health in pool.healths())


def test_mark_failed_reports_only_the_transition():
    endpoints, pool = _pool("sticky")
    assert pool.mark_failed(endpoints[1], 0.0, "x") is True
    assert pool.mark_failed(endpoints[1], 1.0, "x") is False
    assert health_of(pool, endpoints[1]).dial_failures == 2
    assert health_of(pool, endpoints[1]).last_error == "x"
    assert pool.mark_up(endpoints[1]) is True
    assert pool.mark_up(endpoints[1]) is False


def test_due_probes_after_retry_delay_and_not_twice():
    endpoints, pool = _pool("sticky", retry_delay=10.0)
    pool.mark_failed(endpoints[0], now=0.0, reason="refused")
    assert pool.next_probe_deadline() == 10.0
    assert pool.due_probes(9.9) == []
    assert pool.due_probes(10.0) == [endpoints[0]]
    assert pool.due_probes(10.1) == []  # in flight: pushed a retry delay further
    assert pool.next_probe_deadline() == 20.0


def test_replace_keeps_health_of_staying_endpoints():
    endpoints, pool = _pool("sticky")
    pool.mark_failed(endpoints[0], now=0.0, reason="refused")
    newcomer = ep.Endpoint("127.0.0.9", 2379, address="127.0.0.9")
    added, removed = pool.replace([endpoints[0], newcomer])
    assert added == [newcomer] and removed == endpoints[1:]
    assert not health_of(pool, endpoints[0]).up
    assert health_of(pool, newcomer).up
    assert not pool.contains(endpoints[1])
    assert pool.plan()[0] == newcomer


def test_replace_drops_a_removed_sticky_choice():
    endpoints, pool = _pool("sticky")
    current = pool.plan()[0]
    pool.replace([e for e in endpoints if e != current])
    assert pool.plan()[0] != current


def test_priority_classes_are_respected_by_both_policies():
    low = ep.Endpoint("127.0.0.1", 1, priority=1, address="127.0.0.1")
    high = ep.Endpoint("127.0.0.2", 1, priority=5, address="127.0.0.2")
    for policy in ep.POLICIES:
        pool = ep.Pool([high, low], policy, 1.0, random.Random(0))
        assert all(pool.plan()[0] == low for _ in range(10))
        pool.mark_failed(low, 0.0, "refused")
        assert pool.plan()[0] == high


def test_connection_counts():
    endpoints, pool = _pool("sticky")
    pool.connection_opened(endpoints[0])
    pool.connection_opened(endpoints[0])
    pool.connection_closed(endpoints[0])
    assert health_of(pool, endpoints[0]).active == 1
    pool.connection_closed(ep.Endpoint("gone", 1))  # removed endpoints are ignored
    assert pool.connection_opened(ep.Endpoint("gone", 1)) is False


def test_a_connection_to_a_failed_endpoint_brings_it_back_once():
    endpoints, pool = _pool("sticky")
    pool.mark_failed(endpoints[1], 0.0, "refused")
    assert not health_of(pool, endpoints[1]).up
    assert pool.connection_opened(endpoints[1]) is True  # its dial has just succeeded
    assert pool.connection_opened(endpoints[1]) is False
    assert health_of(pool, endpoints[1]).up and health_of(pool, endpoints[1]).active == 2
    assert all(health_of(pool, endpoint).up for endpoint in pool.plan())


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        ep.Pool([], "random", 1.0, random.Random())


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["fail", "up", "open", "plan"]), st.integers(0, 3)),
                max_size=40),
       st.sampled_from(ep.POLICIES))
def test_plan_always_covers_every_endpoint_exactly_once(actions, policy):
    endpoints, pool = _pool(policy, n=4)
    now = 0.0
    for action, index in actions:
        now += 1.0
        if action == "fail":
            pool.mark_failed(endpoints[index], now, "refused")
        elif action == "up":
            pool.mark_up(endpoints[index])
        elif action == "open":
            was_down = not health_of(pool, endpoints[index]).up
            assert pool.connection_opened(endpoints[index]) is was_down
            assert health_of(pool, endpoints[index]).up
        plan = pool.plan()
        assert sorted(plan, key=str) == sorted(endpoints, key=str)
        if any(health.up for health in pool.healths()):
            assert health_of(pool, plan[0]).up


# -- etcd-aware health checks ------------------------------------------------------------------

def test_three_failed_checks_take_an_endpoint_out_and_two_successes_bring_it_back():
    endpoints, pool = _pool("sticky")
    target = endpoints[0]
    checks = [pool.record_check(target, False, "no leader") for _ in range(3)]
    assert checks == [None, None, ep.HealthChange.UNHEALTHY]
    assert not health_of(pool, target).healthy and health_of(pool, target).last_error == "no leader"
    assert all(pool.plan()[0] != target for _ in range(30))
    assert pool.record_check(target, True) is None
    assert pool.record_check(target, False, "timeout") is None  # a failure resets the streak
    assert [pool.record_check(target, True) for _ in range(2)] == [None, ep.HealthChange.HEALTHY]


def test_a_success_between_failures_prevents_flapping():
    endpoints, pool = _pool("sticky")
    for ok in (False, False, True, False, False, True):
        assert pool.record_check(endpoints[0], ok, "x") is None
    assert health_of(pool, endpoints[0]).healthy


def test_when_every_endpoint_is_unhealthy_reachable_ones_still_serve():
    endpoints, pool = _pool("round-robin")
    for endpoint in endpoints:
        for _ in range(3):
            pool.record_check(endpoint, False, "no leader")
    plan = pool.plan()
    assert sorted(plan, key=str) == sorted(endpoints, key=str)
    pool.mark_failed(endpoints[1], 0.0, "refused")
    assert pool.plan()[-1] == endpoints[1]  # the unreachable one comes last


def test_unhealthy_endpoints_follow_healthy_ones_in_the_plan():
    endpoints, pool = _pool("sticky")
    for _ in range(3):
        pool.record_check(endpoints[2], False, "x")
    assert pool.plan()[-1] == endpoints[2]


def test_sticky_plan_is_cached_but_each_caller_gets_its_own_list():
    endpoints, pool = _pool("sticky")
    first = pool.plan()
    first.pop(0)  # a relay consumes its plan
    assert len(pool.plan()) == 3
    pool.mark_failed(pool.plan()[0], now=0.0, reason="refused")
    assert health_of(pool, pool.plan()[0]).up  # the cache was dropped with the change
