"""The shared-memory ring: its layout, defined once (the C header ``_core/ring.h`` mirrors it).

One ring carries one direction: a single writer, a single reader, over memory both map. Positions
are 64-bit byte counts that only grow (they never wrap; ``pos & (capacity - 1)`` is the offset in
the data area); capacity is a power of two. What each side writes lives on its own cache line.

Ring header (``HEADER_SIZE`` bytes, at the start of the ring's memory), little-endian:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------------------------------------------------------+  0  set once by the
    |                  MAGIC "FABLRING" (u64)                       |     creator, before the
    +-------------------------------+-------------------------------+     memory is shared
    |        VERSION (u32)          |      HEADER_SIZE (u32)        |  8
    +-------------------------------+-------------------------------+
    |                     CAPACITY (u64, 2^k)                       | 16
    +---------------------------------------------------------------+
    |                        (zero to 64)                           |
    +===============================================================+ 64  writer's line
    |               TAIL (u64): bytes published                     |     (release-stored after
    +-------------------------------+-------------------------------+      the records below it)
    |      WRITER_CPU (u32)         |   SPACE_WAITING (u32) flag    | 72
    +-------------------------------+-------------------------------+
    |      DATA_BELL (u32) futex    |       (zero to 88)            | 80
    +-------------------------------+-------------------------------+
    |   SPACE_WANTED (u64): the HEAD a writer asleep waits for      | 88
    +---------------------------------------------------------------+
    |                        (zero to 128)                          | 96
    +===============================================================+ 128 unused: keeps the two
    |                        (zero to 192)                          |     lines apart for the
    +===============================================================+     adjacent-line prefetcher
    |               HEAD (u64): bytes released                      | 192 reader's line
    +-------------------------------+-------------------------------+     (release-stored once
    |      READER_CPU (u32)         |   DATA_WAITING (u32) flag     | 200  records are done)
    +-------------------------------+-------------------------------+
    |      SPACE_BELL (u32) futex   |       (zero to 256)           | 208
    +===============================================================+ 256 data area:
    |   records, each RECORD_HEADER bytes + payload, 8-aligned      |     CAPACITY bytes
    +---------------------------------------------------------------+

Record (at ``pos & (capacity - 1)``, never straddling the end of the data area):

    +-------------------------------+---------------+---------------+
    |        LENGTH (u32)           |  FLAGS (u16)  |   zero (u16)  |  0
    +-------------------------------+---------------+---------------+
    |                        SEQ (u64)                              |  8
    +-------------------------------+-------------------------------+
    |        EPOCH (u32)            |          SKIP (u32)           | 16
    +-------------------------------+-------------------------------+
    |   payload: LENGTH bytes, then padding to a multiple of 8,     | 24
    |   then SKIP more bytes (reserved room the commit did not use) |
    +---------------------------------------------------------------+

A record spans ``RECORD_HEADER + align8(LENGTH) + SKIP`` bytes (SKIP is a multiple of 8).

FLAGS: ``F_MORE`` (more fragments of this message follow), ``F_CLOSE`` (the writer closed
cleanly; no payload; nothing follows), ``F_PAD`` (filler up to the end of the data area: skip it;
it carries no sequence number). A record that does not fit before the end of the data area is
preceded by a padding record; a gap too small even for a record header (< ``RECORD_HEADER``
bytes) is skipped implicitly by both sides.

The waiters flags and doorbells (futex words, 32-bit, shared): a side about to sleep sets its
flag, fences, re-checks the position, then waits on the doorbell; the other side, after moving its
position, fences and rings the doorbell (increment + wake) only if the flag is set, so the fast
path makes no system call. A writer that sleeps for more room than one record first stores in
SPACE_WANTED the HEAD that gives it that room; the reader leaves it asleep (flag set) until HEAD
reaches it, so a reader freeing one record at a time wakes it once, not once a record. (0, as a
writer that never sets it leaves it: wake at any move. The value is only a hint: a bad one costs
the writer its sleep until the slice ends, never the reader anything.)

Nothing read from a peer is trusted: every position and record field is range-checked, and a
violation is a ``ProtocolError``.
"""

from __future__ import annotations

__all__ = [
    "CAPACITY",
    "CONSTANTS",
    "DATA_BELL",
    "DATA_WAITING",
    "F_CLOSE",
    "F_MORE",
    "F_PAD",
    "HEAD",
    "HEADER_SIZE",
    "MAGIC",
    "MAGIC_OFF",
    "READER_CPU",
    "RECORD_HEADER",
    "REC_EPOCH",
    "REC_FLAGS",
    "REC_LENGTH",
    "REC_SEQ",
    "REC_SKIP",
    "SPACE_BELL",
    "SPACE_WAITING",
    "SPACE_WANTED",
    "TAIL",
    "VERSION",
    "VERSION_OFF",
    "WAITER_EVENT",
    "WAITER_FUTEX",
    "WAIT_ADAPTIVE",
    "WAIT_FUTEX",
    "WAIT_SPIN",
    "WRITER_CPU",
    "align8",
    "record_span",
]

CACHE_LINE = 64
MAGIC = int.from_bytes(b"FABLRING", "little")
VERSION = 1

# header fields: byte offsets
MAGIC_OFF = 0  # u64
VERSION_OFF = 8  # u32
HEADER_SIZE_OFF = 12  # u32
CAPACITY = 16  # u64
TAIL = 64  # u64, writer
WRITER_CPU = 72  # u32, writer
SPACE_WAITING = 76  # u32, writer (set while it sleeps for space)
DATA_BELL = 80  # u32, writer rings it
SPACE_WANTED = 88  # u64, writer (the HEAD it sleeps for; 0: any move)
HEAD = 192  # u64, reader
READER_CPU = 200  # u32, reader
DATA_WAITING = 204  # u32, reader (set while it sleeps for data)
SPACE_BELL = 208  # u32, reader rings it
HEADER_SIZE = 256

# record fields: byte offsets from the record's start
REC_LENGTH = 0  # u32
REC_FLAGS = 4  # u16
REC_SEQ = 8  # u64
REC_EPOCH = 16  # u32
REC_SKIP = 20  # u32
RECORD_HEADER = 24

F_MORE = 0x1
F_CLOSE = 0x2
F_PAD = 0x4
KNOWN_FLAGS = F_MORE | F_CLOSE | F_PAD

# The waiters flags (SPACE_WAITING, DATA_WAITING): what a peer that moves its position must do.
WAITER_FUTEX = 0x1  # the side sleeps on the doorbell futex: increment the bell and wake it
WAITER_EVENT = 0x2  # the reader armed its readiness fd: write its eventfd
# How a side waits for the other (the mode of Ring.wait; mirrored by ring.h's fr_wait_mode).
WAIT_SPIN, WAIT_FUTEX, WAIT_ADAPTIVE = 0, 1, 2

MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 40


def align8(n: int) -> int:
    return (n + 7) & ~7


def record_span(length: int, skip: int = 0) -> int:
    """Bytes a record with ``length`` payload bytes (and ``skip`` unused) occupies."""
    return RECORD_HEADER + align8(length) + skip


# The offsets above are what the C header mirrors; tests/test_ring.py compares the two.
OFFSETS = {
    "MAGIC_OFF": MAGIC_OFF,
    "VERSION_OFF": VERSION_OFF,
    "HEADER_SIZE_OFF": HEADER_SIZE_OFF,
    "CAPACITY": CAPACITY,
    "TAIL": TAIL,
    "WRITER_CPU": WRITER_CPU,
    "SPACE_WAITING": SPACE_WAITING,
    "DATA_BELL": DATA_BELL,
    "HEAD": HEAD,
    "READER_CPU": READER_CPU,
    "DATA_WAITING": DATA_WAITING,
    "SPACE_BELL": SPACE_BELL,
    "SPACE_WANTED": SPACE_WANTED,
    "HEADER_SIZE": HEADER_SIZE,
    "REC_LENGTH": REC_LENGTH,
    "REC_FLAGS": REC_FLAGS,
    "REC_SEQ": REC_SEQ,
    "REC_EPOCH": REC_EPOCH,
    "REC_SKIP": REC_SKIP,
    "RECORD_HEADER": RECORD_HEADER,
}
# The numbers that are not offsets, compared with the C core's (``_core.CONSTANTS``) too.
CONSTANTS = {
    "F_MORE": F_MORE,
    "F_CLOSE": F_CLOSE,
    "F_PAD": F_PAD,
    "WAITER_FUTEX": WAITER_FUTEX,
    "WAITER_EVENT": WAITER_EVENT,
    "WAIT_SPIN": WAIT_SPIN,
    "WAIT_FUTEX": WAIT_FUTEX,
    "WAIT_ADAPTIVE": WAIT_ADAPTIVE,
}

assert TAIL % CACHE_LINE == 0 and HEAD % CACHE_LINE == 0 and HEAD - TAIL >= 2 * CACHE_LINE
