"""stomp.py against the identity and access contract (`../shared/design/security.md`):
accounts (`--auth users`), tokens (`--auth jwt`) and `--acl`, over TCP and WebSocket. Each
refusal is an ERROR and a closed connection, and a bystander keeps receiving."""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import tempfile
import time

import pytest
import stomp

from conftest import WAIT, Broker, new_conn, open_conn, stoa_bin

TRANSPORTS = ["tcp", "ws"]
ACL = """
[[allow]]
users = ["*"]
subscribe = ["/topic/room.*"]
publish = ["/topic/room.*"]

[[deny]]
users = ["*"]
subscribe = ["/topic/room.staff"]
publish = ["/topic/room.staff"]
except = ["@staff"]
"""
DELAY_MS = 200


def add_user(data_dir, name, password, groups=()):
    args = [stoa_bin(), "users", "add", name, "--password-stdin", "--data-dir", data_dir]
    for group in groups:
        args += ["--group", group]
    run = subprocess.run(args, input=password + "\n", text=True, capture_output=True, timeout=WAIT)
    assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def users_broker():
    data = tempfile.mkdtemp(prefix="stoa-py-users-")
    add_user(data, "alice", "correct horse", ["staff"])
    add_user(data, "bob", "battery staple")
    acl = os.path.join(data, "acl.toml")
    with open(acl, "w") as f:
        f.write(ACL)
    b = Broker("--auth", "users", "--acl", acl, "--auth-failure-delay-ms", str(DELAY_MS),
               "--auth-max-failures", "100", data_dir=data)
    yield b
    b.stop()


SECRET = b"the HMAC secret of the stomp.py tests, 32 bytes or more"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims, alg="HS256", secret=SECRET):
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    if alg == "none":
        return f"{head}.{body}."
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


@pytest.fixture(scope="module")
def jwt_broker():
    data = tempfile.mkdtemp(prefix="stoa-py-jwt-")
    secret = os.path.join(data, "secret")
    with open(secret, "wb") as f:
        f.write(SECRET + b"\n")  # trailing whitespace is trimmed
    b = Broker("--auth", "jwt", "--jwt-secret-file", secret, "--auth-failure-delay-ms", str(DELAY_MS),
               "--auth-max-failures", "100", data_dir=data)
    yield b
    b.stop()


def subscribe(conn, rec, destination, sub_id):
    conn.subscribe(destination, sub_id, receipt=f"sub-{sub_id}")
    rec.receipt(f"sub-{sub_id}")


def chat_message(rec):
    """The next room message that is not a join or leave notice."""
    while True:
        frame = rec.message()
        if "x-event" not in frame.headers:
            return frame


def refused(broker, transport, login, passcode):
    """Connects with these credentials, expecting the refusal: its ERROR message and the
    seconds it took."""
    conn, rec = new_conn(broker, transport, "1.2")
    started = time.monotonic()
    with pytest.raises(stomp.exception.ConnectFailedException):
        conn.connect(login, passcode, wait=True)
    error = rec.error()
    elapsed = time.monotonic() - started
    rec.closed()
    return error.headers["message"], elapsed


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_users_the_name_is_proved_and_every_wrong_login_gets_one_answer(users_broker, transport):
    alice, arec = open_conn(users_broker, transport, "1.2", login="alice", passcode="correct horse")
    bob, brec = open_conn(users_broker, transport, "1.2", login="bob", passcode="battery staple")
    subscribe(alice, arec, "/topic/room.py-users", "a")
    for login, passcode in [("bob", "wrong"), ("nobody", "battery staple"), ("bob", "")]:
        message, elapsed = refused(users_broker, transport, login, passcode)
        assert message == "authentication failed"
        assert elapsed >= DELAY_MS / 1000
    # The bystander keeps receiving, and the sender is who logged in, whatever it claims.
    bob.send("/topic/room.py-users", "hi", headers={"x-sender": "alice"})
    frame = chat_message(arec)
    assert frame.body == "hi"
    assert frame.headers["x-sender"] == "bob"
    alice.disconnect()
    bob.disconnect()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_acl_denies_a_private_room_and_the_members_go_on(users_broker, transport):
    alice, arec = open_conn(users_broker, transport, "1.2", login="alice", passcode="correct horse")
    subscribe(alice, arec, "/topic/room.staff", "staff")
    bob, brec = open_conn(users_broker, transport, "1.2", login="bob", passcode="battery staple")
    bob.subscribe("/topic/room.staff", "peek", receipt="peek")
    assert brec.error().headers["message"] == "access denied: /topic/room.staff"
    brec.closed()
    assert brec.receipts.empty(), "a refused SUBSCRIBE gets no receipt"
    bob, brec = open_conn(users_broker, transport, "1.2", login="bob", passcode="battery staple")
    bob.send("/topic/room.staff", "let me in")
    assert brec.error().headers["message"] == "access denied: /topic/room.staff"
    brec.closed()
    alice.send("/topic/room.staff", "staff only", receipt="said")
    arec.receipt("said")
    assert chat_message(arec).body == "staff only"
    alice.disconnect()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_jwt_the_token_is_the_identity_and_bad_ones_are_refused(jwt_broker, transport):
    now = int(time.time())
    carol, crec = open_conn(jwt_broker, transport, "1.2", login="ignored",
                            passcode=token({"sub": "carol", "exp": now + 600}))
    subscribe(carol, crec, "/topic/room.py-jwt", "c")
    dave, _ = open_conn(jwt_broker, transport, "1.2", login="carol",
                        passcode=token({"sub": "dave", "exp": now + 600}))
    dave.send("/topic/room.py-jwt", "signed", headers={"x-sender": "carol"})
    frame = chat_message(crec)
    assert (frame.body, frame.headers["x-sender"]) == ("signed", "dave")
    bad = [
        token({"sub": "eve", "exp": now - 600}),                       # expired beyond the leeway
        token({"sub": "eve", "exp": now + 600}, alg="none"),           # unsigned
        token({"sub": "eve", "exp": now + 600}, secret=b"x" * 40),     # another key
        token({"sub": "eve"}),                                         # no exp
        token({"sub": "eve", "exp": now + 600, "nbf": now + 300}),     # not yet valid
        "not a token",
    ]
    for passcode in bad:
        message, _ = refused(jwt_broker, transport, "eve", passcode)
        assert message == "authentication failed", passcode
    dave.send("/topic/room.py-jwt", "still here")
    assert chat_message(crec).body == "still here"
    carol.disconnect()
    dave.disconnect()
