"""The pure-Python reference ring: the executable model of the ring protocol in ``layout.py``.

Contract (verified by tests/test_ring.py; the C core must behave identically):
- ``RingWriter.reserve(length)`` claims room for one record and returns ``(pos, offset, room)``
  (``offset``: where the payload goes in the ring's memory) or None while the ring is too full.
  Reserved records become visible to the reader only through ``publish()``, strictly in
  reservation order, so an earlier one that is neither committed nor aborted holds later ones back.
- ``commit(pos, length, flags)`` fixes a record's final length (at most ``room``) and flags;
  ``abort(pos)`` turns it into padding the reader skips. Sequence numbers are assigned at
  publication, in position order, one per record (padding has none).
- ``RingReader.peek()`` returns the next record ``(pos, offset, length, flags, seq)`` or None;
  ``release(pos)`` gives it back, in any order; HEAD advances over the released prefix only, so
  the writer never reuses memory a read buffer still points into.
- ``write(data, flags)`` and ``read()`` are the one-call forms (reserve+copy+commit+publish;
  peek+copy+release).
- Everything read from the peer's side (TAIL, HEAD, record headers) is read once and
  range-checked: a violation raises ``ProtocolError``; nothing outside the ring is ever touched.

x86-64 only: 8-byte positions are stored and loaded with single 8-byte accesses (a memoryview
cast to 'Q'), and total store order stands in for the release/acquire fences the C core issues.
This module makes no system call and never waits; waiting belongs to the transport.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

from fable.errors import ConnectionClosed, ProtocolError
from fable.ring import layout as L

__all__ = ["RingReader", "RingWriter", "format_ring", "ring_doorbell"]

if platform.machine() not in ("x86_64", "AMD64"):  # pragma: no cover
    raise ImportError("the pure-Python ring relies on x86-64 store ordering")


def format_ring(mem: memoryview, capacity: int) -> None:
    """Write a fresh ring header into ``mem`` (``HEADER_SIZE + capacity`` bytes, zeroed)."""
    if capacity < L.MIN_CAPACITY or capacity > L.MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two in {L.MIN_CAPACITY}..2^40")
    if len(mem) < L.HEADER_SIZE + capacity:
        raise ValueError("memory too small for the ring")
    q = mem.cast("B").cast("Q")
    i = mem.cast("B").cast("I")
    q[L.CAPACITY // 8] = capacity
    i[L.VERSION_OFF // 4] = L.VERSION
    i[L.HEADER_SIZE_OFF // 4] = L.HEADER_SIZE
    q[L.MAGIC_OFF // 8] = L.MAGIC  # last: a half-formatted ring is never taken for a ring


def _attach(mem: memoryview) -> tuple[memoryview, memoryview, memoryview, memoryview, int]:
    b = mem.cast("B")
    if len(b) < L.HEADER_SIZE + L.MIN_CAPACITY or len(b) % 8:
        raise ProtocolError("shared memory too small for a ring")
    q, i, h = b.cast("Q"), b.cast("I"), b.cast("H")
    if q[L.MAGIC_OFF // 8] != L.MAGIC:
        raise ProtocolError("not a fable ring (bad magic)")
    if i[L.VERSION_OFF // 4] != L.VERSION or i[L.HEADER_SIZE_OFF // 4] != L.HEADER_SIZE:
        raise ProtocolError(f"ring format version {i[L.VERSION_OFF // 4]}, expected {L.VERSION}")
    cap = q[L.CAPACITY // 8]
    if cap < L.MIN_CAPACITY or cap & (cap - 1) or L.HEADER_SIZE + cap > len(b):
        raise ProtocolError(f"ring capacity {cap} does not fit the shared memory")
    return b, q, i, h, cap


class _Slot:
    __slots__ = ("flags", "length", "pos", "room", "state")

    def __init__(self, pos: int, room: int, state: int = 0, length: int = -1) -> None:
        self.pos = pos
        self.room = room
        self.state = state  # 0 reserved, 1 committed, 2 aborted or padding
        self.length = length  # committed length, or bytes to skip for padding
        self.flags = 0


class RingWriter:
    """The writing side of one ring."""

    def __init__(self, mem: memoryview, *, epoch: int = 0, first_seq: int = 0) -> None:
        self._b, self._q, self._i, self._h, self.capacity = _attach(mem)
        self._mask = self.capacity - 1
        self.epoch = epoch
        self.seq = first_seq
        self._tail = self._q[L.TAIL // 8]  # published (we are its only writer)
        self._claim = self._tail  # end of reserved space
        self._head_cache = self._q[L.HEAD // 8]
        # the peer may have written both (it created the ring): the reader's HEAD can be
        # neither past what was published nor a whole ring behind it
        if self._head_cache > self._tail or self._tail - self._head_cache > self.capacity:
            raise ProtocolError(
                f"ring positions out of range at setup (HEAD {self._head_cache}, TAIL {self._tail})"
            )
        self._slots: list[_Slot] = []
        self.max_record = self.capacity // 4 - L.RECORD_HEADER

    # ------------------------------------------------------------------ space
    def _head(self) -> int:
        head = self._q[L.HEAD // 8]  # the reader's: read once, then checked
        if head < self._head_cache or head > self._tail:
            raise ProtocolError(f"the reader moved HEAD to {head} (published {self._tail})")
        self._head_cache = head
        return head

    def free(self) -> int:
        """Bytes free now (re-reading HEAD)."""
        return self.capacity - (self._claim - self._head())

    def _fits(self, need: int) -> bool:
        if self.capacity - (self._claim - self._head_cache) >= need:
            return True
        return self.capacity - (self._claim - self._head()) >= need

    def reserve(self, length: int) -> tuple[int, int, int] | None:
        """Room for a record of ``length`` payload bytes, or None while the ring is too full."""
        if length < 0 or length > self.max_record:
            raise ValueError(f"record length must be in 0..{self.max_record}")
        span = L.record_span(length)
        off = self._claim & self._mask
        to_end = self.capacity - off
        pad = to_end if to_end < span else 0
        if not self._fits(pad + span):
            return None
        if pad:
            self._slots.append(_Slot(self._claim, 0, state=2, length=to_end))
            self._claim += pad
        pos = self._claim
        self._slots.append(_Slot(pos, length))
        self._claim += span
        return pos, L.HEADER_SIZE + (pos & self._mask) + L.RECORD_HEADER, length

    def _slot(self, pos: int) -> _Slot:
        for s in self._slots:
            if s.pos == pos:
                if s.state:
                    raise ValueError("record already committed or aborted")
                return s
        raise ValueError(f"no reserved record at position {pos}")

    def commit(self, pos: int, length: int, flags: int = 0) -> None:
        slot = self._slot(pos)
        if length < 0 or length > slot.room:
            raise ValueError(f"length must be in 0..{slot.room}")
        if flags & ~(L.F_MORE | L.F_CLOSE):
            raise ValueError("commit takes F_MORE and F_CLOSE only")
        slot.length, slot.flags, slot.state = length, flags, 1

    def abort(self, pos: int) -> None:
        slot = self._slot(pos)
        slot.state = 2
        slot.length = L.record_span(slot.room)  # padding over the whole reservation

    def publish(self) -> int:
        """Make committed slots visible, in order, up to the first open one; returns how many
        records (not counting padding) were published."""
        q, i, h = self._q, self._i, self._h
        n = 0
        tail = self._tail
        slots = self._slots
        k = 0
        while k < len(slots) and slots[k].state:
            s = slots[k]
            base = L.HEADER_SIZE + (s.pos & self._mask)
            if s.state == 2:
                gap = s.length  # bytes to skip
                if gap >= L.RECORD_HEADER:
                    i[(base + L.REC_LENGTH) // 4] = gap - L.RECORD_HEADER
                    h[(base + L.REC_FLAGS) // 2] = L.F_PAD
                    q[(base + L.REC_SEQ) // 8] = 0
                    i[(base + L.REC_EPOCH) // 4] = self.epoch
                    i[(base + L.REC_SKIP) // 4] = 0
                tail = s.pos + gap
            else:
                i[(base + L.REC_LENGTH) // 4] = s.length
                h[(base + L.REC_FLAGS) // 2] = s.flags
                h[(base + L.REC_FLAGS) // 2 + 1] = 0
                q[(base + L.REC_SEQ) // 8] = self.seq
                i[(base + L.REC_EPOCH) // 4] = self.epoch
                i[(base + L.REC_SKIP) // 4] = L.align8(s.room) - L.align8(s.length)
                self.seq += 1
                n += 1
                tail = s.pos + L.record_span(s.room)
            k += 1
        if k:
            del slots[:k]
            self._tail = tail
            # SYNC POINT: release-store of TAIL; pairs with the reader's acquire-load of TAIL in
            # RingReader.peek (x86-64: a plain single 8-byte store; records were written first).
            q[L.TAIL // 8] = tail
        return n

    def write(self, data: bytes | bytearray | memoryview, flags: int = 0) -> bool:
        """Reserve, copy, commit and publish one record; False when the ring is too full."""
        n = len(data)
        got = self.reserve(n)
        if got is None:
            return False
        pos, offset, _ = got
        self._b[offset : offset + n] = data
        self.commit(pos, n, flags)
        self.publish()
        return True

    @property
    def pending(self) -> int:
        """Reserved slots not yet published."""
        return len(self._slots)


class RingReader:
    """The reading side of one ring."""

    def __init__(self, mem: memoryview, *, epoch: int = 0, first_seq: int = 0) -> None:
        self._b, self._q, self._i, self._h, self.capacity = _attach(mem)
        self._mask = self.capacity - 1
        self.epoch = epoch
        self.seq = first_seq
        self._head = self._q[L.HEAD // 8]  # released (we are its only writer)
        self._pos = self._head  # next record to read
        self._tail_cache = self._head
        self._released: dict[int, int] = {}  # pos -> span of records released out of order
        self._spans: dict[int, int] = {}  # pos -> span of records handed out, not released
        self._outstanding: list[int] = []  # positions handed out, in order

    def _tail(self) -> int:
        # SYNC POINT: acquire-load of TAIL; pairs with the writer's release-store in publish.
        tail = self._q[L.TAIL // 8]
        if tail < self._tail_cache or tail - self._head > self.capacity:
            raise ProtocolError(f"the writer moved TAIL to {tail} (read up to {self._pos})")
        self._tail_cache = tail
        return tail

    def available(self) -> bool:
        """Whether a record (or padding) is published beyond what was read."""
        return self._tail_cache > self._pos or self._tail() > self._pos

    def peek(self) -> tuple[int, int, int, int, int] | None:
        """The next published record, or None; skips padding. Each call hands out a new record
        (release it with ``release``)."""
        i, h, q = self._i, self._h, self._q
        while True:
            pos = self._pos
            tail = self._tail_cache if self._tail_cache > pos else self._tail()
            if tail <= pos:
                return None
            off = pos & self._mask
            to_end = self.capacity - off
            if to_end < L.RECORD_HEADER:  # implicit gap at the end: skip it
                if tail - pos < to_end:
                    raise ProtocolError("TAIL ends inside the gap at the end of the data area")
                self._skip(pos, to_end)
                continue
            if tail - pos < L.RECORD_HEADER:
                raise ProtocolError("TAIL ends inside a record header")
            base = L.HEADER_SIZE + off
            length = i[(base + L.REC_LENGTH) // 4]
            flags = h[(base + L.REC_FLAGS) // 2]
            if flags & ~L.KNOWN_FLAGS or (flags & L.F_PAD and flags != L.F_PAD):
                raise ProtocolError(f"record flags {flags:#x} at position {pos}")
            skip = i[(base + L.REC_SKIP) // 4]
            if skip & 7:
                raise ProtocolError(f"record at {pos} skips {skip} B (not a multiple of 8)")
            span = L.record_span(length, skip)
            if span > to_end or span > tail - pos:
                raise ProtocolError(f"record of {length} B at {pos} runs past its bounds")
            if flags == L.F_PAD:
                self._skip(pos, span)
                continue
            seq = q[(base + L.REC_SEQ) // 8]
            if seq != self.seq:
                raise ProtocolError(f"sequence gap: expected {self.seq}, got {seq}")
            epoch = i[(base + L.REC_EPOCH) // 4]
            if epoch != self.epoch:
                raise ProtocolError(f"record of epoch {epoch} in epoch {self.epoch}")
            if flags & L.F_CLOSE and length:
                raise ProtocolError("close record with a payload")
            self.seq += 1
            self._pos = pos + span
            self._outstanding.append(pos)
            self._spans[pos] = span
            return pos, base + L.RECORD_HEADER, length, flags, seq

    def _skip(self, pos: int, span: int) -> None:
        self._pos = pos + span
        self._outstanding.append(pos)
        self._spans[pos] = span
        self.release(pos)

    def read(self) -> tuple[bytes, int] | None:
        """Copy out and release the next record: (payload, flags), or None."""
        rec = self.peek()
        if rec is None:
            return None
        pos, offset, length, flags, _ = rec
        data = self._b[offset : offset + length].tobytes()
        self.release(pos)
        return data, flags

    def release(self, pos: int) -> None:
        """Give a record back; HEAD moves over every record released so far in order."""
        span = self._spans.pop(pos, None)
        if span is None:
            raise ValueError(f"no record at position {pos} is held (released twice?)")
        self._released[pos] = span
        head = self._head
        out = self._outstanding
        k = 0
        while k < len(out) and out[k] in self._released:
            head = out[k] + self._released.pop(out[k])
            k += 1
        if k:
            del out[:k]
            self._head = head
            # SYNC POINT: release-store of HEAD; pairs with the writer's acquire-load of HEAD
            # in RingWriter._head (the writer reuses the space only after this store).
            self._q[L.HEAD // 8] = head

    @property
    def held(self) -> int:
        """Records handed out and not yet released."""
        return len(self._outstanding)


# ---------------------------------------------------------------------------------------------
# PyRing: the reference ring behind the same interface as fable._core.Ring (FABLE_BACKEND=py).
#
# Python has no atomic read-modify-write on shared memory, so the doorbell protocol is adapted:
# the writer never clears the peer's waiters flag (only the sleeping side clears its own bits),
# so it cannot erase a bit set concurrently; it rings whenever a bit is set (spurious wake-ups
# are allowed). A lock acquire/release is a locked instruction, i.e. a full fence on x86-64: it
# orders our position store before our flag load (and the flag store before the position load
# on the sleeping side). Futex waits use short slices as a safety net all the same.

import ctypes  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

_FENCE = threading.Lock()
_SYS_FUTEX = 202
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_SAFETY_NS = 10_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall


def ring_doorbell(fd: int) -> None:
    """One byte on the peer's readiness socket ``fd``, never blocking: MSG_DONTWAIT is a
    flag of this call, which no peer can clear (O_NONBLOCK belongs to the file description the
    peer shares). A full socket is readable already; a broken one is the peer's loss."""
    s = socket.socket(fileno=fd)
    try:
        s.send(b"\x01", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except OSError:
        pass
    finally:
        s.detach()


def _fence() -> None:
    _FENCE.acquire()
    _FENCE.release()


class PyRing:
    """``fable._core.Ring``'s interface over :class:`RingWriter`/:class:`RingReader`."""

    def __init__(
        self,
        mem: memoryview,
        writer: bool,
        epoch: int = 0,
        first_seq: int = 0,
        eventfd: int = -1,
    ) -> None:
        self._mem = memoryview(mem).cast("B")
        self._side: RingWriter | RingReader
        if writer:
            self._side = self._w = RingWriter(self._mem, epoch=epoch, first_seq=first_seq)
        else:
            self._side = self._r = RingReader(self._mem, epoch=epoch, first_seq=first_seq)
        self._writer = writer
        self._evfd = eventfd
        self._i = self._mem.cast("I")
        self._q = self._mem.cast("Q")
        self._u32 = (ctypes.c_uint32 * (L.HEADER_SIZE // 4)).from_buffer(self._mem)
        self.capacity = self._side.capacity
        self.max_record = self._w.max_record if writer else 0
        self.epoch = epoch
        self.gate = False
        self.msgs = self.nbytes = 0  # what write_many moved (send/recv count in the slow path)
        self._slow: Any = None
        self._many: Any = None
        self._into: Any = None
        self._frag = 0
        self._stop = False
        # the buffer API's counters, kept here as in the C ring (the data path's Python keeps them)
        self.lent = self.pinned = self.open_parts = 0
        self.polled = self.armed = self.signalled = False

    # -- the Connection's hot path: everything goes to the slow path in this backend ------
    def hot(self, slow: Any, frag: int = 0, many: Any = None, into: Any = None) -> None:
        self._slow, self._many, self._into = slow, many, into
        self._frag = min(frag, self.max_record)

    def waits(
        self, mode: int, slice_ns: int, spin_ns: int, live_fd: int = -1, cpu_hint: Any = None
    ) -> None:
        """(The C ring's hot path waits in C; this one's calls all go to the slow paths.)"""

    busy = 0  # no wait of this ring runs without the GIL

    def _path(self, fn: Any) -> Any:
        if fn is None:
            raise ConnectionClosed("connection is closed")
        return fn

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        self._path(self._slow)(data, timeout)

    def send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> int:
        return int(self._path(self._many)(msgs, timeout))

    def recv(self, timeout: float | None = None) -> bytes:
        return self._path(self._slow)(timeout)  # type: ignore[no-any-return]

    def recv_many(self, max_msgs: int, timeout: float | None = None) -> list[bytes]:
        return self._path(self._many)(max_msgs, timeout)  # type: ignore[no-any-return]

    def recv_into(self, buf: bytearray | memoryview, timeout: float | None = None) -> int:
        return int(self._path(self._into)(buf, timeout))

    # -- the peer's doorbell ----------------------------------------------------------------
    def _ring(self, waiting: int, bell: int, pos: int = -1) -> None:
        """Ring the peer's ``bell`` if its ``waiting`` flag is set; ``pos``: the HEAD this
        reader just moved to (a writer asleep for more, SPACE_WANTED, sleeps on)."""
        _fence()
        flags = self._i[waiting // 4]
        if not flags:
            return
        if pos >= 0 and flags == L.WAITER_FUTEX and pos < self._q[L.SPACE_WANTED // 8]:
            return
        self._i[bell // 4] = (self._i[bell // 4] + 1) & 0xFFFFFFFF
        if flags & L.WAITER_FUTEX:
            _syscall(
                _SYS_FUTEX, ctypes.byref(self._u32, bell), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0
            )
        if flags & L.WAITER_EVENT and self._evfd >= 0:
            ring_doorbell(self._evfd)

    @property
    def seq(self) -> int:
        return self._side.seq

    @property
    def pending(self) -> int:
        return self._w.pending

    @property
    def held(self) -> int:
        return self._r.held

    # -- writer -----------------------------------------------------------------------------
    def reserve(self, length: int) -> tuple[int, int, int] | None:
        return self._w.reserve(length)

    def commit(self, pos: int, length: int, flags: int = 0) -> None:
        self._w.commit(pos, length, flags)

    def abort(self, pos: int) -> None:
        self._w.abort(pos)

    def publish(self) -> int:
        before = self._w._tail
        n = self._w.publish()
        if self._w._tail != before:
            self._ring(L.DATA_WAITING, L.DATA_BELL)
        return n

    def write(self, data: bytes | bytearray | memoryview, flags: int = 0) -> bool:
        n = len(data)
        got = self._w.reserve(n)
        if got is None:
            return False
        pos, offset, _ = got
        self._mem[offset : offset + n] = data
        self._w.commit(pos, n, flags)
        self.publish()
        return True

    def write_many(self, msgs: list[bytes | bytearray | memoryview]) -> int:
        done = 0
        limit = self._frag or self.max_record
        for m in msgs:
            data = memoryview(m).cast("B")
            got = self._w.reserve(len(data)) if len(data) <= limit else None
            if got is None:
                break
            pos, offset, _ = got
            self._mem[offset : offset + len(data)] = data
            self._w.commit(pos, len(data), 0)
            self.msgs += 1
            self.nbytes += len(data)
            done += 1
        self.publish()
        return done

    def free(self) -> int:
        return self._w.free()

    # -- reader -----------------------------------------------------------------------------
    def peek(self) -> tuple[int, int, int, int, int] | None:
        before = self._r._head
        rec = self._r.peek()
        if self._r._head != before:  # padding skipped
            self._ring(L.SPACE_WAITING, L.SPACE_BELL, self._r._head)
        return rec

    def release(self, pos: int) -> None:
        before = self._r._head
        self._r.release(pos)
        if self._r._head != before:
            self._ring(L.SPACE_WAITING, L.SPACE_BELL, self._r._head)

    def read(self) -> tuple[bytes, int] | None:
        rec = self.peek()
        if rec is None:
            return None
        pos, offset, length, flags, _ = rec
        data = self._mem[offset : offset + length].tobytes()
        self.release(pos)
        return data, flags

    def available(self) -> bool:
        return self._r.available()

    # -- waiting ----------------------------------------------------------------------------
    def _ready(self, need: int) -> bool:
        if self._writer:
            return self._w.free() >= need
        return self._r.available()

    def wait(self, need: int, mode: int, slice_ns: int, spin_ns: int) -> bool:
        start = time.monotonic_ns()
        end = start + slice_ns
        spin_until = (
            end if mode == L.WAIT_SPIN else start + spin_ns if mode == L.WAIT_ADAPTIVE else start
        )
        while True:
            if self._ready(need):
                return True
            if self._stop:
                return False
            now = time.monotonic_ns()
            if now >= spin_until:
                break
        if mode == L.WAIT_SPIN:
            return False
        flag = L.SPACE_WAITING if self._writer else L.DATA_WAITING
        bell = L.SPACE_BELL if self._writer else L.DATA_BELL
        while True:
            now = time.monotonic_ns()
            if now >= end or self._stop:
                return self._ready(need)
            b = self._i[bell // 4]
            if self._writer:  # the HEAD that gives us `need` (before the flag: x86-64 TSO)
                self._q[L.SPACE_WANTED // 8] = max(0, self._w._claim + need - self.capacity)
            self._i[flag // 4] |= L.WAITER_FUTEX
            _fence()
            if self._ready(need):
                self._i[flag // 4] &= ~L.WAITER_FUTEX
                return True
            left = min(end - now, _SAFETY_NS)
            ts = _Timespec(left // 1_000_000_000, left % 1_000_000_000)
            _syscall(
                _SYS_FUTEX, ctypes.byref(self._u32, bell), _FUTEX_WAIT, b, ctypes.byref(ts), None, 0
            )
            self._i[flag // 4] &= ~L.WAITER_FUTEX
            if self._ready(need):
                return True

    def interrupt(self, on: bool) -> None:
        """While on, waits return at once; turning it on wakes a wait in progress (the bell
        this side sleeps on changes and is woken)."""
        self._stop = on
        if on and self._u32 is not None:
            bell = L.SPACE_BELL if self._writer else L.DATA_BELL
            self._i[bell // 4] = (self._i[bell // 4] + 1) & 0xFFFFFFFF
            _syscall(
                _SYS_FUTEX, ctypes.byref(self._u32, bell), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0
            )

    def arm(self) -> bool:
        self._i[L.DATA_WAITING // 4] |= L.WAITER_EVENT
        _fence()
        if self._r.available():
            self._i[L.DATA_WAITING // 4] &= ~L.WAITER_EVENT
            return True
        return False

    def disarm(self) -> None:
        """The reader consumed its wake-up: the writer, which never clears, may stop ringing."""
        self._i[L.DATA_WAITING // 4] &= ~L.WAITER_EVENT

    def note_cpu(self) -> int:
        cpu = int(_libc.sched_getcpu())
        field = L.WRITER_CPU if self._writer else L.READER_CPU
        self._i[field // 4] = cpu + 1
        return cpu

    def close(self) -> None:
        self._u32 = None  # type: ignore[assignment]  # drop the ctypes export first
        for view in (self._i, self._mem):
            try:
                view.release()
            except BufferError:
                pass
