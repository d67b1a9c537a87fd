"""A real DNS server on loopback for the tests, answering from a zone given as text.

It listens on UDP and TCP on the same port (port 0 picked by the kernel), runs in one thread
with a selector, and is built on dnslib's message classes, so the code under test is checked
against an independent implementation of the wire format.  Misbehaviour modes:

  normal    answer from the zone (CNAME chains chased, SRV glue in the additional section)
  servfail  every reply is SERVFAIL;  refused: every reply is REFUSED
  silent    never reply (queries are still recorded)
  drop-aaaa answer every query but AAAA, which gets no reply at all (as from some middleboxes)
  truncate  UDP replies are empty with TC set; the full answer only over TCP
  spoof     before the real UDP answer send: a reply with a wrong ID, one with a wrong question,
            the real answer from a different source port, and garbage bytes

`queries` records (transport, name, type) of every query received, for assertions.
"""
import selectors
import socket
import struct
import threading

from dnslib import QTYPE, RCODE, RR, DNSRecord

MODES = ("normal", "servfail", "refused", "silent", "truncate", "spoof", "drop-aaaa")


class DNSTestServer:
    def __init__(self, zone="", mode="normal", host="127.0.0.1", glue=True, chase=True):
        if mode not in MODES:
            raise ValueError(mode)
        self.records = RR.fromZone(zone) if zone.strip() else []
        self.mode, self.host, self.glue, self.chase = mode, host, glue, chase
        self.queries = []
        self._lock = threading.Lock()
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._udp, self._tcp = self._bind_pair()
        self.address = (host, self._udp.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(10)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            sock.close()

    def seen(self):
        with self._lock:
            return list(self.queries)

    # -- sockets ----------------------------------------------------------------------------

    def _bind_pair(self):
        # The same port number for UDP and TCP: take a UDP port, then try TCP on it.
        for _ in range(50):
            udp = socket.socket(self._family, socket.SOCK_DGRAM)
            udp.bind(self.sockaddr(0))
            tcp = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                tcp.bind(self.sockaddr(udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            return udp, tcp
        raise RuntimeError("no port free for both UDP and TCP")

    def sockaddr(self, port):
        """`(host, port)` as bind() needs it: getaddrinfo keeps a zone (`fe80::1%lo`) as the
        scope id, which a plain (host, port) pair loses."""
        return socket.getaddrinfo(self.host, port, self._family, socket.SOCK_DGRAM, 0,
                                  socket.AI_NUMERICHOST)[0][4]

    def _serve(self):
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ, self._on_udp)
            selector.register(self._tcp, selectors.EVENT_READ, self._on_accept)
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            while True:
                for key, _ in selector.select():
                    if key.data is None:
                        return
                    key.data()

    def _on_udp(self):
        data, client = self._udp.recvfrom(65535)
        request = self._parse(data, "udp")
        if self._unanswered(request):
            return
        reply = self._reply(request)
        if self.mode == "truncate":
            reply = request.reply()
            reply.header.tc = 1
        elif self.mode == "spoof":
            self._send_spoofs(request, reply, client)
        self._udp.sendto(reply.pack(), client)

    def _send_spoofs(self, request, reply, client):
        wrong_id = DNSRecord.parse(reply.pack())
        wrong_id.header.id = (request.header.id + 1) & 0xFFFF
        wrong_question = DNSRecord.parse(reply.pack())
        wrong_question.q.qname = "wrong." + str(request.q.qname)
        for fake in (wrong_id, wrong_question):
            self._udp.sendto(fake.pack(), client)
        with socket.socket(self._family, socket.SOCK_DGRAM) as other:
            other.bind((self.host, 0))
            other.sendto(reply.pack(), client)     # right answer, wrong source port
        self._udp.sendto(b"\x00garbage", client)

    def _on_accept(self):
        conn, _ = self._tcp.accept()
        with conn:
            conn.settimeout(5)
            try:
                length = struct.unpack("!H", _recv_exactly(conn, 2))[0]
                request = self._parse(_recv_exactly(conn, length), "tcp")
                if self._unanswered(request):
                    return
                payload = self._reply(request).pack()
                conn.sendall(struct.pack("!H", len(payload)) + payload)
            except (OSError, EOFError):
                return

    def _parse(self, data, transport):
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises several types; a test server just drops garbage
            return None
        with self._lock:
            self.queries.append((transport, str(request.q.qname).rstrip(".").lower(),
                                 QTYPE[request.q.qtype]))
        return request

    def _unanswered(self, request):
        return (request is None or self.mode == "silent"
                or (self.mode == "drop-aaaa" and request.q.qtype == QTYPE.AAAA))

    # -- answers ----------------------------------------------------------------------------

    def _reply(self, request):
        reply = request.reply()
        if self.mode in ("servfail", "refused"):
            reply.header.rcode = RCODE.SERVFAIL if self.mode == "servfail" else RCODE.REFUSED
            return reply
        qtype = request.q.qtype
        name = _key(request.q.qname)
        for _ in range(20):
            cname = self._find(name, QTYPE.CNAME)
            if qtype == QTYPE.CNAME or not cname:
                break
            reply.add_answer(*cname)
            name = _key(cname[0].rdata.label)
            if not self.chase:
                return reply
        answers = self._find(name, qtype)
        reply.add_answer(*answers)
        if not answers and not reply.rr and not any(_key(rr.rname) == name for rr in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
        if not answers:
            reply.add_auth(*[rr for rr in self.records if rr.rtype == QTYPE.SOA])
        if self.glue and qtype == QTYPE.SRV:
            for srv in answers:
                target = _key(srv.rdata.target)
                reply.add_ar(*(self._find(target, QTYPE.A) + self._find(target, QTYPE.AAAA)))
        return reply

    def _find(self, name, qtype):
        return [rr for rr in self.records if _key(rr.rname) == name and rr.rtype == qtype]


def _key(name):
    return str(name).rstrip(".").lower()


def _recv_exactly(conn, count):
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data
