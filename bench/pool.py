"""Pool the rounds of several benchmark runs into one table of paired ratios.

    python3 bench/run.py --rounds 3 2> bench/runs/DATE-COMMIT.log
    python3 bench/pool.py bench/runs/*.log
    python3 bench/pool.py --spread bench/runs/*.log   # each median with its quartiles

bench/run.py prints one progress line per (round, workload, proxy) on stderr. Within a round
the proxies ran minutes apart on the same machine, so the ratio of ours to the Go gateway *in
that round* cancels most of this machine's slow drifts; the median of those paired ratios over
every round of every run given is steadier than any single run's ratio of medians. Pool only
runs of the same gateway code: the rows mean what that commit's defaults meant (see "Earlier
runs" in docs/PERFORMANCE.md).
"""
import re
import statistics
import sys
from typing import Dict, List, Optional, Tuple

PROGRESS = re.compile(r"\[round (\d+)/\d+\] (.+?)\s{2,}(\S+)\s+([\d.]+) \S+"
                      r"(?: p99 ([\d.]+) ms)?(?: cpu ([\d.]+) \S+)?")
Figures = Tuple[float, Optional[float], Optional[float]]  # value, p99, cpu


def read_rounds(paths: List[str]) -> Dict[str, Dict[tuple, Dict[str, Figures]]]:
    """workload -> (run, round) -> proxy -> figures."""
    rounds: Dict[str, Dict[tuple, Dict[str, Figures]]] = {}
    for run, path in enumerate(paths):
        with open(path) as f:
            for line in f:
                m = PROGRESS.match(line)
                if m is None:
                    continue
                rnd, workload, proxy, value, p99, cpu = m.groups()
                rounds.setdefault(workload.strip(), {}).setdefault((run, rnd), {})[proxy] = (
                    float(value), float(p99) if p99 else None, float(cpu) if cpu else None)
    return rounds


def paired_ratios(by_round: Dict[tuple, Dict[str, Figures]], proxy: str) -> List[List[float]]:
    """proxy/go per round, in three columns: throughput, CPU per unit, p99."""
    columns: List[List[float]] = [[], [], []]
    for proxies in by_round.values():
        if proxy not in proxies or "go" not in proxies:
            continue
        ours, go = proxies[proxy], proxies["go"]
        for column, (a, b) in zip(columns, ((ours[0], go[0]), (ours[2], go[2]), (ours[1], go[1]))):
            if a and b:
                column.append(a / b)
    return columns


def cell(ratios: List[float], spread: bool) -> str:
    """The median; with `spread`, also the quartiles: the middle half of the rounds."""
    if not ratios:
        return "–"
    median = "%.2f" % statistics.median(ratios)
    if not spread or len(ratios) < 2:
        return median
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return "%s (%.2f–%.2f)" % (median, low, high)


def main(args: List[str]) -> int:
    spread = "--spread" in args
    paths = [a for a in args if a != "--spread"]
    if not paths:
        sys.exit(__doc__)
    rounds = read_rounds(paths)
    proxies = [p for p in ("ours", "ours-busy", "ours-nospin")
               if any(p in by_proxy for r in rounds.values() for by_proxy in r.values())]
    print("| workload | rounds | " + " | ".join(f"{p} ×go | CPU ×go | p99 ×go" for p in proxies) + " |")
    print("|---|---:|" + "---:|" * 3 * len(proxies))
    for workload, by_round in rounds.items():
        if workload == "idle scale":
            continue
        paired = sum(1 for proxies_ in by_round.values() if "go" in proxies_ and "ours" in proxies_)
        cells = [cell(ratios, spread) for p in proxies for ratios in paired_ratios(by_round, p)]
        print(f"| {workload} | {paired} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
