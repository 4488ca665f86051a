"""Each side decides its own trust (issue 17, DESIGN.md §2 and §5): one form per reading side,
and offers a side checks against its own state only. The hostile side here creates the
resources and speaks the handshake itself (a raw setup channel); each attack has one outcome,
and the attacker's own exit status is checked where it runs in a child."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import fable
from fable import handshake
from fable.cli import main
from fable.connection import PendingEnd
from fable.errors import PermissionDenied, ProtocolError, Timeout
from fable.testing import open_fds
from fable.testing.harness import wait_readable
from fable.transports import REGISTRY, SetupChannel
from fable.transports.channel import SETUP_VERSION
from helpers import Child, ask, fork, names, wait_for

pytestmark = pytest.mark.timeout(120)

SHARED = [t for t, info in REGISTRY.items() if info.caps.copies_unsafe == 0]  # both forms


def _bufs(conn: fable.Connection) -> list[Any]:
    """The next read buffers, waiting up to 10 s for them."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        bufs = conn.getreadbuf()
        if bufs:
            return bufs
        wait_readable(conn, 0.1)
    raise AssertionError("nothing to read in 10 s")


# ------------------------------------------------------------------ one form per reading side
@pytest.mark.parametrize("transport", SHARED)
def test_a_trusting_side_reads_zero_copy_while_its_untrusting_peer_reads_copies(
    transport: str,
) -> None:
    """Mixed trust on one connection: this side's reads are views into shared memory, the
    peer's are private copies; messages go both ways, and the peer's held copy stays as it
    was when this side writes over the same ring positions again."""
    conn, pending = fable.open_pair(transport, safe=False, peer_safe=True, trusted=True)

    def peer() -> Any:
        other = pending.open(trusted=False)
        held = _bufs(other)  # a copy: it must not change
        first = bytes(held[0].data)
        other.send(b"ready")
        for _ in range(200):  # the writer reuses the ring under the held buffer
            other.recv(timeout=10)
        still = bytes(held[0].data)
        other.release(held[0])
        other.send(b"bye")
        return other.safe, first, still

    child = Child(peer)
    pending.close()
    try:
        assert conn.safe is False
        conn.send(b"A" * 1000)
        assert conn.recv(timeout=10) == b"ready"
        for i in range(200):
            conn.send(bytes([66 + i % 20]) * 1000)
        bufs = _bufs(conn)
        assert bytes(bufs[0].data) == b"bye"
        conn.release(bufs[0])
        peer_safe, first, still = child.result()
        assert peer_safe is True and first == still == b"A" * 1000
    finally:
        conn.close()


def _first_offer_refused(transport: str, control_thread_first: bool) -> None:
    """``open_pair(transport)`` with unsafe reads both ways; the other end, in a child, does
    not trust and refuses the first offer; this end's ``recv`` raises PermissionDenied naming
    why (``control_thread_first``: the control thread's callback reads the refusal first)."""
    from fable.connection import _records_read

    conn, pending = fable.open_pair(transport, safe=False, trusted=True)  # both unsafe

    def peer() -> Any:
        try:
            pending.open(trusted=False)
            return "opened"
        except PermissionDenied as e:
            return str(e)

    child = Child(peer)
    pending.close()
    try:
        assert "does not trust" in child.result()
        if control_thread_first:
            _records_read(weakref.ref(conn._epochs))  # what the control thread does
        with pytest.raises(PermissionDenied, match=r"refused the connection: .*does not trust"):
            conn.recv(timeout=10)
    finally:
        conn.close()


def test_open_pair_end_that_does_not_trust_refuses_unsafe_reads_and_the_creator_hears_why() -> None:
    _first_offer_refused("mempipe-futex", control_thread_first=False)


def test_a_refused_first_offer_is_heard_whoever_reads_the_refusal() -> None:
    """The refusal of the very first offer may be read by the control thread (it watches the
    setup channel) before the application's ``recv`` looks: the connection must still fail
    with ``PermissionDenied``. (Before, the control thread's read raised it into the void,
    logged, and ``recv`` then saw only the peer's exit, now and then in the suite.) Here the
    control thread's callback is made to win: it runs before ``recv``."""
    _first_offer_refused("vmsplice-coop", control_thread_first=True)


def test_reconfigure_without_a_form_picks_each_sides_own() -> None:
    """``reconfigure(t)`` with one trusting and one untrusting side: each reads in the most
    zero-copy form its own trust allows (a trusting side never stays on copies because the
    old transport had no unsafe form: the vmsplice-coop failure of the issue)."""
    conn, pending = fable.open_pair("unix", trusted=True)

    def peer() -> Any:
        other = pending.open(trusted=False)
        forms = []
        for m in other:
            forms.append((other.transport, other.safe))
            other.send(m)
        return forms

    child = Child(peer)
    pending.close()
    try:
        for t in ("mempipe-futex", "shmem-pipe", "tcp"):
            conn.reconfigure(t, timeout=20)
            conn.send(t.encode())
            assert conn.recv(timeout=20) == t.encode()
            assert (conn.transport, conn.safe) == (t, False not in REGISTRY[t].caps.forms)
        with pytest.raises(PermissionDenied, match="does not trust"):
            conn.reconfigure("vmsplice-coop", timeout=20)  # the peer has no form it may take
        with pytest.raises(PermissionDenied, match="does not trust"):
            conn.reconfigure("mempipe-futex", peer_safe=False, timeout=20)
        conn.send(b"after")
        assert conn.recv(timeout=20) == b"after" and conn.transport == "tcp"
    finally:
        conn.close()
    forms = child.result()
    assert ("mempipe-futex", True) in forms and ("shmem-pipe", True) in forms


def test_an_untrusting_side_cannot_be_asked_for_unsafe_reads_by_open_pair_either() -> None:
    with pytest.raises(PermissionDenied):
        conn, pending = fable.open_pair("unix", trusted=False)
        try:
            conn.reconfigure("mempipe-futex", safe=False, timeout=5)
        finally:
            conn.close()
            pending.close()


# ---------------------------------------------------------------------- the hostile offerer
def _hello(ch: SetupChannel, transport: str, safe: bool, yours: bool | None) -> Any:
    """The attacker's first offer: real resources of ``transport``; returns its own path."""
    info = REGISTRY[transport]
    return handshake.make_offer(
        ch, info, safe=safe, epoch=0, op=handshake.HELLO, yours=yours, options={}
    )


@pytest.mark.parametrize("transport", SHARED)
def test_a_forged_form_never_makes_an_untrusting_acceptor_read_unsafe(transport: str) -> None:
    """The attack of the issue: the peer offers mempipe with safe=False to an acceptor that
    passed trusted=False. It asks for zero-copy reads (``yours=False``): refused with
    PermissionDenied; it only says its own form is unsafe (``yours=None``): the acceptor
    reads copies, and a buffer it holds keeps its bytes while the attacker rewrites them."""
    before = open_fds()
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = SetupChannel(s0)
    path = _hello(ch, transport, False, False)
    with pytest.raises(PermissionDenied, match="does not trust"):
        PendingEnd(s1).open(timeout=5, trusted=False)
    with pytest.raises(PermissionDenied, match="the peer refused the connection"):
        ch.next(5)  # the REFUSE that tells the attacker why
    path.teardown()
    ch.close()
    assert open_fds() == before

    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = SetupChannel(s0)
    path = _hello(ch, transport, False, None)
    victim = PendingEnd(s1).open(timeout=5, trusted=False)
    try:
        assert victim.safe is True
        bufs = path.getwritebuf(8)
        bufs[0].data[:8] = b"AAAAAAAA"
        path.commit(bufs, 8)
        held = _bufs(victim)
        assert bytes(held[0].data) == b"AAAAAAAA"
        for _ in range(50):  # the attacker writes over the ring again and again
            path.send(b"B" * 4000)
        assert bytes(held[0].data) == b"AAAAAAAA"
        victim.release(held[0])
    finally:
        victim.close()
        path.teardown()
        ch.close()


def test_a_transport_the_daemon_did_not_choose_is_refused() -> None:
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = SetupChannel(s0)
    path = _hello(ch, "mempipe-spin", True, None)
    with pytest.raises(ProtocolError, match="offered mempipe-spin; this side expects unix"):
        PendingEnd(s1).open(timeout=5, trusted=True, expect="unix")
    with pytest.raises(ProtocolError, match="the peer refused the connection"):
        ch.next(5)
    path.teardown()
    ch.close()


def test_a_chain_of_proposals_is_refused_until_the_old_epoch_ends() -> None:
    """PROPOSE(1), accepted; PROPOSE(2) at once, before epoch 0 ended on the victim's side:
    refused (a chain would keep every old path's fds and mappings); the victim stays on."""
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = SetupChannel(s0)
    paths = [_hello(ch, "unix", True, None)]
    victim = PendingEnd(s1).open(timeout=5, trusted=True)
    try:
        info = REGISTRY["unix"]
        answers = []
        for epoch in (1, 2):
            paths.append(
                handshake.make_offer(ch, info, safe=True, epoch=epoch, op=handshake.PROPOSE)
            )
            answers.append(ch.next(10)[0])
        assert answers[0]["op"] == "reconfig-accept", answers
        assert answers[1]["op"] == handshake.REFUSE, answers
        assert "epoch 0 is not over" in answers[1]["why"], answers
        paths[0].send(b"still")  # the victim reads on: epoch 0 has no END yet
        assert victim.recv(timeout=5) == b"still"
    finally:
        victim.close()
        for p in paths:
            p.teardown()
        ch.close()


def _raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_a_deep_control_record_fails_only_that_connection() -> None:
    """30,000 nested arrays (a frame's 64 KiB allow no more) on the setup channel of a live
    connection: that connection fails with ProtocolError (not RecursionError out of every
    call); another one works on."""
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = SetupChannel(s0)
    path = _hello(ch, "unix", True, None)
    victim = PendingEnd(s1).open(timeout=5, trusted=True)
    bystander, pending = fable.open_pair("unix")
    other = pending.open()
    try:
        deep = b'{"v":%d,"op":"reconfig","x":' % SETUP_VERSION + b"[" * 30000 + b"]" * 30000
        s0.sendall(_raw_frame(deep + b"}"))
        with pytest.raises(ProtocolError, match="not JSON: maximum recursion depth"):
            for _ in range(50):  # the control thread reads the record and fails the connection
                try:
                    victim.recv(timeout=0.2)
                except Timeout:
                    continue
        other.send(b"fine")
        assert bystander.recv(timeout=5) == b"fine"
    finally:
        victim.close()
        path.teardown()
        ch.close()
        bystander.close()
        other.close()


def test_a_handshake_trickled_a_byte_at_a_time_ends_at_the_setup_deadline() -> None:
    """A peer that sends its hello one byte every 0.3 s: the wait ends at the total deadline
    (1 s), not after a deadline per byte."""
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    hello = json.dumps(
        {"v": SETUP_VERSION, "op": "hello", "transport": "unix", "safe": True, "params": {}}
    ).encode()
    frame = _raw_frame(hello)

    def trickle() -> None:
        for b in frame:
            s0.send(bytes([b]))
            time.sleep(0.3)

    pid = fork(trickle)
    s0.close()
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        PendingEnd(s1).open(timeout=1.0, trusted=True)
    took = time.monotonic() - t0
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert took < 3.0, f"the setup wait took {took:.1f} s"


# ------------------------------------------------------------------------ fable reconfigure
def _trusting_echo(name: str, trusted: bool) -> Any:
    def serve() -> Any:
        os.sched_setaffinity(0, {1})
        lst = fable.register(name).listen(trusted=trusted)
        c = lst.accept(timeout=30)
        for m in c:
            c.send(m)
        return "done"

    return serve


@pytest.mark.parametrize("peer_trusts", [True, False])
def test_fable_reconfigure_without_a_form(daemon: Path, peer_trusts: bool) -> None:
    """Both ends trusted: `fable reconfigure` to every transport without --safe/--unsafe
    succeeds while a stream runs. One end untrusting: vmsplice-coop is refused, the reason
    printed and exit status 1, within a second of the refusal."""
    srv = Child(_trusting_echo("trusting-echo", peer_trusts))
    wait_for(lambda: "trusting-echo" in names(daemon))

    def client() -> Any:
        os.sched_setaffinity(0, {0})
        c = fable.register("trusting-client").connect("trusting-echo", trusted=True, timeout=10)
        assert isinstance(c, fable.Connection)
        (flow,) = ask("flows", daemon)["flows"]
        targets = list(REGISTRY) if peer_trusts else ["vmsplice-coop"]
        out = []
        for target in targets:
            t0 = time.monotonic()
            r = CliRunner().invoke(main, ["reconfigure", str(flow["id"]), target])
            took = time.monotonic() - t0
            for i in range(20):  # the stream goes on (and moves to the new epoch)
                c.send(b"%d" % i)
                assert c.recv(timeout=20) == b"%d" % i
            out.append((target, r.exit_code, r.output, took, c.transport))
        c.close()
        return out

    results = run_client(client)
    srv.result()
    for target, code, output, took, now in results:
        if peer_trusts:
            assert code == 0 and f"{target} (epoch" in output, (target, output)
            assert now == target
        else:
            assert code == 1 and "refused" in output and "does not trust" in output, output
            assert took < 3.0, f"the refusal took {took:.1f} s to be printed"


def run_client(fn: Any) -> Any:
    return Child(fn).result(timeout=110)
