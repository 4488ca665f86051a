"""A side asleep on a shared-memory ring is woken by its peer's doorbell (fable/ring/layout.py:
the waiting flag, then a futex wake), not by the end of its wait slice.

The slices are made two minutes long here, so that a sleeper nobody wakes sleeps until its
call's 30 s timeout (and then finds the data there) instead of 200 ms that the rest of the
suite does not notice: the call must return within 10 s. Either role is the sleeper, waiting
for data or for room; the peer acts 0.3 s after the sleeper said it is about to wait (were the
sleeper not asleep by then, the check would pass without testing the wake: it cannot fail for
timing reasons but a 10 s stall)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

import fable
from fable.connection import Connection
from fable.testing import fill
from fable.testing.harness import Child, go_pipe, wait_go
from fable.transports import mempipe

SLEEPERS = ["mempipe-futex", "mempipe-adaptive"]
CHUNK = b"d" * 4096

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def long_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in (mempipe.FUTEX, mempipe.ADAPTIVE):
        monkeypatch.setitem(mempipe.SLICE_NS, mode, 120 * 10**9)


def _sleep(conn: Connection, what: str, go_w: int) -> None:
    """The sleeper: tell the peer, then wait for data or for room; woken, not timed out."""
    if what == "data":
        os.write(go_w, b"g")
        t0 = time.monotonic()
        assert conn.recv(timeout=30) == CHUNK
    else:
        fill(conn, CHUNK)
        os.write(go_w, b"g")
        t0 = time.monotonic()
        conn.send(CHUNK, timeout=30)  # room comes as the peer reads
    took = time.monotonic() - t0
    assert took < 10, f"the sleeper waited {took:.1f} s: its peer's doorbell never woke it"
    conn.send(b"awake")


def _wake(conn: Connection, what: str, go_r: int) -> None:
    """The peer: 0.3 s after the sleeper's word, send a message (or read one)."""
    wait_go(go_r)
    time.sleep(0.3)
    if what == "data":
        conn.send(CHUNK)
    else:
        assert conn.recv(timeout=10) == CHUNK
    while (m := conn.recv(timeout=40)) != b"awake":  # the rest of what the sleeper filled
        assert m == CHUNK


@pytest.mark.parametrize("what", ["data", "room"])
@pytest.mark.parametrize("sleeper", [0, 1], ids=["role0-sleeps", "role1-sleeps"])
@pytest.mark.parametrize("transport", SLEEPERS)
def test_a_sleeping_side_is_woken_by_its_peer(transport: str, sleeper: int, what: str) -> None:
    conn, pending = fable.open_pair(transport)
    go_r, go_w = go_pipe()
    try:
        if sleeper == 0:
            child = Child(pending, _wake, what, go_r)
            with conn:
                _sleep(conn, what, go_w)
        else:
            child = Child(pending, _sleep, what, go_w)
            with conn:
                _wake(conn, what, go_r)
        child.expect_success()
    finally:
        os.close(go_r)
        os.close(go_w)


@pytest.mark.parametrize("transport", SLEEPERS)
def test_an_empty_getreadbuf_arms_readiness_only_for_a_fileno(transport: str) -> None:
    """Arming (the event bit in DATA_WAITING) makes the writer's next publish a system call:
    an empty getreadbuf arms it only once a fileno() exists that someone may wait on."""
    import struct

    from fable.ring import layout as L

    conn, pending = fable.open_pair(transport)
    other = pending.open()
    with conn, other:
        path: Any = conn._path

        def flag() -> int:
            off = path._rx_base + L.DATA_WAITING
            return int(struct.unpack_from("<I", path._mv, off)[0])

        assert conn.getreadbuf() == [] and flag() == 0
        other.send(b"x")
        assert [bytes(b.data) for b in conn.getreadbuf()] == [b"x"]
        conn.fileno()
        assert conn.getreadbuf() == [] and flag() & L.WAITER_EVENT
        other.send(b"y")  # rings the readiness fd
        assert [bytes(b.data) for b in conn.getreadbuf()] == [b"y"]
