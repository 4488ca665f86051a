"""No peer can freeze this process through a doorbell (issue 18, the mempipe slice).

The hostile creator keeps copies of every fd it hands over, clears ``O_NONBLOCK`` on all of
them (it belongs to the open file description, which both sides share), fills both doorbells
and keeps setting every waiter bit in both ring headers, so that each of the victim's publishes
rings the attacker's full doorbell. With eventfd doorbells the victim's ``send`` then blocked in
``write`` with the GIL held and every thread of the process stopped; a socket doorbell rung
with ``send(MSG_DONTWAIT)`` cannot block. The victim runs a watchdog thread that must never miss
a 250 ms beat, and a second, honest connection that must keep echoing (1,000 round trips at
least) during the attack; the attacker's own exit status is checked."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import stat
import threading
import time

import pytest

import fable
from fable.errors import ConnectionClosed, PeerDied, ProtocolError, WouldBlock
from fable.handshake import HELLO
from fable.ring import layout as L
from fable.transports import REGISTRY, SetupChannel
from helpers import Child, fork

pytestmark = pytest.mark.timeout(120)

RINGS = [t for t in REGISTRY if t.startswith("mempipe-") and t != "mempipe-spin"]
ATTACK_S = 3.0
EVERY_WAITER = L.WAITER_EVENT | L.WAITER_FUTEX


def _blocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def _fill(fd: int) -> None:
    """Send on ``fd`` until the receiving end's buffer is full."""
    s = socket.socket(fileno=fd)
    try:
        while True:
            s.send(b"\x01" * 64, socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    finally:
        s.detach()


def _attacker(sock: socket.socket, transport: str) -> None:
    info = REGISTRY[transport]
    ours, theirs = info.create({})
    kept = [os.dup(fd) for fd in theirs.fds]  # the victim's doorbells stay in our hands too
    ch = SetupChannel(sock)
    hello = {"op": HELLO, "epoch": 0, "transport": transport, "safe": True, "params": {}}
    ch.send({**hello, "params": theirs.params}, theirs.fds)
    for fd in theirs.fds:
        os.close(fd)
    memfd, own, ring = ours.fds
    mem = memoryview(mmap.mmap(memfd, os.fstat(memfd).st_size))
    half = L.HEADER_SIZE + int(ours.params["capacity"])
    shared = [own, ring, *kept[1:]]
    for fd in shared:
        _blocking(fd)
    _fill(ring)  # the victim's own doorbell (it drains it when it reads)
    _fill(kept[2])  # ours: the one the victim rings on each publish
    to_us = mem[half : 2 * half]  # ring 1: the victim writes, we "read"
    to_it = mem[:half]  # ring 0: we write (nothing), the victim reads
    end = time.monotonic() + ATTACK_S
    while time.monotonic() < end:
        for ring_mem, flag in ((to_us, L.DATA_WAITING), (to_it, L.SPACE_WAITING)):
            ring_mem[flag : flag + 4] = EVERY_WAITER.to_bytes(4, "little")
        to_us[L.HEAD : L.HEAD + 8] = to_us[L.TAIL : L.TAIL + 8]  # take everything it sent
        time.sleep(0.0005)
    ch.close()


def _kernel_attacker(sock: socket.socket, transport: str) -> None:
    """A creator of a kernel or pipe transport that keeps the victim's fds, makes every one
    blocking and never reads, so that the victim's writes fill the pipe or socket."""
    info = REGISTRY[transport]
    ours, theirs = info.create({})
    kept = [os.dup(fd) for fd in theirs.fds]
    ch = SetupChannel(sock)
    hello = {"op": HELLO, "epoch": 0, "transport": transport, "safe": transport != "vmsplice-coop"}
    ch.send({**hello, "params": theirs.params}, theirs.fds)
    for fd in theirs.fds:
        os.close(fd)
    shared = [fd for fd in [*ours.fds, *kept] if not stat.S_ISREG(os.fstat(fd).st_mode)]
    end = time.monotonic() + ATTACK_S + 1.0
    while time.monotonic() < end:  # again and again: the victim sets O_NONBLOCK when it opens
        for fd in shared:  # pipes and sockets, not the memfd
            _blocking(fd)
        time.sleep(0.001)
    ch.close()


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
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def attack() -> None:
        s1.close()
        _kernel_attacker(s0, transport)

    pid = fork(attack)
    s0.close()
    victim = fable.PendingEnd(s1).open(timeout=10, trusted=True)
    longest = sent = blocked = 0.0
    try:
        end = time.monotonic() + ATTACK_S
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
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0, "the attack itself failed"
    assert blocked > 0, f"{sent:.0f} sends and never full: the attack did not fill anything"
    assert longest < 0.25, f"a send(timeout=0) took {longest:.3f} s"


@pytest.mark.parametrize("transport", RINGS)
def test_a_full_blocking_doorbell_freezes_nothing(transport: str) -> None:
    os.sched_setaffinity(0, {0})
    try:
        s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def attack() -> None:
            os.sched_setaffinity(0, {1})
            s1.close()
            _attacker(s0, transport)

        pid = fork(attack)
        s0.close()
        victim = fable.PendingEnd(s1).open(timeout=10, trusted=False)
        honest, pending = fable.open_pair("unix")

        def echo() -> None:
            os.sched_setaffinity(0, {1})
            other = pending.open()
            for m in other:
                other.send(m)

        echoer = Child(echo)
        pending.close()
        stop = threading.Event()
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
            stop.set()
            for t in threads:
                t.join(15)
            victim.close()
            honest.close()
            echoer.result(30)
            status = os.waitpid(pid, 0)[1]
        assert os.waitstatus_to_exitcode(status) == 0, "the attack itself failed"
        assert sent > 100, f"the victim published {sent} messages: the doorbell was not rung"
        assert max(gaps) < 0.25, f"the watchdog missed a beat: {max(gaps):.3f} s"
        assert trips[0] >= 1000, f"the honest connection made {trips[0]} round trips"
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
