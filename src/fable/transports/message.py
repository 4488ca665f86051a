"""What every data path shares above its mechanism: error state, reassembling a fragmented
message for ``recv``/``recv_into``, stashed fragments that ``getreadbuf`` hands out first, the
rule that a message begun with ``getreadbuf`` is finished with it, and the counters.

A subclass provides ``_gather(timeout)``: take fragments into ``_stash`` until it holds one
whole message (the last fragment has ``more == False``), or raise.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from fable.buffer import Buffer
from fable.config import Settings
from fable.errors import ConnectionClosed, DeadBuffer, FableError, NoSpace, ProtocolError
from fable.transports.base import ConnectionStats, DataPath

__all__ = ["MessagePath"]


class MessagePath(DataPath):
    """The transport-independent half of a DataPath."""

    def _init_messages(self, transport: str, safe: bool, epoch: int, cfg: Settings) -> None:
        self.transport = transport
        self.safe = safe
        self.epoch = epoch
        self._closed = False
        self._error: BaseException | None = None
        self._dead = False  # closed or failed: every fast path checks this one flag
        self._read_limit = cfg.read_buffers
        self._max_message = cfg.max_message
        self._held = 0
        self._stash: list[tuple[bytes, bool]] = []  # fragments recv() took but has not returned
        self._mid = False  # getreadbuf handed out a fragment with more=True: a message is open
        self._peer_closed = False
        self._msgs_out = self._bytes_out = self._msgs_in = self._bytes_in = 0

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

    def _start_commit(self, bufs: Sequence[Buffer]) -> None:
        """The checks every commit starts with: an open connection and live buffers."""
        self._check()
        if not bufs:
            raise ValueError("commit needs the buffers of one getwritebuf call")
        for b in bufs:
            if not b.alive:
                raise DeadBuffer("buffer was already committed, released or aborted")

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

    def _recv_slow(self, timeout: float | None = None) -> bytes:
        self._check()
        self._not_mid_message()
        self._gather(timeout)
        parts, self._stash = self._stash, []
        self._state_changed()
        data = parts[0][0] if len(parts) == 1 else b"".join(p for p, _ in parts)
        self._msgs_in += 1
        self._bytes_in += len(data)
        return data

    def recv_into(self, buf: bytearray | memoryview, timeout: float | None = None) -> int:
        self._check()
        self._not_mid_message()
        self._gather(timeout)
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
