"""A malicious peer for every shared-memory transport, and the victim that faces it.

``Attack`` functions run in the attacker's process, on its own end of a connection: they use
its transport's internals to write what a hostile peer could write (random bytes over ring
headers and records, ring positions moved past what the ring holds, descriptors for extents
outside the area or overlapping, bogus returns and tokens, payloads changed after commit).
:func:`run_victim` runs in the victim's process: it sends and reads (with ``getreadbuf``)
until its connection fails or the attacker goes, within a time bound, and reports what
happened as an :class:`Outcome`.

The contract (DESIGN.md §3, "Untrusted input is never trusted"): the victim's connection fails
with ``ProtocolError``, or it delivers bytes (which, from a hostile writer, may be anything);
a safe (untrusting) reader's delivered copy never changes afterwards; the victim never crashes,
never hangs past its timeout, and its other connections keep working. Which outcomes each
attack allows is in ``ATTACKS``.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fable.buffer import Buffer
from fable.connection import Connection
from fable.errors import (
    ConnectionClosed,
    NoSpace,
    PeerDied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.ring import layout as L

__all__ = ["ATTACKS", "Outcome", "attacks_for", "run_victim"]

PROTOCOL_ERROR = "protocol-error"  # the victim's connection failed with ProtocolError
GONE = "gone"  # the attacker left (ConnectionClosed or PeerDied) and nothing was wrong
QUIET = "quiet"  # the time bound passed without an error


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
    from fable.testing.harness import wait_readable

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
        except Exception:
            pass
    out.took = time.monotonic() - t0
    return out


Attack = Callable[[Connection, random.Random], None]


def _send_some(conn: Connection, n: int = 8, size: int = 1000) -> None:
    for i in range(n):
        try:
            conn.send(bytes([i & 0xFF]) * size, timeout=0.5)
        except (WouldBlock, Timeout):
            return


def _scribble(mem: memoryview, rng: random.Random, count: int) -> None:
    for _ in range(count):
        off = rng.randrange(len(mem))
        n = min(len(mem) - off, rng.choice((1, 4, 8, 64)))
        mem[off : off + n] = rng.randbytes(n)


# ------------------------------------------------------------------------------ rings
def ring_header(conn: Connection, rng: random.Random) -> None:
    """Random bytes over the header of the ring the victim reads."""
    p: Any = conn._path
    _send_some(conn)
    _scribble(p._tx_mem[: L.HEADER_SIZE], rng, 16)
    _send_some(conn)


def ring_records(conn: Connection, rng: random.Random) -> None:
    """Random bytes over committed records (headers and payloads) the victim has not read."""
    p: Any = conn._path
    _send_some(conn, 16)
    _scribble(p._tx_mem[L.HEADER_SIZE : L.HEADER_SIZE + 32768], rng, 64)
    _send_some(conn)


def _u64(mem: memoryview, off: int) -> int:
    return int.from_bytes(mem[off : off + 8], "little")


def ring_tail_ahead(conn: Connection, rng: random.Random) -> None:
    """The writer's published position (TAIL) moved past anything the ring can hold."""
    p: Any = conn._path
    _send_some(conn, 2)
    tail = _u64(p._tx_mem, L.TAIL) + p._tx.capacity + rng.randrange(1, 1 << 20)
    p._tx_mem[L.TAIL : L.TAIL + 8] = tail.to_bytes(8, "little")
    time.sleep(0.3)


def ring_head_ahead(conn: Connection, rng: random.Random) -> None:
    """The reader's position (HEAD, in the ring the victim writes) moved past anything the
    victim published."""
    p: Any = conn._path
    head = _u64(p._rx_mem, L.HEAD) + rng.randrange(1 << 20, 1 << 40)
    p._rx_mem[L.HEAD : L.HEAD + 8] = head.to_bytes(8, "little")
    time.sleep(0.5)


def ring_change_after_commit(conn: Connection, rng: random.Random) -> None:
    """Payload bytes rewritten, record headers kept, while the victim reads them."""
    p: Any = conn._path
    _send_some(conn, 8, 1000)
    span = L.record_span(1000)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        k = rng.randrange(8)
        start = L.HEADER_SIZE + k * span + L.RECORD_HEADER
        p._tx_mem[start : start + 1000] = rng.randbytes(1000)


# ------------------------------------------------------------------------------ shmem-pipe
def _raw_descriptors(conn: Connection, rng: random.Random, make: Callable[[int], bytes]) -> None:
    p: Any = conn._path
    data = b"".join(make(p._wseq + i) for i in range(8))
    p._wseq += 8  # what follows (the close) continues the sequence
    os.write(p._dout, data)
    time.sleep(0.3)


def descriptors_out_of_range(conn: Connection, rng: random.Random) -> None:
    """Valid descriptors but the first, whose extent lies (partly) outside the area."""
    from fable.transports import shmem_pipe as S

    p: Any = conn._path
    cap = p._cap

    def make(seq: int) -> bytes:
        if seq == p._wseq:
            off = rng.choice((cap, cap - 8, rng.randrange(cap), 2**32 - 64))
            n = rng.choice((64, cap, 2**32 - 1))
            if off + n <= cap:
                off = cap - 8
        else:
            off, n = 0, 64
        return S.DESC.pack(off, n, seq, 0, 0, S.MAGIC)

    _raw_descriptors(conn, rng, make)


def descriptors_overlapping(conn: Connection, rng: random.Random) -> None:
    """In-range descriptors that all name overlapping extents (and were never allocated)."""
    from fable.transports import shmem_pipe as S

    base = rng.randrange(0, 4096, 64)
    _raw_descriptors(
        conn, rng, lambda seq: S.DESC.pack(base + (seq % 3) * 32, 100, seq, 0, 0, S.MAGIC)
    )


def descriptors_garbage(conn: Connection, rng: random.Random) -> None:
    """Random bytes where descriptors belong."""
    p: Any = conn._path
    os.write(p._dout, rng.randbytes(24 * rng.randrange(1, 20)))
    time.sleep(0.3)


def returns_bogus(conn: Connection, rng: random.Random) -> None:
    """Returns of extents the victim never described, while reading what it sends."""
    from fable.transports import shmem_pipe as S

    p: Any = conn._path
    os.write(
        p._rout,
        b"".join(S.RETURN.pack(rng.randrange(2**32), rng.randrange(2**32)) for _ in range(4)),
    )
    _drain_for(conn, 1.0)


def shmem_change_after_commit(conn: Connection, rng: random.Random) -> None:
    """Payloads rewritten in the shared area after their descriptors went out."""
    p: Any = conn._path
    _send_some(conn, 8, 1000)
    area = p._mv[p._tx_base : p._tx_base + 16384]
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        _scribble(area, rng, 16)


# ------------------------------------------------------------------------------ vmsplice-coop
def tokens_bogus(conn: Connection, rng: random.Random) -> None:
    """Tokens claiming more than was sent (or going backwards), while reading everything."""
    p: Any = conn._path
    os.write(p._tout, struct.pack("<Q", rng.randrange(2**40, 2**64)))
    _drain_for(conn, 1.5)


def frames_garbage(conn: Connection, rng: random.Random) -> None:
    """Random bytes into the data pipe where frames belong."""
    p: Any = conn._path
    os.write(p._wfd, rng.randbytes(rng.randrange(20, 4096)))  # at least one frame header
    time.sleep(0.3)


def arena_change_after_commit(conn: Connection, rng: random.Random) -> None:
    """The writer's arena rewritten after its pages went into the pipe."""
    p: Any = conn._path
    _send_some(conn, 8, 1000)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        _scribble(p._amv[:16384], rng, 16)


def _drain_for(conn: Connection, seconds: float) -> None:
    """Read (and drop) what the victim sends, at the byte level, for ``seconds``."""
    p: Any = conn._path
    fd = p._rfd if hasattr(p, "_rfd") else p._din
    os.set_blocking(fd, False)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.read(fd, 1 << 20)
        except BlockingIOError:
            time.sleep(0.001)


EITHER = frozenset({PROTOCOL_ERROR, GONE, QUIET})
FAILS = frozenset({PROTOCOL_ERROR})

# per mechanism (the module that implements the transport): attack name -> (attack, outcomes)
ATTACKS: dict[str, dict[str, tuple[Attack, frozenset[str]]]] = {
    "fable.transports.mempipe": {
        "ring-header": (ring_header, EITHER),
        "ring-records": (ring_records, EITHER),
        "ring-tail-ahead": (ring_tail_ahead, FAILS),
        "ring-head-ahead": (ring_head_ahead, FAILS),
        "change-after-commit": (ring_change_after_commit, EITHER),
    },
    "fable.transports.shmem_pipe": {
        "descriptors-out-of-range": (descriptors_out_of_range, FAILS),
        "descriptors-overlapping": (descriptors_overlapping, frozenset({GONE, QUIET})),
        "descriptors-garbage": (descriptors_garbage, FAILS),
        "returns-bogus": (returns_bogus, FAILS),
        "change-after-commit": (shmem_change_after_commit, frozenset({GONE, QUIET})),
    },
    "fable.transports.vmsplice": {
        "tokens-bogus": (tokens_bogus, FAILS),
        "frames-garbage": (frames_garbage, FAILS),
        "change-after-commit": (arena_change_after_commit, EITHER),
    },
}


def attacks_for(transport: str) -> dict[str, tuple[Attack, frozenset[str]]]:
    """The attacks that apply to ``transport`` (empty for a transport without shared memory)."""
    from fable.transports import REGISTRY

    return ATTACKS.get(REGISTRY[transport].open.__module__, {})
