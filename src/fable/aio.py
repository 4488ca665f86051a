"""asyncio for connections: waiting without blocking the event loop.

``Connection.arecv()``, ``arecv_many()``, ``asend()`` and ``async for msg in conn`` come here.
They wait on the connection's own fds with ``loop.add_reader``/``add_writer``: ``fileno()`` for
reading (edge-style, re-armed by ``poll_prepare``), ``write_fileno()`` for room to write; rings,
which have no write fd, retry writes every 0.5 ms, and a connection with no readiness fd
(mempipe-spin) is looked at every millisecond. The functions take anything with those methods
(:class:`Pollable`), so this module sits below the connection that uses it.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from fable.errors import ConnectionClosed, PeerDied, WouldBlock

__all__ = [
    "NO_FD_SLICE",
    "Pollable",
    "aiter_messages",
    "arecv",
    "arecv_many",
    "asend",
    "readable",
]

NO_FD_SLICE = 0.001  # how often a connection without a readiness fd is looked at
_WRITE_RETRY = 0.0005  # how often a ring's writer looks for room (no write fd to wait on)


class Pollable(Protocol):
    """What waiting on a connection needs (``fable.Connection`` has it)."""

    def poll_prepare(self) -> bool: ...
    def fileno(self) -> int: ...
    def write_fileno(self) -> int | None: ...
    def recv(self, timeout: float | None = None) -> bytes: ...
    def recv_many(self, max_msgs: int, timeout: float | None = None) -> list[bytes]: ...
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None: ...


def _waker(fut: asyncio.Future[None]) -> Callable[[], None]:
    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    return wake


async def readable(conn: Pollable) -> None:
    """Return once ``conn`` may have something to read (a spurious return is possible)."""
    if conn.poll_prepare():
        return
    try:
        fd = conn.fileno()
    except io.UnsupportedOperation:
        await asyncio.sleep(NO_FD_SLICE)
        return
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _waker(fut))
    try:
        if conn.poll_prepare():  # it may have changed while we registered
            return
        await fut
    finally:
        loop.remove_reader(fd)


async def arecv(conn: Pollable) -> bytes:
    """The next message, waiting without blocking the event loop."""
    while True:
        try:
            return conn.recv(timeout=0)
        except WouldBlock:
            await readable(conn)


async def arecv_many(conn: Pollable, max_msgs: int) -> list[bytes]:
    """Every message ready (at most ``max_msgs``), at least one, without blocking the loop."""
    while True:
        try:
            return conn.recv_many(max_msgs, timeout=0)
        except WouldBlock:
            await readable(conn)


async def asend(conn: Pollable, data: bytes | bytearray | memoryview) -> None:
    """Send one message, waiting for room without blocking the event loop."""
    while True:
        try:
            conn.send(data, timeout=0)
            return
        except WouldBlock:
            fd = conn.write_fileno()
            if fd is None:
                await asyncio.sleep(_WRITE_RETRY)
                continue
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _waker(fut))
            try:
                await asyncio.wait_for(fut, 0.2)  # re-check now and then: room is approximate
            except TimeoutError:
                pass
            finally:
                loop.remove_writer(fd)


async def aiter_messages(conn: Pollable) -> AsyncIterator[bytes]:
    """Messages until the peer closes (``PeerDied`` propagates)."""
    while True:
        try:
            yield await arecv(conn)
        except PeerDied:
            raise
        except ConnectionClosed:
            return
