"""bench/run.py's interleaving of a load through every proxy of a group in turn (--interleave
load), with scripted proxies and loads: no process is started."""
from support import load_script

run = load_script("bench/run.py")


class FakeStarted:
    """What run_group_by_load asks of the harness: stop a proxy, show its log."""

    def __init__(self):
        self.stopped = []

    def stop(self, proc):
        self.stopped.append(proc)

    def log_tail(self, name):
        return f"({name}'s log)"


def fake_proxies(monkeypatch):
    """Every proxy 'starts' at once and passes its sanity check: no process is started."""
    monkeypatch.setattr(run, "start_proxy", lambda started, name, backend, settings:
                        run.Proxy(name, 1, f"proc of {name}"))
    monkeypatch.setattr(run, "sanity_check", lambda proxy, group: None)


def settings_of(load_seconds):
    """One round, interleaved by load (the default), with loads of `load_seconds`."""
    return run.Settings(rounds=1, load_seconds=load_seconds, idle_conns=1, proxy_nofile=64,
                        python="python3", etcdbin=None, workloads=[], interleave="load")


def test_interleaving_by_load_runs_each_load_through_every_proxy_in_turn(monkeypatch, capsys):
    calls = []

    def load(key):
        def run_(proxy):
            calls.append((key, proxy.name))
            if (key, proxy.name) == ("a", "broken"):
                raise RuntimeError("died during the load")
            return dict(value=1.0)
        return run.Workload(key, f"load {key}", "req/s", "µs/req", run_)

    fake_proxies(monkeypatch)
    settings = settings_of(1)
    started, results = FakeStarted(), {}
    run.run_group_by_load(started, 0, ["go", "broken", "ours"], "nginx", 1,
                          [load("a"), load("b")], settings, results)
    assert calls == [("a", "go"), ("a", "broken"), ("a", "ours"), ("b", "go"), ("b", "ours")]
    assert results[("a", "broken")] == [{"failed": "died during the load"}]
    assert results[("b", "broken")] == [{"failed": "died during the load"}]  # one row per round still
    assert results[("b", "ours")] == [dict(value=1.0)]
    assert started.stopped == ["proc of broken", "proc of go", "proc of ours"]  # the failed one at once
    assert "broken FAILED at load a" in capsys.readouterr().err


def test_a_run_interleaves_by_load_unless_asked_for_the_earlier_method():
    assert run.parse_args([]).interleave == "load"
    assert run.parse_args(["--interleave", "group"]).interleave == "group"


def test_a_load_in_pieces_runs_each_piece_through_every_proxy_and_a_failure_fills_the_round(
        monkeypatch, capsys):
    calls, results = [], {}

    def run_(proxy):
        calls.append(proxy.name)
        if proxy.name == "broken" and calls.count("broken") == 2:
            raise RuntimeError("died in the second piece")
        return dict(value=1.0)

    fake_proxies(monkeypatch)
    settings = settings_of(3)
    pieced = run.Workload("bulk-8-up", "bulk 8 streams up", "Gbit/s", "µs/MB", run_, pieces=3)
    later = run.Workload("bulk-8-down", "bulk 8 streams down", "Gbit/s", "µs/MB", run_, pieces=3)
    run.run_group_by_load(FakeStarted(), 0, ["go", "broken", "ours"], "iperf3", 1, [pieced, later],
                          settings, results)
    assert calls == ["go", "broken", "ours", "go", "broken", "ours", "go", "ours"] + ["go", "ours"] * 3
    assert results[("bulk-8-up", "go")] == [dict(value=1.0)] * 3
    failed = {"failed": "died in the second piece"}
    assert results[("bulk-8-up", "broken")] == [dict(value=1.0), failed, failed]  # lined up
    assert results[("bulk-8-down", "broken")] == [failed] * 3
    assert "[round 1/1 load 3/3] bulk 8 streams down" in capsys.readouterr().err


def test_interleaving_by_group_runs_a_proxys_pieces_in_a_row_and_a_failure_fills_the_round(
        monkeypatch, capsys):
    calls, results = [], {}

    def run_(proxy):
        calls.append(proxy.name)
        if proxy.name == "broken" and len(calls) == 2:
            raise RuntimeError("died in the second piece")
        return dict(value=1.0)

    fake_proxies(monkeypatch)
    settings = settings_of(3)._replace(interleave="group")
    pieced = run.Workload("bulk-8-up", "bulk 8 streams up", "Gbit/s", "µs/MB", run_, pieces=3)
    later = run.Workload("bulk-8-down", "bulk 8 streams down", "Gbit/s", "µs/MB", run_, pieces=3)
    for name in ("broken", "go"):
        run.run_group(FakeStarted(), 0, name, "iperf3", 1, [pieced, later], settings, results)
    assert calls == ["broken", "broken"] + ["go"] * 6
    failed = {"failed": "died in the second piece"}
    assert results[("bulk-8-up", "broken")] == [dict(value=1.0), failed, failed]
    assert results[("bulk-8-down", "broken")] == [failed] * 3
    assert results[("bulk-8-down", "go")] == [dict(value=1.0)] * 3
    assert "FAILED at bulk 8 streams up" in capsys.readouterr().err


def test_the_noisiest_loads_run_in_pieces_of_a_second(tmp_path, monkeypatch):
    seconds = {}
    monkeypatch.setattr(run, "wait_iperf3_idle", lambda port: None)
    monkeypatch.setattr(run, "iperf3", lambda proxy, streams, reverse, settings: seconds.setdefault(
        f"bulk-{streams}-{'down' if reverse else 'up'}", settings.load_seconds) and dict(mb=1))
    monkeypatch.setattr(run, "wrk", lambda proxy, path, conns, script, settings, close=False:
                        seconds.setdefault(f"http-{conns}", settings.load_seconds)
                        and dict(requests=1))
    backends = dict(iperf3=1, http=2, idle=3, etcd=4)
    lua = dict.fromkeys(("get", "paced", "put", "range"), tmp_path / "script.lua")
    workloads = {w.key: w for _, _, group in run.plan(backends, lua, settings_of(3)) for w in group}
    assert {key: w.pieces for key, w in workloads.items() if w.pieces > 1} == {
        "bulk-8-up": 6, "bulk-8-down": 3, "http-512": 3}
    for key in ("bulk-1-up", "bulk-8-up", "bulk-8-down", "http-64", "http-512"):
        workloads[key].run(run.Proxy(key, 1, None))
    assert seconds == {"bulk-1-up": 3, "bulk-8-up": 1, "bulk-8-down": 1, "http-64": 3,
                       "http-512": 1}
    quick = settings_of(1)
    assert all(w.pieces == 1 for _, _, group in run.plan(backends, lua, quick) for w in group)


def test_ours_runs_between_go_and_haproxy_and_the_order_rotates():
    proxies = list(run.DEFAULT_PROXIES)
    orders = [run.round_order(proxies, rnd) for rnd in range(8)]
    for order in orders:
        assert sorted(order) == sorted(proxies)
        at = order.index("ours")
        assert {order[at - 1], order[at + 1]} == {"go", "haproxy"}
    assert {order[0] for order in orders} == {"none", "haproxy", "ours-nospin", "floor"}
    assert orders[0].index("go") < orders[0].index("ours")  # and reversed in odd rounds
    assert orders[1].index("go") > orders[1].index("ours")
    assert run.round_order(["go", "haproxy", "none"], 1) == ["haproxy", "none", "go"]  # no ours
