"""API details that the conformance suite does not cover: repr, iteration, misuse."""

from __future__ import annotations

import threading

import pytest

import fable
from fable.errors import DeadBuffer, FableError, WouldBlock


@pytest.fixture
def pair() -> tuple[fable.Connection, fable.Connection]:
    conn, pending = fable.open_pair("unix")
    return conn, pending.open()


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
        assert "unix" in repr(a)


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
