"""DNS for the gateway: wire format, resolver configuration and sans-I/O lookup machines.

This module owns everything the gateway knows about DNS, and imports only the standard library:

* **Wire format** (RFC 1035, RFC 2782 SRV, RFC 3596 AAAA): `build_query`, `build_message` and
  `parse_message`.  Parsing goes through a bounds-checked cursor; compression pointers must
  point strictly backwards, labels are at most 63 bytes, names at most 255, rdata must consume
  exactly rdlength and nothing may follow the last record.  Any malformed input raises
  `DNSFormatError` (a `ValueError` carrying the offset), never IndexError, struct.error,
  UnicodeError, a hang or unbounded work.
* **Configuration**: `parse_resolv_conf`, `parse_hosts`, `parse_dns_servers` take text and return
  values; `load_resolv_conf` and `load_hosts` take the file path as a parameter.
* **Lookup machines** that do no I/O and never read a clock: `Lookup` drives one question across
  the servers (attempts x servers, a fresh random ID per query, TC -> TCP, SERVFAIL/REFUSED/timeout
  -> next server, CNAME chains); `AddressLookup` resolves a host name to addresses (/etc/hosts
  first, then A and AAAA, search list); `SRVDiscovery` runs etcd's SRV discovery and resolves the
  targets, all lookups concurrently.  Every machine has the same driving interface:

      take_sends()          -> new Query objects to send now (each exactly once)
      waiting()             -> the Query objects still awaiting a reply (close the others' sockets)
      next_deadline()       -> the earliest monotonic instant to call on_timeout(), or None
      feed(server, payload, now) -> True if the reply was accepted; forged, late or garbled
                               replies are ignored and the lookup keeps waiting
      on_timeout(now)       -> call when now >= next_deadline()
      on_error(query, reason, now) -> the driver could not send or receive that query
      done, result, error

  The gateway's reactor drives them with non-blocking sockets; `resolve_blocking` drives them
  with ordinary sockets at start-up.  Keeping the policy here and the sockets outside is what
  lets one thread serve relays while a refresh is in flight.
"""
import ipaddress
import os
import random
import selectors
import socket
import struct
import time
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------------------
# Constants (RFC 1035 section 3.2, RFC 3596, RFC 2782, RFC 6895)
# ---------------------------------------------------------------------------------------------

TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_OPT = 41
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED"}
TYPE_NAMES = {TYPE_A: "A", TYPE_NS: "NS", TYPE_CNAME: "CNAME", TYPE_SOA: "SOA",
              TYPE_PTR: "PTR", TYPE_TXT: "TXT", TYPE_AAAA: "AAAA", TYPE_SRV: "SRV",
              TYPE_OPT: "OPT"}

HEADER_BYTES = 12
MAX_LABEL_BYTES = 63          # RFC 1035 section 2.3.4
MAX_NAME_BYTES = 255          # wire length, length octets and the root label included
MAX_UDP_BYTES = 512           # RFC 1035 section 4.2.1; we send no EDNS, so this is the limit
MAX_CNAME_HOPS = 8            # glibc and Go give up on longer chains too
DNS_PORT = 53

# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


class DNSFormatError(ValueError):
    """A malformed DNS message; `offset` is where in the message the problem was found."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__("%s at offset %d" % (message, offset))
        self.offset = offset


class DNSLookupError(LookupError):
    """A lookup that got no usable answer from any server (not NXDOMAIN: that is an answer)."""


class Question(NamedTuple):
    name: str                 # without the trailing dot; the root is ""
    qtype: int
    qclass: int = CLASS_IN


class SRV(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str


class Record(NamedTuple):
    """A resource record; `rdata` is SRV for SRV, address text for A/AAAA, the target name
    for CNAME, and the raw bytes for every other type."""
    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: object


class Message(NamedTuple):
    id: int
    qr: bool = False
    opcode: int = 0
    aa: bool = False
    tc: bool = False
    rd: bool = True
    ra: bool = False
    rcode: int = RCODE_NOERROR
    questions: Tuple[Question, ...] = ()
    answers: Tuple[Record, ...] = ()
    authority: Tuple[Record, ...] = ()
    additional: Tuple[Record, ...] = ()

    @property
    def question(self) -> Optional[Question]:
        return self.questions[0] if self.questions else None


def name_key(name: str) -> str:
    """The form in which two names compare equal: case-folded (RFC 4343), no trailing dot."""
    if name.endswith(".") and not name.endswith("\\."):
        name = name[:-1]
    return name.lower()


# ---------------------------------------------------------------------------------------------
# Wire format: parsing
# ---------------------------------------------------------------------------------------------

_PRINTABLE = frozenset(range(0x21, 0x7F)) - {ord("."), ord("\\")}


def _label_text(label: bytes) -> str:
    # Escape like RFC 1035 section 5.1 master files, so any byte string has a text form and
    # decoding can never raise UnicodeError.
    return "".join(chr(b) if b in _PRINTABLE else
                   ("\\" + chr(b) if b in (0x2E, 0x5C) else "\\%03d" % b) for b in label)


class _Cursor:
    """A read position in a message that refuses to move past the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int, what: str) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise DNSFormatError("truncated %s" % what, self.pos)
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def u16(self, what: str) -> int:
        return struct.unpack("!H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("!I", self.take(4, what))[0]

    def name(self) -> str:
        """Read a possibly compressed name; afterwards pos is just past its in-place bytes."""
        data, pos = self.data, self.pos
        labels = []
        wire_length = 1
        limit = pos           # every pointer must go strictly below the previous jump
        resume = None
        while True:
            if pos >= len(data):
                raise DNSFormatError("truncated name", pos)
            length = data[pos]
            if length >= 0xC0:
                if pos + 1 >= len(data):
                    raise DNSFormatError("truncated compression pointer", pos)
                target = ((length & 0x3F) << 8) | data[pos + 1]
                if target >= len(data):
                    raise DNSFormatError("compression pointer past the end", pos)
                if target >= limit:
                    raise DNSFormatError("compression pointer not strictly backwards", pos)
                if resume is None:
                    resume = pos + 2
                limit = pos = target
                continue
            if length > MAX_LABEL_BYTES:
                raise DNSFormatError("label longer than 63 bytes", pos)
            if length == 0:
                break
            wire_length += length + 1
            if wire_length > MAX_NAME_BYTES:
                raise DNSFormatError("name longer than 255 bytes", pos)
            if pos + 1 + length > len(data):
                raise DNSFormatError("truncated label", pos)
            labels.append(_label_text(data[pos + 1:pos + 1 + length]))
            pos += 1 + length
        self.pos = resume if resume is not None else pos + 1
        return ".".join(labels)


def _parse_rdata(cursor: _Cursor, rtype: int, rdlength: int) -> object:
    start = cursor.pos
    end = start + rdlength
    if end > len(cursor.data):
        raise DNSFormatError("rdlength past the end of the message", start)
    if rtype == TYPE_A or rtype == TYPE_AAAA:
        size = 4 if rtype == TYPE_A else 16
        if rdlength != size:
            raise DNSFormatError("%s rdata of %d bytes" % (TYPE_NAMES[rtype], rdlength), start)
        return str(ipaddress.ip_address(cursor.take(size, "address")))
    if rtype == TYPE_SRV:
        priority, weight, port = struct.unpack("!HHH", cursor.take(6, "SRV rdata"))
        value = SRV(priority, weight, port, cursor.name())  # type: object
    elif rtype == TYPE_CNAME:
        value = cursor.name()
    else:
        return cursor.take(rdlength, "rdata")
    if cursor.pos != end:
        raise DNSFormatError("rdata does not match rdlength", start)
    return value


def _parse_record(cursor: _Cursor) -> Record:
    name = cursor.name()
    rtype, rclass = cursor.u16("record type"), cursor.u16("record class")
    ttl = cursor.u32("TTL")
    rdlength = cursor.u16("rdlength")
    return Record(name, rtype, rclass, ttl, _parse_rdata(cursor, rtype, rdlength))


def parse_message(data: bytes) -> Message:
    """Parse a whole DNS message; raise DNSFormatError on anything malformed."""
    cursor = _Cursor(bytes(data))
    if len(data) < HEADER_BYTES:
        raise DNSFormatError("message shorter than the 12-byte header", len(data))
    qid, flags, qdcount, ancount, nscount, arcount = struct.unpack("!6H", cursor.take(12, "header"))
    questions = []
    for _ in range(qdcount):
        name = cursor.name()
        questions.append(Question(name, cursor.u16("question type"), cursor.u16("question class")))
    sections = []
    for count in (ancount, nscount, arcount):
        sections.append(tuple(_parse_record(cursor) for _ in range(count)))
    if cursor.pos != len(data):
        raise DNSFormatError("trailing bytes after the last record", cursor.pos)
    return Message(
        id=qid, qr=bool(flags & 0x8000), opcode=(flags >> 11) & 0xF, aa=bool(flags & 0x0400),
        tc=bool(flags & 0x0200), rd=bool(flags & 0x0100), ra=bool(flags & 0x0080),
        rcode=flags & 0xF, questions=tuple(questions),
        answers=sections[0], authority=sections[1], additional=sections[2])


# ---------------------------------------------------------------------------------------------
# Wire format: building
# ---------------------------------------------------------------------------------------------


def _split_labels(name: str) -> List[bytes]:
    """Text name (RFC 1035 section 5.1 escapes allowed) -> labels; ValueError if malformed."""
    labels, current, index = [], bytearray(), 0
    if name in ("", "."):
        return []
    if name.endswith(".") and not name.endswith("\\."):
        name = name[:-1]
    while index < len(name):
        char = name[index]
        if char == "\\":
            digits = name[index + 1:index + 4]
            if len(digits) == 3 and digits.isdigit() and int(digits) < 256:
                current.append(int(digits))
                index += 4
                continue
            if index + 1 >= len(name):
                raise ValueError("dangling escape in name %r" % name)
            char = name[index + 1]
            index += 1
        elif char == ".":
            labels.append(bytes(current))
            current = bytearray()
            index += 1
            continue
        if ord(char) > 0x7F:
            raise ValueError("non-ASCII character in name %r" % name)
        current.append(ord(char))
        index += 1
    labels.append(bytes(current))
    return labels


def encode_name(name: str) -> bytes:
    """The uncompressed wire form of a text name; ValueError if a label or the name is too long."""
    out = bytearray()
    for label in _split_labels(name):
        if not label:
            raise ValueError("empty label in name %r" % name)
        if len(label) > MAX_LABEL_BYTES:
            raise ValueError("label longer than 63 bytes in name %r" % name)
        out += bytes([len(label)]) + label
    out.append(0)
    if len(out) > MAX_NAME_BYTES:
        raise ValueError("name longer than 255 bytes: %r" % name)
    return bytes(out)


def _encode_rdata(record: Record) -> bytes:
    rdata = record.rdata
    if record.rtype == TYPE_A or record.rtype == TYPE_AAAA:
        packed = ipaddress.ip_address(rdata).packed  # type: ignore[arg-type]
        if len(packed) != (4 if record.rtype == TYPE_A else 16):
            raise ValueError("%r is not a %s address" % (rdata, TYPE_NAMES[record.rtype]))
        return packed
    if record.rtype == TYPE_SRV:
        priority, weight, port, target = rdata  # type: ignore[misc]
        return struct.pack("!HHH", priority, weight, port) + encode_name(target)
    if record.rtype == TYPE_CNAME:
        return encode_name(str(rdata))
    return bytes(rdata)  # type: ignore[call-overload]


def encode_record(record: Record) -> bytes:
    rdata = _encode_rdata(record)
    return (encode_name(record.name)
            + struct.pack("!HHIH", record.rtype, record.rclass, record.ttl, len(rdata)) + rdata)


def build_message(message: Message) -> bytes:
    """The wire form of a message, without name compression (which is optional, RFC 1035 4.1.4)."""
    flags = ((0x8000 if message.qr else 0) | (message.opcode & 0xF) << 11
             | (0x0400 if message.aa else 0) | (0x0200 if message.tc else 0)
             | (0x0100 if message.rd else 0) | (0x0080 if message.ra else 0)
             | (message.rcode & 0xF))
    out = [struct.pack("!6H", message.id, flags, len(message.questions), len(message.answers),
                       len(message.authority), len(message.additional))]
    for question in message.questions:
        out.append(encode_name(question.name) + struct.pack("!HH", question.qtype, question.qclass))
    for section in (message.answers, message.authority, message.additional):
        out.extend(encode_record(record) for record in section)
    return b"".join(out)


def build_query(qid: int, name: str, qtype: int, rd: bool = True) -> bytes:
    """A standard query (opcode 0, class IN) for one question."""
    return build_message(Message(id=qid, rd=rd, questions=(Question(name_key(name), qtype),)))


def tcp_frame(payload: bytes) -> bytes:
    """DNS over TCP prefixes every message with its 2-byte length (RFC 1035 section 4.2.2)."""
    return struct.pack("!H", len(payload)) + payload


class TCPFrameReader:
    """Reassembles one length-prefixed DNS message from the bytes of a TCP stream."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Optional[bytes]:
        """Add received bytes; return the whole message once it is complete, else None."""
        self._buffer += data
        if len(self._buffer) < 2:
            return None
        length = struct.unpack("!H", self._buffer[:2])[0]
        if len(self._buffer) < 2 + length:
            return None
        return self._buffer[2:2 + length]


# ---------------------------------------------------------------------------------------------
# Configuration: /etc/resolv.conf, /etc/hosts, --dns-server
# ---------------------------------------------------------------------------------------------

Server = Tuple[str, int]      # (IP address text, port)

# With no usable nameserver line, ask the local host, as Go does (dnsconfig_unix.go).
DEFAULT_NAMESERVERS = (("127.0.0.1", DNS_PORT), ("::1", DNS_PORT))
MAX_NAMESERVERS = 3           # resolv.conf(5): MAXNS
MAX_TIMEOUT = 30.0            # resolv.conf(5): RES_MAXRETRANS
MAX_ATTEMPTS = 5              # resolv.conf(5): RES_MAXRETRY
MAX_NDOTS = 15                # resolv.conf(5)


class ResolvConf(NamedTuple):
    nameservers: Tuple[Server, ...] = DEFAULT_NAMESERVERS
    search: Tuple[str, ...] = ()
    ndots: int = 1
    timeout: float = 5.0
    attempts: int = 2
    rotate: bool = False


def _ip_text(text: str) -> Optional[str]:
    """The canonical text of an IP address (a %scope suffix kept), or None if it is not one."""
    address, _, scope = text.partition("%")
    try:
        canonical = str(ipaddress.ip_address(address))
    except ValueError:
        return None
    return canonical + ("%" + scope if scope else "")


def _option_int(value: str, low: int, high: int) -> Optional[int]:
    if not value.isdigit():
        return None
    return max(low, min(high, int(value)))


def _apply_option(conf: ResolvConf, option: str) -> ResolvConf:
    key, _, value = option.partition(":")
    if key == "rotate":
        return conf._replace(rotate=True)
    number = _option_int(value, 0 if key == "ndots" else 1,
                         {"ndots": MAX_NDOTS, "timeout": int(MAX_TIMEOUT)}.get(key, MAX_ATTEMPTS))
    if number is None:
        return conf
    if key == "ndots":
        return conf._replace(ndots=number)
    if key == "timeout":
        return conf._replace(timeout=float(number))
    if key == "attempts":
        return conf._replace(attempts=number)
    return conf


def parse_resolv_conf(text: str) -> ResolvConf:
    """Parse resolv.conf(5) text: nameserver (at most 3, IPv6 too), search/domain (the last
    one wins, as in glibc), options timeout: attempts: ndots: rotate.  Unknown lines are ignored."""
    conf = ResolvConf(nameservers=())
    servers = []  # type: List[Server]
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0][0] in "#;":
            continue
        keyword, args = fields[0], fields[1:]
        if keyword == "nameserver" and args and len(servers) < MAX_NAMESERVERS:
            address = _ip_text(args[0])
            if address is not None:
                servers.append((address, DNS_PORT))
        elif keyword == "domain" and args:
            conf = conf._replace(search=(name_key(args[0]),))
        elif keyword == "search":
            conf = conf._replace(search=tuple(name_key(arg) for arg in args))
        elif keyword == "options":
            for option in args:
                conf = _apply_option(conf, option)
    return conf._replace(nameservers=tuple(servers) or DEFAULT_NAMESERVERS)


def parse_hosts(text: str) -> Dict[str, Tuple[str, ...]]:
    """Parse hosts(5) text into {lower-case name: addresses in file order}."""
    hosts = {}  # type: Dict[str, Tuple[str, ...]]
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) < 2:
            continue
        address = _ip_text(fields[0])
        if address is None:
            continue
        for name in fields[1:]:
            key = name_key(name)
            if address not in hosts.get(key, ()):
                hosts[key] = hosts.get(key, ()) + (address,)
    return hosts


def _parse_port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("bad port in DNS server %r" % spec)
    return int(text)


def _parse_dns_server(spec: str) -> Server:
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("malformed DNS server %r" % spec)
        port = _parse_port(rest[1:], spec) if rest else DNS_PORT
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = _parse_port(port_text, spec)
    else:
        host, port = spec, DNS_PORT     # an IPv4 address, or a bare IPv6 address
    address = _ip_text(host)
    if address is None:
        raise ValueError("DNS server %r is not an IP address" % spec)
    return address, port


def parse_dns_servers(text: str) -> Tuple[Server, ...]:
    """Parse the --dns-server value `HOST[:PORT][,...]` (IPv6 as `[::1]:53`); ValueError if
    malformed.  Hosts must be IP addresses: a name would need DNS to find DNS."""
    specs = [spec.strip() for spec in text.split(",")]
    if not text.strip() or not all(specs):
        raise ValueError("empty DNS server in %r" % text)
    return tuple(_parse_dns_server(spec) for spec in specs)


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def load_resolv_conf(path: str = "/etc/resolv.conf") -> ResolvConf:
    """Read and parse resolv.conf; a missing file gives the defaults, as in Go and glibc."""
    text = _read_text(path)
    return ResolvConf() if text is None else parse_resolv_conf(text)


def load_hosts(path: str = "/etc/hosts") -> Dict[str, Tuple[str, ...]]:
    """Read and parse a hosts file; a missing file is an empty one."""
    text = _read_text(path)
    return {} if text is None else parse_hosts(text)


def search_names(name: str, conf: ResolvConf) -> Tuple[str, ...]:
    """The absolute names to try for `name`, in order (resolv.conf(5)): an absolute name (ending
    in a dot) only as it is; a name with at least `ndots` dots first as it is, then with each
    search domain; a shorter one with each search domain first, then as it is."""
    if name.endswith(".") and not name.endswith("\\."):
        return (name_key(name),)
    bare = name_key(name)
    expanded = tuple(bare + "." + domain for domain in conf.search if domain)
    if bare.count(".") >= conf.ndots:
        return (bare,) + expanded
    return expanded + (bare,)


# ---------------------------------------------------------------------------------------------
# Lookup: one question across the servers, sans I/O
# ---------------------------------------------------------------------------------------------


class Query:
    """One DNS message to send to `server` over `transport` ('udp' or 'tcp'); the machine
    gives up on it at `deadline` (monotonic seconds).  Compared by identity, so a driver can
    key its sockets by Query.  Over TCP, write `wire` (the payload with its length prefix).
    A plain class, not a dataclass: python3-minimal has no `dataclasses` module."""

    __slots__ = ("server", "transport", "payload", "deadline")

    def __init__(self, server: Server, transport: str, payload: bytes, deadline: float):
        self.server = server
        self.transport = transport
        self.payload = payload
        self.deadline = deadline

    def __repr__(self) -> str:
        return "Query(server=%r, transport=%r, deadline=%r)" % (self.server, self.transport, self.deadline)

    @property
    def wire(self) -> bytes:
        return tcp_frame(self.payload) if self.transport == "tcp" else self.payload

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET


class Answer(NamedTuple):
    """A lookup's answer; NXDOMAIN and "no records" are answers too (`records` is empty)."""
    name: str                      # the name asked
    qtype: int
    rcode: int                     # RCODE_NOERROR or RCODE_NXDOMAIN
    canonical: str                 # the name after following CNAMEs
    records: Tuple[Record, ...]    # the records of qtype at the canonical name
    additional: Tuple[Record, ...]  # the final reply's additional section (glue)
    ttl: Optional[int]             # min TTL over the CNAMEs and records (SOA TTL if negative)

    @property
    def values(self) -> Tuple[object, ...]:
        return tuple(record.rdata for record in self.records)


def _same_server(address: Sequence, server: Server) -> bool:
    # recvfrom() gives 4-tuples for IPv6; an address text may be written several ways.
    if len(address) < 2 or address[1] != server[1]:
        return False
    return (_ip_text(str(address[0])) or address[0]) == server[0]


def _follow_cnames(answers: Sequence[Record], name: str, qtype: int) -> Tuple[str, List[Record]]:
    """Follow the CNAME chain from `name` inside one answer section (bounded, loops included)."""
    if qtype == TYPE_CNAME:
        return name, []
    cnames = {name_key(r.name): r for r in answers if r.rtype == TYPE_CNAME}
    chain = []  # type: List[Record]
    while name in cnames and len(chain) <= MAX_CNAME_HOPS:
        chain.append(cnames[name])
        name = name_key(str(cnames[name].rdata))
    return name, chain


def _min_ttl(ttls: Iterable[int]) -> Optional[int]:
    ttls = list(ttls)
    return min(ttls) if ttls else None


class Lookup:
    """Drive one question (name, qtype) to an answer: attempts x servers (resolv.conf order,
    rotated by `rng` when `rotate` is set), a fresh random ID per query, TC -> the same server
    over TCP, SERVFAIL/REFUSED/other errors/timeouts -> the next server, NXDOMAIN or an empty
    answer -> done, CNAME chains followed across queries up to MAX_CNAME_HOPS.

    A reply counts only if it comes from the server asked, has QR set, opcode QUERY, the
    query's ID and the same question; anything else is ignored and the query keeps waiting
    until its deadline (as Go's net/dnsclient_unix.go does).  `name` is taken as absolute."""

    def __init__(self, name: str, qtype: int, conf: ResolvConf, rng: random.Random,
                 now: float) -> None:
        self.name = name_key(name)
        self.qtype = qtype
        self.done = False
        self.result = None  # type: Optional[Answer]
        self.error = None  # type: Optional[DNSLookupError]
        self._conf, self._rng = conf, rng
        self._qname = self.name
        self._qid = 0
        self._chain = []  # type: List[Record]
        self._failures = []  # type: List[str]
        self._sends = []  # type: List[Query]
        self._current = None  # type: Optional[Query]
        self._start(now)

    def __repr__(self) -> str:
        state = "done" if self.done else "waiting on %r" % (self._current,)
        return "<Lookup %s %s %s>" % (self._qname, TYPE_NAMES.get(self.qtype, self.qtype), state)

    # -- the driving interface ------------------------------------------------------------

    def take_sends(self) -> List[Query]:
        # A query superseded before the driver took it (a timeout in between) is never sent.
        sends = [query for query in self._sends if query is self._current]
        self._sends = []
        return sends

    def waiting(self) -> Tuple[Query, ...]:
        return (self._current,) if self._current is not None else ()

    def next_deadline(self) -> Optional[float]:
        return self._current.deadline if self._current is not None else None

    def feed(self, server: Sequence, payload: bytes, now: float) -> bool:
        """Offer a reply that arrived from `server`; True if it was accepted."""
        query = self._current
        if query is None or not _same_server(server, query.server):
            return False
        try:
            reply = parse_message(payload)
        except DNSFormatError:
            return False            # garbled or forged: keep waiting for the real one
        if not self._matches(reply):
            return False
        self._current = None
        self._on_reply(query, reply, now)
        return True

    def on_timeout(self, now: float) -> None:
        query = self._current
        if query is not None and now >= query.deadline:
            self._next_server("%s timeout" % _server_text(query.server), now)

    def on_error(self, query: Query, reason: str, now: float) -> None:
        """The driver could not send or receive `query` (refused, reset, unreachable...)."""
        if query is self._current:
            self._next_server("%s %s" % (_server_text(query.server), reason), now)

    # -- transitions ------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        servers = list(self._conf.nameservers)
        if self._conf.rotate and servers:
            first = self._rng.randrange(len(servers))
            servers = servers[first:] + servers[:first]
        self._plan = iter(servers * max(1, self._conf.attempts))
        self._next_server("", now)

    def _next_server(self, failure: str, now: float) -> None:
        if failure:
            self._failures.append(failure)
        self._current = None
        server = next(self._plan, None)
        if server is None:
            self._fail("no usable answer (%s)" % (", ".join(self._failures) or "no servers"))
            return
        self._send(server, "udp", now)

    def _send(self, server: Server, transport: str, now: float) -> None:
        self._qid = self._rng.getrandbits(16)
        try:
            payload = build_query(self._qid, self._qname, self.qtype)
        except ValueError as exc:
            self._fail(str(exc))
            return
        self._current = Query(server, transport, payload, now + self._conf.timeout)
        self._sends.append(self._current)

    def _matches(self, reply: Message) -> bool:
        question = Question(self._qname, self.qtype)
        return (reply.qr and reply.id == self._qid and reply.opcode == 0
                and len(reply.questions) == 1
                and reply.questions[0]._replace(name=name_key(reply.questions[0].name)) == question)

    def _on_reply(self, query: Query, reply: Message, now: float) -> None:
        server = _server_text(query.server)
        if reply.tc and query.transport == "udp":
            self._send(query.server, "tcp", now)     # RFC 1035 section 4.2.1, RFC 7766
        elif reply.rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
            self._next_server("%s %s" % (server, RCODE_NAMES.get(reply.rcode, reply.rcode)), now)
        elif (reply.rcode == RCODE_NOERROR and not reply.answers and not reply.aa
              and not reply.ra and not any(r.rtype == TYPE_SOA for r in reply.authority)):
            self._next_server("%s lame referral" % server, now)   # as Go's checkHeader
        else:
            self._on_answer(reply, now)

    def _on_answer(self, reply: Message, now: float) -> None:
        canonical, chain = _follow_cnames(reply.answers, self._qname, self.qtype)
        self._chain.extend(chain)
        if len(self._chain) > MAX_CNAME_HOPS:
            self._fail("CNAME chain longer than %d" % MAX_CNAME_HOPS)
            return
        records = tuple(r for r in reply.answers if r.rtype == self.qtype
                        and r.rclass == CLASS_IN and name_key(r.name) == canonical)
        if chain and not records and reply.rcode == RCODE_NOERROR:
            self._qname = canonical        # the chain goes on outside this reply: ask for it
            self._start(now)
            return
        ttls = [r.ttl for r in self._chain] + [r.ttl for r in records]
        if not records:
            ttls += [r.ttl for r in reply.authority if r.rtype == TYPE_SOA]
        self.done = True
        self.result = Answer(self.name, self.qtype, reply.rcode, canonical, records,
                             reply.additional, _min_ttl(ttls))

    def _fail(self, reason: str) -> None:
        self._current = None
        self.done = True
        self.error = DNSLookupError("%s %s: %s" % (
            self.name, TYPE_NAMES.get(self.qtype, self.qtype), reason))


def _server_text(server: Server) -> str:
    host, port = server
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# ---------------------------------------------------------------------------------------------
# Composite machines: several lookups in flight at once, same driving interface
# ---------------------------------------------------------------------------------------------


class _Group:
    """Runs child machines concurrently; a subclass reacts to each finished child in
    `_child_done` (possibly starting more) and sets `result`/`error` in `_finish`."""

    def __init__(self) -> None:
        self.done = False
        self.result = None  # type: object
        self.error = None  # type: Optional[DNSLookupError]
        self._children = []  # type: List

    def take_sends(self) -> List[Query]:
        return [query for child in self._children for query in child.take_sends()]

    def waiting(self) -> Tuple[Query, ...]:
        return tuple(query for child in self._children for query in child.waiting())

    def next_deadline(self) -> Optional[float]:
        deadlines = [child.next_deadline() for child in self._children]
        return min((d for d in deadlines if d is not None), default=None)

    def feed(self, server: Sequence, payload: bytes, now: float) -> bool:
        for child in self._children:
            if child.feed(server, payload, now):
                self._settle(now)
                return True
        return False

    def on_timeout(self, now: float) -> None:
        for child in self._children:
            child.on_timeout(now)
        self._settle(now)

    def on_error(self, query: Query, reason: str, now: float) -> None:
        for child in self._children:
            child.on_error(query, reason, now)
        self._settle(now)

    def _spawn(self, child: object) -> None:
        self._children.append(child)

    def _settle(self, now: float) -> None:
        # A child may finish the moment it is spawned (an IP literal, no servers): loop.
        while not self.done:
            finished = [child for child in self._children if child.done]
            if not finished:
                break
            self._children = [child for child in self._children if not child.done]
            for child in finished:
                self._child_done(child, now)
        if self.done:
            self._children = []     # whatever is still in flight is moot now
        elif not self._children:
            self.done = True
            self._finish()

    def _child_done(self, child, now: float) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class Addresses(NamedTuple):
    name: str
    addresses: Tuple[str, ...]     # A records first, then AAAA
    ttl: Optional[int]             # None for literals and /etc/hosts entries
    source: str                    # "literal", "hosts" or "dns"

    @property
    def min_ttl(self) -> Optional[int]:
        """`ttl` under the name Discovery uses: the caller schedules either result alike."""
        return self.ttl


class AddressLookup(_Group):
    """Resolve a host name to addresses: an IP literal as it is; /etc/hosts first, as the C
    library does; then A and AAAA concurrently for each name of the search list in turn
    (`search_names`), stopping at the first name that has any address."""

    def __init__(self, name: str, conf: ResolvConf, rng: random.Random, now: float,
                 hosts: Optional[Mapping[str, Tuple[str, ...]]] = None) -> None:
        super().__init__()
        self.name = name
        self._conf, self._rng = conf, rng
        self._candidates = iter(search_names(name, conf))
        self._answers = []  # type: List[object]
        self._problems = []  # type: List[str]
        literal = _ip_text(name.strip("[]"))
        known = (hosts or {}).get(name_key(name))
        if literal is not None or known:
            self.done = True
            self.result = Addresses(name, (literal,) if literal else tuple(known or ()), None,
                                    "literal" if literal else "hosts")
            return
        self._next_candidate(now)
        self._settle(now)

    def _next_candidate(self, now: float) -> None:
        candidate = next(self._candidates, None)
        if candidate is not None:
            self._answers = []
            self._spawn(Lookup(candidate, TYPE_A, self._conf, self._rng, now))
            self._spawn(Lookup(candidate, TYPE_AAAA, self._conf, self._rng, now))

    def _child_done(self, child: Lookup, now: float) -> None:
        self._answers.append(child.result or child.error)
        if child.error is not None:
            self._problems.append(str(child.error))
        if len(self._answers) < 2:
            return
        answers = sorted((a for a in self._answers if isinstance(a, Answer)),
                         key=lambda answer: answer.qtype)
        addresses = tuple(str(v) for answer in answers for v in answer.values)
        if addresses:
            ttl = _min_ttl(answer.ttl for answer in answers
                           if answer.records and answer.ttl is not None)
            self.result = Addresses(self.name, addresses, ttl, "dns")
            self.done = True
        else:
            self._next_candidate(now)   # none left: _settle() finds no children and finishes

    def _finish(self) -> None:
        if self.result is None:
            self.error = DNSLookupError("%s: no address (%s)" % (
                self.name, "; ".join(self._problems) or "no A or AAAA records"))


# ---------------------------------------------------------------------------------------------
# etcd's SRV discovery
# ---------------------------------------------------------------------------------------------


def srv_names(domain: str, service_name: str = "") -> Tuple[Tuple[str, bool], Tuple[str, bool]]:
    """The SRV names etcd asks for `--discovery-srv DOMAIN [--discovery-srv-name NAME]`, each
    with its `secure` flag: ((`_etcd-client-ssl[-NAME]._tcp.DOMAIN`, True),
    (`_etcd-client[-NAME]._tcp.DOMAIN`, False))."""
    suffix = "-" + service_name if service_name else ""
    domain = name_key(domain)
    return (("_etcd-client-ssl%s._tcp.%s" % (suffix, domain), True),
            ("_etcd-client%s._tcp.%s" % (suffix, domain), False))


class SRVEndpoint(NamedTuple):
    target: str                    # the SRV target, no trailing dot (a TLS server name)
    addresses: Tuple[str, ...]
    port: int
    priority: int
    weight: int
    secure: bool                   # from an _etcd-client-ssl record
    ttl: Optional[int]             # min of the SRV TTL and the address TTLs


class Discovery(NamedTuple):
    endpoints: Tuple[SRVEndpoint, ...]   # in the order of `names`, then of each SRV answer
    problems: Tuple[str, ...]            # what went wrong on the way, for the logs

    @property
    def min_ttl(self) -> Optional[int]:
        """The smallest TTL of the records behind `endpoints` (SRV, CNAME, A/AAAA or glue): when
        the first of them may have changed.  Negative answers (a name without records) and the
        records of targets that did not resolve are not counted; None if nothing had a TTL."""
        return _min_ttl(endpoint.ttl for endpoint in self.endpoints if endpoint.ttl is not None)


def _glue(answer: Answer, target: str) -> Tuple[Tuple[str, ...], Optional[int]]:
    records = [r for r in answer.additional if r.rtype in (TYPE_A, TYPE_AAAA)
               and r.rclass == CLASS_IN and name_key(r.name) == target]
    records.sort(key=lambda record: record.rtype)
    return tuple(str(r.rdata) for r in records), _min_ttl(r.ttl for r in records)


class SRVDiscovery(_Group):
    """Look up the SRV `names` (pairs of name and secure flag, see `srv_names`) concurrently,
    then the addresses of every target: /etc/hosts first, else the A/AAAA glue of the SRV
    reply, else A and AAAA lookups (all concurrently; targets are absolute names).  Fails
    only if no name yields any SRV record; targets that do not resolve become `problems`."""

    def __init__(self, names: Sequence[Tuple[str, bool]], conf: ResolvConf,
                 rng: random.Random, now: float,
                 hosts: Optional[Mapping[str, Tuple[str, ...]]] = None) -> None:
        super().__init__()
        self.names = tuple(names)
        self._conf, self._rng, self._hosts = conf, rng, hosts or {}
        self._secure = {}  # type: Dict[str, bool]
        self._outcomes = {}  # type: Dict[str, str]
        self._stubs = []  # type: List[Tuple[Record, bool]]
        self._asked = set()  # type: set
        self._resolved = {}  # type: Dict[str, Tuple[Tuple[str, ...], Optional[int]]]
        self._problems = []  # type: List[str]
        for name, secure in self.names:
            self._secure[name_key(name)] = secure
            self._spawn(Lookup(name, TYPE_SRV, conf, rng, now))
        self._settle(now)

    def _child_done(self, child, now: float) -> None:
        if isinstance(child, AddressLookup):
            target = name_key(child.name)
            if child.error is not None:
                self._problems.append(str(child.error))
            else:
                self._resolved[target] = (child.result.addresses, child.result.ttl)
        elif child.error is not None:
            self._outcomes[child.name] = str(child.error)
        else:
            self._on_srv_answer(child.result, now)

    def _on_srv_answer(self, answer: Answer, now: float) -> None:
        self._outcomes[answer.name] = (RCODE_NAMES[answer.rcode] if answer.rcode
                                       else "%d SRV records" % len(answer.records))
        for record in answer.records:
            target = name_key(record.rdata.target)
            if not target:
                continue        # RFC 2782: a target of "." means "no such service here"
            self._stubs.append((record, self._secure[answer.name]))
            if target in self._asked or target in self._hosts:
                continue
            self._asked.add(target)
            glue = _glue(answer, target)
            if glue[0]:
                self._resolved[target] = glue
            else:
                self._spawn(AddressLookup(target + ".", self._conf, self._rng, now))

    def _endpoint(self, record: Record, secure: bool) -> Optional[SRVEndpoint]:
        srv = record.rdata
        target = name_key(srv.target)
        if target in self._hosts:
            addresses, ttls = self._hosts[target], [record.ttl]
        elif target in self._resolved:
            addresses, address_ttl = self._resolved[target]
            ttls = [record.ttl] if address_ttl is None else [record.ttl, address_ttl]
        else:
            return None
        return SRVEndpoint(target, addresses, srv.port, srv.priority, srv.weight, secure,
                           min(ttls))

    def _finish(self) -> None:
        if not self._stubs:
            self.error = DNSLookupError("no SRV records: %s" % "; ".join(
                "%s: %s" % (name, self._outcomes.get(name_key(name), "?"))
                for name, _ in self.names))
            return
        endpoints = [self._endpoint(record, secure) for record, secure in self._stubs]
        self.result = Discovery(tuple(e for e in endpoints if e is not None),
                                tuple(self._problems))


# ---------------------------------------------------------------------------------------------
# A blocking driver, for start-up (the gateway's reactor drives the same machines itself)
# ---------------------------------------------------------------------------------------------


class _Exchange:
    """One query's socket: a fresh one per query, so the kernel picks a fresh source port."""

    def __init__(self, query: Query, selector: selectors.BaseSelector) -> None:
        self.query = query
        self.sock = socket.socket(query.family, socket.SOCK_DGRAM if query.transport == "udp"
                                  else socket.SOCK_STREAM)
        self._selector = selector
        self._unsent = query.wire
        self._frames = TCPFrameReader()
        try:
            self._start()
        except OSError:
            self.sock.close()
            raise

    def _start(self) -> None:
        self.sock.setblocking(False)
        if self.query.transport == "udp":
            self.sock.connect(self.query.server)   # replies from anyone else never reach us
            self.sock.send(self._unsent)
            self._selector.register(self.sock, selectors.EVENT_READ, self)
        else:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.connect_ex(self.query.server)
            self._selector.register(self.sock, selectors.EVENT_WRITE, self)

    def ready(self, machine, now: float) -> None:
        """The socket is readable or writable: move the exchange on, telling the machine."""
        if self._unsent and self.query.transport == "tcp":
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
            self._unsent = self._unsent[self.sock.send(self._unsent):]
            if not self._unsent:
                self._selector.modify(self.sock, selectors.EVENT_READ, self)
            return
        if self.query.transport == "udp":
            data, source = self.sock.recvfrom(65535)
            machine.feed(source, data, now)
            return
        data = self.sock.recv(65535)
        if not data:
            raise ConnectionResetError("connection closed before the reply")
        message = self._frames.feed(data)
        if message is not None:
            machine.feed(self.query.server, message, now)

    def close(self) -> None:
        self._selector.unregister(self.sock)
        self.sock.close()


def _step(machine, selector: selectors.BaseSelector, exchanges: Dict[Query, _Exchange],
          clock: Callable[[], float]) -> None:
    for query in machine.take_sends():
        try:
            exchanges[query] = _Exchange(query, selector)
        except OSError as exc:
            machine.on_error(query, exc.strerror or str(exc), clock())
    deadline = machine.next_deadline()
    timeout = None if deadline is None else max(0.0, deadline - clock())
    for key, _ in selector.select(timeout):
        exchange = key.data
        try:
            exchange.ready(machine, clock())
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:       # refused (ICMP), reset, unreachable: the next server
            machine.on_error(exchange.query, exc.strerror or str(exc), clock())
    machine.on_timeout(clock())
    waiting = machine.waiting()
    for query in [query for query in exchanges if query not in waiting]:
        exchanges.pop(query).close()


def resolve_blocking(machine, clock: Callable[[], float] = time.monotonic):
    """Run a machine (Lookup, AddressLookup, SRVDiscovery) to the end with ordinary sockets and
    return its result, or raise its DNSLookupError.  Build the machine with `now=clock()`."""
    exchanges = {}  # type: Dict[Query, _Exchange]
    with selectors.DefaultSelector() as selector:
        try:
            while not machine.done:
                if machine.next_deadline() is None and not machine.done:
                    raise RuntimeError("%r is neither done nor waiting" % (machine,))
                _step(machine, selector, exchanges, clock)
        finally:
            for exchange in exchanges.values():
                exchange.close()
    if machine.error is not None:
        raise machine.error
    return machine.result
