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

A connection is made of parts with one job each: the data paths of its epochs and the switch
between them (``fable/epochs.py``), its stable readiness fds (``fable/readiness.py``), its setup
channel watched by the process's control thread (``fable/control.py``). The connection owns the
one place its methods are bound (``bind``). At the bottom of this module: connections between
two processes without a daemon (``open_pair``, ``attach``, ``PendingEnd``, ``initiate``), made
by the handshake of ``fable/handshake.py``.
"""

from __future__ import annotations

import io
import os
import select
import socket
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

from fable import aio, handshake
from fable.buffer import Buffer
from fable.config import settings
from fable.control import control
from fable.epochs import GROUPS, Epochs
from fable.errors import ConnectionClosed, FableError, PeerDied
from fable.readiness import BusyFd, StableFd
from fable.transports import REGISTRY, ConnectionStats, DataPath, SetupChannel
from fable.transports.across import Across

__all__ = ["Connection", "PendingEnd", "attach", "initiate", "open_pair"]

_live: weakref.WeakSet[Connection] = weakref.WeakSet()


class _Refuse:
    """What a closed or invalid connection's data methods are bound to: each raises."""

    def __init__(self, exc: Callable[[], BaseException]) -> None:
        self._exc = exc

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        exc = self._exc

        def refuse(*args: Any, **kwargs: Any) -> NoReturn:
            raise exc()

        return refuse


def _on_channel(ref: weakref.ref[Epochs], events: int) -> bool:
    """The control thread's callback for a connection's setup channel: records to read, or
    (``EPOLLOUT``, watched while records wait to go out) room for them."""
    epochs = ref()
    if epochs is None:
        return False
    if events & select.EPOLLOUT:
        epochs.ch.flush()
    return epochs.on_channel()


def _records_read(ref: weakref.ref[Epochs]) -> None:
    """On the control thread: handle records already read from the setup channel."""
    _on_channel(ref, 0)


class Connection:
    """One side of a connection. Use it from one sending and one receiving thread at a time."""

    def __init__(
        self,
        path: DataPath,
        setup: SetupChannel,
        role: int = 0,
        *,
        trusted: bool | None = None,
        forced: bool = True,
    ) -> None:
        """``path``: this side's first data path; ``setup``: the setup channel; ``role``: 0 on
        the side that set the connection up. ``trusted``: whether this side may read in place
        in later epochs (None: as the first path reads). ``forced``: the application named the
        transport (``fileno()`` on a spinning one raises instead of moving it)."""
        self._setup = setup
        self._state = "open"
        self._forced = forced
        self._fd = StableFd()
        self._busy = BusyFd()
        self._epochs = Epochs(
            path,
            setup,
            role,
            trusted=(not path.safe) if trusted is None else trusted,
            bind=self._bind,
            fd=self._fd,
            busy=self._busy,
        )
        self._bind("all", path)
        _live.add(self)
        ref = weakref.ref(self._epochs)
        ctl = control()
        fd = setup.fileno()
        ctl.watch(fd, lambda ev: _on_channel(ref, ev))
        # records the kernel did not take: the control thread pushes them when there is room
        setup.on_backlog = lambda waiting: ctl.modify(
            fd, select.EPOLLIN | (select.EPOLLOUT if waiting else 0)
        )
        if setup.backlog:
            setup.on_backlog(True)
        # records read by someone else (with the first offer, or by a data path looking at its
        # peer): no event on the channel announces them, so the control thread is told
        setup.on_records = lambda: ctl.call_later(0.0, lambda: _records_read(ref))
        if setup.has_records:
            setup.on_records()

    @property
    def _path(self) -> DataPath:
        """The path being read now (the one the peer's messages arrive on first)."""
        return self._epochs.rx[0]

    def _bind(self, group: str, target: object) -> None:
        """The one place the data methods are bound: each name of ``GROUPS[group]`` to that
        attribute of ``target`` (a path, the switch's write relay, or a refusal), so that a
        call is one call into the transport."""
        d = self.__dict__
        for name in GROUPS[group]:
            d[name] = getattr(target, name)

    # ----------------------------------------------------------------- identity
    @property
    def transport(self) -> str:
        """Canonical name of the transport carrying the connection now (REGISTRY key)."""
        return self._epochs.newest.transport

    @property
    def crosses_hosts(self) -> bool:
        """Whether the peer is on another host (a TCP setup channel: only transports that
        cross hosts, and each switch dials the peer)."""
        return self._setup.across is not None

    @property
    def safe(self) -> bool:
        """True when this side's reads are private copies; False when they are views into
        memory the peer can write (only if this side said ``trusted=True``)."""
        return self._epochs.newest.safe

    @property
    def epoch(self) -> int:
        """Transport generation: 0 at first, +1 at each reconfiguration."""
        return self._epochs.epoch

    @property
    def max_write(self) -> int:
        """The largest ``size`` one ``getwritebuf`` accepts."""
        return self._epochs.tx.max_write

    @property
    def last_switch(self) -> dict[str, Any] | None:
        """The latest reconfiguration: ``{"at", "from", "to", "reason"}``, or None."""
        return self._epochs.last_switch

    # ----------------------------------------------------------------- reconfiguration
    def reconfigure(
        self,
        transport: str,
        safe: bool | None = None,
        *,
        peer_safe: bool | None = None,
        reason: str = "asked for by the application",
        wait: bool = True,
        timeout: float | None = 10.0,
        on_answer: Callable[[FableError | None], None] | None = None,
    ) -> None:
        """Move this connection to ``transport`` (a REGISTRY name) without losing a message
        (``fable/epochs.py`` draws the protocol). ``safe``: this side's form; ``peer_safe``:
        the form asked of the peer (which refuses unsafe reads it does not trust); None: each
        side reads in the most zero-copy form its own trust allows. One switch at a time: this
        waits (``wait``) for the previous one to end on both sides, else raises FableError.
        ``wait``: return once the peer accepted (if it refused, the connection stays as it
        was and this raises with the peer's reason: ``PermissionDenied`` for trust,
        ``ProtocolError`` otherwise); the switch then completes as both sides go on reading
        and writing. ``PermissionDenied`` for unsafe reads without this side's trust.
        ``on_answer(error)`` is called once the peer answers (None: it accepted), on
        whichever thread reads the answer (``wait=False`` callers hear of a refusal so)."""
        self._check_open()
        self._epochs.reconfigure(transport, safe, peer_safe, reason, wait, timeout, on_answer)

    def reconfig_fileno(self) -> int:
        """An fd that is readable while a reconfiguration is in progress."""
        self._check_open()
        with self._epochs.lock:
            self._busy.set(self._epochs.busy)
            return self._busy.fileno()

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
        """Ready fragments without waiting; ``[]`` when none (re-arms ``fileno``). It may
        return fewer than are ready (a safe read from shared memory copies about 1 MiB a call at
        most): call it again until ``[]``. Raises NoSpace while too many read buffers are held."""
        return self._path.getreadbuf()

    def release(self, buf: Buffer) -> None:
        """Give back a read buffer (any order)."""
        self._path.release(buf)

    def recv(self, timeout: float | None = None) -> bytes:
        """The next whole message."""
        return self._path.recv(timeout)

    def recv_many(self, max_msgs: int, timeout: float | None = None) -> list[bytes]:
        """The receiving half of ``send_many``: every whole message ready now, at most
        ``max_msgs``, and at least one (waiting for it as ``recv`` does, with the same
        ``timeout``). An error after the first message ends the list early; the next call
        raises it."""
        return self._path.recv_many(max_msgs, timeout)

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
        ep = self._epochs
        newest = ep.newest.transport
        if not self._fd.handed_out and REGISTRY[newest].caps.spins:
            if self._forced:
                raise io.UnsupportedOperation(
                    f"{newest} spins and has no readiness fd (it was named by the "
                    "application; the library would have moved to mempipe-adaptive)"
                )
            self.reconfigure(
                "mempipe-adaptive",
                reason="fileno() was asked for: a readiness fd needs a transport that sleeps",
            )
        with ep.lock:
            return self._fd.fileno(ep.rx)

    @property
    def polled(self) -> bool:
        """Whether ``fileno()`` was handed out (the connection never moves to a spinning
        transport from then on)."""
        return self._fd.handed_out

    def poll_prepare(self) -> bool:
        """For event loops: True when a read would not wait now (a message, the peer's close
        or death, an error); otherwise make sure ``fileno()`` signals when that changes (re-arm
        it) and return False. Call it before waiting on ``fileno()``."""
        if self._state != "open":
            return True  # reading raises: the caller should find out
        return self._path.poll_prepare()

    def write_fileno(self) -> int | None:
        """For event loops: an fd that polls writable when a blocked writer may go on, or None
        (the rings have none: retry)."""
        return self._epochs.tx.write_fileno() if self._state == "open" else None

    async def arecv(self) -> bytes:
        """The next message, for asyncio (waits on ``fileno()`` with the running loop)."""
        return await aio.arecv(self)

    async def arecv_many(self, max_msgs: int) -> list[bytes]:
        """``recv_many`` for asyncio: every message ready (at most ``max_msgs``), at least
        one, waiting on ``fileno()`` with the running loop."""
        return await aio.arecv_many(self, max_msgs)

    async def asend(self, data: bytes | bytearray | memoryview) -> None:
        """Send one message, for asyncio: waits for room without blocking the loop."""
        await aio.asend(self, data)

    def __aiter__(self) -> AsyncIterator[bytes]:
        """``async for msg in conn``: messages until the peer closes."""
        return aio.aiter_messages(self)

    def stats(self) -> ConnectionStats:
        """A frozen snapshot of this side's counters (over every epoch)."""
        return self._epochs.stats()

    def close(self) -> None:
        """Flush (up to FABLE_CLOSE_LINGER s), send the close frame, free everything.
        Idempotent; the peer reads every message first, then gets ConnectionClosed."""
        if self._state != "open":
            return
        self._state = "closed"
        self._bind("all", _Refuse(lambda: ConnectionClosed("connection is closed")))
        _live.discard(self)
        try:
            self._epochs.close(settings().close_linger_s)
        finally:
            self._release_fds()

    def _release_fds(self) -> None:
        try:
            control().unwatch(self._setup.fileno())  # before its number can be reused
        except FableError:
            pass  # the setup channel is closed already
        self._fd.close()
        self._busy.close()
        self._setup.close()

    def _forked(self) -> None:
        """In a forked child: drop the inherited handles silently and refuse every call."""
        if self._state != "open":
            return
        self._state = "invalid"
        self._bind(
            "all",
            _Refuse(
                lambda: FableError(
                    "this connection was inherited across fork(); it is the parent's"
                )
            ),
        )
        self._epochs.forget()
        self._fd.close()
        self._busy.close()
        self._setup.forget()

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
                self._epochs.close(0.0)
                self._release_fds()
            except Exception:
                pass


def _after_fork_in_child() -> None:
    for conn in list(_live):
        conn._forked()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ pairs without a daemon
class PendingEnd:
    """The not-yet-opened other end of an ``open_pair`` connection (hand it to a child)."""

    def __init__(self, sock: socket.socket, across: Across | None = None) -> None:
        self._sock: socket.socket | None = sock
        self._across = across  # a TCP setup channel between hosts (transports/across.py)

    def fileno(self) -> int:
        """The setup channel fd, to pass to a spawned child (``pass_fds``), then ``attach(fd)``."""
        if self._sock is None:
            raise FableError("this PendingEnd was already opened or closed")
        return self._sock.fileno()

    def open(
        self,
        timeout: float | None = 10.0,
        *,
        trusted: bool | None = None,
        forced: bool = True,
        expect: str | None = None,
    ) -> Connection:
        """Open this end (in the child) and return its :class:`Connection`. ``trusted``: may
        this side read in place? False refuses an offer of unsafe reads (``PermissionDenied``,
        here and, at its next call, on the other side); None takes the form the other side
        chose for this one. ``forced``: the transport was named by the application (see
        ``Connection.fileno``). ``expect``: the only transport to take (a listener's: the
        daemon's choice); another is refused (``ProtocolError``)."""
        if self._sock is None:
            raise FableError("this PendingEnd was already opened or closed")
        sock, self._sock = self._sock, None
        try:
            ch = SetupChannel(sock, self._across)
        except BaseException:
            sock.close()
            if self._across is not None:
                self._across.close()
            raise
        try:
            stance = handshake.Stance(trusted=trusted, transport=expect)
            path, _ = handshake.first_offer(ch, stance, timeout)
        except BaseException:
            ch.close()
            raise
        return Connection(path, ch, 1, trusted=trusted, forced=forced)

    def close(self) -> None:
        """Drop this process's copy (the parent, once the child has its own)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self._across is not None:
                self._across.close()

    def __enter__(self) -> PendingEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(fd: int, timeout: float | None = 10.0, *, trusted: bool | None = None) -> Connection:
    """Open the end of an ``open_pair`` connection whose setup channel fd this process
    inherited (``PendingEnd.fileno()`` passed to a spawned child)."""
    return PendingEnd(socket.socket(fileno=fd)).open(timeout, trusted=trusted)


def initiate(
    sock: socket.socket,
    transport: str,
    *,
    safe: bool | None = None,
    peer_safe: bool | None = None,
    options: dict[str, Any] | None = None,
    trusted: bool | None = None,
    forced: bool = True,
    across: Across | None = None,
) -> Connection:
    """Set ``transport`` up over the setup channel ``sock`` (TCP to another host with
    ``across``: ``fable/transports/across.py``) (this side creates it and sends the
    peer its share in the first offer, asking it to read in form ``peer_safe``) and return
    this side's Connection; the peer opens its end with ``PendingEnd(sock).open()`` or
    ``attach(fd)``. Takes ``sock`` over, closing it on failure. Raises ValueError for an
    unknown transport or a form it does not have."""
    try:
        info = handshake.transport_info(transport)
        safe = handshake.choose_form(info, safe)
        if peer_safe is not None:
            handshake.choose_form(info, peer_safe)
        ch = SetupChannel(sock, across)
    except BaseException:
        sock.close()
        if across is not None:
            across.close()
        raise
    try:
        path = handshake.make_offer(
            ch, info, safe=safe, epoch=0, op=handshake.HELLO, options=options, yours=peer_safe
        )
    except BaseException:
        ch.close()
        raise
    return Connection(path, ch, 0, trusted=trusted, forced=forced)


def open_pair(
    transport: str,
    *,
    safe: bool | None = None,
    peer_safe: bool | None = None,
    options: dict[str, Any] | None = None,
    trusted: bool | None = None,
) -> tuple[Connection, PendingEnd]:
    """A connection over ``transport``: this side's Connection, and the other end to hand on.

    ``safe``: whether this side's reads are private copies (default: the transport's safe
    form when it has one); ``peer_safe``: the other end's (default: as ``safe``; that end
    refuses unsafe reads if it opens with ``trusted=False``). ``trusted``: whether this side
    may read in place in later epochs (None: as it reads now). Raises ValueError for an
    unknown transport or a form it does not have."""
    info = handshake.transport_info(transport)
    safe = handshake.choose_form(info, safe)
    peer_safe = safe if peer_safe is None else handshake.choose_form(info, peer_safe)
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn = initiate(
            s0, transport, safe=safe, peer_safe=peer_safe, options=options, trusted=trusted
        )
    except BaseException:
        s1.close()
        raise
    return conn, PendingEnd(s1)
