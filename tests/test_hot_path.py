"""The ring transports' per-message calls stay in C (``fable/_core/hot.c``, ``lend.c``): a
blocking ``recv``, ``recv_many``, ``recv_into`` and ``send`` on a ring that is ready, or that the
call waits on, and the buffer API's ``getwritebuf`` (waiting for room too), ``commit``,
``getreadbuf`` and ``release`` for a message in one record, make no call into fable's Python
code, so the fast path cannot silently fall back. And the waits in C keep the slow path's
promises: a peer killed at any moment is ``PeerDied`` within a second, with nothing delivered
twice (slow)."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import fable
from fable.connection import Connection
from fable.errors import PeerDied, WouldBlock
from fable.testing.harness import Child, go_pipe, wait_go

RINGS = ["mempipe-spin", "mempipe-futex", "mempipe-adaptive"]
FABLE_DIR = str(Path(fable.__file__).parent)


@contextmanager
def python_calls() -> Iterator[list[str]]:
    """The calls into fable's Python code made on this thread inside the block."""
    seen: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(FABLE_DIR):
            seen.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def _peer(c: Connection, rfd: int, wfd: int) -> None:
    """Each go byte: a short pause (the parent is then waiting in C), then the next step."""
    os.close(wfd)
    for _ in range(3):  # ready messages: sent at once
        c.send(b"r" * 64)
    wait_go(rfd)
    time.sleep(0.005)
    c.send(b"s" * 64)  # recv waits for it
    wait_go(rfd)
    time.sleep(0.005)
    c.send_many([b"m" * 64] * 5)  # recv_many waits for them
    wait_go(rfd)
    time.sleep(0.005)
    c.send(b"i" * 64)  # recv_into waits for it
    wait_go(rfd)
    time.sleep(0.005)
    n = 0
    while c.recv(timeout=30) != b"end":  # the parent's send waits for room
        n += 1
    c.send(str(n).encode())


@pytest.mark.parametrize("transport", RINGS)
def test_blocking_calls_stay_in_c(transport: str) -> None:
    conn, pending = fable.open_pair(transport)
    rfd, wfd = go_pipe()
    ch = Child(pending, _peer, rfd, wfd)
    os.close(rfd)
    try:
        with conn:
            with python_calls() as calls:
                got = [conn.recv(timeout=30) for _ in range(3)]
            assert got == [b"r" * 64] * 3 and calls == [], calls
            os.write(wfd, b"g")
            with python_calls() as calls:
                got = [conn.recv()]
            assert got == [b"s" * 64] and calls == [], calls
            os.write(wfd, b"g")
            with python_calls() as calls:
                many = conn.recv_many(8)
            assert calls == [] and 1 <= len(many) <= 5, calls
            while len(many) < 5:
                many += conn.recv_many(8, timeout=30)
            assert many == [b"m" * 64] * 5
            os.write(wfd, b"g")
            buf = bytearray(100)
            with python_calls() as calls:
                n = conn.recv_into(buf, timeout=30)
            assert calls == [] and bytes(buf[:n]) == b"i" * 64, calls
            sent = 0
            while True:  # fill the ring
                try:
                    conn.send(b"f" * 4000, timeout=0)
                    sent += 1
                except WouldBlock:
                    break
            os.write(wfd, b"g")
            with python_calls() as calls:
                conn.send(b"f" * 4000)  # waits in C until the peer has read a quarter
            assert calls == [], calls
            conn.send(b"end")
            assert conn.recv(timeout=30) == str(sent + 1).encode()
        ch.expect_success()
    finally:
        os.close(wfd)
        ch.kill()


@pytest.mark.parametrize("safe", [True, False], ids=["safe", "unsafe"])
@pytest.mark.parametrize("transport", RINGS)
def test_buffer_calls_stay_in_c(transport: str, safe: bool) -> None:
    conn, pending = fable.open_pair(transport, safe=safe)
    peer = pending.open(trusted=not safe)
    with conn, peer:
        assert peer.getreadbuf() == []  # (the first empty call looks at the peer: Python)
        with python_calls() as calls:
            for i in range(200):
                bufs = conn.getwritebuf(64)
                bufs[0].data[:8] = i.to_bytes(8, "little")
                conn.commit(bufs, 64)
                got = peer.getreadbuf()
                ok = len(got) == 1 and int.from_bytes(got[0].data[:8], "little") == i
                peer.release(got[0])
                if not ok:
                    break
            empty = [peer.getreadbuf() for _ in range(1000)]
        # an empty getreadbuf lets Python look at the peer every 20 ms: not 1000 times
        assert ok and empty == [[]] * 1000 and len(calls) <= 20, calls
        assert not [c for c in calls if "getwritebuf" in c or "commit" in c or "release" in c]
        # getwritebuf on a full ring waits in C, until a reader on another thread makes room
        full = 0
        while True:
            try:
                conn.commit(conn.getwritebuf(4000, timeout=0), 4000)
                full += 1
            except WouldBlock:
                break
        reader = threading.Timer(0.005, lambda: [peer.recv(timeout=30) for _ in range(full)])
        reader.start()
        with python_calls() as calls:
            bufs = conn.getwritebuf(4000)
        reader.join()
        conn.abort(bufs)
        assert calls == [], calls


@pytest.mark.parametrize("safe", [True, False], ids=["safe", "unsafe"])
def test_the_ring_wraps_in_c(safe: bool) -> None:
    """Messages that do not divide the ring leave padding (or a gap) at its end each time round;
    ``recv``, ``recv_many``, ``recv_into`` and the buffer calls step over it in C: 40 turns of a
    16 KiB ring with 0 calls into Python, each message checked."""
    conn, pending = fable.open_pair("mempipe-spin", safe=safe, options={"capacity": 16384})
    peer = pending.open(trusted=not safe)
    size = 3000  # (a record of 3,024 B: five fit, then 904 B of padding)
    into = bytearray(size)
    with conn, peer:
        assert peer.getreadbuf() == []  # (the first empty call looks at the peer: Python)
        with python_calls() as calls:
            wrong = []
            for i in range(200):
                msg = i.to_bytes(2, "little") * (size // 2)
                if i % 4 == 0:
                    conn.send(msg)
                    got = bytes(peer.recv())
                elif i % 4 == 1:
                    conn.send_many([msg])
                    got = peer.recv_many(4)[0]
                elif i % 4 == 2:
                    conn.send(msg)
                    got = bytes(into[: peer.recv_into(into)])
                else:
                    out = conn.getwritebuf(size)
                    out[0].data[:] = msg
                    conn.commit(out, size)
                    bufs = peer.getreadbuf()
                    got = bytes(bufs[0].data)
                    peer.release(bufs[0])
                if got != msg:
                    wrong.append(i)
        assert wrong == [] and calls == [], (wrong, calls)


def test_the_check_sees_a_fallback() -> None:
    """The control: a ring whose hot path may not wait (``waits(-1, ...)``) waits in Python,
    and ``python_calls`` sees it, so the test above can fail."""
    conn, pending = fable.open_pair("mempipe-futex")
    rfd, wfd = go_pipe()
    ch = Child(pending, _peer, rfd, wfd)
    os.close(rfd)
    try:
        with conn:
            conn._path._rx.waits(-1, 0, 0)  # type: ignore[attr-defined]
            for _ in range(3):
                conn.recv(timeout=30)
            os.write(wfd, b"g")
            with python_calls() as calls:
                assert conn.recv() == b"s" * 64
            assert any("_recv_slow" in c for c in calls), calls
    finally:
        os.close(wfd)
        ch.kill()


def test_the_check_sees_a_buffer_fallback() -> None:
    """The control for the buffer calls: with the gate down they take the Python path."""
    conn, pending = fable.open_pair("mempipe-spin")
    peer = pending.open()
    with conn, peer:
        conn._path._tx.gate = True  # type: ignore[attr-defined]
        peer._path._rx.gate = True  # type: ignore[attr-defined]
        with python_calls() as calls:
            bufs = conn.getwritebuf(64)
            conn.commit(bufs, 64)
            got = peer.getreadbuf()
            peer.release(got[0])
        names = {c.rsplit(":", 1)[1] for c in calls}
        assert {"_getwritebuf", "_commit", "_getreadbuf"} <= names, names


def _killed_mid_stream(transport: str, reading: bool, batch: bool) -> None:
    """10^6 messages between the two processes, the child killed at a random moment: this side
    gets every message once and in order until then, and ``PeerDied`` within 1 s of the kill."""
    n = 1_000_000
    conn, pending = fable.open_pair(transport)

    def sender(c: Connection) -> None:
        for i in range(0, n, 100):
            c.send_many([(i + k).to_bytes(8, "little") + bytes(56) for k in range(100)])
        time.sleep(120)

    def reader(c: Connection) -> None:
        while True:
            c.recv_many(256)

    ch = Child(pending, sender if reading else reader)
    killed: list[float] = []

    def kill() -> None:
        killed.append(time.monotonic())
        os.kill(ch.pid, signal.SIGKILL)

    timer = threading.Timer(random.uniform(0.0, 0.4), kill)
    timer.start()
    try:
        with conn:
            expect = 0
            with pytest.raises(PeerDied):
                if reading:
                    while True:
                        msgs = conn.recv_many(512) if batch else [conn.recv()]
                        for m in msgs:
                            assert int.from_bytes(m[:8], "little") == expect, "out of order"
                            expect += 1
                else:
                    msg = bytes(64)
                    while True:
                        if batch:
                            conn.send_many([msg] * 64)
                        else:
                            conn.send(msg)
            late = time.monotonic() - killed[0]
            assert late < 1.0, f"PeerDied came {late:.2f} s after the kill"
            assert expect <= n
        # the child died of the kill, not of a failure of its own (which is PeerDied too)
        status = ch.join()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    finally:
        timer.cancel()
        ch.kill()
        ch.join()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", RINGS)
def test_peer_killed_at_a_random_moment(transport: str) -> None:
    for reading in (True, False):
        for batch in (False, True):
            _killed_mid_stream(transport, reading, batch)


def test_recv_many_hands_over_what_it_took_before_a_bad_record() -> None:
    """Three good records, then one with a wrong sequence number (a hostile writer): recv_many
    returns the three, and the next call raises ProtocolError (none of the three is lost)."""
    import struct

    from fable.errors import ProtocolError
    from fable.ring import layout as L

    conn, pending = fable.open_pair("mempipe-futex")
    other = pending.open()
    with conn, other:
        for i in range(3):
            other.send(b"%d" % i)
        path: Any = other._path
        pos, off, _ = path._tx.reserve(8)
        path._tx.commit(pos, 8)
        path._tx.publish()
        at = path._tx_base + off - L.RECORD_HEADER + L.REC_SEQ
        struct.pack_into("<Q", path._mv, at, 99)  # the writer rewrites the header it published
        assert conn.recv_many(10, timeout=5) == [b"0", b"1", b"2"]
        with pytest.raises(ProtocolError, match="sequence gap"):
            conn.recv_many(10, timeout=5)
