"""bench/pool.py, which turns the benchmark's progress logs into the README's table: the paired
ratios it reads from what bench/run.py writes, and the interval of the median that says whether
a pooled cell meets a goal."""
import contextlib
import io
import statistics

import pytest
from hypothesis import given, strategies as st

from support import load_script

pool = load_script("bench/pool.py")
run = load_script("bench/run.py")

BULK = run.Workload("bulk-8-up", "bulk 8 streams up", "Gbit/s", "µs/MB", None)
HTTP = run.Workload("http-64", "http keep-alive c=64", "req/s", "µs/req", None)
# (round, workload, proxy, figures) as bench/run.py measures them; rounds list proxies in turn.
ROUNDS = [
    (0, BULK, "go", dict(value=10.0, cpu_us=300.0, core_us=310.0, machine_us=800.0, steal=0)),
    (0, BULK, "ours", dict(value=12.0, cpu_us=270.0, core_us=279.0, machine_us=760.0, steal=0)),
    (1, BULK, "ours", dict(value=9.0, cpu_us=330.0, core_us=341.0, machine_us=880.0, steal=0)),
    (1, BULK, "go", dict(value=10.0, cpu_us=300.0, core_us=310.0, machine_us=800.0, steal=0)),
    (0, HTTP, "go", dict(value=50000.0, p99=1.0, cpu_us=15.0, core_us=15.0, machine_us=30.0)),
    (0, HTTP, "ours", dict(value=55000.0, p99=0.5, cpu_us=13.5, core_us=13.5, machine_us=28.5)),
]


def progress_log(tmp_path):
    """A progress log written by bench/run.py's own progress()."""
    with contextlib.redirect_stderr(io.StringIO()) as lines:
        for rnd, workload, proxy, figures in ROUNDS:
            run.progress(rnd, 2, proxy, workload, figures)
    log = tmp_path / "run.log"
    log.write_text(lines.getvalue())
    return str(log)


ratios = st.lists(st.floats(min_value=0.1, max_value=10.0), min_size=1, max_size=40)


def test_rounds_are_paired_within_a_round(tmp_path):
    rounds = pool.read_rounds([progress_log(tmp_path)])
    throughput, cpu, core, machine, p99 = pool.paired_ratios(rounds["bulk 8 streams up"], "ours", "go")
    assert sorted(throughput) == [0.9, 1.2]
    assert sorted(cpu) == [0.9, 1.1] and sorted(machine) == [0.95, 1.1] and p99 == []
    assert pool.paired_ratios(rounds["http keep-alive c=64"], "ours", "go")[4] == [0.5]


@given(ratios)
def test_the_interval_of_the_median_holds_it_and_lies_within_the_rounds(values):
    low, high = pool.median_interval(values, draws=200)
    assert min(values) <= low <= statistics.median(values) <= high <= max(values)
    assert pool.median_interval(values, draws=200) == (low, high)  # seeded: a table rebuilds alike


def test_the_interval_narrows_with_more_rounds_and_vanishes_when_they_agree():
    assert pool.median_interval([1.07] * 9) == (1.07, 1.07)
    wide = pool.median_interval([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    narrow = pool.median_interval([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3] * 4)
    assert wide[0] < narrow[0] <= 1.0 <= narrow[1] < wide[1]


def test_a_cell_is_the_median_and_its_bounds(tmp_path, capsys):
    log = progress_log(tmp_path)
    for flag, bounds in (([], "(0.90-1.20)"), (["--interval"], "(0.90-1.20)")):
        assert pool.main(flag + [log]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("| bulk 8 streams up |"))
        assert row.startswith("| bulk 8 streams up | 2 | 1.05 %s |" % bounds), (flag, row)


def test_help_and_an_unknown_option_are_answered_not_opened_as_logs(tmp_path, capsys):
    assert pool.main(["--help"]) == 0
    assert "bench/pool.py --interval" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        pool.main(["--quartile", progress_log(tmp_path)])
    assert "unknown option --quartile" in str(exit_.value.code)


def test_the_default_run_needs_no_baseline():
    """`python3 bench/run.py` alone runs: ours-base comes only with --baseline (which adds it),
    and the floor runs by default beside ours."""
    proxies = run.parse_args([]).proxies.split(",")
    assert "ours-base" not in proxies
    assert {"go", "haproxy", "ours", "floor"} <= set(proxies)


def test_the_table_leaves_out_a_proxy_that_did_not_run_a_load():
    """The floor runs no bulk load: no row of dashes for it there."""
    results = {("bulk-8-up", "go"): [dict(value=10.0, cpu_us=300.0)],
               ("http-64", "go"): [dict(value=50000.0, cpu_us=15.0)],
               ("http-64", "floor"): [dict(value=52000.0, cpu_us=14.0)]}
    rows = run.main_table(results, ["go", "floor"], [BULK, HTTP])
    assert [row.split(" | ")[:2] for row in rows[2:]] == [
        ["| bulk 8 streams up", "go"], ["| http keep-alive c=64", "go"],
        ["| http keep-alive c=64", "floor"]]


def test_a_load_run_in_pieces_pairs_each_proxys_kth_piece_with_the_others(tmp_path):
    pieced = BULK._replace(pieces=3)
    with contextlib.redirect_stderr(io.StringIO()) as lines:
        for piece, (ours, go) in enumerate([(9.0, 10.0), (12.0, 10.0), (10.0, 8.0)]):
            run.progress(0, 1, "go", pieced, dict(value=go), piece)
            run.progress(0, 1, "ours", pieced, dict(value=ours), piece)
    log = tmp_path / "pieces.log"
    log.write_text(lines.getvalue())
    assert "[round 1/1 load 3/3] bulk 8 streams up" in lines.getvalue()
    rounds = pool.read_rounds([str(log)])
    assert pool.paired_ratios(rounds["bulk 8 streams up"], "ours", "go")[0] == [0.9, 1.2, 1.25]
