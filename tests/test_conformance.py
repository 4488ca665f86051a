"""The conformance suite (fable.testing) over every transport in REGISTRY."""

from __future__ import annotations

import functools

import pytest

import fable
import fable.config
from fable.testing import CHECKS, run_check
from fable.testing.harness import role_one


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("transport", list(fable.REGISTRY))
def test_conformance(transport: str, check: str) -> None:
    for safe in fable.REGISTRY[transport].caps.forms:
        run_check(check, functools.partial(fable.open_pair, transport, safe=safe))


# The checks where the two sides of a pair do different things (who waits, who dies, who
# closes, who holds): the rest move messages both ways already.
ROLE_1 = [
    "backpressure",
    "read_wouldblock",
    "no_space",
    "readiness",
    "clean_close",
    "close_flushes",
    "held_at_close",
    "peer_died_reader",
    "peer_died_writer",
    "peer_died_getwritebuf",
    "dead_buffer",
    "fork_invalidation",
]


@pytest.mark.parametrize("check", ROLE_1)
@pytest.mark.parametrize("transport", list(fable.REGISTRY))
def test_conformance_as_role_1(transport: str, check: str) -> None:
    """The same checks with this process on the side that opens the other end (role 1): it
    writes under back-pressure, gets NoSpace, sees its peer die, in both forms."""
    for safe in fable.REGISTRY[transport].caps.forms:
        run_check(check, role_one(functools.partial(fable.open_pair, transport, safe=safe)))


# The reference ring (FABLE_BACKEND=py) runs a cross-process subset: it is the executable model,
# and slow (a few microseconds a message), so the full suite runs on the C core only.
PY_SUBSET = [
    "ordering",
    "both_directions",
    "batches",
    "read_wouldblock",
    "recv_into",
    "recv_many",
    "readiness",
    "clean_close",
    "peer_died_reader",
    "peer_died_writer",
    "fork_invalidation",
]
RINGS = [n for n, i in fable.REGISTRY.items() if i.caps.wait in ("spin", "futex", "adaptive")]


@pytest.mark.parametrize("check", PY_SUBSET)
@pytest.mark.parametrize("transport", RINGS)
def test_conformance_python_ring(
    transport: str, check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABLE_BACKEND", "py")
    fable.config.reload()
    for safe in fable.REGISTRY[transport].caps.forms:
        conn, pending = fable.open_pair(transport, safe=safe)
        assert type(conn._path._tx).__name__ == "PyRing"  # type: ignore[attr-defined]
        conn.close()
        pending.close()
        run_check(check, functools.partial(fable.open_pair, transport, safe=safe))
