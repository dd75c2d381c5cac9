"""stomp.py against the real broker, over TCP and WebSocket, for STOMP 1.0, 1.1 and 1.2."""

import queue
import socket

import pytest

from conftest import WAIT, open_conn

MATRIX = [(t, v) for t in ("tcp", "ws") for v in ("1.0", "1.1", "1.2")]
ids = [f"{t}-{v}" for t, v in MATRIX]


def subscribe(conn, rec, version, destination, sub_id, ack="auto"):
    """SUBSCRIBE and wait for its receipt."""
    receipt = f"sub-{sub_id}"
    if version == "1.0":
        conn.subscribe(destination, id=sub_id, ack=ack, receipt=receipt)
    else:
        conn.subscribe(destination, sub_id, ack=ack, receipt=receipt)
    rec.receipt(receipt)


def ack(conn, version, frame, sub_id, nack=False, **kw):
    if version == "1.2":
        target = frame.headers["ack"]
        return (conn.nack if nack else conn.ack)(target, **kw)
    message_id = frame.headers["message-id"]
    if version == "1.0":
        assert not nack, "1.0 has no NACK"
        return conn.ack(message_id, **kw)
    return (conn.nack if nack else conn.ack)(message_id, sub_id, **kw)


def drain_until(rec, marker):
    """Messages received before the one whose body is `marker`."""
    before = []
    while True:
        frame = rec.message()
        if frame.body == marker:
            return before
        before.append(frame.body)


@pytest.mark.parametrize("transport,version", MATRIX, ids=ids)
def test_round_trip_with_headers_receipts_and_korean_text(broker, transport, version):
    sub, rec = open_conn(broker, transport, version, login="reader")
    pub, prec = open_conn(broker, transport, version, login="writer")
    subscribe(sub, rec, version, "/topic/chat.py", "a")
    body = "안녕하세요, 세계! héllo"
    pub.send("/topic/chat.py", body, content_type="text/plain;charset=utf-8",
             headers={"x-app": "chat", "receipt": "r1"})
    prec.receipt("r1")
    msg = rec.message()
    assert msg.body == body
    assert msg.headers["destination"] == "/topic/chat.py"
    assert msg.headers["subscription"] == "a"
    assert msg.headers["x-app"] == "chat"
    assert msg.headers["x-sender"] == "writer"
    assert msg.headers["content-type"] == "text/plain;charset=utf-8"
    assert int(msg.headers["content-length"]) == len(body.encode())
    assert "message-id" in msg.headers and "x-timestamp" in msg.headers
    pub.disconnect(receipt="bye")
    sub.disconnect(receipt="bye")


@pytest.mark.parametrize("transport,version", MATRIX, ids=ids)
def test_two_subscriptions_and_unsubscribe(broker, transport, version):
    conn, rec = open_conn(broker, transport, version)
    subscribe(conn, rec, version, "/topic/py.one", "s1")
    subscribe(conn, rec, version, "/topic/py.two", "s2")
    conn.send("/topic/py.one", "first")
    conn.send("/topic/py.two", "second")
    got = {rec.message().headers["subscription"] for _ in range(2)}
    assert got == {"s1", "s2"}
    if version == "1.0":
        conn.unsubscribe(destination="/topic/py.one", id="s1", receipt="u1")
    else:
        conn.unsubscribe("s1", receipt="u1")
    rec.receipt("u1")
    conn.send("/topic/py.one", "lost")
    conn.send("/topic/py.two", "kept")
    msg = rec.message()
    assert (msg.body, msg.headers["subscription"]) == ("kept", "s2")
    conn.disconnect(receipt="bye")


@pytest.mark.parametrize("transport,version", MATRIX, ids=ids)
def test_client_ack_is_cumulative(broker, transport, version):
    conn, rec = open_conn(broker, transport, version)
    subscribe(conn, rec, version, "/topic/py.acks", "c", ack="client")
    for i in range(3):
        conn.send("/topic/py.acks", str(i))
    frames = [rec.message() for _ in range(3)]
    if version == "1.2":
        assert all("ack" in f.headers for f in frames)
    ack(conn, version, frames[1], "c", receipt="a1")
    rec.receipt("a1")
    # The ACK of the second settled the first too: acking it again is an error.
    ack(conn, version, frames[0], "c")
    error = rec.error()
    assert "no unacknowledged message" in error.headers["message"]
    rec.closed()


@pytest.mark.parametrize("transport,version", [m for m in MATRIX if m[1] != "1.0"], ids=[i for i in ids if "1.0" not in i])
def test_client_individual_ack_and_nack(broker, transport, version):
    conn, rec = open_conn(broker, transport, version)
    subscribe(conn, rec, version, "/topic/py.individual", "i", ack="client-individual")
    for i in range(3):
        conn.send("/topic/py.individual", str(i))
    frames = [rec.message() for _ in range(3)]
    ack(conn, version, frames[1], "i", receipt="a1")
    rec.receipt("a1")
    ack(conn, version, frames[0], "i", nack=True, receipt="n0")
    rec.receipt("n0")
    ack(conn, version, frames[2], "i", receipt="a2")
    rec.receipt("a2")
    conn.disconnect(receipt="bye")


@pytest.mark.parametrize("transport,version", MATRIX, ids=ids)
def test_transactions_commit_and_abort(broker, transport, version):
    conn, rec = open_conn(broker, transport, version)
    subscribe(conn, rec, version, "/topic/py.tx", "t")
    tx = conn.begin()
    conn.send("/topic/py.tx", "in-tx-1", transaction=tx)
    conn.send("/topic/py.tx", "in-tx-2", transaction=tx)
    conn.send("/topic/py.tx", "marker-1")
    assert drain_until(rec, "marker-1") == [], "transactional sends arrived before COMMIT"
    conn.commit(tx)
    assert [rec.message().body for _ in range(2)] == ["in-tx-1", "in-tx-2"]
    tx = conn.begin()
    conn.send("/topic/py.tx", "aborted", transaction=tx)
    conn.abort(tx)
    conn.send("/topic/py.tx", "marker-2")
    assert drain_until(rec, "marker-2") == [], "an aborted send was delivered"
    conn.disconnect(receipt="bye")


@pytest.mark.parametrize("transport,version", MATRIX, ids=ids)
def test_header_escaping_per_version(broker, transport, version):
    conn, rec = open_conn(broker, transport, version)
    subscribe(conn, rec, version, "/topic/py.escape", "e")
    conn.send("/topic/py.escape", "x", headers={"x-colon": "a:b:c", "x-back": "c:\\dir"})
    msg = rec.message()
    assert msg.headers["x-colon"] == "a:b:c"
    assert msg.headers["x-back"] == "c:\\dir"
    if version != "1.0":
        # A newline can only travel escaped, which 1.0 cannot do.
        conn.send("/topic/py.escape", "y", headers={"x-lines": "one\ntwo"})
        assert rec.message().headers["x-lines"] == "one\ntwo"
    conn.disconnect(receipt="bye")


@pytest.mark.parametrize("transport,version", MATRIX, ids=ids)
def test_nul_bytes_and_a_1_mib_body(broker, transport, version):
    conn, rec = open_conn(broker, transport, version, auto_decode=False)
    subscribe(conn, rec, version, "/topic/py.bytes", "b")
    with_nuls = b"before\x00middle\x00\x00after"
    conn.send("/topic/py.bytes", with_nuls, content_type="application/octet-stream")
    assert rec.message().body == with_nuls
    mib = bytes(i % 251 for i in range(1024 * 1024))
    conn.send("/topic/py.bytes", mib, content_type="application/octet-stream", receipt="big")
    rec.receipt("big")
    assert rec.message().body == mib
    conn.disconnect(receipt="bye")


@pytest.mark.parametrize("transport", ["tcp", "ws"])
@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_heart_beats_keep_an_idle_connection_alive(beating_broker, transport, version):
    conn, rec = open_conn(beating_broker, transport, version, heartbeats=(200, 200))
    # Idle for well over the broker's 3 x 200 ms window: only heart-beats flow.
    with pytest.raises(queue.Empty):
        rec.disconnected.get(timeout=1.5)
    subscribe(conn, rec, version, "/topic/py.alive", "h")
    conn.disconnect(receipt="bye")


def test_a_silent_client_is_dropped(beating_broker):
    # stomp.py always beats when asked to, so silence is spoken raw.
    s = socket.create_connection(("127.0.0.1", beating_broker.stomp_port), timeout=WAIT)
    s.sendall(b"CONNECT\naccept-version:1.2\nhost:x\nheart-beat:200,0\n\n\x00")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    frames = [f for f in data.split(b"\x00") if f.strip(b"\n")]
    assert frames[0].startswith(b"CONNECTED")
    assert frames[-1].lstrip(b"\n").startswith(b"ERROR")
    assert b"heart-beat timeout" in frames[-1]
