"""No peer can freeze this process (issue 18).

The hostile creator (``fable.testing.hostile.freeze``) keeps copies of every fd it hands over,
clears ``O_NONBLOCK`` on all of them (it belongs to the open file description, which both sides
share) and never reads; on the rings it fills both doorbells and keeps setting every waiter bit
in both ring headers, so that each of the victim's publishes rings the attacker's full doorbell.
With eventfd doorbells the victim's ``send`` then blocked in ``write`` with the GIL held and
every thread of the process stopped; a socket doorbell rung with ``send(MSG_DONTWAIT)`` cannot
block. ``fable.testing.hostile.flood`` attacks the control thread instead. The victim runs a
watchdog thread that must never miss a 250 ms beat, and a second, honest connection that must
keep echoing (1,000 round trips at least) during the attack; the attacker's own exit status is
checked."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest

import fable
from fable.control import control
from fable.errors import ConnectionClosed, PeerDied, ProtocolError, WouldBlock
from fable.handshake import HELLO
from fable.testing import hostile
from fable.transports import REGISTRY, SetupChannel
from fable.transports.channel import SETUP
from helpers import Child, fork

pytestmark = pytest.mark.timeout(120)

RINGS = [t for t in REGISTRY if t.startswith("mempipe-") and t != "mempipe-spin"]
ATTACK_S = 3.0
KERNEL_ATTACK_S = 1.5  # enough to fill the pipes or socket many times over


# (vmsplice-coop's send(timeout=0) blocked here once the pipe's slots, one per spliced frame,
# were full while its bytes were not: its "will the kernel take it" check now asks for a free
# slot, and a frame that fits in a page never straddles two)
KERNEL = [t for t in REGISTRY if not t.startswith("mempipe-")]


@pytest.mark.parametrize("transport", KERNEL)
def test_a_blocking_pipe_or_socket_makes_no_call_outlast_its_timeout(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipes or socket the creator passed, made blocking and never read: every
    ``send(timeout=0)`` returns at once (WouldBlock once full): each side writes through an
    open file description of its own (pipes reopened, sockets written with MSG_DONTWAIT)."""
    monkeypatch.setenv("FABLE_CLOSE_LINGER", "0.1")  # the attacker never reads what is queued
    fable.config.reload()
    stop = threading.Event()
    gaps, trips, join = _watch_honest_connection(stop)  # first: its child holds no s1
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def attack() -> None:
        s1.close()
        os._exit(hostile.freeze(s0, transport, KERNEL_ATTACK_S + 1.0))

    pid = fork(attack)
    s0.close()
    victim = fable.PendingEnd(s1).open(timeout=10, trusted=True)
    longest = sent = blocked = 0.0
    try:
        end = time.monotonic() + KERNEL_ATTACK_S
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                victim.send(b"v" * 1000, timeout=0)
                sent += 1
            except WouldBlock:
                blocked += 1
                time.sleep(0.001)
            longest = max(longest, time.monotonic() - t)
    finally:
        victim.close()
        join()
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0, "the attack itself failed"
    assert max(gaps) < 0.25, f"the watchdog missed a beat: {max(gaps):.3f} s"
    assert trips[0] >= 1000, f"the honest connection made {trips[0]} round trips"
    assert blocked > 0, f"{sent:.0f} sends and never full: the attack did not fill anything"
    assert longest < 0.25, f"a send(timeout=0) took {longest:.3f} s"


@pytest.mark.parametrize("transport", RINGS)
def test_a_full_blocking_doorbell_freezes_nothing(transport: str) -> None:
    os.sched_setaffinity(0, {0})
    try:
        stop = threading.Event()
        gaps, trips, join = _watch_honest_connection(stop, echo_cpu=1)  # first: no s1 in it
        s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def attack() -> None:
            os.sched_setaffinity(0, {1})
            s1.close()
            os._exit(hostile.freeze(s0, transport, ATTACK_S))

        pid = fork(attack)
        s0.close()
        victim = fable.PendingEnd(s1).open(timeout=10, trusted=False)
        victim.fileno()  # readiness in use: each empty getreadbuf arms the doorbell again
        sent = 0
        end = time.monotonic() + ATTACK_S
        try:
            while time.monotonic() < end:
                try:
                    victim.send(b"v" * 100, timeout=0)  # each publish rings the full doorbell
                    sent += 1
                except WouldBlock:
                    time.sleep(0.001)
                try:
                    victim.getreadbuf()  # arms the victim's own doorbell, drains it
                except WouldBlock:
                    pass
        except (ProtocolError, ConnectionClosed, PeerDied):
            pass  # the attacker's ring games may fail the connection: that is allowed
        finally:
            victim.close()
            join()
            status = os.waitpid(pid, 0)[1]
        assert os.waitstatus_to_exitcode(status) == 0, "the attack itself failed"
        assert sent > 100, f"the victim published {sent} messages: the doorbell was not rung"
        assert max(gaps) < 0.25, f"the watchdog missed a beat: {max(gaps):.3f} s"
        assert trips[0] >= 1000, f"the honest connection made {trips[0]} round trips"
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def _watch_honest_connection(
    stop: threading.Event, echo_cpu: int | None = None
) -> tuple[list[float], list[int], Any]:
    """A watchdog thread (its gaps) and an honest connection echoing through a child (pinned to
    ``echo_cpu`` if given; its round trips), both running until ``stop``; returns the gaps, the
    trip count and a join function (sets ``stop``)."""
    honest, pending = fable.open_pair("unix")

    def echo() -> None:
        if echo_cpu is not None:
            os.sched_setaffinity(0, {echo_cpu})
        other = pending.open()
        for m in other:
            other.send(m)

    echoer = Child(echo)
    pending.close()
    gaps: list[float] = []
    trips = [0]

    def watchdog() -> None:
        while not stop.is_set():
            t = time.monotonic()
            time.sleep(0.05)
            gaps.append(time.monotonic() - t)

    def round_trips() -> None:
        while not stop.is_set():
            honest.send(b"ping")
            assert honest.recv(timeout=10) == b"ping"
            trips[0] += 1

    threads = [threading.Thread(target=f, daemon=True) for f in (watchdog, round_trips)]
    for t in threads:
        t.start()

    def join() -> None:
        stop.set()
        for t in threads:
            t.join(15)
        honest.close()
        echoer.result(30)

    return gaps, trips, join


FLOOD = 20_000  # proposals: their refusals are far more than the socket and MAX_BACKLOG hold


def test_a_peer_that_never_reads_its_setup_channel_loses_only_its_connection() -> None:
    """A flood of proposals the victim must refuse, from a peer that never reads a refusal:
    the victim's control thread queues what the socket does not take, up to MAX_BACKLOG, then
    fails that one connection with ProtocolError; it never blocks in a send (the watchdog
    keeps its beat, the honest connection keeps echoing) and ``close()`` returns at once."""
    stop = threading.Event()
    gaps, trips, join = _watch_honest_connection(stop)  # first: its child holds no s1
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def attack() -> None:
        s1.close()
        os._exit(hostile.flood(s0, FLOOD))

    pid = fork(attack)
    s0.close()
    victim = fable.PendingEnd(s1).open(timeout=10)
    try:
        with pytest.raises(ProtocolError, match="does not read its setup channel"):
            victim.recv(timeout=30)
        time.sleep(0.5)  # the honest connection goes on after the failure too
        t = time.monotonic()
        victim.close()
        closing = time.monotonic() - t
    finally:
        victim.close()
        join()
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0, "the attack itself failed"
    assert closing < 1.0, f"close() took {closing:.3f} s"
    assert max(gaps) < 0.25, f"the watchdog missed a beat: {max(gaps):.3f} s"
    assert trips[0] >= 1000, f"the honest connection made {trips[0]} round trips"


def _cpu_s(tid: int) -> float:
    """CPU time (user + system) the thread ``tid`` of this process has used."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("record", ["partial", "not-a-control-record"])
def test_a_bad_setup_record_does_not_make_the_control_thread_spin(record: str) -> None:
    """Half a record (then silence), or a whole record the reconfiguration protocol does not
    know: the control thread reads what is there and goes back to sleep (before epoll, a partial
    record made the reconfiguration thread spin at 100% CPU). The unknown record fails that
    connection with ProtocolError."""
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def attack() -> None:
        s1.close()
        _ours, theirs = REGISTRY["unix"].create({})
        ch = SetupChannel(s0)
        hello = {"op": HELLO, "epoch": 0, "transport": "unix", "safe": True}
        ch.send({**hello, "params": theirs.params}, theirs.fds)
        frame = SETUP.encode({"op": "reconfig-surprise", "epoch": 1})
        s0.sendall(frame[:7] if record == "partial" else frame)
        s0.settimeout(10)
        while s0.recv(4096):  # until the victim hangs up
            pass
        os._exit(0)

    pid = fork(attack)
    s0.close()
    victim = fable.PendingEnd(s1).open(timeout=10)
    try:
        ctl = control()
        tid = ctl._thread.native_id
        assert tid is not None
        time.sleep(0.3)  # the record arrives and is handled
        before = _cpu_s(tid)
        time.sleep(1.5)
        used = _cpu_s(tid) - before
        if record == "partial":
            with pytest.raises(fable.Timeout):
                victim.recv(timeout=0.1)  # nothing wrong yet: the rest may still come
        else:
            with pytest.raises(ProtocolError, match="unexpected record"):
                victim.recv(timeout=5)
    finally:
        victim.close()
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0, "the attack itself failed"
    assert used < 0.3, f"the control thread used {used:.2f} s of CPU in 1.5 s"
