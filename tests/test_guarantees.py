"""Guarantees the README states that need a set-up of their own: a ring write to a reader that
is gone, close()'s linger, mempipe-adaptive's spinning (its budget, and never beside its peer),
and the pipe transport's 1 MiB pipes (and what an unprivileged user over its quota gets)."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator

import pytest

import fable
from fable.errors import ConnectionClosed, PeerDied, Timeout, WouldBlock
from fable.testing import open_fds
from fable.testing.harness import go_pipe, wait_go

RINGS = [t for t in fable.REGISTRY if t.startswith("mempipe-")]
FORMS = [(t, safe) for t in RINGS for safe in fable.REGISTRY[t].caps.forms]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set fable settings for this process and the children it forks."""
    yield monkeypatch
    fable.config.reload()


def _set(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    fable.config.reload()


# ------------------------------------------------------------------- a ring's gone reader
@pytest.mark.parametrize("how", ["killed", "closed"])
@pytest.mark.parametrize(("transport", "safe"), FORMS)
def test_a_ring_write_to_a_gone_reader_succeeds_and_flush_tells(
    transport: str, safe: bool, how: str
) -> None:
    """On the rings a write succeeds while there is room, with no system call, even when the
    reader is gone; flush() is where the writer learns it: PeerDied for a reader that was
    killed, ConnectionClosed for one that closed."""
    conn, pending = fable.open_pair(transport, safe=safe)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the reader
        code = 1
        try:
            peer = pending.open()
            peer.send(b"ready")
            if how == "closed":
                peer.close()
                code = 0
            else:
                time.sleep(60)  # until killed
        finally:
            os._exit(code)
    pending.close()
    with conn:
        assert conn.recv(timeout=10) == b"ready"
        if how == "killed":
            os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        assert os.waitstatus_to_exitcode(status) == (-signal.SIGKILL if how == "killed" else 0)
        conn.send(b"into the ring")  # room: it succeeds
        bufs = conn.getwritebuf(5)
        bufs[0].data[:5] = b"later"
        conn.commit(bufs, 5, flush=False)
        expected = PeerDied if how == "killed" else ConnectionClosed
        with pytest.raises(expected) as e:
            conn.flush()
        if how == "closed":
            assert not isinstance(e.value, PeerDied)


# ---------------------------------------------------------------------------------- linger
# messages wait in this process (tcp is left out: its kernel buffers grow to take them all)
LINGERING = ["unix", "pipe", "vmsplice-coop"]


@pytest.mark.parametrize("linger", [0.3, 1.5])
@pytest.mark.parametrize("transport", LINGERING)
def test_close_waits_for_a_slow_reader_at_most_the_linger(
    transport: str, linger: float, env: pytest.MonkeyPatch
) -> None:
    """FABLE_CLOSE_LINGER: close() waits that long for a reader that takes nothing, then
    gives up; the reader then gets what it can and PeerDied (messages were lost), never a
    clean close."""
    _set(env, "FABLE_CLOSE_LINGER", str(linger))
    conn, pending = fable.open_pair(transport)
    go_r, go_w = go_pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the slow reader
        code = 1
        try:
            os.close(go_w)
            peer = pending.open()
            peer.send(b"ready")
            wait_go(go_r)  # the writer closed
            try:
                while True:
                    peer.recv(timeout=10)
            except PeerDied:
                code = 0
            except ConnectionClosed:
                code = 2
        finally:
            os._exit(code)
    pending.close()
    os.close(go_r)
    status = None
    try:
        assert conn.recv(timeout=10) == b"ready"
        try:
            while True:
                conn.send(b"q" * 4096, timeout=0)
        except WouldBlock:
            pass
        if transport != "vmsplice-coop":  # and 2 MiB kept back in this process (under
            for _ in range(512):  # FABLE_RING_SIZE, 4 MiB: no wait), more than a pipe takes
                bufs = conn.getwritebuf(4096)
                conn.commit(bufs, 4096, flush=False)
        t0 = time.monotonic()
        conn.close()
        took = time.monotonic() - t0
        os.write(go_w, b"g")
        status = os.waitpid(pid, 0)[1]
    finally:
        os.close(go_w)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the reader did not end with PeerDied"
    assert linger - 0.05 <= took < linger + 3.0, took


# ----------------------------------------------------------------------- adaptive spinning
def _cpu_while_waiting(place: str, budget_ns: int, env: pytest.MonkeyPatch) -> float:
    """Seconds of CPU this thread used in a 1 s wait for data on mempipe-adaptive, with the
    writer on the other CPU (``apart``) or on this one (``beside``), after the writer's CPU
    is known to the ring (it waited once)."""
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "this test needs two CPUs"
    _set(env, "FABLE_SPIN_BUDGET_NS", str(budget_ns))
    conn, pending = fable.open_pair("mempipe-adaptive")
    old = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the writer
        code = 1
        try:
            os.sched_setaffinity(0, {cpus[1] if place == "apart" else cpus[0]})
            peer = pending.open()
            try:
                peer.recv(timeout=0.05)  # a wait: the ring now knows this side's CPU
            except Timeout:
                pass
            peer.send(b"noted")
            time.sleep(1.0)
            peer.send(b"data")
            assert peer.recv(timeout=10) == b"bye"
            code = 0
        finally:
            os._exit(code)
    pending.close()
    try:
        os.sched_setaffinity(0, {cpus[0]})
        with conn:
            assert conn.recv(timeout=10) == b"noted"
            t0 = time.thread_time()
            assert conn.recv(timeout=10) == b"data"
            used = time.thread_time() - t0
            conn.send(b"bye")
    finally:
        os.sched_setaffinity(0, old)
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0, "the writer failed"
    return used


def test_adaptive_spins_its_budget_but_never_beside_its_peer(env: pytest.MonkeyPatch) -> None:
    """FABLE_SPIN_BUDGET_NS is how long mempipe-adaptive spins before it sleeps: 2 s of budget
    spins through a 1 s wait when the writer runs on another CPU (the control: the wait could
    spin), a budget of 0 does not; and with the writer on the same CPU it does not spin at
    all, whatever the budget (spinning would only keep the writer off the CPU)."""
    assert _cpu_while_waiting("apart", 2_000_000_000, env) > 0.3
    assert _cpu_while_waiting("apart", 0, env) < 0.2
    assert _cpu_while_waiting("beside", 2_000_000_000, env) < 0.2


# -------------------------------------------------------------------------------- pipe size
def _pipe_sizes(fds: set[int]) -> list[int]:
    """The sizes of the pipes among ``fds`` (fds closed meanwhile are skipped)."""
    sizes = []
    for fd in fds:
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                sizes.append(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
        except OSError:
            pass
    return sorted(sizes)


def _round_trip_64k(conn: fable.Connection, other: fable.Connection) -> None:
    """A 64 KiB message each way (a reader thread: a small pipe takes it in several writes)."""
    got: list[bytes] = []
    for a, b in ((conn, other), (other, conn)):
        t = threading.Thread(target=lambda r=b: got.append(r.recv(timeout=10)))
        t.start()
        a.send(b"p" * 65536, timeout=10)
        t.join(15)
    assert got == [b"p" * 65536] * 2


def test_the_pipe_transport_uses_1_mib_pipes() -> None:
    before = open_fds()
    conn, pending = fable.open_pair("pipe")
    other = pending.open()
    with conn, other:
        assert _pipe_sizes(open_fds() - before) == [1 << 20] * 4
        _round_trip_64k(conn, other)


def test_an_unprivileged_user_over_its_pipe_quota_gets_default_pipes_that_work() -> None:
    """Over pipe-user-pages-soft, Linux refuses to enlarge a user's pipes: the transport keeps
    the default size and works as before (checked in a child as a second uid; the control:
    the same uid's first pipe was enlarged)."""
    from helpers import UID, Child

    assert os.geteuid() == 0, "this test needs root (setresuid to a second uid)"

    def as_another_user() -> tuple[int, list[int]]:
        from fable.transports.pipe import new_pipe

        os.setresgid(UID, UID, UID)
        os.setresuid(UID, UID, UID)
        r, w = new_pipe()
        first = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        hog = [(r, w)]
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            soft = int(f.read())
        while len(hog) * 256 <= soft + 256:  # 1 MiB pipes (256 pages) past the soft limit
            hog.append(new_pipe())
        before = open_fds()
        conn, pending = fable.open_pair("pipe")
        other = pending.open()
        with conn, other:
            sizes = _pipe_sizes(open_fds() - before)
            _round_trip_64k(conn, other)
        return first, sizes

    first, sizes = Child(as_another_user).result()
    assert first == 1 << 20  # the control: enlarged while under the quota
    assert len(sizes) == 4 and max(sizes) < 1 << 20, sizes
