"""``close()`` from a third thread while the sender and the receiver are inside the connection
(issue 18): 10^5 messages, closed at a random moment, 100 times per transport.

Within the one-sender/one-receiver contract, a close from another thread interrupts the calls
in progress on that side: each raises ``ConnectionClosed`` at once (a wait ends, it does not run
out its slice), never an ``OSError``, ``ValueError`` or a crash, and the fds and mappings go only
after every call has left. The other side sees the peer close (``ConnectionClosed``). What the
receiver got is every message in order, with none changed."""

from __future__ import annotations

import random
import struct
import threading
import time

import pytest

import fable
from fable.errors import ConnectionClosed
from fable.testing.harness import no_leaks
from fable.transports import REGISTRY

pytestmark = pytest.mark.timeout(300)

MESSAGES = 100_000
ROUNDS = 100
INDEX = struct.Struct("<Q")
PAYLOAD = b"m" * 56


def _round(transport: str, rng: random.Random) -> None:
    a, pending = fable.open_pair(transport)
    b = pending.open(timeout=10)
    out: dict[str, object] = {}
    stopped: dict[str, float] = {}

    def sender() -> None:
        try:
            for i in range(MESSAGES):
                a.send(INDEX.pack(i) + PAYLOAD)
            out["send"] = "done"
        except Exception as e:
            out["send"] = e
        stopped["send"] = time.monotonic()

    def receiver() -> None:
        n = 0
        try:
            while True:
                m = b.recv()
                assert INDEX.unpack_from(m)[0] == n and m[8:] == PAYLOAD, f"message {n}: {m!r}"
                n += 1
        except Exception as e:
            out["recv"] = e
        out["got"] = n
        stopped["recv"] = time.monotonic()

    threads = [threading.Thread(target=f, daemon=True) for f in (sender, receiver)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0, 0.03))
    side = rng.choice("ab")
    closed_at = time.monotonic()
    (a if side == "a" else b).close()
    for t in threads:
        t.join(10)
    try:
        assert not any(t.is_alive() for t in threads), (
            f"{transport}, {side} closed: a call never returned ({out})"
        )
        for who in ("send", "recv"):
            r = out[who]
            ok = isinstance(r, ConnectionClosed) or (who == "send" and r == "done")
            assert ok, f"{transport}, {side} closed: {who} ended with {r!r}"
        # the side that was closed: its call (if still inside) left at once
        mine = "send" if side == "a" else "recv"
        if out[mine] != "done":
            took = stopped[mine] - closed_at
            assert took < 1.0, f"{transport}: {mine} raised {took:.3f} s after close()"
    finally:
        a.close()
        b.close()


@pytest.mark.slow
@pytest.mark.parametrize("transport", list(REGISTRY))
def test_close_from_a_third_thread(transport: str) -> None:
    rng = random.Random(transport)
    with no_leaks(f"{ROUNDS} closes of {transport}"):
        for _ in range(ROUNDS):
            _round(transport, rng)


@pytest.mark.parametrize("transport", list(REGISTRY))
def test_close_from_a_third_thread_briefly(transport: str) -> None:
    """The same, 4 times per transport (for `make check`: the full run is in the slow suite)."""
    rng = random.Random(f"brief {transport}")
    with no_leaks(f"4 closes of {transport}"):
        for _ in range(4):
            _round(transport, rng)
