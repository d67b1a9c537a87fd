#!/usr/bin/env python3
"""Build the single-file gateway: ``dist/etcd-gateway.pyz``.

The archive holds the runtime modules exactly as they are in the checkout (no concatenation, no
rewriting) plus our own ``__main__.py``. We do not use the stdlib ``zipapp`` template because its
``__main__.py`` calls ``main()`` and throws the return value away, so exit codes 1 and 2 would
become 0; ours does ``sys.exit(main())``, which makes ``python3 etcd-gateway.pyz start ...``
behave exactly like ``python3 -m gateway start ...``.

The build is deterministic: entries are written in a fixed order with a fixed timestamp and fixed
permissions, so the same sources always give the same bytes (and the same checksum).

Usage: ``python3 tools/build_pyz.py [--output PATH]``.
"""
import argparse
import os
import stat
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "dist" / "etcd-gateway.pyz"

# gateway.py imports the other two; endpoints.py is needed from the first connection on.
# dnssrv.py is only imported for SRV discovery and is included whenever it exists.
REQUIRED_MODULES = ("gateway.py", "endpoints.py")
OPTIONAL_MODULES = ("dnssrv.py",)

SHEBANG = b"#!/usr/bin/env python3\n"
MAIN_PY = b'''\
"""Entry point of the single-file build: python3 etcd-gateway.pyz start ..."""
import sys

from gateway import main

sys.exit(main())
'''

# 1980-01-01 is the earliest time a zip entry can carry; any fixed value makes builds repeatable.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ENTRY_MODE = stat.S_IFREG | 0o644


def archive_members(source_dir: Path = ROOT) -> "list[tuple[str, bytes]]":
    """Return ``(name, content)`` for every entry of the archive, in archive order.

    Raises FileNotFoundError naming every missing required module.
    """
    missing = [name for name in REQUIRED_MODULES if not (source_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            "cannot build the .pyz: missing {} in {}".format(", ".join(missing), source_dir))
    members = [("__main__.py", MAIN_PY)]
    for name in REQUIRED_MODULES + OPTIONAL_MODULES:
        path = source_dir / name
        if path.is_file():
            members.append((name, path.read_bytes()))
    return members


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = ENTRY_MODE << 16
    info.create_system = 3  # Unix, so the mode above is honoured whatever host builds it.
    return info


def build(output: Path = DEFAULT_OUTPUT, source_dir: Path = ROOT) -> Path:
    """Write the executable archive to ``output`` atomically and return its path."""
    members = archive_members(source_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a concurrent reader (another test, a running
    # gateway) never sees a half-written archive.
    fd, tmp_name = tempfile.mkstemp(prefix=".etcd-gateway-", suffix=".pyz", dir=str(output.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            # A zip is read from its end, so a shebang line in front is harmless (zipapp does the same).
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w") as archive:
                for name, content in members:
                    archive.writestr(_zip_info(name), content)
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, str(output))
    except BaseException:
        os.unlink(tmp_name)
        raise
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the archive (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = build(args.output)
    except FileNotFoundError as e:
        print("build_pyz: {}".format(e), file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
