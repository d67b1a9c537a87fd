"""Pool the rounds of several benchmark runs into one table of paired ratios.

    python3 bench/run.py --rounds 3 2> bench/runs/DATE-COMMIT.log
    python3 bench/pool.py bench/runs/*.log

bench/run.py prints one progress line per (round, workload, proxy) on stderr. Within a round
the proxies ran minutes apart on the same machine, so the ratio of ours to the Go gateway *in
that round* cancels most of this machine's slow drifts; the median of those paired ratios over
every round of every run given is steadier than any single run's ratio of medians. Pool only
runs of the same gateway code: the rows mean what that commit's defaults meant (see
bench/runs/README.md).
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


def paired_medians(by_round: Dict[tuple, Dict[str, Figures]], proxy: str) -> List[str]:
    """Median over rounds of proxy/go for throughput, CPU per unit and p99."""
    columns: List[List[float]] = [[], [], []]
    for proxies in by_round.values():
        if proxy not in proxies or "go" not in proxies:
            continue
        ours, go = proxies[proxy], proxies["go"]
        for column, (a, b) in zip(columns, ((ours[0], go[0]), (ours[2], go[2]), (ours[1], go[1]))):
            if a and b:
                column.append(a / b)
    return ["%.2f" % statistics.median(c) if c else "–" for c in columns]


def main(paths: List[str]) -> int:
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
        cells = [cell for p in proxies for cell in paired_medians(by_round, p)]
        print(f"| {workload} | {paired} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
