"""xpoll over fds and connections, selectors, and asyncio, on every transport."""

from __future__ import annotations

import asyncio
import os
import selectors
import threading
import time

import pytest

import fable
from fable.errors import ConnectionClosed

POLLABLE = [n for n, i in fable.REGISTRY.items() if i.caps.pollable]


@pytest.fixture(params=list(fable.REGISTRY))
def pair(request: pytest.FixtureRequest) -> tuple[fable.Connection, fable.Connection]:
    conn, pending = fable.open_pair(request.param)
    return conn, pending.open()


def test_xpoll_mixes_fds_and_connections(pair: tuple[fable.Connection, fable.Connection]) -> None:
    a, b = pair
    r, w = os.pipe()
    with a, b:
        assert fable.xpoll([r], [b], 0) == ([], [])
        t0 = time.monotonic()
        assert fable.xpoll([r], [b], 0.05) == ([], [])
        assert time.monotonic() - t0 >= 0.04
        a.send(b"one")
        assert fable.xpoll([r], [b], 5) == ([], [b])
        assert b.recv(timeout=0) == b"one"
        os.write(w, b"x")
        assert fable.xpoll([r], [b], 5) == ([r], [])
        os.read(r, 1)
        # a message sent while xpoll waits wakes it
        threading.Timer(0.05, a.send, args=(b"later",)).start()
        assert fable.xpoll([r], [b], 5) == ([], [b])
        assert b.recv(timeout=0) == b"later"
        # a message read by recv() (not getreadbuf) leaves xpoll armed correctly
        a.send_many([b"1", b"2"])
        assert fable.xpoll([], [b], 5)[1] == [b]
        assert b.recv(timeout=1) == b"1" and b.recv(timeout=1) == b"2"
        threading.Timer(0.05, a.send, args=(b"3",)).start()
        assert fable.xpoll([], [b], 5)[1] == [b]
        assert b.recv(timeout=0) == b"3"
        # the peer's close makes the connection ready (reading it raises)
        a.close()
        assert fable.xpoll([], [b], 5)[1] == [b]
        with pytest.raises(ConnectionClosed):
            b.recv(timeout=0)
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("transport", POLLABLE)
def test_selectors(transport: str) -> None:
    conn, pending = fable.open_pair(transport)
    other = pending.open()
    with conn, other, selectors.DefaultSelector() as sel:
        sel.register(conn, selectors.EVENT_READ)
        assert sel.select(0) == []
        other.send(b"hi")
        events = sel.select(5)
        assert [k.fileobj for k, _ in events] == [conn]
        got: list[bytes] = []
        while bufs := conn.getreadbuf():
            got.extend(bytes(b.data) for b in bufs)
            for b in bufs:
                conn.release(b)
        assert got == [b"hi"]
        sel.unregister(conn)


def test_asyncio(pair: tuple[fable.Connection, fable.Connection]) -> None:
    a, b = pair

    async def main() -> list[bytes]:
        async def producer() -> None:
            for i in range(200):
                await a.asend(b"%d" % i + b"." * (i * 300))
            a.close()

        task = asyncio.create_task(producer())
        got = [m async for m in b]
        await task
        return got

    with b:
        got = asyncio.run(asyncio.wait_for(main(), 60))
    assert got == [b"%d" % i + b"." * (i * 300) for i in range(200)]


def test_spin_has_no_fileno() -> None:
    conn, pending = fable.open_pair("mempipe-spin")
    other = pending.open()
    with conn, other:
        import io

        with pytest.raises(io.UnsupportedOperation):
            conn.fileno()
