"""shmem-pipe: payloads in shared memory managed by the writer's allocator, descriptors in pipes.

The paper's §2.1.4. Per direction, a data area in one sealed memfd (both directions share it),
a *descriptor pipe* (writer -> reader) and a *return pipe* (reader -> writer):

    memfd:  [ area 0: initiator -> peer (capacity B) ][ area 1: peer -> initiator ]

    writer                                                     reader
    Extents.alloc(n) -> offset   --- descriptor (24 B) --->    bounds-checked, then read in place
    copy the payload in                                        (safe: copied out at once)
    Extents.free(offset) <-------- return (8 B, batched) ---   once the reader is done with it

Descriptor, little-endian (``DESC``): offset u32, length u32, sequence u64, epoch u32, flags u16,
magic u16 (0xFAB2). Flags: ``F_MORE`` (more fragments follow), ``F_CLOSE`` (the writer closed;
nothing follows), ``F_NEED`` (control, no payload: the writer is waiting for space, so return
what you hold now). Every descriptor has the next sequence number. Return: offset u32, length
u32 of a descriptor the reader got; the writer accepts it only if that exact extent is
outstanding, so a bogus, repeated or overlapping return is a ``ProtocolError``.

The allocator (``Extents``) hands out contiguous, 64-byte aligned extents: next to the previous
one while there is room there (a ring while the reader keeps up), else the best fit among the
free extents (when releases out of order have fragmented the area). The number of outstanding
extents is bounded so that every return fits in the return pipe: the reader never blocks on it.

The reader returns extents in batches (``RETURN_BATCH``), at once when the writer said it waits
(``F_NEED``), and before it closes. Both pipes are pollable: ``fileno()`` is the descriptor pipe,
level-triggered. A writer that dies closes its pipe ends, so a waiting reader sees the end of the
stream (``PeerDied`` unless ``F_CLOSE`` came first); a reader that dies closes the return pipe,
which wakes a writer waiting for space.

Trust: a safe reader gets private copies (one copy); an unsafe reader gets read-only views of the
shared area (zero copies) until it releases them. Every offset and length read from a pipe is
range-checked before use, so a hostile writer can only fail its own connection.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from fable._wire import close_fds
from fable.buffer import Buffer
from fable.config import settings
from fable.errors import (
    ConnectionClosed,
    NoSpace,
    PeerDied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.transports.base import Capabilities, DataPath, EndSpec, TransportInfo
from fable.transports.channel import SetupChannel
from fable.transports.message import (
    COPY_BURST,
    POLLERRS,
    POLLIN,
    POLLOUT,
    Claim,
    MessagePath,
    deadline_of,
    pipe_takes,
    time_left,
)
from fable.transports.pipe import ignore_sigpipe, new_pipe, pipe_ends
from fable.transports.shm import (
    check_peer_ring,
    check_sealed_memfd,
    forget,
    new_sealed_memfd,
    unmap,
)

__all__ = ["DESC", "INFO", "RETURN", "Extents", "ShmemPipePath"]

DESC = struct.Struct("<IIQIHH")
DSIZE = DESC.size  # 24
RETURN = struct.Struct("<II")
RSIZE = RETURN.size  # 8
MAGIC = 0xFAB2
F_MORE, F_CLOSE, F_NEED = 0x1, 0x2, 0x4
KNOWN_FLAGS = F_MORE | F_CLOSE | F_NEED
ALIGN = 64
MIN_CAPACITY = 1 << 16
MAX_CAPACITY = 1 << 31  # offsets are u32
RETURN_BATCH = 64  # returns the reader gathers before it writes them (one write)
DREAD = DSIZE * 2730  # descriptor bytes one read takes (just under 64 KiB)

_pack_desc = DESC.pack
_unpack_desc = DESC.unpack_from
_pack_ret = RETURN.pack


def _asize(n: int) -> int:
    """The bytes an allocation of ``n`` takes (Extents rounds up to ALIGN, at least ALIGN)."""
    return (n + ALIGN - 1) & ~(ALIGN - 1) or ALIGN


class Extents:
    """The writer's allocator over an area of ``capacity`` bytes (see the module docstring).

    ``alloc(n)`` returns the offset of ``n`` bytes (rounded up to ``ALIGN``) or None when no
    free extent is large enough or ``max_outstanding`` extents are out; ``free(start, n)`` gives
    back an allocation of ``n`` bytes (as allocated, or as shrunk by ``shrink``).

    The *current* extent ``[cur, cur_end)`` is kept out of the free maps: allocating from it is a
    bump of ``cur`` (the common case: messages laid one after another, like a ring; the path's
    ``send_many`` inlines that bump), and frees that touch it grow it. Only when it is too small
    does best fit over the free maps pick the next current extent."""

    def __init__(self, capacity: int, max_outstanding: int) -> None:
        self.capacity = capacity
        self.max_outstanding = max_outstanding
        self.count = 0  # extents out
        self.free_bytes = capacity
        self.cur = 0
        self.cur_end = capacity
        self._by_start: dict[int, int] = {}  # other free extents: start -> end
        self._by_end: dict[int, int] = {}  # end -> start

    def alloc(self, n: int) -> int | None:
        n = _asize(n)
        if self.count >= self.max_outstanding:
            return None
        start = self.cur
        if self.cur_end - start < n:
            if n > self.free_bytes or not self._switch(n):
                return None
            start = self.cur
        self.cur = start + n
        self.count += 1
        self.free_bytes -= n
        return start

    def _switch(self, n: int) -> bool:
        """Make the best-fitting free extent of at least ``n`` bytes the current one."""
        best, best_size = -1, 0
        for s, e in self._by_start.items():
            size = e - s
            if size >= n and (best < 0 or size < best_size):
                best, best_size = s, size
                if size == n:
                    break
        if best < 0:
            return False
        if self.cur_end > self.cur:
            self._insert(self.cur, self.cur_end)
        end = self._by_start.pop(best)
        del self._by_end[end]
        self.cur, self.cur_end = best, end
        return True

    def shrink(self, start: int, n: int, used: int) -> int:
        """Give back the tail of an allocation of ``n`` bytes beyond ``used``; the new size."""
        keep = _asize(used)
        if keep < n:
            self._give(start + keep, n - keep)
        return keep

    def free(self, start: int, n: int) -> None:
        self.count -= 1
        self._give(start, n)

    def _give(self, start: int, n: int) -> None:
        """``n`` bytes at ``start`` are free again: merge them with their free neighbours."""
        end = start + n
        self.free_bytes += n
        if end == self.cur:
            self.cur = self._by_end.pop(start, start)
            if self.cur != start:
                del self._by_start[self.cur]
        elif start == self.cur_end:
            nxt = self._by_start.pop(end, None)
            if nxt is not None:
                del self._by_end[nxt]
                end = nxt
            self.cur_end = end
        else:
            self._insert(start, end)

    def _insert(self, start: int, end: int) -> None:
        prev = self._by_end.pop(start, None)  # a free extent ending where this one starts
        if prev is not None:
            del self._by_start[prev]
            start = prev
        nxt = self._by_start.pop(end, None)  # one starting where this one ends
        if nxt is not None:
            del self._by_end[nxt]
            end = nxt
        if end == self.cur:
            self.cur = start
        elif start == self.cur_end:
            self.cur_end = end
        else:
            self._by_start[start] = end
            self._by_end[end] = start


class _Claim(Claim):
    """A claim of extents: ``parts[i]`` is (offset, size asked) of buffer i; once committed,
    ``sent`` lists what is described: (offset, size asked, bytes used, flags)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[int, int, int, int]] = []


def _capacity_ok(capacity: object) -> bool:
    return (
        isinstance(capacity, int)
        and MIN_CAPACITY <= capacity <= MAX_CAPACITY
        and capacity % ALIGN == 0
    )


def _create(options: dict[str, Any]) -> tuple[EndSpec, EndSpec]:
    capacity = int(options.get("capacity") or settings().ring_size)
    if not _capacity_ok(capacity):
        raise ValueError(f"shmem-pipe capacity must be in {MIN_CAPACITY}..{MAX_CAPACITY}")
    fd = new_sealed_memfd("fable-shmem-pipe", 2 * capacity)
    pipes: list[int] = []
    try:
        for _ in range(4):
            pipes.extend(new_pipe())
        d0r, d0w, d1r, d1w, r0r, r0w, r1r, r1w = pipes
        peer_fd = os.dup(fd)
    except BaseException:
        close_fds([fd, *pipes])
        raise
    params = {"capacity": capacity}
    # direction 0: initiator writes descriptors into d0, reads returns from r0; direction 1 mirrors
    # Each side: [memfd, descriptors in, descriptors out, returns in, returns out]
    return (
        EndSpec([fd, d1r, d0w, r0r, r1w], params),
        EndSpec([peer_fd, d0r, d1w, r1r, r0w], params),
    )


class ShmemPipePath(MessagePath):
    """A DataPath over a shared area per direction and descriptor/return pipes."""

    def __init__(
        self, spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0
    ) -> None:
        capacity = spec.params.get("capacity")
        fds = list(spec.fds)
        try:
            if len(spec.fds) != 5:
                raise ProtocolError(f"expected 5 fds for shmem-pipe, got {len(spec.fds)}")
            if not _capacity_ok(capacity):
                raise ProtocolError(f"malformed shmem-pipe capacity {capacity!r}")
            assert isinstance(capacity, int)
            if role == 1:
                check_peer_ring(capacity)
            check_sealed_memfd(fds[0], 2 * capacity)
            pipe_ends(fds, (os.O_RDONLY, os.O_WRONLY, os.O_RDONLY, os.O_WRONLY), role)
            fd, din, dout, rin, rout = fds
            mm = mmap.mmap(fd, 2 * capacity)
        except BaseException:
            close_fds(fds)
            raise
        os.close(fd)
        ignore_sigpipe()
        cfg = settings()
        self._init_messages("shmem-pipe", safe, epoch, cfg, setup)
        self._cap = capacity
        self._mm = mm
        self._mv = memoryview(mm)
        self._tx_base = 0 if role == 0 else capacity
        self._rx_base = capacity - self._tx_base
        self._din, self._dout, self._rin, self._rout = din, dout, rin, rout
        for f in (din, dout, rin, rout):
            os.set_blocking(f, False)
        self.max_fragment = capacity // 4
        self.max_write = capacity // 2
        # writer
        ret_pipe = int(fcntl.fcntl(rin, fcntl.F_GETPIPE_SZ))
        self._dpipe = int(fcntl.fcntl(dout, fcntl.F_GETPIPE_SZ))  # fixed at setup
        self._extents = Extents(capacity, max(16, ret_pipe // (2 * RSIZE)))
        self._wseq = 0
        self._out = bytearray()  # descriptors not yet written
        self._end_queued = False  # the close descriptor (or END of the epoch) is in _out
        self._wlock = threading.Lock()
        self._claims: deque[_Claim] = deque()
        self._described: dict[int, int] = {}  # outstanding offset -> length described
        self._rbuf = b""  # a partial return read from the pipe
        self._need_sent = False
        # reader
        self._dbuf = bytearray(DREAD)
        self._dpos = self._dend = 0
        self._rseq = 0
        self._eof = False
        self._rets = bytearray()  # returns not yet written
        self._nrets = 0
        # held while returns are written, and while the fds close: the hot recv returns its
        # batch without ``_reading``, and a close from another thread may write the rest
        self._ret_lock = threading.Lock()
        self._writer_waits = False
        self._pinned = 0
        self._pin_limit = capacity // 2
        self._rpoll = select.poll()  # "is there input now" (poll(0))
        self._rpoll.register(din, POLLIN)
        self._rwait = select.poll()  # waiting for input (every wait polls the stop fd too)
        self._rwait.register(din, POLLIN)
        self._rwait.register(self._stop_fd, POLLIN)
        self._wpoll = select.poll()  # waiting for returns (or room for descriptors)
        self._wpoll.register(rin, POLLIN)
        self._wpoll.register(self._stop_fd, POLLIN)

    # ================================================================= writing
    def _describe(self, off: int, n: int, flags: int) -> None:
        self._out += _pack_desc(off, n, self._wseq, self.epoch, flags, MAGIC)
        self._wseq += 1
        if n:
            self._described[off] = n

    def _write_out(self) -> bool:
        """Write pending descriptors without blocking; True when none is left. A reading or
        closing thread may write too: the lock keeps two writers from sending the same bytes
        (appending to ``_out`` needs no lock)."""
        with self._wlock:
            return self._write_out_locked()

    def _write_out_locked(self) -> bool:
        out = self._out
        while out:
            try:
                n = os.write(self._dout, bytes(out))  # a snapshot: _out stays resizable
            except BlockingIOError:
                return False
            except (BrokenPipeError, ConnectionResetError):
                raise self._fail(self._gone()) from None
            del out[:n]
        return True

    def _take_returns(self) -> int:
        """Read the returns that are there (never waiting); how many extents came back.
        Raises PeerDied/ConnectionClosed when the reader is gone."""
        got = 0
        while True:
            try:
                data = os.read(self._rin, 65536)
            except BlockingIOError:
                return got
            if not data:
                raise self._fail(self._gone())
            data = self._rbuf + data if self._rbuf else data
            whole = len(data) - len(data) % RSIZE
            self._rbuf = data[whole:]
            described = self._described
            for off, n in RETURN.iter_unpack(memoryview(data)[:whole]):
                if described.pop(off, None) != n:
                    raise self._fail(
                        ProtocolError(f"the peer returned extent ({off}, {n}), never described")
                    )
                self._extents.free(off, _asize(n))
                got += 1
            if len(data) < 65536:
                return got

    def _alloc(self, n: int, deadline: float | None, timeout: float | None) -> int:
        """An extent of ``n`` bytes, waiting for returns while the area is full."""
        off = self._extents.alloc(n)
        if off is not None:
            return off
        self._need_sent = False
        while True:
            self._take_returns()
            off = self._extents.alloc(n)
            if off is not None:
                return off
            ms = self._slice_ms(
                deadline, timeout, "the connection is full", "no room before the timeout"
            )
            if not self._need_sent:
                # The reader returns extents in batches: ask it to return what it holds now.
                self._describe(0, 0, F_NEED)
                self._need_sent = True
            self._write_out()
            self._writer_wait(ms)

    def _flush_out(self, deadline: float | None, timeout: float | None) -> None:
        while not self._write_out():
            self._writer_wait(
                self._slice_ms(
                    deadline,
                    timeout,
                    "the descriptor pipe is full; the rest stays queued",
                    "the peer did not take the queued messages in time",
                )
            )

    def _describable(self) -> bool:
        """Whether one more descriptor goes into the pipe now: nothing queued before it, and
        room for it (``send`` with a timeout checks this before it takes a message, so that a
        full descriptor pipe gives WouldBlock/Timeout with nothing sent)."""
        return self._write_out() and pipe_takes(self._dout, self._dpipe, DSIZE)

    def _wait_describable(self, deadline: float | None, timeout: float | None) -> None:
        while not self._describable():
            ms = self._slice_ms(
                deadline, timeout, "the connection is full", "no room before the timeout"
            )
            if self._writer_wait(ms, room=True):
                time.sleep(0.001)  # writable, but not the slack we count on: poll cannot wait
                # for "this much room", so nap instead of spinning

    def _writer_wait(self, ms: int, room: bool = False) -> bool:
        """Wait up to ``ms`` for returns, or for room in the descriptor pipe while descriptors
        wait to be written (or ``room`` is asked for); returns that came are taken. True when
        the pipe polled writable."""
        poll = self._wpoll
        writing = bool(self._out) or room
        writable = False
        if writing:
            poll.register(self._dout, POLLOUT)
        try:
            for fd, ev in poll.poll(ms):
                if fd == self._rin:
                    self._take_returns()  # raises once the reader is gone
                elif fd == self._stop_fd:
                    continue  # the next slice raises
                elif ev & POLLERRS:
                    raise self._fail(self._gone())
                else:
                    writable = True
        finally:
            if writing:
                poll.unregister(self._dout)
        self._check()
        return writable

    def _getwritebuf(self, size: int, timeout: float | None) -> list[Buffer]:
        if size < 0 or size > self.max_write:
            raise ValueError(
                f"size must be in 0..{self.max_write} (commit larger messages in parts, more=True)"
            )
        deadline = deadline_of(timeout)
        frag = self.max_fragment
        sizes = [min(frag, size - k) for k in range(0, size, frag)] or [0]
        claim = _Claim()
        got: list[int] = []
        try:
            for part in sizes:
                got.append(self._alloc(part, deadline, timeout))
        except BaseException:
            for off, part in zip(got, sizes, strict=False):
                self._extents.free(off, _asize(part))
            raise
        base = self._tx_base
        claim.parts = list(zip(got, sizes, strict=True))
        self._claims.append(claim)
        return self._hand_out(claim, [self._mv[base + o : base + o + n] for o, n in claim.parts])

    def _commit(self, bufs: Sequence[Buffer], nbytes: int, flush: bool, more: bool) -> None:
        claim, carried = self._take_claim(bufs, nbytes)
        sent = [(*claim.parts[i], n, F_MORE) for i, n in carried]
        sent[-1] = (*sent[-1][:3], F_MORE if more else 0)
        claim.sent = sent
        if len(carried) < len(claim.parts):
            keep = {i for i, _ in carried}
            for i, (off, cap) in enumerate(claim.parts):
                if i not in keep:
                    self._extents.free(off, _asize(cap))  # never described
        if not more:
            self._msgs_out += 1
        self._bytes_out += nbytes
        self._advance()
        if flush:
            self._flush_out(None, None)

    def _advance(self) -> None:
        """Describe committed claims at the head (allocation order holds later ones back)."""
        claims = self._claims
        while claims and claims[0].committed:
            for off, cap, used, flags in claims.popleft().sent:
                if used == 0:
                    self._extents.free(off, _asize(cap))
                    self._describe(0, 0, flags)
                else:
                    self._extents.shrink(off, _asize(cap), used)
                    self._describe(off, used, flags)

    def _abort(self, bufs: Iterable[Buffer]) -> None:
        claims = self._take_aborted(bufs)
        for c in claims:
            self._claims.remove(c)
            for off, cap in c.parts:
                self._extents.free(off, _asize(cap))
        if claims:
            self._advance()

    def _flush(self, timeout: float | None) -> None:
        self._advance()
        self._flush_out(deadline_of(timeout), timeout)

    def _send(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        if timeout is not None:  # nothing is taken unless its descriptor goes out at once
            self._wait_describable(deadline_of(timeout), timeout)
        self._put(data, deadline_of(timeout), timeout)
        self._flush_out(None, None)

    def _put(
        self, data: bytes | bytearray | memoryview, deadline: float | None, timeout: float | None
    ) -> None:
        """Describe one message of any size (not written to the pipe yet): copied into one
        extent, or sent in parts when it is large or an open claim must go first."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self._claims or n > self.max_fragment:
            self._send_in_parts(mv, timeout)
            return
        off = 0
        if n:
            off = self._alloc(n, deadline, timeout)
            start = self._tx_base + off
            self._mv[start : start + n] = mv
        self._describe(off, n, 0)
        self._msgs_out += 1
        self._bytes_out += n

    def _send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None
    ) -> int:
        deadline = deadline_of(timeout)
        count = 0
        ext = self._extents
        mv, base, epoch = self._mv, self._tx_base, self.epoch
        out, described, frag = self._out, self._described, self.max_fragment
        try:
            for m in msgs:
                n = len(m)
                if timeout is not None:  # each taken only if its descriptor goes out now
                    self._wait_describable(deadline, time_left(deadline, timeout))
                if self._claims or n > frag or not n or (type(m) is memoryview and m.itemsize != 1):
                    self._put(m, deadline, time_left(deadline, timeout))
                    count += 1
                    continue
                # Extents.alloc inlined for the common case, a bump of the current extent (and
                # _asize, for n > 0); then _describe inlined
                size = (n + ALIGN - 1) & ~(ALIGN - 1)
                off = ext.cur
                if ext.cur_end - off >= size and ext.count < ext.max_outstanding:
                    ext.cur = off + size
                    ext.count += 1
                    ext.free_bytes -= size
                else:
                    left = time_left(deadline, timeout)
                    off = self._alloc(n, deadline, left)
                mv[base + off : base + off + n] = m
                out += _pack_desc(off, n, self._wseq, epoch, 0, MAGIC)
                self._wseq += 1
                described[off] = n
                self._msgs_out += 1
                self._bytes_out += n
                count += 1
                if len(out) >= 4096:
                    self._write_out()
        except (WouldBlock, Timeout):
            if timeout is None:  # pragma: no cover - cannot happen without a timeout
                raise
        self._flush_out(None, None)
        return count

    # ================================================================= reading
    def _fill(self) -> int:
        """Read descriptors: >0 bytes, 0 at the end of the stream, -1 when none is there."""
        tail = self._dend - self._dpos
        if tail:
            self._dbuf[:tail] = self._dbuf[self._dpos : self._dend]
        self._dpos, self._dend = 0, tail
        try:
            n = os.readv(self._din, [memoryview(self._dbuf)[tail:]])
        except BlockingIOError:
            return -1
        if n == 0:
            self._eof = True
            return 0
        self._dend += n
        return n

    def _next(self) -> tuple[int, int, int] | None:
        """The next data descriptor (offset, length, flags), checked; None when none is whole."""
        while self._dend - self._dpos >= DSIZE:
            off, n, seq, epoch, flags, magic = _unpack_desc(self._dbuf, self._dpos)
            self._dpos += DSIZE
            if magic != MAGIC or flags & ~KNOWN_FLAGS:
                raise self._fail(ProtocolError(f"malformed descriptor (magic {magic:#x})"))
            if seq != self._rseq:
                raise self._fail(ProtocolError(f"sequence gap: expected {self._rseq}, got {seq}"))
            if epoch != self.epoch:
                raise self._fail(ProtocolError(f"descriptor of epoch {epoch} on {self.epoch}"))
            self._rseq = seq + 1
            if flags & F_NEED:
                self._writer_waits = True
                self._return_now()
                continue
            if flags & F_CLOSE:
                if (self._stash and self._stash[-1][1]) or self._mid:
                    raise self._fail(ProtocolError("close in the middle of a message"))
                self._peer_closed = True
                return None
            if n > self.max_fragment or off + n > self._cap:
                raise self._fail(
                    ProtocolError(f"extent ({off}, {n}) lies outside the {self._cap} B area")
                )
            self._writer_waits = False
            return off, n, flags
        return None

    def _give_back(self, off: int, n: int) -> None:
        if n == 0:
            return
        self._rets += _pack_ret(off, n)
        self._nrets += 1
        if self._nrets >= RETURN_BATCH or self._writer_waits:
            self._return_now()

    def _return_now(self) -> None:
        with self._ret_lock:
            rets = self._rets
            while rets and not self._closed:
                try:
                    # a copy: the hot recv of another thread may append meanwhile (an exported
                    # bytearray cannot grow); what was written goes from the front
                    k = os.write(self._rout, bytes(rets))
                except BlockingIOError:
                    return  # cannot happen while returns are bounded (see Extents); kept
                except (BrokenPipeError, ConnectionResetError):
                    rets.clear()  # the writer is gone: nobody needs them
                    break
                del rets[:k]
            self._nrets = 0

    def _gather(self, timeout: float | None) -> None:
        if self._stash and not self._stash[-1][1]:
            return
        deadline = deadline_of(timeout)
        while True:
            d = None if self._peer_closed else self._next()
            if d is not None:
                off, n, flags = d
                base = self._rx_base + off
                data = self._mm[base : base + n]
                self._give_back(off, n)
                self._stash_fragment(data, bool(flags & F_MORE), deadline, timeout)
                if not flags & F_MORE:
                    return
                continue
            if self._peer_closed:
                raise ConnectionClosed("the peer closed the connection")
            r = self._fill()
            if r > 0:
                continue
            if r == 0:
                raise self._gone_on_read()
            self._wait_readable(deadline, timeout)

    def _gone_on_read(self) -> BaseException:
        self._setup.peer_state()  # raises the reason if the peer refused the first offer
        if self._stash:
            return PeerDied("the peer vanished in the middle of a message")
        return PeerDied("the peer vanished without closing")

    def _wait_readable(self, deadline: float | None, timeout: float | None) -> None:
        # Returns wait for their batch: a writer short of space says so (F_NEED), which wakes us.
        self._rwait.poll(
            self._slice_ms(
                deadline,
                timeout,
                "no message is ready",
                "no message before the timeout",
                reading=True,
            )
        )
        self._check()

    def recv(self, timeout: float | None = None) -> bytes:
        if not (self._stash or self._mid or self._dead):
            dpos = self._dpos
            if self._dend - dpos >= DSIZE:
                off, n, seq, epoch, flags, magic = _unpack_desc(self._dbuf, dpos)
                if (
                    not flags
                    and magic == MAGIC
                    and seq == self._rseq
                    and epoch == self.epoch
                    and n <= self.max_fragment
                    and off + n <= self._cap
                ):
                    self._dpos = dpos + DSIZE
                    self._rseq = seq + 1
                    self._writer_waits = False
                    self._msgs_in += 1
                    if not n:
                        return b""
                    base = self._rx_base + off
                    try:
                        data = self._mm[base : base + n]
                    except (AttributeError, ValueError):  # closed by another thread meanwhile
                        self._check()
                        raise
                    self._bytes_in += n
                    self._rets += _pack_ret(off, n)
                    self._nrets += 1
                    if self._nrets >= RETURN_BATCH:
                        self._return_now()
                    return data
        return self._recv_slow(timeout)

    def _getreadbuf(self) -> list[Buffer]:
        out = self._start_getreadbuf()
        copied = 0
        while self._held < self._read_limit and not (self.safe and copied >= COPY_BURST):
            d = None if self._peer_closed else self._next()
            if d is None:
                if out or self._peer_closed or self._fill() <= 0:
                    break
                continue
            off, n, flags = d
            more = bool(flags & F_MORE)
            base = self._rx_base + off
            if self.safe or n == 0:
                view = memoryview(self._mm[base : base + n])
                self._give_back(off, n)
                token: Any = None
            else:
                view = self._mv[base : base + n].toreadonly()
                token = (off, n)
                self._pinned += n
            out.append(Buffer(view, self, token, more=more, epoch=self.epoch, writable=False))
            self._count_in(more, n)
            copied += n
        if out:
            self._mid = out[-1].more
            return out
        self._return_now()
        if self._peer_closed:
            nxt = self._successor()
            if nxt is not None:
                return nxt.getreadbuf()
            raise ConnectionClosed("the peer closed the connection")
        if self._eof:
            raise self._gone_on_read()
        if self._pinned >= self._pin_limit:
            raise NoSpace(f"read buffers hold {self._pinned} B of the area; copy and release some")
        return out

    def release(self, buf: Buffer) -> None:
        token = self._take_read(buf)
        if isinstance(token, tuple):
            off, n = token
            self._pinned -= n
            if not self._closed:
                self._give_back(off, n)  # at once if the writer said it waits (F_NEED)

    # ================================================================= the rest
    def poll_prepare(self) -> bool:
        if self._dead or self._stash or self._peer_closed or self._eof:
            return True
        if self._dend - self._dpos >= DSIZE:
            return True
        return bool(self._rpoll.poll(0))

    def fileno(self) -> int:
        self._check()
        return self._din

    def write_buffers_held(self) -> int:
        return sum(len(c.parts) for c in self._claims if not c.committed)

    def _pending_bytes(self) -> int:
        return len(self._out)

    def _say_goodbye(self, linger: float | None) -> None:
        self._return_now()
        self._write_end(linger)

    def _write_end(self, timeout: float | None) -> bool:
        if not self._end_queued:
            self._claims = deque(c for c in self._claims if c.committed)
            self._advance()
            self._describe(0, 0, F_CLOSE)
            self._end_queued = True
        if timeout == 0:
            return self._write_out()
        self._flush_out(deadline_of(timeout), timeout)
        return True

    def _free(self, clean: bool) -> None:
        with self._ret_lock:
            close_fds([self._din, self._dout, self._rin, self._rout])
        if "_mm" in self.__dict__:  # not freed already
            unmap(self._mm, self._mv)
            forget(self, "_mm", "_mv")


def _open(spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0) -> DataPath:
    return ShmemPipePath(spec, role, safe, setup, epoch)


INFO = TransportInfo(
    name="shmem-pipe",
    caps=Capabilities(
        copies_unsafe=0,
        copies_safe=1,
        wait="pipe",
        pollable=True,
        cross_host=False,
        spins=False,
    ),
    summary="shared area with a writer-side allocator; descriptors and returns through pipes",
    create=_create,
    open=_open,
)
