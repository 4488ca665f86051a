"""Blocking calls raise promptly when a signal handler raises (KeyboardInterrupt works), in both
forms of every transport, with the peer in this process or in another, and an interrupted send
leaves the stream whole.

The signal is SIGUSR1, sent to the main thread by a timer thread: pytest-timeout's SIGALRM and
its timer stay in place, so a call that ignored signals would fail the test at its timeout
instead of hanging the run."""

from __future__ import annotations

import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

import fable
from fable.errors import WouldBlock
from helpers import RemoteEnd

FORMS = [(t, safe) for t in fable.REGISTRY for safe in fable.REGISTRY[t].caps.forms]
IDS = [f"{t}-{'safe' if safe else 'unsafe'}" for t, safe in FORMS]
WHERE = ["one-process", "two-processes"]
SIG = signal.SIGUSR1
CHUNK = 65536


class Interrupted(Exception):
    pass


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


@pytest.fixture
def interrupt() -> Iterator[Callable[[float], None]]:
    """``interrupt(delay)``: SIGUSR1 to the main thread ``delay`` seconds from now, whose
    handler raises Interrupted."""
    old = signal.signal(SIG, _raise)
    timers: list[threading.Timer] = []
    main = threading.main_thread().ident
    assert main is not None

    def arm(delay: float) -> None:
        t = threading.Timer(delay, signal.pthread_kill, (main, SIG))
        timers.append(t)
        t.start()

    yield arm
    for t in timers:
        t.cancel()
        t.join()
    signal.signal(SIG, old)


def _peer(pending: fable.PendingEnd, where: str) -> Any:
    return RemoteEnd(pending) if where == "two-processes" else pending.open()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize(("transport", "safe"), FORMS, ids=IDS)
def test_blocked_recv_raises_on_signal(
    transport: str, safe: bool, where: str, interrupt: Callable[[float], None]
) -> None:
    conn, pending = fable.open_pair(transport, safe=safe)
    other = _peer(pending, where)
    with conn, other:
        for timeout in (None, 30.0):
            interrupt(0.2)
            t0 = time.monotonic()
            with pytest.raises(Interrupted):
                conn.recv(timeout=timeout)
            assert time.monotonic() - t0 < 1.0
        other.send(b"still works")
        assert conn.recv(timeout=5) == b"still works"


def _message(k: int) -> bytes:
    return struct.pack("<Q", k) * (CHUNK // 8)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize(("transport", "safe"), FORMS, ids=IDS)
def test_blocked_writer_raises_on_signal(
    transport: str, safe: bool, where: str, interrupt: Callable[[float], None]
) -> None:
    """The writer fills the connection, blocks, and is interrupted; the reader then gets every
    message whole and in order (the interrupted one whole or not at all), and the connection
    keeps working both ways."""
    conn, pending = fable.open_pair(transport, safe=safe)
    other = _peer(pending, where)
    with other, conn:
        sent = 0
        while True:  # full: the next send would wait
            try:
                conn.send(_message(sent), timeout=0)
            except WouldBlock:
                break
            sent += 1
        interrupt(0.2)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            for _ in range(10_000):
                conn.send(_message(sent), timeout=30)
                sent += 1
        assert time.monotonic() - t0 < 1.0
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: _read_until(other, b"end", got))
        reader.start()
        conn.send(b"end", timeout=30)
        reader.join(30)
        assert not reader.is_alive()
        assert got[-1] == b"end"
        body = got[:-1]
        assert len(body) in (sent, sent + 1), (len(body), sent)  # the interrupted one: whole or not
        for k, msg in enumerate(body):
            assert msg == _message(k), f"message {k} of {len(body)} is not what was sent"
        other.send(b"back")
        assert conn.recv(timeout=5) == b"back"
        other.close()  # the reader goes first, so the writer's close does not linger


def _read_until(conn: Any, last: bytes, out: list[bytes]) -> None:
    while True:
        msg = conn.recv(timeout=20)
        out.append(msg)
        if msg == last:
            return
