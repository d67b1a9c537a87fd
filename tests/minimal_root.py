"""A cached Debian minbase root with only ``python3-minimal``, to prove the .pyz runs there.

Debian's ``python3-minimal`` has no ``json``, ``http`` or ``email`` modules; a gateway that
imports any of them by accident works on every developer machine and fails on the minimal hosts
and container images it is meant for. So the test builds such a root for real with
``debootstrap --variant=minbase --include=python3-minimal`` (once; it is cached, keyed by the
Debian suite) and runs the archive inside it with ``chroot``.

The process inside the root shares the test's network namespace, so it reaches the test's
upstreams on 127.0.0.1. It gets its own mount namespace (``unshare --mount``) in which ``/proc``
is mounted inside the root; that mount disappears with the process, so nothing is left mounted
on the host whatever happens to the test.

Nothing here skips: when the root cannot be built, ``MinimalRootError`` says why and the tests
that need it fail. tox runs ``python tests/minimal_root.py`` before the suite, so that the one-off
build (about a minute) is announced instead of pausing a test in silence.
"""
import fcntl
import os
import shutil
import subprocess
from pathlib import Path

SUITE = os.environ.get("ETCD_GATEWAY_MINBASE_SUITE", "bookworm")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
STAMP = ".etcd-gateway-minbase"
BUILD_TIMEOUT = 1800  # seconds; a cold debootstrap over a slow mirror, not an expected duration


class MinimalRootError(RuntimeError):
    """The minimal root could not be built or used; the message says what to fix."""


def cache_dir() -> Path:
    """Where the roots live: $ETCD_GATEWAY_MINBASE_CACHE, /var/cache (root) or ~/.cache."""
    override = os.environ.get("ETCD_GATEWAY_MINBASE_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/etcd-gateway-tests/minbase")
    return Path.home() / ".cache" / "etcd-gateway-tests" / "minbase"


# ---------------------------------------------------------------------------------------------
# Which mirror apt uses here (the same one, so a local or proxy mirror keeps working)

def _one_line_sources(text):
    """Yield (uri, suite) from sources.list one-line entries: `deb [opts] URI SUITE COMP...`."""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            yield words[0], words[1]


def _deb822_sources(text):
    """Yield (uri, suite) from deb822 .sources paragraphs that are enabled and of type deb."""
    for paragraph in text.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"])[0] == "no":
            continue
        for uri in fields.get("uris", []):
            for suite in fields.get("suites", []):
                yield uri, suite


def apt_mirror(suite: str = SUITE, etc_apt: Path = Path("/etc/apt")) -> str:
    """The URI apt uses for `suite` (main archive, not -security/-updates), else deb.debian.org."""
    sources = []
    if (etc_apt / "sources.list").is_file():
        sources += _one_line_sources((etc_apt / "sources.list").read_text())
    parts = etc_apt / "sources.list.d"
    for path in sorted(parts.glob("*.list")) if parts.is_dir() else []:
        sources += _one_line_sources(path.read_text())
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        sources += _deb822_sources(path.read_text())
    for uri, entry_suite in sources:
        if entry_suite == suite:
            return uri
    return FALLBACK_MIRROR


# ---------------------------------------------------------------------------------------------
# Building the root (once, under a lock, atomically)

def _run(argv, timeout):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _find_debootstrap():
    # /usr/sbin is not on every user's PATH, but that is where Debian installs it.
    return shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_debootstrap() -> str:
    """Path of debootstrap, installing Debian's package with apt-get when it is missing."""
    found = _find_debootstrap()
    if found:
        return found
    if os.geteuid() != 0:
        raise MinimalRootError("debootstrap is not installed and we are not root to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run("apt-get update -qq && apt-get install -y -qq debootstrap", shell=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=BUILD_TIMEOUT, env=env)
    found = _find_debootstrap()
    if result.returncode != 0 or not found:
        raise MinimalRootError("could not install debootstrap:\n" + result.stdout[-3000:])
    return found


def _mounts_under(path: Path):
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def _remove_tree(path: Path):
    """rmtree, but never into a mount a failed debootstrap left behind (a bind-mounted /dev!)."""
    if not path.exists():
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", point], stdin=subprocess.DEVNULL)
    left = _mounts_under(path)
    if left:
        raise MinimalRootError("refusing to delete {}: still mounted: {}".format(path, left))
    shutil.rmtree(str(path))


def _debootstrap(target: Path, suite: str, mirror: str):
    debootstrap = ensure_debootstrap()
    argv = [debootstrap, "--variant=minbase", "--include=python3-minimal", suite, str(target), mirror]
    try:
        result = _run(argv, BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise MinimalRootError("debootstrap did not finish within {}s: {}".format(
            BUILD_TIMEOUT, argv)) from exc
    if result.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        detail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        raise MinimalRootError("{} failed with exit {}:\n{}\n{}".format(
            " ".join(argv), result.returncode, result.stdout[-3000:], detail))
    if not (target / "usr" / "bin" / "python3").exists():
        raise MinimalRootError("debootstrap succeeded but {} has no /usr/bin/python3".format(target))


def ensure_root(suite: str = SUITE) -> Path:
    """Return the cached minimal root for `suite`, building it first if needed.

    Concurrent callers (parallel test runs) serialize on a lock file; the root only appears
    under its final name once debootstrap has finished, so a half-built root is never used.
    """
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    root = base / suite
    with open(str(base / (suite + ".lock")), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / STAMP).is_file():
            return root
        _remove_tree(root)  # an old layout without a stamp: rebuild it
        partial = base / (suite + ".partial")
        _remove_tree(partial)
        mirror = apt_mirror(suite)
        try:
            _debootstrap(partial, suite, mirror)
        except BaseException:
            _remove_tree(partial)
            raise
        (partial / STAMP).write_text("suite={}\nmirror={}\n".format(suite, mirror))
        os.rename(str(partial), str(root))
    return root


# ---------------------------------------------------------------------------------------------
# Running inside the root

CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}

# $0 is the root; /proc is mounted in a private mount namespace that dies with the process.
_ENTER = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'


def chroot_argv(root: Path, argv) -> "list[str]":
    """argv that runs `argv` inside `root`; the PID of that Popen is the PID of `argv` itself
    (unshare and sh exec, they do not fork), so signals sent to it reach the program."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _ENTER, str(root)] + list(argv)


def run_in_root(root: Path, argv, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(chroot_argv(root, argv), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=CHROOT_ENV)


def missing_modules(root: Path, names) -> "list[str]":
    """Which of the module `names` the root's python3 cannot import."""
    script = ("import importlib.util\n"
              "for n in {!r}:\n"
              "    print(n) if importlib.util.find_spec(n) is None else None\n").format(list(names))
    result = run_in_root(root, ["/usr/bin/python3", "-c", script])
    if result.returncode != 0:
        raise MinimalRootError("python3 in {} does not run: {}".format(root, result.stderr))
    return result.stdout.split()


def is_built(suite: str = SUITE) -> bool:
    return (cache_dir() / suite / STAMP).is_file()


def main() -> int:
    """Build the root unless it is cached, saying so first: a cold build takes about a minute."""
    if not is_built():
        print("Building the Debian {} python3-minimal root that tests/test_minimal_python.py runs the "
              ".pyz in: debootstrap, about a minute, only once (cached in {})".format(
                  SUITE, cache_dir() / SUITE), flush=True)
    try:
        ensure_root()
    except MinimalRootError as e:
        print("minimal_root: {}".format(e), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
