"""Live reconfiguration (fable/reconfig.py): every ordered pair of transports, both directions,
held write buffers and the grace period, refusals, both sides asking at once, a peer dying
mid-switch. The echo peer runs in a forked child; the parent checks every message in order."""

from __future__ import annotations

import io
import os
import select
import selectors
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

import fable
from fable.transports import REGISTRY

pytestmark = pytest.mark.timeout(300)

NAMES = list(REGISTRY)


def _form(name: str) -> bool:
    return bool(REGISTRY[name].caps.forms[0])  # vmsplice-coop: unsafe only


def _fork_peer(pending: Any, body: Callable[[Any], int | None]) -> int:
    """Fork a child that opens the peer end and runs ``body(peer)``; its exit status is what
    ``body`` returns (None: 0), 0 as well if the parent closed the connection meanwhile, and 3
    on any other exception (printed). Returns the pid; the parent's copy of ``pending`` is
    closed."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = body(pending.open()) or 0
        except fable.ConnectionClosed:
            code = 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    pending.close()
    return pid


def _echo(peer: Any) -> None:
    """Echo every message until the parent closes."""
    for m in peer:
        peer.send(m)


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _echo_child(pending: Any, n: int, ask: list[str] | None = None) -> int:
    """Fork a child that echoes ``n`` messages (and asks for the switches in ``ask`` itself,
    one every n // (len(ask)+1) messages); returns its pid. Exit 0 = all echoed."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            peer = pending.open(trusted=True)
            every = n // (len(ask) + 1) if ask else 0
            c = 0
            while c < n:
                m = peer.recv(timeout=30)
                peer.send(m)
                c += 1
                if ask and every and c % every == 0:
                    peer.reconfigure(ask.pop(0), timeout=20)
            while True:  # until the parent closes
                peer.recv(timeout=30)
        except fable.ConnectionClosed:
            code = 0 if c == n else 4
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    pending.close()
    return pid


def _stream(a: str, switches: list[str], n: int, child_asks: list[str] | None = None) -> Any:
    """Send n messages through an echo child while switching; returns (conn stats, epoch)."""
    conn, pending = fable.open_pair(a, safe=_form(a), trusted=True)
    pid = _echo_child(pending, n, child_asks)
    got: list[Any] = []

    def reader() -> None:
        try:
            for _ in range(n):
                got.append(conn.recv(timeout=30))
        except Exception as e:
            got.append(e)

    t = threading.Thread(target=reader)
    t.start()
    per = n // (len(switches) + 1)
    i = 0
    try:
        for tr in [None, *switches]:
            if tr is not None:
                conn.reconfigure(tr, safe=_form(tr), timeout=20)
            for _ in range(per):
                conn.send(b"%d" % i)
                i += 1
        while i < n:
            conn.send(b"%d" % i)
            i += 1
        t.join(60)
        assert got == [b"%d" % k for k in range(n)], "lost, duplicated or reordered"
        st = conn.stats()
        epoch = conn.epoch
    finally:
        conn.close()
        code = _exit_code(pid)
    assert code == 0
    return st, epoch


@pytest.mark.parametrize("a", NAMES)
def test_every_ordered_pair_switches_without_loss(a: str) -> None:
    for b in NAMES:
        st, epoch = _stream(a, [b, a, b], 600)
        assert epoch == 3
        assert st.msgs_sent == st.msgs_received == 600


def test_the_other_side_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    st, epoch = _stream("unix", [], 900, child_asks=["mempipe-futex", "shmem-pipe"])
    assert epoch == 2 and st.msgs_received == 900


def test_properties_and_reconfig_fileno() -> None:
    conn, pending = fable.open_pair("pipe")
    pid = _echo_child(pending, 2)
    try:
        fd = conn.reconfig_fileno()
        assert not select.select([fd], [], [], 0)[0]
        conn.reconfigure("mempipe-futex", reason="test")
        assert select.select([fd], [], [], 0)[0]  # readable while in progress
        for _i in range(2):
            conn.send(b"x")
            assert conn.recv(timeout=10) == b"x"
        assert conn.transport == "mempipe-futex" and conn.epoch == 1 and conn.safe
        last = conn.last_switch
        assert last is not None and last["from"] == "pipe" and last["to"] == "mempipe-futex"
        assert last["reason"] == "test"
    finally:
        conn.close()
        assert _exit_code(pid) == 0, "the peer process failed"


def test_refused_switch_keeps_the_old_transport() -> None:
    conn, pending = fable.open_pair("unix", trusted=True)
    pid = _fork_peer(pending, _echo)  # a peer that does not trust: no unsafe reads for it
    try:
        conn._epochs.trusted = True
        with pytest.raises(fable.FableError, match="does not trust"):
            conn.reconfigure("mempipe-futex", safe=False)
        with pytest.raises(ValueError, match="no safe form"):
            conn.reconfigure("vmsplice-coop", safe=True)
        with pytest.raises(ValueError, match="unknown transport"):
            conn.reconfigure("carrier-pigeon")
        conn.send(b"still here")
        assert conn.recv(timeout=10) == b"still here"
        assert conn.transport == "unix" and conn.epoch == 0
    finally:
        conn.close()
        assert _exit_code(pid) == 0, "the peer process failed"


def test_unsafe_needs_this_sides_trust() -> None:
    conn, pending = fable.open_pair("unix")
    try:
        with pytest.raises(fable.PermissionDenied):
            conn.reconfigure("mempipe-futex", safe=False)
    finally:
        conn.close()
        pending.close()


def test_both_sides_ask_at_once() -> None:
    conn, pending = fable.open_pair("pipe")
    go_r, go_w = os.pipe()

    def peer_asks(peer: Any) -> None:
        os.read(go_r, 1)
        try:
            peer.reconfigure("unix", timeout=10)  # loses to the parent's (role 0)
        except fable.FableError:
            pass
        _echo(peer)

    pid = _fork_peer(pending, peer_asks)
    os.close(go_r)
    try:
        os.write(go_w, b"g")
        conn.reconfigure("mempipe-futex", timeout=10)
        for i in range(50):
            conn.send(b"%d" % i)
            assert conn.recv(timeout=10) == b"%d" % i
        # the requests met (the parent's wins: epoch 1), or one side saw the other's first and
        # asked again after it (epoch 2): either way both ends agree and nothing was lost
        assert (conn.transport, conn.epoch) in (
            ("mempipe-futex", 1),
            ("mempipe-futex", 2),
            ("unix", 2),
        )
    finally:
        conn.close()
        os.close(go_w)
        assert _exit_code(pid) == 0, "the peer process failed"


def test_held_write_buffers_within_and_past_the_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FABLE_GRACE_PERIOD", "0.5")
    fable.config.reload()
    conn, pending = fable.open_pair("mempipe-futex")
    pid = _echo_child(pending, 3)
    try:
        held = conn.getwritebuf(5)  # epoch 0
        conn.reconfigure("unix")
        conn.send(b"two")  # goes on in epoch 0 behind the held buffer: order kept
        held[0].data[:5] = b"first"
        conn.commit(held, 5)
        conn.send(b"three")  # now the switch happens
        assert [conn.recv(timeout=10) for _ in range(3)] == [b"first", b"two", b"three"]
        assert conn.transport == "unix"
        # held past the grace period: the connection fails loudly, nothing is lost silently
        held = conn.getwritebuf(5)
        conn.reconfigure("pipe")
        time.sleep(0.7)
        with pytest.raises(fable.FableError, match="grace period"):
            conn.send(b"late")
    finally:
        conn.close()
        assert _exit_code(pid) == 0, "the peer process failed"


def test_peer_dying_mid_switch() -> None:
    conn, pending = fable.open_pair("unix")
    pid = os.fork()
    if pid == 0:
        peer = pending.open()
        peer.recv(timeout=10)
        os._exit(0)  # dies without answering the switch
    pending.close()
    try:
        conn.send(b"x")
        with pytest.raises((fable.FableError, fable.PeerDied)):
            conn.reconfigure("mempipe-futex", timeout=3)
        assert _exit_code(pid) == 0, "the peer process failed"
        with pytest.raises(fable.PeerDied):
            conn.recv(timeout=3)
    finally:
        conn.close()


def _select_recv(sel: selectors.BaseSelector, conn: Any, n: int) -> list[bytes]:
    """n whole messages read the edge-style way: wait on the selector, getreadbuf until []."""
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


def test_fileno_stays_the_same_across_switches() -> None:
    conn, pending = fable.open_pair("pipe", trusted=True)
    pid = _echo_child(pending, 7 * 20)
    sel = selectors.DefaultSelector()
    try:
        fd = conn.fileno()
        sel.register(fd, selectors.EVENT_READ)  # once, for the connection's life
        i = 0
        for tr in ["unix", "mempipe-futex", "shmem-pipe", "tcp", "vmsplice-coop", "pipe", None]:
            if tr is not None:
                conn.reconfigure(tr, safe=_form(tr))
            # one message in several fragments in each batch, small enough for the echo not to
            # fill both directions while the parent is still sending
            msgs = [
                b"%d" % k + b"." * (70000 if k % 20 == 7 else k % 5 * 100) for k in range(i, i + 20)
            ]
            for m in msgs:
                conn.send(m)
            assert _select_recv(sel, conn, 20) == msgs
            assert conn.fileno() == fd
            i += 20
        assert conn.epoch == 6
        # the fd is out: no switch to a transport that no fd can see
        with pytest.raises(fable.FableError, match="spins"):
            conn.reconfigure("mempipe-spin")
        assert conn.transport == "pipe"
    finally:
        sel.close()
        conn.close()
        assert _exit_code(pid) == 0, "the peer process failed"


def test_a_peer_cannot_move_a_polled_connection_to_a_spinning_transport() -> None:
    conn, pending = fable.open_pair("unix")
    go_r, go_w = os.pipe()

    def peer_asks_for_spin(peer: Any) -> int:
        os.read(go_r, 1)
        try:
            peer.reconfigure("mempipe-spin", timeout=10)
            return 5
        except fable.FableError as e:
            if "fileno() was handed out" not in str(e):
                return 4
        peer.send(b"after")
        peer.recv(timeout=10)  # until the parent closes
        return 0

    pid = _fork_peer(pending, peer_asks_for_spin)
    os.close(go_r)
    try:
        conn.fileno()
        os.write(go_w, b"g")
        assert conn.recv(timeout=10) == b"after"
        assert conn.transport == "unix" and conn.epoch == 0
    finally:
        conn.close()
        os.close(go_w)
    assert _exit_code(pid) == 0


def test_a_transport_that_cannot_be_set_up_leaves_the_old_one_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from fable import transports

    def no_memory(*args: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    conn, pending = fable.open_pair("unix")

    def peer_without_memory(peer: Any) -> None:  # it cannot map shmem-pipe's ring
        info = transports.REGISTRY["shmem-pipe"]
        transports.REGISTRY["shmem-pipe"] = dataclasses.replace(info, open=no_memory)
        _echo(peer)

    pid = _fork_peer(pending, peer_without_memory)
    try:
        with pytest.raises(fable.FableError, match="Cannot allocate memory"):
            conn.reconfigure("shmem-pipe", timeout=10)  # the peer's end failed
        info = transports.REGISTRY["mempipe-futex"]
        monkeypatch.setitem(
            transports.REGISTRY, "mempipe-futex", dataclasses.replace(info, create=no_memory)
        )
        with pytest.raises(OSError, match="Cannot allocate memory"):
            conn.reconfigure("mempipe-futex", timeout=10)  # this side's end failed
        for i in range(20):
            conn.send(b"%d" % i)
            assert conn.recv(timeout=10) == b"%d" % i
        assert conn.transport == "unix" and conn.epoch == 0
        conn.reconfigure("pipe", timeout=10)  # and a later switch still works
        conn.send(b"on pipe")
        assert conn.recv(timeout=10) == b"on pipe"
        assert conn.transport == "pipe" and conn.epoch == 1
    finally:
        conn.close()
        code = _exit_code(pid)
    assert code == 0


def test_a_side_that_does_not_write_still_ends_its_epoch() -> None:
    """The child only reads: its control thread writes its END, so the parent's reader moves
    on and both ends free the old transport without the child ever writing again."""
    conn, pending = fable.open_pair("mempipe-futex")

    def reader_only(peer: Any) -> None:
        for m in peer:  # never writes
            if m != b"x":
                raise AssertionError(m)

    pid = _fork_peer(pending, reader_only)
    try:
        sw = conn._epochs
        conn.reconfigure("unix", timeout=10)
        conn.send(b"x")  # this side's END, then x on unix
        deadline = time.monotonic() + 10
        while set(sw.live) != {1}:
            assert time.monotonic() < deadline, f"epochs still held: {sorted(sw.live)}"
            assert conn.getreadbuf() == []  # reads the child's END: the read switch
            time.sleep(0.01)
        assert conn.transport == "unix" and not sw.busy
    finally:
        conn.close()
        code = _exit_code(pid)
    assert code == 0


@pytest.mark.parametrize("a", ["mempipe-futex", "shmem-pipe", "unix"])
def test_methods_looked_up_before_a_switch_still_work(a: str) -> None:
    """``send = conn.send`` (or ``conn.send(conn.recv())``, which looks ``send`` up before
    ``recv`` switches) keeps working after the switch, even once the old path is freed."""
    conn, pending = fable.open_pair(a)
    pid = _echo_child(pending, 6)
    try:
        send, recv = conn.send, conn.recv
        getwritebuf, commit = conn.getwritebuf, conn.commit
        getreadbuf, release = conn.getreadbuf, conn.release
        send(b"0")
        assert recv(timeout=10) == b"0"
        conn.reconfigure("pipe", timeout=10)
        conn.send(b"1")  # the switch: the path looked up above has ended its writes
        send(b"2")  # forwarded to the pipe, after 1
        bufs = getwritebuf(1)
        bufs[0].data[:1] = b"3"
        commit(bufs, 1)
        assert [recv(timeout=10) for _ in range(3)] == [b"1", b"2", b"3"]
        deadline = time.monotonic() + 10
        while len(conn._epochs.live) > 1:  # until the old path is freed
            assert time.monotonic() < deadline
            time.sleep(0.01)
        send(b"4")
        assert recv(timeout=10) == b"4"
        send(b"5")
        got: list[Any] = []
        while not got:
            got = getreadbuf()  # forwarded to the pipe
        assert [bytes(b.data) for b in got] == [b"5"] and got[0].epoch == 1
        release(got[0])  # forwarded to the pipe's release
        assert conn.stats().read_buffers_held == 0
        assert conn.transport == "pipe"
    finally:
        conn.close()
        assert _exit_code(pid) == 0, "the peer process failed"


def test_fileno_on_a_spinning_connection_moves_it_to_a_sleeping_transport() -> None:
    """A connection on mempipe-spin the library chose (not the application) moves to
    mempipe-adaptive when fileno() is asked for; the fd works across that switch at once."""
    cpus = sorted(os.sched_getaffinity(0))
    conn, pending = fable.open_pair("mempipe-spin")
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})

    def echo_on_the_other_cpu(peer: Any) -> None:
        os.sched_setaffinity(0, {cpus[1]})  # the two spinning ends apart
        _echo(peer)

    pid = _fork_peer(pending, echo_on_the_other_cpu)
    sel = selectors.DefaultSelector()
    try:
        conn.send(b"before")  # in flight on mempipe-spin when fileno() is asked for
        with pytest.raises(io.UnsupportedOperation, match="named by the application"):
            conn.fileno()  # open_pair names its transport: no move
        assert conn.transport == "mempipe-spin"
        conn._forced = False  # as if the daemon's policy had picked it
        fd = conn.fileno()
        assert conn.transport == "mempipe-adaptive"
        assert conn.last_switch is not None and "fileno()" in conn.last_switch["reason"]
        sel.register(fd, selectors.EVENT_READ)
        assert _select_recv(sel, conn, 1) == [b"before"]
        for i in range(20):
            conn.send(b"%d" % i)
            assert _select_recv(sel, conn, 1) == [b"%d" % i]
        assert conn.fileno() == fd and not conn._fd.kicking
        with pytest.raises(fable.FableError, match="spins"):
            conn.reconfigure("mempipe-spin")
    finally:
        sel.close()
        conn.close()
        os.sched_setaffinity(0, old)
        code = _exit_code(pid)
    assert code == 0


def test_an_end_that_waits_for_a_slow_reader_does_not_hold_up_other_connections() -> None:
    """Connection 1's peer stops reading with its pipe full, then asks for a switch: this
    side's END must wait for room, on a thread of its own. Meanwhile connection 2's peer asks
    for a switch, and this process's control thread must still answer it (this side reads
    neither connection meanwhile: nothing else would)."""
    c1, p1 = fable.open_pair("mempipe-futex")
    c2, p2 = fable.open_pair("unix")
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()

    def peer(side1: Any) -> int:
        side2 = p2.open()
        os.read(go_r, 1)  # the parent filled connection 1
        side1.reconfigure("unix", timeout=10)  # accepted; the parent's END finds no room
        try:
            side2.reconfigure("mempipe-futex", timeout=5)  # must be answered all the same
        except fable.Timeout:
            return 5
        os.write(res_w, b"k")
        n = 0
        while side1.recv(timeout=10) != b"last":  # now drain connection 1: its END goes in
            n += 1
        return 0 if n > 0 else 6

    pid = _fork_peer(p1, peer)
    p2.close()
    try:
        for size in (65536, 4096, 256, 16, 0):  # the ring full to the last byte
            while True:
                try:
                    c1.send(b"x" * size, timeout=0)
                except fable.WouldBlock:
                    break
        os.write(go_w, b"g")
        assert select.select([res_r], [], [], 20)[0], "connection 2's switch was not answered"
        assert os.read(res_r, 1) == b"k"
        c1.send(b"last")  # after the pending END: on unix once the peer drained the ring
        assert c2.transport == "mempipe-futex"
        deadline = time.monotonic() + 20
        while c1._epochs.tx.transport != "unix":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        for fd in (go_r, go_w, res_r, res_w):
            os.close(fd)
        c1.close()
        c2.close()
        code = _exit_code(pid)
    assert code == 0
