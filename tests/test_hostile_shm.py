"""A hostile peer on every shared-memory transport (fable.testing.hostile): it creates the
transport's resources itself and speaks the mechanism by hand. Each attack has the one outcome
it must cause (the victim's connection fails with ProtocolError, or the messages arrive); the
victim's safe copies never change, it never crashes or hangs, its other connections (a unix
pair and a pair over the attacked transport) keep working, it leaks no fd and no mapping, and
the attacker itself carried its attack out (its exit status is checked)."""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fable
from fable import config
from fable.connection import PendingEnd
from fable.testing import fable_mappings, open_fds
from fable.testing.hostile import attack, attacks_for, run_victim

SHARED = [name for name in fable.REGISTRY if attacks_for(name)]
CASES = [
    (t, a, safe) for t in SHARED for a in attacks_for(t) for safe in fable.REGISTRY[t].caps.forms
]
SMALL = 65536  # a small area, so that a victim writer soon needs the attacker's returns


def test_every_shared_memory_transport_is_attacked() -> None:
    assert len(SHARED) == 5
    assert all(attacks_for(t) for t in SHARED)


@pytest.fixture(autouse=True)
def small_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABLE_RING_SIZE", str(SMALL))
    config.reload()


def _bystanders(transport: str, safe: bool) -> list[tuple[fable.Connection, fable.Connection]]:
    """The victim's other connections: a unix pair, and one over the attacked transport."""
    out = []
    for name, form in (("unix", None), (transport, safe)):
        a, pend = fable.open_pair(name, safe=form)
        out.append((a, pend.open()))
    return out


def _attack(transport: str, name: str, safe: bool, seed: int) -> None:
    _, expect = attacks_for(transport)[name]
    maps = fable_mappings()  # collects garbage first: no fd of an earlier example closes later
    fds = open_fds()
    bystanders = _bystanders(transport, safe)
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the attacker
        s1.close()
        os._exit(attack(s0, transport, name, safe, seed, {"capacity": SMALL}, go=go_r))
    s0.close()
    os.close(go_r)
    try:
        conn = PendingEnd(s1).open(timeout=10, trusted=not safe)
        os.write(go_w, b"g")  # the attack starts on an open connection
        try:
            out = run_victim(conn, bound=5.0)
        finally:
            conn.close()
    finally:
        os.close(go_w)
        status = os.waitpid(pid, 0)[1]
    code = os.waitstatus_to_exitcode(status)
    assert expect.allows_exit(code), f"the attacker failed (exit status {code})"
    assert expect.check(out), f"{name} on {transport} (safe={safe}, seed={seed}): {out}"
    assert out.took < 6.0
    assert not out.unstable, f"safe copies changed after delivery: {out}"
    for a, b in bystanders:
        a.send(b"still here")
        assert b.recv(timeout=5) == b"still here"
        a.close()
        b.close()
    assert open_fds() == fds
    assert len(fable_mappings()) <= len(maps)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("transport", "name", "safe"), CASES)
def test_attack(transport: str, name: str, safe: bool) -> None:
    _attack(transport, name, safe, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("transport", "name", "safe"), CASES)
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_attack_fuzz(transport: str, name: str, safe: bool, seed: int) -> None:
    _attack(transport, name, safe, seed)


@pytest.mark.parametrize("field", ["HEAD", "TAIL"])
@pytest.mark.parametrize("transport", [t for t in SHARED if t.startswith("mempipe-")])
def test_ring_positions_out_of_range_at_setup(transport: str, field: str) -> None:
    """The creator moved a position of the victim's ring before the victim opened it: the
    victim refuses the connection with ProtocolError, and keeps no fd or mapping of it."""
    from fable.errors import ProtocolError
    from fable.ring import layout as L
    from fable.testing.hostile import create

    fds = open_fds()
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    raw = create(s0, transport, True, {"capacity": SMALL})
    half = L.HEADER_SIZE + SMALL
    ring = raw.view(half, 2 * half)  # the ring the victim writes
    off = getattr(L, field)
    ring[off : off + 8] = (SMALL * 3).to_bytes(8, "little")  # HEAD past TAIL, or TAIL a ring on
    with pytest.raises(ProtocolError, match="out of range at setup"):
        PendingEnd(s1).open(timeout=10, trusted=False)
    del ring
    raw.close()
    assert open_fds() == fds
