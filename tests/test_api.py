"""API details that the conformance suite does not cover: repr, iteration, misuse."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import fable
from fable.buffer import Buffer, PyBuffer
from fable.errors import DeadBuffer, FableError, NoSpace, WouldBlock


@pytest.fixture(params=["unix", "mempipe-spin"])
def pair(request: pytest.FixtureRequest) -> tuple[fable.Connection, fable.Connection]:
    """A stream transport, and a ring (whose buffer calls have a C fast path)."""
    conn, pending = fable.open_pair(request.param)
    return conn, pending.open()


@pytest.mark.parametrize("cls", [Buffer, PyBuffer], ids=["c", "reference"])
def test_buffer_contract(cls: Any) -> None:
    """fable.Buffer (the C core's) and the reference class behave alike."""
    owner, other = object(), object()
    b = cls(memoryview(bytearray(b"abcd")), owner, ("tok", 1), more=True, epoch=3, writable=True)
    assert (b.alive, b.more, b.epoch, b.writable, b.owner, len(b)) == (
        True,
        True,
        3,
        True,
        owner,
        4,
    )
    assert bytes(b.data) == b"abcd" and b._token == ("tok", 1) and b._owner is owner
    assert repr(b) == "<fable.Buffer write 4 B epoch=3 more=True>"
    with pytest.raises(DeadBuffer, match="another connection"):
        b._take(other)
    assert b.alive
    assert b._take(owner) == ("tok", 1)
    assert not b.alive and b._data is None
    for touch in (lambda: b.data, lambda: len(b), lambda: b._take(owner)):
        with pytest.raises(DeadBuffer, match="already"):
            touch()
    assert repr(b) == "<fable.Buffer write dead epoch=3 more=True>"
    r = cls(memoryview(b"x"), owner, None, more=False, epoch=0, writable=False)
    assert "read 1 B" in repr(r) and r._take(owner) is None


def test_c_buffer_needs_its_keywords() -> None:
    with pytest.raises(TypeError, match="more, epoch and writable"):
        Buffer(memoryview(b""), None, None)  # type: ignore[call-arg]


def test_unsafe_read_buffers_pin_at_most_half_the_ring() -> None:
    """Unsafe read buffers keep their records in the ring: once they hold half of it and
    nothing more is ready, getreadbuf raises NoSpace (the writer may need the room); reading
    goes on once some are released."""
    conn, pending = fable.open_pair("mempipe-spin", safe=False, options={"capacity": 65536})
    peer = pending.open(trusted=True)
    with conn, peer:
        for i in range(9):
            conn.send(bytes([i]) * 4000)
        held = peer.getreadbuf()  # 36,000 B of 65,536
        assert [b.data[0] for b in held] == list(range(9))
        with pytest.raises(NoSpace, match="of the ring"):
            peer.getreadbuf()
        assert peer.stats().read_buffers_held == 9
        peer.release(held.pop(0))  # 32,000 B: below half
        assert peer.getreadbuf() == []
        conn.send(b"\x09" * 4000)
        (nxt,) = peer.getreadbuf()
        assert nxt.data[0] == 9
        for b in [*held, nxt]:
            peer.release(b)
        assert peer.stats().read_buffers_held == 0
        with pytest.raises(DeadBuffer):
            peer.release(nxt)
        for i in range(40):  # 160 KB through the 64 KiB ring: released records are room again
            conn.send(i.to_bytes(4, "little") * 1000, timeout=5)
            (b,) = peer.getreadbuf()
            assert int.from_bytes(b.data[:4], "little") == i
            peer.release(b)


@pytest.mark.parametrize(
    ("transport", "backend"), [("mempipe-spin", "c"), ("mempipe-spin", "py"), ("shmem-pipe", "c")]
)
def test_safe_read_buffers_come_a_burst_at_a_time_and_never_change(
    transport: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A safe getreadbuf on shared memory stops once it has copied ``COPY_BURST`` bytes (the
    rest comes at the next call): in the C ring, the reference ring and shmem-pipe. The C ring
    refills the copies of released buffers for the next messages; a copy the application still
    holds (the bytes under the view) never changes, and a refilled one hashes as its new
    content."""
    from fable.transports.message import COPY_BURST

    monkeypatch.setenv("FABLE_BACKEND", backend)
    fable.config.reload()
    try:
        conn, pending = fable.open_pair(transport, safe=True)
        peer = pending.open()
        size, per_call = 65536, COPY_BURST // 65536
        with conn, peer:
            for i in range(3 * per_call):
                conn.send(bytes([i]) * size)
            first = peer.getreadbuf()
            assert [b.data[0] for b in first] == list(range(per_call))
            kept = first[0].data.obj  # the application keeps this copy's bytes
            for b in first:
                hash(b.data.obj)  # (cached in the bytes object)
                peer.release(b)
            got = []
            for _ in range(2):
                bufs = peer.getreadbuf()
                assert len(bufs) == per_call
                for b in bufs:
                    content = bytes(b.data)
                    got.append(content == bytes([content[0]]) * size and content[0])
                    assert hash(b.data.obj) == hash(content)
                    peer.release(b)
            assert got == list(range(per_call, 3 * per_call))
            assert kept == bytes(size) and peer.getreadbuf() == []
    finally:
        monkeypatch.delenv("FABLE_BACKEND")
        fable.config.reload()


def test_iteration_ends_on_clean_close(pair: tuple[fable.Connection, fable.Connection]) -> None:
    a, b = pair
    a.send_many([b"1", b"2", b"3"])
    a.close()
    assert list(b) == [b"1", b"2", b"3"]
    b.close()


def test_commit_misuse(pair: tuple[fable.Connection, fable.Connection]) -> None:
    a, b = pair
    with a, b:
        x = a.getwritebuf(10)
        y = a.getwritebuf(10)
        with pytest.raises(ValueError, match="one getwritebuf"):
            a.commit([x[0], y[0]], 5)
        with pytest.raises(ValueError, match="nbytes"):
            a.commit(x, 11)
        with pytest.raises(ValueError):
            a.commit([], 0)
        with pytest.raises(ValueError):
            a.getwritebuf(-1)
        a.abort(x)
        a.abort(y)
        with pytest.raises(DeadBuffer):
            a.abort(x)
        assert "dead" in repr(x[0]) and "write" in repr(x[0])
        assert a.transport in repr(a)


def test_foreign_buffer_rejected(pair: tuple[fable.Connection, fable.Connection]) -> None:
    a, b = pair
    with a, b:
        bufs = a.getwritebuf(4)
        with pytest.raises((ValueError, DeadBuffer)):
            b.commit(bufs, 4)
        a.abort(bufs)


def test_mixing_recv_into_a_fragmented_message_is_refused(
    pair: tuple[fable.Connection, fable.Connection],
) -> None:
    a, b = pair
    with a, b:
        t = threading.Thread(target=a.send, args=(b"q" * 600_000,))
        t.start()  # three fragments
        got: list[fable.Buffer] = []
        while not got or got[-1].more:
            bufs = b.getreadbuf()
            got.extend(bufs)
            if got and got[-1].more:
                with pytest.raises(FableError, match="getreadbuf"):
                    b.recv(timeout=0)
        assert b"".join(bytes(x.data) for x in got) == b"q" * 600_000
        for x in got:
            b.release(x)
        t.join()
        a.send(b"next")
        assert b.recv(timeout=5) == b"next"
        with pytest.raises(WouldBlock):
            b.recv(timeout=0)


def test_negative_timeout(pair: tuple[fable.Connection, fable.Connection]) -> None:
    a, b = pair
    with a, b, pytest.raises(ValueError):
        b.recv(timeout=-1)


def test_the_papers_names_move_messages(pair: tuple[fable.Connection, fable.Connection]) -> None:
    """fable.xio: the buffer calls and the batch calls under the paper's names."""
    from fable import xio

    a, b = pair
    with a, b:
        bufs = xio.xio_getwritebuf(a, 5)
        bufs[0].data[:5] = b"hello"
        xio.xio_commit(a, bufs, 5)
        got = xio.xio_getreadbuf(b)
        while not got:
            got = xio.xio_getreadbuf(b)
        assert bytes(got[0].data) == b"hello"
        xio.xio_release(b, got[0])
        assert xio.xio_send_many(a, [b"1", b"2", b"3"]) == 3
        msgs: list[bytes] = []
        while len(msgs) < 3:
            msgs += xio.xio_recv_many(b, 8, timeout=5)
        assert msgs == [b"1", b"2", b"3"]
