"""bench/goals.py, issue 16's goals as data: a cell whose rounds straddle a target is flagged
rather than quoted as met or missed, the interval of a pooled median decides it, and each run's
medians are held to the per-run floors. Both bench/run.py (one run) and bench/pool.py (several)
print these verdicts."""
import contextlib
import io

from hypothesis import given, strategies as st

from support import load_script

goals = load_script("bench/goals.py")
pool = load_script("bench/pool.py")
run = load_script("bench/run.py")

CHURN_CPU_HAPROXY = goals.Goal(goals.CHURN, goals.CPU, "haproxy", 1.15)
UPLOAD = goals.Goal("bulk 8 streams up", goals.THROUGHPUT, "go", 1.0)
ratio_lists = st.lists(st.floats(min_value=0.1, max_value=10.0), min_size=1, max_size=30)


def test_cpu_goals_are_ceilings_and_throughput_goals_floors():
    assert CHURN_CPU_HAPROXY.met_by(1.15) and not CHURN_CPU_HAPROXY.met_by(1.16)
    assert UPLOAD.met_by(1.0) and not UPLOAD.met_by(0.99)
    assert str(CHURN_CPU_HAPROXY) == "churn (Connection: close) c=64: CPU <= 1.15x haproxy"


def test_rounds_on_both_sides_of_a_target_straddle_it_whatever_the_median():
    assert goals.round_verdict(CHURN_CPU_HAPROXY, [1.10, 1.12, 1.14]) == "met in every load"
    assert goals.round_verdict(CHURN_CPU_HAPROXY, [1.16, 1.20]) == "missed in every load"
    assert goals.round_verdict(CHURN_CPU_HAPROXY, [1.10, 1.12, 1.30]) == "STRADDLES (median meets)"
    assert goals.round_verdict(CHURN_CPU_HAPROXY, [1.10, 1.22, 1.30]) == "STRADDLES (median misses)"
    assert goals.round_verdict(CHURN_CPU_HAPROXY, []) == "not measured"


@given(ratio_lists, st.sampled_from(goals.GOALS))
def test_a_verdict_of_every_round_agrees_with_each_round(values, goal):
    verdict = goals.round_verdict(goal, values)
    assert (verdict == "met in every load") == all(goal.met_by(v) for v in values)
    assert (verdict == "missed in every load") == (not any(goal.met_by(v) for v in values))


def test_only_an_interval_wholly_on_one_side_decides_a_goal():
    assert goals.interval_verdict(CHURN_CPU_HAPROXY, (1.06, 1.13)) == "met"
    assert goals.interval_verdict(CHURN_CPU_HAPROXY, (1.16, 1.19)) == "MISSED"
    assert goals.interval_verdict(CHURN_CPU_HAPROXY, (1.11, 1.18)).startswith("UNDECIDED")


def test_keep_alive_has_the_higher_per_run_floor():
    medians = {"http keep-alive c=64": 0.94, "bulk 8 streams up": 0.91, "etcd range c=64": 0.899}
    assert goals.run_floor_misses(medians) == ["http keep-alive c=64 0.940x", "etcd range c=64 0.899x"]
    line = goals.run_floor_summary({"http keep-alive c=512": 0.96, "bulk 1 stream up": 0.93})
    assert line == "every throughput at or above its per-run floor (lowest: bulk 1 stream up 0.93x Go)"


def test_the_table_lists_only_the_goals_measured():
    def ratios(workload, measure, reference):
        measured = (workload, measure, reference) == (goals.CHURN, goals.CPU, "haproxy")
        return [1.05, 1.20, 1.10] if measured else []

    header, _, *rows = goals.goal_table(ratios)
    assert rows == ["| churn (Connection: close) c=64: CPU <= 1.15x haproxy | 3 | 1.10 (1.05-1.20) "
                    "| STRADDLES (median meets) |"]
    header, _, row = goals.goal_table(ratios, interval=lambda values: (1.06, 1.13))
    assert header.count("|") == 7 and row.endswith("| 1.06-1.13 | met |")


# -- the two tools ------------------------------------------------------------------------------

CHURN = run.Workload("churn", goals.CHURN, "conn/s", "µs/conn", None)
C64 = run.Workload("http-64", "http keep-alive c=64", "req/s", "µs/req", None)
# Two rounds of one run, as bench/run.py collects them: one row per round for each proxy.
RESULTS = {
    ("churn", "ours"): [dict(value=12000.0, cpu_us=80.0, core_us=82.0),
                        dict(value=11000.0, cpu_us=87.0, core_us=90.0)],
    ("churn", "haproxy"): [dict(value=13000.0, cpu_us=72.0, core_us=74.0),
                           dict(value=12000.0, cpu_us=74.0, core_us=75.0)],
    ("churn", "go"): [dict(value=9000.0, cpu_us=100.0, core_us=100.0),
                      dict(value=9000.0, cpu_us=110.0, core_us=112.0)],
    ("http-64", "ours"): [dict(value=60000.0, cpu_us=14.0), {"failed": "crashed"}],
    ("http-64", "go"): [dict(value=66000.0, cpu_us=14.0), dict(value=66000.0, cpu_us=14.0)],
}


def test_one_run_pairs_ours_with_each_reference_round_by_round():
    assert run.paired_ratios(RESULTS, [CHURN, C64], goals.CHURN, goals.CPU, "haproxy") == [80 / 72, 87 / 74]
    # a failed round is left out, not paired with the next
    assert run.paired_ratios(RESULTS, [CHURN, C64], C64.label, goals.THROUGHPUT, "go") == [60 / 66]


def test_the_run_report_flags_straddles_and_its_per_run_floors():
    lines = run.goal_lines(RESULTS, [CHURN, C64])
    row = next(line for line in lines if line.startswith(f"| {goals.CHURN}: CPU <= 1.15x haproxy"))
    assert row.endswith("| 2 | 1.14 (1.11-1.18) | STRADDLES (median meets) |"), row
    assert lines[-1] == "Per-run floors (this run's medians of the paired ratios): " \
                        "BELOW the per-run floor: http keep-alive c=64 0.909x."


def test_pooled_runs_get_the_interval_and_one_floor_line_per_run(tmp_path, capsys):
    paths = []
    for name, ours_64 in (("a.log", 64000.0), ("b.log", 60000.0)):
        with contextlib.redirect_stderr(io.StringIO()) as log:
            for proxy, value in (("go", 66000.0), ("ours", ours_64)):
                run.progress(0, 1, proxy, C64, dict(value=value, cpu_us=14.0, core_us=14.0))
        (tmp_path / name).write_text(log.getvalue())
        paths.append(str(tmp_path / name))
    assert pool.main(["--goals"] + paths) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("| http keep-alive c=64: throughput >= 1.00x go"))
    assert row.endswith("| 2 | 0.94 (0.91-0.97) | missed in every load | 0.91-0.97 | MISSED |"), row
    assert out[-2:] == [
        f"{paths[0]}: every throughput at or above its per-run floor (lowest: http keep-alive c=64 0.97x Go)",
        f"{paths[1]}: BELOW the per-run floor: http keep-alive c=64 0.909x"]
