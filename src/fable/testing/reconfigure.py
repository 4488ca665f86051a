"""The reconfiguration contract (``fable/epochs.py``) as checks any transport can run.

``check_reconfigure(make_pair)`` moves connections made by ``make_pair()`` to every transport of
``fable.REGISTRY`` and back, with traffic, from either side, and checks what a switch promises:
no message lost, duplicated or reordered; write buffers held across a switch keep their place;
read buffers of an old epoch stay valid; methods looked up before a switch keep working; a side
that never writes still ends its epoch, so that both free the old transport; ``fileno()`` stays
the same fd and, once handed out, keeps the connection off spinning transports; a refusal leaves
the connection as it was; a peer that dies mid-switch gives ``PeerDied``; one connection's END
waiting for a slow reader does not hold up another connection's switch.

``make_pair`` must give a side that trusts its peer (``functools.partial(fable.open_pair, name,
trusted=True)``), so that every form of every transport can be switched to; the checks open the
other end trusting too, except where they say otherwise. Every check runs across two processes,
checks the child's exit status and fails on a leaked fd or mapping.
"""

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

from fable.connection import Connection, PendingEnd, open_pair
from fable.control import control
from fable.errors import (
    ConnectionClosed,
    FableError,
    PeerDied,
    PermissionDenied,
    WouldBlock,
)
from fable.testing.harness import Child, MakePair, go_pipe, no_leaks, select_recv, wait_go
from fable.transports import REGISTRY

__all__ = ["RECONFIGURE_CHECKS", "check_reconfigure", "run_reconfigure_check"]

ANSWER_S = 20.0  # how long a switch may take to be answered (a loaded 2-core machine)


def _form(name: str) -> bool:
    """The first form of a transport (safe where it has one; vmsplice-coop has only unsafe)."""
    return bool(REGISTRY[name].caps.forms[0])


def _echo(peer: Connection) -> None:
    """Echo every message until the other side closes."""
    for m in peer:
        peer.send(m)


def _echo_n(peer: Connection, n: int, ask: list[str]) -> None:
    """Echo ``n`` messages, asking for the switches in ``ask`` on the way (one every
    n // (len(ask) + 1) messages), then wait for the other side to close."""
    every = n // (len(ask) + 1) if ask else 0
    for c in range(1, n + 1):
        peer.send(peer.recv(timeout=30))
        if ask and every and c % every == 0:
            name = ask.pop(0)
            peer.reconfigure(name, safe=_form(name), timeout=ANSWER_S)
    try:
        peer.recv(timeout=30)
    except ConnectionClosed:
        return
    raise AssertionError("a message after the last one")


def _stream(make_pair: MakePair, targets: list[str], n: int, ask: list[str]) -> tuple[Any, int]:
    """``n`` messages through an echo child while this side switches to each of ``targets``
    in turn (and the child to each of ``ask``); returns (stats, epoch)."""
    conn, pending = make_pair()
    child = Child(pending, _echo_n, n, list(ask), trusted=True)
    got: list[Any] = []

    def reader() -> None:
        try:
            for _ in range(n):
                got.append(conn.recv(timeout=30))
        except Exception as e:
            got.append(e)

    t = threading.Thread(target=reader)
    t.start()
    per = n // (len(targets) + 1)
    i = 0
    try:
        for tr in [None, *targets]:
            if tr is not None:
                conn.reconfigure(tr, safe=_form(tr), timeout=ANSWER_S)
            for _ in range(per):
                conn.send(b"%d" % i)
                i += 1
        while i < n:
            conn.send(b"%d" % i)
            i += 1
        t.join(60)
        assert got == [b"%d" % k for k in range(n)], f"lost, duplicated or reordered: {got[-1]!r}"
        st, epoch = conn.stats(), conn.epoch
    finally:
        conn.close()
        child.expect_success()
    return st, epoch


def check_switch_everywhere(make_pair: MakePair) -> None:
    """To every transport, back and there again, under traffic: nothing lost, epoch 3."""
    probe, other = make_pair()
    a = probe.transport
    probe.close()
    other.close()
    for b in REGISTRY:
        with no_leaks(f"{a} -> {b}"):
            st, epoch = _stream(make_pair, [b, a, b], 300, [])
        assert epoch == 3, f"{a} -> {b}: epoch {epoch}"
        assert st.msgs_sent == st.msgs_received == 300


def check_peer_asks(make_pair: MakePair) -> None:
    """The other side asks for the switches (to two other transports) while it echoes."""
    st, epoch = _stream(make_pair, [], 600, ["mempipe-futex", "shmem-pipe"])
    assert epoch == 2 and st.msgs_received == 600


def check_reconfig_fileno(make_pair: MakePair) -> None:
    """reconfig_fileno() is readable while a switch is in progress, and empty once both sides
    are done with the old epoch; the properties follow the switch."""
    conn, pending = make_pair()
    child = Child(pending, _echo, trusted=True)
    fd = conn.reconfig_fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        old = conn.transport
        to = "pipe" if old != "pipe" else "unix"
        assert not poller.poll(0)
        conn.reconfigure(to, reason="a check")
        assert poller.poll(0), "reconfig_fileno not readable while the switch is in progress"
        for _ in range(2):
            conn.send(b"x")
            assert conn.recv(timeout=10) == b"x"
        assert conn.transport == to and conn.epoch == 1 and conn.safe
        last = conn.last_switch
        assert last is not None and (last["from"], last["to"]) == (old, to)
        assert last["reason"] == "a check"
        deadline = time.monotonic() + 10
        while poller.poll(0):  # the old epoch is freed on both sides soon after
            assert time.monotonic() < deadline, "reconfig_fileno stayed readable"
            assert conn.getreadbuf() == []
            time.sleep(0.01)
    finally:
        conn.close()
        child.expect_success()


def _refuses_the_first_offer(conn: Connection, pending: PendingEnd) -> None:
    """A transport with no safe form: an untrusting peer refuses the very first offer (its
    open raises PermissionDenied), and this side hears why (PermissionDenied, not PeerDied)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            pending.open(trusted=False)
        except PermissionDenied as e:
            code = 0 if "does not trust" in str(e) else 4
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    pending.close()
    try:
        try:
            conn.recv(timeout=10)
            raise AssertionError("a message from a peer that refused the connection")
        except PermissionDenied as e:
            assert "refused the connection" in str(e) and "does not trust" in str(e), e
    finally:
        conn.close()
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0, f"the untrusting peer: status {status}"


def check_refusal(make_pair: MakePair) -> None:
    """A peer that does not trust refuses unsafe reads: the proposer gets its reason and the
    connection goes on as it was; unknown transports and missing forms are refused here. (On
    a transport with no safe form, the untrusting peer refuses the first offer already.)"""
    conn, pending = make_pair()
    if True not in REGISTRY[conn.transport].caps.forms:
        _refuses_the_first_offer(conn, pending)
        return
    child = Child(pending, _echo, trusted=False)
    try:
        before = (conn.transport, conn.epoch)
        try:
            conn.reconfigure("mempipe-futex", safe=True, peer_safe=False, timeout=ANSWER_S)
            raise AssertionError("an untrusting peer accepted unsafe reads")
        except PermissionDenied as e:
            assert "does not trust" in str(e), e
        for bad, why in (("vmsplice-coop", "no safe form"), ("carrier-pigeon", "unknown")):
            try:
                conn.reconfigure(bad, safe=True)
                raise AssertionError(f"{bad}: accepted")
            except ValueError as e:
                assert why in str(e), e
        conn.send(b"still here")
        assert conn.recv(timeout=10) == b"still here"
        assert (conn.transport, conn.epoch) == before
    finally:
        conn.close()
        child.expect_success()


def _hold_control_thread() -> threading.Event:
    """Keep this process's control thread (which reads every setup channel) busy until the
    returned event is set; returns once it is held."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(ANSWER_S)

    control().call_later(0, hold)
    assert entered.wait(ANSWER_S), "the control thread never ran the hold"
    return release


def _ask_in_a_thread(conn: Connection, transport: str) -> tuple[threading.Thread, list[Any]]:
    """``conn.reconfigure(transport)`` on a thread; returns once the proposal is sent (the
    connection's reconfig_fileno is readable). The list gets None or the exception."""
    answer: list[Any] = []

    def ask() -> None:
        try:
            conn.reconfigure(transport, timeout=ANSWER_S)
            answer.append(None)
        except FableError as e:
            answer.append(e)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    poller = select.poll()
    poller.register(conn.reconfig_fileno(), select.POLLIN)
    assert poller.poll(int(ANSWER_S * 1000)), "the proposal was never sent"
    return thread, answer


def check_simultaneous(make_pair: MakePair) -> None:
    """Both sides ask at once (their proposals cross on the setup channel): the proposal of the
    side that set the connection up wins, the other side's ``reconfigure`` raises
    ``FableError`` saying so, and nothing is lost.

    The proposals cross every time: the child holds its control thread (which reads the setup
    channel) until its own proposal is sent, after the parent's."""
    conn, pending = make_pair()
    go_r, go_w = go_pipe()
    asked_r, asked_w = go_pipe()

    def peer_asks(peer: Connection) -> None:
        release = _hold_control_thread()  # nothing is read here until released
        try:
            os.write(go_w, b"g")  # the parent may ask now
            wait_go(asked_r)  # its proposal is sent (and unread here)
            thread, answer = _ask_in_a_thread(peer, "unix")
        finally:
            release.set()
        thread.join(ANSWER_S)
        assert answer, "the losing request was never answered"
        assert isinstance(answer[0], FableError) and "at the same time" in str(answer[0]), (
            f"the child's request (role 1) should have lost: {answer[0]!r}"
        )
        _echo(peer)

    child = Child(pending, peer_asks, trusted=True)
    try:
        wait_go(go_r)
        thread, answer = _ask_in_a_thread(conn, "mempipe-futex")
        os.write(asked_w, b"g")
        thread.join(ANSWER_S)
        assert answer == [None], f"the parent's request (role 0) should have won: {answer}"
        for i in range(50):
            conn.send(b"%d" % i)
            assert conn.recv(timeout=10) == b"%d" % i
        assert (conn.transport, conn.epoch) == ("mempipe-futex", 1)
    finally:
        conn.close()
        for fd in (go_r, go_w, asked_r, asked_w):
            os.close(fd)
        child.expect_success()


def check_held_write_buffers(make_pair: MakePair) -> None:
    """A write buffer held across a switch keeps its place: messages sent after it wait in
    the old epoch, and the switch happens once it is committed."""
    conn, pending = make_pair()
    child = Child(pending, _echo, trusted=True)
    try:
        to = "unix" if conn.transport != "unix" else "pipe"
        held = conn.getwritebuf(5)
        conn.reconfigure(to, timeout=ANSWER_S)
        conn.send(b"two")  # goes on in epoch 0 behind the held buffer
        held[0].data[:5] = b"first"
        conn.commit(held, 5)
        conn.send(b"three")  # now the switch happens
        assert [conn.recv(timeout=10) for _ in range(3)] == [b"first", b"two", b"three"]
        assert conn.transport == to
    finally:
        conn.close()
        child.expect_success()


def _kept_back_peer(c: Connection, go_r: int, asks: bool, to: str) -> None:
    wait_go(go_r)
    if asks:
        c.reconfigure(to, timeout=ANSWER_S)
    _echo(c)


def check_kept_back(make_pair: MakePair) -> None:
    """Messages committed with ``flush=False`` before a switch go out before the old epoch's
    END, whichever side asked: here they stay kept back until the switch (this side writes
    nothing more, so its control thread ends the epoch and must send them first)."""
    for asker in ("this side", "the peer"):
        conn, pending = make_pair()
        go_r, go_w = go_pipe()
        to = "unix" if conn.transport != "unix" else "pipe"

        child = Child(pending, _kept_back_peer, go_r, asker == "the peer", to, trusted=True)
        try:
            for i in range(5):
                bufs = conn.getwritebuf(2)  # one buffer: 2 B never straddle anything
                bufs[0].data[:2] = b"k%d" % i
                conn.commit(bufs, 2, flush=False)
            if asker == "this side":
                conn.reconfigure(to, timeout=ANSWER_S)
            os.write(go_w, b"g")
            got = [conn.recv(timeout=ANSWER_S) for _ in range(5)]  # echoed by the peer
            assert got == [b"k%d" % i for i in range(5)], (asker, got)
            conn.send(b"after")
            assert conn.recv(timeout=ANSWER_S) == b"after"
            assert conn.transport == to, (asker, conn.transport)
        finally:
            conn.close()
            os.close(go_r)
            os.close(go_w)
            child.expect_success()


def check_held_read_buffers(make_pair: MakePair) -> None:
    """Read buffers of the old epoch stay valid across the switch and release afterwards."""
    conn, pending = make_pair()
    child = Child(pending, _echo, trusted=True)
    try:
        conn.send(b"old epoch")
        bufs: list[Any] = []
        deadline = time.monotonic() + 10
        while not bufs:
            assert time.monotonic() < deadline
            bufs = conn.getreadbuf()
        conn.reconfigure("unix" if conn.transport != "unix" else "pipe", timeout=ANSWER_S)
        for i in range(20):
            conn.send(b"%d" % i)
            assert conn.recv(timeout=10) == b"%d" % i
        assert bytes(bufs[0].data) == b"old epoch" and bufs[0].epoch == 0
        for b in bufs:
            conn.release(b)
        assert conn.stats().read_buffers_held == 0
    finally:
        conn.close()
        child.expect_success()


def check_peer_dies_mid_switch(make_pair: MakePair) -> None:
    """The peer dies with this side's proposal unanswered (its control thread held, so that
    it cannot answer first): the request fails, then PeerDied."""
    conn, pending = make_pair()
    go_r, go_w = go_pipe()

    def dies(peer: Connection) -> None:
        _hold_control_thread()
        peer.send(b"held")
        wait_go(go_r)  # the proposal is on its way
        os._exit(0)  # without answering the switch, without closing

    child = Child(pending, dies, trusted=True)
    try:
        assert conn.recv(timeout=ANSWER_S) == b"held"
        thread, answer = _ask_in_a_thread(conn, "mempipe-futex")
        os.write(go_w, b"g")
        thread.join(ANSWER_S)
        assert answer, "the request was never answered"
        assert isinstance(answer[0], FableError), f"a dead peer accepted a switch: {answer}"
        try:
            conn.recv(timeout=5)
            raise AssertionError("recv after the peer died returned")
        except PeerDied:
            pass
    finally:
        conn.close()
        os.close(go_r)
        os.close(go_w)
        child.expect_success()


def check_stable_fileno(make_pair: MakePair) -> None:
    """fileno() is one fd across switches (a selector registered once sees every message);
    once it is out, a switch to a spinning transport is refused."""
    conn, pending = make_pair()
    child = Child(pending, _echo, trusted=True)
    sel = selectors.DefaultSelector()
    try:
        try:
            fd = conn.fileno()
        except io.UnsupportedOperation:  # the application named a spinning transport
            conn.reconfigure("mempipe-adaptive", timeout=ANSWER_S)
            fd = conn.fileno()
        sel.register(fd, selectors.EVENT_READ)
        i = 0
        route = ["unix", "mempipe-futex", "shmem-pipe", "tcp", "vmsplice-coop", "pipe", None]
        for tr in route:
            if tr is not None:
                conn.reconfigure(tr, safe=_form(tr), timeout=ANSWER_S)
            # a message in several fragments in each batch, small enough for the echo not to
            # fill both directions while this side is still sending
            msgs = [
                b"%d" % k + b"." * (70000 if k % 20 == 7 else k % 5 * 100) for k in range(i, i + 20)
            ]
            for m in msgs:
                conn.send(m)
            assert select_recv(sel, conn, 20) == msgs
            assert conn.fileno() == fd
            i += 20
        try:
            conn.reconfigure("mempipe-spin")
            raise AssertionError("a polled connection moved to a spinning transport")
        except FableError as e:
            assert "spins" in str(e), e
        assert conn.transport == "pipe"
    finally:
        sel.close()
        conn.close()
        child.expect_success()


def check_polled_peer_refuses_spin(make_pair: MakePair) -> None:
    """The peer cannot move a connection whose fileno() is out to a spinning transport."""
    conn, pending = make_pair()
    go_r, go_w = go_pipe()

    def asks_for_spin(peer: Connection) -> None:
        wait_go(go_r)
        try:
            peer.reconfigure("mempipe-spin", timeout=ANSWER_S)
            raise AssertionError("the switch to a spinning transport was accepted")
        except FableError as e:
            if "fileno() was handed out" not in str(e):
                raise
        peer.send(b"after")
        try:
            peer.recv(timeout=10)  # until the other side closes
        except ConnectionClosed:
            pass

    child = Child(pending, asks_for_spin, trusted=True)
    os.close(go_r)
    try:
        if REGISTRY[conn.transport].caps.spins:
            conn.reconfigure("mempipe-adaptive", timeout=ANSWER_S)
        conn.fileno()
        before = (conn.transport, conn.epoch)
        os.write(go_w, b"g")
        assert conn.recv(timeout=10) == b"after"
        assert (conn.transport, conn.epoch) == before
    finally:
        conn.close()
        os.close(go_w)
        child.expect_success()


def check_quiet_side(make_pair: MakePair) -> None:
    """A side that never writes: its control thread writes its END, so both sides free the
    old transport without it writing again."""
    conn, pending = make_pair()

    def reader_only(peer: Connection) -> None:
        for m in peer:  # never writes
            assert m == b"x", m

    child = Child(pending, reader_only, trusted=True)
    try:
        busy = select.poll()
        busy.register(conn.reconfig_fileno(), select.POLLIN)
        conn.reconfigure("unix" if conn.transport != "unix" else "pipe", timeout=ANSWER_S)
        conn.send(b"x")  # this side's END, then x on the new transport
        deadline = time.monotonic() + 10
        while busy.poll(0):
            assert time.monotonic() < deadline, "the old epoch was never freed"
            assert conn.getreadbuf() == []  # reads the peer's END: the read switch
            time.sleep(0.01)
    finally:
        conn.close()
        child.expect_success()


def check_looked_up_methods(make_pair: MakePair) -> None:
    """``send = conn.send`` (or ``conn.send(conn.recv())``, which looks ``send`` up before
    ``recv`` switches) keeps working after the switch, even once the old path is freed."""
    conn, pending = make_pair()
    child = Child(pending, _echo, trusted=True)
    try:
        send, recv = conn.send, conn.recv
        getwritebuf, commit = conn.getwritebuf, conn.commit
        getreadbuf, release = conn.getreadbuf, conn.release
        send(b"0")
        assert recv(timeout=10) == b"0"
        to = "pipe" if conn.transport != "pipe" else "unix"
        conn.reconfigure(to, timeout=ANSWER_S)
        conn.send(b"1")  # the switch: the path looked up above has ended its writes
        send(b"2")  # forwarded to the new path, after 1
        bufs = getwritebuf(1)
        bufs[0].data[:1] = b"3"
        commit(bufs, 1)
        assert [recv(timeout=10) for _ in range(3)] == [b"1", b"2", b"3"]
        busy = select.poll()
        busy.register(conn.reconfig_fileno(), select.POLLIN)
        deadline = time.monotonic() + 10
        while busy.poll(0):  # until the old path is freed
            assert time.monotonic() < deadline
            time.sleep(0.01)
        send(b"4")
        assert recv(timeout=10) == b"4"
        send(b"5")
        got: list[Any] = []
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            got = getreadbuf()  # forwarded to the new path
        assert [bytes(b.data) for b in got] == [b"5"] and got[0].epoch == 1
        release(got[0])  # forwarded to the new path's release
        assert conn.stats().read_buffers_held == 0
        assert conn.transport == to
    finally:
        conn.close()
        child.expect_success()


def _until_old_epoch_freed(conn: Connection, bound: float = 20.0) -> None:
    """Read ``conn`` (the peer's END of the old epoch) until both sides freed the old epoch
    (the peer must read too), or until the peer closes."""
    busy = select.poll()
    busy.register(conn.reconfig_fileno(), select.POLLIN)
    deadline = time.monotonic() + bound
    try:
        while busy.poll(0):
            assert time.monotonic() < deadline, f"{conn}: the old epoch was never freed"
            assert conn.getreadbuf() == []
            time.sleep(0.01)
    except ConnectionClosed:
        return


def check_slow_reader_holds_up_nothing_else(make_pair: MakePair) -> None:
    """Connection 1's peer stops reading with the connection full, then asks for a switch:
    this side's END must wait for room without holding up the control thread, which must
    still answer connection 2's switch (this side reads neither connection meanwhile)."""
    c1, p1 = make_pair()
    c2, p2 = open_pair("unix")
    go_r, go_w = go_pipe()
    res_r, res_w = go_pipe()
    to = "unix" if c1.transport != "unix" else "pipe"

    def peer(side1: Connection) -> None:
        side2 = p2.open()
        wait_go(go_r)  # the parent filled connection 1
        side1.reconfigure(to, timeout=ANSWER_S)  # accepted; the parent's END finds no room
        side2.reconfigure("mempipe-futex", timeout=ANSWER_S)  # must be answered all the same
        os.write(res_w, b"k")
        _until_old_epoch_freed(side2)  # (the two sides read each other's END of connection 2)
        n = 0
        while side1.recv(timeout=20) != b"last":  # now drain connection 1: its END goes in
            n += 1
        assert n > 0
        side2.close()

    child = Child(p1, peer, trusted=True)
    p2.close()
    try:
        for size in (65536, 4096, 256, 16, 0):  # the connection full to the last byte
            while True:
                try:
                    c1.send(b"x" * size, timeout=0)
                except WouldBlock:
                    break
        os.write(go_w, b"g")
        ready = select.poll()
        ready.register(res_r, select.POLLIN)
        assert ready.poll(30_000), "connection 2's switch was not answered"
        assert os.read(res_r, 1) == b"k"
        # this side accepted on its control thread, which moves its writes over just after
        # the ACCEPT went out: the peer may have heard of it first
        deadline = time.monotonic() + ANSWER_S
        while c2.transport != "mempipe-futex":
            assert time.monotonic() < deadline, f"connection 2 stayed on {c2.transport}"
            time.sleep(0.005)
        _until_old_epoch_freed(c2)
        c1.send(b"last")  # after the pending END: on the new transport once the peer drained
        _until_old_epoch_freed(c1)
    finally:
        for fd in (go_r, go_w, res_r, res_w):
            os.close(fd)
        c1.close()
        c2.close()
        child.expect_success()


RECONFIGURE_CHECKS: dict[str, Callable[[MakePair], None]] = {
    "switch_everywhere": check_switch_everywhere,
    "peer_asks": check_peer_asks,
    "reconfig_fileno": check_reconfig_fileno,
    "refusal": check_refusal,
    "simultaneous": check_simultaneous,
    "held_write_buffers": check_held_write_buffers,
    "kept_back": check_kept_back,
    "held_read_buffers": check_held_read_buffers,
    "peer_dies_mid_switch": check_peer_dies_mid_switch,
    "stable_fileno": check_stable_fileno,
    "polled_peer_refuses_spin": check_polled_peer_refuses_spin,
    "quiet_side": check_quiet_side,
    "looked_up_methods": check_looked_up_methods,
    "slow_reader_holds_up_nothing_else": check_slow_reader_holds_up_nothing_else,
}


def run_reconfigure_check(name: str, make_pair: MakePair) -> None:
    """Run one reconfiguration check and verify that it leaked no fd and no mapping."""
    with no_leaks(f"reconfigure check {name}"):
        RECONFIGURE_CHECKS[name](make_pair)


def check_reconfigure(make_pair: MakePair) -> None:
    """Run every reconfiguration check against ``make_pair``; raises on the first failure."""
    for name in RECONFIGURE_CHECKS:
        run_reconfigure_check(name, make_pair)
