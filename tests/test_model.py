"""Random operation sequences against a deque model (a hypothesis state machine).

The reading end lives in this process or in a forked child (``helpers.RemoteEnd``: each read
call runs there), in each form of each transport. The writer is driven with every write API
(send, send_many, getwritebuf + commit/abort in any order, flush=False, more=True parts,
partial fills), the reader with every read API (recv, recv_into with any buffer size,
getreadbuf + release in any order). The model: the writer's slots in allocation order (open
claims hold later commits back), and a deque of whole messages that must come out, in order,
exactly once."""

from __future__ import annotations

import collections
import gc
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

import fable
from fable.buffer import Buffer
from fable.errors import WouldBlock
from fable.testing import open_fds, pattern, wait_readable
from helpers import RemoteEnd

T = TypeVar("T")
SIZES = st.sampled_from([0, 1, 7, 64, 100, 2048, 2049, 4096, 70_000, 262_144, 262_145, 600_000])


class _Slot:
    def __init__(self, data: bytes | None, more: bool, state: str) -> None:
        self.data, self.more, self.state = data, more, state  # state: open|committed|aborted


class ConnectionModel(RuleBasedStateMachine):
    transport = "unix"
    safe = True
    remote = False  # the reader in a forked child

    def __init__(self) -> None:
        super().__init__()
        self.a, pending = fable.open_pair(self.transport, safe=self.safe)
        self.b: Any = RemoteEnd(pending) if self.remote else pending.open()
        self.slots: list[_Slot] = []  # writer side, allocation order
        self.claims: list[tuple[list[Buffer], _Slot]] = []
        self.assembling: list[bytes] = []  # fragments that left the writer, message unfinished
        self.ready: collections.deque[bytes] = collections.deque()
        self.frags: collections.deque[Buffer] = collections.deque()  # read, not yet consumed
        self.held: list[Buffer] = []  # consumed fragments, released by the release rule
        self.counter = 0
        self.rng = random.Random(0)

    def teardown(self) -> None:
        for b in [*self.held, *self.frags]:
            self.b.release(b)
        for bufs, _ in self.claims:  # uncommitted write buffers pin transport memory
            self.a.abort(bufs)
        self.b.close()  # reader first: the writer's close must not linger on unread data
        self.a.close()

    # ---------------------------------------------------------------- model bookkeeping
    def _settle(self) -> None:
        while self.slots and self.slots[0].state != "open":
            slot = self.slots.pop(0)
            if slot.state == "committed":
                assert slot.data is not None
                self.assembling.append(slot.data)
                if not slot.more:
                    self.ready.append(b"".join(self.assembling))
                    self.assembling = []

    def _msg(self, size: int) -> bytes:
        self.counter += 1
        return pattern(self.counter, size)

    def _pump(self) -> None:
        try:
            self.a.flush(timeout=0)
        except WouldBlock:
            pass

    def _room(self) -> bool:
        # Single-threaded: never queue more than the connection can hold without a reader.
        return self._unread()[0] < (1 << 20)

    def _unread(self) -> tuple[int, int]:
        """Bytes and messages written and not yet consumed by the reader."""
        msgs = [x.data or b"" for x in self.slots] + self.assembling + list(self.ready)
        return sum(map(len, msgs)), len(msgs)

    def _fits_kernel(self, nbytes: int, nmsgs: int) -> bool:
        """Whether a write that waits for the kernel (send, commit(flush=True)) can complete
        with nobody reading: keep everything unread well inside a socket buffer."""
        b, m = self._unread()
        return b + nbytes <= 100_000 and m + nmsgs <= 40

    # ---------------------------------------------------------------- writer rules
    @precondition(_room)
    @rule(size=SIZES)
    def send(self, size: int) -> None:
        if not self._fits_kernel(size, 1):
            return
        msg = self._msg(size)
        self.a.send(msg)
        self.slots.append(_Slot(msg, False, "committed"))
        self._settle()

    @precondition(_room)
    @rule(n=st.integers(1, 30), size=SIZES)
    def send_many(self, n: int, size: int) -> None:
        n = max(1, min(n, (1 << 20) // max(size, 1)))
        if not self._fits_kernel(n * size, n):
            return
        msgs = [self._msg(size) for _ in range(n)]
        assert self.a.send_many(msgs) == n
        self.slots.extend(_Slot(m, False, "committed") for m in msgs)
        self._settle()

    @precondition(lambda self: len(self.claims) < 3 and self._room())
    @rule(size=SIZES, spare=st.integers(0, 50))
    def claim(self, size: int, spare: int) -> None:
        bufs = self.a.getwritebuf(size + spare)
        assert sum(len(b.data) for b in bufs) >= size + spare
        msg = self._msg(size)
        pos = 0
        for b in bufs:
            n = min(len(b.data), size - pos)
            b.data[:n] = msg[pos : pos + n]
            pos += n
        slot = _Slot(msg, False, "open")
        self.slots.append(slot)
        self.claims.append((bufs, slot))

    @precondition(lambda self: bool(self.claims))
    @rule(which=st.integers(0, 2), flush=st.booleans(), abort=st.booleans(), more=st.booleans())
    def finish(self, which: int, flush: bool, abort: bool, more: bool) -> None:
        bufs, slot = self.claims.pop(which % len(self.claims))
        if abort:
            self.a.abort(bufs)
            slot.state = "aborted"
        else:
            assert slot.data is not None
            flush = flush and self._fits_kernel(0, 0)
            self.a.commit(bufs, len(slot.data), flush=flush, more=more)
            slot.state, slot.more = "committed", more
        self._settle()

    @rule()
    def flush(self) -> None:
        self._pump()

    # ---------------------------------------------------------------- reader rules
    # Each read rule consumes at most one whole message, so the model's state never depends on
    # how much the kernel happened to deliver (hypothesis needs deterministic preconditions).
    def _consume_fragments(self) -> None:
        want = self.ready.popleft()
        parts: list[bytes] = []
        deadline = time.monotonic() + 10  # tcp with Nagle on may hold a segment ~40 ms
        while time.monotonic() < deadline:
            while self.frags:
                b = self.frags.popleft()
                parts.append(bytes(b.data))
                self.held.append(b)
                if not b.more:
                    assert b"".join(parts) == want
                    return
            self._pump()
            got = self.b.getreadbuf()
            if not got:
                self._wait()
            self.frags.extend(got)
        raise AssertionError("a committed message never became readable")

    @rule(into=st.sampled_from([None, 0, 10, 5000, 700_000]))
    def recv(self, into: int | None) -> None:
        self._pump()
        if self.frags:  # a message begun with getreadbuf is finished with it
            if self.ready:
                self._consume_fragments()
            return
        want = self.ready[0] if self.ready else None
        if want is None:
            with pytest.raises(WouldBlock):
                self.b.recv(timeout=0)
            return
        if into is None:
            got = self._retry(lambda: self.b.recv(timeout=0))
        else:
            buf = bytearray(into)
            if into < len(want):
                with pytest.raises(ValueError):
                    self._retry(lambda: self.b.recv_into(buf, timeout=0))
                return  # nothing lost: the same message is still next
            n = self._retry(lambda: self.b.recv_into(buf, timeout=0))
            got = bytes(buf[:n])
        assert got == want
        self.ready.popleft()

    def _wait(self) -> None:
        """Wait a little for the reader's end to become readable."""
        if self.remote:
            self.b.wait_readable(0.01)
        else:
            wait_readable(self.b, 0.01)

    def _retry(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return fn()
            except WouldBlock:
                self._pump()
                self._wait()
        raise AssertionError("a committed message never became readable")

    @rule()
    def getreadbuf(self) -> None:
        self._pump()
        if self.ready:
            self._consume_fragments()
        else:
            self.frags.extend(self.b.getreadbuf())
            assert all(f.more for f in self.frags), "getreadbuf made up a message"

    @rule(k=st.integers(1, 5))
    def release(self, k: int) -> None:
        self.rng.shuffle(self.held)
        for _ in range(min(k, len(self.held))):
            self.b.release(self.held.pop())


EXAMPLES = int(os.environ.get("FABLE_MODEL_EXAMPLES", "15"))
FORMS = [(t, safe) for t in fable.REGISTRY for safe in fable.REGISTRY[t].caps.forms]
IDS = [f"{t}-{'safe' if safe else 'unsafe'}" for t, safe in FORMS]


@pytest.mark.parametrize("remote", [False, True], ids=["one-process", "two-processes"])
@pytest.mark.parametrize(("transport", "safe"), FORMS, ids=IDS)
def test_model(transport: str, safe: bool, remote: bool) -> None:
    before = open_fds()
    machine = type(
        f"Model_{transport}",
        (ConnectionModel,),
        {"transport": transport, "safe": safe, "remote": remote},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    gc.collect()  # buffers the model still held keep their memory (and its fd) until collected
    assert not open_fds() - before, "fds leaked"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("transport", "safe"), FORMS, ids=IDS)
def test_model_many(transport: str, safe: bool) -> None:
    machine = type(
        f"ModelMany_{transport}",
        (ConnectionModel,),
        {"transport": transport, "safe": safe, "remote": True},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=200,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
