"""Connection: one side of a FABLE channel, whatever transport carries it.

Legal call order:  open -> [getwritebuf -> commit|abort | send | getreadbuf -> release | recv]*
                        -> close -> closed
A connection inherited by a forked child is *invalid* there: every call raises ``FableError``,
and the peer keeps talking to the parent (it sees the parent's close, not the child's).

The per-message methods (``send``, ``recv``, ``getwritebuf``, ``commit``...) are bound straight
to the transport's :class:`~fable.transports.DataPath` when the connection is made, so a call
goes directly to the transport with no Python frame of ours in between; the methods defined below
document the contract (see ``DataPath`` for the full guarantees) and are what you get only after
the connection was closed or invalidated.

Guarantees: messages are delivered whole, in commit order, exactly once; once ``send`` or
``commit(flush=True)`` returns, the message is in the transport and survives this process's exit.
``commit(flush=False)`` keeps messages in this process until ``flush()`` (or ``close()``): flush
before exiting, as with a buffered file. Not guaranteed: that a committed message reached the
peer's application, or that a ``PeerDied`` peer read anything it was sent.
"""

from __future__ import annotations

import io
import os
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

from fable.buffer import Buffer
from fable.config import settings
from fable.errors import ConnectionClosed, FableError
from fable.transports import REGISTRY
from fable.transports.base import ConnectionStats, DataPath
from fable.transports.setup import SetupChannel

__all__ = ["Connection"]

_HOT = (
    "getwritebuf",
    "commit",
    "abort",
    "flush",
    "send",
    "send_many",
    "getreadbuf",
    "release",
    "recv",
    "recv_into",
)

_live: weakref.WeakSet[Connection] = weakref.WeakSet()


def _raiser(exc: Callable[[], BaseException]) -> Callable[..., NoReturn]:
    def dead(*args: Any, **kwargs: Any) -> NoReturn:
        raise exc()

    return dead


class Connection:
    """One side of a connection. Use it from one sending and one receiving thread at a time."""

    def __init__(self, path: DataPath, setup: SetupChannel, role: int = 0) -> None:
        from fable import reconfig

        self._setup = setup
        self._state = "open"
        self._switcher = reconfig.Switcher(self, path, setup, role)
        self._bind(path)
        _live.add(self)
        reconfig.watch(self)

    @property
    def _path(self) -> DataPath:
        """The path being read now (the one the peer's messages arrive on first)."""
        return self._switcher.rx[0]

    def _bind(self, path: DataPath) -> None:
        d = self.__dict__
        for name in _HOT:
            d[name] = getattr(path, name)

    def _unbind(self, exc: Callable[[], BaseException]) -> None:
        dead = _raiser(exc)
        d = self.__dict__
        for name in _HOT:
            d[name] = dead

    # ----------------------------------------------------------------- identity
    @property
    def transport(self) -> str:
        """Canonical name of the transport carrying the connection now (REGISTRY key)."""
        return self._switcher.newest.transport

    @property
    def safe(self) -> bool:
        """True when this side's reads are private copies; False when they are views into
        memory the peer can write (only if this side said ``trusted=True``)."""
        return self._switcher.newest.safe

    @property
    def epoch(self) -> int:
        """Transport generation: 0 at first, +1 at each reconfiguration."""
        return self._switcher.epoch

    @property
    def max_write(self) -> int:
        """The largest ``size`` one ``getwritebuf`` accepts."""
        return self._switcher.tx.max_write

    @property
    def last_switch(self) -> dict[str, Any] | None:
        """The latest reconfiguration: ``{"at", "from", "to", "reason"}``, or None."""
        return self._switcher.last_switch

    # ----------------------------------------------------------------- reconfiguration
    def reconfigure(
        self,
        transport: str,
        safe: bool | None = None,
        *,
        reason: str = "asked for by the application",
        wait: bool = True,
        timeout: float | None = 10.0,
    ) -> None:
        """Move this connection to ``transport`` (a REGISTRY name) without losing a message
        (``fable/reconfig.py`` draws the protocol). ``safe=None`` keeps this side's form where
        the transport has it. ``wait``: return once the peer accepted (``FableError`` if it
        refused: the connection stays as it was); the switch then completes as both sides go
        on reading and writing. ``PermissionDenied`` for unsafe reads without trust."""
        self._check_open()
        self._switcher.reconfigure(transport, safe, reason, wait, timeout)

    def reconfig_fileno(self) -> int:
        """An fd that is readable while a reconfiguration is in progress."""
        self._check_open()
        return self._switcher.fileno()

    @property
    def closed(self) -> bool:
        return self._state != "open"

    # ----------------------------------------------------------------- data (documented here,
    # bound to the DataPath per instance; these bodies only run on a dead connection)
    def getwritebuf(self, size: int, timeout: float | None = None) -> list[Buffer]:
        """Buffers with room for ``size`` bytes; waits for space (back-pressure).
        ``timeout=0`` raises WouldBlock instead of waiting, expiry raises Timeout."""
        return self._path.getwritebuf(size, timeout)

    def commit(
        self, bufs: Sequence[Buffer], nbytes: int, *, flush: bool = True, more: bool = False
    ) -> None:
        """Publish ``nbytes`` of ``bufs`` as one message (``more=True``: it continues in the
        next commit). ``bufs``: buffers of one getwritebuf call, filled in the order it returned
        them; its buffers not passed are dropped. ``flush=False`` batches until ``flush()``;
        with ``flush=True`` the socket transports wait here while the kernel's buffer is full
        (a ring never waits here)."""
        self._path.commit(bufs, nbytes, flush=flush, more=more)

    def abort(self, bufs: Iterable[Buffer]) -> None:
        """Give back uncommitted write buffers; aborting one buffer of a getwritebuf call
        aborts all of that call's buffers."""
        self._path.abort(bufs)

    def flush(self, timeout: float | None = None) -> None:
        """Hand every committed message to the transport, waiting while it is full
        (``timeout=0``: push what fits, WouldBlock if some is left queued)."""
        self._path.flush(timeout)

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message (copied); returns once the transport has it. ``timeout`` bounds the
        wait for room before the message is accepted (WouldBlock/Timeout: nothing was sent)."""
        self._path.send(data, timeout)

    def send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> int:
        """Send several messages with as few transport operations as possible; returns how many
        were accepted (fewer than given only if ``timeout`` expired waiting for space)."""
        return self._path.send_many(msgs, timeout)

    def getreadbuf(self) -> list[Buffer]:
        """Ready fragments without waiting; ``[]`` when none (re-arms ``fileno``).
        Raises NoSpace while too many read buffers are held."""
        return self._path.getreadbuf()

    def release(self, buf: Buffer) -> None:
        """Give back a read buffer (any order)."""
        self._path.release(buf)

    def recv(self, timeout: float | None = None) -> bytes:
        """The next whole message."""
        return self._path.recv(timeout)

    def recv_into(self, buf: bytearray | memoryview, timeout: float | None = None) -> int:
        """Copy the next message into ``buf``; ValueError (nothing lost) if it does not fit."""
        return self._path.recv_into(buf, timeout)

    # ----------------------------------------------------------------- the rest
    def fileno(self) -> int:
        """Edge-style readiness fd: when it signals, read until ``getreadbuf()`` returns ``[]``
        (or ``recv(timeout=0)`` raises WouldBlock). Spurious wake-ups are possible. The same fd
        for the connection's life, across reconfigurations; once it was handed out the
        connection never moves to a spinning transport. Asked for on a connection that spins
        (mempipe-spin has no fd), it first moves the connection to mempipe-adaptive, unless the
        application named the spinning transport itself (``open_pair``,
        ``connect(transport=...)``): then ``io.UnsupportedOperation``."""
        self._check_open()
        sw = self._switcher
        if not sw.fd_out and REGISTRY[sw.newest.transport].caps.spins:
            if sw.forced:
                raise io.UnsupportedOperation(
                    f"{sw.newest.transport} spins and has no readiness fd (it was named by the "
                    "application; the library would have moved to mempipe-adaptive)"
                )
            self.reconfigure(
                "mempipe-adaptive",
                reason="fileno() was asked for: a readiness fd needs a transport that sleeps",
            )
        return sw.read_fileno()

    def _poll_prepare(self) -> bool:
        if self._state != "open":
            return True  # reading raises: the caller should find out
        return self._path.poll_prepare()

    def _write_fileno(self) -> int | None:
        return self._switcher.tx.write_fileno() if self._state == "open" else None

    async def arecv(self) -> bytes:
        """The next message, for asyncio (waits on ``fileno()`` with the running loop)."""
        from fable.poll import arecv

        return await arecv(self)

    async def asend(self, data: bytes | bytearray | memoryview) -> None:
        """Send one message, for asyncio: waits for room without blocking the loop."""
        from fable.poll import asend

        await asend(self, data)

    def __aiter__(self) -> AsyncIterator[bytes]:
        """``async for msg in conn``: messages until the peer closes."""
        from fable.poll import aiter_messages

        return aiter_messages(self)

    def stats(self) -> ConnectionStats:
        """A frozen snapshot of this side's counters (over every epoch)."""
        return self._switcher.stats()

    def close(self) -> None:
        """Flush (up to FABLE_CLOSE_LINGER s), send the close frame, free everything.
        Idempotent; the peer reads every message first, then gets ConnectionClosed."""
        if self._state != "open":
            return
        self._state = "closed"
        self._unbind(lambda: ConnectionClosed("connection is closed"))
        _live.discard(self)
        from fable import reconfig

        reconfig.unwatch(self)
        try:
            self._switcher.close(settings().close_linger_s)
        finally:
            self._setup.close()

    def _forked(self) -> None:
        """In a forked child: drop the inherited handles silently and refuse every call."""
        if self._state != "open":
            return
        self._state = "invalid"
        self._unbind(
            lambda: FableError("this connection was inherited across fork(); it is the parent's")
        )
        self._switcher.forget()

    def _check_open(self) -> None:
        if self._state == "closed":
            raise ConnectionClosed("connection is closed")
        if self._state == "invalid":
            raise FableError("this connection was inherited across fork(); it is the parent's")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        """Messages until the peer closes (ConnectionClosed ends the loop; PeerDied raises)."""
        from fable.errors import PeerDied

        while True:
            try:
                yield self.recv()
            except PeerDied:
                raise
            except ConnectionClosed:
                return

    def __repr__(self) -> str:
        return (
            f"<fable.Connection {self._state} {self.transport} safe={self.safe} epoch={self.epoch}>"
        )

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            try:
                self._state = "closed"
                self._switcher.close(0.0)
                self._setup.close()
            except Exception:
                pass


def _after_fork_in_child() -> None:
    for conn in list(_live):
        conn._forked()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
