"""Render the fault figures (the JSON rows the fault tests append) as docs/RELIABILITY.md's table.

    python tests/faults/report.py [RESULTS.jsonl] [--write docs/RELIABILITY.md]

Without --write it prints the table; with it, it replaces the text between the
`<!-- faults-table:begin -->` and `<!-- faults-table:end -->` markers of that file.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_RESULTS = ROOT / ".pytest_cache" / "faults-results.jsonl"
BEGIN, END = "<!-- faults-table:begin -->", "<!-- faults-table:end -->"
COLUMNS = [("fault", "fault"), ("load", "load"), ("ops", "ops"),
           ("failed_first", "failed (no retry)"), ("failed_final", "failed (retry once)"),
           ("longest_gap_s", "longest gap s"), ("p99_ms", "p99 ms"),
           ("bytes_checked", "bytes checked"), ("lost", "lost puts"), ("fd_leak", "fd leak"),
           ("idle_cpu_s", "idle CPU s/1s")]


def table(rows):
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "-") if row.get(key) is not None else "-")
                                      for key, _ in COLUMNS) + " |")
    when = max((row.get("when", "") for row in rows), default="")
    modes = sorted({row.get("mode", "?") for row in rows})
    lines.append("")
    lines.append(f"Run: {when}, mode {'/'.join(modes)}.")
    return "\n".join(lines)


def main(argv):
    write = None
    if "--write" in argv:
        at = argv.index("--write")
        write = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    path = Path(argv[0]) if argv else DEFAULT_RESULTS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    text = table(rows)
    if write is None:
        print(text)
        return 0
    doc = write.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    write.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
