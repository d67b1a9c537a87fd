"""Endpoints: parsing, health bookkeeping and the picking policy.

Pure policy: no sockets (`socket` only names address families and looks up the interfaces of IPv6
zones), no clocks, no logging. The caller passes `now` (monotonic seconds) and a `random.Random`,
and acts on what these functions return. `gateway.py` dials what `Pool.plan()` proposes and
reports back with `mark_failed()` / `mark_up()`; discovery replaces the set with `Pool.replace()`.

Picking follows RFC 2782: only the lowest priority class among the endpoints that are up is used,
and inside it an endpoint is chosen at random in proportion to its weight (weight-0 endpoints only
rarely). Two policies sit on top of that choice:

* ``sticky`` (the behaviour etcd documents for its gateway): one endpoint is chosen once and serves
  every new connection until it fails; then a new one is chosen.
* ``round-robin`` (what the Go gateway's code actually does): every new connection moves on to the
  next endpoint of the lowest priority class.
"""
import enum
import ipaddress
import random
import re
import socket
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

POLICIES = ("sticky", "round-robin")


class Endpoint(NamedTuple):
    """One etcd member's client address. `host` is what the operator (or DNS) named; `addresses`
    are all the IP literals it resolved to, in `order_addresses` order, and `address` is the first
    of them (empty while unresolved). Build a resolved one with `with_addresses`. A NamedTuple
    rather than a dataclass: python3-minimal has no `dataclasses` module."""

    host: str
    port: int
    priority: int = 0
    weight: int = 1
    address: str = ""
    secure: bool = False
    tls_name: str = ""  # the name its certificate was verified for (discovery)
    addresses: Tuple[str, ...] = ()

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def dial_host(self) -> str:
        return self.address or self.host

    @property
    def key(self) -> Tuple[str, int]:
        """Identity across discovery refreshes: the name and port, not the resolved address."""
        return (self.host, self.port)

    def with_addresses(self, addresses: Iterable[str]) -> "Endpoint":
        """This endpoint resolved to `addresses` (IP literals in any order, repeats allowed)."""
        ordered = order_addresses(addresses)
        return self._replace(addresses=ordered, address=ordered[0] if ordered else "")

    def dial_addresses(self) -> List[Tuple[int, tuple]]:
        """What the data path connects to, in order: `(family, sockaddr)` for each address, a
        scoped IPv6 one with its interface index. Empty while a host name is unresolved."""
        texts = self.addresses or ((self.dial_host,) if _is_ip(self.dial_host) else ())
        return [socket_address(text, self.port) for text in texts]


def order_addresses(addresses: Iterable[str]) -> Tuple[str, ...]:
    """The one order in which a name's addresses are kept and tried, whatever order DNS gave:
    IPv4 before IPv6, each by numeric value; repeats once.

    A fixed order, so that an answer that only came back shuffled (round-robin DNS rotates it on
    every query) is no change. IPv4 first although RFC 6724's default policy and Go's dialer
    (the resolver's order, IPv6 first on a host with IPv6) prefer IPv6: it is the order this
    gateway dialled in before (A records before AAAA), and a Go server such as etcd given a host
    name to listen on (its default `localhost:2379`) listens on the name's IPv4 address only."""
    ordered: Dict[Tuple[int, bytes, str], str] = {}
    for text in addresses:
        ordered.setdefault(_address_order(text), text)
    return tuple(ordered[key] for key in sorted(ordered))


def _address_order(text: str) -> Tuple[int, bytes, str]:
    bare, _, zone = text.partition("%")
    address = ipaddress.ip_address(bare)
    return address.version, address.packed, zone


def readdressed(before: Sequence[Endpoint],
                after: Sequence[Endpoint]) -> List[Tuple[Endpoint, Endpoint]]:
    """The (old, new) pairs of endpoints present in both sets whose address set changed. The
    order of the addresses is no change: only which addresses there are."""
    old = {endpoint.key: endpoint for endpoint in before}
    return [(old[endpoint.key], endpoint) for endpoint in after
            if endpoint.key in old and _address_set(old[endpoint.key]) != _address_set(endpoint)]


def _address_set(endpoint: Endpoint) -> frozenset:
    return frozenset(_address_order(text) for text in endpoint.addresses
                     or ((endpoint.address,) if endpoint.address else ()))


def socket_address(text: str, port: int) -> Tuple[int, tuple]:
    """(family, sockaddr) for an IP literal. A zone (`fe80::1%eth0`) becomes the sockaddr's scope
    id, looked up at each call as Go's dialer does; an interface gone since start-up gives 0, and
    the connect fails (EINVAL) like any unroutable address."""
    if ":" not in text:
        return socket.AF_INET, (text, port)
    bare, _, zone = text.partition("%")
    try:
        scope = scope_id(zone)
    except ValueError:
        scope = 0
    return socket.AF_INET6, (bare, port, 0, scope)


MAX_SCOPE_ID = 2 ** 32 - 1   # sin6_scope_id is a uint32_t


def scope_id(zone: str) -> int:
    """The interface index an IPv6 zone names (`eth0`, or the index itself; "" is 0), which a
    link-local sockaddr needs: Python drops the `%zone` of a (host, port) pair, so connect() to
    `fe80::1%eth0` fails with EINVAL without it. ValueError for an unknown interface."""
    if not zone:
        return 0
    if is_ascii_number(zone) and int(zone) <= MAX_SCOPE_ID:
        return int(zone)
    try:
        return socket.if_nametoindex(zone)
    except (OSError, ValueError):   # ValueError: a NUL in the name
        raise ValueError("no network interface named %r" % zone) from None


def format_hostport(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def split_hostport(text: str) -> Tuple[str, int]:
    """Split `host:port` or `[v6]:port`; raise ValueError with a reason when malformed."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("malformed address %r (want [IPv6]:PORT)" % text)
        bare, percent, zone = host.partition("%")
        ipaddress.IPv6Address(bare)
        if percent:
            _check_zone(zone, text)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("missing port in address %r" % text)
        if ":" in host:
            raise ValueError("IPv6 address %r must be written as [ADDR]:PORT" % text)
    if not host:
        raise ValueError("missing host in address %r" % text)
    if not is_ascii_number(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError("invalid port in address %r (want 1-65535 in ASCII digits)" % text)
    if not _is_valid_host(host):
        raise ValueError("invalid host in address %r" % text)
    return host, int(port_text)


def _check_zone(zone: str, text: str) -> None:
    """Refuse an unknown interface at start-up, rather than fail every dial."""
    if not zone:
        raise ValueError("empty IPv6 zone in address %r" % text)
    try:
        scope_id(zone)
    except ValueError as exc:
        raise ValueError("%s in address %r" % (exc, text)) from None


def is_ascii_number(text: str) -> bool:
    """Digits 0-9 only. str.isdigit() and int() also take other scripts' digits (`٢٣٧٩` is 2379
    to Python), which Go, DNS and every other tool read as garbage."""
    return text.isascii() and text.isdigit()


def _is_valid_host(host: str) -> bool:
    if ":" in host:
        return True  # already validated as IPv6 above
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and host.isascii() and all(
        0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label) for label in labels
    )


# RFC 3986 section 3.1: a scheme is a letter, then letters, digits, "+", "-" or ".".
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_URL_AUTHORITY_END = re.compile(r"[/?#]")


def strip_url(text: str) -> Tuple[str, bool]:
    """`SCHEME://[USER@]HOST:PORT[/PATH][?QUERY][#FRAGMENT]` -> (`HOST:PORT`, is `https`), as the
    Go gateway keeps only url.Parse's Host: any scheme in any case, the rest dropped, and a zone
    escaped as `%25` (RFC 6874) unescaped. Text without `SCHEME://` comes back as it is."""
    match = _URL_SCHEME.match(text)
    if match is None:
        return text, False
    authority = _URL_AUTHORITY_END.split(text[match.end():], 1)[0]
    hostport = authority.rpartition("@")[2].replace("%25", "%")
    return hostport, match.group(1).lower() == "https"


def parse_endpoint(text: str) -> Endpoint:
    """Parse one `--endpoints` item: `HOST:PORT`, `[IPv6]:PORT` or a URL whose host and port are
    kept, as etcd does; an `https` URL marks the member as TLS, for health checks (the relay
    forwards bytes either way)."""
    hostport, secure = strip_url(text.strip())
    host, port = split_hostport(hostport)
    endpoint = Endpoint(host=host, port=port, secure=secure)
    return endpoint.with_addresses((host,)) if _is_ip(host) else endpoint


def parse_endpoints(text: str) -> List[Endpoint]:
    """Parse a comma-separated list; empty items are ignored and duplicates kept once."""
    seen: Dict[Tuple[str, int], Endpoint] = {}
    for item in text.split(","):
        if item.strip():
            endpoint = parse_endpoint(item)
            seen.setdefault(endpoint.key, endpoint)
    return list(seen.values())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])  # Python < 3.9 knows no IPv6 zones
    except ValueError:
        return False
    return True


def choose_weighted(candidates: Sequence[Endpoint], rng: random.Random) -> Endpoint:
    """RFC 2782 selection inside one priority class.

    Weight-0 endpoints are placed first and win only when the draw is 0, so they are chosen rarely
    while any weighted endpoint exists. Unlike the Go gateway, the draw covers every weight exactly
    (weights 1 and 1 give 50/50), and when all weights are 0 the choice is uniform.
    """
    total = sum(endpoint.weight for endpoint in candidates)
    if total == 0:
        return candidates[rng.randrange(len(candidates))]
    ordered = sorted(candidates, key=lambda endpoint: endpoint.weight != 0)
    has_zero = ordered[0].weight == 0
    draw = rng.randint(0 if has_zero else 1, total)
    running = 0
    for endpoint in ordered:
        running += endpoint.weight
        if running >= draw:
            return endpoint
    return ordered[-1]


def lowest_priority_class(candidates: Iterable[Endpoint]) -> List[Endpoint]:
    candidates = list(candidates)
    if not candidates:
        return []
    best = min(endpoint.priority for endpoint in candidates)
    return [endpoint for endpoint in candidates if endpoint.priority == best]


class HealthChange(enum.Enum):
    """What one etcd health check changed (see Pool.record_check)."""
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Health:
    """Mutable bookkeeping for one endpoint.

    Two separate judgements: `up` (it accepts TCP connections; `down_until` is None) and `healthy`
    (etcd's own /health says it can serve, when etcd-aware checks are on). A reachable but
    unhealthy endpoint is still used when no healthy one is left, so that clients get etcd's own
    error rather than a closed socket.
    """

    __slots__ = ("endpoint", "down_until", "last_error", "active", "dial_failures", "healthy",
                 "check_failures", "check_successes", "dial_order")

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        # (family, sockaddr) of each address, the one that last answered first: a connection
        # stays with the address that works (sticky) until it fails.
        self.dial_order = endpoint.dial_addresses()
        self.down_until: Optional[float] = None
        self.last_error = ""
        self.active = 0
        self.dial_failures = 0
        self.healthy = True
        self.check_failures = 0
        self.check_successes = 0

    @property
    def up(self) -> bool:
        return self.down_until is None

    def __repr__(self) -> str:
        state = "up" if self.up else "down until %.3f" % self.down_until
        return "<Health %s %s active=%d>" % (self.endpoint, state, self.active)


def moved_first(items: list, first) -> list:
    """`items` with `first` moved to the front."""
    return [first] + [item for item in items if item != first]


class Pool:
    """The current endpoint set, their health, and the policy that picks one for a new connection."""

    def __init__(self, endpoints: Sequence[Endpoint], policy: str, retry_delay: float,
                 rng: random.Random, failures_to_leave: int = 3, successes_to_return: int = 2):
        if policy not in POLICIES:
            raise ValueError("unknown policy %r" % policy)
        self.policy = policy
        self.retry_delay = retry_delay
        self.rng = rng
        self.failures_to_leave = failures_to_leave
        self.successes_to_return = successes_to_return
        self._health: Dict[Tuple[str, int], Health] = {}
        self._order: List[Endpoint] = []
        self._current: Optional[Endpoint] = None
        self._rotation = 0
        self._sticky_plan: Optional[List[Endpoint]] = None  # valid until anything changes
        self.replace(endpoints)

    # -- the set ---------------------------------------------------------------------------------

    @property
    def endpoints(self) -> List[Endpoint]:
        return list(self._order)

    def healths(self) -> List[Health]:
        return [self._health[endpoint.key] for endpoint in self._order]

    def replace(self, endpoints: Sequence[Endpoint]) -> Tuple[List[Endpoint], List[Endpoint]]:
        """Install a new set; endpoints that stay (same `key`) keep their health, whatever their
        addresses now are (`readdressed` tells which changed). Returns (added, removed)."""
        new_keys = {endpoint.key for endpoint in endpoints}
        removed = [endpoint for endpoint in self._order if endpoint.key not in new_keys]
        added = [endpoint for endpoint in endpoints if endpoint.key not in self._health]
        health = {}
        for endpoint in endpoints:
            old = self._health.get(endpoint.key)
            entry = old if old is not None else Health(endpoint)
            if old is not None and old.endpoint.addresses != endpoint.addresses:
                entry.dial_order = endpoint.dial_addresses()
            entry.endpoint = endpoint
            health[endpoint.key] = entry
        self._health = health
        self._order = list(endpoints)
        self._sticky_plan = None
        if self._current is not None:
            entry = health.get(self._current.key)
            self._current = entry.endpoint if entry is not None else None
        return added, removed

    def contains(self, endpoint: Endpoint) -> bool:
        return endpoint.key in self._health

    # -- picking ---------------------------------------------------------------------------------

    def plan(self) -> List[Endpoint]:
        """The endpoints to try, in order, for one new connection.

        First the policy's choice among the healthy endpoints that are up (among all that are up
        when none is healthy), then the other up endpoints, healthy ones and lower priorities
        first, then the endpoints marked down: each is still tried once, so a client is never
        refused for a whole retry delay just because every endpoint was marked down.
        """
        if self._sticky_plan is not None:
            return list(self._sticky_plan)  # every new connection asks: keep it cheap
        plan = self._new_plan()
        if self.policy == "sticky":
            self._sticky_plan = plan
        return list(plan)

    def _new_plan(self) -> List[Endpoint]:
        # Apart from plan(): its lambdas' closure cells would be made on every call of plan().
        health = self._health
        up = [endpoint for endpoint in self._order if health[endpoint.key].up]
        down = [endpoint for endpoint in self._order if not health[endpoint.key].up]
        down.sort(key=lambda endpoint: health[endpoint.key].down_until)
        first = self._choose([endpoint for endpoint in up if health[endpoint.key].healthy] or up)
        rest = sorted((endpoint for endpoint in up if endpoint is not first),
                      key=lambda endpoint: (not health[endpoint.key].healthy, endpoint.priority))
        return ([first] if first is not None else []) + rest + down

    def _choose(self, up: List[Endpoint]) -> Optional[Endpoint]:
        best_class = lowest_priority_class(up)
        if not best_class:
            return None
        if self.policy == "sticky":
            if self._current is None or self._current not in best_class:
                self._current = choose_weighted(best_class, self.rng)
            return self._current
        self._rotation = (self._rotation + 1) % len(best_class)
        return best_class[self._rotation]

    # -- health ----------------------------------------------------------------------------------

    def mark_failed(self, endpoint: Endpoint, now: float, reason: str) -> bool:
        """Record a failed dial or probe. Returns True when the endpoint has just gone down."""
        entry = self._health.get(endpoint.key)
        if entry is None:
            return False
        was_up = entry.up
        entry.down_until = now + self.retry_delay
        self._sticky_plan = None
        entry.last_error = reason
        entry.dial_failures += 1
        if self._current is not None and self._current.key == endpoint.key:
            self._current = None
        return was_up

    def mark_up(self, endpoint: Endpoint) -> bool:
        """Record a successful dial or probe. Returns True when the endpoint has just come back."""
        entry = self._health.get(endpoint.key)
        return entry is not None and self._bring_up(entry)

    def _bring_up(self, entry: Health) -> bool:
        if entry.up:
            return False
        entry.down_until = None
        self._sticky_plan = None
        return True

    def record_check(self, endpoint: Endpoint, ok: bool, reason: str = "") -> Optional["HealthChange"]:
        """Record one etcd health check. Returns UNHEALTHY when the endpoint has just left the
        rotation (after `failures_to_leave` failures in a row), HEALTHY when it has just come
        back (after `successes_to_return` successes in a row), else None: no flapping."""
        entry = self._health.get(endpoint.key)
        if entry is None:
            return None
        if ok:
            entry.check_failures = 0
            entry.check_successes += 1
            if not entry.healthy and entry.check_successes >= self.successes_to_return:
                entry.healthy = True
                self._sticky_plan = None
                return HealthChange.HEALTHY
            return None
        entry.check_successes = 0
        entry.check_failures += 1
        entry.last_error = reason
        if entry.healthy and entry.check_failures >= self.failures_to_leave:
            entry.healthy = False
            self._sticky_plan = None
            if self._current is not None and self._current.key == endpoint.key:
                self._current = None
            return HealthChange.UNHEALTHY
        return None

    def due_probes(self, now: float) -> List[Endpoint]:
        """Down endpoints whose retry delay has passed. Each is pushed a retry delay further, so a
        probe in flight is not started twice; a failed probe calls `mark_failed` again."""
        due = []
        for entry in self._health.values():
            if entry.down_until is not None and entry.down_until <= now:
                entry.down_until = now + self.retry_delay
                due.append(entry.endpoint)
                self._sticky_plan = None
        return due

    def next_probe_deadline(self) -> Optional[float]:
        deadlines = [entry.down_until for entry in self._health.values()
                     if entry.down_until is not None]
        return min(deadlines) if deadlines else None

    def any_usable(self) -> bool:
        """At least one endpoint is reachable and (when checked) healthy."""
        return any(entry.up and entry.healthy for entry in self._health.values())

    def dial_order(self, endpoint: Endpoint) -> List[Tuple[int, tuple]]:
        """The (family, sockaddr) of `endpoint`'s addresses in the order to try them."""
        entry = self._health.get((endpoint.host, endpoint.port))  # the key, without a call
        return entry.dial_order if entry is not None else endpoint.dial_addresses()

    def connection_opened(self, endpoint: Endpoint, address: Optional[Tuple[int, tuple]] = None) -> bool:
        """Count a relayed connection (to `address` of the endpoint); a dial that succeeded also
        marks the endpoint up. Returns True when the endpoint has just come back (as `mark_up`
        does)."""
        entry = self._health.get((endpoint.host, endpoint.port))  # the key, without a call
        if entry is None:
            return False
        entry.active += 1
        order = entry.dial_order
        if address is not None and order and order[0] != address and address in order:
            entry.dial_order = moved_first(order, address)
        return entry.down_until is not None and self._bring_up(entry)  # most are up: no call

    def connection_closed(self, endpoint: Endpoint) -> None:
        entry = self._health.get((endpoint.host, endpoint.port))
        if entry is not None and entry.active > 0:
            entry.active -= 1
