"""xpoll over fds and connections, selectors, and asyncio, on every form of every transport,
with the peer in this process or in a forked child (``helpers.RemoteEnd``)."""

from __future__ import annotations

import asyncio
import os
import selectors
import threading
import time
from typing import Any

import pytest

import fable
from fable.errors import ConnectionClosed
from helpers import RemoteEnd

FORMS = [(t, safe) for t in fable.REGISTRY for safe in fable.REGISTRY[t].caps.forms]
POLLABLE_FORMS = [(t, safe) for t, safe in FORMS if fable.REGISTRY[t].caps.pollable]
WHERE = ["one-process", "two-processes"]


def _ids(forms: list[tuple[str, bool]]) -> list[str]:
    return [f"{t}-{'safe' if safe else 'unsafe'}" for t, safe in forms]


@pytest.fixture(
    params=[(f, w) for f in FORMS for w in WHERE],
    ids=[f"{i}-{w}" for i in _ids(FORMS) for w in WHERE],
)
def pair(request: pytest.FixtureRequest) -> tuple[Any, fable.Connection]:
    """(writer, reader): the writer in this process, or a RemoteEnd in a child."""
    (transport, safe), where = request.param
    conn, pending = fable.open_pair(transport, safe=safe)
    if where == "two-processes":
        return RemoteEnd(pending), conn
    return conn, pending.open()


def _send_later(a: Any, data: bytes) -> None:
    if isinstance(a, RemoteEnd):
        a.send_later(0.05, data)
    else:
        threading.Timer(0.05, a.send, args=(data,)).start()


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
        _send_later(a, b"later")
        assert fable.xpoll([r], [b], 5) == ([], [b])
        assert b.recv(timeout=0) == b"later"
        # a message read by recv() (not getreadbuf) leaves xpoll armed correctly
        a.send_many([b"1", b"2"])
        assert fable.xpoll([], [b], 5)[1] == [b]
        assert b.recv(timeout=1) == b"1" and b.recv(timeout=1) == b"2"
        _send_later(a, b"3")
        assert fable.xpoll([], [b], 5)[1] == [b]
        assert b.recv(timeout=0) == b"3"
        # the peer's close makes the connection ready (reading it raises)
        a.close()
        assert fable.xpoll([], [b], 5)[1] == [b]
        with pytest.raises(ConnectionClosed):
            b.recv(timeout=0)
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize(("transport", "safe"), POLLABLE_FORMS, ids=_ids(POLLABLE_FORMS))
def test_selectors(transport: str, safe: bool, where: str) -> None:
    conn, pending = fable.open_pair(transport, safe=safe)
    other: Any = RemoteEnd(pending) if where == "two-processes" else pending.open()
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


@pytest.mark.parametrize("batched", [False, True], ids=["async-for", "arecv_many"])
def test_asyncio(pair: tuple[Any, fable.Connection], batched: bool) -> None:
    """Every message once and in order, with ``async for`` or with ``arecv_many`` (at most
    max_msgs a call), then the peer's close."""
    a, b = pair
    msgs = [b"%d" % i + b"." * (i * 300) for i in range(200)]

    async def receive() -> list[bytes]:
        if not batched:
            return [m async for m in b]
        got: list[bytes] = []
        while len(got) < len(msgs):
            batch = await b.arecv_many(32)
            assert 1 <= len(batch) <= 32
            got += batch
        with pytest.raises(fable.ConnectionClosed):
            await b.arecv_many(32)
        return got

    async def main() -> list[bytes]:
        async def producer() -> None:
            for m in msgs:
                await a.asend(m)
            a.close()

        if isinstance(a, RemoteEnd):  # the other process sends, then closes
            a.send_all_and_close_later(msgs)
            return await receive()
        task = asyncio.create_task(producer())
        got = await receive()
        await task
        return got

    with b:
        got = asyncio.run(asyncio.wait_for(main(), 60))
    if isinstance(a, RemoteEnd):
        a.close()
    assert got == msgs


def test_spin_has_no_fileno() -> None:
    conn, pending = fable.open_pair("mempipe-spin")
    other = pending.open()
    with conn, other:
        import io

        with pytest.raises(io.UnsupportedOperation):
            conn.fileno()
