"""The paper's names for the API (RESoLVE 2012, §3.1), as thin aliases of ``fable``'s."""

from __future__ import annotations

from typing import Any

from fable.buffer import Buffer
from fable.connection import Connection
from fable.endpoint import Context, Listener, PlainStream, register
from fable.poll import xpoll

__all__ = [
    "xio_accept",
    "xio_commit",
    "xio_connect",
    "xio_getreadbuf",
    "xio_getwritebuf",
    "xio_listen",
    "xio_recv_many",
    "xio_register_name",
    "xio_release",
    "xio_send_many",
    "xpoll",
]

xio_register_name = register


def xio_listen(ctx: Context, trusted: bool = False, **kw: Any) -> Listener:
    return ctx.listen(trusted=trusted, **kw)


def xio_accept(lst: Listener, timeout: float | None = None) -> Connection:
    return lst.accept(timeout)


def xio_connect(ctx: Context, name: str, **kw: Any) -> Connection | PlainStream:
    return ctx.connect(name, **kw)


def xio_getwritebuf(conn: Connection, size: int, timeout: float | None = None) -> list[Buffer]:
    return conn.getwritebuf(size, timeout)


def xio_commit(conn: Connection, bufs: list[Buffer], length: int, flush: bool = True) -> None:
    conn.commit(bufs, length, flush=flush)


def xio_getreadbuf(conn: Connection) -> list[Buffer]:
    return conn.getreadbuf()


def xio_release(conn: Connection, buf: Buffer) -> None:
    conn.release(buf)


def xio_send_many(conn: Connection, msgs: list[bytes], timeout: float | None = None) -> int:
    return conn.send_many(msgs, timeout)


def xio_recv_many(conn: Connection, max_msgs: int, timeout: float | None = None) -> list[bytes]:
    return conn.recv_many(max_msgs, timeout)
