"""Issue 16's goals as data, and what a set of paired ratios says about each (one per load: a
round's load, or each of a round's pieces of a load that bench/run.py runs in pieces).

bench/run.py prints the verdicts of one run under its table, bench/pool.py those of several runs
pooled: whether ours ÷ the reference *in the same round* is on the goal's side of its target in
every load, in none, or whether the loads straddle it (then the median is one draw, and the
table says so instead of quoting it as met or missed). Pooled, the bootstrap 95 % interval of the
median decides it: a target inside that interval is neither met nor missed.

Pure: the tools hand in the ratios; nothing here reads a log or runs a load.
"""
import statistics
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

# The measures a ratio is taken of, as bench/pool.py's paired_ratios() orders them.
THROUGHPUT, CPU, CORE_CPU = "throughput", "CPU", "core CPU"


class Goal(NamedTuple):
    workload: str       # the workload's label, as bench/run.py prints it
    measure: str        # THROUGHPUT, CPU (the proxy process's, per unit) or CORE_CPU
    reference: str      # the proxy ours is divided by in the same round
    target: float       # ours ÷ reference must be at least this (throughput) or at most (CPU)

    @property
    def higher_is_better(self) -> bool:
        return self.measure == THROUGHPUT

    def met_by(self, ratio: float) -> bool:
        return ratio >= self.target if self.higher_is_better else ratio <= self.target

    def __str__(self):
        sign = ">=" if self.higher_is_better else "<="
        return f"{self.workload}: {self.measure} {sign} {self.target:.2f}x {self.reference}"


CHURN = "churn (Connection: close) c=64"
KEEPALIVE = ("http keep-alive c=64", "http keep-alive c=512")
GOALS = tuple(
    [Goal(CHURN, measure, "go", 1.0) for measure in (CPU, CORE_CPU)]
    + [Goal(CHURN, measure, "haproxy", 1.15) for measure in (CPU, CORE_CPU)]
    + [Goal(CHURN, THROUGHPUT, "go", 1.0), Goal(CHURN, THROUGHPUT, "haproxy", 0.87)]
    + [Goal(f"bulk 8 streams {way}", measure, "go", 1.0)
       for way in ("up", "down") for measure in (CPU, CORE_CPU)]
    + [Goal("bulk 8 streams up", THROUGHPUT, "go", 1.0)]
    + [Goal(workload, THROUGHPUT, "go", 1.0) for workload in KEEPALIVE])
# Floors on each run's median of the paired ratios, not on the pooled one.
RUN_FLOOR = 0.9             # every throughput, ÷ Go
KEEPALIVE_RUN_FLOOR = 0.95  # keep-alive c=64 and c=512, ÷ Go

# ratios(workload, measure, reference) -> ours ÷ reference per round, paired within the round
Ratios = Callable[[str, str, str], List[float]]


def round_verdict(goal: Goal, ratios: Sequence[float]) -> str:
    """What the loads say: met or missed in every one, or straddling (and where the median is)."""
    if not ratios:
        return "not measured"
    sides = {goal.met_by(ratio) for ratio in ratios}
    if sides == {True}:
        return "met in every load"
    if sides == {False}:
        return "missed in every load"
    median_side = "meets" if goal.met_by(statistics.median(ratios)) else "misses"
    return f"STRADDLES (median {median_side})"


def interval_verdict(goal: Goal, interval: Tuple[float, float]) -> str:
    """What the 95 % interval of the median says."""
    sides = {goal.met_by(bound) for bound in interval}
    if sides == {True}:
        return "met"
    if sides == {False}:
        return "MISSED"
    return "UNDECIDED (target inside the interval)"


def run_floor_misses(run_medians: Dict[str, float]) -> List[str]:
    """The workloads whose median throughput ÷ Go in one run falls below its per-run floor
    (three decimals: 0.898 is below 0.9)."""
    return [f"{workload} {ratio:.3f}x" for workload, ratio in run_medians.items()
            if ratio < (KEEPALIVE_RUN_FLOOR if workload in KEEPALIVE else RUN_FLOOR)]


def run_floor_summary(run_medians: Dict[str, float]) -> str:
    """One line on one run's medians of throughput ÷ Go (`run_medians`, by workload) against the
    per-run floors: >= 0.95x on keep-alive c=64 and c=512, >= 0.9x on every other throughput."""
    if not run_medians:
        return "no throughput paired with Go"
    misses = run_floor_misses(run_medians)
    if misses:
        return "BELOW the per-run floor: " + ", ".join(misses)
    lowest = min(run_medians, key=run_medians.get)
    return f"every throughput at or above its per-run floor (lowest: {lowest} {run_medians[lowest]:.2f}x Go)"


def goal_table(ratios: Ratios, interval: Optional[Callable[[List[float]], Tuple[float, float]]] = None
               ) -> List[str]:
    """A markdown table with one row per goal whose workload and reference were measured."""
    columns = ["goal", "loads", "median (min-max)", "loads say"]
    if interval is not None:
        columns += ["95 % interval of the median", "the interval says"]
    lines = ["| " + " | ".join(columns) + " |", "|---|---:|---:|---|" + "---:|---|" * (interval is not None)]
    for goal in GOALS:
        values = ratios(goal.workload, goal.measure, goal.reference)
        if not values:
            continue
        cells = [str(goal), str(len(values)),
                 "%.2f (%.2f-%.2f)" % (statistics.median(values), min(values), max(values)),
                 round_verdict(goal, values)]
        if interval is not None:
            low, high = interval(values)
            cells += ["%.2f-%.2f" % (low, high), interval_verdict(goal, (low, high))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
