"""What every data path shares above its mechanism: error state, reassembling a fragmented
message for ``recv``/``recv_into``, stashed fragments that ``getreadbuf`` hands out first, the
rule that a message begun with ``getreadbuf`` is finished with it, and the counters.

A subclass provides ``_gather(timeout)``: take fragments into ``_stash`` until it holds one
whole message (the last fragment has ``more == False``), or raise.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fable.buffer import Buffer
from fable.config import Settings
from fable.errors import (
    ConnectionClosed,
    DeadBuffer,
    FableError,
    NoSpace,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.transports.base import ConnectionStats, DataPath

if TYPE_CHECKING:
    from fable.transports.setup import SetupChannel

__all__ = ["SLICE_MS", "Claim", "MessagePath", "deadline_of", "slice_ms", "time_left"]

SLICE_MS = 200  # the longest one wait lasts before it checks the connection again


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


class MessagePath(DataPath):
    """The transport-independent half of a DataPath."""

    def _init_messages(
        self, transport: str, safe: bool, epoch: int, cfg: Settings, setup: SetupChannel
    ) -> None:
        self._setup = setup
        self.transport = transport
        self.safe = safe
        self.epoch = epoch
        self._closed = False
        self._error: BaseException | None = None
        self._dead = False  # closed, failed or ended: every fast path checks this one flag
        self._wended = False  # END of this epoch written: writes go to the next (_after_end)
        self._rended = False  # the peer's END read: reads go to the next path (_after_end)
        self._read_limit = cfg.read_buffers
        self._max_message = cfg.max_message
        self._held = 0
        self._stash: list[tuple[bytes, bool]] = []  # fragments recv() took but has not returned
        self._mid = False  # getreadbuf handed out a fragment with more=True: a message is open
        self._peer_closed = False
        self._msgs_out = self._bytes_out = self._msgs_in = self._bytes_in = 0

    # ------------------------------------------------------------------ closing
    def close(self, linger: float) -> None:
        if self._closed:
            return
        try:
            if self._error is None and not self._wended:
                self._say_goodbye(linger)
        except (FableError, OSError):
            pass  # the peer is gone or does not read: it sees the end without a close notice
        finally:
            self._setup.say_close()
            self._teardown(clean=True)

    def forget(self) -> None:
        if not self._closed:
            self._teardown(clean=False)
        self._setup.forget()

    def _teardown(self, clean: bool) -> None:
        self._closed = True
        self._dead = True
        self._stash.clear()
        self._free(clean)

    @abc.abstractmethod
    def _say_goodbye(self, linger: float | None) -> None:
        """Hand what is committed to the transport and write the in-band close after it,
        waiting at most ``linger`` seconds (None: as long as a write without a timeout)."""

    def _end_writes(self, linger: float | None) -> None:
        """The end of this path's epoch (live reconfiguration): like ``_say_goodbye``, but the
        reading half goes on, possibly in another thread: touch only writing state. Every
        later write on this path (a method the application looked up before the switch) goes
        to the connection's next path (``_after_end``) instead of vanishing after END."""
        # first, so that a write racing with END (it cannot be one already under way: the
        # switch checked) falls through to the slow path and from there to the next path
        self._wended = True
        self._dead = True
        self._state_changed()
        self._write_close(linger)

    def _write_close(self, linger: float | None) -> None:
        """The writing half of ``_say_goodbye``: the in-band close after what is committed
        (a transport whose goodbye also touches reading state overrides this)."""
        self._say_goodbye(linger)

    def _end_reads(self) -> None:
        """The peer's END of this epoch was read (live reconfiguration): every later read on
        this path (a method looked up before the switch) goes to the connection's next path."""
        self._rended = True
        self._dead = True
        self._state_changed()

    def _ended(self, writing: bool) -> bool:
        """The slow half of every public method's ``_dead`` gate: True when this path's writes
        (``writing``) or reads ended in a live reconfiguration (the caller hands the call to
        ``_after_end``); otherwise raise as ``_check`` does, or return False."""
        if self._wended if writing else self._rended:
            return True
        self._check()
        return False

    # set by the reconfiguration: where writes after END go, and reads after the peer's END
    # (Switcher.forward, Switcher.read_forward)
    _forward: Callable[..., Any] | None = None
    _read_forward: Callable[..., Any] | None = None
    _release_forward: Callable[[Buffer], None] | None = None  # Switcher.release, see _take_read

    def _after_end(self, name: str, *args: Any, **kwargs: Any) -> Any:
        reading = name in ("recv", "recv_into", "getreadbuf")
        fwd = self._read_forward if reading else self._forward
        if fwd is None:
            raise ConnectionClosed("this epoch of the connection is over")
        return fwd(name, *args, **kwargs)

    @abc.abstractmethod
    def _free(self, clean: bool) -> None:
        """Let go of every fd and mapping (``clean``: closing, not forgetting after fork)."""

    # ------------------------------------------------------------------ errors
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ConnectionClosed("connection is closed")

    def _fail(self, exc: BaseException) -> BaseException:
        """Fail the connection for good with ``exc`` (returned, for ``raise``)."""
        if self._error is None:
            self._error = exc
            self._dead = True
            self._state_changed()
        return exc

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
            tok = b._token
            if b._owner is not self or not (isinstance(tok, tuple) and isinstance(tok[0], Claim)):
                raise ValueError(
                    "these buffers were not handed out by this connection's getwritebuf"
                )
            if claim is None:
                claim = tok[0]
            elif tok[0] is not claim:
                raise ValueError("one commit takes the buffers of one getwritebuf call")
            rooms[tok[1]] = len(b.data)
        assert claim is not None
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
            tok = b._take(self)
            if isinstance(tok, tuple) and isinstance(tok[0], Claim):
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
        mv = memoryview(data).cast("B")
        n = len(mv)
        pos = 0
        while True:
            part = min(n - pos, self.max_write)
            bufs = self.getwritebuf(part, timeout)
            off = pos
            for b in bufs:
                d = b.data
                d[:] = mv[off : off + len(d)]
                off += len(d)
            pos += part
            self.commit(bufs, part, more=pos < n)
            if pos >= n:
                return
            timeout = None

    # ------------------------------------------------------------------ reassembly
    @abc.abstractmethod
    def _gather(self, timeout: float | None) -> None:
        """Take fragments into ``_stash`` until it holds one whole message."""

    def _stash_fragment(self, data: bytes, more: bool) -> None:
        self._stash.append((data, more))
        self._state_changed()
        if more and sum(len(p) for p, _ in self._stash) > self._max_message:
            raise self._fail(
                ProtocolError(f"message larger than FABLE_MAX_MESSAGE={self._max_message}")
            )

    def _not_mid_message(self) -> None:
        if self._mid:
            raise FableError(
                "a message begun with getreadbuf() must be finished with getreadbuf() "
                "(its last fragment has more=False) before recv()"
            )

    # ------------------------------------------------------------------ end of an epoch
    # Set by the Connection: called on the reading thread once the peer's in-band end has been
    # read on this path; returns the path the peer's messages continue on (a live
    # reconfiguration, fable/reconfig.py) or None (the peer closed).
    _on_end: Callable[[DataPath], DataPath | None] | None = None

    def _successor(self) -> DataPath | None:
        if self._on_end is None or not self._peer_closed or self._stash:
            return None
        return self._on_end(self)

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
        if self._dead and self._ended(writing=False):  # a recv looked up before a switch
            return bytes(self._after_end("recv", timeout))
        nxt = self._gather_here(timeout)
        if nxt is not None:
            return nxt.recv(timeout)
        parts, self._stash = self._stash, []
        self._state_changed()
        data = parts[0][0] if len(parts) == 1 else b"".join(p for p, _ in parts)
        self._msgs_in += 1
        self._bytes_in += len(data)
        return data

    def recv_into(self, buf: bytearray | memoryview, timeout: float | None = None) -> int:
        if self._dead and self._ended(writing=False):
            return int(self._after_end("recv_into", buf, timeout))
        nxt = self._gather_here(timeout)
        if nxt is not None:
            return nxt.recv_into(buf, timeout)
        total = sum(len(p) for p, _ in self._stash)
        out = memoryview(buf).cast("B")
        if total > len(out):
            raise ValueError(f"message of {total} B does not fit in a buffer of {len(out)} B")
        pos = 0
        for p, _ in self._stash:
            out[pos : pos + len(p)] = p
            pos += len(p)
        self._stash = []
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
            fwd = self._release_forward
            if buf._owner is self or fwd is None:
                raise
            fwd(buf)  # a release looked up before a switch, given a buffer of another epoch
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
    def _write_buffers_held(self) -> int:
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
            write_buffers_held=self._write_buffers_held(),
            pending_bytes=self._pending_bytes(),
        )
