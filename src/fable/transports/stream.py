"""Framed messages over a kernel byte stream: the data path of tcp, tcp-nodelay, unix and pipe.

Wire format, version 1 (``WIRE_VERSION``, agreed in the setup hello), every frame little-endian:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------------------------------------------------------+
    |                     payload length (u32)                      |
    +-------------------------------+-------------------------------+
    |          flags (u16)          |        magic 0xFAB1 (u16)     |
    +-------------------------------+-------------------------------+
    |                    sequence number (u64)                      |
    |                 (one per frame, from 0, no gaps)              |
    +---------------------------------------------------------------+
    |                          epoch (u32)                          |
    +---------------------------------------------------------------+
    |                payload (length bytes, <= FRAGMENT)            |
    +---------------------------------------------------------------+

flags: ``F_MORE`` (more fragments of this message follow), ``F_CLOSE`` (control: the writer
closed cleanly; payload empty; nothing follows). Anything else, a bad magic, a wrong epoch, a
payload above ``FRAGMENT`` or a sequence gap fails the connection with ``ProtocolError``.

Writing: a message is framed in user memory (``getwritebuf`` hands out the payload part of a
frame) and written with one vectored write per flush. ``commit(flush=True)``, ``send`` and
``send_many`` return once the kernel has every byte (waiting while its buffer is full: that is
the slow reader's back-pressure); ``commit(flush=False)`` queues in user memory until ``flush``,
bounded by ``ring_size`` (``getwritebuf`` waits for room).
Reading: the kernel's bytes land in a receive chunk; read buffers are read-only views into it, and
a chunk the application still holds views of is never overwritten (a fresh one takes over).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from fable.buffer import Buffer
from fable.config import settings
from fable.errors import (
    ConnectionClosed,
    PeerDied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.transports.message import (
    POLLERRS,
    POLLIN,
    POLLOUT,
    Claim,
    MessagePath,
    deadline_of,
    pipe_takes,
    time_left,
)

if TYPE_CHECKING:
    from fable.transports.channel import SetupChannel

__all__ = ["FRAGMENT", "HEADER", "MAGIC", "WIRE_VERSION", "StreamPath"]

WIRE_VERSION = 1
HEADER = struct.Struct("<IHHQI")
HDR = HEADER.size  # 20
MAGIC = 0xFAB1
F_MORE = 0x1
F_CLOSE = 0x2
KNOWN_FLAGS = F_MORE | F_CLOSE
# Largest payload of one frame. A frame always fits in a receive chunk, so the reader never
# needs more than one chunk of memory per frame, whatever a peer claims.
FRAGMENT = 256 * 1024
CHUNK = 2 * FRAGMENT + 2 * HDR
IOV_MAX = 1024
# Messages up to this size are sent as one concatenated bytes object (cheaper than an iovec);
# larger ones as a header and the payload itself, in one vectored write (no copy, and no large
# allocation per message: at 64 KiB those cost more than the write, `fable bench`).
SMALL = 2048

_pack = HEADER.pack
_pack_into = HEADER.pack_into
_unpack_from = HEADER.unpack_from
_monotonic = time.monotonic
_DONTWAIT = socket.MSG_DONTWAIT
_SENDFLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
# the peer is gone, as a read or a write finds out (TimeoutError: ETIMEDOUT, a TCP peer on
# another host that stopped answering within its keepalive or TCP_USER_TIMEOUT)
_RESET = (ConnectionResetError, ConnectionAbortedError, TimeoutError)
_BROKEN = (BrokenPipeError, *_RESET)


class _Claim(Claim):
    """A claim of frames: ``parts[i]`` is frame i's memory (header, then buffer i's payload);
    once committed, ``frames`` lists what goes out: (frame, payload bytes, flags)."""

    __slots__ = ("frames", "need")

    def __init__(self, need: int) -> None:
        super().__init__()
        self.frames: list[tuple[bytearray | memoryview, int, int]] = []
        self.need = need  # bytes of the connection's buffer space this claim holds


def _readv1(fd: int, buf: memoryview) -> int:
    return os.readv(fd, (buf,))


class StreamPath(MessagePath):
    """A DataPath over a socket (one fd both ways) or a pair of pipes (read fd, write fd)."""

    def __init__(
        self,
        transport: str,
        setup: SetupChannel,
        *,
        sock: socket.socket | None = None,
        rfd: int = -1,
        wfd: int = -1,
        epoch: int = 0,
    ) -> None:
        cfg = settings()
        # the kernel always hands the reader a private copy: safe
        self._init_messages(transport, True, epoch, cfg, setup)
        self.max_write = min(cfg.ring_size // 2, 64 * FRAGMENT)
        self._sock = sock
        if sock is not None:
            sock.setblocking(True)
            self._rfd = self._wfd = sock.fileno()
            self._readinto: Callable[[memoryview], int] = sock.recv_into
            send = sock.send

            def write1(frame: bytes | bytearray | memoryview) -> int:
                return send(frame, _SENDFLAGS)

            self._write1: Callable[[bytes | bytearray | memoryview], int] = write1
        else:
            if rfd < 0 or wfd < 0:
                raise ValueError("StreamPath needs a socket or both pipe fds")
            self._rfd, self._wfd = rfd, wfd
            self._readinto = functools.partial(_readv1, rfd)
            self._write1 = functools.partial(os.write, wfd)
            self._pipe_size = int(fcntl.fcntl(wfd, fcntl.F_GETPIPE_SZ))  # fixed at setup
            # a reader without a timeout blocks in read(2) (one system call a wake-up; a close
            # from another thread ends it with a byte of its own: ``_wake_waiters``)
            os.set_blocking(rfd, True)
            os.set_blocking(wfd, False)
        # write side. The write queue is the writer's, but the reader pushes it too while it
        # waits (so a blocked reader never starves the peer of our output): _wlock guards it.
        self._wlock = threading.Lock()
        self._limit = cfg.ring_size
        self._wseq = 0
        self._end_queued = False  # the close frame (or END of the epoch) is in the queue
        self._claims: deque[_Claim] = deque()
        self._claimed = 0
        self._queue: list[bytes | bytearray | memoryview] = []
        self._queued = 0
        self._wpoll = select.poll()  # "is there room now" (poll(0))
        self._wpoll.register(self._wfd, POLLOUT)
        self._wwait = select.poll()  # waiting for room (every wait polls the stop fd too)
        self._wwait.register(self._wfd, POLLOUT)
        self._wwait.register(self._stop_fd, POLLIN)
        # read side
        self._rbuf = bytearray(CHUNK)
        self._rmv = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._pin = [0]  # read buffers held in the current chunk
        self._rseq = 0
        self._eof = False
        self._rpoll = select.poll()  # "is there input now" (poll(0))
        self._rpoll.register(self._rfd, POLLIN)
        self._rwait = select.poll()  # waiting for input
        self._rwait.register(self._rfd, POLLIN)
        self._rwait.register(self._stop_fd, POLLIN)
        self._rwpoll = select.poll()  # waiting for input, or room to push queued output
        if self._wfd != self._rfd:
            self._rwpoll.register(self._rfd, POLLIN)
            self._rwpoll.register(self._wfd, POLLOUT)
        else:
            self._rwpoll.register(self._rfd, POLLIN | POLLOUT)
        self._rwpoll.register(self._stop_fd, POLLIN)

    # ==================================================================== low-level I/O
    def _write(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int:
        """Non-blocking vectored write; returns bytes taken (0 when the kernel is full)."""
        try:
            if self._sock is not None:
                return self._sock.sendmsg(bufs, (), _SENDFLAGS)
            return os.writev(self._wfd, bufs)
        except BlockingIOError:
            return 0
        except _BROKEN:
            raise self._gone_on_write() from None

    def _fill(self, block: bool) -> int:
        """Read what the kernel has into the chunk: >0 bytes, 0 at end of stream, -1 if none."""
        if len(self._rbuf) - self._rend < 65536 and self._rpos:
            self._make_room(0)
        elif self._rpos == self._rend and self._rpos and not self._pin[0]:
            self._rpos = self._rend = 0
        mv = self._rmv[self._rend :]
        try:
            self._blocked = block
            if self._sock is not None:
                n = self._sock.recv_into(mv, 0, 0 if block else _DONTWAIT)
            else:
                if not block and not self._rpoll.poll(0):
                    return -1
                n = self._readinto(mv)
        except BlockingIOError:
            return -1
        except _RESET:
            n = 0
        finally:
            self._blocked = False
            mv.release()
        if self._closing:
            n = 0  # woken by our own close (a byte of ours in a pipe): nothing more is read
        if n == 0:
            self._eof = True
            return 0
        self._rend += n
        return n

    def _make_room(self, need: int) -> None:
        """Make room for ``need`` bytes after the unparsed tail, never moving held bytes."""
        tail = self._rend - self._rpos
        if self._pin[0] == 0:
            if self._rpos:
                self._rbuf[0:tail] = self._rbuf[self._rpos : self._rend]
        else:
            # The application holds views into this chunk: continue in a fresh one.
            fresh = bytearray(CHUNK)
            fresh[0:tail] = self._rbuf[self._rpos : self._rend]
            self._rmv.release()
            self._rbuf = fresh
            self._rmv = memoryview(fresh)
            self._pin = [0]
        self._rpos, self._rend = 0, tail
        assert tail + need <= len(self._rbuf)

    # ==================================================================== errors
    def _gone_on_write(self) -> BaseException:
        return self._gone()

    def _gone_on_read(self) -> BaseException:
        if self._closing:  # our own close shut the socket down for reading
            return ConnectionClosed("the connection was closed (by another thread)")
        self._setup.peer_state()  # raises the reason if the peer refused the first offer
        if self._peer_closed:
            return ConnectionClosed("the peer closed the connection")
        if self._rend > self._rpos or self._stash:
            return PeerDied("the peer vanished in the middle of a message")
        return PeerDied("the peer vanished without closing")

    # ==================================================================== write side
    def _kernel_takes(self, size: int) -> bool:
        """Whether the kernel takes ``size`` bytes now without blocking. A socket is writable
        (POLLOUT) only with a third (TCP) or three quarters (unix) of its buffer free; a pipe is
        writable with one free page, so for a pipe count the unread bytes instead."""
        if self._sock is not None:
            return bool(self._wpoll.poll(0))
        return pipe_takes(self._wfd, self._pipe_size, size)

    def _claim(self, size: int, deadline: float | None, timeout: float | None) -> None:
        """Wait for room for ``size`` more bytes (back-pressure). Room means: queued plus claimed
        bytes stay under the limit and, when the caller gave a timeout, the kernel can take the
        message now (so that the commit after it does not wait either; for messages above half
        the kernel's buffer this is a best effort)."""
        while True:
            if self._queued + self._claimed + size > self._limit:
                if self._queue and self._push():
                    continue
                if self._claims and not self._queue:
                    raise WouldBlock("uncommitted write buffers hold the connection's buffer space")
            elif timeout is None or self._queue or self._kernel_takes(size):
                return
            ms = self._slice_ms(
                deadline, timeout, "the connection is full", "no room before the timeout"
            )
            events = self._wwait.poll(ms)
            if any(fd == self._wfd and ev & POLLERRS for fd, ev in events):
                raise self._gone_on_write()
            if events and not self._queue:
                # writable, but not yet enough room for this message: poll cannot wait for
                # "this much room", so nap briefly instead of spinning
                time.sleep(0.001)

    def _getwritebuf(self, size: int, timeout: float | None) -> list[Buffer]:
        if size < 0 or size > self.max_write:
            raise ValueError(
                f"size must be in 0..{self.max_write} (commit larger messages in parts, more=True)"
            )
        nframes = max(1, -(-size // FRAGMENT))
        need = size + nframes * HDR
        self._claim(need, deadline_of(timeout), timeout)
        claim = _Claim(need)
        views = []
        left = size
        for _ in range(nframes):
            cap = min(left, FRAGMENT)
            left -= cap
            frame = self._new_frame(HDR + cap)
            claim.parts.append(frame)
            views.append(memoryview(frame)[HDR:])
        self._claims.append(claim)
        self._claimed += need
        return self._hand_out(claim, views)

    def _commit(self, bufs: Sequence[Buffer], nbytes: int, flush: bool, more: bool) -> None:
        claim, sent = self._take_claim(bufs, nbytes)
        frames = [(claim.parts[i], n, F_MORE) for i, n in sent]
        frames[-1] = (frames[-1][0], frames[-1][1], F_MORE if more else 0)
        claim.frames = frames
        if len(sent) < len(claim.parts):
            carried = {i for i, _ in sent}
            self._drop_frames([f for i, f in enumerate(claim.parts) if i not in carried])
        if not more:
            self._msgs_out += 1
        self._bytes_out += nbytes
        if self._claims[0] is claim:
            self._advance()
            if flush:
                self._drain(None)

    def _abort(self, bufs: Iterable[Buffer]) -> None:
        claims = self._take_aborted(bufs)
        for c in claims:
            self._claims.remove(c)
            self._claimed -= c.need
            self._drop_frames(c.parts)
        if claims:
            self._advance()

    def _advance(self) -> None:
        """Move committed claims at the head (allocation order) into the write queue."""
        with self._wlock:
            self._advance_locked()

    def _advance_locked(self) -> None:
        claims = self._claims
        while claims and claims[0].committed:
            claim = claims.popleft()
            for frame, used, flags in claim.frames:
                _pack_into(frame, 0, used, flags, MAGIC, self._wseq, self.epoch)
                self._wseq += 1
                self._queue_frame(frame, HDR + used)
            self._claimed -= claim.need

    def _queue_frame(self, frame: bytearray | memoryview, n: int) -> None:
        """Queue the first ``n`` bytes of a committed claim's frame (writer lock held)."""
        self._queue.append(memoryview(frame)[:n])
        self._queued += n

    def _new_frame(self, size: int) -> bytearray | memoryview:
        """Memory for one frame (header + payload) of a getwritebuf claim."""
        return bytearray(size)

    def _drop_frames(self, frames: list[bytearray | memoryview]) -> None:
        """Frames of ``_new_frame`` that will never be sent (aborted, or not carrying data)."""

    def _queue_close(self, deadline: float | None, timeout: float | None) -> None:
        """Queue the close frame after everything committed."""
        with self._wlock:
            self._queue.append(_pack(0, F_CLOSE, MAGIC, self._wseq, self.epoch))
            self._queued += HDR
        self._wseq += 1

    def _push(self) -> bool:
        """Write queued frames without blocking; True once the queue is empty."""
        with self._wlock:
            return self._push_locked()

    def _try_push(self) -> None:
        """Push from the reading side, unless the writer is pushing right now."""
        if self._wlock.acquire(blocking=False):
            try:
                self._push_locked()
            finally:
                self._wlock.release()

    def _push_locked(self) -> bool:
        q = self._queue
        while q:
            n = self._write(q if len(q) <= IOV_MAX else q[:IOV_MAX])
            if n == 0:
                return False
            self._queued -= n
            i = 0
            while n:
                ln = len(q[i])
                if n >= ln:
                    n -= ln
                    i += 1
                else:
                    q[i] = memoryview(q[i])[n:]
                    n = 0
            del q[:i]
        return True

    def _flush(self, timeout: float | None) -> None:
        self._advance()
        self._drain(deadline_of(timeout), timeout)

    def _drain(self, deadline: float | None, timeout: float | None = None) -> None:
        while not self._push():
            self._wwait.poll(
                self._slice_ms(
                    deadline,
                    timeout,
                    "the transport is full; the rest stays queued",
                    "the peer did not take the queued messages in time",
                )
            )

    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """The socket transports' hot method: the gate, the write lock and a one-frame fast
        path in this one call (``MessagePath.send`` would add a call per message); the rest
        goes through ``getwritebuf``/``commit`` (``_send_in_parts``)."""
        with self._writing:
            if self._dead and self._ended(writing=True):
                pass  # forwarded below, outside the lock
            elif (
                self._queue
                or self._claims
                or (n := len(data)) > FRAGMENT
                or (type(data) is memoryview and (data.itemsize != 1 or not data.c_contiguous))
                or (timeout is not None and not self._kernel_takes(HDR + n))
            ):
                self._send_in_parts(data, timeout)
                return
            else:
                seq = self._wseq
                self._wseq = seq + 1
                self._msgs_out += 1
                self._bytes_out += n
                if n > SMALL:  # header and payload in one vectored write: no copy of the payload
                    hdr = _pack(n, 0, MAGIC, seq, self.epoch)
                    sent = self._write((hdr, data))
                    if sent < HDR + n:  # the rest waits in the queue (holding the caller's
                        with self._wlock:  # buffer until _drain returns)
                            if sent < HDR:
                                self._queue.append(hdr[sent:])
                            self._queue.append(memoryview(data)[max(0, sent - HDR) :])
                            self._queued += HDR + n - sent
                        self._drain(None)
                    return
                frame = _pack(n, 0, MAGIC, seq, self.epoch) + data
                try:
                    sent = self._write1(frame)
                except BlockingIOError:
                    sent = 0
                except _BROKEN:
                    raise self._gone_on_write() from None
                if sent < HDR + n:
                    with self._wlock:
                        self._queue.append(frame[sent:])
                        self._queued += HDR + n - sent
                    self._drain(None)
                return
        self._forward("send", data, timeout)

    def _send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None
    ) -> int:
        epoch = self.epoch
        deadline = deadline_of(timeout)
        count = 0
        try:
            for m in msgs:
                n = len(m)
                if (
                    n > FRAGMENT
                    or self._claims
                    or (type(m) is memoryview and (m.itemsize != 1 or not m.c_contiguous))
                ):
                    self._advance()
                    self._send_in_parts(m, time_left(deadline, timeout))
                    count += 1
                    continue
                need = HDR + n
                if self._queued + need > self._limit:
                    self._claim(need, deadline, time_left(deadline, timeout))
                with self._wlock:
                    if n > SMALL:  # the payload is not copied: the queue is drained below,
                        # before the caller has its buffers back
                        self._queue.append(_pack(n, 0, MAGIC, self._wseq, epoch))
                        self._queue.append(m)
                    else:
                        self._queue.append(_pack(n, 0, MAGIC, self._wseq, epoch) + m)
                    self._queued += need
                self._wseq += 1
                self._msgs_out += 1
                self._bytes_out += n
                count += 1
        except (WouldBlock, Timeout):
            if timeout is None:  # pragma: no cover - cannot happen without a timeout
                raise
        self._drain(None)
        return count

    # ==================================================================== read side
    def _next_frame(self) -> tuple[int, int, int] | None:
        """Consume the next complete data frame: (flags, start, end) in the chunk, or None."""
        rpos = self._rpos
        if self._rend - rpos < HDR:
            if rpos and self._pin[0] == 0 and rpos == self._rend:
                self._rpos = self._rend = 0
            return None
        length, flags, magic, seq, epoch = _unpack_from(self._rbuf, rpos)
        if magic != MAGIC:
            raise self._fail(
                ProtocolError(f"bad frame magic {magic:#06x} at sequence {self._rseq}")
            )
        if flags & ~KNOWN_FLAGS or length > FRAGMENT or (flags & F_CLOSE and length):
            raise self._fail(ProtocolError(f"malformed frame (flags {flags:#x}, length {length})"))
        if seq != self._rseq:
            raise self._fail(ProtocolError(f"sequence gap: expected {self._rseq}, got {seq}"))
        if epoch != self.epoch:
            raise self._fail(ProtocolError(f"frame of epoch {epoch} on epoch {self.epoch}"))
        end = rpos + HDR + length
        if end > self._rend:
            if end > len(self._rbuf):
                self._make_room(HDR + length)
            return None
        self._rpos = end
        self._rseq = seq + 1
        if flags & F_CLOSE:
            if self._stash and self._stash[-1][1]:
                raise self._fail(ProtocolError("close frame in the middle of a message"))
            self._peer_closed = True
            return None
        return flags, rpos + HDR, end

    def _wait_readable(self, deadline: float | None, timeout: float | None) -> None:
        ms = self._slice_ms(
            deadline, timeout, "no message is ready", "no message before the timeout", reading=True
        )
        if self._queue:
            for fd, ev in self._rwpoll.poll(ms):
                if fd == self._wfd and ev & (POLLOUT | POLLERRS) and self._queue:
                    self._try_push()
        else:
            self._rwait.poll(ms)

    def _gather(self, timeout: float | None) -> None:
        """Take fragments into the stash until it holds one whole message."""
        if self._stash and not self._stash[-1][1]:
            return
        deadline = deadline_of(timeout) if timeout else None
        while True:
            fr = self._next_frame() if not self._peer_closed else None
            if fr is not None:
                flags, s, e = fr
                self._stash_fragment(
                    self._rmv[s:e].tobytes(), bool(flags & F_MORE), deadline, timeout
                )
                if not flags & F_MORE:
                    return
                continue
            if self._peer_closed:
                raise ConnectionClosed("the peer closed the connection")
            if self._queue:
                self._try_push()
            r = self._fill(block=timeout is None and not self._queue)
            if r > 0:
                continue
            if r == 0:
                raise self._gone_on_read()
            self._wait_readable(deadline, timeout)

    def recv(self, timeout: float | None = None) -> bytes:
        # Fast path: one unfragmented frame, parsed in place; when the chunk is used up and the
        # caller waits without a timeout, one blocking read refills it from the start.
        if not (self._stash or self._mid or self._dead):
            rbuf = self._rbuf
            while True:
                rpos = self._rpos
                rend = self._rend
                if rend - rpos >= HDR:
                    length, flags, magic, seq, epoch = _unpack_from(rbuf, rpos)
                    end = rpos + HDR + length
                    if (
                        end <= rend
                        and not flags
                        and magic == MAGIC
                        and seq == self._rseq
                        and epoch == self.epoch
                        and length <= FRAGMENT
                    ):
                        self._rpos = end
                        self._rseq = seq + 1
                        self._msgs_in += 1
                        self._bytes_in += length
                        return self._rmv[rpos + HDR : end].tobytes()
                    break
                if rpos != rend or self._pin[0] or timeout is not None or self._queue:
                    break
                # No lock here (it costs a tenth of a round trip): _blocked is set before
                # _closing is looked at, and a close sets _closing before it looks at _blocked,
                # so either this read does not start or the close waits for it to end (the GIL
                # orders the two), waking it (``_wake_waiters``).
                self._blocked = True
                try:
                    if self._closing or self._dead:
                        break
                    n = self._readinto(self._rmv)
                    if self._closing:
                        n = 0  # woken by a close of ours: what came is not read
                except _RESET:
                    n = 0
                finally:
                    self._blocked = False
                if n <= 0:
                    self._rpos = self._rend = 0
                    break
                self._rpos, self._rend = 0, n
        return self._recv_slow(timeout)

    def _getreadbuf(self) -> list[Buffer]:
        out = self._start_getreadbuf()
        if self._queue:
            self._try_push()
        while self._held < self._read_limit:
            fr = self._next_frame() if not self._peer_closed else None
            if fr is None:
                if out or self._peer_closed:
                    break
                r = self._fill(block=False)
                if r > 0:
                    continue
                break
            flags, s, e = fr
            more = bool(flags & F_MORE)
            view = self._rmv[s:e].toreadonly()
            out.append(Buffer(view, self, self._pin, more=more, epoch=self.epoch, writable=False))
            self._pin[0] += 1
            self._count_in(more, e - s)
        if not out and (self._peer_closed or self._eof):
            nxt = self._successor()
            if nxt is not None:
                return nxt.getreadbuf()
            raise self._gone_on_read()
        if out:
            self._mid = out[-1].more
        return out

    def release(self, buf: Buffer) -> None:
        pin = self._take_read(buf)
        if isinstance(pin, list):
            pin[0] -= 1

    # ==================================================================== the rest
    def poll_prepare(self) -> bool:
        if self._dead or self._stash or self._peer_closed or self._eof:
            return True
        rpos = self._rpos
        if self._rend - rpos >= HDR:
            length = _unpack_from(self._rbuf, rpos)[0]
            if self._rend - rpos >= HDR + length:
                return True
        return bool(self._rpoll.poll(0))  # the kernel's readiness is level-triggered

    def write_fileno(self) -> int | None:
        return self._wfd

    def fileno(self) -> int:
        self._check()
        return self._rfd

    def write_buffers_held(self) -> int:
        return sum(len(c.parts) for c in self._claims if not c.committed)

    def _pending_bytes(self) -> int:
        return self._queued

    def _wake_waiters(self, reader: bool) -> None:
        super()._wake_waiters(reader)
        if not (reader and self._blocked):
            return
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RD)  # a blocking recv returns (0) at once
            except OSError:
                pass
            return
        # Nothing else ends a read blocked in a pipe (closing the fd does not): a write end of
        # our own, opened for the moment, puts one byte in it, which the woken reader drops
        # (it sees _closing). Never kept: the peer's death must still end the pipe.
        try:
            w = os.open(f"/proc/self/fd/{self._rfd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(w, b"\0")
        except OSError:
            pass  # full: the reader is not blocked
        finally:
            os.close(w)

    def _say_goodbye(self, linger: float | None) -> None:
        if not self._eof:
            self._write_end(linger)

    def _write_end(self, timeout: float | None) -> bool:
        deadline = deadline_of(timeout)
        if not self._end_queued:
            self._claims = deque(c for c in self._claims if c.committed)
            self._advance()
            self._queue_close(deadline, timeout)  # WouldBlock/Timeout: nothing was queued
            self._end_queued = True
        if timeout == 0:
            return self._push()
        self._drain(deadline, timeout)
        return True

    def _free(self, clean: bool) -> None:
        self._queue.clear()
        self._queued = 0
        if self._sock is not None:
            if clean:
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                    # Unread input would make the kernel reset the connection instead of ending
                    # it: read what is there (bounded) so the peer sees a clean end.
                    for _ in range(64):
                        if self._sock.recv(65536, _DONTWAIT) == b"":
                            break
                except OSError:
                    pass
            self._sock.close()
        else:
            for fd in {self._rfd, self._wfd}:
                try:
                    os.close(fd)
                except OSError as e:  # pragma: no cover - a double close is a bug elsewhere
                    if e.errno != errno.EBADF:
                        raise
