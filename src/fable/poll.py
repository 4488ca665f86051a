"""Waiting on connections and plain fds together: ``xpoll``, selectors and asyncio.

``xpoll(fds, conns, timeout)`` is the paper's xpoll: it returns the POSIX fds that are readable
and the connections with a message (or a close, or an error) to read, waiting until at least one
is ready or the timeout expires. Connections are checked first (a message may already sit in user
memory, where no fd can see it); pollable ones are then waited on through ``fileno()``, re-armed
by ``poll_prepare``; a connection without a readiness fd (mempipe-spin) is checked every
millisecond instead, so xpoll never spins a core.

A Connection also works with ``selectors`` directly (it has ``fileno()``), under the edge-style
contract: after it fires, read until ``getreadbuf()`` returns ``[]``.

asyncio: ``Connection.arecv()``, ``asend()`` and ``async for`` wait on the same fds
(``fable/aio.py``).
"""

from __future__ import annotations

import io
import select
import time
from collections.abc import Iterable
from typing import Protocol

from fable.aio import NO_FD_SLICE
from fable.connection import Connection
from fable.errors import ConnectionClosed

__all__ = ["xpoll"]


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _fd(obj: int | _HasFileno) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def xpoll(
    fds: Iterable[int | _HasFileno],
    conns: Iterable[Connection],
    timeout: float | None = None,
) -> tuple[list[int | _HasFileno], list[Connection]]:
    """Wait until fds are readable or connections have something to read.

    Returns ``(ready_fds, ready_conns)`` (the objects passed in); both empty on timeout.
    ``timeout=None`` waits forever, ``0`` only looks. A connection that is closed or failed counts
    as ready (reading it raises)."""
    fd_list = list(fds)
    conn_list = list(conns)
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    poller = select.poll()
    by_fd: dict[int, list[int | _HasFileno]] = {}
    for obj in fd_list:
        fd = _fd(obj)
        by_fd.setdefault(fd, []).append(obj)
        poller.register(fd, select.POLLIN)
    conn_fds: dict[int, list[Connection]] = {}
    unpollable: list[Connection] = []
    for c in conn_list:
        try:
            fd = c.fileno()
        except io.UnsupportedOperation:
            unpollable.append(c)
            continue
        except ConnectionClosed:
            continue
        conn_fds.setdefault(fd, []).append(c)
        poller.register(fd, select.POLLIN)
    while True:
        ready_conns = [c for c in conn_list if c.poll_prepare()]
        if ready_conns:
            return _ready_fds(by_fd), ready_conns
        wait_ms: int | None
        if deadline is None:
            wait_ms = None
        else:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        if unpollable:
            wait_ms = 1 if wait_ms is None else min(wait_ms, int(NO_FD_SLICE * 1000))
        events = poller.poll(wait_ms)
        ready = [obj for fd, _ in events for obj in by_fd.get(fd, [])]
        if ready:
            return ready, [c for c in conn_list if c.poll_prepare()]
        if deadline is not None and time.monotonic() >= deadline:
            return [], []


def _ready_fds(by_fd: dict[int, list[int | _HasFileno]]) -> list[int | _HasFileno]:
    if not by_fd:
        return []
    p = select.poll()
    for fd in by_fd:
        p.register(fd, select.POLLIN)
    return [obj for fd, _ in p.poll(0) for obj in by_fd[fd]]
