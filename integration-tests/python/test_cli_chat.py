"""`stoa-cli chat` in real pseudo-terminals: two users see each other's lines, /who, /msg,
/join and /quit work, and both survive the broker restarting."""

import os
import pty
import select
import subprocess
import time

import pytest

from conftest import WAIT, Broker, stoa_bin


def cli_bin():
    return os.path.join(os.path.dirname(stoa_bin()), "stoa-cli")


class Terminal:
    """stoa-cli chat on a pseudo-terminal: type lines, wait for text on the screen."""

    def __init__(self, broker, name, room):
        self.fd, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [cli_bin(), "--url", f"ws://{broker.http}/ws", "chat", "--room", room, "--name", name],
            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.screen = ""
        self.seen = 0

    def type(self, line):
        os.write(self.fd, (line + "\n").encode())

    def expect(self, text):
        """Waits until `text` appears after what earlier expects consumed."""
        deadline = time.monotonic() + WAIT
        while True:
            found = self.screen.find(text, self.seen)
            if found >= 0:
                self.seen = found + len(text)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} never appeared; the screen shows:\n{self.screen[self.seen:]}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    self.screen += os.read(self.fd, 65536).decode(errors="replace")
                except OSError:  # the program ended
                    raise AssertionError(f"{text!r} never appeared before exit; screen:\n{self.screen[self.seen:]}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def chat_broker():
    b = Broker()
    yield b
    b.stop()


def test_two_users_chat_in_terminals_and_survive_a_restart(chat_broker):
    alice = Terminal(chat_broker, "alice", "terminal")
    bob = None
    try:
        alice.expect("you are alice in #terminal")
        alice.expect("* alice joined")
        bob = Terminal(chat_broker, "bob", "terminal")
        bob.expect("you are bob in #terminal")
        alice.expect("* bob joined")

        alice.type("hello from alice, 안녕")
        bob.expect("alice: hello from alice, 안녕")
        bob.type("hi alice")
        alice.expect("bob: hi alice")

        bob.type("/who")
        bob.expect("* in #terminal: alice, bob")
        alice.type("/msg bob just between us")
        alice.expect("[dm to bob] just between us")
        bob.expect("[dm] alice: just between us")

        chat_broker.restart()
        # Typed while the connection may still be down: it goes out once the client is back,
        # and bob gets it live or through x-since, whichever comes first.
        alice.type("after the restart")
        bob.expect("alice: after the restart")
        bob.type("still here")
        alice.expect("bob: still here")

        bob.type("/join elsewhere")
        bob.expect("* now in #elsewhere")
        alice.expect("* bob left")
        alice.type("/quit")
        assert alice.proc.wait(timeout=WAIT) == 0
    finally:
        alice.close()
        if bob:
            bob.close()
