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


def test_interleaving_by_load_runs_each_load_through_every_proxy_in_turn(monkeypatch, capsys):
    calls = []

    def load(key):
        def run_(proxy):
            calls.append((key, proxy.name))
            if (key, proxy.name) == ("a", "broken"):
                raise RuntimeError("died during the load")
            return dict(value=1.0)
        return run.Workload(key, f"load {key}", "req/s", "µs/req", run_)

    monkeypatch.setattr(run, "start_proxy", lambda started, name, backend, settings:
                        run.Proxy(name, 1, f"proc of {name}"))
    monkeypatch.setattr(run, "sanity_check", lambda proxy, group: None)
    settings = run.Settings(rounds=1, load_seconds=1, idle_conns=1, proxy_nofile=64, python="python3",
                            etcdbin=None, workloads=[], interleave="load")
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
