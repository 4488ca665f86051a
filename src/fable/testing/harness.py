"""What the conformance checks are made of: a peer in a forked child, message patterns, and
the fd and mapping counts that prove nothing leaked. Public, for checks of your own.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import select
import selectors
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from fable.connection import Connection, PendingEnd, attach
from fable.control import control
from fable.errors import PeerDied, WouldBlock

__all__ = [
    "SIZES",
    "SMALL_SIZES",
    "Child",
    "MakePair",
    "dies_within_a_second",
    "fable_mappings",
    "fill",
    "go_pipe",
    "idle_peer",
    "no_leaks",
    "open_fds",
    "pattern",
    "role_one",
    "select_recv",
    "verify",
    "wait_go",
    "wait_readable",
]

MakePair = Callable[[], tuple[Connection, PendingEnd]]

# Sizes that cross every boundary we know of: empty, tiny, the small-message cut-off, pages,
# one frame fragment (256 KiB), several, and a large message (8 MiB).
SIZES = (
    0,
    1,
    63,
    64,
    65,
    2047,
    2049,
    4095,
    4096,
    4097,
    65536,
    262143,
    262144,
    262145,
    1 << 20,
    8 << 20,
)
SMALL_SIZES = (0, 1, 8, 64, 100, 4096, 5000, 65536)


def pattern(seq: int, size: int) -> bytes:
    """The payload of message ``seq``: its sequence number repeated (first 8 bytes = seq)."""
    if size == 0:
        return b""
    word = (seq & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    return (word * (size // 8 + 1))[:size]


def verify(seq: int, data: bytes | bytearray | memoryview, size: int | None = None) -> None:
    """Assert that ``data`` is message ``seq`` (of ``size`` bytes, when given)."""
    if size is not None:
        assert len(data) == size, f"message {seq}: {len(data)} B, expected {size} B"
    assert bytes(data) == pattern(seq, len(data)), f"message {seq}: corrupted or out of order"


def open_fds() -> set[int]:
    """The fds open in this process now, after a garbage collection (so that an earlier
    test's garbage cannot close one of them later and make two counts differ). The process's
    control thread (its epoll and wake-up fd, made once for the process's life) is started
    first, so that it is never counted as a leak of the first connection."""
    control()
    gc.collect()
    return {int(x) for x in os.listdir("/proc/self/fd")}


def fable_mappings() -> list[str]:
    """The mappings of fable's shared memory and arenas in this process (all are memfds named
    ``fable-...``), after a garbage collection so that dropped objects are gone."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return [line.split()[-2] for line in f if "/memfd:fable" in line]


class Child:
    """A forked child that opens the other end of a pair (``trusted``: passed to
    ``PendingEnd.open``) and runs ``role(conn, *args)``; it exits 0 if the role returns, 1 (its
    traceback on stderr) if it raises. The parent's copy of ``pending`` is closed."""

    def __init__(
        self,
        pending: PendingEnd,
        role: Callable[..., None],
        *args: Any,
        trusted: bool | None = None,
    ) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                conn = pending.open(trusted=trusted)
                role(conn, *args)
                conn.close()
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        pending.close()
        self.pid = pid
        self._status: int | None = None

    def join(self, timeout: float = 60.0) -> int:
        """Wait for the child; kill it and fail if it is still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._status = status
                break
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"child {self.pid} still running after {timeout} s")
            time.sleep(0.005)
        return self._status

    def expect_success(self, timeout: float = 60.0) -> None:
        status = self.join(timeout)
        assert os.waitstatus_to_exitcode(status) == 0, f"child failed (status {status})"

    def kill(self) -> None:
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, self._status = os.waitpid(self.pid, 0)


def wait_readable(conn: Connection, timeout: float) -> None:
    """Wait until ``conn`` may have something to read: on its fd, or by napping when the
    transport has none (spinning transports raise io.UnsupportedOperation from fileno)."""
    try:
        fd = conn.fileno()
    except io.UnsupportedOperation:
        time.sleep(min(timeout, 0.001))
        return
    p = select.poll()  # not select.select: fds above 1024 work
    p.register(fd, select.POLLIN)
    p.poll(int(timeout * 1000))


def go_pipe() -> tuple[int, int]:
    """A pipe for "go": a child waits on it (``wait_go``) until the parent says so."""
    return os.pipe()


def wait_go(fd: int) -> None:
    assert os.read(fd, 1) == b"g"


def fill(conn: Connection, chunk: bytes = b"z" * 65536) -> None:
    """Send ``chunk`` until the connection is full (the next send would wait)."""
    while True:
        try:
            conn.send(chunk, timeout=0)
        except WouldBlock:
            return


def dies_within_a_second(child: Child, blocked: Callable[[], object], what: str) -> None:
    """Kill ``child`` 0.3 s into ``blocked()`` (which must block until then): it must raise
    PeerDied within 1 s of the kill."""
    stamp: list[float] = []

    def kill() -> None:
        time.sleep(0.3)
        stamp.append(time.monotonic())
        os.kill(child.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        blocked()
        raise AssertionError(f"{what} never noticed that the peer was killed")
    except PeerDied:
        took = time.monotonic() - stamp[0]
        assert took < 1.0, f"PeerDied came {took:.2f} s after the kill ({what})"
    finally:
        killer.join()
    child.join()


def idle_peer(c: Connection) -> None:
    """A peer that says it is ready, then does nothing (until it is killed)."""
    c.send(b"ready")
    time.sleep(120)


@contextlib.contextmanager
def no_leaks(what: str) -> Iterator[None]:
    """Fail unless every fd and every fable mapping opened inside the block is gone after it."""
    before = open_fds()
    maps = fable_mappings()
    yield
    gc.collect()  # buffers still referenced by a dead frame keep their memory (and its fd)
    leaked = open_fds() - before
    assert not leaked, f"{what} leaked fds {sorted(leaked)}"
    left = fable_mappings()
    assert len(left) <= len(maps), f"{what} leaked mappings {left} (before: {maps})"


def select_recv(sel: selectors.BaseSelector, conn: Connection, n: int) -> list[bytes]:
    """``n`` whole messages read the edge-style way: wait on ``sel`` (which has the
    connection's ``fileno()``), then ``getreadbuf`` until it returns ``[]``."""
    out: list[bytes] = []
    parts: list[bytes] = []
    deadline = time.monotonic() + 20
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} messages came"
        sel.select(1.0)
        while bufs := conn.getreadbuf():
            for b in bufs:
                parts.append(bytes(b.data))
                more = b.more
                conn.release(b)
                if not more:
                    out.append(b"".join(parts))
                    parts = []
    return out


# --------------------------------------------------------------------------- swapped roles
def role_one(make_pair: MakePair) -> MakePair:
    """``make_pair`` with the roles swapped, for any check written for it: the side the check
    holds in this process is role 1 (it opens the other end), and the side the check's
    ``Child`` runs is role 0 (the child calls ``make_pair`` itself and hands the other end
    back over a socket). The held side opens on first use, once the child has made the pair;
    a child that fails first makes that use raise within 30 s."""

    def swapped() -> tuple[Connection, PendingEnd]:
        here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        here.settimeout(30.0)
        return _RoleOne(here), _RoleZeroPending(make_pair, there)  # type: ignore[return-value]

    return swapped


class _RoleZeroPending:
    """In the child (``open``): make the pair, pass its other end to the parent, keep role 0."""

    def __init__(self, make_pair: MakePair, sock: socket.socket) -> None:
        self._make_pair, self._sock = make_pair, sock

    def open(self, timeout: float | None = 10.0, *, trusted: bool | None = None) -> Connection:
        conn, pending = self._make_pair()
        socket.send_fds(self._sock, [b"p"], [pending.fileno()])
        pending.close()
        self._sock.close()
        return conn

    def close(self) -> None:
        self._sock.close()


class _RoleOne:
    """The parent's side: opens role 1 from the end the child passes, on first use."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self._conn: Connection | None = None

    def _get(self) -> Connection:
        if self._conn is None:
            assert self._sock is not None
            try:
                _, fds, _, _ = socket.recv_fds(self._sock, 1, 1)
            finally:
                self._sock.close()
                self._sock = None
            if not fds:
                raise AssertionError("the child (role 0) never made the pair")
            self._conn = attach(fds[0], timeout=30)
        return self._conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __enter__(self) -> Connection:
        return self._get().__enter__()

    def __exit__(self, *exc: object) -> None:
        self._get().__exit__(*exc)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._get())
