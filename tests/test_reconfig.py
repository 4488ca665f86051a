"""Live reconfiguration (fable/epochs.py). The contract, ``fable.testing.check_reconfigure``,
runs over every transport of the table, and over the pure-Python reference ring; the tests below
it are the cases no generic check can set up (a transport that cannot be set up, no trust, a
spinning connection asked for its fileno, the grace period running out). Every forked peer's exit
status is checked."""

from __future__ import annotations

import functools
import io
import os
import selectors
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

import fable
from fable.testing import RECONFIGURE_CHECKS, run_reconfigure_check
from fable.testing.harness import select_recv
from fable.transports import REGISTRY

pytestmark = pytest.mark.timeout(300)

RINGS = [n for n in REGISTRY if n.startswith("mempipe-")]
# the Python reference ring: the checks that switch little (it is slow), on each ring
PY_SUBSET = [
    "reconfig_fileno",
    "held_write_buffers",
    "held_read_buffers",
    "quiet_side",
    "looked_up_methods",
    "refusal",
]


@pytest.mark.parametrize("check", list(RECONFIGURE_CHECKS))
@pytest.mark.parametrize("transport", list(REGISTRY))
def test_reconfigure_conformance(transport: str, check: str) -> None:
    safe = REGISTRY[transport].caps.forms[0]
    run_reconfigure_check(
        check, functools.partial(fable.open_pair, transport, safe=safe, trusted=True)
    )


@pytest.mark.parametrize("check", PY_SUBSET)
@pytest.mark.parametrize("transport", RINGS)
def test_reconfigure_conformance_python_ring(
    transport: str, check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABLE_BACKEND", "py")
    fable.config.reload()
    run_reconfigure_check(check, functools.partial(fable.open_pair, transport, trusted=True))


def _form(name: str) -> bool:
    return bool(REGISTRY[name].caps.forms[0])  # vmsplice-coop: unsafe only


def _fork_peer(pending: Any, body: Callable[[Any], int | None]) -> int:
    """Fork a child that opens the peer end and runs ``body(peer)``; its exit status is what
    ``body`` returns (None: 0), 0 as well if the parent closed the connection cleanly
    meanwhile, and 3 on any other exception, PeerDied included (printed). Returns the pid;
    the parent's copy of ``pending`` is closed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child always ends here, with os._exit
        code = 3
        try:
            code = body(pending.open()) or 0
        except fable.PeerDied:
            traceback.print_exc()  # the parent did not close: it vanished
        except fable.ConnectionClosed:
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    pending.close()
    return pid


def _echo(peer: Any) -> None:
    """Echo every message until the parent closes."""
    for m in peer:
        peer.send(m)


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_unsafe_needs_this_sides_trust() -> None:
    conn, pending = fable.open_pair("unix")
    try:
        with pytest.raises(fable.PermissionDenied):
            conn.reconfigure("mempipe-futex", safe=False)
    finally:
        conn.close()
        pending.close()


def test_write_buffers_held_past_the_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FABLE_GRACE_PERIOD", "0.5")
    monkeypatch.setenv("FABLE_CLOSE_LINGER", "0.5")  # the failed connection's close
    fable.config.reload()
    conn, pending = fable.open_pair("mempipe-futex")
    pid = _fork_peer(pending, _echo)  # (within the grace period: check_held_write_buffers)
    try:
        # held past the grace period: the connection fails loudly, nothing is lost silently
        held = conn.getwritebuf(5)
        conn.reconfigure("pipe")
        time.sleep(0.7)
        with pytest.raises(fable.FableError, match="grace period"):
            conn.send(b"late")
        assert held[0].data is not None
    finally:
        conn.close()
        assert _exit_code(pid) == 0, "the peer process failed"


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
        assert select_recv(sel, conn, 1) == [b"before"]
        for i in range(20):
            conn.send(b"%d" % i)
            assert select_recv(sel, conn, 1) == [b"%d" % i]
        assert conn.fileno() == fd and not conn._fd.kicking
        with pytest.raises(fable.FableError, match="spins"):
            conn.reconfigure("mempipe-spin")
    finally:
        sel.close()
        conn.close()
        os.sched_setaffinity(0, old)
        code = _exit_code(pid)
    assert code == 0
