"""Shared pieces of the fault tests: the CI/full switch, the results file and its summary.

Every test appends one JSON row per scenario to the results file (`FAULTS_RESULTS`, default
`.pytest_cache/faults-results.jsonl`: pytest's cache directory ignores itself in git) and prints
a one-line summary; `python tests/faults/report.py` turns the rows into docs/RELIABILITY.md.
`FAULTS_FULL=1` selects the long version (minutes per scenario) documented there; the default is
the reduced version that keeps `tox -e faults` within a CI budget.
"""
import json
import os
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent.parent
FULL = os.environ.get("FAULTS_FULL", "") not in ("", "0")
RESULTS_PATH = Path(os.environ.get("FAULTS_RESULTS", ROOT / ".pytest_cache" / "faults-results.jsonl"))
_ROWS = []


def scaled(ci_value, full_value):
    """The CI figure, or the full one under FAULTS_FULL=1."""
    return full_value if FULL else ci_value


def record_result(row: dict) -> dict:
    """Append one scenario's figures to the results file and print its one-line summary.

    The first row of a session truncates the file (unless FAULTS_RESULTS_APPEND=1), so the report
    describes the latest run only.
    """
    open_mode = "a" if _ROWS or os.environ.get("FAULTS_RESULTS_APPEND") else "w"
    row = dict(row, mode="full" if FULL else "ci",
               when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_PATH, open_mode) as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    _ROWS.append(row)
    print("\nFAULTS " + " ".join(f"{k}={v}" for k, v in row.items() if k not in ("when", "notes")))
    return row


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.section("fault figures")
    for row in _ROWS:
        terminalreporter.write_line(
            f"{row.get('fault', '?'):<34} ops={row.get('ops', '-')} "
            f"failed={row.get('failed_final', '-')}/{row.get('failed_first', '-')} "
            f"gap={row.get('longest_gap_s', '-')}s fd_leak={row.get('fd_leak', '-')}")
    terminalreporter.write_line(f"rows written to {RESULTS_PATH}")


class ProcessWatch:
    """Descriptor, memory and CPU figures of one process (the gateway), from /proc.

    `check()` waits (bounded) for the descriptor count to return to its baseline, then measures
    CPU use over an idle second: a process that spins burns that second, one that is idle does
    not. RSS growth is reported; the soak test bounds it.
    """

    IDLE_WINDOW = 1.0
    SPIN_CPU_SECONDS = 0.2

    def __init__(self, pid: int):
        from support import cpu_seconds, fd_count, rss_bytes

        self.pid = pid
        self._fd_count, self._rss, self._cpu = fd_count, rss_bytes, cpu_seconds
        self.baseline_fds = fd_count(pid)
        self.baseline_rss = rss_bytes(pid)
        self.baseline_cpu = cpu_seconds(pid)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return os.path.exists(f"/proc/{self.pid}")

    def fds(self):
        return self._fd_count(self.pid)

    def check(self, fd_timeout: float = 15.0) -> dict:
        from support import wait_until

        assert self.alive(), f"gateway pid {self.pid} is gone"
        wait_until(lambda: self.fds() <= self.baseline_fds, timeout=fd_timeout, interval=0.1)
        fds = self.fds()
        cpu_before = self._cpu(self.pid)
        time.sleep(self.IDLE_WINDOW)  # a measuring window, not a wait for something to happen
        idle_cpu = self._cpu(self.pid) - cpu_before
        return {"fd_leak": max(0, fds - self.baseline_fds),
                "rss_growth_kib": (self._rss(self.pid) - self.baseline_rss) // 1024,
                "gateway_cpu_s": round(self._cpu(self.pid) - self.baseline_cpu, 2),
                "idle_cpu_s": round(idle_cpu, 3)}

    def assert_clean(self, figures: dict, context: str = ""):
        fd_dir = f"/proc/{self.pid}/fd"
        assert figures["fd_leak"] == 0, (
            f"descriptor leak: baseline {self.baseline_fds}, now {self.fds()}: "
            f"{sorted(os.readlink(f'{fd_dir}/{fd}') for fd in os.listdir(fd_dir))}\n{context}")
        assert figures["idle_cpu_s"] < self.SPIN_CPU_SECONDS, (
            f"gateway spins: {figures['idle_cpu_s']}s CPU in an idle {self.IDLE_WINDOW}s\n{context}")


# The shared etcd cluster fixture of the member and network scenarios (imported last: scenario.py
# imports this module).
from faults.scenario import cluster  # noqa: E402,F401
