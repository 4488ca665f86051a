"""The setup channel and open_pair: spawn as well as fork, and hostile setup input."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

import fable
from fable.connection import PendingEnd, attach
from fable.errors import FableError, ProtocolError, Timeout
from fable.testing import open_fds
from fable.transports import SetupChannel
from fable.transports.channel import SETUP_VERSION

CHILD = textwrap.dedent(
    """
    import sys
    import fable
    conn = fable.attach(int(sys.argv[1]))
    for msg in conn:
        conn.send(msg.upper())
    conn.close()
    """
)


@pytest.mark.parametrize("transport", list(fable.REGISTRY))
def test_spawned_child(transport: str) -> None:
    conn, pending = fable.open_pair(transport)
    fd = pending.fileno()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(fd)], pass_fds=[fd])
    pending.close()
    with conn:
        for word in (b"hello", b"", b"x" * 300_000):
            conn.send(word)
            assert conn.recv(timeout=30) == word.upper()
    assert proc.wait(30) == 0


def test_unknown_transport_and_form() -> None:
    with pytest.raises(ValueError, match="unknown transport"):
        fable.open_pair("carrier-pigeon")
    with pytest.raises(ValueError, match="no unsafe form"):
        fable.open_pair("unix", safe=False)


def _hostile_end(
    record: object, fds: list[int] | None = None, raw: bytes | None = None
) -> PendingEnd:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if raw is None:
        raw = json.dumps(record).encode()
        raw = struct.pack(">I", len(raw)) + raw
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    a.sendmsg([raw], anc)
    a.close()
    return PendingEnd(b)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"v": 99, "op": "hello"}, "version"),
        ({"v": SETUP_VERSION, "op": "bye"}, "expected a hello"),
        (
            {"v": SETUP_VERSION, "op": "hello", "transport": "nope", "safe": True, "params": {}},
            "unknown",
        ),
        (
            {"v": SETUP_VERSION, "op": "hello", "transport": "unix", "safe": "yes", "params": {}},
            "malformed",
        ),
        (
            {"v": SETUP_VERSION, "op": "hello", "transport": "unix", "safe": False, "params": {}},
            "no unsafe",
        ),
        (
            {"v": SETUP_VERSION, "op": "hello", "transport": "unix", "safe": True, "params": {}},
            "expected 1 fd",
        ),
        ([1, 2, 3], "not a JSON object"),
    ],
)
def test_hostile_hello(record: object, match: str) -> None:
    before = open_fds()
    with pytest.raises(ProtocolError, match=match):
        _hostile_end(record).open(timeout=5)
    assert open_fds() == before


def test_hostile_fds_are_checked_and_closed() -> None:
    before = open_fds()
    hello = {"v": SETUP_VERSION, "op": "hello", "safe": True, "params": {}}
    r, w = os.pipe()
    # a pipe where a socket is expected
    with pytest.raises(ProtocolError, match="not a socket"):
        _hostile_end({**hello, "transport": "unix"}, [r]).open(timeout=5)
    # a TCP socket where a unix one is expected
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(ProtocolError, match="wrong kind"):
        _hostile_end({**hello, "transport": "unix"}, [t.fileno()]).open(timeout=5)
    t.close()
    # pipe ends swapped
    with pytest.raises(ProtocolError, match="wrong direction"):
        _hostile_end({**hello, "transport": "pipe"}, [w, r]).open(timeout=5)
    # a socket where a pipe is expected
    s1, s2 = socket.socketpair()
    with pytest.raises(ProtocolError, match="not a pipe"):
        _hostile_end({**hello, "transport": "pipe"}, [s1.fileno(), s2.fileno()]).open(timeout=5)
    s1.close()
    s2.close()
    # too many fds for the record
    with pytest.raises(ProtocolError, match="too many fds"):
        _hostile_end({**hello, "transport": "unix"}, [r] * 20).open(timeout=5)
    os.close(r)
    os.close(w)
    assert open_fds() == before


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x05\x00",
        struct.pack(">I", 1 << 30),
        struct.pack(">I", 10) + b"{not json}",
        b"\xff" * 9,
    ],
)
def test_truncated_or_garbage_setup(raw: bytes) -> None:
    before = open_fds()
    with pytest.raises(ProtocolError):
        _hostile_end(None, raw=raw).open(timeout=5)
    assert open_fds() == before


def test_setup_timeout_and_reuse() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pending = PendingEnd(b)
    with pytest.raises(Timeout):
        pending.open(timeout=0.1)
    with pytest.raises(FableError, match="already opened"):
        pending.open(timeout=0.1)
    a.close()


def test_setup_channel_rejects_wrong_socket() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(ProtocolError):
        SetupChannel(s)
    s.close()


def test_attach_in_process() -> None:
    conn, pending = fable.open_pair("pipe")
    fd = os.dup(pending.fileno())
    pending.close()
    other = attach(fd)
    with conn, other:
        conn.send(b"ping")
        assert other.recv(timeout=5) == b"ping"
        other.close()
        with pytest.raises(fable.ConnectionClosed):
            conn.recv(timeout=5)
