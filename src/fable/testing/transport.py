"""The transport contract (``fable.transports.base``) as checks any transport can run.

``check_transport(make_pair)`` runs every check in ``CHECKS`` against connections made by
``make_pair()`` (which returns this side's Connection and the PendingEnd for the other side, as
``fable.open_pair`` does). Each check forks a child that opens the other end, so everything is
verified across processes, in both directions. A check raises AssertionError (or the fable error
that broke it) on failure; a failing child prints its traceback to stderr and exits non-zero.

Every check also verifies that no fd and no mapping leaked (``harness.no_leaks``).
"""

from __future__ import annotations

import io
import os
import random
import select
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from fable.config import settings
from fable.connection import Connection
from fable.errors import (
    ConnectionClosed,
    DeadBuffer,
    FableError,
    NoSpace,
    PeerDied,
    Timeout,
    WouldBlock,
)
from fable.testing.harness import (
    SIZES,
    SMALL_SIZES,
    Child,
    MakePair,
    dies_within_a_second,
    fable_mappings,
    fill,
    go_pipe,
    idle_peer,
    no_leaks,
    open_fds,
    pattern,
    verify,
    wait_go,
    wait_readable,
)

__all__ = ["CHECKS", "check_transport", "run_check"]


def _recv_all(conn: Connection, count: int, sizes: Sequence[int], first: int = 0) -> None:
    for i in range(first, first + count):
        verify(i, conn.recv(timeout=30), sizes[i % len(sizes)])


def _send_all(conn: Connection, count: int, sizes: Sequence[int], first: int = 0) -> None:
    for i in range(first, first + count):
        conn.send(pattern(i, sizes[i % len(sizes)]))
    conn.flush()


def check_ordering(make_pair: MakePair) -> None:
    """Every size from 0 B to 8 MiB, both directions, in order, boundaries kept."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        _recv_all(c, len(SIZES), SIZES)
        _send_all(c, len(SIZES), SIZES)
        assert c.recv(timeout=30) == b"done"

    ch = Child(pending, child)
    with conn:
        _send_all(conn, len(SIZES), SIZES)
        _recv_all(conn, len(SIZES), SIZES)
        conn.send(b"done")
    ch.expect_success()


def check_both_directions(make_pair: MakePair) -> None:
    """Both sides send and receive at once (a sending thread and a receiving one per side),
    enough messages that a fault in one message of a thousand shows."""
    count = 2500
    conn, pending = make_pair()

    def duplex(c: Connection) -> None:
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                _send_all(c, count, SMALL_SIZES)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=sender)
        t.start()
        _recv_all(c, count, SMALL_SIZES)
        t.join(60)
        assert not t.is_alive(), "sender thread stuck"
        if errors:
            raise errors[0]

    def child(c: Connection) -> None:
        duplex(c)
        c.send(b"bye")

    ch = Child(pending, child)
    with conn:
        duplex(conn)
        assert conn.recv(timeout=30) == b"bye"
    ch.expect_success()


def check_fragments(make_pair: MakePair) -> None:
    """getwritebuf/commit with several buffers, partial fills, more=True, and getreadbuf
    fragments released in any order."""
    conn, pending = make_pair()
    sizes = [0, 10, 4096, 300_000, 1 << 20]

    def child(c: Connection) -> None:
        rng = random.Random(1)
        expected = [*sizes, 5 << 20]
        seq = 0
        parts: list[bytes] = []
        held: list[Any] = []
        deadline = time.monotonic() + 60
        while seq < len(expected):
            try:
                bufs = c.getreadbuf()
            except NoSpace:
                # zero-copy buffers pin transport memory: the data is copied into `parts`
                # already, so release early, as NoSpace asks
                for h in held:
                    c.release(h)
                held = []
                continue
            if not bufs:
                assert time.monotonic() < deadline, "messages never arrived"
                wait_readable(c, 1.0)
                continue
            for b in bufs:
                parts.append(bytes(b.data))
                held.append(b)
                if not b.more:
                    verify(seq, b"".join(parts), expected[seq])
                    seq += 1
                    parts = []
                    rng.shuffle(held)  # read buffers may be released in any order
                    for h in held:
                        c.release(h)
                    held = []
        assert not held and not parts
        c.send(b"ok")

    ch = Child(pending, child)
    with conn:
        for seq, size in enumerate(sizes):
            bufs = conn.getwritebuf(size + 100)  # room to spare: commit fewer bytes than asked
            assert sum(len(b.data) for b in bufs) >= size + 100
            data = memoryview(pattern(seq, size))
            pos = 0
            for b in bufs:
                n = min(len(b.data), size - pos)
                b.data[:n] = data[pos : pos + n]
                pos += n
            conn.commit(bufs, size)
        # a message larger than one getwritebuf, committed in parts
        seq, size = len(sizes), 5 << 20
        data = memoryview(pattern(seq, size))
        pos = 0
        while pos < size:
            part = min(conn.max_write, size - pos)
            bufs = conn.getwritebuf(part)
            off = 0
            for b in bufs:
                n = len(b.data)
                b.data[:] = data[pos + off : pos + off + n]
                off += n
            pos += part
            conn.commit(bufs, part, more=pos < size)
        assert conn.recv(timeout=30) == b"ok"
    ch.expect_success()


def check_commit_order(make_pair: MakePair) -> None:
    """An earlier uncommitted buffer holds back later commits; abort lets them go."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        assert c.recv(timeout=30) == b"A"
        assert c.recv(timeout=30) == b"B"
        assert c.recv(timeout=30) == b"D"
        assert c.recv(timeout=30) == b"E"
        c.send(b"ok")

    ch = Child(pending, child)
    with conn:
        a = conn.getwritebuf(1)
        b = conn.getwritebuf(1)
        b[0].data[:] = b"B"
        conn.commit(b, 1)
        a[0].data[:] = b"A"
        conn.commit(a, 1)
        c = conn.getwritebuf(1)
        d = conn.getwritebuf(1)
        d[0].data[:] = b"D"
        conn.commit(d, 1)
        conn.abort(c)
        conn.send(b"E")
        assert conn.recv(timeout=30) == b"ok"
    ch.expect_success()


def check_commit_subset(make_pair: MakePair) -> None:
    """A commit may pass some of one getwritebuf call's buffers: exactly their bytes go out, in
    claim order. Aborting one buffer aborts its whole call: the others cannot be committed."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        assert c.recv(timeout=30) == b"second"
        m = c.recv(timeout=30)
        assert m[-5:] == b"third" and len(m) > 5 and set(m[:-5]) == {ord("f")}
        assert c.recv(timeout=30) == b"after"
        c.send(b"ok")

    ch = Child(pending, child)
    with conn:
        bufs = conn.getwritebuf(conn.max_write)
        assert len(bufs) >= 2, "max_write should span several buffers"
        bufs[1].data[:6] = b"second"
        conn.commit([bufs[1]], 6)
        bufs = conn.getwritebuf(conn.max_write)
        room = len(bufs[0].data)
        bufs[0].data[:] = b"f" * room
        bufs[-1].data[:5] = b"third"
        # passed in any order, filled in claim order: the first buffer whole, then the last
        conn.commit([bufs[-1], bufs[0]], room + 5)
        bufs = conn.getwritebuf(conn.max_write)
        conn.abort([bufs[0]])
        try:
            conn.commit(bufs[1:], 1)
            raise AssertionError("a buffer of an aborted getwritebuf call was committed")
        except DeadBuffer:
            pass
        conn.send(b"after")
        assert conn.recv(timeout=30) == b"ok"
    ch.expect_success()


def check_batches(make_pair: MakePair) -> None:
    """commit(flush=False) + flush(), and send_many, keep order and boundaries."""
    conn, pending = make_pair()
    n = 2000

    mixed = [(2 * n, 10), (2 * n + 1, 3 << 20), (2 * n + 2, 0), (2 * n + 3, 300_000)]

    def child(c: Connection) -> None:
        _recv_all(c, 2 * n, SMALL_SIZES)
        for seq, size in mixed:
            verify(seq, c.recv(timeout=30), size)
        c.send(b"ok")

    ch = Child(pending, child)
    with conn:
        for i in range(n):
            size = SMALL_SIZES[i % len(SMALL_SIZES)]
            bufs = conn.getwritebuf(size)
            data = pattern(i, size)
            pos = 0
            for b in bufs:
                b.data[:] = data[pos : pos + len(b.data)]
                pos += len(b.data)
            conn.commit(bufs, size, flush=False)
        conn.flush()
        assert conn.stats().pending_bytes == 0, "flush() left committed messages behind"
        conn.send_many(pattern(i, SMALL_SIZES[i % len(SMALL_SIZES)]) for i in range(n, 2 * n))
        # a batch mixing messages larger than one fragment or record with small ones
        assert conn.send_many([pattern(seq, size) for seq, size in mixed]) == len(mixed)
        assert conn.stats().pending_bytes == 0
        assert conn.recv(timeout=30) == b"ok"
    ch.expect_success()


def check_backpressure(make_pair: MakePair) -> None:
    """A reader that does not read makes getwritebuf raise WouldBlock (timeout=0) and Timeout
    (timeout>0); once it reads, writing resumes and nothing was lost."""
    conn, pending = make_pair()
    rfd, wfd = go_pipe()
    size = 4096

    def child(c: Connection, rfd: int, wfd: int) -> None:
        os.close(wfd)
        wait_go(rfd)
        seq = 1
        while (m := c.recv(timeout=30)) != b"end":
            verify(seq, m, size)
            seq += 1
        c.send(str(seq - 1).encode())

    ch = Child(pending, child, rfd, wfd)
    os.close(rfd)
    with conn:
        sent = 0
        limit = (settings().ring_size + (64 << 20)) // size
        while True:
            try:
                bufs = conn.getwritebuf(size, timeout=0)
            except WouldBlock:
                break
            bufs[0].data[:] = pattern(sent + 1, size)
            conn.commit(bufs, size)
            sent += 1
            assert sent < limit, "getwritebuf never pushed back against a reader that does not read"
        assert sent > 0
        # The kernel may find a little more room (TCP grows its buffers): keep writing with a
        # timeout until one expires; it must take the whole timeout.
        while True:
            t0 = time.monotonic()
            try:
                bufs = conn.getwritebuf(size, timeout=0.2)
            except Timeout:
                assert time.monotonic() - t0 >= 0.15, "Timeout came before the timeout"
                break
            bufs[0].data[:] = pattern(sent + 1, size)
            conn.commit(bufs, size)
            sent += 1
            assert sent < limit, "getwritebuf never timed out against a reader that does not read"
        os.write(wfd, b"g")
        os.close(wfd)
        for i in range(sent + 1, sent + 201):
            conn.send(pattern(i, size))  # waits for room as the reader catches up
        conn.send(b"end")
        assert conn.recv(timeout=60) == str(sent + 200).encode()
    ch.expect_success()


def check_read_wouldblock(make_pair: MakePair) -> None:
    """Nothing to read: getreadbuf() == [], recv(timeout=0) -> WouldBlock, recv(0.1) -> Timeout;
    neither loses the message that arrives afterwards."""
    conn, pending = make_pair()
    rfd, wfd = go_pipe()

    def child(c: Connection, rfd: int, wfd: int) -> None:
        os.close(wfd)
        wait_go(rfd)
        c.send(pattern(7, 5000))
        assert c.recv(timeout=30) == b"ok"

    ch = Child(pending, child, rfd, wfd)
    os.close(rfd)
    with conn:
        assert conn.getreadbuf() == []
        try:
            conn.recv(timeout=0)
            raise AssertionError("recv(timeout=0) did not raise WouldBlock")
        except WouldBlock:
            pass
        t0 = time.monotonic()
        try:
            conn.recv_into(bytearray(10), timeout=0.1)
            raise AssertionError("recv_into(timeout=0.1) did not raise Timeout")
        except Timeout:
            pass
        assert time.monotonic() - t0 >= 0.09
        os.write(wfd, b"g")
        os.close(wfd)
        verify(7, conn.recv(timeout=30), 5000)
        conn.send(b"ok")
    ch.expect_success()


def check_recv_into(make_pair: MakePair) -> None:
    """recv_into a too-small buffer raises ValueError and loses nothing."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        c.send(pattern(1, 3000))
        c.send(pattern(2, 600_000))
        assert c.recv(timeout=30) == b"ok"

    ch = Child(pending, child)
    with conn:
        small = bytearray(100)
        for seq, size in ((1, 3000), (2, 600_000)):
            try:
                conn.recv_into(small, timeout=30)
                raise AssertionError("recv_into into a small buffer did not raise ValueError")
            except ValueError:
                pass
            big = bytearray(size + 10)
            assert conn.recv_into(big, timeout=30) == size
            verify(seq, big[:size], size)
        conn.send(b"ok")
    ch.expect_success()


def check_recv_many(make_pair: MakePair) -> None:
    """recv_many: every message once, whole and in order (a large one among small ones too),
    never more than max_msgs and at least one a call; WouldBlock (timeout=0) and Timeout when
    nothing comes, ValueError for a max_msgs below 1, none of which loses a message; after the
    peer's close, the messages it sent first, then ConnectionClosed."""
    conn, pending = make_pair()
    rfd, wfd = go_pipe()
    n, batch, large = 3000, 500, (1500, 3 << 20)

    def size_of(i: int) -> int:
        if i == large[0]:
            return large[1]
        return SMALL_SIZES[i % len(SMALL_SIZES)] if i < n else 64

    def child(c: Connection, rfd: int, wfd: int) -> None:
        os.close(wfd)
        wait_go(rfd)
        for i in range(n):
            c.send(pattern(i, size_of(i)))
        assert c.send_many([pattern(i, 64) for i in range(n, n + batch)]) == batch

    ch = Child(pending, child, rfd, wfd)
    os.close(rfd)
    with conn:
        for bad in (0, -1):
            try:
                conn.recv_many(bad, timeout=0)
                raise AssertionError(f"recv_many({bad}) did not raise ValueError")
            except ValueError:
                pass
        try:
            conn.recv_many(8, timeout=0)
            raise AssertionError("recv_many(timeout=0) did not raise WouldBlock")
        except WouldBlock:
            pass
        t0 = time.monotonic()
        try:
            conn.recv_many(8, timeout=0.1)
            raise AssertionError("recv_many(timeout=0.1) did not raise Timeout")
        except Timeout:
            pass
        assert time.monotonic() - t0 >= 0.09, "Timeout came before the timeout"
        os.write(wfd, b"g")
        os.close(wfd)
        got = 0
        while got < n + batch:
            limit = 1 + got % 70
            msgs = conn.recv_many(limit, timeout=30)
            assert 1 <= len(msgs) <= limit, f"recv_many({limit}) returned {len(msgs)} messages"
            for m in msgs:
                verify(got, m, size_of(got))
                got += 1
        try:
            conn.recv_many(4, timeout=30)
            raise AssertionError("recv_many after the peer's close did not raise")
        except ConnectionClosed:
            pass
    ch.expect_success()


def check_no_space(make_pair: MakePair) -> None:
    """Holding too many read buffers raises NoSpace; releasing some lets reading go on."""
    conn, pending = make_pair()
    limit = settings().read_buffers
    count = limit + 50

    def child(c: Connection, count: int) -> None:
        c.send_many(pattern(i, 16) for i in range(count))
        assert c.recv(timeout=30) == b"ok"

    ch = Child(pending, child, count)
    with conn:
        held: list[Any] = []
        deadline = time.monotonic() + 30
        got_nospace = False
        while len(held) < count:
            assert time.monotonic() < deadline, "messages never arrived"
            try:
                bufs = conn.getreadbuf()
            except NoSpace:
                got_nospace = True
                assert len(held) >= limit
                for b in held:
                    verify(int.from_bytes(bytes(b.data[:8]), "little"), b.data, 16)
                    conn.release(b)
                seen = len(held)
                held = []
                count -= seen
                continue
            if not bufs:
                wait_readable(conn, 0.5)
            held.extend(bufs)
        for b in held:
            conn.release(b)
        assert got_nospace, "getreadbuf never raised NoSpace"
        assert conn.stats().read_buffers_held == 0
        conn.send(b"ok")
    ch.expect_success()


def check_readiness(make_pair: MakePair) -> None:
    """fileno() signals whenever data is ready; draining getreadbuf() until [] re-arms it."""
    conn, pending = make_pair()
    bursts, per = 50, 7

    def child(c: Connection) -> None:
        seq = 0
        for _ in range(bursts):
            for _ in range(per):
                c.send(pattern(seq, 100))
                seq += 1
            assert c.recv(timeout=30) == b"next"

    ch = Child(pending, child)
    with conn:
        try:
            fd = conn.fileno()
        except io.UnsupportedOperation:
            # a spinning transport has no readiness fd, by contract; read without one
            for seq in range(bursts * per):
                verify(seq, conn.recv(timeout=30), 100)
                if seq % per == per - 1:
                    conn.send(b"next")
            ch.expect_success()
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        seq = 0
        for _ in range(bursts):
            got = 0
            while got < per:
                assert poller.poll(10_000), "fileno() never signalled: a missed wake-up"
                while True:
                    bufs = conn.getreadbuf()
                    if not bufs:
                        break
                    for b in bufs:
                        verify(seq, b.data, 100)
                        seq += 1
                        got += 1
                        conn.release(b)
            conn.send(b"next")
    ch.expect_success()


def _expect_clean_close(conn: Connection) -> None:
    """The next recv raises ConnectionClosed: the peer closed cleanly (not PeerDied)."""
    try:
        m = conn.recv(timeout=30)
        raise AssertionError(f"a message ({len(m)} B) after the last one, or none of the close")
    except PeerDied:
        raise AssertionError("a clean close was reported as PeerDied") from None
    except ConnectionClosed:
        pass


def check_clean_close(make_pair: MakePair) -> None:
    """A clean close: the peer reads every message, then ConnectionClosed (not PeerDied), and
    writing to it raises ConnectionClosed too. close() is idempotent."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        for i in range(3):
            c.send(pattern(i, 1000))
        c.close()
        c.close()

    ch = Child(pending, child)
    with conn:
        for i in range(3):
            verify(i, conn.recv(timeout=30), 1000)
        for _ in range(2):
            _expect_clean_close(conn)
        ch.expect_success()
        try:
            for _ in range(200):
                conn.send(b"x" * 1000)
                conn.flush()
                time.sleep(0.005)
            raise AssertionError("sending to a closed peer never failed")
        except PeerDied:
            raise AssertionError("writing to a cleanly closed peer gave PeerDied") from None
        except ConnectionClosed:
            pass
    conn.close()
    try:
        conn.send(b"x")
        raise AssertionError("send on a closed connection did not raise")
    except ConnectionClosed:
        pass


def _fill_bufs(bufs: Sequence[Any], data: bytes) -> None:
    """Copy ``data`` into the buffers of one getwritebuf, each whole before the next."""
    pos = 0
    for b in bufs:
        n = min(len(b.data), len(data) - pos)
        b.data[:n] = data[pos : pos + n]
        pos += n


def check_close_flushes(make_pair: MakePair) -> None:
    """close() sends what ``commit(flush=False)`` kept back: the peer reads every message,
    then ConnectionClosed."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        for i in range(50):
            verify(i, c.recv(timeout=30), 100 + i)
        _expect_clean_close(c)

    ch = Child(pending, child)
    for i in range(50):
        bufs = conn.getwritebuf(100 + i)
        _fill_bufs(bufs, pattern(i, 100 + i))
        conn.commit(bufs, 100 + i, flush=False)
    conn.close()
    ch.expect_success()


def check_held_at_close(make_pair: MakePair) -> None:
    """Read buffers held when this side closes stay readable (dead for the API: release
    raises ConnectionClosed) and keep at most one fd and one mapping of the connection, which
    go with the last buffer even while the closed connection object lives on."""
    fds, maps = open_fds(), len(fable_mappings())
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        for i in range(3):
            c.send(pattern(i, 1000))
        assert c.recv(timeout=30) == b"bye"

    ch = Child(pending, child)
    held: list[Any] = []
    deadline = time.monotonic() + 30
    while len(held) < 3:
        assert time.monotonic() < deadline, "the peer's messages never came"
        wait_readable(conn, 1.0)
        held += conn.getreadbuf()
    conn.send(b"bye")
    conn.close()
    for i, b in enumerate(held):
        verify(i, b.data, 1000)
    try:
        conn.release(held[0])
        raise AssertionError("release after close did not raise")
    except ConnectionClosed:
        pass
    assert len(open_fds() - fds) <= 1, "held buffers keep more than one fd"
    assert len(fable_mappings()) - maps <= 1, "held buffers keep more than one mapping"
    del held, b
    assert open_fds() <= fds, f"fds {sorted(open_fds() - fds)} outlive the held buffers"
    assert len(fable_mappings()) <= maps, "the mapping outlives the held buffers"
    assert conn.closed  # still referenced here
    ch.expect_success()


def check_peer_died_reader(make_pair: MakePair) -> None:
    """SIGKILL of the writer while the reader blocks: its messages first, then PeerDied < 1 s."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        for i in range(3):
            c.send(pattern(i, 500))
        c.flush()
        time.sleep(120)

    ch = Child(pending, child)
    with conn:
        for i in range(3):
            verify(i, conn.recv(timeout=30), 500)
        dies_within_a_second(ch, lambda: conn.recv(timeout=30), "a blocked recv")


def check_peer_died_writer(make_pair: MakePair) -> None:
    """SIGKILL of the reader while the writer is blocked on back-pressure: PeerDied < 1 s."""
    conn, pending = make_pair()
    ch = Child(pending, idle_peer)
    with conn:
        assert conn.recv(timeout=30) == b"ready"
        fill(conn)

        def blocked() -> None:
            for _ in range(100_000):
                conn.send(b"z" * 65536)

        dies_within_a_second(ch, blocked, "a blocked send")


def check_peer_died_getwritebuf(make_pair: MakePair) -> None:
    """SIGKILL of the reader while the writer waits for space in getwritebuf (or, on the kernel
    transports, in the commit that hands the bytes over): PeerDied < 1 s."""
    conn, pending = make_pair()
    ch = Child(pending, idle_peer)
    with conn:
        assert conn.recv(timeout=30) == b"ready"
        fill(conn)
        size = min(65536, conn.max_write)

        def blocked() -> None:
            for _ in range(100_000):
                bufs = conn.getwritebuf(size)  # blocks until the kill
                conn.commit(bufs, size)

        dies_within_a_second(ch, blocked, "a getwritebuf waiting for space")


def check_dead_buffer(make_pair: MakePair) -> None:
    """Buffers are single-use: touching one after commit/abort/release raises DeadBuffer."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        assert c.recv(timeout=30) == b"abc"
        c.send(b"r")
        assert c.recv(timeout=30) == b"ok"

    ch = Child(pending, child)
    with conn:
        bufs = conn.getwritebuf(3)
        bufs[0].data[:] = b"abc"
        conn.commit(bufs, 3)
        for action in (
            lambda: bufs[0].data,
            lambda: conn.commit(bufs, 3),
            lambda: conn.abort(bufs),
        ):
            try:
                action()
                raise AssertionError("a committed buffer was usable")
            except DeadBuffer:
                pass
        gone = conn.getwritebuf(10)
        conn.abort(gone)
        try:
            gone[0].data[0] = 1
            raise AssertionError("an aborted buffer was usable")
        except DeadBuffer:
            pass
        deadline = time.monotonic() + 30
        rb: list[Any] = []
        while not rb:
            assert time.monotonic() < deadline
            wait_readable(conn, 1.0)
            rb = conn.getreadbuf()
        assert bytes(rb[0].data) == b"r"
        conn.release(rb[0])
        for action in (lambda: rb[0].data, lambda: conn.release(rb[0])):
            try:
                action()
                raise AssertionError("a released buffer was usable")
            except DeadBuffer:
                pass
        conn.send(b"ok")
    ch.expect_success()


FORKED_CODES = {
    1: "it raised something else (traceback on stderr)",
    3: "the inherited connection was usable",
    4: "a call raised another error than the fork's (traceback on stderr)",
}


def _use_inherited(conn: Connection) -> int:
    """In a forked child: every call on the inherited ``conn`` must raise the fork's
    FableError (not WouldBlock, not ConnectionClosed: those come from a connection that still
    works); the exit status to end with (0: it did; see FORKED_CODES)."""
    try:
        calls = (lambda: conn.send(b"x"), lambda: conn.recv(timeout=0), conn.fileno)
        for call in calls:
            try:
                call()
                return 3
            except FableError as e:
                if type(e) is not FableError or "inherited across fork" not in str(e):
                    traceback.print_exc()
                    return 4
        conn.close()
        return 0
    except BaseException:
        traceback.print_exc()
        return 1


def check_fork_invalidation(make_pair: MakePair) -> None:
    """A connection inherited by fork() is invalid in the child; the parent's keeps working and
    its peer sees nothing of the child."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        assert c.recv(timeout=30) == b"before"
        assert c.recv(timeout=30) == b"after"
        c.send(b"ok")

    ch = Child(pending, child)
    with conn:
        conn.send(b"before")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - grandchild
            os._exit(_use_inherited(conn))
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code == 0, f"the forked child: {FORKED_CODES.get(code, f'status {status}')}"
        conn.send(b"after")
        assert conn.recv(timeout=30) == b"ok"
    ch.expect_success()


def check_stats(make_pair: MakePair) -> None:
    """stats() counts messages and bytes each way; the context manager closes."""
    conn, pending = make_pair()

    def child(c: Connection) -> None:
        for _ in range(5):
            c.send(c.recv(timeout=30))

    ch = Child(pending, child)
    with conn:
        for i in range(5):
            conn.send(b"x" * (i + 1))
            assert conn.recv(timeout=30) == b"x" * (i + 1)
        s = conn.stats()
        assert (s.msgs_sent, s.bytes_sent, s.msgs_received, s.bytes_received) == (5, 15, 5, 15)
        assert s.transport == conn.transport and s.epoch == conn.epoch == 0
    assert conn.closed
    ch.expect_success()


CHECKS: dict[str, Callable[[MakePair], None]] = {
    "ordering": check_ordering,
    "both_directions": check_both_directions,
    "fragments": check_fragments,
    "commit_order": check_commit_order,
    "commit_subset": check_commit_subset,
    "batches": check_batches,
    "backpressure": check_backpressure,
    "read_wouldblock": check_read_wouldblock,
    "recv_into": check_recv_into,
    "recv_many": check_recv_many,
    "no_space": check_no_space,
    "readiness": check_readiness,
    "clean_close": check_clean_close,
    "close_flushes": check_close_flushes,
    "held_at_close": check_held_at_close,
    "peer_died_reader": check_peer_died_reader,
    "peer_died_writer": check_peer_died_writer,
    "peer_died_getwritebuf": check_peer_died_getwritebuf,
    "dead_buffer": check_dead_buffer,
    "fork_invalidation": check_fork_invalidation,
    "stats": check_stats,
}


def run_check(name: str, make_pair: MakePair) -> None:
    """Run one check and verify that it leaked no fd and no mapping."""
    with no_leaks(f"check {name}"):
        CHECKS[name](make_pair)


def check_transport(make_pair: MakePair) -> None:
    """Run every conformance check against ``make_pair``; raises on the first failure."""
    for name in CHECKS:
        run_check(name, make_pair)
