"""Fixtures: the real `stoa` binary on free loopback ports, and stomp.py connections to it
over TCP and WebSocket for each STOMP version."""

import os
import pathlib
import queue
import shutil
import subprocess
import tempfile

import pytest
import stomp
from stomp.adapter.ws import WSTransport
from stomp.connect import BaseConnection
from stomp.protocol import Protocol10, Protocol11, Protocol12

ROOT = pathlib.Path(__file__).resolve().parents[2]
WAIT = 10  # seconds any single expectation may take


def stoa_bin():
    path = os.environ.get("STOA_BIN") or str(ROOT / "target" / "debug" / "stoa")
    assert os.path.exists(path), f"{path} is missing: run `cargo build -p broker` first"
    return path


class Broker:
    """A running stoa, stopped by `stop()`."""

    def __init__(self, *args, data_dir=None):
        self.args = args
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="stoa-py-")
        self._start()

    def _start(self, http="127.0.0.1:0", stomp="127.0.0.1:0"):
        args = self.args
        self.proc = subprocess.Popen(
            [stoa_bin(), "--http-listen", http, "--stomp-listen", stomp,
             "--data-dir", self.data_dir, *args],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        fields = dict(w.split("=", 1) for w in line.split()[1:])
        self.http = fields["http"]
        self.stomp_port = int(fields["stomp"].rsplit(":", 1)[1])
        self.http_port = int(self.http.rsplit(":", 1)[1])

    def restart(self):
        """SIGTERM (a graceful stop), then start again on the same data directory."""
        self.proc.terminate()
        assert self.proc.wait(timeout=WAIT) == 0, "stoa did not exit cleanly on SIGTERM"
        # The same ports, so that clients that reconnect find it again.
        self._start(http=self.http, stomp=f"127.0.0.1:{self.stomp_port}")

    def get(self, path):
        """GET over HTTP: (status, parsed JSON body)."""
        import http.client
        import json
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read().decode())

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def broker():
    b = Broker()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def beating_broker():
    """A broker that offers and expects heart-beats every 200 ms."""
    b = Broker("--heart-beat", "200,200")
    yield b
    b.stop()


class Recorder(stomp.ConnectionListener):
    """Collects every frame the connection receives, in order."""

    def __init__(self):
        self.messages = queue.Queue()
        self.receipts = queue.Queue()
        self.errors = queue.Queue()
        self.disconnected = queue.Queue()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_receipt(self, frame):
        self.receipts.put(frame)

    def on_error(self, frame):
        self.errors.put(frame)

    def on_disconnected(self):
        self.disconnected.put(True)

    def message(self):
        return self.messages.get(timeout=WAIT)

    def receipt(self, expected):
        return self.receipt_frame(expected).headers["receipt-id"]

    def receipt_frame(self, expected):
        got = self.receipts.get(timeout=WAIT)
        assert got.headers["receipt-id"] == expected, f"expected receipt {expected}, got {got.headers}"
        return got

    def error(self):
        return self.errors.get(timeout=WAIT)

    def closed(self):
        return self.disconnected.get(timeout=WAIT)


def _ws_class(protocol):
    """A stomp.py connection of `protocol` over its WebSocket transport (stomp.py only
    ships the 1.2 pairing; the others are assembled the same way)."""

    class WSConnection(BaseConnection, protocol):
        def __init__(self, transport, **kwargs):
            BaseConnection.__init__(self, transport)
            protocol.__init__(self, transport, **kwargs)

        def connect(self, *args, **kwargs):
            self.transport.start()
            protocol.connect(self, *args, **kwargs)

        def disconnect(self, receipt=None, headers=None, **keyword_headers):
            protocol.disconnect(self, receipt, headers, **keyword_headers)
            if receipt is not None:
                self.transport.stop()

    return WSConnection


TCP_CLASSES = {"1.0": stomp.StompConnection10, "1.1": stomp.StompConnection11, "1.2": stomp.StompConnection12}
PROTOCOLS = {"1.0": Protocol10, "1.1": Protocol11, "1.2": Protocol12}


def open_conn(broker, transport, version, heartbeats=(0, 0), auto_decode=True, login="py", passcode="secret"):
    """A connected stomp.py connection and its Recorder."""
    conn, recorder = new_conn(broker, transport, version, heartbeats, auto_decode)
    conn.connect(login, passcode, wait=True)
    return conn, recorder


def new_conn(broker, transport, version, heartbeats=(0, 0), auto_decode=True):
    """A stomp.py connection of `version` over `transport` ("tcp" or "ws"), with its
    Recorder as listener, not connected yet."""
    hosts = [("127.0.0.1", broker.stomp_port)]
    kwargs = {} if version == "1.0" else {"heartbeats": heartbeats}
    if transport == "tcp":
        conn = TCP_CLASSES[version](hosts, auto_decode=auto_decode, **kwargs)
    else:
        subprotocol = "v" + version.replace(".", "") + ".stomp"
        # Binary bodies need binary WebSocket messages: a text message must be UTF-8.
        ws = WSTransport([("127.0.0.1", broker.http_port)], ws_path="/ws", auto_decode=auto_decode,
                         header={"Sec-WebSocket-Protocol": subprotocol}, binary_mode=not auto_decode)
        conn = _ws_class(PROTOCOLS[version])(ws, **kwargs)
    recorder = Recorder()
    conn.set_listener("recorder", recorder)
    return conn, recorder
