"""A hostile or broken peer on the kernel transports: garbage frames fail the connection with
ProtocolError (or PeerDied when it hangs up mid-frame); the victim never hangs past its timeout,
never crashes, and its other connections keep working."""

from __future__ import annotations

import os
import socket
import struct

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import fable
from fable import config
from fable.errors import PeerDied, ProtocolError
from fable.testing import open_fds
from fable.transports import SetupChannel
from fable.transports.stream import F_CLOSE, F_MORE, FRAGMENT, HEADER, MAGIC

# The framed byte stream is the data path of the kernel transports.
STREAM = [name for name, info in fable.REGISTRY.items() if info.caps.wait == "kernel"]


def _victim_and_raw(transport: str) -> tuple[fable.Connection, int, SetupChannel]:
    """A victim connection and the raw write fd of its peer (which speaks no fable at all)."""
    conn, pending = fable.open_pair(transport)
    sock = pending._sock
    assert sock is not None
    pending._sock = None
    ch = SetupChannel(sock)
    hello, fds = ch.next(5)
    assert hello["op"] == "hello"
    if len(fds) > 1:  # pipes: [data in, data out, ...]; the attacker only writes
        for fd in fds[:1] + fds[2:]:
            os.close(fd)
        return conn, fds[1], ch
    return conn, fds[0], ch


def _frame(length: int, flags: int = 0, seq: int = 0, epoch: int = 0, magic: int = MAGIC) -> bytes:
    return HEADER.pack(length, flags, magic, seq, epoch)


CASES = {
    "bad magic": _frame(3, magic=0xBEEF) + b"abc",
    "sequence gap": _frame(1, seq=0) + b"a" + _frame(1, seq=2) + b"b",
    "replayed sequence": _frame(1, seq=0) + b"a" + _frame(1, seq=0) + b"a",
    "oversized frame": _frame(FRAGMENT + 1),
    "unknown flag": _frame(1, flags=0x80) + b"a",
    "close with payload": _frame(4, flags=F_CLOSE) + b"oops",
    "wrong epoch": _frame(1, epoch=7) + b"a",
    "close inside a message": _frame(2, flags=F_MORE) + b"ab" + _frame(0, flags=F_CLOSE, seq=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("transport", STREAM)
def test_malformed_frames(transport: str, case: str) -> None:
    before = open_fds()
    conn, wfd, ch = _victim_and_raw(transport)
    bystander, pending = fable.open_pair("unix")
    other = pending.open()
    try:
        os.write(wfd, CASES[case])
        with pytest.raises(ProtocolError):
            for _ in range(3):  # at most a couple of good messages come first
                conn.recv(timeout=5)
        with pytest.raises(ProtocolError):  # the connection stays failed
            conn.recv(timeout=5)
        with pytest.raises(ProtocolError):
            conn.getreadbuf()
        other.send(b"unaffected")
        assert bystander.recv(timeout=5) == b"unaffected"
    finally:
        os.close(wfd)
        ch.close()
        conn.close()
        bystander.close()
        other.close()
    assert open_fds() == before


@pytest.mark.parametrize("transport", STREAM)
def test_hangup_mid_frame_is_peer_died(transport: str) -> None:
    conn, wfd, ch = _victim_and_raw(transport)
    os.write(wfd, _frame(1) + b"a" + _frame(100, seq=1) + b"only part")
    os.close(wfd)
    ch.close()
    with conn:
        assert conn.recv(timeout=5) == b"a"
        with pytest.raises(PeerDied):
            conn.recv(timeout=5)


def test_endless_fragments_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABLE_MAX_MESSAGE", "100000")
    config.reload()
    conn, wfd, ch = _victim_and_raw("unix")
    with conn:
        sock = socket.socket(fileno=wfd)
        payload = b"f" * 60000
        for seq in range(3):
            sock.sendall(_frame(len(payload), flags=F_MORE, seq=seq) + payload)
        with pytest.raises(ProtocolError, match="FABLE_MAX_MESSAGE"):
            conn.recv(timeout=5)
        sock.close()
        ch.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.binary(min_size=1, max_size=300), prefix=st.integers(0, 3))
def test_fuzzed_stream(garbage: bytes, prefix: int) -> None:
    """Any bytes after some valid frames: good messages, then ProtocolError or PeerDied."""
    conn, wfd, ch = _victim_and_raw("unix")
    sock = socket.socket(fileno=wfd)
    valid = b"".join(_frame(2, seq=i) + struct.pack("<H", i) for i in range(prefix))
    sock.sendall(valid + garbage)
    sock.close()
    ch.close()
    with conn:
        got = 0
        try:
            while True:
                m = conn.recv(timeout=5)
                if got < prefix:
                    assert m == struct.pack("<H", got)
                got += 1
        except (ProtocolError, PeerDied, fable.ConnectionClosed):
            pass
        assert got >= prefix
