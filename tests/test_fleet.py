"""Fleet awareness (issue 14): the gateway runs on every host, so whatever it sends on a timer is
multiplied by the fleet. Health checks ask etcd's serializable /health: checked here against a
scripted HTTP upstream (the request line the gateway sends, the replies it parses) and against
real etcd 3.5.1 (which ignores `serializable`).
"""
import json
import socket
import threading
import urllib.request

import pytest

import endpoints as ep
import gateway
from etcd_cluster import etcd_cluster  # noqa: F401  (fixture)
from test_status import StatusGateway, endpoints_of

EVENT_TIMEOUT = 20.0  # waiting for a log line: only "did not hang"


# ---- health checks ------------------------------------------------------------------------------

def test_the_health_request_is_serializable():
    request = gateway.health_request(ep.parse_endpoint("10.0.0.1:2379"))
    assert request.startswith(b"GET /health?serializable=true HTTP/1.1\r\nHost: 10.0.0.1:2379\r\n")
    assert request.endswith(b"\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("reply, expected", [
    # etcd >= 3.5.3 always sends "reason"; 3.5.1 leaves it out when healthy.
    (b'HTTP/1.1 200 OK\r\n\r\n{"health":"true","reason":""}', (True, "")),
    (b'HTTP/1.1 200 OK\r\n\r\n{"health":"true"}', (True, "")),
    (b'HTTP/1.1 503 Service Unavailable\r\n\r\n{"health":"false","reason":"ALARM NOSPACE"}',
     (False, "health 503: ALARM NOSPACE")),
])
def test_serializable_and_linearizable_replies_parse_alike(reply, expected):
    assert gateway.parse_health_reply(reply) == expected


# ---- loopback: a scripted etcd /health ------------------------------------------------------------

class HealthUpstream:
    """An HTTP server standing in for an etcd member's /health: records every request head and
    answers with `reply` (status line and JSON body), then closes, as etcd does for
    `Connection: close`."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.reply = ("200 OK", '{"health":"true","reason":""}')
        self.heads = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self._thread.join(10)

    def requests(self):
        with self._lock:
            return list(self.heads)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._answer(conn)
                except OSError:
                    pass

    def _answer(self, conn):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        with self._lock:
            self.heads.append(head.decode("latin-1"))
            status, body = self.reply
        conn.sendall(("HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                      "\r\n%s" % (status, len(body), body)).encode())


def test_the_gateway_asks_a_serializable_health_and_acts_on_the_reply():
    flags = ["--health-check=etcd", "--health-interval=100ms", "--dial-timeout=500ms"]
    with HealthUpstream() as member, StatusGateway([member.endpoint], *flags) as gw:
        member.reply = ("503 Service Unavailable", '{"health":"false","reason":"ALARM NOSPACE"}')
        line = gw.log.wait_for(r"endpoint unhealthy endpoint=%s" % member.endpoint, EVENT_TIMEOUT)
        assert line and 'reason="health 503: ALARM NOSPACE"' in line, gw.log.text()
        row = endpoints_of(gw)[member.endpoint]
        assert row["healthy"] is False and row["last_error"] == "health 503: ALARM NOSPACE"
        member.reply = ("200 OK", '{"health":"true","reason":""}')  # etcd >= 3.5.3's shape
        assert gw.log.wait_for(r"endpoint healthy endpoint=%s" % member.endpoint, EVENT_TIMEOUT)
        heads = member.requests()
    assert len(heads) >= 5
    for head in heads:
        lines = head.split("\r\n")
        assert lines[0] == "GET /health?serializable=true HTTP/1.1", head
        assert "Host: %s" % member.endpoint in lines and "Connection: close" in lines, head


# ---- real etcd 3.5.1 ------------------------------------------------------------------------------

def test_etcd_answers_the_serializable_health_check(etcd_cluster):  # noqa: F811
    member = etcd_cluster.members[0].client_addr
    with urllib.request.urlopen(f"http://{member}/version", timeout=10) as reply:
        version = json.loads(reply.read())["etcdserver"]
    with urllib.request.urlopen(f"http://{member}/health?serializable=true", timeout=10) as reply:
        assert reply.status == 200, version
        assert json.loads(reply.read())["health"] == "true", version
    # The parameter is new in 3.5.3; older members ignore it and check linearizably, which is
    # what the leaderless-member test of test_health_checks.py relies on.
    assert version.startswith("3."), version
