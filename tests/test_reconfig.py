"""Live reconfiguration (fable/reconfig.py): every ordered pair of transports, both directions,
held write buffers and the grace period, refusals, both sides asking at once, a peer dying
mid-switch. The echo peer runs in a forked child; the parent checks every message in order."""

from __future__ import annotations

import os
import select
import threading
import time
import traceback
from typing import Any

import pytest

import fable
from fable.transports import REGISTRY

pytestmark = pytest.mark.timeout(300)

NAMES = list(REGISTRY)


def _form(name: str) -> bool:
    return bool(REGISTRY[name].caps.forms[0])  # vmsplice-coop: unsafe only


def _echo_child(pending: Any, n: int, ask: list[str] | None = None) -> int:
    """Fork a child that echoes ``n`` messages (and asks for the switches in ``ask`` itself,
    one every n // (len(ask)+1) messages); returns its pid. Exit 0 = all echoed."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            peer = pending.open()
            peer._switcher.trusted = True
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
    conn, pending = fable.open_pair(a, safe=_form(a))
    conn._switcher.trusted = True
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
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
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
        os.waitpid(pid, 0)


def test_refused_switch_keeps_the_old_transport() -> None:
    conn, pending = fable.open_pair("unix")
    pid = os.fork()
    if pid == 0:  # a peer that does not trust: no unsafe reads for it
        code = 3
        try:
            peer = pending.open()
            for m in peer:
                peer.send(m)
            code = 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    pending.close()
    try:
        conn._switcher.trusted = True
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
        os.waitpid(pid, 0)


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
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.close(go_w)
            peer = pending.open()
            os.read(go_r, 1)
            try:
                peer.reconfigure("unix", timeout=10)  # loses to the parent's (role 0)
            except fable.FableError:
                pass
            for m in peer:
                peer.send(m)
            code = 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    pending.close()
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
        os.waitpid(pid, 0)


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
        os.waitpid(pid, 0)


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
        os.waitpid(pid, 0)
        with pytest.raises(fable.PeerDied):
            conn.recv(timeout=3)
    finally:
        conn.close()
