"""What every data path shares above its mechanism: error state, reassembling a fragmented
message for ``recv``/``recv_into``, stashed fragments that ``getreadbuf`` hands out first, the
rule that a message begun with ``getreadbuf`` is finished with it, and the counters.

A subclass provides ``_gather(timeout)``: take fragments into ``_stash`` until it holds one
whole message (the last fragment has ``more == False``), or raise.

Closing while other threads are inside (the one sender and the one receiver of the contract,
and a third thread that closes): every write call holds ``_writing`` and every read that can
wait or touch an fd holds ``_reading`` for its whole call, except a hot-path call that waits
without the lock: a socket or pipe read (``stream.py``) sets ``_blocked`` first and then looks
at ``_closing``, which a close sets first and then looks at ``_blocked``; a ring's wait in C
(``mempipe.py``) counts itself in the ring's ``busy``, and a ring's ``close`` ends it. A close
waits for what ``_inside`` reports.
``close``/``teardown`` set ``_closing``, then *interrupt* the calls inside (``_stopping``;
``_wake_waiters`` ends a wait in progress: the path's private stop eventfd, which every wait
polls, the ring's ``interrupt``, or for a blocked read what ends it), again and again until
they have left, so each raises ``ConnectionClosed`` at once; then they hold both locks and only
then free fds and memory: no call ever runs on an fd or a mapping that is gone. A failed path
(``fail``, e.g. from the control thread) wakes its waiters the same way, and they raise its
error (``_interrupted``).
"""

from __future__ import annotations

import abc
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fable.buffer import Buffer
from fable.config import Settings
from fable.errors import (
    ConnectionClosed,
    DeadBuffer,
    FableError,
    NoSpace,
    PeerDied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.transports.base import ConnectionStats, DataPath

if TYPE_CHECKING:
    from fable.transports.channel import SetupChannel

__all__ = [
    "COPY_BURST",
    "POLLERRS",
    "POLLIN",
    "POLLOUT",
    "SLICE_MS",
    "Claim",
    "MessagePath",
    "deadline_of",
    "pipe_takes",
    "slice_ms",
    "time_left",
]

log = logging.getLogger("fable")

SLICE_MS = 200  # the longest one wait lasts before it checks the connection again
GONE_GRACE_S = 0.5  # how long a path that found its peer gone waits to learn why
QUIESCE_S = 5.0  # how long a close waits for interrupted calls of other threads to leave
# A safe getreadbuf on shared memory stops once it has copied this many bytes (at least one
# buffer): a burst of copies larger than the caches gains nothing, and the C ring keeps up to
# twice it of released copies to refill (glibc trims a heap that a whole burst was freed from,
# and the next burst page-faults its copies back in).
COPY_BURST = 1 << 20
# poll(2) events the transports wait for (select.poll: no limit on fd numbers, unlike select)
POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
POLLERRS = select.POLLERR | select.POLLHUP | select.POLLNVAL  # the other end is gone
_INT = struct.Struct("i")


def pipe_takes(wfd: int, capacity: int, size: int) -> bool:
    """Whether a pipe (write end ``wfd``, ``capacity`` bytes) takes ``size`` more bytes now
    without blocking. A pipe polls writable with one free page, and a write that does not fit
    the last page's tail starts a new one, so unread bytes may fill twice their size in pages:
    count them double, and keep a page of slack."""
    unread: int = _INT.unpack(fcntl.ioctl(wfd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return capacity - 2 * unread >= min(size, capacity // 4) + 4096


CHECK_EVERY = 64  # fragments between looks at the clock while reassembling


def deadline_of(timeout: float | None) -> float | None:
    """The monotonic time a wait of ``timeout`` seconds ends (None: never)."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("timeout must be >= 0 or None")
    return time.monotonic() + timeout


def time_left(deadline: float | None, timeout: float | None) -> float | None:
    """What is left of ``timeout`` (0 stays 0: never wait)."""
    if deadline is None or timeout == 0:
        return timeout
    return max(0.0, deadline - time.monotonic())


def slice_ms(deadline: float | None, timeout: float | None, full: str, late: str) -> int:
    """How many ms the next wait slice may last; raises ``WouldBlock(full)`` when the caller
    may not wait (``timeout == 0``) and ``Timeout(late)`` once the deadline has passed."""
    if timeout == 0:
        raise WouldBlock(full)
    if deadline is None:
        return SLICE_MS
    ms = int((deadline - time.monotonic()) * 1000 + 0.999)
    if ms <= 0:
        raise Timeout(late)
    return min(ms, SLICE_MS)


class Claim:
    """The write buffers of one ``getwritebuf`` call, and the transport's part behind each (a
    frame, an extent, a ring position: ``parts[i]`` backs buffer ``i``), until they are
    committed or aborted. A write Buffer's token is ``(claim, i)``. Aborting any buffer of a
    claim aborts all of it; a commit may pass a subset of its buffers (the rest is dropped)."""

    __slots__ = ("aborted", "committed", "parts")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.committed = False
        self.aborted = False


def _claim_of(b: Buffer) -> tuple[Any, int] | None:
    """A write buffer's (claim, index), from its token: ``(Claim, i)``, or a ring record's
    position (an int: a claim of one record, made in C or by the ring's Python path)."""
    tok = b._token
    if isinstance(tok, int):
        return tok, 0
    if isinstance(tok, tuple) and len(tok) == 2 and isinstance(tok[0], Claim):
        return tok[0], tok[1]
    return None


class MessagePath(DataPath):
    """The transport-independent half of a DataPath.

    The public data methods are written here once, each behind the one gate every call passes:
    ``_dead`` (closed, failed, or this epoch ended). Writes also hold ``_writing`` for their
    whole call, so that ``end_writes`` (from another thread: the control thread ending a quiet
    side's epoch) never seals the path under a write. A transport provides the bodies:
    ``_getwritebuf``, ``_commit``, ``_abort``, ``_flush``, ``_send``, ``_send_many``,
    ``_getreadbuf``, and ``_gather`` (below)."""

    def _init_messages(
        self,
        transport: str,
        safe: bool,
        epoch: int,
        cfg: Settings,
        setup: SetupChannel,
        stop_fd: bool = True,
    ) -> None:
        """``stop_fd``: the path waits in poll(2), which must then also poll ``_stop_fd`` (a
        ring waits on a futex instead, which ``_wake_waiters`` interrupts)."""
        self._setup = setup
        self.transport = transport
        self.safe = safe
        self.epoch = epoch
        self._closed = False
        self._error: BaseException | None = None
        self._dead = False  # closed, failed or ended: every public method checks this one flag
        self._wended = False  # END of this epoch sealed: writes go to the next path
        self._rended = False  # the peer's END read: reads go to the next path
        self._end_owed = False  # sealed, and the END not yet in the transport (push_end)
        self._writing = threading.Lock()  # held by every write call (see end_writes)
        self._reading = threading.Lock()  # held by every read that may wait or touch an fd
        self._stopping = False  # a close from another thread: calls inside must leave now
        self._closing = False  # close/teardown began (never reset): no blocking read starts
        self._blocked = False  # a read is in a blocking system call, perhaps without _reading
        self._hurry = False  # the caller may not wait at all (the control thread's push_end)
        self._graced = False  # _gone waited for the peer's reason once: never again
        self._next_look = [0.0, 0.0]  # when the writing, the reading side looks next (_look)
        # private (nobody else holds it): readable while the waits of this path must end
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if stop_fd else -1
        self._read_limit = cfg.read_buffers
        self._max_message = cfg.max_message
        self._held = 0
        self._stash: list[tuple[bytes, bool]] = []  # fragments recv() took but has not returned
        self._stash_bytes = 0  # their total size (kept, not summed: reassembly stays linear)
        self._max_fragments = cfg.max_fragments
        self._mid = False  # getreadbuf handed out a fragment with more=True: a message is open
        self._peer_closed = False
        self._msgs_out = self._bytes_out = self._msgs_in = self._bytes_in = 0

    # ------------------------------------------------------------------ the data methods
    def getwritebuf(self, size: int, timeout: float | None = None) -> list[Buffer]:
        with self._writing:
            if not (self._dead and self._ended(writing=True)):
                return self._getwritebuf(size, timeout)
        return list(self._forward("getwritebuf", size, timeout))

    def commit(
        self, bufs: Sequence[Buffer], nbytes: int, *, flush: bool = True, more: bool = False
    ) -> None:
        with self._writing:
            if not (self._dead and self._ended(writing=True)):
                self._commit(bufs, nbytes, flush, more)
                return
        self._forward("commit", bufs, nbytes, flush=flush, more=more)

    def abort(self, bufs: Iterable[Buffer]) -> None:
        with self._writing:
            if not (self._dead and self._ended(writing=True)):
                self._abort(bufs)
                return
        self._forward("abort", bufs)

    def flush(self, timeout: float | None = None) -> None:
        with self._writing:
            if not (self._dead and self._ended(writing=True)):
                self._flush(timeout)
                return
        self._forward("flush", timeout)

    def _send_gated(
        self, data: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> None:
        with self._writing:
            if not (self._dead and self._ended(writing=True)):
                self._send(data, timeout)
                return
        self._forward("send", data, timeout)

    send = _send_gated  # a ring binds send to C and installs _send_gated as its slow path

    def _send_many_gated(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> int:
        with self._writing:
            if not (self._dead and self._ended(writing=True)):
                return self._send_many(msgs, timeout)
        return int(self._forward("send_many", msgs, timeout))

    send_many = _send_many_gated  # (a ring binds it to C, like send)

    def getreadbuf(self) -> list[Buffer]:
        with self._reading:
            if not (self._dead and self._ended(writing=False)):
                return self._getreadbuf()
        return list(self._forward("getreadbuf"))

    @abc.abstractmethod
    def _getwritebuf(self, size: int, timeout: float | None) -> list[Buffer]: ...

    @abc.abstractmethod
    def _commit(self, bufs: Sequence[Buffer], nbytes: int, flush: bool, more: bool) -> None: ...

    @abc.abstractmethod
    def _abort(self, bufs: Iterable[Buffer]) -> None: ...

    @abc.abstractmethod
    def _flush(self, timeout: float | None) -> None: ...

    def _send(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        """One message; a transport with a faster way than its write buffers overrides it."""
        self._send_in_parts(data, timeout)

    @abc.abstractmethod
    def _send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None
    ) -> int: ...

    @abc.abstractmethod
    def _getreadbuf(self) -> list[Buffer]: ...

    def _ended(self, writing: bool) -> bool:
        """The slow half of the ``_dead`` gate: True when this path's epoch ended for writing
        (``writing``) or reading (the call goes to ``_forward``); the path's error if it failed
        or closed; False when only the other direction ended (the call goes on here)."""
        if self._wended if writing else self._rended:
            return True
        self._check()
        return False

    def _forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A call that reached this path after its epoch ended for it: to the current path."""
        if self.epochs is None:
            raise ConnectionClosed("this epoch of the connection is over")
        return self.epochs.forward(name, *args, **kwargs)

    # ------------------------------------------------------------------ closing
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, linger: float) -> None:
        if self._closed:
            return
        held = self._quiesce()
        try:
            if held and self._error is None and not self._wended:
                self._say_goodbye(linger)
        except (FableError, OSError):
            pass  # the peer is gone or does not read: it sees the end without a close notice
        finally:
            try:
                self._setup.say_close()
                self._teardown(clean=held)
            finally:
                self._let_go(held)

    def forget(self) -> None:
        if not self._closed:
            self._closed = self._dead = True
            self._free(False)
            if self._stop_fd >= 0:
                os.close(self._stop_fd)
                self._stop_fd = -1
        self._setup.forget()

    def teardown(self, wait: bool = True) -> bool:
        if wait:
            held = self._quiesce()
        else:  # (the control thread, freeing an epoch both sides are done with)
            if not self._writing.acquire(blocking=False):
                return False  # a write (an END being pushed) is in flight: not under it
            self._closing = True  # a hot-path read that has not started will not start
            held = self._reading.acquire(blocking=False)  # nor under a read
            if held and self._inside():
                self._reading.release()
                held = False
            if not held:
                self._writing.release()
                return False
        try:
            if not self._closed:
                self._teardown(clean=held)
            return True
        finally:
            self._let_go(held)

    def _quiesce(self) -> bool:
        """Take ``_writing`` and ``_reading`` (module docstring): the calls of other threads
        inside this path are interrupted and raise ``ConnectionClosed``. False (nothing held)
        if one of them did not leave within QUIESCE_S (then nothing may be freed)."""
        self._closing = True
        w = self._writing.acquire(blocking=False)
        r = self._reading.acquire(blocking=False)
        if not (w and r and not self._inside()):
            self._stopping = True
            deadline = time.monotonic() + QUIESCE_S
            try:
                # woken again and again: a call may enter its wait just after a wake-up
                while not (w and r and not self._inside()) and time.monotonic() < deadline:
                    self._wake_waiters(reader=not r or self._inside())
                    w = w or self._writing.acquire(timeout=0.05)
                    r = r or self._reading.acquire(timeout=0.05)
                    if w and r and self._inside():
                        time.sleep(0.001)  # a hot-path call without the lock: let it end
            finally:
                self._stopping = False
            if self._error is None:
                self._unwake()
        if w and r and not self._inside():
            return True
        for lock, got in ((self._writing, w), (self._reading, r)):
            if got:
                lock.release()
        log.warning("fable: a call of another thread did not leave %s; its fds stay open", self)
        return False

    def _inside(self) -> bool:
        """Whether a hot-path call is inside this path without its lock (``_blocked``: a read
        in a blocking system call; a ring's own waits in C say so too)."""
        return self._blocked

    def _let_go(self, held: bool) -> None:
        if held:
            self._reading.release()
            self._writing.release()

    def _wake_waiters(self, reader: bool) -> None:
        """End the waits in progress on this path now (they then look at ``_stopping`` and
        ``_error``). ``reader``: a read is in progress (a transport whose reads may block in a
        system call, not a poll, ends that too)."""
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)

    def _unwake(self) -> None:
        """Undo ``_wake_waiters`` (the waits of this side's own close must wait again)."""
        if self._stop_fd >= 0:
            try:
                os.eventfd_read(self._stop_fd)
            except BlockingIOError:
                pass

    def _slice_ms(
        self,
        deadline: float | None,
        timeout: float | None,
        full: str,
        late: str,
        reading: bool = False,
    ) -> int:
        """Before each wait slice: ``ConnectionClosed`` once another thread closes this path,
        its error once it failed, and for a writer (not ``reading``) the peer's end once the
        setup channel says it closed or died (a closed peer reads no more: its kernel may not
        tell us soon, e.g. TCP with a zero window); then :func:`slice_ms`."""
        self._interrupted()
        if not reading and self._look(reading, SLICE_MS / 1000) is not None:
            raise self._gone()
        return slice_ms(deadline, timeout, full, late)

    def _look(self, reading: bool, every: float) -> str | None:
        """The setup channel's ``peer_state()`` (a system call), looked at by the reading or
        the writing side at most once every ``every`` seconds (None in between): for calls
        that come again and again (wait slices, an empty ``getreadbuf`` in a polling loop)."""
        now = time.monotonic()
        if now < self._next_look[reading]:
            return None
        self._next_look[reading] = now + every
        return self._setup.peer_state()

    def _interrupted(self) -> None:
        """After a wait woke (or before the next): ``ConnectionClosed`` once another thread
        closes this path, its error once it failed."""
        if self._stopping:
            raise ConnectionClosed("the connection was closed (by another thread)")
        if self._error is not None:
            raise self._error

    def _teardown(self, clean: bool) -> None:
        """Mark the path closed; with ``clean`` (nobody else inside) free everything, else
        leave the fds and memory to the garbage collector (a call of another thread may
        still use them)."""
        self._closed = True
        self._dead = True
        self._stash.clear()
        self._stash_bytes = 0
        if clean:
            self._free(clean)
            if self._stop_fd >= 0:
                os.close(self._stop_fd)
                self._stop_fd = -1

    @abc.abstractmethod
    def _say_goodbye(self, linger: float | None) -> None:
        """Hand what is committed to the transport and write the in-band close after it,
        waiting at most ``linger`` seconds (None: as long as a write without a timeout)."""

    @abc.abstractmethod
    def _write_end(self, timeout: float | None) -> bool:
        """Put the in-band END (the close record) after everything committed, waiting up to
        ``timeout`` for room (0: not at all); True once it is in the transport. Called again
        after False, it goes on where it stopped (the END is queued once)."""

    # ------------------------------------------------------------------ the end of an epoch
    def writes_in_flight(self) -> bool:
        if self._writing.acquire(blocking=False):
            self._writing.release()
            return False
        return True

    def end_writes(self, wait: bool, force: bool = False) -> bool:
        if not self._writing.acquire(blocking=wait):
            return False  # a write is under way on another thread: later
        try:
            if self._wended or self._closed or self._error is not None:
                return True  # ended already (or there is nothing left to end)
            if not force and self.write_buffers_held():
                return False
            self._wended = self._dead = self._end_owed = True
            self._state_changed()
            return True
        finally:
            self._writing.release()

    def push_end(self, timeout: float | None) -> bool:
        if not self._writing.acquire(blocking=timeout != 0):
            return False
        try:
            if not self._end_owed or self._closed:
                return True
            self._hurry = timeout == 0
            try:
                done = self._write_end(timeout)
            except (WouldBlock, Timeout):
                done = False
            finally:
                self._hurry = False
            if done:
                self._end_owed = False
            return done
        finally:
            self._writing.release()

    def end_reads(self) -> None:
        self._rended = True
        self._dead = True
        self._state_changed()

    @abc.abstractmethod
    def _free(self, clean: bool) -> None:
        """Let go of every fd and mapping (``clean``: closing, not forgetting after fork)."""

    # ------------------------------------------------------------------ errors
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ConnectionClosed("connection is closed")

    def fail(self, exc: BaseException) -> BaseException:
        if self._error is None:
            self._error = exc
            self._dead = True
            self._state_changed()
            if not self._closed:
                self._wake_waiters(reader=False)  # a wait on another thread raises ``exc``
        return exc

    _fail = fail

    def _gone(self) -> BaseException:
        """The error for a peer that is gone: ``ConnectionClosed`` after its close notice (in
        band, or on the setup channel), ``PeerDied`` otherwise."""
        # the data path may end a moment before the close notice arrives (a peer that shuts
        # its socket down to end a read of its own while it closes): wait for the notice, once
        # (a peer that keeps its setup channel open and silent costs one wait, not one a call)
        grace = 0.0 if self._hurry or self._graced else GONE_GRACE_S
        self._graced = True
        if self._peer_closed or self._setup.settled_state(grace) == "closed":
            return ConnectionClosed("the peer closed the connection")
        return PeerDied("the peer vanished without closing")

    def _state_changed(self) -> None:
        """Called when the stash, the mid-message flag or the failed state changed (a path
        with a native fast path re-reads them here)."""

    # ------------------------------------------------------------------ write claims
    def _hand_out(self, claim: Claim, views: Sequence[memoryview]) -> list[Buffer]:
        """The write buffers of ``claim``, one per part, over ``views``."""
        epoch = self.epoch
        return [
            Buffer(v, self, (claim, i), more=False, epoch=epoch, writable=True)
            for i, v in enumerate(views)
        ]

    def _take_claim(self, bufs: Sequence[Buffer], nbytes: int) -> tuple[Any, list[tuple[int, int]]]:
        """Every commit's checks; then the buffers are dead and the claim is committed. Returns
        the claim and its parts that carry the message, in claim order, as (index, bytes): the
        passed buffers are filled in claim order; parts not passed or past ``nbytes`` are not
        in the list (the transport drops them), except that an empty message is carried by the
        first passed part."""
        self._check()
        if not bufs:
            raise ValueError("commit needs the buffers of one getwritebuf call")
        rooms: dict[int, int] = {}
        claim = None
        for b in bufs:
            if not b.alive:
                raise DeadBuffer("buffer was already committed, released or aborted")
            tok = _claim_of(b) if b._owner is self and b.writable else None
            if tok is None:
                raise ValueError(
                    "these buffers were not handed out by this connection's getwritebuf"
                )
            if claim is None:
                claim = tok[0]
            elif tok[0] is not claim and not (
                isinstance(claim, int) and tok[0] == claim  # (the same one-record claim twice)
            ):
                raise ValueError("one commit takes the buffers of one getwritebuf call")
            rooms[tok[1]] = len(b.data)
        assert claim is not None
        if isinstance(claim, int):  # one record, one buffer (a ring's): a claim of its own
            one = Claim()
            one.parts, claim = [claim], one
        if claim.aborted:
            raise DeadBuffer("another buffer of this getwritebuf call was aborted")
        total = sum(rooms.values())
        if nbytes < 0 or nbytes > total:
            raise ValueError(f"nbytes must be in 0..{total}")
        for b in bufs:
            b._take(self)
        claim.committed = True
        order = sorted(rooms)
        sent: list[tuple[int, int]] = []
        left = nbytes
        for i in order:
            n = min(rooms[i], left)
            if n:
                sent.append((i, n))
                left -= n
        return claim, sent or [(order[0], 0)]

    def _take_aborted(self, bufs: Iterable[Buffer]) -> list[Any]:
        """Abort's half: the buffers are dead, and so is every claim they belong to (its other
        buffers can no longer be committed). Returns those claims, uncommitted, once each."""
        out: list[Any] = []
        for b in bufs:
            writable = b.writable
            tok = b._take(self)
            if isinstance(tok, int) and writable:  # a claim of one record: its position
                one = Claim()
                one.parts, one.aborted = [tok], True
                out.append(one)
            elif isinstance(tok, tuple) and isinstance(tok[0], Claim):
                claim = tok[0]
                if not claim.committed and not claim.aborted:
                    claim.aborted = True
                    out.append(claim)
        return out

    def _send_in_parts(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        """Send one message of any size through getwritebuf and commit, at most ``max_write``
        bytes a commit (``more=True`` between them). ``timeout`` bounds the wait for room
        until the first part is out; then the message is finished whatever it takes."""
        self._check()
        mv = memoryview(data)
        if not mv.c_contiguous:  # a strided view: its bytes, in order
            mv = memoryview(mv.tobytes())
        mv = mv.cast("B")
        n = len(mv)
        pos = 0
        while True:
            part = min(n - pos, self.max_write)
            bufs = self._getwritebuf(part, timeout)
            off = pos
            for b in bufs:
                d = b.data
                d[:] = mv[off : off + len(d)]
                off += len(d)
            pos += part
            self._commit(bufs, part, True, pos < n)
            if pos >= n:
                return
            timeout = None

    # ------------------------------------------------------------------ reassembly
    @abc.abstractmethod
    def _gather(self, timeout: float | None) -> None:
        """Take fragments into ``_stash`` until it holds one whole message."""

    def _stash_fragment(
        self, data: bytes, more: bool, deadline: float | None, timeout: float | None
    ) -> None:
        """Keep one fragment for ``recv``. A message over FABLE_MAX_MESSAGE bytes or
        FABLE_MAX_FRAGMENTS fragments fails the connection; fragments that keep coming past
        the caller's deadline end the call (``Timeout``) with everything kept for the next one.
        The clock is read every ``CHECK_EVERY`` fragments (so a whole message already there is
        read in one call), and not for ``timeout=0``, whose call the fragment cap bounds."""
        self._stash.append((data, more))
        self._stash_bytes += len(data)
        self._state_changed()
        if not more:
            return
        if self._stash_bytes > self._max_message:
            raise self._fail(
                ProtocolError(f"message larger than FABLE_MAX_MESSAGE={self._max_message}")
            )
        n = len(self._stash)
        if n > self._max_fragments:
            raise self._fail(
                ProtocolError(
                    f"message of more than FABLE_MAX_FRAGMENTS={self._max_fragments} fragments"
                )
            )
        if n % CHECK_EVERY == 0 and timeout and deadline and time.monotonic() >= deadline:
            raise Timeout("a message was still arriving in fragments at the timeout")

    def _not_mid_message(self) -> None:
        if self._mid:
            raise FableError(
                "a message begun with getreadbuf() must be finished with getreadbuf() "
                "(its last fragment has more=False) before recv()"
            )

    # ------------------------------------------------------------------ end of an epoch
    def _successor(self) -> DataPath | None:
        """Once the peer's in-band end was read here (and nothing is stashed): the path its
        messages go on on (a reconfiguration, fable/epochs.py), or None (it closed)."""
        if self.epochs is None or not self._peer_closed or self._stash:
            return None
        return self.epochs.next_path(self)

    def _gather_here(self, timeout: float | None) -> DataPath | None:
        """Gather the next whole message into the stash, or return the path the peer's messages
        continue on when this one ended (a live reconfiguration)."""
        self._not_mid_message()
        try:
            self._gather(timeout)
        except ConnectionClosed:
            nxt = self._successor()
            if nxt is None:
                raise
            return nxt
        return None

    def _recv_slow(self, timeout: float | None = None) -> bytes:
        with self._reading:
            if self._dead and self._ended(writing=False):  # a recv looked up before a switch
                nxt = None
            else:
                nxt = self._gather_here(timeout)
                if nxt is None:
                    parts, self._stash = self._stash, []
                    self._stash_bytes = 0
                    self._state_changed()
                    data = parts[0][0] if len(parts) == 1 else b"".join(p for p, _ in parts)
                    self._msgs_in += 1
                    self._bytes_in += len(data)
                    return data
        # this epoch is over for reads: on to the next path (outside this one's lock)
        return nxt.recv(timeout) if nxt is not None else bytes(self._forward("recv", timeout))

    def recv(self, timeout: float | None = None) -> bytes:
        return self._recv_slow(timeout)

    def _recv_many_slow(self, max_msgs: int, timeout: float | None = None) -> list[bytes]:
        """``recv_many``: one message as ``recv`` gets it (waiting), then each one ready. An
        error after the first ends the list; the next call raises it (errors are kept)."""
        if isinstance(max_msgs, bool) or not isinstance(max_msgs, int) or max_msgs < 1:
            raise ValueError(f"max_msgs must be an int >= 1, not {max_msgs!r}")
        recv = self.recv
        out = [recv(timeout)]
        while len(out) < max_msgs:
            try:
                out.append(recv(0))
            except FableError:  # WouldBlock: nothing more now
                break
        return out

    recv_many = _recv_many_slow  # (a ring binds it to C, like recv)

    def _recv_into_slow(self, buf: bytearray | memoryview, timeout: float | None = None) -> int:
        with self._reading:
            if self._dead and self._ended(writing=False):
                nxt = None
            else:
                nxt = self._gather_here(timeout)
                if nxt is None:
                    return self._stash_into(buf)
        if nxt is not None:
            return nxt.recv_into(buf, timeout)
        return int(self._forward("recv_into", buf, timeout))

    recv_into = _recv_into_slow  # (a ring binds it to C, like recv)

    def _stash_into(self, buf: bytearray | memoryview) -> int:
        """The whole message in the stash, copied into ``buf``."""
        total = self._stash_bytes
        out = memoryview(buf).cast("B")
        if total > len(out):
            raise ValueError(f"message of {total} B does not fit in a buffer of {len(out)} B")
        pos = 0
        for p, _ in self._stash:
            out[pos : pos + len(p)] = p
            pos += len(p)
        self._stash = []
        self._stash_bytes = 0
        self._state_changed()
        self._msgs_in += 1
        self._bytes_in += total
        return total

    # ------------------------------------------------------------------ read buffers
    def _start_getreadbuf(self) -> list[Buffer]:
        """Checks, then the stashed fragments as the first read buffers."""
        self._check()
        if self._held >= self._read_limit:
            raise NoSpace(f"{self._held} read buffers held; release some first")
        out: list[Buffer] = []
        while self._stash and self._held < self._read_limit:
            data, more = self._stash.pop(0)
            self._stash_bytes -= len(data)
            out.append(
                Buffer(memoryview(data), self, None, more=more, epoch=self.epoch, writable=False)
            )
            self._count_in(more, len(data))
        if out:
            self._state_changed()
        return out

    def _take_read(self, buf: Buffer) -> object:
        """Release's half: the read buffer is dead and its view released (a reference the
        application saved stops working too); returns the buffer's token."""
        view = buf._data
        try:
            token = buf._take(self)
        except DeadBuffer:
            if buf.owner is self or self.epochs is None:
                raise
            self.epochs.release(buf)  # a release looked up before a switch, given a buffer of
            # another epoch
            return None  # no token: the caller has nothing more to do
        self._held -= 1
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass  # the application made views of the view: they keep the memory
        return token

    def _count_in(self, more: bool, n: int) -> None:
        """One read buffer handed out."""
        self._held += 1
        self._bytes_in += n
        if not more:
            self._msgs_in += 1

    # ------------------------------------------------------------------ stats
    def write_buffers_held(self) -> int:
        return 0

    def _pending_bytes(self) -> int:
        return 0

    def _native_counts(self) -> tuple[int, int, int, int]:
        """Messages and bytes out and in counted by a native fast path."""
        return 0, 0, 0, 0

    def stats(self) -> ConnectionStats:
        mo, bo, mi, bi = self._native_counts()
        return ConnectionStats(
            transport=self.transport,
            safe=self.safe,
            epoch=self.epoch,
            msgs_sent=self._msgs_out + mo,
            bytes_sent=self._bytes_out + bo,
            msgs_received=self._msgs_in + mi,
            bytes_received=self._bytes_in + bi,
            read_buffers_held=self._held,
            write_buffers_held=self.write_buffers_held(),
            pending_bytes=self._pending_bytes(),
        )
