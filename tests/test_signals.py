"""Blocking calls raise promptly when a signal handler raises (KeyboardInterrupt works)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from types import FrameType

import pytest

import fable
from fable.testing import fill


class Interrupted(Exception):
    pass


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


@pytest.fixture
def alarm() -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, _raise)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("transport", list(fable.REGISTRY))
def test_blocked_recv_raises_on_signal(transport: str, alarm: None) -> None:
    conn, pending = fable.open_pair(transport)
    other = pending.open()
    with conn, other:
        for timeout in (None, 30.0):
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            with pytest.raises(Interrupted):
                conn.recv(timeout=timeout)
            assert time.monotonic() - t0 < 1.0
        other.send(b"still works")
        assert conn.recv(timeout=5) == b"still works"


@pytest.mark.parametrize("transport", list(fable.REGISTRY))
def test_blocked_writer_raises_on_signal(transport: str, alarm: None) -> None:
    conn, pending = fable.open_pair(transport)
    other = pending.open()
    with other, conn:
        chunk = b"w" * 65536
        fill(conn, chunk)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            for _ in range(10_000):
                conn.send(chunk, timeout=30)
        assert time.monotonic() - t0 < 1.0
        other.close()  # the reader goes first, so the writer's close does not linger
