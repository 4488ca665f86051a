"""Limits a peer cannot lift (issue 17): a message's fragments are capped in number as well as
bytes, ``recv(timeout)`` returns by its deadline while fragments keep coming (and loses none of
them), and reassembly is linear. The peer here is a fable end that uses the public API in a way
no honest program would: commits of zero or one byte with ``more=True``, without end.

The writer runs in a forked child pinned to CPU 1, the reader in this process pinned to CPU 0
(the spinning transports need their two ends apart)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

import fable
from fable.errors import ProtocolError, Timeout
from fable.testing.harness import wait_readable
from helpers import Child

FORMS = [(t, fable.REGISTRY[t].caps.forms[0]) for t in fable.REGISTRY]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """This process on CPU 0 (its children go to CPU 1); settings set through the returned
    monkeypatch are read again by ``fable.config.reload``."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        yield monkeypatch
    finally:
        os.sched_setaffinity(0, before)
        fable.config.reload()


def _flood(pending: fable.PendingEnd, size: int, seconds: float, end: bool) -> int:
    """In the child: commit ``size``-byte fragments with more=True for ``seconds`` (then the
    last fragment, more=False, if ``end``); the bytes committed."""
    os.sched_setaffinity(0, {1})
    conn = pending.open()
    total, stop = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < stop:
            bufs = conn.getwritebuf(size, timeout=seconds)
            if size:
                bufs[0].data[:size] = b"f" * size
            conn.commit(bufs, size, more=True)
            total += size
        if end:
            conn.send(b"!")
            total += 1
            conn.close()
    except (fable.ConnectionClosed, fable.Timeout):
        pass  # the reader failed the connection and went: the attack is over
    return total


@pytest.mark.parametrize(("transport", "safe"), FORMS)
def test_zero_length_fragments_hit_the_fragment_cap(
    pinned: pytest.MonkeyPatch, transport: str, safe: bool
) -> None:
    """Zero-byte fragments never reach FABLE_MAX_MESSAGE; FABLE_MAX_FRAGMENTS stops them."""
    pinned.setenv("FABLE_MAX_FRAGMENTS", "2000")
    fable.config.reload()
    conn, pending = fable.open_pair(transport, safe=safe)
    writer = Child(lambda: _flood(pending, 0, 20.0, end=False))
    pending.close()
    try:
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="FABLE_MAX_FRAGMENTS=2000"):
            conn.recv(timeout=30)
        assert time.monotonic() - t0 < 20, "the cap did not stop the flood"
    finally:
        conn.close()
        writer.kill()


@pytest.mark.parametrize(("transport", "safe"), FORMS)
def test_recv_looks_at_its_deadline_between_fragments(transport: str, safe: bool) -> None:
    """A message of 2000 zero-byte fragments already queued, read with a deadline that has
    passed: recv raises Timeout after a few of them (before, it only looked at the clock when it
    had to wait, so a peer that keeps fragments coming kept it forever); nothing is lost: the
    next recv returns the message."""
    conn, pending = fable.open_pair(transport, safe=safe)
    other = pending.open()
    try:
        for _ in range(2000):  # batched: the socket transports write them together
            bufs = other.getwritebuf(0, timeout=5)
            other.commit(bufs, 0, more=True, flush=False)
        other.send(b"!")
        wait_readable(conn, 10)
        with pytest.raises(Timeout):
            conn.recv(timeout=1e-6)
        assert conn.recv(timeout=10) == b"!"
    finally:
        other.close()
        conn.close()


@pytest.mark.slow  # 3 s for each transport
@pytest.mark.parametrize(("transport", "safe"), FORMS)
def test_recv_returns_by_its_deadline_while_fragments_keep_coming(
    pinned: pytest.MonkeyPatch, transport: str, safe: bool
) -> None:
    """One-byte fragments for 3 s, then the end of the message: ``recv(timeout=0.5)`` raises
    Timeout within a bound (it never returned before: the deadline was only looked at while
    waiting), and the next recv returns the whole message, not a byte lost."""
    pinned.setenv("FABLE_MAX_FRAGMENTS", str(10**9))
    fable.config.reload()
    conn, pending = fable.open_pair(transport, safe=safe)
    writer = Child(lambda: _flood(pending, 1, 3.0, end=True))
    pending.close()
    try:
        wait_readable(conn, 10)  # the flood has begun (for a spinning transport: 1 ms)
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            conn.recv(timeout=0.5)
        took = time.monotonic() - t0
        assert took < 2.5, f"recv(timeout=0.5) returned after {took:.1f} s"
        message = conn.recv(timeout=30)
        sent = writer.result(30)
        assert len(message) == sent and message.endswith(b"!")
        assert message[:-1] == b"f" * (sent - 1)
    finally:
        conn.close()
        writer.kill()
