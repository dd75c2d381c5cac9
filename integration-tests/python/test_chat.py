"""Chat rooms, direct messages and the /app and /api replies, through stomp.py over TCP."""

import threading
import urllib.parse

import pytest

from conftest import WAIT, Broker, open_conn


@pytest.fixture
def chat():
    """A broker of its own per test: rooms keep state."""
    b = Broker("--room-history", "5")
    yield b
    b.stop()


def join(conn, rec, room, sub_id="r", **headers):
    """SUBSCRIBE to a room and wait for the receipt; keyword names become header names
    (x_since= is the x-since header)."""
    receipt = f"join-{sub_id}"
    headers = {name.replace("_", "-"): value for name, value in headers.items()}
    conn.subscribe(f"/topic/room.{room}", sub_id, headers={**headers, "receipt": receipt})
    rec.receipt(receipt)


def say(conn, rec, room, body, **headers):
    receipt = f"say-{body}"
    conn.send(f"/topic/room.{room}", body, headers={**headers, "receipt": receipt})
    return rec.receipt_frame(receipt)


def messages(rec, n):
    return [rec.message() for _ in range(n)]


def test_every_kept_message_gets_the_next_seq_and_notices_come_per_user(chat):
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice, arec, "lobby")
    notice = arec.message()
    assert (notice.headers["x-event"], notice.headers["x-sender"], notice.headers["x-seq"]) == ("join", "alice", "1")
    assert "x-timestamp" in notice.headers
    receipt = say(alice, arec, "lobby", "hello")
    assert receipt.headers["x-seq"] == "2" and receipt.headers["message-id"]
    msg = arec.message()
    assert (msg.body, msg.headers["x-seq"], msg.headers["x-sender"]) == ("hello", "2", "alice")
    assert msg.headers["message-id"] == receipt.headers["message-id"]

    # A second session of the same user: no second join notice.
    alice2, arec2 = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice2, arec2, "lobby", x_history="0")
    bob, brec = open_conn(chat, "tcp", "1.2", login="bob")
    join(bob, brec, "lobby")
    assert arec.message().headers["x-sender"] == "bob", "the next notice is bob's join, not alice's again"
    # One of alice's sessions leaves: no leave notice. The last one: one leave notice.
    alice2.unsubscribe("r", receipt="bye-2")
    arec2.receipt("bye-2")
    say(bob, brec, "lobby", "still-here")
    assert arec.message().body == "still-here"
    alice.disconnect(receipt="bye")
    bob_saw = [brec.message() for _ in range(3)]
    assert [m.headers.get("x-event") for m in bob_saw] == ["join", None, "leave"]
    assert bob_saw[2].headers["x-sender"] == "alice"
    assert [int(m.headers["x-seq"]) for m in bob_saw] == [3, 4, 5]


def test_history_replays_before_live_and_the_receipt_comes_after_it(chat):
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice, arec, "hist")
    for i in range(3):
        say(alice, arec, "hist", f"m{i}")
    bob, brec = open_conn(chat, "tcp", "1.2", login="bob")
    bob.subscribe("/topic/room.hist", "h", headers={"x-history": "2", "receipt": "joined"})
    brec.receipt("joined")
    got = [brec.messages.get_nowait() for _ in range(2)]  # already here before the receipt
    assert [m.body for m in got] == ["m1", "m2"]
    assert all(m.headers["x-replay"] == "true" for m in got)
    own_join = brec.message()
    assert (own_join.headers["x-event"], own_join.headers["x-sender"]) == ("join", "bob")
    assert "x-replay" not in own_join.headers, "the joiner's own notice is its first live message"


def test_x_since_replays_what_followed_and_a_gap_notice_when_it_is_gone(chat):
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice, arec, "since")  # seq 1
    for i in range(6):  # seqs 2..7; 5 kept: 3..7
        say(alice, arec, "since", f"m{i}")
    bob, brec = open_conn(chat, "tcp", "1.2", login="bob")
    join(bob, brec, "since", x_since="5")
    assert [m.headers["x-seq"] for m in messages(brec, 2)] == ["6", "7"]
    carol, crec = open_conn(chat, "tcp", "1.2", login="carol")
    join(carol, crec, "since", x_since="1")
    gap = crec.message()
    assert (gap.headers["x-event"], gap.headers["x-first-seq"]) == ("gap", "4")
    replayed = messages(crec, 5)
    assert [m.headers["x-seq"] for m in replayed] == ["4", "5", "6", "7", "8"]


@pytest.mark.parametrize("headers,needle", [
    ({"x-history": "3", "x-since": "1"}, "cannot be used together"),
    ({"x-history": "many"}, "not a number"),
    ({"x-since": "-1"}, "not a number"),
])
def test_bad_replay_headers_are_errors(chat, headers, needle):
    conn, rec = open_conn(chat, "tcp", "1.2", login="x")
    conn.subscribe("/topic/room.lobby", "r", headers=headers)
    assert needle in rec.error().headers["message"]
    rec.closed()


@pytest.mark.parametrize("room", ["a.b", "has space", "", "x" * 65, "semi;colon"])
def test_invalid_room_names_are_errors(chat, room):
    conn, rec = open_conn(chat, "tcp", "1.2", login="x")
    conn.send(f"/topic/room.{room}", "hi")
    assert "room name" in rec.error().headers["message"]


def test_rooms_of_any_script_work(chat):
    conn, rec = open_conn(chat, "tcp", "1.2", login="민수")
    join(conn, rec, "한국어-채팅")
    rec.message()
    say(conn, rec, "한국어-채팅", "안녕하세요")
    msg = rec.message()
    assert (msg.body, msg.headers["x-sender"], msg.headers["destination"]) == ("안녕하세요", "민수", "/topic/room.한국어-채팅")


def test_replay_while_messages_flow_has_no_gap_and_no_duplicate(chat):
    chat_big = Broker("--room-history", "10000")
    try:
        writer, wrec = open_conn(chat_big, "tcp", "1.2", login="writer")
        for i in range(50):
            writer.send("/topic/room.busy", f"early-{i}")
        stop = threading.Event()
        sent = [50]

        def flood():
            while not stop.is_set() and sent[0] < 3000:
                writer.send("/topic/room.busy", f"live-{sent[0]}")
                sent[0] += 1

        thread = threading.Thread(target=flood)
        thread.start()
        readers = []
        for n in range(5):
            conn, rec = open_conn(chat_big, "tcp", "1.2", login=f"reader{n}")
            conn.subscribe("/topic/room.busy", "r", headers={"x-since": "0", "receipt": "in"})
            readers.append((conn, rec))
        stop.set()
        thread.join()
        writer.send("/topic/room.busy", "last", receipt="last")
        wrec.receipt("last")
        for _, rec in readers:
            seqs, bodies = [], []
            while True:
                m = rec.message()
                # Every kept message has a seq, the readers' join notices included.
                seqs.append(int(m.headers["x-seq"]))
                if m.headers.get("x-event"):
                    continue
                bodies.append(m.body)
                if m.body == "last":
                    break
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a duplicate"
            assert bodies[0] == "early-0" and len(bodies) == sent[0] + 1
    finally:
        chat_big.stop()


def test_transient_messages_are_live_only(chat):
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice, arec, "typing")
    arec.message()
    receipt = say(alice, arec, "typing", "typing...", **{"x-transient": "true"})
    assert "x-seq" not in receipt.headers
    live = arec.message()
    assert live.headers["x-transient"] == "true" and "x-seq" not in live.headers
    say(alice, arec, "typing", "real")
    assert arec.message().headers["x-seq"] == "2"
    bob, brec = open_conn(chat, "tcp", "1.2", login="bob")
    join(bob, brec, "typing", x_history="10")
    assert [m.body for m in messages(brec, 2)] == ["", "real"], "the join notice and the chat line only"


def test_a_forged_sender_is_overwritten(chat):
    mallory, mrec = open_conn(chat, "tcp", "1.2", login="mallory")
    join(mallory, mrec, "trust")
    mrec.message()
    mallory.send("/topic/room.trust", "I am the admin", headers={
        "x-sender": "admin", "x-timestamp": "0", "x-seq": "999", "x-event": "join", "x-replay": "true"})
    m = mrec.message()
    assert m.headers["x-sender"] == "mallory"
    assert m.headers["x-seq"] == "2"
    assert int(m.headers["x-timestamp"]) > 0
    assert "x-event" not in m.headers and "x-replay" not in m.headers


def test_a_wildcard_watcher_sees_rooms_without_joining(chat):
    watcher, wrec = open_conn(chat, "tcp", "1.2", login="watcher")
    watcher.subscribe("/topic/room.*", "w", receipt="watching")
    wrec.receipt("watching")
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice, arec, "a")
    say(alice, arec, "a", "hi")
    got = messages(wrec, 2)
    assert [m.headers.get("x-event") for m in got] == ["join", None]
    assert chat.get("/api/rooms/a")[1]["members"] == ["alice"], "the watcher is no member"


def test_app_replies_and_the_http_api_agree(chat):
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice, arec, "lobby")
    bob, brec = open_conn(chat, "tcp", "1.2", login="bob")
    join(bob, brec, "lobby")
    join(bob, brec, "quiet", sub_id="q")
    import json
    alice.subscribe("/app/rooms", "apps", receipt="rooms")
    arec.receipt("rooms")
    reply = [m for m in [arec.messages.get(timeout=WAIT) for _ in range(3)] if m.headers["destination"] == "/app/rooms"][0]
    assert reply.headers["content-type"] == "application/json"
    rooms = json.loads(reply.body)
    assert rooms == {"rooms": [{"room": "lobby", "members": 2, "last_seq": 2}, {"room": "quiet", "members": 1, "last_seq": 1}]}
    assert chat.get("/api/rooms") == (200, rooms)
    alice.subscribe("/app/room.lobby.members", "m", receipt="members")
    arec.receipt("members")
    members = json.loads(arec.message().body)
    assert members == {"room": "lobby", "members": ["alice", "bob"], "last_seq": 2}
    assert chat.get("/api/rooms/lobby") == (200, members)
    status, body = chat.get("/api/rooms/" + urllib.parse.quote("never"))
    assert status == 404 and "error" in body


def test_direct_messages_reach_every_session_of_the_user(chat):
    bob1, b1 = open_conn(chat, "tcp", "1.2", login="bob")
    bob2, b2 = open_conn(chat, "tcp", "1.2", login="bob")
    for conn, rec in ((bob1, b1), (bob2, b2)):
        conn.subscribe("/user/queue/dm", "dm", receipt="dm")
        rec.receipt("dm")
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    alice.send("/user/bob/queue/dm", "psst", receipt="sent")
    arec.receipt("sent")
    for rec in (b1, b2):
        m = rec.message()
        assert (m.body, m.headers["destination"], m.headers["x-sender"]) == ("psst", "/user/queue/dm", "alice")


def test_direct_messages_wait_for_an_offline_user_across_a_restart(chat):
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    for i in range(3):
        alice.send("/user/carol/queue/dm", f"while you were out {i}", receipt=f"s{i}")
        arec.receipt(f"s{i}")
    alice.disconnect(receipt="bye")
    chat.restart()
    carol, crec = open_conn(chat, "tcp", "1.2", login="carol")
    carol.subscribe("/user/queue/dm", "dm", receipt="in")
    crec.receipt("in")
    assert [crec.message().body for _ in range(3)] == [f"while you were out {i}" for i in range(3)]
    # Delivered once: a second session subscribing later gets nothing old.
    carol2, crec2 = open_conn(chat, "tcp", "1.2", login="carol")
    carol2.subscribe("/user/queue/dm", "dm", receipt="in2")
    crec2.receipt("in2")
    carol.send("/user/carol/queue/dm", "note to self", receipt="n")
    crec.receipt("n")
    assert crec2.message().body == "note to self"


def test_history_survives_a_restart_and_seq_goes_on(chat):
    alice, arec = open_conn(chat, "tcp", "1.2", login="alice")
    join(alice, arec, "durable")
    say(alice, arec, "durable", "before the restart")
    alice.disconnect(receipt="bye")  # leave notice: seq 3
    chat.restart()
    bob, brec = open_conn(chat, "tcp", "1.2", login="bob")
    join(bob, brec, "durable", x_history="10")
    got = messages(brec, 4)
    assert [m.headers.get("x-event") or m.body for m in got] == ["join", "before the restart", "leave", "join"]
    assert [m.headers["x-seq"] for m in got] == ["1", "2", "3", "4"]
