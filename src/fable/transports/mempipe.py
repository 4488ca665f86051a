"""mempipe-spin, mempipe-futex, mempipe-adaptive: two shared-memory rings (one per direction).

The initiating side creates one sealed memfd (``F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL``) holding
both rings (format: ``fable/ring/layout.py``) and two doorbells (stream socketpairs,
``shm.doorbells``), and passes them over the setup channel; the other side checks the seals, the
size and the fd kinds before mapping anything.

    memfd:  [ ring 0: initiator -> peer ][ ring 1: peer -> initiator ]
            each HEADER_SIZE + capacity bytes

The three transports share this data path and differ only in how a side waits (``fable._core``,
the GIL released: within each ``send``/``recv`` call, slice after slice, in C):
- spin: busy-polls the peer's position (``pause``), never sleeps; no ``fileno``.
- futex: sleeps on the ring's doorbell; the peer rings it only when the waiters flag is set, so
  sending makes no system call while the reader is awake.
- adaptive: spins for ``FABLE_SPIN_BUDGET_NS``, yields, then sleeps; never spins when the peer
  last waited on the same CPU (spinning there only delays the peer).

Messages are records of at most ``max_fragment`` bytes; a longer message is several records with
``F_MORE``. Close is an in-band ``F_CLOSE`` record. Liveness: every wait slice (at most 200 ms,
20 ms when spinning) checks the setup channel, whose hang-up without a close notice is PeerDied.
Readiness (``fileno``, futex and adaptive): an epoll fd over this side's doorbell, which the peer
rings (``send`` with ``MSG_DONTWAIT``: never blocking, whatever the peer did to the socket) once
per arming when this side found nothing to read, over a private eventfd this side signals
itself, and over the setup channel, so a closed or dead peer wakes a poller too.

Trust: a safe reader gets private copies; an unsafe (trusting) reader gets read-only views into
the shared memory, which stop working once released.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
import select
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

try:
    from fable import _core
except ImportError:  # pragma: no cover - the package warns at import; the reference ring serves
    _core = None  # type: ignore[assignment]
from fable._wire import close_fds
from fable.buffer import Buffer
from fable.config import settings
from fable.errors import (
    ConnectionClosed,
    FableError,
    NoSpace,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.ring import layout as L
from fable.ring.pyring import PyRing, format_ring
from fable.transports.base import Capabilities, DataPath, EndSpec, TransportInfo
from fable.transports.channel import SetupChannel
from fable.transports.message import COPY_BURST, Claim, MessagePath, deadline_of
from fable.transports.shm import (
    check_peer_ring,
    check_sealed_memfd,
    doorbells,
    drain,
    forget,
    is_doorbell,
    new_sealed_memfd,
    unmap,
)

SPIN, FUTEX, ADAPTIVE = L.WAIT_SPIN, L.WAIT_FUTEX, L.WAIT_ADAPTIVE
SLICE_NS = {SPIN: 20_000_000, FUTEX: 200_000_000, ADAPTIVE: 200_000_000}
LOOK_S = 0.02  # an empty getreadbuf looks for a closed or dead peer at most this often
MAX_FRAGMENT = 1 << 20


def _ring_bytes(capacity: int) -> int:
    return L.HEADER_SIZE + capacity


def _create(options: dict[str, Any]) -> tuple[EndSpec, EndSpec]:
    capacity = int(options.get("capacity") or settings().ring_size)
    size = 2 * _ring_bytes(capacity)

    def fill(mv: memoryview) -> None:
        format_ring(mv[: _ring_bytes(capacity)], capacity)
        format_ring(mv[_ring_bytes(capacity) :], capacity)

    fd = new_sealed_memfd("fable-mempipe", size, fill)
    try:
        (own0, ring0), (own1, ring1) = doorbells()
    except BaseException:
        os.close(fd)
        raise
    try:
        peer_fd = os.dup(fd)
    except BaseException:
        close_fds([fd, own0, ring0, own1, ring1])
        raise
    params = {"capacity": capacity, "size": size}
    # each side gets: memfd, its own doorbell (readable when rung), the one it rings
    return (
        EndSpec([fd, own0, ring0], params),
        EndSpec([peer_fd, own1, ring1], params),
    )


def _checked_memory(spec: EndSpec, role: int) -> tuple[mmap.mmap, int, int, int, int]:
    """Check everything the peer sent before mapping it (role 1: within FABLE_MAX_PEER_RING);
    returns (map, capacity, fds...)."""
    if len(spec.fds) != 3:
        raise ProtocolError(f"expected 3 fds for a mempipe transport, got {len(spec.fds)}")
    fd, own_ev, peer_ev = spec.fds
    capacity, size = spec.params.get("capacity"), spec.params.get("size")
    if not isinstance(capacity, int) or not isinstance(size, int):
        raise ProtocolError("malformed mempipe parameters")
    if capacity < L.MIN_CAPACITY or capacity > L.MAX_CAPACITY or capacity & (capacity - 1):
        raise ProtocolError(f"mempipe capacity {capacity} is not a power of two in range")
    if role == 1:
        check_peer_ring(capacity)
    if size != 2 * _ring_bytes(capacity):
        raise ProtocolError("mempipe size does not match its capacity")
    check_sealed_memfd(fd, size)
    if not (is_doorbell(own_ev) and is_doorbell(peer_ev)):
        raise ProtocolError(
            "the doorbells passed for a mempipe transport are not AF_UNIX stream sockets"
        )
    mm = mmap.mmap(fd, size)
    return mm, capacity, fd, own_ev, peer_ev


class RingPath(MessagePath):
    """A DataPath over two rings in shared memory (see the module docstring)."""

    def __init__(
        self,
        name: str,
        mode: int,
        spec: EndSpec,
        role: int,
        safe: bool,
        setup: SetupChannel,
        epoch: int = 0,
    ) -> None:
        try:
            mm, capacity, fd, own_ev, peer_ev = _checked_memory(spec, role)
        except BaseException:
            close_fds(spec.fds)
            raise
        os.close(fd)  # the mapping keeps the memory
        cfg = settings()
        self._init_messages(name, safe, epoch, cfg, setup, stop_fd=False)
        self._mode = mode
        self._slice = SLICE_NS[mode]
        self._spin = cfg.spin_budget_ns
        self._mm = mm
        self._mv = memoryview(mm)
        half = _ring_bytes(capacity)
        mine, theirs = (0, 1) if role == 0 else (1, 0)
        self._tx_base, self._rx_base = mine * half, theirs * half
        self._tx_mem = self._mv[self._tx_base : self._tx_base + half]
        self._rx_mem = self._mv[self._rx_base : self._rx_base + half]
        self._peer_ev = peer_ev
        self._own_bell = socket.socket(fileno=own_ev)  # ours: the peer rings it (``drain``)
        self._self_ev = -1  # this side's private readiness signal (nobody else holds it)
        try:
            self._self_ev = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ring = _ring_class(cfg.backend)
            self._tx = ring(self._tx_mem, True, epoch=epoch, eventfd=peer_ev)
            self._rx = ring(self._rx_mem, False, epoch=epoch)
        except BaseException:
            self._free_memory()
            close_fds([peer_ev, self._self_ev])
            self._own_bell.close()
            raise
        self.max_fragment = min(MAX_FRAGMENT, self._tx.max_record)
        # The Connection binds the per-message calls straight to the rings' native methods:
        # one call per message, waiting in C; they come back to the slow paths (the class's
        # methods) for everything else.
        self._tx.hot(self._send_gated, self.max_fragment, many=self._send_many_gated)
        self._rx.hot(self._recv_slow, many=self._recv_many_slow, into=self._recv_into_slow)
        # how they wait: like _wait, slice by slice, polling the setup channel after each, and
        # noting this side's CPU where the peer looks for it (the other ring of the pair)
        live = setup.fileno()
        self._hints = (
            self._mv[self._rx_base + L.READER_CPU : self._rx_base + L.READER_CPU + 4],
            self._mv[self._tx_base + L.WRITER_CPU : self._tx_base + L.WRITER_CPU + 4],
        )
        self._tx.waits(mode, self._slice, self._spin, live, self._hints[0])
        self._rx.waits(mode, self._slice, self._spin, live, self._hints[1])
        for name, side in (
            ("send", self._tx),
            ("send_many", self._tx),
            ("recv", self._rx),
            ("recv_many", self._rx),
            ("recv_into", self._rx),
        ):
            self.__dict__[name] = getattr(side, name)
        self.max_write = capacity // 2
        self._quarter = capacity // 4
        self._epoll: select.epoll | None = None
        self._pin_limit = capacity // 2
        # The buffer API likewise, for a message in one record: the rings keep the counters
        # both paths share (_held, _pinned, _open_parts, _armed: properties below).
        tx, rx = self._tx, self._rx
        if isinstance(tx, PyRing) or isinstance(rx, PyRing):
            return  # (the reference ring: the class's methods serve)
        tx.lend(self, self._tx_mem, self.getwritebuf, self.commit)
        rx.lend(
            self,
            self._rx_mem.toreadonly(),
            self.getreadbuf,
            self.release,
            limit=self._read_limit,
            pin_limit=self._pin_limit,
            unsafe=not safe,
            bell=self._own_bell.fileno(),
            burst=COPY_BURST,
        )
        for name, method in (
            ("getwritebuf", tx.getwritebuf),
            ("commit", tx.commit_bufs),
            ("getreadbuf", rx.getreadbuf),
            ("release", rx.release_buf),
        ):
            self.__dict__[name] = method

    # The buffer API's counters live in the rings, where the C fast path keeps them too.
    @property
    def _held(self) -> int:  # read buffers lent (MessagePath's counter)
        return int(self._rx.lent)

    @_held.setter
    def _held(self, n: int) -> None:
        if "_rx" in self.__dict__:  # (MessagePath's init sets 0 before the rings exist)
            self._rx.lent = n

    @property
    def _pinned(self) -> int:  # ring bytes under unsafe read buffers
        return int(self._rx.pinned)

    @_pinned.setter
    def _pinned(self, n: int) -> None:
        self._rx.pinned = n

    @property
    def _open_parts(self) -> int:  # records reserved by getwritebuf, not committed or aborted
        return int(self._tx.open_parts)

    @_open_parts.setter
    def _open_parts(self, n: int) -> None:
        self._tx.open_parts = n

    @property
    def _armed(self) -> bool:  # readiness armed: the next getreadbuf disarms and drains it
        return bool(self._rx.armed)

    @_armed.setter
    def _armed(self, on: bool) -> None:
        self._rx.armed = on

    @property
    def _self_signalled(self) -> bool:  # fileno() signalled _self_ev: the next getreadbuf reads it
        return bool(self._rx.signalled)

    @_self_signalled.setter
    def _self_signalled(self, on: bool) -> None:
        self._rx.signalled = on

    # ================================================================= liveness and waiting

    def _wait(self, ring: Any, need: int, deadline: float | None, timeout: float | None) -> None:
        """Wait until ``ring`` is ready (data, or ``need`` free bytes), in slices."""
        if timeout == 0:
            raise WouldBlock(
                "the connection is full" if ring is self._tx else "no message is ready"
            )
        # the peer looks for our CPU on the ring it waits on, which is the other one
        (self._rx if ring is self._tx else self._tx).note_cpu()
        while True:
            # before each slice, the first too: the hot path comes here when the setup
            # channel had news
            self._interrupted()
            if self._setup.peer_state() is not None:
                if ring is self._rx and ring.available():
                    return  # read what the peer left first
                raise self._gone()
            if self._closed:
                raise ConnectionClosed("connection is closed")
            slice_ns = self._slice
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout("the timeout expired")
                slice_ns = min(slice_ns, int(left * 1e9) + 1)
            if ring.wait(need, self._mode, slice_ns, self._spin):
                return

    # ================================================================= writing
    def _getwritebuf(self, size: int, timeout: float | None) -> list[Buffer]:
        if size < 0 or size > self.max_write:
            raise ValueError(
                f"size must be in 0..{self.max_write} (commit larger messages in parts, more=True)"
            )
        deadline = deadline_of(timeout)
        sizes = [min(self.max_fragment, size - k) for k in range(0, size, self.max_fragment)] or [0]
        got: list[tuple[int, int, int]] = []
        try:
            for part in sizes:
                while (r := self._tx.reserve(part)) is None:
                    self._tx.publish()  # a batch waiting for room must let the reader see it
                    self._wait(
                        self._tx, max(L.record_span(part) * 2, self._quarter), deadline, timeout
                    )
                got.append(r)
        except BaseException:
            for pos, _, _ in got:
                self._tx.abort(pos)
            self._tx.publish()
            raise
        self._open_parts += len(got)
        mv, base = self._mv, self._tx_base
        views = [mv[base + off : base + off + room] for _, off, room in got]
        if len(got) == 1:  # a claim of one record: the token is its position (as in C)
            return [Buffer(views[0], self, got[0][0], more=False, epoch=self.epoch, writable=True)]
        claim = Claim()
        claim.parts = [pos for pos, _, _ in got]
        return self._hand_out(claim, views)

    def _commit(self, bufs: Sequence[Buffer], nbytes: int, flush: bool, more: bool) -> None:
        claim, sent = self._take_claim(bufs, nbytes)
        self._open_parts -= len(claim.parts)
        # Records that carry nothing become padding; the others are committed in order.
        if len(sent) < len(claim.parts):
            keep = {i for i, _ in sent}
            for i, pos in enumerate(claim.parts):
                if i not in keep:
                    self._tx.abort(pos)
        last = len(sent) - 1
        for k, (i, n) in enumerate(sent):
            flags = (L.F_MORE if more else 0) if k == last else L.F_MORE
            self._tx.commit(claim.parts[i], n, flags)
        if not more:
            self._msgs_out += 1
        self._bytes_out += nbytes
        if flush:
            self._tx.publish()

    def _abort(self, bufs: Iterable[Buffer]) -> None:
        for claim in self._take_aborted(bufs):
            self._open_parts -= len(claim.parts)
            for pos in claim.parts:
                self._tx.abort(pos)
        self._tx.publish()

    def _flush(self, timeout: float | None) -> None:
        """Publish committed records (a ring never waits here), and report a reader that closed
        or died before reading them: writes into a ring succeed while it has room, with no
        system call, so this is where a writer learns that they will not be read."""
        self._tx.publish()
        if self._setup.peer_state() is not None and self._tx.free() < self._tx.capacity:
            raise self._gone()  # the peer is gone and left messages unread

    def _send(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        """One message of any size: records of at most max_fragment, waiting for room. (The
        instance's ``send`` is the C ring's; it comes here through ``_send_gated`` for all but
        the fast case.)"""
        mv = memoryview(data).cast("B")
        n = len(mv)
        deadline = deadline_of(timeout)
        pos = 0
        while True:
            part = min(n - pos, self.max_fragment)
            last = pos + part >= n
            while not self._tx.write(mv[pos : pos + part], 0 if last else L.F_MORE):
                self._wait(self._tx, max(L.record_span(part) * 2, self._quarter), deadline, timeout)
            pos += part
            if last:
                break
            timeout, deadline = None, None  # part of the message is out: finish it
        self._msgs_out += 1
        self._bytes_out += n

    def _send_many(
        self, msgs: Iterable[bytes | bytearray | memoryview], timeout: float | None
    ) -> int:
        items = msgs if isinstance(msgs, list) else list(msgs)
        deadline = deadline_of(timeout)
        count = 0
        try:
            while True:
                # whole records, counted by the ring; it stops at a full ring or a large message
                k = self._tx.write_many(items[count:] if count else items)
                count += k
                if count == len(items):
                    break
                if memoryview(items[count]).nbytes > self.max_fragment:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    self._send(items[count], left)
                    count += 1
                elif not k:
                    self._wait(self._tx, self._quarter, deadline, timeout)
        except (WouldBlock, Timeout):
            if timeout is None:  # pragma: no cover
                raise
        return count

    # ================================================================= reading
    def _gather(self, timeout: float | None) -> None:
        if self._stash and not self._stash[-1][1]:
            return
        deadline = deadline_of(timeout)
        while True:
            rec = None if self._peer_closed else self._rx.read()
            if rec is not None:
                data, flags = rec
                if flags & L.F_CLOSE:
                    if self._stash:
                        raise self._fail(ProtocolError("close record in the middle of a message"))
                    self._peer_closed = True
                    continue
                self._stash_fragment(data, bool(flags & L.F_MORE), deadline, timeout)
                if not flags & L.F_MORE:
                    return
                continue
            if self._peer_closed:
                raise ConnectionClosed("the peer closed the connection")
            self._wait(self._rx, 0, deadline, timeout)

    def _getreadbuf(self) -> list[Buffer]:
        out = self._start_getreadbuf()
        if self._armed:
            self._armed = False
            self._rx.disarm()
            drain(self._own_bell)  # consume the peer's wake-ups
            if self._self_signalled:  # and ours (once, when fileno() was first asked for)
                self._self_signalled = False
                try:
                    os.eventfd_read(self._self_ev)
                except BlockingIOError:
                    pass
        copied = 0
        while self._held < self._read_limit and not self._peer_closed:
            if self.safe and copied >= COPY_BURST:
                break
            rec = self._rx.peek()
            if rec is None:
                # readiness is armed only for a fileno() that exists (arming makes the
                # writer's next publish a system call)
                if out or self._epoll is None or self._rx.arm() is False:
                    break
                continue  # data arrived while arming: read it
            pos, off, length, flags, _ = rec
            if flags & L.F_CLOSE:
                self._rx.release(pos)
                if self._stash or self._mid:
                    raise self._fail(ProtocolError("close record in the middle of a message"))
                self._peer_closed = True
                break
            more = bool(flags & L.F_MORE)
            base = self._rx_base + off
            if self.safe:
                view = memoryview(self._mv[base : base + length].tobytes())
                self._rx.release(pos)
                token: Any = None
            else:
                view = self._mv[base : base + length].toreadonly()
                token = (pos, length)
                self._pinned += length
            out.append(Buffer(view, self, token, more=more, epoch=self.epoch, writable=False))
            self._count_in(more, length)
            copied += length
        if not out:
            if self._peer_closed:
                nxt = self._successor()
                if nxt is not None:
                    return nxt.getreadbuf()
                raise ConnectionClosed("the peer closed the connection")
            if self._pinned >= self._pin_limit:
                # Unsafe buffers pin the ring: the writer may need that space to go on.
                raise NoSpace(
                    f"read buffers hold {self._pinned} B of the ring; copy and release some"
                )
            if self._look(True, LOOK_S) is not None and not self._rx.available():
                raise self._gone()
            if self._epoll is not None:
                self._armed = True
        else:
            self._mid = out[-1].more
            self._state_changed()
        return out

    def release(self, buf: Buffer) -> None:
        token = self._take_read(buf)
        if isinstance(token, tuple):
            self._pinned -= token[1]
            if not self._closed:
                self._rx.release(token[0])

    # ================================================================= the rest
    def poll_prepare(self) -> bool:
        if self._dead or self._stash or self._peer_closed or self._rx.available():
            return True
        if self._setup.peer_state() is not None:
            return True
        if self._mode == SPIN:
            return False
        self.fileno()  # creates and arms the readiness fd on first use
        if self._armed:
            return False
        self._armed = True
        return self._rx.arm()

    def fileno(self) -> int:
        self._check()
        if self._mode == SPIN:
            raise io.UnsupportedOperation(
                "mempipe-spin has no readiness fd (it never sleeps); use mempipe-adaptive"
            )
        if self._epoll is None:
            ep = select.epoll()
            ep.register(self._own_bell.fileno(), select.EPOLLIN)
            ep.register(self._self_ev, select.EPOLLIN)
            ep.register(self._setup.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            self._epoll = ep
            self._rx.polled = True  # an empty getreadbuf arms it: Python's work
            # Edge-style readiness starts armed: data that is already there signals at once.
            if self._rx.arm():
                os.eventfd_write(self._self_ev, 1)
                self._self_signalled = True
            self._armed = True
        return self._epoll.fileno()

    def write_buffers_held(self) -> int:
        # not the ring's unpublished records: those committed with flush=False are not held
        return self._open_parts if not self._closed else 0

    def _native_counts(self) -> tuple[int, int, int, int]:
        return self._tx.msgs, self._tx.nbytes, self._rx.msgs, self._rx.nbytes

    def _state_changed(self) -> None:
        self._rx.gate = bool(self._stash or self._mid or self._dead)
        self._tx.gate = self._dead

    def _inside(self) -> bool:
        return self._blocked or bool(self._tx.busy or self._rx.busy)

    def _wake_waiters(self, reader: bool) -> None:
        for ring in (self._tx, self._rx):
            ring.interrupt(True)

    def _unwake(self) -> None:
        for ring in (self._tx, self._rx):
            ring.interrupt(False)

    def _say_goodbye(self, linger: float | None) -> None:
        if self._setup.peer_state() is None:
            self._write_end(linger)

    def _write_end(self, timeout: float | None) -> bool:
        deadline = deadline_of(timeout)
        self._tx.publish()
        while not self._tx.write(b"", L.F_CLOSE):
            if timeout == 0:
                return False
            self._wait(self._tx, L.RECORD_HEADER * 2, deadline, timeout)
        return True

    def _free(self, clean: bool) -> None:
        hooks = self.epochs
        for ring, ended, names in (
            (self._tx, self._wended, ("send", "send_many", None)),
            (self._rx, self._rended, ("recv", "recv_many", "recv_into")),
        ):
            ring.gate = True
            # drops the slow paths (no reference cycle outlives the connection); after a live
            # reconfiguration, a call looked up before it goes on to the next path
            fwd = [
                functools.partial(hooks.forward, name) if ended and hooks and name else None
                for name in names
            ]
            ring.hot(fwd[0], many=fwd[1], into=fwd[2])
            if not isinstance(ring, PyRing):
                # the buffer calls likewise; a read buffer lent before goes back through the
                # connection to its path's (Python) release
                get: Any
                put: Any
                if ring is self._tx:
                    get, put = (
                        functools.partial(hooks.forward, name) if ended and hooks else None
                        for name in ("getwritebuf", "commit")
                    )
                else:
                    get = (
                        functools.partial(hooks.forward, "getreadbuf") if ended and hooks else None
                    )
                    put = hooks.release if hooks else None
                ring.lend(None, None, get, put)
        for name in ("getwritebuf", "commit", "getreadbuf", "release"):
            self.__dict__.pop(name, None)  # the class's methods serve a freed path
        for ring in (self._tx, self._rx):
            ring.close()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        close_fds([self._peer_ev, self._self_ev])
        self._own_bell.close()
        self._free_memory()

    def _free_memory(self) -> None:
        if "_mm" not in self.__dict__:
            return  # freed already
        views = [getattr(self, name, None) for name in ("_tx_mem", "_rx_mem")]
        unmap(self._mm, *views, *self.__dict__.get("_hints", ()), self._mv)
        forget(self, "_mm", "_mv", "_tx_mem", "_rx_mem", "_hints")


def _ring_class(backend: str) -> type[PyRing] | type[_core.Ring]:
    """The ring implementation FABLE_BACKEND asks for: the C core, or the reference ring."""
    if backend == "py":
        return PyRing
    if _core is None:
        if backend == "c":
            raise FableError("FABLE_BACKEND=c, but the C core did not load")
        return PyRing
    return _core.Ring


def _opener(name: str, mode: int) -> Any:
    def _open(
        spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0
    ) -> DataPath:
        return RingPath(name, mode, spec, role, safe, setup, epoch)

    return _open


def _info(name: str, mode: int, summary: str) -> TransportInfo:
    return TransportInfo(
        name=name,
        caps=Capabilities(
            copies_unsafe=0,
            copies_safe=1,
            wait={SPIN: "spin", FUTEX: "futex", ADAPTIVE: "adaptive"}[mode],
            pollable=mode != SPIN,
            cross_host=False,
            spins=mode == SPIN,
        ),
        summary=summary,
        create=_create,
        open=_opener(name, mode),
    )


INFO_SPIN = _info("mempipe-spin", SPIN, "shared-memory rings, readers and writers spin")
INFO_FUTEX = _info(
    "mempipe-futex", FUTEX, "shared-memory rings, futex doorbells with a waiters flag"
)
INFO_ADAPTIVE = _info(
    "mempipe-adaptive", ADAPTIVE, "shared-memory rings, spin then yield then futex"
)
