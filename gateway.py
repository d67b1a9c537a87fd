"""etcd-gateway: a transparent TCP proxy in front of an etcd cluster, drop-in for `etcd gateway start`.

Architecture (one thread, standard library only; docs/ARCHITECTURE.md lists every class):

* ``Reactor`` is the mechanism: a `selectors` loop, a timer heap with an injectable monotonic
  clock, and signal wake-up through `signal.set_wakeup_fd` on a socketpair. It knows nothing of
  etcd, DNS or endpoints; handlers are objects with ``handle_io(sock, mask)`` and
  ``handle_failure(exc)``, so a bug in one connection closes that connection only. ``BusyPoll``
  is the policy it asks how long to poll before sleeping (--busy-poll).
* ``Dial`` is one non-blocking connect; ``Probe`` adds an optional TLS handshake and HTTP
  exchange (TCP probes, TLS validation, etcd /health checks). Both begin with ``start()``.
* ``Relay`` pairs a client with an upstream through ``RelayHost``, a narrow interface (plan,
  reports, the shared ``DataPath`` of receive buffer and splice pipes). It moves DIALING ->
  RELAYING -> CLOSED; each of its two ``Flow`` directions moves OPEN -> DRAINING -> SHUT.
  Nothing is read from the client until an upstream is connected; connect attempts race (the
  next endpoint is tried alongside after --dial-timeout, all within --connect-timeout), so a
  failed or slow member is passed over invisibly. A half-close is passed on once the queue
  drained; a reset is passed on as a reset.
* ``Connections`` owns the proxy port and its relays (the RelayHost), ``HealthMonitor`` whether
  each endpoint may take clients (probes, etcd health checks, eviction), ``StatusPages`` the
  /metrics, /health and /endpoints port. ``Gateway`` is the glue: discovery refresh, signals and
  shutdown.
* ``DnsDriver`` runs dnssrv's sans-I/O lookups on non-blocking sockets; ``EndpointSource`` turns
  SRV discovery or --endpoints host names into endpoints, with ``TlsValidation`` for secure records.
* ``MemberSync`` (--auto-sync-interval) asks one member for the cluster's member list over
  etcd's HTTP/JSON gateway (``parse_json``: python3-minimal has no json module) and makes the
  members' client URLs the endpoint set, the seeds kept behind them as the fallback.
* ``main()`` is the one entry point for `python -m gateway`, the console script and the .pyz.

Trade-offs: one thread keeps every state change free of locks and makes the gateway's cost
visible in one profile; the price is that one slow step delays every relay, so nothing here
blocks after start-up (DNS, TLS and health checks included).
"""
import argparse
import enum
import errno
import heapq
import itertools
import os
import random
import re
import select
import selectors
import signal
import socket
import _socket  # the C socket type under socket.socket (CSocket)
import sys
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import dnssrv
import endpoints as ep

try:
    import fcntl
except ImportError:
    fcntl = None
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", None)  # Python >= 3.10
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", None)

# Zero-copy relaying with splice(2): Linux and Python >= 3.10. ETCD_GATEWAY_NO_SPLICE=1 turns it
# off (the copying path is the one every other platform and Python 3.8/3.9 use).
splice = getattr(os, "splice", None)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

VERSION = "0.1.0"
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
# Reported along with EVENT_READ to a handler that registered for it: the peer has half-closed
# (epoll's EPOLLRDHUP). A read that then comes back short has read the last bytes before the EOF.
# Never reported where there is no epoll.
EVENT_CLOSED = 4

# Back-pressure per direction, as asyncio's transports: stop reading a side once this much is queued
# for its peer, resume once the queue fell to the low mark.
HIGH_WATER_BYTES = 256 * 1024
LOW_WATER_BYTES = 64 * 1024
RECV_CHUNK_BYTES = 256 * 1024
SPLICE_PIPE_BYTES = 256 * 1024
# A flow copies (recv_into, send) until one read brings this much, and splices from then on: small
# messages cost the same two system calls either way, but a splice takes a pipe, and the kernel
# time per message was about equal at 1-4 KiB and lower for splice from 64 KiB (/tmp/perfw/micro.py).
SPLICE_MIN_BYTES = 16 * 1024
PIPE_TRIM_DELAY = 1.0  # idle this long (no connection at all): close the spare pipes
# Once a new pipe came out too small to splice through (the user's pipe budget is spent), the
# pool answers this many takes with "copy" before it asks the kernel for a pipe again.
PIPE_RETRY_TAKES = 256
ACCEPT_BATCH = 64
ACCEPT_PAUSE_DELAY = 0.25  # after EMFILE/ENFILE: the pending connections wait in the backlog
TLS_VALIDATION_MIN_TIMEOUT = 3.0  # a handshake costs a few round trips and some CPU on both ends
MIN_INTERVAL_SECONDS = 0.01  # the shortest --dial-timeout / --health-interval / probe pace
MAX_BUSY_POLL_SECONDS = 0.001
# Long enough to catch a loopback backend's answer (tens of microseconds); every missed spin costs
# the whole limit (one client with 1 ms think time: +13 % CPU per request at 50us, >= +50 % at 100us).
DEFAULT_BUSY_POLL_SECONDS = 50e-6
# The whole connect budget of a client (and of a probe): Linux sends SYNs at 0, 1, 3 and 7 s, so
# 8 s lets four of them try. At 10 % loss each way a handshake try fails 19 % of the time: three
# tries (a 5 s budget) leave 1 client in 145 without an upstream, four leave 1 in 770.
DEFAULT_CONNECT_TIMEOUT = 8.0
# Every periodic request is multiplied by the fleet (STYLE 14): each period is drawn at random
# within this fraction of itself, and the first one anywhere in a whole period, so a fleet
# restarted at once neither checks, probes nor resolves in step (docs/FLEET.md).
FLEET_JITTER = 0.1
# One etcd health check costs a member about 0.4 ms of CPU (0.8 ms over TLS: each check is a
# new connection). 10,000 hosts every 5 s would send each member 2,000 a second (0.8-1.6
# cores, 6,000 requests/s, etcd's "large cluster" class); every 30 s, 333 a second (0.13-0.27
# cores). The price: an up but unhealthy member leaves after 1-1.7 min (docs/FLEET.md).
DEFAULT_HEALTH_INTERVAL = 30.0
# Discovery is refreshed before the smallest TTL of the records in use runs out, but not more
# often than this (less the jitter): 10,000 hosts every 5 s already ask 2,000 rounds a second.
MIN_TTL_REFRESH_DELAY = 5.0
LOCAL_RETRY_TIMEOUT = 30.0  # how long an accepted client may wait for a descriptor to dial with
KEEPALIVE_SECONDS = 15  # the Go gateway's net.Dialer/ListenConfig default
LISTEN_BACKLOG = 4096

# ====================================================================================== logging ==

LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40}


def _format_ts(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + ".%03dZ" % (int(wall * 1000) % 1000)


def _json_string(value: str) -> str:
    """A JSON string literal without the json module (python3-minimal does not ship it)."""
    out = ['"']
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20:
            out.append("\\u%04x" % ord(char))
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _json_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json_value(item) for item in value) + "]"
    return _json_string(str(value))


def _text_value(value) -> str:
    if isinstance(value, (list, tuple)):
        value = "[" + ", ".join(str(item) for item in value) + "]"
    text = str(value)
    if text == "" or any(c in text for c in ' "=') or any(ord(c) < 0x20 for c in text):
        return _json_string(text)
    return text


class Log:
    """One line per event on stderr, as text or JSON. Repeated identical warnings can be limited."""

    def __init__(self, level: str = "info", fmt: str = "text", stream=None,
                 wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stderr
        self.wall_clock = wall_clock
        self.clock = clock
        self._limited = {}  # key -> [next allowed instant, suppressed count]

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def emit(self, level: str, msg: str, **fields) -> None:
        if LEVELS[level] < self.threshold:
            return
        ts = _format_ts(self.wall_clock())
        if self.fmt == "json":
            parts = ['"level":"%s"' % level, '"ts":"%s"' % ts, '"msg":' + _json_string(msg)]
            parts += ["%s:%s" % (_json_string(k), _json_value(v)) for k, v in fields.items()]
            line = "{" + ",".join(parts) + "}"
        else:
            line = " ".join([ts, level, msg] + ["%s=%s" % (k, _text_value(v)) for k, v in fields.items()])
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone: keep proxying rather than die on a log line

    def limited(self, level: str, key: str, interval: float, msg: str, **fields) -> None:
        """Emit at most one line per `key` per `interval`; the next one says how many were held back."""
        now = self.clock()
        entry = self._limited.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return
        suppressed = entry[1] if entry is not None else 0
        self._limited[key] = [now + interval, 0]
        if suppressed:
            fields["suppressed"] = suppressed
        self.emit(level, msg, **fields)

    def debug(self, msg, **fields):
        self.emit("debug", msg, **fields)

    def info(self, msg, **fields):
        self.emit("info", msg, **fields)

    def warn(self, msg, **fields):
        self.emit("warn", msg, **fields)

    def error(self, msg, **fields):
        self.emit("error", msg, **fields)


# ========================================================================================== CLI ==

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
                   "s": 1.0, "m": 60.0, "h": 3600.0}
# re.ASCII: Go's time.ParseDuration takes ASCII digits only; \d and float() would take any script's.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)", re.ASCII)


def parse_duration(text: str) -> float:
    """Parse a Go duration (`500ms`, `1m30s`, `2h45m`, `0`) into float seconds; negative is refused."""
    if text == "0":
        return 0.0
    if not text:
        raise ValueError("empty duration")
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError("invalid duration %r (examples: 500ms, 30s, 1m30s, 2h45m)" % text)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return "%gms" % round(seconds * 1000, 3)
    return "%gs" % round(seconds, 3)


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_duration_arg(text: str) -> float:
    """A duration that paces a loop or bounds a wait: 0 would mean a busy loop or instant failure."""
    seconds = _duration_arg(text)
    if seconds < MIN_INTERVAL_SECONDS:
        raise argparse.ArgumentTypeError("%r is too short (at least %s)"
                                         % (text, format_duration(MIN_INTERVAL_SECONDS)))
    return seconds


MIN_DISCOVERY_REFRESH_SECONDS = 1.0


def _discovery_refresh_arg(text: str) -> float:
    """0 means start-up only; anything else at least 1s: every refresh costs DNS queries (and TLS
    handshakes for secure discovery) on every host of the fleet, and `1ns` re-resolved in a loop."""
    seconds = _duration_arg(text)
    if 0 < seconds < MIN_DISCOVERY_REFRESH_SECONDS:
        raise argparse.ArgumentTypeError("%r is too short (0 = only at start-up, else at least %s)"
                                         % (text, format_duration(MIN_DISCOVERY_REFRESH_SECONDS)))
    return seconds


def _busy_poll_arg(text: str) -> float:
    seconds = _duration_arg(text)
    if seconds > MAX_BUSY_POLL_SECONDS:
        raise argparse.ArgumentTypeError("%r is too long (at most %s): that is a busy loop"
                                         % (text, format_duration(MAX_BUSY_POLL_SECONDS)))
    return seconds


def _endpoints_arg(text: str) -> List[ep.Endpoint]:
    try:
        return ep.parse_endpoints(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hostport_arg(text: str):
    try:
        return ep.split_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dns_servers_arg(text: str):
    try:
        return dnssrv.parse_dns_servers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bool_arg(text: str) -> bool:
    """pflag booleans accept `--flag` and `--flag=true|false` (and 1/0, t/f)."""
    lowered = text.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError("invalid boolean %r" % text)


MIN_AUTO_SYNC_SECONDS = 1.0


def _auto_sync_interval_arg(text: str) -> float:
    """0 is off; anything else at least 1s: every round is a request to a member from every host
    of the fleet."""
    seconds = _duration_arg(text)
    if 0 < seconds < MIN_AUTO_SYNC_SECONDS:
        raise argparse.ArgumentTypeError("%r is too short (0 = off, else at least %s)"
                                         % (text, format_duration(MIN_AUTO_SYNC_SECONDS)))
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etcd-gateway", allow_abbrev=False,
        description="A transparent TCP proxy in front of an etcd cluster (drop-in for `etcd gateway`).")
    parser.add_argument("--version", action="version", version="etcd-gateway " + VERSION)
    commands = parser.add_subparsers(dest="command", metavar="start")
    commands.required = True
    start = commands.add_parser("start", allow_abbrev=False, help="start the gateway",
                                description="Start the gateway.")
    go = start.add_argument_group("flags of `etcd gateway start`")
    go.add_argument("--listen-addr", type=_hostport_arg, default=("127.0.0.1", 23790),
                    metavar="HOST:PORT", help="listen address (default 127.0.0.1:23790)")
    go.add_argument("--endpoints", type=_endpoints_arg, action="append", metavar="LIST",
                    help="comma separated etcd cluster endpoints (default 127.0.0.1:2379)")
    go.add_argument("--retry-delay", type=_duration_arg, default=60.0, metavar="DURATION",
                    help="how long a failed endpoint stays out before it is retried (default 1m)")
    go.add_argument("--discovery-srv", default="", metavar="DOMAIN",
                    help="DNS domain used to bootstrap the cluster endpoints")
    go.add_argument("--discovery-srv-name", default="", metavar="NAME",
                    help="service name to query when using DNS discovery")
    go.add_argument("--insecure-discovery", type=_bool_arg, nargs="?", const=True, default=False,
                    metavar="BOOL", help="accept insecure SRV records")
    go.add_argument("--trusted-ca-file", default="", metavar="PATH",
                    help="CA file for verifying the discovered TLS endpoints")
    ext = start.add_argument_group("extensions (not in the Go gateway)")
    ext.add_argument("--dial-timeout", type=_positive_duration_arg, default=1.0, metavar="DURATION",
                     help="how long one connect may go unanswered before the next endpoint is "
                          "tried alongside it (default 1s)")
    ext.add_argument("--connect-timeout", type=_positive_duration_arg, default=DEFAULT_CONNECT_TIMEOUT,
                     metavar="DURATION",
                     help="how long a client may wait for any upstream connect, and how long a "
                          "probe may wait for its connect (default 8s: four SYNs, at 0, 1, 3 and 7 s)")
    ext.add_argument("--policy", choices=ep.POLICIES, default="sticky",
                     help="sticky: one endpoint until it fails; round-robin: the next one for "
                          "every connection (default sticky)")
    ext.add_argument("--shutdown-timeout", type=_duration_arg, default=10.0, metavar="DURATION",
                     help="how long open connections may run after SIGTERM/SIGINT (default 10s)")
    ext.add_argument("--dns-server", type=_dns_servers_arg, default=(), metavar="HOST[:PORT],...",
                     help="DNS servers for discovery and host names, replacing /etc/resolv.conf's")
    ext.add_argument("--discovery-refresh", type=_discovery_refresh_arg, default=30.0,
                     metavar="DURATION",
                     help="how often discovery (and host names in --endpoints) are resolved again; "
                          "at least 1s; 0 = only at start-up (default 30s)")
    ext.add_argument("--metrics-addr", type=_hostport_arg, default=None, metavar="HOST:PORT",
                     help="serve /metrics, /health and /endpoints over HTTP here (default off)")
    ext.add_argument("--health-check", choices=("tcp", "etcd"), default="tcp",
                     help="tcp: probe failed endpoints with a connect; etcd: also ask every "
                          "endpoint's GET /health every --health-interval (default tcp)")
    ext.add_argument("--health-interval", type=_positive_duration_arg, default=DEFAULT_HEALTH_INTERVAL,
                     metavar="DURATION", help="interval of etcd health checks (default 30s)")
    ext.add_argument("--busy-poll", type=_busy_poll_arg, default=DEFAULT_BUSY_POLL_SECONDS,
                     metavar="DURATION",
                     help="while one connection's events come alone, poll up to DURATION (at "
                          "most 1ms) after each before sleeping, where waking a sleeping CPU "
                          "costs more than the spin, as on VMs; learns the gaps and does not "
                          "spin into longer ones, so busy and idle gateways sleep as usual; "
                          "0 turns it off (default 50us)")
    ext.add_argument("--log-level", choices=tuple(LEVELS), default="info")
    ext.add_argument("--log-format", choices=("text", "json"), default="text")
    ext.add_argument("--cert", default="", metavar="PATH",
                     help="client certificate (PEM) that the gateway presents in its own requests "
                          "to members (etcd health checks, TLS validation, member sync); with "
                          "--key. Clients' connections are passed through as they are")
    ext.add_argument("--key", default="", metavar="PATH", help="the private key of --cert (PEM)")
    ext.add_argument("--auto-sync-interval", type=_auto_sync_interval_arg, default=0.0,
                     metavar="DURATION",
                     help="ask a member for the cluster's member list about this often (jittered) "
                          "and proxy to the members' client URLs, the --endpoints or discovery "
                          "set kept as the fallback; at least 1s; 0 = off (default 0)")
    return parser


def parse_args(argv: Optional[Sequence[str]]):
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.connect_timeout < options.dial_timeout:
        parser.error("--connect-timeout (%s) must be at least --dial-timeout (%s)"
                     % (format_duration(options.connect_timeout), format_duration(options.dial_timeout)))
    options.endpoints_given = options.endpoints is not None
    if options.endpoints is None:
        options.endpoints = [ep.parse_endpoint("127.0.0.1:2379")]
    else:  # pflag string slices accumulate over repeated flags
        unique = {}
        for group in options.endpoints:
            for endpoint in group:
                unique.setdefault(endpoint.key, endpoint)
        options.endpoints = list(unique.values())
    if bool(options.cert) != bool(options.key):
        parser.error("--cert and --key go together")
    return options


class ConfigError(Exception):
    """Bad configuration: reported as one line on stderr, exit status 1."""


# ====================================================================================== reactor ==

class Timer:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback, args):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SelectorsPoller:
    """Where the platform has no epoll: `select.epoll`'s interface (register, modify, unregister,
    poll, close; (fd, events) pairs with poll(2)'s bits) over `selectors.DefaultSelector`."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()

    def register(self, fd: int, events: int) -> None:
        self.selector.register(fd, _SELECTOR_EVENTS[events & (POLL_IN | POLL_OUT)])

    def modify(self, fd: int, events: int) -> None:
        self.selector.modify(fd, _SELECTOR_EVENTS[events & (POLL_IN | POLL_OUT)])

    def unregister(self, fd: int) -> None:
        self.selector.unregister(fd)

    def poll(self, timeout: Optional[float] = None):
        return [(key.fd, _POLL_EVENTS[mask]) for key, mask in self.selector.select(timeout)]

    def close(self) -> None:
        self.selector.close()


# poll(2)'s bits, which epoll shares, and epoll's EPOLLRDHUP (Linux); _POLL_EVENTS is indexed by
# a reactor mask (EVENT_READ 1, EVENT_WRITE 2, EVENT_CLOSED 4), _REPORTED maps them back.
# EVENT_CLOSED asks for POLLPRI too: while TCP urgent data is pending, a read stops short at its
# mark, so a short read would not mean the last bytes; the reactor reports POLLPRI as it does an
# error, without EVENT_CLOSED.
POLL_IN, POLL_PRI, POLL_OUT, POLL_ERR, POLL_HUP, POLL_RDHUP = 0x001, 0x002, 0x004, 0x008, 0x010, 0x2000
_POLL_EVENTS = tuple((POLL_IN if mask & EVENT_READ else 0) | (POLL_OUT if mask & EVENT_WRITE else 0)
                     | (POLL_RDHUP | POLL_PRI if mask & EVENT_CLOSED else 0) for mask in range(8))


def _reported_mask(events: int) -> int:
    """The reactor mask that the poll bits `events` report (before it is narrowed to the events
    registered): an error, hang-up or urgent data reports every event but EVENT_CLOSED."""
    if events & (POLL_PRI | POLL_ERR | POLL_HUP):
        return EVENT_READ | EVENT_WRITE
    return ((EVENT_READ if events & POLL_IN else 0) | (EVENT_WRITE if events & POLL_OUT else 0)
            | (EVENT_CLOSED if events & POLL_RDHUP else 0))


# Every combination epoll can report (what was asked for, plus POLLERR and POLLHUP): one dict
# lookup per event instead of the bit arithmetic, which Python does slowly.
_POLL_BITS = (POLL_IN, POLL_PRI, POLL_OUT, POLL_ERR, POLL_HUP, POLL_RDHUP)
_REPORTED = {events: _reported_mask(events)
             for events in map(sum, itertools.product(*((0, bit) for bit in _POLL_BITS)))}
_SELECTOR_EVENTS = {POLL_IN: EVENT_READ, POLL_OUT: EVENT_WRITE, POLL_IN | POLL_OUT: EVENT_READ | EVENT_WRITE}


class Reactor:
    """A readiness loop with timers and signals. Mechanism only: it runs what it is given.

    Registered handlers are objects with ``handle_io(sock, mask)`` and ``handle_failure(exc)``,
    `mask` in selectors' terms (EVENT_READ, EVENT_WRITE, and EVENT_CLOSED where epoll reports it;
    an error or hang-up reports every registered event but EVENT_CLOSED, as selectors does); an
    exception escaping ``handle_io`` is passed to the same handler's ``handle_failure``.
    `busy_poll`, when given, is the policy that says how long to poll before sleeping.

    It drives `select.epoll` directly with a descriptor -> (socket, handler, mask) table, and
    selectors (through `SelectorsPoller`) where there is no epoll: selectors' keys and lookups cost
    about a tenth of the Python time of a connection that carries one request.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, log: Optional[Log] = None,
                 busy_poll: Optional["BusyPoll"] = None, use_epoll: Optional[bool] = None):
        self.clock = clock
        self.log = log or Log()
        # epoll forgets a descriptor once it is closed; selectors keeps it until unregistered.
        # `use_epoll=False` runs the selectors path where epoll exists too (tests cover both).
        self._epoll = hasattr(select, "epoll") if use_epoll is None else use_epoll
        self.poller = select.epoll() if self._epoll else SelectorsPoller()
        self._handlers = {}  # fd -> (sock, handler, selectors mask)
        self._timers: List = []  # heap of (when, seq, Timer)
        self._seq = 0
        self._cancelled_in_heap = 0
        self._running = False
        self._signal_handlers = {}
        self._wake_r = self._wake_w = None
        self.busy_poll = busy_poll

    # -- sockets -------------------------------------------------------------------------------

    def register(self, sock, events: int, handler) -> None:
        fd = sock.fileno()
        if fd in self._handlers:
            raise KeyError("%r is already registered" % (sock,))
        self.poller.register(fd, _POLL_EVENTS[events])
        self._handlers[fd] = (sock, handler, events)

    def modify(self, sock, events: int, handler) -> None:
        fd = sock.fileno()
        if fd not in self._handlers:
            raise KeyError("%r is not registered" % (sock,))
        self.poller.modify(fd, _POLL_EVENTS[events])
        self._handlers[fd] = (sock, handler, events)

    def unregister(self, sock, closing: bool = False) -> None:
        """Stop watching `sock`. `closing`: the caller closes it right away, and epoll drops a
        closed descriptor by itself, so the system call is skipped."""
        fd = sock.fileno()
        if fd < 0:  # closed already: epoll dropped it
            fd = self._fd_of_closed(sock)
            closing = True
        del self._handlers[fd]
        if not (closing and self._epoll):
            self.poller.unregister(fd)

    def _fd_of_closed(self, sock) -> int:
        """The descriptor a closed socket was registered with (as selectors, found by identity).
        Apart from unregister(): the generator's closure cell would be made on every call."""
        return next((fd for fd, entry in self._handlers.items() if entry[0] is sock), -1)

    def watched(self) -> int:
        """How many sockets are registered."""
        return len(self._handlers)

    # -- timers --------------------------------------------------------------------------------

    def call_later(self, delay: float, callback, *args) -> Timer:
        return self.call_at(self.clock() + delay, callback, *args)

    def call_at(self, when: float, callback, *args) -> Timer:
        """Run `callback(*args)` once the clock reads `when` or later."""
        timer = Timer(when, callback, args)
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, timer))
        return timer

    def cancel(self, timer: Optional[Timer]) -> None:
        if timer is not None and not timer.cancelled:
            timer.cancel()
            self._cancelled_in_heap += 1
            # Dial timers are cancelled by the thousand under churn; do not let the heap hoard them.
            if self._cancelled_in_heap > 512 and self._cancelled_in_heap * 2 > len(self._timers):
                # In place: _run_due_timers() holds the list while a timer's callback runs.
                self._timers[:] = [entry for entry in self._timers if not entry[2].cancelled]
                heapq.heapify(self._timers)
                self._cancelled_in_heap = 0

    def _run_due_timers(self) -> Optional[float]:
        """Fire the timers that are due; the seconds until the next one (None: there is none)."""
        timers = self._timers
        if not timers:
            return None
        now = self.clock()
        if timers[0][0] > now:
            return timers[0][0] - now  # the common case: one clock read, no call
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.cancelled:
                self._cancelled_in_heap -= 1
                continue
            timer.cancelled = True  # fired: a later cancel() is a no-op
            try:
                timer.callback(*timer.args)
            except Exception as exc:  # a bug in one timer must not stop the gateway
                self.log.error("timer callback failed", callback=repr(timer.callback), error=repr(exc))
        return self._select_timeout()

    def _select_timeout(self) -> Optional[float]:
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - self.clock())

    # -- signals -------------------------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback) -> None:
        """Run `callback(signum)` from the loop. A flag alone would not wake `select`: the C-level
        handler writes the signal number to a socketpair that the loop watches."""
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            self.register(self._wake_r, EVENT_READ, _SignalWake(self))
        self._signal_handlers[signum] = callback
        signal.signal(signum, lambda _signum, _frame: None)

    def _dispatch_signals(self) -> None:
        try:
            data = self._wake_r.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            callback = self._signal_handlers.get(signum)
            if callback is not None:
                callback(signum)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stop(): fire due timers, wait for I/O until the next timer, dispatch."""
        self._running = True
        poll = self.poller.poll
        handlers = self._handlers
        reported = _REPORTED
        while self._running:
            timeout = self._run_due_timers()
            if not self._running:
                break
            for fd, events in self._wait(poll, timeout):
                entry = handlers.get(fd)
                if entry is None:
                    continue  # unregistered earlier in this same batch of events
                sock, handler, mask = entry
                try:
                    handler.handle_io(sock, mask & reported[events])
                except Exception as exc:
                    self._handler_failed(handler, exc)

    def _wait(self, poll, timeout: Optional[float]):
        """Wait for events; with a busy-poll policy, first poll without sleeping for as long as
        it allows: on a VM, waking a halted vCPU can cost more than the spin (docs/PERFORMANCE.md)."""
        policy = self.busy_poll
        if policy is None or timeout == 0:
            return poll(timeout)
        clock = self.clock
        start = clock()
        window = policy.window()
        if window:
            spin = window if timeout is None else min(window, timeout)
            events = poll(0)
            while not events and clock() - start < spin:
                events = poll(0)
            if events:
                self._observe(policy, events)
                return events
            if timeout is not None:
                timeout = max(0.0, timeout - (clock() - start))
        events = poll(timeout)
        policy.slept(clock() - start)
        self._observe(policy, events)
        return events

    def _observe(self, policy, events) -> None:
        if len(events) == 1:
            fd = events[0][0]
            entry = self._handlers.get(fd)
            policy.observe(fd, entry[1] if entry is not None else None)
        else:
            policy.observe(None, None)

    def _handler_failed(self, handler, exc: Exception) -> None:
        try:
            handler.handle_failure(exc)
        except Exception as second:
            self.log.error("failure handler failed", handler=repr(handler), error=repr(second))

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        if self._wake_r is not None:
            signal.set_wakeup_fd(-1)
            for signum in self._signal_handlers:
                signal.signal(signum, signal.SIG_DFL)
            self.unregister(self._wake_r)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None
        self.poller.close()


class BusyPoll:
    """The --busy-poll policy: how long the reactor may poll without sleeping before a wait.

    It spins only while one handler's events come alone, batch after batch: one conversation
    bouncing between client and backend. With several in flight, one sleep gathers their events
    into one wake-up, and spinning would only split the batches. The spin is learnt per
    descriptor, because the gap after a request (the backend's answer) and after a response (the
    client's pause) differ."""

    def __init__(self, limit: float):
        self.limit = limit  # the longest spin before sleeping
        self._lone_handler = None  # the handler of the last batch when it held one event alone
        self._lone_fd = None  # and the descriptor of that event
        self._spin_after = {}  # fd of the lone handler -> the spin learnt for the wait after its event

    def window(self) -> float:
        """How long to poll before the next wait sleeps; 0 = sleep at once."""
        return self._spin_after.get(self._lone_fd, 0.0)

    def slept(self, waited: float) -> None:
        """A wait that slept took `waited` seconds: learn the spin that would have caught it."""
        if self._lone_fd is not None:
            self._spin_after[self._lone_fd] = spin_window_after(waited, self.limit)

    def observe(self, lone_fd, lone_handler) -> None:
        """Follow the conversation: the descriptor and handler of a wait that brought one event
        alone, or (None, None) when it brought none or several."""
        if lone_fd is not None:
            if lone_handler is not self._lone_handler:
                self._spin_after.clear()
                self._lone_handler = lone_handler
            self._lone_fd = lone_fd
        else:
            self._spin_after.clear()
            self._lone_handler = self._lone_fd = None


def spin_window_after(waited: float, limit: float) -> float:
    """The spin that would have caught a wait of `waited` seconds, with a margin, up to the limit.
    A sleeping wait includes our own wake-up, so one up to twice the limit may be caught yet;
    a longer one means the traffic is sparse there and spinning would only burn CPU."""
    return min(limit, waited * 1.25) if waited <= 2 * limit else 0.0


class _SignalWake:
    def __init__(self, reactor: Reactor):
        self.reactor = reactor

    def handle_io(self, sock, mask):
        self.reactor._dispatch_signals()

    def handle_failure(self, exc):
        self.reactor.log.error("signal dispatch failed", error=repr(exc))


# ==================================================================================== sockets ==

# TCP_NODELAY (etcd's gRPC frames are small) and 15 s keep-alive on every relayed stream.
KEEPALIVE_OPTIONS = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),)
if hasattr(socket, "TCP_KEEPIDLE"):
    KEEPALIVE_OPTIONS += ((socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_SECONDS),
                          (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_SECONDS))
STREAM_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),) + KEEPALIVE_OPTIONS


def tune_stream(sock: socket.socket, options=STREAM_OPTIONS) -> None:
    setsockopt = sock.setsockopt
    for level, option, value in options:
        setsockopt(level, option, value)


class KeepAliveLater:
    """Keep-alive for upstream sockets, switched on within a second of connecting rather than at
    once: its three system calls are an eighth of a short-lived connection's, and keep-alive only
    speaks after 15 idle seconds. Once a second, every socket connected since that is still open
    gets it (a closed socket reads fileno() -1)."""

    def __init__(self, reactor: "Reactor", delay: float = 1.0):
        self.reactor = reactor
        self.delay = delay
        self._waiting = []
        self._timer = None

    def add(self, sock: socket.socket) -> None:
        self._waiting.append(sock)
        if self._timer is None:
            self._timer = self.reactor.call_later(self.delay, self._switch_on)

    def _switch_on(self) -> None:
        waiting, self._waiting, self._timer = self._waiting, [], None
        for sock in waiting:
            if sock.fileno() >= 0:
                try:
                    tune_stream(sock, KEEPALIVE_OPTIONS)
                except OSError:
                    pass  # the peer is gone: the relay's next read will tell

    def cancel(self) -> None:
        self.reactor.cancel(self._timer)
        self._timer = None
        self._waiting = []


STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
NEEDS_SETBLOCKING = STREAM_NONBLOCK == socket.SOCK_STREAM  # no SOCK_NONBLOCK: one more system call
# The C socket type under socket.socket, for the sockets of relays and probes: socket.socket's
# Python layer makes its __init__ and close() Python frames (about 6 % of a short connection's
# user instructions) and adds what none of them uses (makefile, a context manager). ssl wraps it alike.
CSocket = _socket.socket


IPPROTO_TCP, TCP_NODELAY, TCP_INFO = socket.IPPROTO_TCP, socket.TCP_NODELAY, getattr(socket, "TCP_INFO", None)
SHUT_WR = socket.SHUT_WR
TCP_ESTABLISHED = 1  # tcp_info's first byte, tcpi_state (Linux's include/net/tcp_states.h)


def is_connected(sock: socket.socket) -> bool:
    """Whether a TCP connect has completed. Where there is TCP_INFO, the state is read without
    what getpeername() costs: it releases the GIL and formats the peer's address (callgrind:
    about 2 % of a short connection's user instructions)."""
    if TCP_INFO is not None:
        try:
            return sock.getsockopt(IPPROTO_TCP, TCP_INFO, 1)[0] == TCP_ESTABLISHED
        except OSError:
            pass  # a kernel without it: ask the way that always works
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def tune_listener(sock: socket.socket) -> None:
    """Linux copies these options to every accepted socket: set once here, not per client."""
    try:
        tune_stream(sock)
    except OSError:
        pass


def abort(sock: socket.socket) -> None:
    """Close with RST rather than FIN: how a reset is passed on to the other side."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def error_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or exc.__class__.__name__


def sockaddr_for(host: str, port: int):
    """An (family, sockaddr) pair for an IP literal."""
    if ":" in host:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


# ======================================================================================= dial ==

LOCAL_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# connect() failing for a reason of this host's, not the member's: out of descriptors or
# buffers, or out of ephemeral ports (EADDRNOTAVAIL; EAGAIN on older kernels and for some
# socket families). Such a failure never marks an endpoint down.
DIAL_LOCAL_ERRNOS = LOCAL_ERRNOS + (errno.EADDRNOTAVAIL, errno.EAGAIN)
EINPROGRESS = errno.EINPROGRESS


class Dial:
    """One non-blocking connect bounded by a timeout. `start()` begins it; `on_done(dial, sock,
    None)` is called with a connected socket, or `on_done(dial, None, reason)`, exactly once
    unless cancelled, and possibly from within `start()` (a loopback connect that completed at
    once). `local_failure` is set when the failure was ours (out of descriptors), not the
    endpoint's."""

    def __init__(self, reactor: Reactor, endpoint: ep.Endpoint, timeout: float, on_done,
                 address: Optional[Tuple[int, tuple]] = None, deadline: Optional[float] = None):
        self.reactor = reactor
        self.endpoint = endpoint
        # (family, sockaddr) to connect to: one of the endpoint's addresses (default its first)
        self.address = address
        self.timeout = timeout  # the bound named when it runs out
        self.deadline = deadline  # when it runs out (default: `timeout` after start); the
        # clock is read only if the connect does not complete at once
        self.on_done = on_done
        self.sock = None
        self.timer = None
        self.local_failure = False

    def __repr__(self):
        return "<Dial %s>" % (self.endpoint,)

    def start(self) -> None:
        if self.address is None:
            addresses = self.endpoint.dial_addresses()
            if not addresses:
                self._finish(None, "no address for " + str(self.endpoint))
                return
            self.address = addresses[0]
        family, address = self.address
        try:
            sock = self.sock = CSocket(family, STREAM_NONBLOCK)
            if NEEDS_SETBLOCKING:
                sock.setblocking(False)
            code = sock.connect_ex(address)
        except OSError as exc:
            self.local_failure = exc.errno in DIAL_LOCAL_ERRNOS
            self._finish(None, error_reason(exc))
            return
        if code == 0 or (code == EINPROGRESS and is_connected(sock)):
            # On loopback the handshake completes inside connect(): skip a trip through the
            # selector (register, wait, SO_ERROR, unregister) and the dial timer.
            self._finish(sock, None)
        elif code == EINPROGRESS:
            self.reactor.register(sock, EVENT_WRITE, self)
            if self.deadline is None:
                self.timer = self.reactor.call_later(self.timeout, self._timed_out)
            else:
                self.timer = self.reactor.call_at(self.deadline, self._timed_out)
        else:
            self.local_failure = code in DIAL_LOCAL_ERRNOS
            self._finish(None, os.strerror(code).lower())

    def handle_io(self, sock, mask):
        if self.sock is None:
            return  # cancelled earlier in this same batch of events
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.reactor.unregister(sock)
        self.reactor.cancel(self.timer)
        if code == 0:
            self._finish(sock, None)
        else:
            self.local_failure = code in DIAL_LOCAL_ERRNOS
            self._finish(None, os.strerror(code).lower())

    def handle_failure(self, exc):
        self.cancel()
        self.on_done(self, None, error_reason(exc))

    def _timed_out(self):
        self.reactor.unregister(self.sock)
        self._finish(None, "connect timeout after " + format_duration(self.timeout))

    def hand_over(self, on_done) -> None:
        """Report the outcome to `on_done` instead (the attempt outlived the relay that began it)."""
        self.on_done = on_done

    def _finish(self, sock, reason):
        if sock is None and self.sock is not None:
            self.sock.close()
        self.sock = None
        self.on_done(self, sock, reason)

    def cancel(self) -> None:
        """Abandon the dial without a callback."""
        self.reactor.cancel(self.timer)
        if self.sock is not None:
            try:
                self.reactor.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None


# ====================================================================================== relay ==

class FlowState(enum.Enum):
    """One direction of a relay: OPEN -> DRAINING (EOF seen, bytes still queued) -> SHUT."""
    OPEN = "open"
    DRAINING = "draining"
    SHUT = "shut"


class RelayState(enum.Enum):
    """A relay: DIALING (the client waits, nothing read from it) -> RELAYING -> CLOSED."""
    DIALING = "dialing"
    RELAYING = "relaying"
    CLOSED = "closed"


# Module-level names: the data path compares states with `is` against globals.
OPEN, DRAINING, SHUT = FlowState.OPEN, FlowState.DRAINING, FlowState.SHUT
DIALING, RELAYING, CLOSED = RelayState.DIALING, RelayState.RELAYING, RelayState.CLOSED
# What a relay watches a socket it reads from for: a peer that answers and closes (HTTP's
# Connection: close) has its FIN passed on with the answer.
READ_TO_EOF = EVENT_READ | EVENT_CLOSED


class PipePool:
    """Non-blocking pipes for splice(2), shared by every relay. A flow holds a pipe only while
    bytes sit in it, so an idle connection still costs two descriptors, not six.

    Past its user's pipe budget (/proc/sys/fs/pipe-user-pages-soft: 64 MiB of pipes by default,
    shared by all the user's processes; root is exempt) the kernel makes a new pipe two pages
    long and refuses to grow it. Splicing 8 KiB a call costs more than copying, so the pool then
    answers None (the relay copies) and asks the kernel again only after PIPE_RETRY_TAKES takes."""

    def __init__(self, size: int = SPLICE_PIPE_BYTES, keep: int = 32):
        self.size = size
        self.keep = keep
        self.idle = []
        self.refusals_left = 0  # takes still to answer None since a new pipe came out too small

    def take(self):
        """An empty pipe (read_fd, write_fd, capacity), or None: out of descriptors, or out of
        the pipe budget."""
        if self.idle:
            return self.idle.pop()
        if self.refusals_left:
            self.refusals_left -= 1
            return None
        try:
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        capacity = self._grow(write_fd)
        if capacity < SPLICE_MIN_BYTES:
            self.discard((read_fd, write_fd, capacity))
            self.refusals_left = PIPE_RETRY_TAKES
            return None
        return (read_fd, write_fd, capacity)

    def _grow(self, write_fd: int) -> int:
        """Make a new pipe `size` long if the kernel lets us; its capacity in bytes."""
        if F_SETPIPE_SZ is None:
            return 65536  # no splice before Python 3.10 either
        try:
            return fcntl.fcntl(write_fd, F_SETPIPE_SZ, self.size)
        except OSError:  # over /proc/sys/fs/pipe-max-size or the user's pipe budget
            return fcntl.fcntl(write_fd, F_GETPIPE_SZ)

    def give(self, pipe) -> None:
        """Return an empty pipe."""
        if len(self.idle) < self.keep:
            self.idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe) -> None:
        """Close a pipe that may still hold bytes (its relay is gone)."""
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        for pipe in self.idle:
            self.discard(pipe)
        self.idle = []


class DataPath:
    """What every relay shares: one receive buffer (one thread, so one relay uses it at a time),
    the splice pipe pool (None where splice is unavailable or turned off), and the upstream
    sockets waiting for keep-alive."""

    __slots__ = ("recv_buffer", "recv_view", "pipes", "keepalive")

    def __init__(self, use_splice: bool, keepalive: KeepAliveLater):
        self.recv_buffer = bytearray(RECV_CHUNK_BYTES)
        self.recv_view = memoryview(self.recv_buffer)
        self.pipes = PipePool() if use_splice else None
        self.keepalive = keepalive

    def trim(self) -> None:
        """Give the spare pipes' descriptors back (the gateway is idle)."""
        if self.pipes is not None:
            self.pipes.close()

    def close(self) -> None:
        self.trim()
        self.keepalive.cancel()


class Flow:
    """One direction of a relay: bytes read from `src` and queued for `dst`, either in `queue`
    (recv/send) or in a pipe (`piped` bytes, splice). It splices once it has carried bulk
    (`spliced`); until then it copies, so a connection that only carries small messages never
    takes a pipe. `queue` is b"" while nothing waits, a bytearray while something does."""

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "queue", "pipe", "piped", "state", "total",
                 "paused", "spliced")

    def __init__(self, src: socket.socket, dst: socket.socket):
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.queue = b""
        self.pipe = None
        self.piped = self.total = 0
        self.state = OPEN
        self.paused = self.spliced = False

    def wants_read(self) -> bool:
        """Read while open, with hysteresis: pause at the high mark, resume at the low mark.
        A pipe is read into again only once it has drained."""
        if self.state is not OPEN or self.piped:
            return False
        if self.paused:
            self.paused = len(self.queue) > LOW_WATER_BYTES
        else:
            self.paused = len(self.queue) >= HIGH_WATER_BYTES
        return not self.paused

    def wants_write(self) -> bool:
        return bool(self.queue) or self.piped > 0


class RelayHost:
    """The one door between a Relay and whoever owns it (Connections in the gateway, a few lines
    in a test). A relay plans with it, reports to it, and takes its shared resources from it;
    it never sees the endpoint pool, the listener or the gateway.

    Attributes: `reactor` (Reactor), `data` (DataPath), `dial_timeout` (seconds an attempt may
    go unanswered before the next endpoint is tried alongside it), `connect_timeout` (seconds a
    client may wait for any attempt to connect).
    """

    reactor: Reactor
    data: DataPath
    dial_timeout: float
    connect_timeout: float

    def plan(self) -> List[ep.Endpoint]:
        """The endpoints to try for a new client, best first (the policy's current choice)."""
        raise NotImplementedError

    def dial_order(self, endpoint: ep.Endpoint) -> List[Tuple[int, tuple]]:
        """(family, sockaddr) of `endpoint`'s addresses in the order to try them."""
        return endpoint.dial_addresses()

    def relay_connected(self, relay: "Relay") -> None:
        """`relay` has connected to `relay.endpoint` and relays from now on."""

    def dial_failed(self, endpoint: ep.Endpoint, reason: str) -> None:
        """A dial to `endpoint` failed for a reason that is the endpoint's (or the network's)."""

    def attempt_outlived(self, dial: Dial) -> None:
        """Another attempt won while `dial` was still connecting: its outcome is the host's now
        (see Dial.hand_over), so that a member that never answers is found out, and a slow one
        is not blamed."""
        dial.cancel()

    def local_fault(self, relay: "Relay", reason: str, giving_up: bool) -> None:
        """A dial failed for a reason of ours (out of descriptors): the client waits and the
        relay retries shortly, or gives up (`giving_up`) after LOCAL_RETRY_TIMEOUT."""

    def no_upstream(self, relay: "Relay") -> None:
        """Every endpoint was tried and failed: the client is closed."""

    def relay_failed(self, relay: "Relay", exc: BaseException) -> None:
        """A bug surfaced while handling `relay`; it is reset right after."""

    def relay_closed(self, relay: "Relay", endpoint: Optional[ep.Endpoint], reset: bool,
                     bytes_up: int, bytes_down: int) -> None:
        """`relay` has closed; `endpoint` is the one it relayed to (None if it never did), and
        it moved `bytes_up` from the client and `bytes_down` to it."""


class Relay:
    """A client connection and its upstream. DIALING -> RELAYING -> CLOSED.

    Public, read-only: `endpoint` and `address` (what it relays to, once connected), `started`
    (clock time), `bytes_moved()`, `relays_to(endpoint)`. Everything else is the relay's own."""

    def __init__(self, host: RelayHost, client_sock: socket.socket, peer):
        self.host = host
        self.reactor = host.reactor
        self.data = host.data
        self.client_sock = client_sock
        self.upstream_sock = None
        self.peer = peer
        self.state = DIALING
        self.plan = None
        self.tried = []  # the endpoints taken from the plan so far
        self.endpoint = None
        self.attempts = []  # Dials in flight, oldest first
        self.targets = ()  # (endpoint, address) still to try of the endpoint taken from the plan
        self.address = None  # the (family, sockaddr) relayed to
        self.stagger_timer = self.retry_timer = None
        self.started = self.reactor.clock()
        self.connect_deadline = self.started + host.connect_timeout
        self.up = self.down = None  # the Flows, client to upstream and back, once connected
        self.client_mask = self.upstream_mask = 0

    def __repr__(self):
        flows = "" if self.up is None else " up=%s down=%s" % (self.up.state.value, self.down.state.value)
        return "<Relay %s client=%s upstream=%s%s>" % (
            self.state.value, ep.format_hostport(*self.peer[:2]) if self.peer else "?",
            self.endpoint, flows)

    def bytes_moved(self):
        """(client to upstream, upstream to client) so far."""
        return (0, 0) if self.up is None else (self.up.total, self.down.total)

    def relays_to(self, endpoint: ep.Endpoint) -> bool:
        """Whether this relay is connected to `endpoint` now."""
        return self.state is RELAYING and self.endpoint.key == endpoint.key

    # -- dialing ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.plan = self.host.plan()
        self._attempt_next()

    def _attempt_next(self) -> None:
        """Start a connect to the next endpoint of the plan. The earlier attempts go on (racing,
        as in RFC 8305): the first to connect wins. Each is bounded by what is left of the
        client's --connect-timeout; if it is still unanswered after --dial-timeout, the next
        endpoint is tried alongside it."""
        if self.state is not DIALING:
            return
        if self.stagger_timer is not None:
            self.reactor.cancel(self.stagger_timer)
            self.stagger_timer = None
        # The first attempt starts within its budget: no need to read the clock for it.
        in_time = not self.tried or self.reactor.clock() < self.connect_deadline
        target = self._next_target() if in_time else None
        if target is None:
            if not self.attempts:
                self.host.no_upstream(self)
                self._close()
            return
        endpoint, address = target
        dial = Dial(self.reactor, endpoint, self.host.connect_timeout, self._dialed, address,
                    self.connect_deadline)
        self.attempts.append(dial)
        dial.start()
        if self.state is DIALING:  # not connected at once (the loopback fast path)
            self.reactor.cancel(self.stagger_timer)  # one armed by a failure inside start()
            self.stagger_timer = self.reactor.call_later(self.host.dial_timeout, self._attempt_next)

    def _next_target(self):
        """(endpoint, address) to try next: the addresses of one endpoint in turn (the one that
        last answered first), then those of the plan's next endpoint; None when all were tried."""
        if self.targets:
            return self.targets.pop(0)
        while self.plan:
            endpoint = self.plan.pop(0)
            self.tried.append(endpoint)
            addresses = self.host.dial_order(endpoint)
            if len(addresses) > 1:
                # zip, not a comprehension: its closure cell would be made on every call
                self.targets = list(zip(itertools.repeat(endpoint), addresses[1:]))
            if addresses:
                return endpoint, addresses[0]
            self.host.dial_failed(endpoint, "no address")
        return None

    def _wait_for_descriptor(self, endpoint: ep.Endpoint, reason: str) -> None:
        """Out of descriptors or ports is our problem, not the endpoint's: keep the client waiting
        (it has sent nothing we read) and try the same endpoint again shortly, for a bounded time."""
        if self.reactor.clock() - self.started > LOCAL_RETRY_TIMEOUT:
            self.host.local_fault(self, reason, giving_up=True)
            self._close(reset=True)
            return
        self.host.local_fault(self, reason, giving_up=False)
        self.targets = ()
        self.plan.insert(0, endpoint)
        self.tried.remove(endpoint)
        self.retry_timer = self.reactor.call_later(ACCEPT_PAUSE_DELAY, self._retry_after_local_fault)

    def _retry_after_local_fault(self) -> None:
        self.retry_timer = None
        # A fresh connect budget: the wait was ours, not the network's.
        self.connect_deadline = self.reactor.clock() + self.host.connect_timeout
        self._attempt_next()

    def _dialed(self, dial: Dial, sock, reason) -> None:
        self.attempts.remove(dial)
        if sock is not None:
            self._connected(dial, sock)
        elif dial.local_failure:
            if not self.attempts:
                self._wait_for_descriptor(dial.endpoint, reason)
        else:
            self._failed(dial.endpoint, reason)
            self._attempt_next()  # a failure moves on at once; only slowness waits

    def _failed(self, endpoint: ep.Endpoint, reason: str) -> None:
        """One address of `endpoint` failed; the endpoint has failed once none is left to try."""
        key = endpoint.key
        if any(e.key == key for e, _ in self.targets) or any(d.endpoint.key == key for d in self.attempts):
            return
        self.host.dial_failed(endpoint, reason)
        # Plan again: after a failure the policy chooses anew (sticky's next endpoint serves
        # this client too), and endpoints already tried are not tried twice.
        tried = {e.key for e in self.tried}
        self.plan = [e for e in self.host.plan() if e.key not in tried]

    def _connected(self, dial: Dial, sock) -> None:
        if self.stagger_timer is not None:  # armed when the connect did not complete at once
            self.reactor.cancel(self.stagger_timer)
            self.stagger_timer = None
        if self.attempts:  # the losers of a race
            for loser in self.attempts:
                self.host.attempt_outlived(loser)
            self.attempts = []
        if self.targets:
            self.targets = ()
        self.endpoint = dial.endpoint
        self.address = dial.address
        self.upstream_sock = sock
        try:
            sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
        except OSError:
            pass  # the peer may already be gone: the first recv will tell
        self.data.keepalive.add(sock)
        client = self.client_sock
        self.up = Flow(client, sock)
        self.down = Flow(sock, client)
        self.state = RELAYING
        self.host.relay_connected(self)
        # Nothing is queued yet: both sides are only read (what _update_interest would derive).
        self.client_mask = self.upstream_mask = READ_TO_EOF
        self.reactor.register(self.client_sock, READ_TO_EOF, self)
        self.reactor.register(sock, READ_TO_EOF, self)

    # -- events ----------------------------------------------------------------------------------

    def handle_io(self, sock, mask) -> None:
        if self.state is not RELAYING:
            return  # closed earlier in this same batch of events
        client = sock is self.client_sock
        if mask == EVENT_READ or mask == READ_TO_EOF:
            flow = self.up if client else self.down
            if flow.spliced and not flow.queue:  # _pump() inlined: this runs once per message
                self._pump_spliced(flow)
            else:
                self._pump_copied(flow, mask)
            if flow.state is OPEN and not flow.queue and not flow.piped:
                return  # the hot path: everything read was passed on, so no mask changed
            if self.state is RELAYING:
                self._update_interest()
            return
        if mask & EVENT_WRITE:
            self._flush(self.down if client else self.up)
        if mask & EVENT_READ and self.state is RELAYING:
            self._pump(self.up if client else self.down)
        if self.state is RELAYING:
            self._update_interest()

    def handle_failure(self, exc) -> None:
        self.host.relay_failed(self, exc)
        self._reset_both()

    def _pump(self, flow: Flow) -> None:
        if flow.spliced and not flow.queue:
            self._pump_spliced(flow)
        else:
            self._pump_copied(flow)

    def _pump_spliced(self, flow: Flow) -> None:
        """Move what `flow.src` has into a pipe and on to `flow.dst` without copying it through
        Python; what the peer did not take stays in the pipe, which the flow then keeps."""
        pipes = self.data.pipes
        pipe = flow.pipe or pipes.take()
        if pipe is None:
            self._pump_copied(flow)  # out of descriptors for a pipe: copy this time
            return
        flow.pipe = pipe
        try:
            count = splice(flow.src_fd, pipe[1], pipe[2], flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            count = -1
        except OSError:
            self._reset_both()
            return
        if count > 0:
            flow.total += count
            flow.piped += count
            self._drain_pipe(flow)
        elif not flow.piped:
            flow.pipe = None
            pipes.give(pipe)
        if count == 0:
            self._eof(flow)

    def _drain_pipe(self, flow: Flow) -> None:
        try:
            flow.piped -= splice(flow.pipe[0], flow.dst_fd, flow.piped, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._reset_both()
            return
        if not flow.piped:
            self.data.pipes.give(flow.pipe)
            flow.pipe = None

    def _pump_copied(self, flow: Flow, mask: int = EVENT_READ) -> None:
        """Read what `flow.src` has and send it at once; queue only what the peer did not take.
        With `mask` READ_TO_EOF (the peer's FIN was in before this read), a short read has taken
        the last bytes: the EOF is passed on now, not after one more wake-up and recv."""
        data = self.data
        try:
            count = flow.src.recv_into(data.recv_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._reset_both()  # a reset from one side is passed on as a reset to the other
            return
        if count == 0:
            self._eof(flow)
            return
        flow.total += count
        if count >= SPLICE_MIN_BYTES and data.pipes is not None:
            flow.spliced = True  # bulk: splice the next reads
        if flow.queue:
            flow.queue += data.recv_view[:count]
        else:
            try:
                sent = flow.dst.send(data.recv_view[:count])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._reset_both()
                return
            if sent < count:
                flow.queue = bytearray(data.recv_view[sent:count])
        if mask == READ_TO_EOF and count < RECV_CHUNK_BYTES:
            self._eof(flow)

    def _flush(self, flow: Flow) -> None:
        if flow.piped:
            self._drain_pipe(flow)
            if flow.piped or self.state is not RELAYING:
                return
        if flow.queue:
            try:
                sent = flow.dst.send(flow.queue)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._reset_both()
                return
            del flow.queue[:sent]
            if not flow.queue:
                flow.queue = b""  # an idle connection holds no buffer
        if not flow.queue and flow.state is DRAINING:
            self._shut(flow)

    def _eof(self, flow: Flow) -> None:
        flow.state = DRAINING
        if not flow.queue and not flow.piped:
            self._shut(flow)

    def _shut(self, flow: Flow) -> None:
        """The queue has drained after EOF: pass the half-close on."""
        flow.state = SHUT
        if self.up.state is SHUT and self.down.state is SHUT:
            # Both sides have been read to EOF, so close() sends the FIN itself (not a reset):
            # one shutdown() less per connection.
            self._close()
            return
        try:
            flow.dst.shutdown(SHUT_WR)
        except OSError:
            pass  # the peer is gone already; its own read side will report it

    def _update_interest(self) -> None:
        """Derive both sockets' selector masks from the flows; touch the selector only on change."""
        client_mask = ((READ_TO_EOF if self.up.wants_read() else 0)
                       | (EVENT_WRITE if self.down.wants_write() else 0))
        upstream_mask = ((READ_TO_EOF if self.down.wants_read() else 0)
                         | (EVENT_WRITE if self.up.wants_write() else 0))
        if client_mask != self.client_mask:
            self._apply_mask(self.client_sock, self.client_mask, client_mask)
            self.client_mask = client_mask
        if upstream_mask != self.upstream_mask:
            self._apply_mask(self.upstream_sock, self.upstream_mask, upstream_mask)
            self.upstream_mask = upstream_mask

    def _apply_mask(self, sock, old: int, new: int) -> None:
        if old == 0:
            self.reactor.register(sock, new, self)
        elif new == 0:
            self.reactor.unregister(sock)
        else:
            self.reactor.modify(sock, new, self)

    # -- endings ---------------------------------------------------------------------------------

    def _reset_both(self) -> None:
        self._close(reset=True)

    def abort(self) -> None:
        """Close both sides now (shutdown timeout, endpoint evicted)."""
        self._close(reset=True)

    def _close(self, reset: bool = False) -> None:
        state = self.state
        if state is CLOSED:
            return
        self.state = CLOSED
        if self.attempts:
            for dial in self.attempts:
                dial.cancel()
            self.attempts = []
        if self.stagger_timer is not None:
            self.reactor.cancel(self.stagger_timer)
        if self.retry_timer is not None:
            self.reactor.cancel(self.retry_timer)
        self._let_go(self.client_sock, self.client_mask, reset)
        if self.upstream_sock is not None:
            self._let_go(self.upstream_sock, self.upstream_mask, reset)
        self.client_mask = self.upstream_mask = 0
        if self.up is not None:  # connected: a flow may hold a pipe
            for flow in (self.up, self.down):
                if flow.pipe is not None:
                    PipePool.discard(flow.pipe)
                    flow.pipe, flow.piped = None, 0
        up, down = self.bytes_moved()
        self.host.relay_closed(self, self.endpoint if state is RELAYING else None, reset, up, down)

    def _let_go(self, sock, mask: int, reset: bool) -> None:
        if mask:
            self.reactor.unregister(sock, closing=True)
        if reset:
            abort(sock)
        else:
            sock.close()


# ===================================================================================== probes ==

try:
    import ssl
    SSL_WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
except ImportError:  # some minimal Pythons lack it: TLS features then report that they cannot work
    ssl = None
    SSL_WOULD_BLOCK = ()

PROBE_MAX_REPLY_BYTES = 64 * 1024


class ProbePhase(enum.Enum):
    """DIAL -> [HANDSHAKE] -> [SEND -> RECEIVE] -> DONE; CLOSED once finished or cancelled."""
    DIAL = "dial"
    HANDSHAKE = "handshake"
    SEND = "send"
    RECEIVE = "receive"
    DONE = "done"
    CLOSED = "closed"


class Probe:
    """Connect, optionally complete a TLS handshake, optionally send `request` and read the reply
    until EOF; non-blocking. The connect is bounded by `connect_timeout` (default: `timeout`),
    what follows it by `timeout`. `start()` begins it; `on_done(probe, ok,
    reply, reason)` is called exactly once unless cancelled, possibly from within `start()`.
    Used for TCP probes, TLS validation and etcd /health checks. `connected` says whether the
    TCP connect succeeded; `local_failure` whether the failure was ours (out of descriptors);
    `tls_refused` whether the member refused our TLS client configuration (see
    `refused_our_certificate`)."""

    def __init__(self, reactor: Reactor, endpoint: ep.Endpoint, timeout: float, on_done,
                 tls_context=None, server_hostname: str = "", request: bytes = b"",
                 connect_timeout: Optional[float] = None):
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout or timeout
        self.on_done = on_done
        self.tls_context = tls_context
        self.server_hostname = server_hostname or endpoint.host
        self.pending = bytearray(request)
        self.expects_reply = bool(request)
        self.reply = bytearray()
        self.sock = None
        self.mask = 0
        self.connected = False
        self.local_failure = False
        self.tls_refused = False
        self.phase = ProbePhase.DIAL
        self.timer = None
        self.dial = None

    def __repr__(self):
        return "<Probe %s %s>" % (self.endpoint, self.phase.value)

    def start(self) -> None:
        self.dial = Dial(self.reactor, self.endpoint, self.connect_timeout, self._connected)
        self.dial.start()

    def _connected(self, dial, sock, reason) -> None:
        self.dial = None
        if sock is None:
            self.local_failure = dial.local_failure
            self._finish(False, reason)
            return
        self.sock = sock
        self.connected = True
        self.timer = self.reactor.call_later(self.timeout, self._finish, False,
                                             "timeout after " + format_duration(self.timeout))
        if self.tls_context is not None:
            self.phase = ProbePhase.HANDSHAKE
            self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.server_hostname,
                                                     do_handshake_on_connect=False)
        else:
            self.phase = ProbePhase.SEND if self.expects_reply else ProbePhase.DONE
        self._advance()

    def handle_io(self, sock, mask) -> None:
        if self.phase is not ProbePhase.CLOSED:
            self._advance()

    def handle_failure(self, exc) -> None:
        self._finish(False, error_reason(exc))

    def _advance(self) -> None:
        want = EVENT_READ
        try:
            if self.phase is ProbePhase.HANDSHAKE:
                self.sock.do_handshake()
                self.phase = ProbePhase.SEND if self.expects_reply else ProbePhase.DONE
            if self.phase is ProbePhase.SEND:
                want = EVENT_WRITE
                del self.pending[:self.sock.send(self.pending)]
                if not self.pending:
                    self.phase = ProbePhase.RECEIVE
            if self.phase is ProbePhase.RECEIVE:
                want = EVENT_READ
                self._receive()
        except SSL_WOULD_BLOCK as exc:
            want = EVENT_WRITE if isinstance(exc, ssl.SSLWantWriteError) else EVENT_READ
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ValueError) as exc:  # ssl.SSLError and certificate errors are OSErrors
            self.tls_refused = refused_our_certificate(exc)
            self._finish(False, tls_reason(exc))
            return
        if self.phase is ProbePhase.DONE:
            self._finish(True, "")
        else:
            self._want(want)

    def _receive(self) -> None:
        while True:
            chunk = self.sock.recv(16384)
            if not chunk:
                self.phase = ProbePhase.DONE
                return
            self.reply += chunk
            if len(self.reply) > PROBE_MAX_REPLY_BYTES:
                raise ValueError("reply larger than %d bytes" % PROBE_MAX_REPLY_BYTES)

    def _want(self, mask: int) -> None:
        if mask == self.mask:
            return
        if self.mask:
            self.reactor.modify(self.sock, mask, self)
        else:
            self.reactor.register(self.sock, mask, self)
        self.mask = mask

    def _finish(self, ok: bool, reason: str) -> None:
        if self.phase is ProbePhase.CLOSED:
            return
        self.cancel()
        self.on_done(self, ok, bytes(self.reply), reason)

    def cancel(self) -> None:
        """Abandon the probe without a callback."""
        self.phase = ProbePhase.CLOSED
        self.reactor.cancel(self.timer)
        if self.dial is not None:
            self.dial.cancel()
            self.dial = None
        if self.sock is not None:
            if self.mask:
                self.reactor.unregister(self.sock)
                self.mask = 0
            self.sock.close()
            self.sock = None


def tls_reason(exc: BaseException) -> str:
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate verify failed: %s" % (exc.verify_message or exc.reason)
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return "TLS error: %s" % (exc.reason or exc)
    return error_reason(exc)


# Alerts a member sends about the certificate the gateway presented, or failed to present (RFC
# 8446 section 6.2; Go's servers send "bad certificate" when a client certificate is required and
# none came; "handshake failure" when nothing the gateway offers is acceptable). The fault is the
# gateway's --cert/--key or TLS settings (or which CA the member trusts), not a sign that the
# member is down: its clients' own certificates pass through untouched.
CLIENT_CERTIFICATE_ALERTS = frozenset((
    "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE",
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED"))
TLS_CONFIG_REPORT_INTERVAL = 3600.0  # a configuration problem is said once (then hourly)


def refused_our_certificate(exc: BaseException) -> bool:
    """True when `exc` is a member's TLS alert about the gateway's own client certificate."""
    return (ssl is not None and isinstance(exc, ssl.SSLError)
            and not isinstance(exc, ssl.SSLCertVerificationError)
            and exc.reason in CLIENT_CERTIFICATE_ALERTS)


def report_tls_refusal(log: Log, endpoint: ep.Endpoint, reason: str, has_cert: bool) -> None:
    """Say once, for every kind of request the gateway makes, that a member refused its TLS
    client configuration. Nothing else follows from it: the member is not marked down or
    unhealthy, and clients' connections (TLS passed through) are not touched."""
    log.limited("error", "tls-client-config", TLS_CONFIG_REPORT_INTERVAL,
                "a member refused the gateway's own TLS client configuration: a configuration "
                "problem, not the member's", endpoint=str(endpoint), reason=reason,
                hint=tls_refusal_hint(has_cert))


def tls_refusal_hint(has_cert: bool) -> str:
    return "check --cert/--key" if has_cert else "give --cert and --key"


def make_tls_context(ca_file: str, cert_file: str = "", key_file: str = ""):
    """A client context that verifies the chain against `ca_file` (the system CAs when empty) and
    presents `cert_file`/`key_file` when given."""
    if ssl is None:
        raise ConfigError("this Python has no ssl module: TLS endpoints cannot be verified")
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cannot load --trusted-ca-file %s: %s" % (ca_file, tls_reason(exc))) from None
    if cert_file:
        try:
            # An encrypted key gets an empty password rather than a prompt on the terminal.
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("cannot load --cert %s / --key %s: %s"
                              % (cert_file, key_file, tls_reason(exc))) from None
    return context


def health_request(endpoint: ep.Endpoint) -> bytes:
    """GET /health?serializable=true: the member answers from its own state (no alarm, a local
    read works) instead of a linearizable read confirmed by the leader, which a fleet multiplies
    (10,000 hosts x 3 members every 5 s: 6,000 reads/s; docs/FLEET.md). etcd < 3.5.3 ignores the
    parameter and checks as before, RAFT NO LEADER included. From 3.5.3 on, etcd's checkLeader
    is skipped for serializable checks: a member cut off from the quorum then still answers
    healthy, and what these checks catch is a hung member, an alarm or a failing local read."""
    return ("GET /health?serializable=true HTTP/1.1\r\nHost: %s\r\nUser-Agent: etcd-gateway/%s\r\n"
            "Accept: application/json\r\nConnection: close\r\n\r\n"
            % (endpoint, VERSION)).encode()


def parse_health_reply(reply: bytes):
    """(ok, reason) from etcd's reply to GET /health: 200 and a JSON object whose "health" is the
    string "true" is healthy; otherwise the reason says the status and etcd's own "reason"."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        return False, "not an HTTP reply"
    fields = health_fields(body)
    if status_line[1] == b"200" and fields.get("health") == "true":
        return True, ""
    detail = fields.get("reason")
    return False, "health %s%s" % (status_line[1].decode("ascii", "replace"),
                                   ": " + detail if isinstance(detail, str) and detail else "")


def health_fields(body: bytes) -> dict:
    """The JSON object a health reply carries; {} for anything else (cut short, not JSON)."""
    try:
        value = parse_json(body.decode("utf-8", "replace"))
    except JsonError:
        return {}
    return value if isinstance(value, dict) else {}


# ===================================================================================== status ==

STATUS_MAX_REQUEST_BYTES = 8192
STATUS_REQUEST_TIMEOUT = 5.0
# Status clients at once: each holds a descriptor that the proxy may need. One more makes the
# oldest go, so a crowd of silent clients can neither eat descriptors nor keep a scrape waiting.
STATUS_MAX_CONNECTIONS = 16
STATUS_DRAIN_BYTES = 64 * 1024  # read (and drop) after the reply, so that close() sends no reset
HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                503: "Service Unavailable"}


def http_response(code: int, content_type: str, body: bytes) -> bytes:
    head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n"
            % (code, HTTP_REASONS[code], content_type, len(body)))
    if code == 405:
        head += "Allow: GET\r\n"
    return head.encode() + b"\r\n" + body


class BatchAcceptor:
    """A listening socket accepted from in bounded batches; subclasses say what to do with each
    client (`accepted`) and may log exhaustion (`exhausted`). Out of descriptors or buffers, it
    stops watching the socket for a moment and the pending clients wait in the backlog: staying
    registered would spin on a level-triggered readable listener."""

    socket_class = socket.socket  # what each accepted client becomes

    def __init__(self, reactor: Reactor, sock: socket.socket):
        self.reactor = reactor
        self.sock = sock
        self.family = int(sock.family)
        self.paused = False
        self.closed = False

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.sock.getsockname())

    def start(self) -> None:
        self.reactor.register(self.sock, EVENT_READ, self)

    def handle_io(self, sock, mask) -> None:
        if self.closed:
            return  # stopped earlier in this same batch of events
        # socket.accept() is _accept() plus Python-level work that converts the listener's
        # family and type to enums to build the same socket: a tenth of a relay's Python calls.
        family = self.family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = sock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in LOCAL_ERRNOS:
                    self.pause(error_reason(exc))
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up in the backlog
                raise
            self.accepted(self.socket_class(family, socket.SOCK_STREAM, 0, fd), peer)
            if self.paused:
                return

    def accepted(self, client_sock: socket.socket, peer) -> None:
        raise NotImplementedError

    def exhausted(self, reason: str) -> None:
        """Accepting has just been paused because of `reason`."""

    def pause(self, reason: str) -> None:
        """Out of descriptors or buffers (`reason`): stop accepting for a moment."""
        if not self.paused and not self.closed:
            self.paused = True
            self.reactor.unregister(self.sock)
            self.reactor.call_later(ACCEPT_PAUSE_DELAY, self._resume)
            self.exhausted(reason)

    def _resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.reactor.register(self.sock, EVENT_READ, self)

    def stop(self) -> None:
        """Stop accepting and close the socket; pending clients are refused by the kernel."""
        if not self.closed:
            self.closed = True
            if not self.paused:
                self.reactor.unregister(self.sock)
            self.sock.close()


class StatusListener(BatchAcceptor):
    """The --metrics-addr port, served by the same reactor (http.server blocks, and
    python3-minimal does not ship it). Each client is one StatusConnection."""

    def __init__(self, reactor: Reactor, log: Log, sock: socket.socket, pages: "StatusPages"):
        super().__init__(reactor, sock)
        self.log = log
        self.pages = pages
        self.connections = {}  # StatusConnection -> None, oldest first

    def accepted(self, client_sock: socket.socket, peer) -> None:
        client_sock.setblocking(False)
        if len(self.connections) >= STATUS_MAX_CONNECTIONS:
            next(iter(self.connections)).close()
        connection = StatusConnection(self, client_sock)
        self.connections[connection] = None
        connection.start()

    def connection_closed(self, connection: "StatusConnection") -> None:
        self.connections.pop(connection, None)

    def exhausted(self, reason: str) -> None:
        self.log.limited("warn", "status-accept-exhausted", 5.0, "status accept paused", reason=reason)

    def handle_failure(self, exc) -> None:
        self.log.limited("error", "status-accept", 5.0, "status accept failed", error=repr(exc))

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()
        self.stop()


class StatusConnection:
    """One HTTP/1.x request and its response. A request over 8 KiB or slower than 5 s is dropped,
    so a client of this port cannot hold the gateway's memory or descriptors for long. After the
    reply, the write side is shut and what the client still sends is read and dropped until its
    EOF (bounded), so that unread bytes do not turn the close into a reset that loses the reply."""

    def __init__(self, listener: StatusListener, sock: socket.socket):
        self.listener = listener
        self.reactor = listener.reactor
        self.sock = sock
        self.request = bytearray()
        self.response = b""
        self.replied = False
        self.drained = 0
        self.timer = None

    def __repr__(self):
        return "<StatusConnection fd=%d>" % (self.sock.fileno() if self.sock else -1)

    def start(self) -> None:
        self.reactor.register(self.sock, EVENT_READ, self)
        self.timer = self.reactor.call_later(STATUS_REQUEST_TIMEOUT, self.close)

    def handle_io(self, sock, mask) -> None:
        if self.sock is None:
            return
        if self.response:
            self._send()
            return
        chunk = sock.recv(4096)
        if not chunk or self.replied:
            self._drop(chunk)
            return
        self.request += chunk
        if b"\n\r\n" in self.request or b"\n\n" in self.request:  # a bare LF ends lines too
            self.response = self.listener.pages.respond(bytes(self.request))
            self.reactor.modify(sock, EVENT_WRITE, self)
            self._send()
        elif len(self.request) > STATUS_MAX_REQUEST_BYTES:
            self.close()

    def _send(self) -> None:
        try:
            sent = self.sock.send(self.response)
        except (BlockingIOError, InterruptedError):
            return
        self.response = self.response[sent:]
        if not self.response:
            self.replied = True
            self.sock.shutdown(socket.SHUT_WR)
            self.reactor.modify(self.sock, EVENT_READ, self)

    def _drop(self, chunk: bytes) -> None:
        """After the reply: read to the client's EOF, dropping what comes, up to a bound."""
        self.drained += len(chunk)
        if not chunk or self.drained > STATUS_DRAIN_BYTES:
            self.close()

    def handle_failure(self, exc) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is None:
            return
        self.reactor.cancel(self.timer)
        self.reactor.unregister(self.sock)
        self.sock.close()
        self.sock = None
        self.listener.connection_closed(self)


class Stats:
    """Counters of events that the status pages report; the gateway's parts add to them."""

    __slots__ = ("connections_total", "client_to_upstream", "upstream_to_client", "refresh_ok",
                 "refresh_error", "sync_ok", "sync_error")

    def __init__(self):
        self.connections_total = 0
        self.client_to_upstream = self.upstream_to_client = 0  # bytes of closed connections
        self.refresh_ok = self.refresh_error = 0
        self.sync_ok = self.sync_error = 0  # member sync rounds


class StatusPages:
    """/metrics, /health and /endpoints: what they say, and the listener that serves them. It
    reads the endpoint pool, the counters and the live connections; it changes nothing."""

    def __init__(self, reactor: Reactor, log: Log, pool: ep.Pool, stats: Stats,
                 connections: "Connections", source_of: Optional[Callable[[ep.Endpoint], str]] = None):
        self.reactor = reactor
        self.log = log
        self.pool = pool
        self.stats = stats
        self.connections = connections
        self.source_of = source_of or (lambda endpoint: "seed")  # "seed" or "synced" (member sync)
        self.start_wall = time.time()
        self.listener = None
        self.draining = False  # shutting down: /health says so, so that a balancer moves on

    def serve(self, sock: socket.socket) -> None:
        self.listener = StatusListener(self.reactor, self.log, sock, self)
        self.listener.start()

    def stop_accepting(self) -> None:
        """Leave the port (a new process serves it now); requests in progress are answered."""
        if self.listener is not None:
            self.listener.stop()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def respond(self, request: bytes) -> bytes:
        parts = request.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return http_response(400, "text/plain", b"bad request\n")
        if parts[0] != b"GET":
            return http_response(405, "text/plain", b"method not allowed\n")
        return self.page(parts[1].split(b"?", 1)[0].decode("ascii", "replace"))

    def page(self, path: str) -> bytes:
        if path == "/metrics":
            return http_response(200, "text/plain; version=0.0.4; charset=utf-8", self.render_metrics())
        if path == "/health":
            if self.draining:
                return http_response(503, "application/json",
                                     b'{"health":"false","reason":"shutting down"}')
            healthy = self.pool.any_usable()
            body = b'{"health":"true"}' if healthy else b'{"health":"false"}'
            return http_response(200 if healthy else 503, "application/json", body)
        if path == "/endpoints":
            return http_response(200, "application/json", self.render_endpoints())
        return http_response(404, "text/plain", b"not found\n")

    def render_endpoints(self) -> bytes:
        rows = []
        for health in self.pool.healths():
            endpoint = health.endpoint
            fields = [("endpoint", str(endpoint)), ("address", endpoint.dial_host),
                      ("addresses", list(endpoint.addresses)), ("port", endpoint.port),
                      ("up", health.up), ("healthy", health.healthy), ("priority", endpoint.priority),
                      ("weight", endpoint.weight), ("secure", endpoint.secure),
                      ("active_connections", health.active), ("dial_failures", health.dial_failures),
                      ("last_error", health.last_error), ("source", self.source_of(endpoint))]
            rows.append("{" + ",".join("%s:%s" % (_json_string(k), _json_value(v)) for k, v in fields) + "}")
        return ("[" + ",".join(rows) + "]\n").encode()

    def render_metrics(self) -> bytes:
        stats = self.stats
        live_up, live_down = self.connections.live_bytes()
        healths = self.pool.healths()
        out = MetricsText()
        out.family("etcd_gateway_connections_total", "counter", "Client connections accepted.",
                   [((), stats.connections_total)])
        out.family("etcd_gateway_active_connections", "gauge", "Client connections open now.",
                   [((), self.connections.count())])
        out.family("etcd_gateway_bytes_total", "counter", "Bytes relayed, by direction.",
                   [((("direction", "client_to_upstream"),), stats.client_to_upstream + live_up),
                    ((("direction", "upstream_to_client"),), stats.upstream_to_client + live_down)])
        out.family("etcd_gateway_dial_failures_total", "counter", "Failed connects, by endpoint.",
                   [((("endpoint", str(h.endpoint)),), h.dial_failures) for h in healths])
        out.family("etcd_gateway_endpoint_up", "gauge", "1 when the endpoint is reachable and healthy.",
                   [((("endpoint", str(h.endpoint)),), int(h.up and h.healthy)) for h in healths])
        out.family("etcd_gateway_endpoint_active_connections", "gauge",
                   "Relayed connections open now, by endpoint.",
                   [((("endpoint", str(h.endpoint)),), h.active) for h in healths])
        out.family("etcd_gateway_discovery_refreshes_total", "counter",
                   "DNS discovery refreshes, by result.",
                   [((("result", "ok"),), stats.refresh_ok), ((("result", "error"),), stats.refresh_error)])
        out.family("etcd_gateway_member_syncs_total", "counter",
                   "Member list syncs (--auto-sync-interval), by result.",
                   [((("result", "ok"),), stats.sync_ok), ((("result", "error"),), stats.sync_error)])
        for name, help_text, value in read_process_gauges(self.start_wall):
            out.family(name, "counter" if name.endswith("_total") else "gauge", help_text, [((), value)])
        return out.render()


def prometheus_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def read_process_gauges(start_wall: float):
    """(name, help, value) of the process_* gauges, read from /proc (Linux)."""
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = -1
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = -1
    return [("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
             start_wall),
            ("process_open_fds", "Number of open file descriptors.", open_fds),
            ("process_resident_memory_bytes", "Resident memory size in bytes.", rss)]


class MetricsText:
    """Prometheus text exposition format 0.0.4: HELP and TYPE once per family, then samples."""

    def __init__(self):
        self.lines = []

    def family(self, name: str, kind: str, help_text: str, samples) -> None:
        self.lines.append("# HELP %s %s" % (name, help_text))
        self.lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            label_text = ",".join('%s="%s"' % (k, prometheus_label(str(v))) for k, v in labels)
            self.lines.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "",
                                           _prometheus_number(value)))

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def _prometheus_number(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        if value != value:
            return "NaN"  # the text format's spelling; Python's repr says nan, inf
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(int(value))


# ================================================================================== discovery ==

DNS_REPLY_MAX_BYTES = 65535


class DnsQuery:
    """One dnssrv Query on its own fresh non-blocking socket (a fresh random source port each)."""

    def __init__(self, driver: "DnsDriver", query):
        self.driver = driver
        self.query = query
        self.frames = dnssrv.TCPFrameReader()
        self.unsent = b""
        kind = socket.SOCK_DGRAM if query.transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(query.family, kind)
        try:
            self._start(query)
        except OSError:
            self.sock.close()
            raise
        driver.reactor.register(self.sock, self.mask, self)

    def _start(self, query) -> None:
        self.sock.setblocking(False)
        if query.transport == "udp":
            self.sock.connect(query.server)  # the kernel then drops datagrams from other sources
            self.sock.send(query.wire)
            self.mask = EVENT_READ
        else:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = self.sock.connect_ex(query.server)
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            self.unsent = query.wire
            self.mask = EVENT_WRITE

    def __repr__(self):
        return "<DnsQuery %r>" % (self.query,)

    def handle_io(self, sock, mask) -> None:
        if self.sock is None:
            return
        if self.unsent:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            self.unsent = self.unsent[sock.send(self.unsent):]
            if not self.unsent:
                self.mask = EVENT_READ
                self.driver.reactor.modify(sock, EVENT_READ, self)
            return
        data = sock.recv(DNS_REPLY_MAX_BYTES)
        if self.query.transport == "tcp":
            if not data:
                raise OSError(errno.ECONNRESET, "connection closed before the reply")
            data = self.frames.feed(data)
            if data is None:
                return
        self.driver.reply(self.query, data)

    def handle_failure(self, exc) -> None:
        if not isinstance(exc, OSError):
            self.driver.reactor.log.error("DNS handling failed", query=repr(self), error=repr(exc))
        self.driver.failed(self.query, error_reason(exc))

    def close(self) -> None:
        if self.sock is not None:
            self.driver.reactor.unregister(self.sock)
            self.sock.close()
            self.sock = None


class DnsDriver:
    """Drives a sans-I/O dnssrv machine from the reactor: sends what it asks for, feeds it the
    replies, tells it about deadlines, and calls `on_done(machine)` once it has finished."""

    def __init__(self, reactor: Reactor, machine, on_done):
        self.reactor = reactor
        self.machine = machine
        self.on_done = on_done
        self.queries = {}
        self.timer = None

    def start(self) -> None:
        self._pump()

    def reply(self, query, data: bytes) -> None:
        self.machine.feed(query.server, data, self.reactor.clock())
        self._pump()

    def failed(self, query, reason: str) -> None:
        self.machine.on_error(query, reason, self.reactor.clock())
        self._pump()

    def _timed_out(self) -> None:
        self.timer = None
        self.machine.on_timeout(self.reactor.clock())
        self._pump()

    def _pump(self) -> None:
        if self.on_done is None:
            return
        sends = self.machine.take_sends()
        while sends:  # a send that fails at once makes the machine move on to the next server
            for query in sends:
                try:
                    self.queries[query] = DnsQuery(self, query)
                except OSError as exc:
                    self.machine.on_error(query, error_reason(exc), self.reactor.clock())
            sends = self.machine.take_sends()
        waiting = set(self.machine.waiting())
        for query in [q for q in self.queries if q not in waiting]:
            self.queries.pop(query).close()
        if self.machine.done:
            self._finish()
        else:
            self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.machine.next_deadline()
        self.reactor.cancel(self.timer)
        self.timer = None
        if deadline is not None:
            self.timer = self.reactor.call_later(max(0.0, deadline - self.reactor.clock()), self._timed_out)

    def _finish(self) -> None:
        on_done, self.on_done = self.on_done, None
        self.cancel()
        on_done(self.machine)

    def cancel(self) -> None:
        self.on_done = None
        self.reactor.cancel(self.timer)
        for query in list(self.queries):
            self.queries.pop(query).close()


class EndpointSource:
    """Where the endpoints come from, found without blocking the relays.

    With --discovery-srv: the SRV records of etcd's names, their targets resolved (hosts file,
    glue, A/AAAA) and, unless --insecure-discovery, only `_etcd-client-ssl` records whose member
    completes a verified TLS handshake for the target name or the discovery domain. Without it:
    the --endpoints, host names resolved with /etc/hosts and DNS. `refresh(on_done)` runs one
    round and calls `on_done(endpoints, None)` or `on_done(None, reason)`; after a round's DNS
    answers, `min_ttl` is the smallest TTL of their records (None: none had one).
    """

    def __init__(self, reactor: Reactor, options, tls_context, resolv_conf_path: str = "/etc/resolv.conf",
                 hosts_path: str = "/etc/hosts"):
        self.reactor = reactor
        self.options = options
        self.tls_context = tls_context
        self.resolv_conf_path = resolv_conf_path
        self.hosts_path = hosts_path
        self.use_srv = bool(options.discovery_srv)
        # (target, port, address) that passed TLS validation once -> the name it passed for
        self.validated = {}
        self.pending = []
        self.min_ttl = None

    @property
    def dynamic(self) -> bool:
        return self.use_srv or any(not endpoint.address for endpoint in self.options.endpoints)

    def _dns_config(self, on_done):
        """resolv.conf (its nameservers replaced by --dns-server) and the hosts file, read afresh
        for every round; None after telling `on_done` why they cannot be read or used."""
        try:
            conf = dnssrv.load_resolv_conf(self.resolv_conf_path)
            hosts = dnssrv.load_hosts(self.hosts_path)
        except (OSError, UnicodeError) as exc:
            on_done(None, "cannot read the DNS configuration (%s, %s): %s"
                    % (self.resolv_conf_path, self.hosts_path, error_reason(exc)))
            return None
        if self.options.dns_server:
            conf = conf._replace(nameservers=self.options.dns_server)
        try:
            conf = dnssrv.bind_scope_ids(conf)  # `nameserver fe80::1%eth0` needs eth0's index
        except ValueError as exc:
            on_done(None, "%s: %s" % (self.resolv_conf_path, exc))
            return None
        return conf, hosts

    def refresh(self, on_done) -> None:
        if not self.use_srv:
            self.resolve_static(on_done)
            return
        config = self._dns_config(on_done)
        if config is None:
            return
        conf, hosts = config
        now, rng = self.reactor.clock(), random.SystemRandom()
        names = dnssrv.srv_names(self.options.discovery_srv, self.options.discovery_srv_name)
        machine = dnssrv.SRVDiscovery(names, conf, rng, now, hosts)
        driver = DnsDriver(self.reactor, machine, lambda m: _guarded(
            on_done, self._srv_done, m, names, on_done))
        self.pending.append(driver)
        driver.start()

    def resolve_static(self, on_done, endpoints: Optional[Sequence[ep.Endpoint]] = None) -> None:
        """Resolve the --endpoints host names, or those of `endpoints` (IP literals stay as they are)."""
        endpoints = list(self.options.endpoints if endpoints is None else endpoints)
        results = {}

        def resolved(index, machine):
            results[index] = machine
            if len(results) == len(unresolved):
                _guarded(on_done, self._static_done, endpoints, results, on_done)

        unresolved = [i for i, endpoint in enumerate(endpoints) if not endpoint.address]
        if not unresolved:
            on_done(endpoints, None)
            return
        config = self._dns_config(on_done)
        if config is None:
            return
        conf, hosts = config
        now, rng = self.reactor.clock(), random.SystemRandom()
        for index in unresolved:
            machine = dnssrv.AddressLookup(endpoints[index].host, conf, rng, now, hosts)
            driver = DnsDriver(self.reactor, machine, lambda m, index=index: resolved(index, m))
            self.pending.append(driver)
            driver.start()

    def _static_done(self, endpoints, results, on_done) -> None:
        self.pending = []
        for index, machine in results.items():
            if machine.error is not None or not machine.result.addresses:
                on_done(None, "cannot resolve endpoint %s: %s" % (endpoints[index], machine.error))
                return
            endpoints[index] = endpoints[index].with_addresses(machine.result.addresses)
        ttls = [m.result.min_ttl for m in results.values() if m.result.min_ttl is not None]
        self.min_ttl = min(ttls) if ttls else None
        on_done(endpoints, None)

    def _srv_done(self, machine, names, on_done) -> None:
        self.pending = []
        asked = ", ".join(name for name, _ in names)
        if machine.error is not None:
            on_done(None, "DNS SRV discovery found nothing: %s" % machine.error)
            return
        self.min_ttl = machine.result.min_ttl
        candidates, rejected = [], list(machine.result.problems)
        for record in machine.result.endpoints:
            endpoint = ep.Endpoint(record.target, record.port, record.priority, record.weight,
                                   secure=record.secure).with_addresses(record.addresses)
            if not record.secure and not self.options.insecure_discovery:
                rejected.append("%s is insecure (from _etcd-client; allowed by --insecure-discovery)"
                                % (endpoint,))
            else:
                candidates.append(endpoint)
        if self.options.insecure_discovery:
            self._srv_finish(candidates, rejected, asked, on_done)
            return
        TlsValidation(self, candidates,
                      lambda ok, bad: self._srv_finish(ok, rejected + bad, asked, on_done)).start()

    def _srv_finish(self, endpoints, rejected, asked, on_done) -> None:
        if endpoints:
            on_done(endpoints, None)
        else:
            on_done(None, "DNS SRV discovery found no usable endpoint (asked %s): %s"
                    % (asked, "; ".join(rejected) or "no records"))

    def cancel(self) -> None:
        for driver in self.pending:
            driver.cancel()
        self.pending = []


def _guarded(on_done, step, *args) -> None:
    """Run one step of a discovery round; a bug in it ends the round with an error instead of
    leaving it (and a gateway waiting for its first round) unfinished forever."""
    try:
        step(*args)
    except Exception as exc:
        on_done(None, "internal error in %s: %r" % (step.__name__, exc))


class TlsValidation:
    """Verified TLS handshakes with discovered members, concurrently: first for the SRV target's
    name, then for the discovery domain. Unlike the Go gateway, which only opens a TCP connection,
    a member is used only when its certificate chains to --trusted-ca-file and matches a name."""

    def __init__(self, source: EndpointSource, candidates, on_done):
        self.source = source
        self.candidates = candidates
        self.on_done = on_done
        self.accepted, self.rejected = [], []
        self.waiting = 0

    def start(self) -> None:
        domain = dnssrv.name_key(self.source.options.discovery_srv)
        validated = self.source.validated
        unchecked = [endpoint for endpoint in self.candidates
                     if (endpoint.host, endpoint.port, endpoint.address) not in validated]
        # Not checked again, but still verified for that name (health checks use tls_name).
        self.accepted = [e._replace(tls_name=validated[e.host, e.port, e.address])
                         for e in self.candidates if e not in unchecked]
        # All are counted before any starts: a check may finish inside start() (loopback).
        self.waiting = len(unchecked)
        for endpoint in unchecked:
            self._check(endpoint, [endpoint.host] + ([domain] if domain and domain != endpoint.host else []),
                        [])
        if not unchecked:
            self._finish()

    def _check(self, endpoint, names, reasons) -> None:
        source = self.source
        if source.tls_context is None:
            self._checked(endpoint, None, reasons + ["this Python has no ssl module"])
            return
        name = names[0]
        timeout = max(2 * source.options.dial_timeout, TLS_VALIDATION_MIN_TIMEOUT)
        Probe(source.reactor, endpoint, timeout,
              lambda probe, ok, reply, reason: self._probed(endpoint, names, reasons, probe, ok, reason),
              tls_context=source.tls_context, server_hostname=name).start()

    def _probed(self, endpoint, names, reasons, probe, ok, reason) -> None:
        if probe.tls_refused:
            # Not validated: an alert can come before the member has shown a certificate, so it
            # proves nothing about the member. The reason says what to fix, in the one line of a
            # failed start or in the refresh's warning.
            reason += " (the member refused the gateway's client certificate: %s)" \
                % tls_refusal_hint(bool(self.source.options.cert))
            self._checked(endpoint, None, reasons + ["%s: %s" % (names[0], reason)])
        elif ok:
            self._checked(endpoint, names[0], reasons)
        elif len(names) > 1:
            self._check(endpoint, names[1:], reasons + ["%s: %s" % (names[0], reason)])
        else:
            self._checked(endpoint, None, reasons + ["%s: %s" % (names[0], reason)])

    def _checked(self, endpoint, name, reasons) -> None:
        if name is not None:
            self.source.validated[endpoint.host, endpoint.port, endpoint.address] = name
            self.accepted.append(endpoint._replace(tls_name=name))
        else:
            self.rejected.append("%s failed TLS validation (%s)" % (endpoint, "; ".join(reasons)))
        self.waiting -= 1
        if not self.waiting:
            self._finish()

    def _finish(self) -> None:
        self.on_done(self.accepted, self.rejected)


# ================================================================================ member sync ==

class JsonError(ValueError):
    """Malformed JSON; `offset` is where in the text it was found."""

    def __init__(self, reason: str, offset: int):
        super().__init__("%s at offset %d" % (reason, offset))
        self.offset = offset


JSON_MAX_DEPTH = 32  # a member list nests 4 deep; deeper input is refused, not recursed into
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_JSON_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')  # the run of a string that needs no decoding
_JSON_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                 "t": "\t"}
_JSON_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_JSON_LITERALS = (("true", True), ("false", False), ("null", None))


def parse_json(text: str):
    """Parse one JSON text (RFC 8259) strictly: what `json.loads` returns for it, or JsonError
    where it raises, with NaN/Infinity refused (not JSON) and nesting past JSON_MAX_DEPTH refused.

    Written here because python3-minimal has no `json` module; used everywhere, so the parser
    that runs on a minimal Python is the one every test runs (and compares with `json`)."""
    value, end = _parse_json_value(text, _JSON_SPACE.match(text, 0).end(), 0)
    end = _JSON_SPACE.match(text, end).end()
    if end != len(text):
        raise JsonError("extra data after the value", end)
    return value


def _parse_json_value(text: str, pos: int, depth: int):
    """(value, the offset after it) for the value at `pos` (whitespace already skipped)."""
    char = text[pos:pos + 1]
    if char == '"':
        return _parse_json_string(text, pos + 1)
    if char in ("{", "["):
        if depth >= JSON_MAX_DEPTH:
            raise JsonError("nested deeper than %d" % JSON_MAX_DEPTH, pos)
        return (_parse_json_object if char == "{" else _parse_json_array)(text, pos + 1, depth + 1)
    match = _JSON_NUMBER.match(text, pos)
    if match:
        number = match.group()
        try:
            return (float(number) if match.group(1) or match.group(2) else int(number)), match.end()
        except ValueError:  # more digits than int() converts (sys.set_int_max_str_digits)
            raise JsonError("number too long", pos) from None
    for word, value in _JSON_LITERALS:
        if text.startswith(word, pos):
            return value, pos + len(word)
    raise JsonError("expected a value" if char else "unexpected end", pos)


def _parse_json_string(text: str, pos: int):
    """(string, offset after its closing quote); `pos` is just after the opening quote."""
    parts = []
    while True:
        end = _JSON_PLAIN.match(text, pos).end()
        parts.append(text[pos:end])
        char = text[end:end + 1]
        if char == '"':
            return "".join(parts), end + 1
        if char != "\\":
            raise JsonError("unterminated string" if not char else "control character in string", end)
        escape = text[end + 1:end + 2]
        if escape in _JSON_ESCAPES:
            parts.append(_JSON_ESCAPES[escape])
            pos = end + 2
        elif escape == "u":
            code, pos = _parse_json_hex4(text, end + 2)
            # A high surrogate followed by an escaped low one is one character (RFC 8259 section
            # 7); a lone surrogate is kept as it is, as `json` keeps it.
            if 0xD800 <= code <= 0xDBFF and text.startswith("\\u", pos):
                low, after = _parse_json_hex4(text, pos + 2)
                if 0xDC00 <= low <= 0xDFFF:
                    code, pos = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00), after
            parts.append(chr(code))
        else:
            raise JsonError("invalid escape", end)


def _parse_json_hex4(text: str, pos: int):
    if not _JSON_HEX4.match(text, pos):
        raise JsonError("invalid \\u escape", pos)
    return int(text[pos:pos + 4], 16), pos + 4


def _parse_json_array(text: str, pos: int, depth: int):
    items = []
    pos = _JSON_SPACE.match(text, pos).end()
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        value, pos = _parse_json_value(text, pos, depth)
        items.append(value)
        pos = _JSON_SPACE.match(text, pos).end()
        char = text[pos:pos + 1]
        if char == "]":
            return items, pos + 1
        if char != ",":
            raise JsonError("expected , or ]", pos)
        pos = _JSON_SPACE.match(text, pos + 1).end()


def _parse_json_object(text: str, pos: int, depth: int):
    members = {}
    pos = _JSON_SPACE.match(text, pos).end()
    if text.startswith("}", pos):
        return members, pos + 1
    while True:
        if not text.startswith('"', pos):
            raise JsonError("expected a member name", pos)
        key, pos = _parse_json_string(text, pos + 1)
        pos = _JSON_SPACE.match(text, pos).end()
        if not text.startswith(":", pos):
            raise JsonError("expected :", pos)
        pos = _JSON_SPACE.match(text, pos + 1).end()
        members[key], pos = _parse_json_value(text, pos, depth)  # a repeated name: the last wins, as in json
        pos = _JSON_SPACE.match(text, pos).end()
        char = text[pos:pos + 1]
        if char == "}":
            return members, pos + 1
        if char != ",":
            raise JsonError("expected , or }", pos)
        pos = _JSON_SPACE.match(text, pos + 1).end()


def member_list_request(endpoint: ep.Endpoint) -> bytes:
    """etcd's MemberList over its HTTP/JSON gateway (grpc-gateway, on every client port since
    etcd 3.3). HTTP/1.0, so that the reply is never chunked and ends at EOF. The body `{}` asks
    for the member's own view (serializable): cheap for the leader whatever the size of the fleet;
    a stale view only lags a change by a round."""
    return ("POST /v3/cluster/member/list HTTP/1.0\r\nHost: %s\r\nUser-Agent: etcd-gateway/%s\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: 2\r\n"
            "Connection: close\r\n\r\n{}" % (endpoint, VERSION)).encode()


def http_reply_body(reply: bytes):
    """(status code, body) of a whole HTTP/1.x reply read to EOF; ValueError when malformed,
    chunked or cut short."""
    head, separator, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if not separator or len(status) < 2 or not status[0].startswith(b"HTTP/1.") \
            or not status[1].isdigit():
        raise ValueError("not an HTTP reply")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"identity").lower() != b"identity":
        raise ValueError("unexpected Transfer-Encoding in a reply to HTTP/1.0")
    length = headers.get(b"content-length")
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise ValueError("reply cut short")
        body = body[:int(length)]
    return int(status[1]), body


def parse_member_list_reply(reply: bytes, prefer_secure: bool):
    """(endpoints, problems) from etcd's reply to `member_list_request`: one endpoint per member,
    in the reply's order (see `member_endpoints`). ValueError with a reason when the reply is
    not a member list."""
    status, body = http_reply_body(reply)
    try:
        document = parse_json(body.decode("utf-8"))
    except (UnicodeError, JsonError) as exc:
        raise ValueError("HTTP %d, not a JSON member list: %s" % (status, exc)) from None
    if status != 200 or not isinstance(document, dict):
        detail = document.get("message") or document.get("error") if isinstance(document, dict) else ""
        raise ValueError("HTTP %d%s" % (status, ": %s" % detail if detail else ""))
    members = document.get("members", [])
    if not isinstance(members, list):
        raise ValueError("\"members\" is not a list")
    return member_endpoints(members, prefer_secure)


def member_endpoints(members, prefer_secure: bool):
    """(endpoints, problems) for the members of a MemberListResponse in grpc-gateway's JSON
    (ID as a string, `clientURLs` an array, fields at their defaults left out).

    clientv3's Sync is the model: learners (`isLearner`) and members without a name or client
    URLs (added, not started yet) are skipped without a word. Unlike Sync, which dials every URL,
    a member gives one endpoint, so that a member advertising two URLs does not count twice: the
    first `http`/`https` URL that parses, preferring the scheme of `prefer_secure` (that of the
    member that answered). `unix://` and `unixs://` URLs are skipped (a TCP proxy cannot use
    them). A member with no usable URL, or whose URL another member already gave, is a problem."""
    endpoints, problems, seen = [], [], set()
    for member in members:
        if not isinstance(member, dict):
            problems.append("a member entry is not an object")
            continue
        name, urls = member.get("name"), member.get("clientURLs")
        if member.get("isLearner") is True or not name or not urls:
            continue
        if not isinstance(name, str) or not isinstance(urls, list):
            problems.append("member entry %r is malformed" % (name,))
            continue
        parsed = [endpoint for endpoint in map(_client_url_endpoint, urls) if endpoint is not None]
        preferred = [endpoint for endpoint in parsed if endpoint.secure == prefer_secure]
        if not parsed:
            problems.append("member %s has no usable client URL in %s" % (name, urls))
        elif (preferred or parsed)[0].key in seen:
            problems.append("member %s repeats client URL %s" % (name, (preferred or parsed)[0]))
        else:
            endpoints.append((preferred or parsed)[0])
            seen.add(endpoints[-1].key)
    return endpoints, problems


def _client_url_endpoint(url) -> Optional[ep.Endpoint]:
    """The endpoint of an `http://` or `https://` client URL; None for anything else."""
    if not isinstance(url, str) or url.partition("://")[0] not in ("http", "https"):
        return None
    try:
        return ep.parse_endpoint(url)
    except ValueError:
        return None


SEED_FALLBACK_PRIORITY = 65536  # past every SRV priority (0-65535)
MEMBER_SYNC_REPORT_INTERVAL = 60.0


def with_fallback_seeds(synced: Sequence[ep.Endpoint],
                        seeds: Sequence[ep.Endpoint]) -> List[ep.Endpoint]:
    """The endpoint set while members are synced: the synced endpoints, then the seeds that are
    not among them, each moved behind every synced one (its priority past the SRV range), so that
    a seed takes clients only while no synced endpoint is up, and the data path falls back to
    the seeds at once, without waiting for a sync round."""
    synced_keys = {endpoint.key for endpoint in synced}
    return list(synced) + [seed._replace(priority=SEED_FALLBACK_PRIORITY + seed.priority)
                           for seed in seeds if seed.key not in synced_keys]


def ranking_change(old: ep.Endpoint, new: ep.Endpoint) -> str:
    """How the priority and weight of an endpoint changed ("" when they did not): a seed moved
    behind the synced members, or a changed SRV record, changes who gets the clients."""
    changes = ["%s %d->%d" % (name, getattr(old, name), getattr(new, name))
               for name in ("priority", "weight") if getattr(old, name) != getattr(new, name)]
    return "%s %s" % (new, ", ".join(changes)) if changes else ""


def members_to_ask(healths: Sequence[ep.Health], rng: random.Random) -> List[ep.Endpoint]:
    """The endpoints to ask for the member list, in order: those up and healthy first, then those
    up, then the others; within each, lower priorities first (synced members before seeds), and
    at random within a priority, so that a fleet of gateways spreads its questions."""
    ranked = sorted((not h.up, not h.healthy, h.endpoint.priority, rng.random(), index)
                    for index, h in enumerate(healths))
    return [healths[rank[-1]].endpoint for rank in ranked]


class MemberSync:
    """--auto-sync-interval, after clientv3's AutoSyncInterval: every interval (jittered), ask ONE
    member for the cluster's member list and make the members' client URLs the endpoint set;
    the seeds (--endpoints, or what discovery found) stay behind them as the fallback.

    A round: POST /v3/cluster/member/list to a member (`members_to_ask`; a Probe, TLS verified
    against --trusted-ca-file for `https` members), and to the next one only if that one gives
    no member list (as clientv3 retries MemberList on another endpoint, so that a member that
    just died does not cost a round), the reply parsed (`parse_member_list_reply`),
    host names resolved, then the TLS rules of discovery: `https` members are validated with a
    handshake as discovered ones are (unless --insecure-discovery), and plain ones are refused
    when discovery is secure. `install(endpoints)` gets the result. A round that fails or finds
    no usable member keeps the last good set: the set never becomes empty.

    `set_seeds` takes a new seed set from discovery (the synced set stays). `sync_now` runs a
    round at once (SIGHUP). Connections to a member that left the set are left to finish, as
    after a discovery refresh."""

    def __init__(self, reactor: Reactor, log: Log, pool: ep.Pool, stats: "Stats", options,
                 source: EndpointSource, install: Callable[[List[ep.Endpoint]], None]):
        self.reactor = reactor
        self.log = log
        self.pool = pool
        self.stats = stats
        self.options = options
        self.interval = options.auto_sync_interval
        self.source = source  # its own EndpointSource: resolves and validates synced members
        self.install = install
        self.rng = random.Random()
        self.seeds = pool.endpoints
        self.synced = []  # the last good synced set; empty until the first good round
        self.timer = None
        self.probe = None
        self.to_ask = []  # the members this round may still ask, in order
        self.failures = []  # why the members asked in this round gave no member list
        self.busy = False
        self.stopped = False

    def source_of(self, endpoint: ep.Endpoint) -> str:
        """"synced" or "seed": where an endpoint of the set comes from (for /endpoints)."""
        return "synced" if any(endpoint.key == synced.key for synced in self.synced) else "seed"

    def start(self) -> None:
        self._arm()

    def _arm(self) -> None:
        self.reactor.cancel(self.timer)
        self.timer = None
        if not self.stopped:
            # Jittered every round, not only a random phase once: a fleet started (or sent
            # SIGHUP) in step drifts apart again, and no two rounds are more than an interval apart.
            delay = self.interval * self.rng.uniform(0.5, 1.0)
            self.timer = self.reactor.call_later(delay, self.sync_now)

    def set_seeds(self, seeds: Sequence[ep.Endpoint]) -> List[ep.Endpoint]:
        """Discovery found a new seed set: it replaces the fallback, not the synced set. Returns
        the endpoint set to install now."""
        self.seeds = list(seeds)
        return with_fallback_seeds(self.synced, self.seeds) if self.synced else list(self.seeds)

    def sync_now(self, signum: int = 0) -> None:
        if self.busy or self.stopped:
            return
        if signum:
            self.log.info("syncing members", signal=signal.Signals(signum).name)
        self.busy = True
        self.reactor.cancel(self.timer)  # the round arms the next one when it ends
        self.to_ask, self.failures = members_to_ask(self.pool.healths(), self.rng), []
        self._guard(self._ask_next)

    def _guard(self, step, *args) -> None:
        """Run one step of a round; a bug in it ends the round as a failure rather than leaving
        `busy` set, which would stop every later round."""
        if self.stopped or not self.busy:
            return  # stopped meanwhile: a late answer is dropped
        try:
            step(*args)
        except Exception as exc:
            self._finish(None, [], "internal error in %s: %r" % (step.__name__, exc))

    def _ask_next(self) -> None:
        if not self.to_ask:
            self._finish(None, [], "; ".join(self.failures) or "no member to ask")
            return
        member = self.to_ask.pop(0)
        if member.secure and self.source.tls_context is None:
            self._failed_to_answer(member, "this Python has no ssl module")
            return
        timeout = max(self.options.dial_timeout, min(self.interval, 5.0))
        self.probe = Probe(self.reactor, member, timeout,
                           lambda *outcome: self._guard(self._answered, *outcome),
                           tls_context=self.source.tls_context if member.secure else None,
                           server_hostname=member.tls_name, request=member_list_request(member),
                           connect_timeout=self.options.connect_timeout)
        self.probe.start()

    def _answered(self, probe: Probe, ok: bool, reply: bytes, reason: str) -> None:
        self.probe = None
        member = probe.endpoint
        if probe.tls_refused:  # said once as our configuration problem; counted, not logged again
            report_tls_refusal(self.log, member, reason, bool(self.options.cert))
            self._finish(None, [], "asked %s: %s" % (member, reason), quiet=True)
            return
        if not ok:
            self._failed_to_answer(member, reason)
            return
        try:
            endpoints, problems = parse_member_list_reply(reply, member.secure)
        except ValueError as exc:
            self._failed_to_answer(member, str(exc))
            return
        self._resolve(endpoints, problems)

    def _failed_to_answer(self, member: ep.Endpoint, reason: str) -> None:
        self.failures.append("asked %s: %s" % (member, reason))
        self._ask_next()

    def _resolve(self, endpoints, problems) -> None:
        """Resolve the members' host names, each on its own: a name that does not resolve here
        drops that member (a problem), not the round."""
        found = {endpoint.key: endpoint for endpoint in endpoints if endpoint.address}
        waiting = {endpoint.key for endpoint in endpoints if not endpoint.address}

        def resolved(name, got, error):
            waiting.discard(name.key)
            if error is not None:
                problems.append(error)
            else:
                found[name.key] = got[0]
            if not waiting:
                self._resolved([found[e.key] for e in endpoints if e.key in found], problems)

        if not waiting:
            self._resolved(endpoints, problems)
        for name in [endpoint for endpoint in endpoints if not endpoint.address]:
            self.source.resolve_static(
                lambda got, error, name=name: self._guard(resolved, name, got, error), [name])

    def _resolved(self, endpoints, problems) -> None:
        plain = [endpoint for endpoint in endpoints if not endpoint.secure]
        secure = [endpoint for endpoint in endpoints if endpoint.secure]
        if self.options.discovery_srv and not self.options.insecure_discovery:
            problems = problems + ["%s is insecure (allowed by --insecure-discovery)" % (endpoint,)
                                   for endpoint in plain]
            plain = []
        if self.options.insecure_discovery or not secure:
            self._validated(endpoints, plain + secure, problems)
            return
        TlsValidation(self.source, secure, lambda accepted, rejected: self._guard(
            self._validated, endpoints, plain + accepted, problems + rejected)).start()

    def _validated(self, listed, accepted, problems) -> None:
        order = {endpoint.key: index for index, endpoint in enumerate(listed)}
        accepted = sorted(accepted, key=lambda endpoint: order[endpoint.key])  # the reply's order
        if not accepted:
            self._finish(None, problems, "the member list names no usable member")
        else:
            self._finish(accepted, problems, None)

    def _finish(self, endpoints, problems, error, quiet: bool = False) -> None:
        self.busy = False
        if problems:
            self.log.limited("warn", "member-sync-skipped:" + "; ".join(problems),
                             MEMBER_SYNC_REPORT_INTERVAL, "ignoring members of the member list",
                             reasons=problems)
        if endpoints is None:
            self.stats.sync_error += 1
            if not quiet:
                self.log.limited("warn", "member-sync:" + error, MEMBER_SYNC_REPORT_INTERVAL,
                                 "member sync failed, keeping the last good set", reason=error,
                                 endpoints=[str(e) for e in self.pool.endpoints])
        else:
            self.stats.sync_ok += 1
            self.synced = endpoints
            self.install(with_fallback_seeds(self.synced, self.seeds))
        self._arm()

    def stop(self) -> None:
        """No more rounds; a round under way is abandoned."""
        self.stopped = True
        self.reactor.cancel(self.timer)
        self.timer = None
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None
        self.source.cancel()


# ===================================================================================== gateway ==

class Listener(BatchAcceptor):
    """The proxy port: every client is handed to the connections; out of descriptors, it pauses."""

    socket_class = CSocket

    def __init__(self, reactor: Reactor, log: Log, sock: socket.socket, connections: "Connections"):
        super().__init__(reactor, sock)
        self.log = log
        self.connections = connections

    def accepted(self, client_sock: socket.socket, peer) -> None:
        self.connections.open(client_sock, peer)

    def exhausted(self, reason: str) -> None:
        self.log.limited("warn", "accept-exhausted", 5.0, "accept paused", reason=reason,
                         active=self.connections.count())

    def handle_failure(self, exc) -> None:
        self.log.limited("error", "accept", 5.0, "accept failed", error=repr(exc))


class Connections(RelayHost):
    """The proxy port and its relays: it accepts clients, opens a relay for each, answers their
    questions (the plan, the shared buffers) and books their reports into the endpoint pool, the
    counters and the log. It drains them on shutdown. The RelayHost of every relay."""

    def __init__(self, reactor: Reactor, pool: ep.Pool, log: Log, stats: Stats, options,
                 data: DataPath, health: "HealthMonitor"):
        self.reactor = reactor
        self.pool = pool
        self.log = log
        self.stats = stats
        self.dial_timeout = options.dial_timeout
        self.connect_timeout = options.connect_timeout
        self.data = data
        self.health = health
        self.log_each_connection = log.enabled("debug")  # the level is set once, at start
        self.plan = pool.plan  # RelayHost.plan: the policy's choice, straight from the pool
        self.dial_order = pool.dial_order
        self.listener = None
        self.relays = set()
        self.pipe_trim_timer = None
        self.drain_timer = None
        self.on_drained = None

    # -- the proxy port --------------------------------------------------------------------------

    def listen(self, sock: socket.socket) -> None:
        self.listener = Listener(self.reactor, self.log, sock, self)
        self.listener.start()

    def listen_address(self):
        """(host, port) of the proxy port, or None once it has closed."""
        return self.listener.sock.getsockname()[:2] if self.listener is not None else None

    def stop_accepting(self, take_backlog: bool = False) -> None:
        if self.listener is not None:
            if take_backlog:
                self._take_backlog()
            self.listener.stop()
            self.listener = None

    def _take_backlog(self) -> None:
        """Accept the clients already queued: closing the listening socket would reset them."""
        for _ in range(LISTEN_BACKLOG):
            try:
                client_sock, peer = self.listener.sock.accept()
            except OSError:  # drained (EAGAIN), or out of descriptors: the rest cannot be had
                return
            self.open(client_sock, peer)

    def open(self, client_sock: socket.socket, peer) -> None:
        client_sock.setblocking(False)  # TCP_NODELAY and keep-alive come from the listener
        self.stats.connections_total += 1
        relay = Relay(self, client_sock, peer)
        self.relays.add(relay)
        relay.start()

    def count(self) -> int:
        return len(self.relays)

    def live_bytes(self):
        """Bytes moved so far by the open connections: (client to upstream, upstream to client)."""
        moved = [relay.bytes_moved() for relay in self.relays]
        return sum(up for up, _ in moved), sum(down for _, down in moved)

    # -- what the relays report (RelayHost) ---------------------------------------------------------

    def relay_connected(self, relay: Relay) -> None:
        if self.pool.connection_opened(relay.endpoint, relay.address):
            self.log.info("endpoint up", endpoint=str(relay.endpoint), reason="dial succeeded")

    def dial_failed(self, endpoint: ep.Endpoint, reason: str) -> None:
        self.health.endpoint_failed(endpoint, reason)

    def attempt_outlived(self, dial: Dial) -> None:
        self.health.adopt(dial)

    def local_fault(self, relay: Relay, reason: str, giving_up: bool) -> None:
        if giving_up:
            self.log.limited("warn", "no-descriptors-close", 5.0, "cannot dial upstream, closing client",
                             reason=reason, waited=format_duration(LOCAL_RETRY_TIMEOUT))
            return
        self.log.limited("warn", "no-descriptors", 5.0, "cannot dial upstream, client waits",
                         reason=reason, active=len(self.relays))
        if self.listener is not None:
            self.listener.pause(reason)

    def no_upstream(self, relay: Relay) -> None:
        self.log.limited("warn", "no-upstream", 5.0, "no endpoint reachable, closing client",
                         endpoints=[str(e) for e in self.pool.endpoints])

    def relay_failed(self, relay: Relay, exc: BaseException) -> None:
        self.log.limited("error", "relay-bug:" + type(exc).__name__, 5.0, "connection failed",
                         relay=repr(relay), error=repr(exc))

    def relay_closed(self, relay: Relay, endpoint: Optional[ep.Endpoint], reset: bool,
                     up: int, down: int) -> None:
        self.relays.discard(relay)
        self.stats.client_to_upstream += up
        self.stats.upstream_to_client += down
        if endpoint is not None:
            self.pool.connection_closed(endpoint)
        if self.log_each_connection:
            self.log.debug("connection closed", endpoint=str(relay.endpoint), bytes_in=up, bytes_out=down,
                           reset=reset, duration=format_duration(self.reactor.clock() - relay.started))
        if not self.relays:
            self._went_idle()

    def _went_idle(self) -> None:
        if self.data.pipes is not None and self.pipe_trim_timer is None:
            # Give the spare pipes' descriptors back, but not at once: a client that connects
            # again right away (strace: pipe2, fcntl and 2 closes per connection otherwise)
            # should find them.
            self.pipe_trim_timer = self.reactor.call_later(PIPE_TRIM_DELAY, self._trim_pipes)
        if self.on_drained is not None:
            self._drained()

    def _trim_pipes(self) -> None:
        self.pipe_trim_timer = None
        if not self.relays:
            self.data.trim()

    # -- endings ---------------------------------------------------------------------------------

    def evict(self, endpoint: ep.Endpoint) -> int:
        """Close the open connections to `endpoint` so that their clients reconnect elsewhere."""
        evicted = [relay for relay in self.relays
                   if relay.relays_to(endpoint)]
        for relay in evicted:
            relay.abort()
        return len(evicted)

    def drain(self, timeout: float, on_drained) -> None:
        """Let the open connections finish, for up to `timeout`; then call `on_drained()`."""
        self.on_drained = on_drained
        if not self.relays:
            self._drained()
            return
        self.drain_timer = self.reactor.call_later(timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        self.drain_timer = None
        if self.relays:
            self.log.warn("shutdown timeout: closing open connections", active=len(self.relays))
        self.abort_all()
        if self.on_drained is not None:
            self._drained()

    def _drained(self) -> None:
        on_drained, self.on_drained = self.on_drained, None
        self.reactor.cancel(self.drain_timer)
        self.drain_timer = None
        on_drained()

    def abort_all(self) -> None:
        for relay in list(self.relays):
            relay.abort()

    def close(self) -> None:
        self.on_drained = None
        self.abort_all()
        self.stop_accepting()
        self.data.close()


class HealthMonitor:
    """Whether each endpoint may take clients. An endpoint whose dial failed is down until a
    probe (a plain connect, after --retry-delay) reaches it again; with --health-check etcd every
    endpoint's GET /health is also checked every --health-interval, and one that turns unhealthy
    has its connections evicted (through `evict`). Both paces are jittered with `rng`."""

    def __init__(self, reactor: Reactor, pool: ep.Pool, log: Log, options, tls_context, evict,
                 rng: Optional[random.Random] = None):
        self.reactor = reactor
        self.rng = rng or random.Random()
        self.pool = pool
        self.log = log
        self.dial_timeout = options.dial_timeout
        self.connect_timeout = options.connect_timeout
        self.health_check = options.health_check
        self.health_interval = options.health_interval
        self.tls_context = tls_context
        self.has_cert = bool(options.cert)
        self.evict = evict
        self.probe_timer = None
        self.probing = {}  # endpoint key -> the Dial probing it
        self.check_timer = None
        self.health_checks = {}

    def endpoint_failed(self, endpoint: ep.Endpoint, reason: str) -> None:
        """A connect to `endpoint` failed: take it out until a probe reaches it."""
        if self.pool.mark_failed(endpoint, self.reactor.clock(), reason):
            self.log.warn("endpoint down", endpoint=str(endpoint), reason=reason,
                          retry_delay=format_duration(self.pool.retry_delay))
        self._schedule_probe()

    # -- probes of failed endpoints ----------------------------------------------------------------

    def _schedule_probe(self) -> None:
        deadline = self.pool.next_probe_deadline()
        if deadline is None:
            return
        if self.probe_timer is not None and not self.probe_timer.cancelled:
            if self.probe_timer.when <= deadline + FLEET_JITTER * self.pool.retry_delay:
                return  # due within the jitter anyway; what is not due yet is rescheduled then
            self.reactor.cancel(self.probe_timer)
        # --retry-delay=0 (as Go allows) must not turn probing into a busy loop. A fleet sees a
        # member fail at about the same moment: a random part of the retry delay added (never
        # taken off: the endpoint stays out for --retry-delay) keeps their probes apart.
        delay = max(MIN_INTERVAL_SECONDS * 10, deadline - self.reactor.clock())
        delay += self.rng.uniform(0.0, FLEET_JITTER * self.pool.retry_delay)
        self.probe_timer = self.reactor.call_later(delay, self._run_probes)

    def _run_probes(self) -> None:
        self.probe_timer = None
        for endpoint in self.pool.due_probes(self.reactor.clock()):
            if endpoint.key in self.probing:
                continue  # an attempt is still out there; its outcome will tell
            # Bounded like a client's connect: a lost SYN must not keep a reachable member down.
            dial = Dial(self.reactor, endpoint, self.connect_timeout, self._probed)
            self.probing[endpoint.key] = dial
            dial.start()
        self._schedule_probe()

    def adopt(self, dial: Dial) -> None:
        """A client's connect attempt that another attempt beat: let it go on as a probe of its
        endpoint (one per endpoint), so that a member that never answers is taken out and a
        slow one is not."""
        if dial.endpoint.key in self.probing or not self.pool.contains(dial.endpoint):
            dial.cancel()
            return
        self.probing[dial.endpoint.key] = dial
        dial.hand_over(self._probed)

    def _probed(self, dial: Dial, sock, reason) -> None:
        endpoint = dial.endpoint
        if self.probing.get(endpoint.key) is dial:
            del self.probing[endpoint.key]
        if sock is not None:
            sock.close()
            if self.pool.mark_up(endpoint):
                self.log.info("endpoint up", endpoint=str(endpoint), reason="connect succeeded")
        elif dial.local_failure:
            self.log.limited("warn", "probe-local", 5.0, "cannot probe endpoint: a local fault, "
                             "not the endpoint's", endpoint=str(endpoint), reason=reason)
            self._schedule_probe()
        else:
            self.endpoint_failed(endpoint, reason)

    # -- etcd-aware health checks (--health-check etcd) ----------------------------------------------

    def start(self) -> None:
        if self.health_check == "etcd":  # a random phase: a fleet restarted at once spreads out
            self.check_timer = self.reactor.call_later(self.health_interval * self.rng.random(),
                                                       self._run_health_checks)

    def stop_checks(self) -> None:
        self.reactor.cancel(self.check_timer)
        self.check_timer = None

    def _run_health_checks(self) -> None:
        # Over before the next tick, however jittered (0.9 intervals at the soonest): a check
        # still running is not repeated, so a longer one would let a hung member fail only
        # every other tick and double the time it takes to leave.
        timeout = max(self.dial_timeout, min(self.health_interval * (1.0 - 2 * FLEET_JITTER), 5.0))
        for endpoint in self.pool.endpoints:
            if endpoint.key in self.health_checks:
                continue  # the previous check is still running; it is bounded by its timeouts
            probe = Probe(self.reactor, endpoint, timeout, self._health_checked,
                          tls_context=self.tls_context if endpoint.secure else None,
                          server_hostname=endpoint.tls_name, request=health_request(endpoint),
                          connect_timeout=self.connect_timeout)
            self.health_checks[endpoint.key] = probe
            probe.start()
        # Jittered every time, so gateways that fell in step (a shared stall) drift apart again.
        delay = self.health_interval * self.rng.uniform(1.0 - FLEET_JITTER, 1.0 + FLEET_JITTER)
        self.check_timer = self.reactor.call_later(delay, self._run_health_checks)

    def _health_checked(self, probe: Probe, ok: bool, reply: bytes, reason: str) -> None:
        endpoint = probe.endpoint
        self.health_checks.pop(endpoint.key, None)
        if probe.local_failure:
            self.log.limited("warn", "health-check-local", 5.0, "cannot check endpoint: a local "
                             "fault, not the endpoint's", endpoint=str(endpoint), reason=reason)
            return
        if not probe.connected and self.pool.contains(endpoint):
            self.endpoint_failed(endpoint, reason)  # unreachable, not merely unhealthy
        elif probe.connected and self.pool.mark_up(endpoint):
            self.log.info("endpoint up", endpoint=str(endpoint), reason="health check connected")
        if probe.tls_refused:  # our --cert/--key, not the member: like a local fault
            report_tls_refusal(self.log, endpoint, reason, self.has_cert)
            return
        if ok:
            ok, reason = parse_health_reply(reply)
        change = self.pool.record_check(endpoint, ok, reason)
        if change is ep.HealthChange.UNHEALTHY:
            self.log.warn("endpoint unhealthy", endpoint=str(endpoint), reason=reason,
                          failures=self.pool.failures_to_leave)
            evicted = self.evict(endpoint)
            if evicted:
                self.log.info("closed connections of unhealthy endpoint", endpoint=str(endpoint),
                              count=evicted)
        elif change is ep.HealthChange.HEALTHY:
            self.log.info("endpoint healthy", endpoint=str(endpoint),
                          successes=self.pool.successes_to_return)

    def close(self) -> None:
        self.stop_checks()
        self.reactor.cancel(self.probe_timer)
        for probe in list(self.probing.values()) + list(self.health_checks.values()):
            probe.cancel()
        self.probing.clear()
        self.health_checks.clear()


def refresh_pace(interval: float, min_ttl: Optional[float]) -> float:
    """How long the endpoints found may be used before discovery runs again: --discovery-refresh
    (`interval`, > 0), or the smallest TTL of the records in use when that is sooner, but never
    under MIN_TTL_REFRESH_DELAY unless `interval` itself is (a TTL of 0 or 1 must not make a
    fleet hammer its resolvers). None: no TTL known (IP literals, /etc/hosts)."""
    if min_ttl is None:
        return interval
    return min(interval, max(float(min_ttl), MIN_TTL_REFRESH_DELAY))


class Gateway:
    """The glue: the proxy port's connections, the health monitor, member sync and the status
    pages share one endpoint pool; the gateway adds what spans them: discovery refresh, signals
    and shutdown. `rng` jitters every periodic request (refreshes here, checks and probes in the
    monitor)."""

    def __init__(self, reactor: Reactor, pool: ep.Pool, log: Log, options, tls_context=None,
                 rng: Optional[random.Random] = None):
        self.reactor = reactor
        self.pool = pool
        self.log = log
        self.rng = rng or random.Random()
        self.shutdown_timeout = options.shutdown_timeout
        self.stats = Stats()
        self.health = HealthMonitor(reactor, pool, log, options, tls_context, self._evict,
                                    self.rng)
        self.connections = Connections(reactor, pool, log, self.stats, options,
                                       DataPath(splice_enabled(), KeepAliveLater(reactor)),
                                       self.health)
        self.sync = None
        if options.auto_sync_interval:
            self.sync = MemberSync(reactor, log, pool, self.stats, options,
                                   EndpointSource(reactor, options, tls_context), self._install_synced)
        self.status = StatusPages(reactor, log, pool, self.stats, self.connections,
                                  self.sync.source_of if self.sync is not None else None)
        self.shutting_down = False
        self.source = None
        self.refreshing = False
        self.refresh_timer = None
        self.refresh_interval = 0.0
        self.records_ttl = None  # the smallest TTL of the records behind the set in use

    def _evict(self, endpoint: ep.Endpoint) -> int:
        return self.connections.evict(endpoint)

    # -- discovery refresh (--discovery-refresh, SIGHUP) -------------------------------------------

    def start_refreshes(self, source: EndpointSource, interval: float) -> None:
        self.source = source
        self.refresh_interval = interval
        self.records_ttl = source.min_ttl  # from the round at start-up
        self._arm_refresh(first=True)

    def _arm_refresh(self, first: bool = False) -> None:
        """The next refresh: by the records' TTL, --discovery-refresh at the longest (see
        `refresh_pace`); the first one after start-up anywhere in that pace, so that a fleet
        started at once spreads out, the others up to FLEET_JITTER sooner, never later."""
        self.reactor.cancel(self.refresh_timer)
        self.refresh_timer = None
        if self.refresh_interval > 0 and not self.shutting_down:
            pace = refresh_pace(self.refresh_interval, self.records_ttl)
            delay = pace * self.rng.uniform(0.0 if first else 1.0 - FLEET_JITTER, 1.0)
            self.refresh_timer = self.reactor.call_later(delay, self.refresh_now)

    def refresh_now(self, signum: int = 0) -> None:
        if signum and self.sync is not None:
            self.sync.sync_now(signum)  # SIGHUP syncs the members too
        if self.source is None:
            if signum and self.sync is None:
                self.log.info("nothing to refresh: the endpoints are IP addresses",
                              signal=signal.Signals(signum).name)
            return
        if self.refreshing or self.shutting_down:
            return
        if signum:
            self.log.info("refreshing endpoints", signal=signal.Signals(signum).name)
        self.refreshing = True
        try:
            self.source.refresh(self._refreshed)
        except Exception as exc:  # never leave `refreshing` set: no refresh would run again
            self.source.cancel()
            self._refreshed(None, "internal error: %r" % (exc,))

    def _refreshed(self, endpoints, error) -> None:
        self.refreshing = False
        if error is None:
            endpoints = self._without_self(endpoints)
        if error is not None or not endpoints:
            self.stats.refresh_error += 1
            self.log.limited("warn", "refresh:" + str(error), 60.0,
                             "endpoint refresh failed, keeping the last good set",
                             reason=error or "no endpoints",
                             endpoints=[str(e) for e in self.pool.endpoints])
        else:
            self.stats.refresh_ok += 1
            # a failed round keeps the pace of the set kept
            self.records_ttl = self.source.min_ttl if self.source is not None else None
            if self.sync is not None:  # the seeds change; the synced set stays
                endpoints = self.sync.set_seeds(endpoints)
            self.apply_endpoints(endpoints)
        self._arm_refresh()

    def _without_self(self, endpoints):
        address = self.connections.listen_address()
        if address is None:
            return endpoints
        kept = []
        for endpoint in endpoints:
            try:
                check_not_self([endpoint], *address)
                kept.append(endpoint)
            except ConfigError as exc:
                self.log.warn("ignoring discovered endpoint", reason=str(exc))
        return kept

    def apply_endpoints(self, endpoints: Sequence[ep.Endpoint], cause: str = "") -> None:
        """Install a new set: staying endpoints keep their health; removed ones get no new
        connections, and their open connections are left alone. `cause` is logged when given."""
        before = {endpoint.key: endpoint for endpoint in self.pool.endpoints}
        moved = ["%s %s->%s" % (new, "/".join(old.addresses or (old.address,)),
                                "/".join(new.addresses or (new.address,)))
                 for old, new in ep.readdressed(self.pool.endpoints, endpoints)]
        added, removed = self.pool.replace(endpoints)
        ranked = [ranking_change(before[e.key], e) for e in endpoints
                  if e.key in before and ranking_change(before[e.key], e)]
        if added or removed or moved or ranked:
            self.log.info("endpoints changed", endpoints=[str(e) for e in endpoints],
                          added=[str(e) for e in added], removed=[str(e) for e in removed],
                          readdressed=moved, **({"reranked": ranked} if ranked else {}),
                          **({"cause": cause} if cause else {}))

    # -- member sync (--auto-sync-interval) --------------------------------------------------------

    def start_sync(self) -> None:
        if self.sync is not None:
            self.sync.start()

    def _install_synced(self, endpoints: Sequence[ep.Endpoint]) -> None:
        self.apply_endpoints(self._without_self(endpoints), cause="member sync")

    # -- shutdown ----------------------------------------------------------------------------------

    def begin_shutdown(self, signum: int, handing_over: bool = False) -> None:
        """Stop accepting and drain. Clients already waiting in the listen backlog are taken in
        first (closing the only descriptor of a listening socket resets them), unless a new
        process shares the socket and will accept them (`handing_over`)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.log.info("shutting down", signal=signal.Signals(signum).name,
                      active=self.connections.count(),
                      shutdown_timeout=format_duration(self.shutdown_timeout))
        sd_notify("STOPPING=1")
        self.status.draining = True
        self.health.stop_checks()
        if self.sync is not None:
            self.sync.stop()
        self.connections.stop_accepting(take_backlog=not handing_over)
        self.connections.drain(self.shutdown_timeout, self.reactor.stop)

    def close(self) -> None:
        self.connections.close()
        self.health.close()
        self.status.close()
        if self.sync is not None:
            self.sync.stop()


# =================================================================================== start-up ==

def splice_enabled() -> bool:
    return splice is not None and os.environ.get("ETCD_GATEWAY_NO_SPLICE", "") in ("", "0")


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness and stopping, as the Go gateway does."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        pass


def raise_open_file_limit() -> None:
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def is_local_address(host: str) -> bool:
    """True when `host` is one of this machine's addresses (binding to it succeeds)."""
    family, address = sockaddr_for(host, 0)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except OSError:
        return False
    return True


def check_not_self(endpoints: Sequence[ep.Endpoint], listen_host: str, listen_port: int) -> None:
    """Refuse to proxy to ourselves: that loop would eat every descriptor."""
    wildcard = listen_host in ("0.0.0.0", "::", "")
    for endpoint in endpoints:
        if endpoint.port != listen_port:
            continue
        if endpoint.address == listen_host or (wildcard and is_local_address(endpoint.address)):
            raise ConfigError("endpoint %s is the gateway's own listen address %s"
                              % (endpoint, ep.format_hostport(listen_host, listen_port)))


def open_listener(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError("cannot resolve listen address %s: %s"
                          % (ep.format_hostport(host, port), exc.args[-1])) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_listener(sock)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError("cannot listen on %s: %s"
                          % (ep.format_hostport(host, port), error_reason(exc))) from None
    sock.setblocking(False)
    return sock


class StartupStopped(BaseException):
    """SIGTERM/SIGINT before the gateway serves. A BaseException, as KeyboardInterrupt, so that
    it leaves the reactor's loop (which contains handler errors) and start-up; main() exits 0."""


class StartupSignals:
    """Signal handlers from the first moment of serve() (issue 12 item 5): SIGUSR2's and
    SIGHUP's default action would end a process still starting, and a first discovery round
    waiting on a silent DNS server could not be stopped by SIGTERM. serve() replaces them all
    once it serves; until the loop runs, the signals wait in the reactor's wake-up socket."""

    def __init__(self, reactor: Reactor, log: Log):
        self.log = log
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, self._stop)
        for signum in (signal.SIGHUP, signal.SIGUSR2):
            reactor.add_signal_handler(signum, self._not_yet)

    def _stop(self, signum: int) -> None:
        self.log.info("stopping before serving", signal=signal.Signals(signum).name)
        raise StartupStopped()

    def _not_yet(self, signum: int) -> None:
        self.log.info("ignoring signal: still starting", signal=signal.Signals(signum).name)


def first_discovery(reactor: Reactor, source: EndpointSource, options, log: Log) -> List[ep.Endpoint]:
    """Find the endpoints before anything listens, with the same non-blocking machinery the
    refreshes use: the reactor runs until the round has finished."""
    outcome = []

    def done(endpoints, error):
        if not outcome:  # only the first answer counts; a late one must not stop a serving loop
            outcome.append((endpoints, error))
            reactor.stop()

    source.refresh(done)
    if not outcome:
        reactor.run()
    endpoints, error = outcome[0]
    if error and source.use_srv and options.endpoints_given:
        log.warn("discovery failed at start-up, using --endpoints as a fallback", reason=error)
        outcome.clear()
        source.resolve_static(done)
        if not outcome:
            reactor.run()
        endpoints, error = outcome[0]
    if error:
        raise ConfigError(error)
    return endpoints


def discovery_tls_context(options):
    """The context that verifies members: for secure discovery, and for etcd health checks of
    TLS members (`https://` endpoints, `_etcd-client-ssl` records, synced members). It presents
    --cert/--key,
    which are loaded whenever given, so that a bad file stops the start-up."""
    if options.cert or (options.discovery_srv and not options.insecure_discovery):
        return make_tls_context(options.trusted_ca_file, options.cert, options.key)
    if options.discovery_srv or options.auto_sync_interval \
            or any(endpoint.secure for endpoint in options.endpoints):
        return make_tls_context(options.trusted_ca_file) if ssl is not None else None
    return None


# ------------------------------------------------- socket activation and live handover (issue 15) --
#
# Both hand a listening socket from one process to the next, so the kernel queues the clients of
# the switch instead of refusing them. The new process learns what it inherits from the variables
# of sd_listen_fds(3): LISTEN_PID (its own PID, or the variables are not meant for it),
# LISTEN_FDS (how many descriptors, from 3 on) and LISTEN_FDNAMES (their names). systemd sets them
# for a socket unit; on SIGUSR2 a running gateway sets them for the copy of itself it starts,
# adds the channel the copy reports READY=1 on (ETCD_GATEWAY_HANDOVER_FD, the descriptor after
# the listeners) and its endpoint set (ETCD_GATEWAY_HANDOVER_ENDPOINTS), then drains as on SIGTERM.

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
HANDOVER_FD_ENV = "ETCD_GATEWAY_HANDOVER_FD"
HANDOVER_ENDPOINTS_ENV = "ETCD_GATEWAY_HANDOVER_ENDPOINTS"
# Read at each SIGUSR2, for tests and troubleshooting: another interpreter path, another bound.
HANDOVER_EXECUTABLE_ENV = "ETCD_GATEWAY_HANDOVER_EXECUTABLE"
HANDOVER_TIMEOUT_ENV = "ETCD_GATEWAY_HANDOVER_TIMEOUT"
# A new process not serving by then is killed, and the old one goes on serving. Generous: the new
# process skips discovery (it gets the endpoints), so it needs only an interpreter start.
HANDOVER_READY_TIMEOUT = 30.0
_DECIMAL = re.compile(r"[0-9]{1,10}")


class Inheritance(NamedTuple):
    """What a starting process was given instead of binding and discovering by itself."""

    listeners: dict  # role ("proxy", "status") -> descriptor
    ready_fd: int  # the handover channel to send READY=1 on; -1 when no gateway started us
    endpoints: Optional[list]  # the endpoint set of the process handing over; None: discover


def _decimal(text: str, name: str) -> int:
    if not _DECIMAL.fullmatch(text):  # int() would take " 3", "+3" and other scripts' digits
        raise ValueError("%s=%r is not a number" % (name, text))
    return int(text)


def parse_inheritance(environ, pid: int) -> Inheritance:
    """Read the sd_listen_fds(3) variables (and those of a handover) as process `pid`. Pure.

    No LISTEN_FDS or LISTEN_PID, or another process's PID in LISTEN_PID (the variables leaked
    from a parent): nothing is inherited. One socket is the proxy listener whatever its name; two
    must be named `proxy` and `status` (the --metrics-addr port) by LISTEN_FDNAMES, in any order.
    Anything else raises ValueError with the reason.
    """
    if "LISTEN_FDS" not in environ or "LISTEN_PID" not in environ:
        return Inheritance({}, -1, None)
    if _decimal(environ["LISTEN_PID"], "LISTEN_PID") != pid:
        return Inheritance({}, -1, None)
    count = _decimal(environ["LISTEN_FDS"], "LISTEN_FDS")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    if count == 1:
        listeners = {"proxy": LISTEN_FDS_START}
    elif count == 2 and sorted(names) == ["proxy", "status"]:
        listeners = {name: LISTEN_FDS_START + index for index, name in enumerate(names)}
    elif count == 2:
        raise ValueError("2 sockets need LISTEN_FDNAMES=proxy:status (the --metrics-addr port), "
                         "not %r" % environ.get("LISTEN_FDNAMES", ""))
    else:
        raise ValueError("LISTEN_FDS=%d: pass the proxy socket, and a status socket at most" % count)
    ready_fd = -1
    if HANDOVER_FD_ENV in environ:
        ready_fd = _decimal(environ[HANDOVER_FD_ENV], HANDOVER_FD_ENV)
        if ready_fd != LISTEN_FDS_START + count:
            raise ValueError("%s=%d: the channel follows the listeners, at %d"
                             % (HANDOVER_FD_ENV, ready_fd, LISTEN_FDS_START + count))
    endpoints = None
    if HANDOVER_ENDPOINTS_ENV in environ:
        endpoints = decode_endpoints(environ[HANDOVER_ENDPOINTS_ENV])
    return Inheritance(listeners, ready_fd, endpoints)


def encode_endpoints(endpoints: Sequence[ep.Endpoint]) -> str:
    """One environment value: `host port priority weight address secure tls_name` per endpoint,
    space-separated (address and tls_name may be empty), endpoints comma-separated. Neither
    separator can occur in a host name or an IP literal."""
    return ",".join(" ".join((e.host, str(e.port), str(e.priority), str(e.weight), e.address,
                              "1" if e.secure else "0", e.tls_name)) for e in endpoints)


def decode_endpoints(text: str) -> List[ep.Endpoint]:
    """The inverse of encode_endpoints, checking every field as strictly as the flags are
    checked; ValueError names the first bad one."""
    endpoints = []
    for item in text.split(","):
        fields = item.split(" ")
        if len(fields) != 7:
            raise ValueError("handed-over endpoint %r has %d fields, not 7" % (item, len(fields)))
        host, port, priority, weight, address, secure, tls_name = fields
        port_number = _decimal(port, "port")
        ep.split_hostport(ep.format_hostport(host, port_number))  # the host and port, as --endpoints
        numbers = [_decimal(priority, "priority"), _decimal(weight, "weight")]
        if address and not ep.parse_endpoint(ep.format_hostport(address, port_number)).address:
            raise ValueError("handed-over address %r is not an IP address" % address)
        if secure not in ("0", "1") or max(numbers) > 65535:
            raise ValueError("malformed handed-over endpoint %r" % item)
        if tls_name:
            ep.split_hostport(ep.format_hostport(tls_name, port_number))
        endpoints.append(ep.Endpoint(host, port_number, numbers[0], numbers[1], address,
                                     secure == "1", tls_name))
    return endpoints


def adopt_listener(fd: int, role: str) -> socket.socket:
    """An inherited descriptor as our listener, set up as open_listener sets up its own."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError("inherited %s socket (descriptor %d): %s" % (role, fd, error_reason(exc))) from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM \
            or not listening:
        sock.close()
        raise ConfigError("inherited %s socket (descriptor %d) is not a listening TCP socket" % (role, fd))
    sock.set_inheritable(False)  # a process we start gets it only through a handover
    sock.setblocking(False)
    tune_listener(sock)  # accepted sockets inherit TCP_NODELAY and keep-alive from it
    return sock


class Inherited:
    """The sockets and endpoints a starting process takes over, and whom it tells it is ready."""

    def __init__(self, proxy=None, status=None, channel=None, endpoints=None, origin="bound"):
        self.proxy = proxy
        self.status = status
        self.channel = channel
        self.endpoints = endpoints
        self.origin = origin  # "bound" (nothing inherited), "systemd" or "handover"

    def announce_ready(self) -> None:
        """Clients can connect now. Tell the process handing over, which then makes us systemd's
        main process (it said READY=1 long ago); else systemd. Called before the loop accepts
        anyone, so a process that cannot say it has served no client and may just exit."""
        if self.channel is None:
            sd_notify("READY=1")
            return
        try:
            self.channel.send(b"READY=1")
        except OSError as exc:  # it gave up on us, or was stopped and is gone
            raise ConfigError("handover: the previous process stopped waiting for us (%s)"
                              % error_reason(exc)) from None
        finally:
            self.channel.close()
            self.channel = None


def take_inherited(environ, log: Log) -> Inherited:
    """Take what socket activation or a handover passed, and remove its variables from `environ`
    (as sd_listen_fds(3) does): a process we start later must not take them for its own."""
    try:
        parsed = parse_inheritance(environ, os.getpid())
    except ValueError as exc:
        raise ConfigError("socket activation: %s" % exc) from None
    finally:
        for name in LISTEN_ENV + (HANDOVER_FD_ENV, HANDOVER_ENDPOINTS_ENV):
            environ.pop(name, None)
    if not parsed.listeners:
        return Inherited()
    sockets = {role: adopt_listener(fd, role) for role, fd in parsed.listeners.items()}
    addresses = {role: ep.format_hostport(*sock.getsockname()[:2]) for role, sock in sockets.items()}
    inherited = Inherited(sockets.get("proxy"), sockets.get("status"), endpoints=parsed.endpoints,
                          origin="handover" if parsed.ready_fd >= 0 else "systemd")
    if parsed.ready_fd < 0:
        log.info("using listening sockets from socket activation", **addresses)
        return inherited
    try:
        inherited.channel = socket.socket(fileno=parsed.ready_fd)
    except OSError as exc:
        raise ConfigError("handover channel (descriptor %d): %s"
                          % (parsed.ready_fd, error_reason(exc))) from None
    inherited.channel.set_inheritable(False)
    log.info("taking over from the previous process", pid=os.getpid(), old_pid=os.getppid(),
             endpoints=len(parsed.endpoints or ()), **addresses)
    return inherited


def interpreter_options() -> List[str]:
    """The interpreter's own options, for Python < 3.10, which has no sys.orig_argv."""
    flags, options = sys.flags, []
    if flags.optimize:
        options.append("-" + "O" * flags.optimize)
    for name, option in (("isolated", "-I"), ("ignore_environment", "-E"), ("no_user_site", "-s"),
                         ("no_site", "-S"), ("dont_write_bytecode", "-B")):
        if getattr(flags, name, 0):
            options.append(option)
    options += ["-W" + option for option in sys.warnoptions]
    options += ["-X" + (key if value is True else "%s=%s" % (key, value))
                for key, value in getattr(sys, "_xoptions", {}).items()]
    return options


def restart_command(executable: str, orig_argv, argv: Sequence[str], args: Sequence[str],
                    fallback_options: Sequence[str] = ()) -> List[str]:
    """The command that runs this program again with `args`: the same interpreter `executable`
    with the same options and the same way in: `-m gateway`, the console script or the .pyz.
    `orig_argv` is sys.orig_argv (Python >= 3.10: the interpreter's own argv, which ends with
    sys.argv[1:]); without it, sys.argv[0] names the file to run (`-m gateway` sets it to
    gateway.py's path, whose `__main__` guard calls the same main()). ValueError when neither
    tells."""
    if not executable:
        raise ValueError("no interpreter path (sys.executable is empty)")
    if orig_argv:
        way_in = list(orig_argv[1:len(orig_argv) - (len(argv) - 1)])
    elif argv and argv[0] not in ("", "-c", "-m"):
        way_in = list(fallback_options) + [argv[0]]
    else:
        raise ValueError("cannot tell how this process was started (sys.argv[0] is %r)"
                         % (argv[0] if argv else ""))
    return [executable] + way_in + list(args)


def place_descriptors(fds: Sequence[int]) -> None:
    """Copy `fds` to 3, 4, ... in order, inheritable, without one copy clobbering a source not
    yet copied: first each goes above every source and target (close-on-exec), then to its place."""
    high = max(list(fds) + [LISTEN_FDS_START + len(fds) - 1]) + 1
    for index, fd in enumerate(fds):
        os.dup2(fd, high + index, inheritable=False)
    for index in range(len(fds)):
        os.dup2(high + index, LISTEN_FDS_START + index, inheritable=True)


def exec_handover(executable: str, command: List[str], environ: dict, fds: Sequence[int]) -> None:
    """In the forked child: move `fds` to 3, 4, ... and run `command` with `environ`; never
    returns. LISTEN_PID must be the new process's own PID, hence a fork and an exec rather than
    one spawn. If the exec fails, the channel (the last of `fds`) says `ERRNO=`, as sd_notify."""
    try:
        signal.set_wakeup_fd(-1)  # a signal for this child must not wake the parent's loop
        place_descriptors(fds)
        environ["LISTEN_PID"] = str(os.getpid())
        os.execve(executable, command, environ)
    except OSError as exc:
        try:
            os.write(LISTEN_FDS_START + len(fds) - 1, b"ERRNO=%d" % (exc.errno or 0))
        except OSError:
            pass
    finally:
        os._exit(127)


def exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed by %s" % signal.Signals(os.WTERMSIG(status)).name
    return "exit status %d" % os.WEXITSTATUS(status)


class Handover:
    """SIGUSR2: start a new copy of this program on our listening sockets, wait until it says it
    is ready, then let it be systemd's main process and stop accepting and drain as on SIGTERM
    (`drain`). Until then we accept as usual; a copy that fails to start or is not ready within
    the bound is killed and reaped, and we keep serving.

    The channel is a SOCK_SEQPACKET socketpair: the copy sends `READY=1` (sd_notify's words) on
    its end, and its end closing before that (an exit, a crash, a failed exec) reads as EOF here,
    so a failure is seen at once rather than at the deadline. The listening sockets stay shared:
    closing our descriptors of them later resets nothing, and the clients in their backlog are
    the new process's to accept.
    """

    def __init__(self, reactor: Reactor, log: Log, args: Sequence[str], sockets: dict,
                 endpoints: Callable[[], Sequence[ep.Endpoint]], drain: Callable[[int], None]):
        self.reactor = reactor
        self.log = log
        self.args = list(args)
        self.sockets = {role: sock for role, sock in sockets.items() if sock is not None}
        self.endpoints = endpoints
        self.drain = drain
        self.child_pid = 0
        self.channel = None
        self.timer = None
        self.executable = ""
        self.handed_over = False

    def __repr__(self):
        return "<Handover to pid %d>" % self.child_pid

    def start(self, signum: int) -> None:
        if self.handed_over or self.child_pid:
            self.log.info("handover already under way or done", new_pid=self.child_pid)
            return
        if self.sockets["proxy"].fileno() < 0:
            self.log.info("not handing over: shutting down")
            return
        try:
            self._spawn()
        except (OSError, ValueError) as exc:
            self._close_channel()
            self.log.error("handover failed, still serving", reason=error_reason(exc))

    def _spawn(self) -> None:
        self.executable = os.environ.get(HANDOVER_EXECUTABLE_ENV) or sys.executable
        command = restart_command(self.executable, getattr(sys, "orig_argv", None), sys.argv,
                                  self.args, interpreter_options())
        timeout = parse_duration(os.environ.get(HANDOVER_TIMEOUT_ENV) or "0") or HANDOVER_READY_TIMEOUT
        roles = sorted(self.sockets, key=("proxy", "status").index)
        environ = dict(os.environ, LISTEN_FDS=str(len(roles)), LISTEN_FDNAMES=":".join(roles))
        environ[HANDOVER_FD_ENV] = str(LISTEN_FDS_START + len(roles))
        environ[HANDOVER_ENDPOINTS_ENV] = encode_endpoints(self.endpoints())
        self.channel, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with child_end:
            fds = [self.sockets[role].fileno() for role in roles] + [child_end.fileno()]
            pid = os.fork()
            if pid == 0:
                exec_handover(self.executable, command, environ, fds)
        self.child_pid = pid
        self.channel.setblocking(False)
        self.reactor.register(self.channel, EVENT_READ, self)
        self.timer = self.reactor.call_later(timeout, self._timed_out, timeout)
        self.log.info("handing over to a new process", pid=os.getpid(), new_pid=pid,
                      command=" ".join(command), ready_timeout=format_duration(timeout))

    def handle_io(self, sock, mask) -> None:
        try:
            message = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._failed("handover channel: %s" % error_reason(exc))
            return
        fields = dict(line.partition("=")[::2] for line in message.decode("ascii", "replace").split("\n"))
        if fields.get("READY") == "1":
            self._ready()
        elif "ERRNO" in fields:
            code = int(fields["ERRNO"]) if fields["ERRNO"].isdigit() else 0
            self._failed("cannot run %s: %s" % (self.executable, os.strerror(code).lower()))
        elif not message:
            self._failed("the new process ended before it was ready")

    def handle_failure(self, exc) -> None:
        self._failed("internal error: %r" % (exc,))

    def _timed_out(self, timeout: float) -> None:
        self.timer = None
        self.handle_io(self.channel, EVENT_READ)  # READY=1 may sit unread behind this timer
        if self.child_pid and not self.handed_over:
            self._failed("the new process was not ready within %s" % format_duration(timeout))

    def _ready(self) -> None:
        pid, self.child_pid = self.child_pid, 0
        self._close_channel()
        if self.sockets["proxy"].fileno() < 0:
            # Told to stop while the new process started (our listener is closed): it must not
            # live on as a stray gateway. It may have accepted clients already: SIGTERM, so that
            # it drains them.
            self.log.warn("stopping the new process too: this one is shutting down", new_pid=pid)
            os.kill(pid, signal.SIGTERM)
            return
        self.handed_over = True
        self.log.info("handover complete: the new process serves, this one drains",
                      pid=os.getpid(), new_pid=pid)
        # From now on the new process is the service: tell systemd (accepted from its main
        # process, which we still are: NotifyAccess=main does), and say nothing more ourselves
        # (no STOPPING=1 from our drain), as sd_notify(3)'s unset_environment does.
        sd_notify("MAINPID=%d" % pid)
        os.environ.pop("NOTIFY_SOCKET", None)
        self.drain(signal.SIGUSR2)

    def _failed(self, reason: str) -> None:
        pid, self.child_pid = self.child_pid, 0
        self._close_channel()
        if pid:
            try:
                # It has accepted nobody: a gateway accepts only after saying READY=1.
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(pid, reason)

    def close(self) -> None:
        """We stop: a new process that is not ready yet must not outlive us."""
        pid, self.child_pid = self.child_pid, 0
        self._close_channel()
        if pid:
            os.kill(pid, signal.SIGKILL)  # not ready: it has accepted nobody
            os.waitpid(pid, 0)  # a moment at most
            self.log.warn("stopped before the new process was ready: killed it", new_pid=pid)

    def _reap(self, pid: int, reason: str) -> None:
        """Collect the failed child without blocking the loop: a killed process may take a
        moment to become a zombie."""
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, -1
        if not done:
            self.reactor.call_later(0.01, self._reap, pid, reason)
            return
        self.log.error("handover failed, still serving", reason=reason, new_pid=pid,
                       status=exit_description(status) if status >= 0 else "unknown")

    def _close_channel(self) -> None:
        self.reactor.cancel(self.timer)
        self.timer = None
        if self.channel is not None:
            try:
                self.reactor.unregister(self.channel)
            except (KeyError, ValueError):
                pass  # the failure came before it was registered
            self.channel.close()
            self.channel = None


def stop_accepting_for_handover(gateway: "Gateway", signum: int) -> None:
    """Drain as on SIGTERM, and leave the status port to the new process too."""
    gateway.begin_shutdown(signum, handing_over=True)
    gateway.status.stop_accepting()

def run(options, log: Log) -> int:
    if not options.endpoints and not options.discovery_srv:
        raise ConfigError("no endpoints: give --endpoints or --discovery-srv")
    raise_open_file_limit()
    reactor = Reactor(log=log, busy_poll=BusyPoll(options.busy_poll) if options.busy_poll else None)
    try:
        return serve(reactor, options, log)
    finally:
        reactor.close()


def serve(reactor: Reactor, options, log: Log) -> int:
    StartupSignals(reactor, log)
    inherited = take_inherited(os.environ, log)
    tls_context = discovery_tls_context(options)
    source = EndpointSource(reactor, options, tls_context)
    endpoints = inherited.endpoints or (
        first_discovery(reactor, source, options, log) if source.dynamic else options.endpoints)
    listener_sock = inherited.proxy or open_listener(*options.listen_addr)
    try:
        check_not_self(endpoints, *listener_sock.getsockname()[:2])
        status_sock = inherited.status or (
            open_listener(*options.metrics_addr) if options.metrics_addr else None)
    except ConfigError:
        listener_sock.close()
        raise
    pool = ep.Pool(endpoints, options.policy, options.retry_delay, random.Random())
    gateway = Gateway(reactor, pool, log, options, tls_context)
    handover = Handover(reactor, log, options.argv, {"proxy": listener_sock, "status": status_sock},
                        lambda: gateway.pool.endpoints,
                        lambda signum: stop_accepting_for_handover(gateway, signum))
    log.info("starting etcd-gateway", version=VERSION, python=sys.version.split()[0], pid=os.getpid())
    try:
        gateway.connections.listen(listener_sock)
        if status_sock is not None:
            gateway.status.serve(status_sock)
        gateway.health.start()
        gateway.start_sync()
        if source.dynamic:
            gateway.start_refreshes(source, options.discovery_refresh)
        # Always handled: `systemctl reload` must never kill a gateway with only IP endpoints.
        reactor.add_signal_handler(signal.SIGHUP, gateway.refresh_now)
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactor.add_signal_handler(signum, gateway.begin_shutdown)
        reactor.add_signal_handler(signal.SIGUSR2, handover.start)
        log.info("ready to proxy client requests to [%s]" % ", ".join(str(e) for e in endpoints),
                 listen_addr=ep.format_hostport(*listener_sock.getsockname()[:2]),
                 policy=options.policy, sockets=inherited.origin)
        inherited.announce_ready()
        reactor.run()
    finally:
        handover.close()
        gateway.close()
        source.cancel()
    log.info("stopped")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The one entry point: `python -m gateway`, the `etcd-gateway` script and the .pyz."""
    try:
        options = parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for usage errors
        return exc.code if isinstance(exc.code, int) else 2
    options.argv = list(sys.argv[1:] if argv is None else argv)  # what a handover runs again
    log = Log(options.log_level, options.log_format)
    try:
        return run(options, log)
    except ConfigError as exc:
        sys.stderr.write("etcd-gateway: error: %s\n" % exc)
        return 1
    except KeyboardInterrupt:
        return 130
    except StartupStopped:
        return 0
    except Exception as exc:  # no traceback for an operator; the type and message say enough
        sys.stderr.write("etcd-gateway: fatal: %s: %s\n" % (type(exc).__name__, exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
