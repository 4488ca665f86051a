"""A hostile peer on every shared-memory transport (fable.testing.hostile): the victim's
connection fails with ProtocolError or delivers bytes, its safe copies never change, it never
crashes or hangs, its other connections keep working, and it leaks no fd and no mapping."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fable
from fable import config
from fable.connection import Connection
from fable.testing import Child, fable_mappings, open_fds
from fable.testing.hostile import attacks_for, run_victim

SHARED = [name for name in fable.REGISTRY if attacks_for(name)]
CASES = [
    (t, a, safe) for t in SHARED for a in attacks_for(t) for safe in fable.REGISTRY[t].caps.forms
]


def test_every_shared_memory_transport_is_attacked() -> None:
    assert len(SHARED) == 5
    assert all(attacks_for(t) for t in SHARED)


@pytest.fixture(autouse=True)
def small_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # a small area, so that a victim writer soon needs the attacker's returns and tokens
    monkeypatch.setenv("FABLE_RING_SIZE", "65536")
    config.reload()


def _attacker(conn: Connection, transport: str, attack: str, seed: int) -> None:
    fn, _ = attacks_for(transport)[attack]
    try:
        fn(conn, random.Random(seed))
    except Exception:
        pass
    time.sleep(0.1)


def _attack(transport: str, attack: str, safe: bool, seed: int) -> None:
    _, allowed = attacks_for(transport)[attack]
    maps = fable_mappings()  # collects garbage first: no fd of an earlier example closes later
    fds = open_fds()
    bystander, pend = fable.open_pair("unix")
    other = pend.open()
    conn, pending = fable.open_pair(transport, safe=safe)
    child = Child(pending, _attacker, transport, attack, seed)
    try:
        out = run_victim(conn, bound=5.0)
    finally:
        conn.close()
        child.join(30)
    assert out.kind in allowed, f"{attack} on {transport} (safe={safe}, seed={seed}): {out}"
    assert out.took < 6.0
    assert not out.unstable, f"safe copies changed after delivery: {out}"
    bystander.send(b"still here")
    assert other.recv(timeout=5) == b"still here"
    bystander.close()
    other.close()
    assert open_fds() == fds
    assert len(fable_mappings()) <= len(maps)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("transport", "attack", "safe"), CASES)
def test_attack(transport: str, attack: str, safe: bool) -> None:
    _attack(transport, attack, safe, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("transport", "attack", "safe"), CASES)
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_attack_fuzz(transport: str, attack: str, safe: bool, seed: int) -> None:
    _attack(transport, attack, safe, seed)
