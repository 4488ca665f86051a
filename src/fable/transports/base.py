"""The contract every transport implements, and the record that describes a transport.

A *transport* is a mechanism (tcp, pipe, a shared-memory ring...). It is described by a
:class:`TransportInfo` in the one table, ``fable.transports.REGISTRY``; the policy and the bench
read that table and nothing else. Setting up a connection makes one :class:`DataPath` per side:
the object that moves this side's messages. A :class:`fable.Connection` binds its hot methods
straight to its DataPath, so one ``send`` or ``recv`` is one call into the transport.

The contract below is verified by ``fable.testing.check_transport``; every transport must pass.

Messages and frames
- One ``commit`` (or ``send``) is one message; its buffers are its fragments, in order. A message
  is delivered exactly once, whole, in commit order, with its boundaries kept.
- Every frame on the wire carries its length, a 64-bit sequence number, the epoch and flags; the
  receiver checks the sequence and fails the connection with ``ProtocolError`` on a gap.
- A write buffer allocated earlier but not yet committed holds back messages committed later.
- Close is an in-band frame after the last message: the peer reads every message, then gets
  ``ConnectionClosed``. A peer that vanishes without it gives ``PeerDied`` (after every complete
  message it committed has been read).

Epochs (live reconfiguration, ``fable/epochs.py``; verified by ``fable.testing.check_reconfigure``)
- A path carries one epoch of a connection. The end of its epoch is the same in-band record as a
  close, told apart by the switch the setup channel agreed first. ``end_writes`` seals the path
  for writing (no write may be in flight, no write buffer held: it refuses otherwise, changing
  nothing), after which every write call on it goes to ``epochs.forward``; ``push_end`` puts the
  END after everything written before it. Once a path's reader has read the peer's END it asks
  ``epochs.next_path``, calls ``end_reads`` and every later read goes to ``epochs.forward``; a
  read buffer of an ended path is released through ``epochs.release``. ``teardown`` frees a
  finished epoch's path without a close notice.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fable.buffer import Buffer
    from fable.transports.across import Across
    from fable.transports.channel import SetupChannel

__all__ = [
    "Capabilities",
    "ConnectionStats",
    "DataPath",
    "EndSpec",
    "EpochHooks",
    "TransportInfo",
]


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do; the policy ranks transports from these facts alone."""

    copies_unsafe: (
        int | None
    )  # copies per message when the reader trusts the writer (None: no form)
    copies_safe: int | None  # copies per message for an untrusting reader (None: no form)
    wait: str  # "kernel" | "futex" | "spin" | "adaptive" | "pipe"
    pollable: bool  # fileno() gives a readiness fd
    cross_host: bool  # can connect two hosts
    spins: bool  # burns a core while waiting (never pick when both ends may share one)
    mutual_trust: bool = False  # both sides must trust each other to use it at all
    # holds a small write while an earlier one is unacknowledged (Nagle's algorithm): up to a
    # delayed ACK (40 ms on Linux) per message when the peer waits for more before answering
    delays_small: bool = False

    @property
    def forms(self) -> tuple[bool, ...]:
        """The values of ``safe`` this transport offers (True = the reader gets a private copy)."""
        out: list[bool] = []
        if self.copies_safe is not None:
            out.append(True)
        if self.copies_unsafe is not None:
            out.append(False)
        return tuple(out)


@dataclass(frozen=True)
class EndSpec:
    """One side's share of a new transport: fds to pass over the setup channel, JSON params."""

    fds: list[int]
    params: dict[str, Any]


@dataclass(frozen=True)
class TransportInfo:
    """One row of REGISTRY.

    ``create(options)`` runs on the initiating side and returns the two ends (the second is sent
    to the peer over the setup channel); ``open(spec, role, safe, setup, epoch)`` turns an end
    into a DataPath on its own side. ``role`` is 0 on the initiating side, 1 on the other;
    ``epoch`` is the connection's transport generation (0, then +1 per reconfiguration), which
    every frame or record of the path carries.

    ``create_across(across, options)`` (the ``cross_host`` transports) does what ``create``
    does between hosts: no fds for the peer, only parameters (``fable/transports/across.py``);
    ``open`` then finds its end from them (``setup.across``).
    """

    name: str
    caps: Capabilities
    summary: str
    create: Callable[[dict[str, Any]], tuple[EndSpec, EndSpec]]
    open: Callable[[EndSpec, int, bool, SetupChannel, int], DataPath]
    create_across: Callable[[Across, dict[str, Any]], tuple[EndSpec, EndSpec]] | None = None

    def no_form(self, safe: bool) -> str | None:
        """Why this transport cannot be opened with ``safe`` reads (None: it can)."""
        if safe in self.caps.forms:
            return None
        if safe and self.caps.mutual_trust:
            return (
                f"transport {self.name} has no safe form: both sides must trust each other; "
                "open it with safe=False between trusting processes, or pick another transport"
            )
        return f"transport {self.name} has no {'safe' if safe else 'unsafe'} form"


@dataclass(frozen=True)
class ConnectionStats:
    """A snapshot of a connection's counters (``Connection.stats()``)."""

    transport: str
    safe: bool
    epoch: int
    msgs_sent: int
    bytes_sent: int
    msgs_received: int
    bytes_received: int
    read_buffers_held: int
    write_buffers_held: int
    pending_bytes: int  # committed but not yet handed to the transport (batched commits)


class EpochHooks(Protocol):
    """What a path calls when its epoch ends (implemented by the connection's ``Epochs``)."""

    def next_path(self, path: DataPath) -> DataPath | None:
        """Called on the reading thread once ``path`` read the peer's in-band end: the path the
        peer's messages go on on (a reconfiguration), or None (the peer closed)."""

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Where a call of data method ``name`` goes once the path's epoch ended for it (a
        method the application looked up before the switch): the connection's current path."""

    def release(self, buf: Buffer) -> None:
        """Release a read buffer that another epoch's path handed out."""


class DataPath(abc.ABC):
    """One side of a connection over one transport (one epoch).

    Threads: one sending and one receiving thread at a time. Blocking calls release the GIL and
    raise promptly on signals (KeyboardInterrupt works). ``timeout=None`` waits forever, ``0``
    never waits (``WouldBlock``), otherwise ``Timeout`` when it expires; a call that raised
    ``WouldBlock`` or ``Timeout`` consumed and lost nothing.
    """

    transport: str
    safe: bool
    epoch: int
    max_write: int  # largest size one getwritebuf may ask for

    # -- writing -------------------------------------------------------------------------
    @abc.abstractmethod
    def getwritebuf(self, size: int, timeout: float | None = None) -> list[Buffer]:
        """Buffers with room for ``size`` bytes in total, blocking while the transport is full.

        This is where back-pressure applies. ``size`` above ``max_write`` raises ValueError
        (send such a message as several commits with ``more=True``)."""

    @abc.abstractmethod
    def commit(
        self, bufs: Sequence[Buffer], nbytes: int, *, flush: bool = True, more: bool = False
    ) -> None:
        """Publish ``nbytes`` written into ``bufs`` as one message.

        ``bufs`` are buffers of one getwritebuf call, passed in any order: they are filled in
        the order getwritebuf returned them (each whole before the next), and that call's
        buffers not passed are dropped.

        ``more=True``: the message continues in the next commit. ``flush=False`` lets several
        commits be written together by ``flush()`` (socket transports: one vectored write).
        With ``flush=True`` the message is handed to the transport before this returns (on the
        socket transports it may wait while the kernel buffer is full; a reader that dies gives
        ``PeerDied``). The buffers are dead afterwards, even if this raises."""

    @abc.abstractmethod
    def abort(self, bufs: Iterable[Buffer]) -> None:
        """Give back write buffers without sending anything. Aborting any buffer of a
        getwritebuf call aborts all of it: its other buffers can no longer be committed."""

    @abc.abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Hand every committed message to the transport, waiting while it is full.

        ``timeout=0`` pushes what fits now and raises WouldBlock if some is left (an event loop
        calls it when the write side is ready); on Timeout/WouldBlock the rest stays queued."""

    @abc.abstractmethod
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Send one message of any size (a copy of ``data``). ``timeout`` bounds the wait for
        space; once part of the message has been accepted the call completes it."""

    @abc.abstractmethod
    def send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> int:
        """Send several messages, batched into as few transport operations as possible.

        Returns how many were accepted, in order: all of them, unless ``timeout`` expired while
        waiting for space (then the rest were not sent; no WouldBlock/Timeout is raised)."""

    # -- reading -------------------------------------------------------------------------
    @abc.abstractmethod
    def getreadbuf(self) -> list[Buffer]:
        """The fragments that are ready, without waiting; ``[]`` when none is (which re-arms
        ``fileno``). Raises ``NoSpace`` while the application holds too many read buffers, and
        ``ConnectionClosed``/``PeerDied`` once the peer is gone and everything was read."""

    @abc.abstractmethod
    def release(self, buf: Buffer) -> None:
        """Give a read buffer back; read buffers may be released in any order."""

    @abc.abstractmethod
    def recv(self, timeout: float | None = None) -> bytes:
        """The next whole message (fragments reassembled)."""

    @abc.abstractmethod
    def recv_many(self, max_msgs: int, timeout: float | None = None) -> list[bytes]:
        """Every whole message ready, at most ``max_msgs`` (>= 1), at least one (waiting as
        ``recv`` does)."""

    @abc.abstractmethod
    def recv_into(self, buf: bytearray | memoryview, timeout: float | None = None) -> int:
        """Copy the next message into ``buf``; returns its length. A buffer too small raises
        ValueError and the message stays readable."""

    # -- the rest --------------------------------------------------------------------------
    @abc.abstractmethod
    def fileno(self) -> int:
        """Edge-style readiness fd: after it signals, read until getreadbuf returns []."""

    @abc.abstractmethod
    def poll_prepare(self) -> bool:
        """True when a read would not wait now (a message, the peer's close or death, an
        error); otherwise make sure ``fileno()`` signals when that changes (re-arm it) and
        return False. ``xpoll`` and asyncio call this before they wait on ``fileno()``."""

    def write_fileno(self) -> int | None:
        """An fd that polls writable when a blocked writer may go on, or None (rings)."""
        return None

    @abc.abstractmethod
    def close(self, linger: float) -> None:
        """Flush (waiting up to ``linger`` s), send the close frame, free everything.
        Idempotent."""

    @abc.abstractmethod
    def forget(self) -> None:
        """Drop this process's handles without telling the peer (a forked child's copy)."""

    @abc.abstractmethod
    def stats(self) -> ConnectionStats:
        """Counters of this side."""

    # -- the epoch contract (module docstring) -----------------------------------------------
    epochs: EpochHooks | None = None  # set by the connection that owns the path

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether the path was closed, torn down or forgotten (its resources are gone)."""

    @abc.abstractmethod
    def writes_in_flight(self) -> bool:
        """Whether a thread is inside a write method of this path now."""

    @abc.abstractmethod
    def write_buffers_held(self) -> int:
        """Write buffers handed out and neither committed nor aborted yet."""

    @abc.abstractmethod
    def end_writes(self, wait: bool, force: bool = False) -> bool:
        """Seal this path for writing: every later write call goes to ``epochs.forward``, and
        the in-band END is owed after everything written before (``push_end`` writes it).
        Returns False, changing nothing, while write buffers are held (unless ``force``: they
        are dropped) or, with ``wait=False``, while a write is in flight on another thread
        (``wait=True`` waits for it). True also when the path had ended already."""

    @abc.abstractmethod
    def push_end(self, timeout: float | None) -> bool:
        """Write the END that ``end_writes`` left owed, waiting up to ``timeout`` seconds for
        room (0: not at all, and not while another thread writes; None: as long as a write
        without a timeout would); True once it is in the transport (or nothing is owed). Safe
        to call again after False."""

    @abc.abstractmethod
    def end_reads(self) -> None:
        """The peer's END was read on this path: every later read goes to ``epochs.forward``."""

    @abc.abstractmethod
    def teardown(self, wait: bool = True) -> bool:
        """Free a path whose epoch is over (or that was never used): no close notice is sent,
        the connection goes on elsewhere. Never under a write in flight on another thread: it
        waits for it, or with ``wait=False`` returns False and frees nothing. Idempotent."""

    @abc.abstractmethod
    def fail(self, exc: BaseException) -> BaseException:
        """Fail the path for good with ``exc`` (returned, for ``raise``)."""
