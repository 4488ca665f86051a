"""vmsplice-coop: frames spliced from the writer's own pages into a pipe; the reader copies once
and tells the writer, through a token pipe, how far it has read.

The paper's §2.1.5. Per direction, a *data pipe* (enlarged to 1 MiB where the kernel allows)
and a *token pipe* back:

    writer: arena (a private memfd mapping,  data pipe                reader
            a ring of frames)   --- vmsplice(pages, no copy) --->   read() copies them once
            reuse up to the token <------ token: u64 bytes read ---  every TOKEN_EVERY bytes

Frames and their checks are the stream transports' (``stream.py``); only where the writer's
bytes live and how they enter the pipe differ. ``vmsplice`` hands the pipe references to the
arena's pages, so the writer must not touch those bytes until the reader has read them: the
reader's token (the stream position it has read up to) says which. The arena is a ring of
frames in stream order; ``_allocs`` remembers, per allocation, its end in the arena and, once
queued, its end in the stream; a token frees every allocation whose stream end it passed.

No deadlock without a token: the arena holds the connection's queue limit, a full pipe, one
token interval and the largest frame, so a writer short of space always has unread bytes in
the pipe or a token coming; and a reader about to block (the pipe drained) reports how far it
read even inside a token interval, so a writer that writes nothing more (an end of epoch, a
close) is not left waiting. The writer polls the data pipe (room) and the token pipe (tokens)
together; the reader never blocks on the token pipe (a token that does not fit is sent later).

Trust: the writer relies on the reader's tokens (a lying reader makes the writer overwrite
bytes still in the pipe), so both sides must trust each other: the transport has no safe form
and is never chosen for an untrusted peer. A token beyond what was sent, or going backwards,
is a ``ProtocolError``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import struct
from collections import deque
from collections.abc import Iterable, Sequence

from fable import _core
from fable._wire import close_fds
from fable.errors import ProtocolError, Timeout, WouldBlock
from fable.transports.base import Capabilities, DataPath, EndSpec, TransportInfo
from fable.transports.channel import SetupChannel
from fable.transports.message import (
    POLLERRS,
    POLLIN,
    POLLOUT,
    MessagePath,
    deadline_of,
    time_left,
)
from fable.transports.pipe import ignore_sigpipe, new_pipe, pipe_ends
from fable.transports.shm import unmap
from fable.transports.stream import (
    F_CLOSE,
    FRAGMENT,
    HDR,
    IOV_MAX,
    MAGIC,
    StreamPath,
)

__all__ = ["INFO", "TOKEN", "VmsplicePath"]

TOKEN = struct.Struct("<Q")
TOKEN_EVERY = 256 * 1024
PAGE = mmap.PAGESIZE

_pack_into = struct.Struct("<IHHQI").pack_into


def _create(options: dict[str, object]) -> tuple[EndSpec, EndSpec]:
    fds: list[int] = []
    try:
        for _ in range(4):
            fds.extend(new_pipe())
    except BaseException:
        close_fds(fds)
        raise
    d0r, d0w, d1r, d1w, t0r, t0w, t1r, t1w = fds
    # Each side: [data in, data out, tokens in (for its data out), tokens out (for its data in)]
    return EndSpec([d1r, d0w, t0r, t1w], {}), EndSpec([d0r, d1w, t1r, t0w], {})


class VmsplicePath(StreamPath):
    """A StreamPath whose frames live in an arena and enter the pipe by vmsplice."""

    def __init__(
        self, setup: SetupChannel, rfd: int, wfd: int, tin: int, tout: int, epoch: int = 0
    ) -> None:
        super().__init__("vmsplice-coop", setup, rfd=rfd, wfd=wfd, epoch=epoch)
        self.safe = False
        self._tin, self._tout = tin, tout
        os.set_blocking(tin, False)
        os.set_blocking(tout, False)
        # writer: the arena and what of it is in use (positions count bytes, never wrap)
        pipe_size = int(fcntl.fcntl(wfd, fcntl.F_GETPIPE_SZ))
        size = self._limit + pipe_size + TOKEN_EVERY + 2 * (HDR + FRAGMENT) + PAGE
        self._asize = -(-size // PAGE) * PAGE
        # A memfd, not anonymous memory, so that the mapping has a name (/proc/self/maps)
        arena_fd = os.memfd_create("fable-vmsplice-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(arena_fd, self._asize)
            self._arena = mmap.mmap(arena_fd, self._asize)
        finally:
            os.close(arena_fd)
        self._amv = memoryview(self._arena)
        self._ahead = 0  # next allocation
        self._atail = 0  # everything before is free
        # per allocation, in arena order: [arena end, stream end (None: not queued yet,
        # -1: never queued, free once reached), arena offset]
        self._allocs: deque[list[int | None]] = deque()
        self._by_frame: dict[int, list[int | None]] = {}  # id(claim frame) -> its allocation
        self._sq = 0  # stream bytes queued
        self._qend = -1  # arena offset where the last queued frame ends
        self._spliced = 0  # stream bytes the pipe took
        self._token = 0  # stream bytes the reader has read (its last token)
        self._tbuf = b""  # a partial token
        self._tpoll = select.poll()  # waiting for tokens (and the stop fd)
        self._tpoll.register(tin, POLLIN)
        self._tpoll.register(self._stop_fd, POLLIN)
        self._slots = select.poll()  # the data pipe has a free slot (``_kernel_takes``)
        self._slots.register(wfd, POLLOUT)
        # reader
        self._consumed = 0
        self._reported = 0
        self._readinto = self._read_counted

    def _kernel_takes(self, size: int) -> bool:
        """The pipe's unread bytes leave room for ``size``, and it has a free slot: each
        spliced frame takes a slot of its own (a page reference), so a pipe of small frames
        runs out of slots long before bytes, and a vmsplice into a pipe without a free slot
        takes nothing (a send with a timeout would then wait for the reader)."""
        return super()._kernel_takes(size) and bool(self._slots.poll(0))

    # ================================================================= the arena
    def _alloc(self, n: int) -> tuple[memoryview, list[int | None]]:
        """``n`` contiguous arena bytes (the caller checked ``_room``) and their allocation."""
        off = self._ahead % self._asize
        if n <= PAGE and off // PAGE != (off + n - 1) // PAGE:
            # a frame that fits in a page never straddles two: it takes one pipe slot, which
            # ``_kernel_takes`` can see is free (poll tells one slot, not two)
            self._ahead += PAGE - off % PAGE
            off = self._ahead % self._asize
        if off + n > self._asize:
            self._ahead += self._asize - off  # skip the end: frames never wrap
            off = 0
        self._ahead += n
        entry: list[int | None] = [self._ahead, None, off]
        self._allocs.append(entry)
        return self._amv[off : off + n], entry

    def _room(self, n: int) -> bool:
        """Whether an allocation of ``n`` bytes fits (reading tokens when it looks full)."""
        slack = HDR + FRAGMENT + PAGE  # what _alloc may skip (the arena's end, a page's)
        if self._ahead + n + slack - self._atail <= self._asize:
            return True
        self._read_tokens()
        return self._ahead + n + slack - self._atail <= self._asize

    def _read_tokens(self) -> None:
        data = b""
        while True:
            try:
                chunk = os.read(self._tin, 4096)
            except BlockingIOError:
                break
            if not chunk:
                if not data:
                    raise self._fail(self._gone_on_write())
                break
            data += chunk
        if not data:
            return
        data = self._tbuf + data
        whole = len(data) - len(data) % TOKEN.size
        self._tbuf = data[whole:]
        if not whole:
            return
        (token,) = TOKEN.unpack_from(data, whole - TOKEN.size)
        if token < self._token or token > self._spliced:
            raise self._fail(
                ProtocolError(
                    f"bogus token {token} (read before: {self._token}, sent: {self._spliced})"
                )
            )
        self._token = token
        allocs = self._allocs
        while allocs:
            end = allocs[0][1]
            if end is None or end > token:
                break
            tail = allocs.popleft()[0]
            assert tail is not None
            self._atail = tail
        if not allocs:
            self._atail = self._ahead

    def _enqueue(self, frame: memoryview, entry: list[int | None]) -> None:
        """Queue a frame (writer lock held) and note where it ends in the stream. A frame that
        follows the last queued one in the arena extends it: the pipe then takes both as one
        page segment rather than one pipe slot each."""
        n = len(frame)
        start = entry[2]
        q = self._queue
        if q and start == self._qend:
            last = q[-1]
            q[-1] = self._amv[self._qend - len(last) : self._qend + n]
        else:
            q.append(frame)
        assert start is not None
        self._qend = start + n
        self._queued += n
        self._sq += n
        entry[1] = self._sq

    # ================================================================= writing
    def _new_frame(self, size: int) -> memoryview:
        frame, entry = self._alloc(size)
        self._by_frame[id(frame)] = entry
        return frame

    def _claim(self, size: int, deadline: float | None, timeout: float | None) -> None:
        super()._claim(size, deadline, timeout)
        while not self._room(size):
            if self._queue:
                self._try_push()
            ms = self._slice_ms(
                deadline, timeout, "the connection is full", "no room before the timeout"
            )
            pushing = bool(self._queue)  # then room in the pipe matters too
            if pushing:
                self._tpoll.register(self._wfd, POLLOUT)
            try:
                for fd, ev in self._tpoll.poll(ms):
                    if fd == self._wfd and ev & POLLERRS:
                        raise self._fail(self._gone_on_write())
            finally:
                if pushing:
                    self._tpoll.unregister(self._wfd)
            self._check()

    def _drop_frames(self, frames: list[bytearray | memoryview]) -> None:
        for frame in frames:
            entry = self._by_frame.pop(id(frame), None)
            if entry is not None:
                entry[1] = -1  # never queued: free once the allocations before it are

    def _queue_frame(self, frame: bytearray | memoryview, n: int) -> None:
        self._enqueue(memoryview(frame)[:n], self._by_frame.pop(id(frame)))

    def _write(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        try:
            n = _core.vmsplice(self._wfd, bufs if len(bufs) <= IOV_MAX else bufs[:IOV_MAX])
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError):
            raise self._gone_on_write() from None
        self._spliced += n
        return n

    def _queue_close(self, deadline: float | None, timeout: float | None) -> None:
        self._claim(HDR, deadline, timeout)
        frame, entry = self._alloc(HDR)
        _pack_into(frame, 0, 0, F_CLOSE, MAGIC, self._wseq, self.epoch)
        self._wseq += 1
        with self._wlock:
            self._enqueue(frame, entry)

    def _put(self, data: bytes | bytearray | memoryview, n: int) -> None:
        """Frame one small message into the arena and queue it (room was checked)."""
        frame, entry = self._alloc(HDR + n)
        _pack_into(frame, 0, n, 0, MAGIC, self._wseq, self.epoch)
        self._wseq += 1
        frame[HDR:] = data
        self._msgs_out += 1
        self._bytes_out += n
        with self._wlock:
            self._enqueue(frame, entry)

    send = MessagePath.send  # not StreamPath's fast path: frames go into the arena (_send)

    def _send(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        n = len(data)
        if (
            self._queue
            or self._claims
            or n > FRAGMENT
            or (type(data) is memoryview and data.itemsize != 1)
            or (timeout is not None and not self._kernel_takes(HDR + n))
            or not self._room(HDR + n)
        ):
            self._send_in_parts(data, timeout)
            return
        self._put(data, n)
        self._drain(None)

    def _send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None
    ) -> int:
        deadline = deadline_of(timeout)
        count = 0
        try:
            for m in msgs:
                n = len(m)
                if n > FRAGMENT or self._claims or (type(m) is memoryview and m.itemsize != 1):
                    self._advance()
                    self._send_in_parts(m, time_left(deadline, timeout))
                    count += 1
                    continue
                if self._queued + HDR + n > self._limit or not self._room(HDR + n):
                    self._claim(HDR + n, deadline, time_left(deadline, timeout))
                self._put(m, n)
                count += 1
                if self._queued >= 65536:
                    self._try_push()
        except (WouldBlock, Timeout):
            if timeout is None:  # pragma: no cover - cannot happen without a timeout
                raise
        self._drain(None)
        return count

    # ================================================================= reading
    def _read_counted(self, buf: memoryview) -> int:
        n = os.readv(self._rfd, [buf])
        if n > 0 and not self._closing:  # (a byte of our own close's is not the writer's)
            self._consumed += n
            if self._consumed - self._reported >= TOKEN_EVERY:
                self._report()
        return n

    def _report(self) -> None:
        """Tell the writer how far we have read; a full token pipe defers it (never blocks)."""
        try:
            os.write(self._tout, TOKEN.pack(self._consumed))
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            pass  # the writer is gone; what it sent is still ours to read
        self._reported = self._consumed

    def _wait_readable(self, deadline: float | None, timeout: float | None) -> None:
        if self._consumed > self._reported:
            self._report()  # about to wait: the writer may be waiting for this token
        super()._wait_readable(deadline, timeout)

    def _fill(self, block: bool) -> int:
        if block and self._consumed > self._reported:
            # A reader that blocks has drained the pipe: say so, or a writer whose arena is
            # full (at an end of epoch it writes nothing more) would wait for a token forever.
            self._report()
        return super()._fill(block)

    # ================================================================= the rest
    def _free(self, clean: bool) -> None:
        super()._free(clean)
        close_fds([self._tin, self._tout])
        self._claims.clear()
        self._by_frame.clear()
        unmap(self._arena, self._amv)  # write buffers still held keep the arena alive


def _open(spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0) -> DataPath:
    fds = list(spec.fds)
    try:
        if len(fds) != 4:
            raise ProtocolError(f"expected 4 fds for vmsplice-coop, got {len(fds)}")
        pipe_ends(fds, (os.O_RDONLY, os.O_WRONLY, os.O_RDONLY, os.O_WRONLY), role)
    except BaseException:
        close_fds(fds)
        raise
    rfd, wfd, tin, tout = fds
    ignore_sigpipe()
    return VmsplicePath(setup, rfd, wfd, tin, tout, epoch)


INFO = TransportInfo(
    name="vmsplice-coop",
    caps=Capabilities(
        copies_unsafe=1,
        copies_safe=None,
        wait="kernel",
        pollable=True,
        cross_host=False,
        spins=False,
        mutual_trust=True,
    ),
    summary="writer's pages vmspliced into a pipe; the reader copies once and returns tokens",
    create=_create,
    open=_open,
)
