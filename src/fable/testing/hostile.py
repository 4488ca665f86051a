"""A malicious peer for every shared-memory transport, and the victim that faces it.

The attacker is the side that sets the connection up: it creates the transport's resources
itself (``TransportInfo.create``), sends the victim its share in a first offer of its own making,
and keeps raw handles on the rest (:class:`Raw`: the shared memory mapped, its pipes). It then
speaks the mechanism by hand: records through a reference-ring writer over its half of a
mempipe, descriptors and payloads for shmem-pipe, frames and tokens for vmsplice-coop, honest or
not. It knows a transport only by what is public: the share its ``create`` hands out (each
transport module documents the order of the fds) and the wire formats (``fable.ring.layout``,
``shmem_pipe.DESC``/``RETURN``, ``stream.HEADER``); it never touches a data path's internals.

:func:`attack` runs in the attacker's process and returns its exit status (0: the attack was
carried out); :func:`freeze` and :func:`flood` are the attacks on the victim's process as a whole
(a peer that tries to make one of its threads block, or its control thread stall);
:func:`run_victim` runs in the victim's process: it sends and reads (with
``getreadbuf``) until its connection fails or the attacker goes, within a time bound, and
reports what happened as an :class:`Outcome`.

The contract (DESIGN.md §3, "Untrusted input is never trusted"): the victim's connection fails
with ``ProtocolError``, or it delivers bytes (which, from a hostile writer, may be anything);
a safe (untrusting) reader's delivered copy never changes afterwards; the victim never crashes,
never hangs past its timeout, and its other connections keep working. Each attack in
``ATTACKS`` names the one outcome it must cause (:class:`Expect`): ``fails(why)`` (the
victim's connection fails with a ``ProtocolError`` whose message matches ``why``: the check
that must catch it) or ``delivered(n)`` (an attack on bytes the victim may not check: at
least ``n`` messages arrive, then the attacker's exit ends the connection).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import re
import socket
import stat
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fable import _core
from fable._wire import close_fds
from fable.buffer import Buffer
from fable.connection import Connection
from fable.errors import (
    ConnectionClosed,
    DeadBuffer,
    NoSpace,
    PeerDied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.handshake import HELLO, PROPOSE
from fable.ring import layout as L
from fable.ring.pyring import PyRing
from fable.testing.harness import wait_readable
from fable.transports import REGISTRY, SetupChannel
from fable.transports import shmem_pipe as S
from fable.transports import stream as F
from fable.transports.channel import SETUP

__all__ = [
    "ATTACKS",
    "VICTIM_LEFT",
    "Expect",
    "Outcome",
    "Raw",
    "attack",
    "attacks_for",
    "delivered",
    "fails",
    "flood",
    "freeze",
    "run_victim",
]

PROTOCOL_ERROR = "protocol-error"  # the victim's connection failed with ProtocolError
GONE = "gone"  # the attacker left (ConnectionClosed or PeerDied) and nothing was wrong
QUIET = "quiet"  # the time bound passed without an error
VICTIM_LEFT = 3  # the attacker's exit status when the victim hung up in the middle of it


@dataclass(frozen=True)
class Expect:
    """The one outcome an attack must cause: ``kind``, after at least ``delivered`` messages,
    with an error that matches ``why`` (a regular expression: the check that must catch it,
    so that another check catching it by chance does not pass)."""

    kind: str
    delivered: int = 0
    why: str = ""

    def allows_exit(self, status: int) -> bool:
        """Whether the attacker's exit status fits: 0, or ``VICTIM_LEFT`` for an attack the
        victim must fail (it may go before the attacker's last write)."""
        return status == 0 or (status == VICTIM_LEFT and self.kind == PROTOCOL_ERROR)

    def check(self, out: Outcome) -> bool:
        return (
            out.kind == self.kind
            and out.delivered >= self.delivered
            and re.search(self.why, out.error) is not None
        )


def fails(why: str) -> Expect:
    """The victim's connection fails with ProtocolError, and ``why`` matches its message."""
    return Expect(PROTOCOL_ERROR, why=why)


def delivered(n: int) -> Expect:
    """The victim reads at least ``n`` messages, then sees the attacker go."""
    return Expect(GONE, n)


@dataclass
class Outcome:
    """What the victim saw."""

    kind: str
    delivered: int = 0  # messages (whole or fragments) read
    error: str = ""
    unstable: list[int] = field(default_factory=list)  # safe buffers whose bytes changed
    took: float = 0.0


def run_victim(conn: Connection, bound: float = 5.0, hold: int = 32) -> Outcome:
    """Send and read on ``conn`` until it fails, the peer goes, or ``bound`` seconds pass.

    Holds up to ``hold`` read buffers until the end, so that a safe reader's copies can be
    compared with the snapshot taken when they were delivered."""
    t0 = time.monotonic()
    out = Outcome(QUIET)
    held: list[tuple[Buffer, bytes]] = []
    try:
        while time.monotonic() - t0 < bound:
            try:
                for _ in range(64):  # a burst: the writer soon needs returns or tokens
                    conn.send(b"victim" * 100, timeout=0)
            except (WouldBlock, Timeout):
                pass
            try:
                bufs = conn.getreadbuf()
            except NoSpace:
                for b, _ in held:
                    conn.release(b)
                held.clear()
                continue
            for b in bufs:
                out.delivered += 1
                if len(held) < hold:
                    held.append((b, bytes(b.data)))
                else:
                    conn.release(b)
            if not bufs:
                wait_readable(conn, 0.02)
    except ProtocolError as e:
        out.kind, out.error = PROTOCOL_ERROR, str(e)
    except (ConnectionClosed, PeerDied) as e:
        out.kind, out.error = GONE, str(e)
    if conn.safe:
        out.unstable = [i for i, (b, snap) in enumerate(held) if bytes(b.data) != snap]
    for b, _ in held:
        try:
            conn.release(b)
        except (ProtocolError, ConnectionClosed, DeadBuffer):
            pass  # the connection failed or closed: its buffers go with it
    out.took = time.monotonic() - t0
    return out


# ------------------------------------------------------------------------- the attacker
@dataclass
class Raw:
    """The attacker's raw share of a transport it created: ``mem`` (the shared memory, both
    directions), ``fds`` (its fds, in the order the transport's ``create`` gives them: memfd
    first where there is one, already mapped and closed), ``params``; and its own bookkeeping
    of what it wrote (``seq``: the next sequence number on its direction; ``next_off``:
    shmem-pipe's next free offset in its area). ``ch``: the setup channel, kept open (its end
    would tell the victim the attacker is gone)."""

    transport: str
    safe: bool
    mem: mmap.mmap | None
    fds: list[int]
    params: dict[str, Any]
    ch: SetupChannel
    seq: int = 0
    next_off: int = 0
    ring: PyRing | None = None  # mempipe: a reference writer over the victim's read ring
    kept: list[int] = field(default_factory=list)  # copies of the fds handed over (``keep``)

    def view(self, start: int, end: int) -> memoryview:
        assert self.mem is not None
        return memoryview(self.mem)[start:end]

    def close(self) -> None:
        close_fds(self.fds + self.kept)
        self.ring = None
        self.ch.close()
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:
                pass  # a view is still alive: the process exits soon anyway


def create(
    sock: socket.socket, transport: str, safe: bool, options: dict[str, Any], keep: bool = False
) -> Raw:
    """Create ``transport``'s resources, send the victim its share in a first offer (over the
    setup channel ``sock``), keep the rest raw (and with ``keep``, a copy of the victim's
    share: ``Raw.kept``)."""
    info = REGISTRY[transport]
    ours, theirs = info.create(dict(options))
    kept = [os.dup(fd) for fd in theirs.fds] if keep else []
    ch = SetupChannel(sock)
    ch.send(
        {"op": HELLO, "epoch": 0, "transport": transport, "safe": safe, "params": theirs.params},
        theirs.fds,
    )
    close_fds(theirs.fds)
    fds, mem = list(ours.fds), None
    if info.caps.copies_unsafe == 0:  # shared memory: the memfd comes first
        mem = mmap.mmap(fds[0], os.fstat(fds[0]).st_size)
        os.close(fds.pop(0))
    raw = Raw(transport, safe, mem, fds, ours.params, ch, kept=kept)
    if transport.startswith("mempipe-"):
        # role 0 writes the first ring; fds: its own doorbell, then the victim's (to ring)
        raw.ring = PyRing(_ring_half(raw, 0), True, eventfd=fds[1])
    return raw


def _ring_half(raw: Raw, k: int) -> memoryview:
    """mempipe: ring ``k`` (0: the attacker's, which the victim reads; 1: the victim's)."""
    half = L.HEADER_SIZE + int(raw.params["capacity"])
    return raw.view(k * half, (k + 1) * half)


Attack = Callable[[Raw, random.Random], None]


def send_some(raw: Raw, n: int = 8, size: int = 1000) -> None:
    """``n`` honest messages of ``size`` bytes, as far as there is room."""
    for i in range(n):
        payload = bytes([i & 0xFF]) * size
        if raw.ring is not None:
            if not raw.ring.write(payload):
                return
        elif raw.transport == "shmem-pipe":  # its area: the first half (it set up, role 0)
            off = raw.next_off
            if off + size > int(raw.params["capacity"]):
                return
            raw.next_off += -(-size // S.ALIGN) * S.ALIGN
            raw.view(off, off + size)[:] = payload
            _describe(raw, off, size)
        else:  # vmsplice-coop: a frame into the data pipe
            frame = F.HEADER.pack(size, 0, F.MAGIC, raw.seq, 0) + payload
            raw.seq += 1
            try:
                os.write(raw.fds[1], frame)
            except BlockingIOError:
                return


def _describe(raw: Raw, off: int, n: int, flags: int = 0) -> None:
    """shmem-pipe: a descriptor for ``n`` bytes at ``off`` (fds: din, dout, rin, rout)."""
    os.write(raw.fds[1], S.DESC.pack(off, n, raw.seq, 0, flags, S.MAGIC))
    raw.seq += 1


def _scribble(mem: memoryview, rng: random.Random, count: int) -> None:
    for _ in range(count):
        off = rng.randrange(len(mem))
        n = min(len(mem) - off, rng.choice((1, 4, 8, 64)))
        mem[off : off + n] = rng.randbytes(n)


def _u64(mem: memoryview, off: int) -> int:
    return int.from_bytes(mem[off : off + 8], "little")


def _drain_for(fd: int, seconds: float) -> None:
    """Read (and drop) what the victim writes into ``fd``, at the byte level, for a while."""
    os.set_blocking(fd, False)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.read(fd, 1 << 20)
        except BlockingIOError:
            time.sleep(0.001)


# ------------------------------------------------------------------------------ rings
POSITIONS = ((0, L.TAIL), (1, L.HEAD))  # (ring, field): the attacker's published positions


def ring_header(raw: Raw, rng: random.Random) -> None:
    """Random bytes over both rings' headers, all but the attacker's two positions (which the
    victim range-checks: ``ring_tail_ahead``, ``ring_head_ahead``): the creator's line, the
    doorbells, the waiting flags, the CPU hints, the victim's own positions. The victim read
    them at setup only or treats them as hints, and cached its own positions: the 8 messages
    sent before and after arrive."""
    send_some(raw, 4)
    for k in (0, 1):
        header = _ring_half(raw, k)[: L.HEADER_SIZE]
        junk = bytearray(header)
        _scribble(memoryview(junk), rng, 16)
        cuts = sorted(off for ring, off in POSITIONS if ring == k)
        start = 0
        for off in [*cuts, L.HEADER_SIZE]:  # every byte but the position's 8
            header[start:off] = junk[start:off]
            start = off + 8
    send_some(raw, 4)
    time.sleep(0.3)


RECORD = struct.Struct("<IHHQII")  # LENGTH, FLAGS, zero, SEQ, EPOCH, SKIP (fable.ring.layout)
assert RECORD.size == L.RECORD_HEADER


def record_header(raw: Raw, rng: random.Random) -> None:
    """After two honest messages, a record whose header breaks one rule (chosen by the seed):
    a length past its bounds, an unknown flag, a SKIP not a multiple of 8, a sequence gap, a
    record of another epoch, a close record with a payload, or TAIL ending inside the header."""
    send_some(raw, 2, 64)
    assert raw.ring is not None
    mem = _ring_half(raw, 0)
    cap = int(raw.params["capacity"])
    tail = _u64(mem, L.TAIL)
    base = L.HEADER_SIZE + (tail & (cap - 1))
    length, flags, seq, epoch, skip = 64, 0, raw.ring.seq, 0, 0
    span = L.record_span(64)
    rule = rng.choice(("length", "flags", "skip", "seq", "epoch", "close", "tail"))
    if rule == "length":
        length = rng.randrange(cap, 1 << 32)
    elif rule == "flags":
        flags = rng.choice((0x8, 0x10, 0x100, 0x8000))
    elif rule == "skip":
        skip = rng.randrange(1, 8)
    elif rule == "seq":
        seq += rng.randrange(1, 1 << 40)
    elif rule == "epoch":
        epoch = rng.randrange(1, 1 << 32)
    elif rule == "close":
        flags = L.F_CLOSE
    else:
        span = rng.randrange(1, L.RECORD_HEADER)
    mem[base : base + L.RECORD_HEADER] = RECORD.pack(length, flags, 0, seq, epoch, skip)
    mem[L.TAIL : L.TAIL + 8] = (tail + span).to_bytes(8, "little")
    time.sleep(0.3)


def ring_padding(raw: Raw, rng: random.Random) -> None:
    """Padding where the writer needs none: an honest one first (its span well-formed, in the
    middle of the data area: the reader steps over it, in C as in Python), then one whose
    span runs past the end of the data area (chosen by the seed: a huge LENGTH or one a little
    too long) and TAIL moved past it."""
    send_some(raw, 2, 64)
    assert raw.ring is not None
    mem = _ring_half(raw, 0)
    cap = int(raw.params["capacity"])
    tail = _u64(mem, L.TAIL)
    off = tail & (cap - 1)
    base = L.HEADER_SIZE + off
    mem[base : base + L.RECORD_HEADER] = RECORD.pack(40, L.F_PAD, 0, 0, 0, 0)
    tail += L.record_span(40)
    mem[L.TAIL : L.TAIL + 8] = tail.to_bytes(8, "little")
    time.sleep(0.2)
    off = tail & (cap - 1)
    base = L.HEADER_SIZE + off
    length = rng.choice((rng.randrange(cap, 1 << 32), cap - off - L.RECORD_HEADER + 8))
    mem[base : base + L.RECORD_HEADER] = RECORD.pack(length, L.F_PAD, 0, 0, 0, 0)
    mem[L.TAIL : L.TAIL + 8] = (tail + L.record_span(64)).to_bytes(8, "little")
    time.sleep(0.3)


def ring_tail_ahead(raw: Raw, rng: random.Random) -> None:
    """The writer's published position (TAIL) moved past anything the ring can hold."""
    send_some(raw, 2)
    mem = _ring_half(raw, 0)
    tail = _u64(mem, L.TAIL) + int(raw.params["capacity"]) + rng.randrange(1, 1 << 20)
    mem[L.TAIL : L.TAIL + 8] = tail.to_bytes(8, "little")
    time.sleep(0.3)


def ring_head_ahead(raw: Raw, rng: random.Random) -> None:
    """The reader's position (HEAD, in the ring the victim writes) moved past anything the
    victim published."""
    mem = _ring_half(raw, 1)
    head = _u64(mem, L.HEAD) + rng.randrange(1 << 20, 1 << 40)
    mem[L.HEAD : L.HEAD + 8] = head.to_bytes(8, "little")
    time.sleep(0.5)


def ring_change_after_commit(raw: Raw, rng: random.Random) -> None:
    """Payload bytes rewritten, record headers kept, while the victim reads them: a reader
    does not check payloads, so the 8 messages arrive (a safe reader's copies never change)."""
    send_some(raw, 8, 1000)
    mem = _ring_half(raw, 0)
    span = L.record_span(1000)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        k = rng.randrange(8)
        start = L.HEADER_SIZE + k * span + L.RECORD_HEADER
        mem[start : start + 1000] = rng.randbytes(1000)


# ------------------------------------------------------------------------------ shmem-pipe
def descriptors_out_of_range(raw: Raw, rng: random.Random) -> None:
    """Valid descriptors but the first, whose extent lies (partly) outside the area."""
    cap = int(raw.params["capacity"])
    off = rng.choice((cap, cap - 8, rng.randrange(cap), 2**32 - 64))
    n = rng.choice((64, cap, 2**32 - 1))
    if off + n <= cap:
        off = cap - 8
    _describe(raw, off, n)
    for _ in range(7):
        _describe(raw, 0, 64)
    time.sleep(0.3)


def descriptors_overlapping(raw: Raw, rng: random.Random) -> None:
    """In-range descriptors that all name overlapping extents (never allocated)."""
    base = rng.randrange(0, 4096, 64)
    for k in range(8):
        _describe(raw, base + (k % 3) * 32, 100)
    time.sleep(0.3)


def descriptors_garbage(raw: Raw, rng: random.Random) -> None:
    """Random bytes where descriptors belong."""
    os.write(raw.fds[1], rng.randbytes(S.DSIZE * rng.randrange(1, 20)))
    time.sleep(0.3)


def returns_bogus(raw: Raw, rng: random.Random) -> None:
    """Returns of extents the victim never described, while reading what it sends."""
    bogus = (S.RETURN.pack(rng.randrange(2**32), rng.randrange(2**32)) for _ in range(4))
    os.write(raw.fds[3], b"".join(bogus))
    _drain_for(raw.fds[0], 1.0)


def shmem_change_after_commit(raw: Raw, rng: random.Random) -> None:
    """Payloads rewritten in the shared area after their descriptors went out."""
    send_some(raw, 8, 1000)
    area = raw.view(0, 16384)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        _scribble(area, rng, 16)


# ------------------------------------------------------------------------------ vmsplice-coop
def tokens_bogus(raw: Raw, rng: random.Random) -> None:
    """Tokens claiming more than was sent (or going backwards), while reading everything
    (fds: data in, data out, tokens in, tokens out)."""
    os.write(raw.fds[3], struct.pack("<Q", rng.randrange(2**40, 2**64)))
    _drain_for(raw.fds[0], 1.5)


def frames_garbage(raw: Raw, rng: random.Random) -> None:
    """Random bytes into the data pipe where frames belong."""
    os.write(raw.fds[1], rng.randbytes(rng.randrange(20, 4096)))  # at least one frame header
    time.sleep(0.3)


def arena_change_after_commit(raw: Raw, rng: random.Random) -> None:
    """The writer's payload memory rewritten after its pages went into the pipe (vmsplice:
    the pipe holds the pages, not a copy): the 8 frames arrive, whatever their bytes."""
    arena = mmap.mmap(-1, 16 * mmap.PAGESIZE)
    view = memoryview(arena)
    pos = 0
    for i in range(8):
        frame = F.HEADER.pack(1000, 0, F.MAGIC, i, 0) + bytes([i]) * 1000
        view[pos : pos + len(frame)] = frame
        pos += len(frame)
    _core.vmsplice(raw.fds[1], [view[:pos]])
    end = time.monotonic() + 0.5
    step = F.HEADER.size + 1000
    while time.monotonic() < end:
        k = rng.randrange(8)  # payloads only: a broken frame header is frames_garbage
        _scribble(view[k * step + F.HEADER.size : (k + 1) * step], rng, 4)
    view.release()
    arena.close()


# per mechanism (the module that implements the transport): attack name -> (attack, outcome)
ATTACKS: dict[str, dict[str, tuple[Attack, Expect]]] = {
    "fable.transports.mempipe": {
        "ring-header": (ring_header, delivered(8)),
        "record-header": (
            record_header,
            fails(
                "runs past its bounds|record flags|not a multiple of 8|sequence gap|"
                "record of epoch|close record with a payload|TAIL ends inside a record header"
            ),
        ),
        "ring-padding": (ring_padding, fails("runs past its bounds")),
        "ring-tail-ahead": (ring_tail_ahead, fails("the writer moved TAIL")),
        "ring-head-ahead": (ring_head_ahead, fails("the reader moved HEAD")),
        "change-after-commit": (ring_change_after_commit, delivered(8)),
    },
    "fable.transports.shmem_pipe": {
        "descriptors-out-of-range": (descriptors_out_of_range, fails("lies outside the")),
        "descriptors-overlapping": (descriptors_overlapping, delivered(8)),
        "descriptors-garbage": (descriptors_garbage, fails("malformed descriptor")),
        "returns-bogus": (returns_bogus, fails("returned extent .* never described")),
        "change-after-commit": (shmem_change_after_commit, delivered(8)),
    },
    "fable.transports.vmsplice": {
        "tokens-bogus": (tokens_bogus, fails("bogus token")),
        "frames-garbage": (frames_garbage, fails("bad frame")),
        "change-after-commit": (arena_change_after_commit, delivered(8)),
    },
}


def attacks_for(transport: str) -> dict[str, tuple[Attack, Expect]]:
    """The attacks that apply to ``transport`` (empty for a transport without shared memory)."""
    return ATTACKS.get(REGISTRY[transport].open.__module__, {})


def attack(
    sock: socket.socket,
    transport: str,
    name: str,
    safe: bool,
    seed: int,
    options: dict[str, Any] | None = None,
    go: int = -1,
) -> int:
    """In the attacker's process: set the connection up over ``sock`` and carry out attack
    ``name`` (once a byte comes on ``go``, when given: the victim has opened its end); the exit
    status to end with (0: carried out; ``VICTIM_LEFT``: the victim closed its end while the
    attack went on, which only an attack whose outcome is ``fails`` may cause; 1: the attack
    itself broke, its traceback on stderr)."""
    fn, _ = attacks_for(transport)[name]

    def body() -> int:
        raw = create(sock, transport, safe, options or {})
        if go >= 0 and os.read(go, 1) != b"g":
            raise RuntimeError("the victim did not open its end")
        try:
            fn(raw, random.Random(seed))
        except (BrokenPipeError, ConnectionResetError):
            return VICTIM_LEFT  # it failed the connection at the first bad write and went
        raw.close()
        return 0

    return _exit_status(body)


def _exit_status(body: Callable[[], int]) -> int:
    """What an attacker's process ends with: ``body``'s status, or 1 (its traceback on
    stderr) if the attack itself broke."""
    try:
        return body()
    except Exception:
        traceback.print_exc()
        return 1


# --------------------------------------------------------------------------- the whole process
def _blocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def _fill(fd: int) -> None:
    """Send on the socket ``fd`` until the receiving end's buffer is full."""
    s = socket.socket(fileno=fd)
    try:
        while True:
            s.send(b"\x01" * 64, socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    finally:
        s.detach()


def freeze(sock: socket.socket, transport: str, seconds: float) -> int:
    """In the attacker's process: set a ``transport`` connection up over ``sock`` as its
    creator, keep a copy of every fd it hands over, and for ``seconds`` try to make the victim's
    calls block. ``O_NONBLOCK`` belongs to the open file description, which both sides share, so
    the attacker clears it on every pipe and socket it holds, again and again (the victim sets it
    when it opens), and never reads; on the mempipe rings it also fills both doorbells and keeps
    setting every waiter bit in both ring headers, so that each of the victim's publishes rings
    the attacker's full doorbell (and takes what the victim sent, so that it can go on). The exit
    status to end with (0: carried out; 1: the attack itself broke, its traceback on stderr)."""

    def body() -> int:
        safe = transport != "vmsplice-coop"  # its only form is unsafe
        raw = create(sock, transport, safe, {}, keep=True)
        held = raw.fds + raw.kept
        shared = [fd for fd in held if not stat.S_ISREG(os.fstat(fd).st_mode)]  # not memfds
        end = time.monotonic() + seconds
        if raw.ring is not None:  # mempipe: fds are our doorbell then the victim's
            for fd in shared:
                _blocking(fd)
            _fill(raw.fds[1])  # the victim's own doorbell (it drains it when it reads)
            _fill(raw.kept[2])  # ours: the one the victim rings on each publish
            to_it, to_us = _ring_half(raw, 0), _ring_half(raw, 1)  # we write nothing on 0
            every = (L.WAITER_EVENT | L.WAITER_FUTEX).to_bytes(4, "little")
            while time.monotonic() < end:
                to_us[L.DATA_WAITING : L.DATA_WAITING + 4] = every
                to_it[L.SPACE_WAITING : L.SPACE_WAITING + 4] = every
                to_us[L.HEAD : L.HEAD + 8] = to_us[L.TAIL : L.TAIL + 8]  # take all it sent
                time.sleep(0.0005)
        else:
            while time.monotonic() < end:
                for fd in shared:
                    _blocking(fd)
                time.sleep(0.001)
        raw.close()
        return 0

    return _exit_status(body)


def flood(sock: socket.socket, count: int) -> int:
    """In the attacker's process: set a unix connection up honestly over ``sock``, then ask
    for ``count`` switches to a transport that does not exist, as fast as the victim reads them,
    and never read a refusal. The victim may stop reading (it failed the connection) or hang up:
    the attack ends there. The exit status (0: over a thousand requests went out; 1: fewer, or
    the attack broke)."""

    def body() -> int:
        raw = create(sock, "unix", True, {})  # our end stays open, never read, until the end
        sock.settimeout(10)  # the victim stops reading once it has failed the connection
        propose = SETUP.encode(
            {
                "op": PROPOSE,
                "epoch": 1,
                "transport": "no-such-transport",
                "safe": True,
                "yours": None,
                "params": {},
            }
        )
        sent = 0
        try:
            while sent < count:
                sock.sendall(propose)
                sent += 1
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # the victim failed the connection: it reads no more
        raw.close()
        return 0 if sent > 1000 else 1

    return _exit_status(body)
