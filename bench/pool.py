"""Pool the rounds of several benchmark runs into one table of paired ratios.

    python3 bench/run.py --rounds 3 2> bench/runs/DATE-COMMIT.log
    python3 bench/pool.py bench/runs/*.log
    python3 bench/pool.py --reference ours-base A.log B.log C.log   # after ÷ before, paired
    python3 bench/pool.py --quartiles bench/runs/*.log   # the middle half instead of min-max
    python3 bench/pool.py --interval bench/runs/*.log    # a 95 % interval of the median itself
    python3 bench/pool.py --goals bench/runs/*.log       # issue 16's goals: met, missed, undecided

Each cell is the median of the paired per-round ratios with their min-max (or quartiles, or a
bootstrap 95 % interval of the median: resampling the rounds, how far the median itself could
be from where the rounds put it; a goal inside that interval is neither met nor missed).

bench/run.py prints one progress line per (round, workload, proxy) on stderr. Within a round
the proxies ran minutes apart on the same machine, so the ratio of ours to the Go gateway *in
that round* cancels most of this machine's slow drifts; the median of those paired ratios over
every round of every run given is steadier than any single run's ratio of medians. Pool only
runs of the same gateway code: the rows mean what that commit's defaults meant (see
bench/runs/README.md).
"""
import random
import re
import statistics
import sys
from typing import Dict, List, Optional, Tuple

import goals

PROGRESS = re.compile(r"\[round (\d+)/\d+(?: load (\d+)/\d+)?\] (.+?)\s{2,}(\S+)\s+([\d.]+) \S+"
                      r"(?: p99 ([\d.]+) ms)?(?: cpu ([\d.]+) \S+)?(?: core ([\d.]+) \S+)?"
                      r"(?: machine ([\d.]+) \S+)?")
# value, p99, cpu, core, machine
Figures = Tuple[float, Optional[float], Optional[float], Optional[float], Optional[float]]


def read_rounds(paths: List[str]) -> Dict[str, Dict[tuple, Dict[str, Figures]]]:
    """workload -> (run, round, load) -> proxy -> figures. A load run as several shorter ones per
    round (bench/run.py's PIECED_LOADS) pairs each proxy's k-th with the others' k-th; in logs from
    before, and for whole loads, the load is always 1."""
    rounds: Dict[str, Dict[tuple, Dict[str, Figures]]] = {}
    for run, path in enumerate(paths):
        with open(path) as f:
            for line in f:
                m = PROGRESS.match(line)
                if m is None:
                    continue
                rnd, piece, workload, proxy, value, *optional = m.groups()
                key = (run, rnd, piece or "1")
                rounds.setdefault(workload.strip(), {}).setdefault(key, {})[proxy] = (
                    float(value), *(float(x) if x else None for x in optional))
    return rounds


def paired_ratios(by_round: Dict[tuple, Dict[str, Figures]], proxy: str,
                  reference: str) -> List[List[float]]:
    """Per round, proxy/reference for throughput, the process's CPU per unit, its core's and
    every core's busy time per unit (logs from before they were recorded have none) and p99."""
    columns: List[List[float]] = [[], [], [], [], []]
    for proxies in by_round.values():
        if proxy not in proxies or reference not in proxies:
            continue
        ours, ref = proxies[proxy], proxies[reference]
        for column, index in zip(columns, (0, 2, 3, 4, 1)):
            a, b = ours[index], ref[index]
            if a and b:
                column.append(a / b)
    return columns


def cell(ratios: List[float], spread: str = "range") -> str:
    """The median with the min-max of the rounds (a cell whose rounds straddle a target shows
    it), with the quartiles (the middle half of the rounds), or with the interval of the median."""
    if not ratios:
        return "–"
    if spread == "quartiles" and len(ratios) >= 2:
        low, _, high = statistics.quantiles(ratios, n=4)
    elif spread == "interval":
        low, high = median_interval(ratios)
    else:
        low, high = min(ratios), max(ratios)
    return "%.2f (%.2f-%.2f)" % (statistics.median(ratios), low, high)


def median_interval(ratios: List[float], draws: int = 2000, seed: int = 16) -> Tuple[float, float]:
    """A bootstrap 95 % interval of the median: the rounds resampled with replacement `draws`
    times (seeded, so a table is the same each time it is rebuilt)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


MEASURES = {goals.THROUGHPUT: 0, goals.CPU: 1, goals.CORE_CPU: 2}  # paired_ratios' columns


def goal_report(rounds: Dict[str, Dict[tuple, Dict[str, Figures]]], paths: List[str]) -> List[str]:
    """Issue 16's goals over every round given, each with the interval of its median, and the
    per-run floors checked on each run's own medians."""
    def ratios(workload, measure, reference):
        return paired_ratios(rounds.get(workload, {}), "ours", reference)[MEASURES[measure]]

    lines = goals.goal_table(ratios, median_interval) + [""]
    for run, path in enumerate(paths):
        medians = {}
        for workload, by_round in rounds.items():
            of_run = {key: proxies for key, proxies in by_round.items() if key[0] == run}
            throughput = paired_ratios(of_run, "ours", "go")[0]
            if throughput and workload != "idle scale":
                medians[workload] = statistics.median(throughput)
        lines.append(f"{path}: {goals.run_floor_summary(medians)}")
    return lines


def main(argv: List[str]) -> int:
    reference, spread, show_goals = "go", "range", False
    while argv[:1] in (["--reference"], ["--quartiles"], ["--interval"], ["--goals"]):
        if argv[0] == "--reference":
            reference, argv = argv[1], argv[2:]
        elif argv[0] == "--goals":
            show_goals, argv = True, argv[1:]
        else:
            spread, argv = argv[0][2:], argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv:
        sys.exit(__doc__)
    unknown = [arg for arg in argv if arg.startswith("-")]
    if unknown:
        sys.exit(f"pool.py: unknown option {unknown[0]} (options come before the logs; --help)")
    rounds = read_rounds(argv)
    if show_goals:
        print("\n".join(goal_report(rounds, argv)))
        return 0
    proxies = [p for p in ("ours", "ours-busy", "ours-nospin", "ours-base", "haproxy", "floor")
               if p != reference and any(p in by_proxy for r in rounds.values() for by_proxy in r.values())]
    x = "×" + reference
    print("| workload | loads | " + " | ".join(f"{p} {x} | CPU {x} | core {x} | machine {x} | p99 {x}"
                                             for p in proxies) + " |")
    print("|---|---:|" + "---:|" * 5 * len(proxies))
    for workload, by_round in rounds.items():
        if workload == "idle scale":
            continue
        paired = sum(1 for proxies_ in by_round.values() if reference in proxies_ and "ours" in proxies_)
        cells = [cell(c, spread) for p in proxies for c in paired_ratios(by_round, p, reference)]
        print(f"| {workload} | {paired} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
