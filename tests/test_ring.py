"""The reference ring (fable.ring.pyring) against a deque model, and against a hostile peer."""

from __future__ import annotations

import collections
import mmap
import random
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

import fable
from fable import _core
from fable.errors import ProtocolError
from fable.ring import layout as L
from fable.ring.pyring import PyRing, RingReader, RingWriter, format_ring


def new_ring(capacity: int = 4096) -> memoryview:
    mem = memoryview(mmap.mmap(-1, L.HEADER_SIZE + capacity))
    format_ring(mem, capacity)
    return mem


def test_layout_is_consistent() -> None:
    assert L.HEADER_SIZE % L.CACHE_LINE == 0 and L.RECORD_HEADER % 8 == 0
    writer_line = {L.TAIL, L.WRITER_CPU, L.SPACE_WAITING, L.DATA_BELL}
    reader_line = {L.HEAD, L.READER_CPU, L.DATA_WAITING, L.SPACE_BELL}
    assert {o // L.CACHE_LINE for o in writer_line} == {L.TAIL // L.CACHE_LINE}
    assert {o // L.CACHE_LINE for o in reader_line} == {L.HEAD // L.CACHE_LINE}
    assert L.record_span(0) == 24 and L.record_span(1) == 32 and L.record_span(8, 16) == 48


@pytest.mark.parametrize("capacity", [0, 1000, 4095, 3 << 12])
def test_format_rejects_bad_capacity(capacity: int) -> None:
    with pytest.raises(ValueError):
        format_ring(memoryview(mmap.mmap(-1, L.HEADER_SIZE + 65536)), capacity)


def test_attach_checks_the_header() -> None:
    mem = new_ring()
    q, i = mem.cast("Q"), mem.cast("I")
    for field, value, match in (
        (("q", L.MAGIC_OFF), 12345, "magic"),
        (("i", L.VERSION_OFF), 99, "version"),
        (("q", L.CAPACITY), 3000, "capacity"),
        (("q", L.CAPACITY), 1 << 20, "capacity"),
    ):
        view, off = field
        arr = q if view == "q" else i
        idx = off // (8 if view == "q" else 4)
        old = arr[idx]
        arr[idx] = value
        with pytest.raises(ProtocolError, match=match):
            RingReader(mem)
        with pytest.raises(ProtocolError, match=match):
            RingWriter(mem)
        arr[idx] = old
    with pytest.raises(ProtocolError, match="too small"):
        RingReader(memoryview(bytearray(100)))


def test_wraps_with_every_size() -> None:
    mem = new_ring(4096)
    w, r = RingWriter(mem), RingReader(mem)
    rng = random.Random(5)
    for n in range(3000):
        size = rng.choice([0, 1, 7, 8, 9, 100, 500, w.max_record])
        data = bytes([n & 0xFF]) * size
        assert w.write(data, L.F_MORE if n % 3 == 0 else 0)
        got = r.read()
        assert got == (data, L.F_MORE if n % 3 == 0 else 0)
    assert r.read() is None and w.free() == 4096


def test_full_ring_and_release_order() -> None:
    mem = new_ring(4096)
    w, r = RingWriter(mem), RingReader(mem)
    n = 0
    while w.write(bytes([n]) * 100):
        n += 1
    assert n == 4096 // L.record_span(100)
    recs = [r.peek() for _ in range(n)]
    assert all(x is not None for x in recs) and r.peek() is None
    pos = [x[0] for x in recs if x is not None]
    # releasing out of order frees nothing until the oldest goes
    for p in pos[1:]:
        r.release(p)
    assert w.reserve(100) is None
    r.release(pos[0])
    assert w.free() == 4096
    with pytest.raises(ValueError, match="twice"):
        r.release(pos[0])


def test_open_slot_holds_back_later_ones() -> None:
    mem = new_ring()
    w, r = RingWriter(mem), RingReader(mem)
    a = w.reserve(5)
    b = w.reserve(5)
    assert a is not None and b is not None
    mem[b[1] : b[1] + 1] = b"B"
    w.commit(b[0], 1)
    assert w.publish() == 0 and r.peek() is None
    w.abort(a[0])
    assert w.publish() == 1
    rec = r.peek()
    assert rec is not None and rec[4] == 0 and bytes(mem[rec[1] : rec[1] + rec[2]]) == b"B"
    with pytest.raises(ValueError):
        w.commit(a[0], 1)


# ------------------------------------------------------------------------------- model
def _c_writer(mem: memoryview) -> Any:
    return _core.Ring(mem, True)


def _c_reader(mem: memoryview) -> Any:
    return _core.Ring(mem, False)


def _py_writer(mem: memoryview) -> Any:
    return PyRing(mem, True)


def _py_reader(mem: memoryview) -> Any:
    return PyRing(mem, False)


BACKENDS: dict[str, tuple[Any, Any]] = {
    "py": (RingWriter, RingReader),
    "c": (_c_writer, _c_reader),
    "py-adapter": (_py_writer, _py_reader),  # the reference ring behind _core.Ring's interface
}


def test_c_core_mirrors_the_layout() -> None:
    assert _core.LAYOUT == L.OFFSETS
    assert _core.CONSTANTS == L.CONSTANTS
    assert (_core.MAGIC, _core.F_MORE, _core.F_CLOSE, _core.F_PAD) == (
        L.MAGIC,
        L.F_MORE,
        L.F_CLOSE,
        L.F_PAD,
    )


def test_every_atomic_in_the_c_core_says_what_it_pairs_with() -> None:
    """Each __atomic operation has a SYNC POINT comment within the 5 lines above it (naming
    the operation it pairs with, or why it needs none)."""
    bare, seen = [], 0
    for path in sorted((Path(fable.__file__).parent / "_core").glob("*.c")):
        src = path.read_text().splitlines()
        seen += sum("__atomic" in line for line in src)
        bare += [
            f"{path.name}:{i + 1}: {line.strip()}"
            for i, line in enumerate(src)
            if "__atomic" in line and not any("SYNC POINT" in s for s in src[max(0, i - 5) : i])
        ]
    assert not bare, "atomics without a SYNC POINT comment:\n" + "\n".join(bare)
    assert seen >= 25  # the check saw the atomics (in ring.c, wait.c, core.c)


class RingModel(RuleBasedStateMachine):
    backend = "py"

    def __init__(self) -> None:
        super().__init__()
        self.mem = new_ring(4096)
        writer, reader = BACKENDS[self.backend]
        self.w, self.r = writer(self.mem), reader(self.mem)
        # reservation order: [pos, offset, data, flags, state]  (state: 0 open, 1 done, 2 aborted)
        self.open: list[list[Any]] = []
        self.published: collections.deque[tuple[bytes, int]] = collections.deque()
        self.held: list[int] = []
        self.n = 0

    def teardown(self) -> None:
        for obj in (self.w, self.r):
            close = getattr(obj, "close", None)
            if close is not None:
                close()

    @precondition(lambda self: len(self.open) < 6)
    @rule(size=st.sampled_from([0, 1, 7, 8, 100, 999, 1000]), more=st.booleans())
    def reserve(self, size: int, more: bool) -> None:
        got = self.w.reserve(size)
        if got is None:
            assert self.w.free() < 2 * L.record_span(size)
            return
        pos, offset, room = got
        assert room == size
        self.n += 1
        data = bytes([self.n & 0xFF]) * size
        self.mem[offset : offset + size] = data
        self.open.append([pos, offset, data, L.F_MORE if more else 0, 0])

    @precondition(lambda self: bool(self.open))
    @rule(which=st.integers(0, 5), cut=st.integers(0, 50), abort=st.booleans())
    def finish(self, which: int, cut: int, abort: bool) -> None:
        entry = self.open[which % len(self.open)]
        if entry[4]:
            with pytest.raises(ValueError):
                self.w.abort(entry[0])
            return
        if abort:
            self.w.abort(entry[0])
            entry[4] = 2
        else:
            entry[2] = entry[2][: max(0, len(entry[2]) - cut)]  # commit less than reserved
            self.w.commit(entry[0], len(entry[2]), entry[3])
            entry[4] = 1

    @rule()
    def publish(self) -> None:
        count = self.w.publish()
        done = 0
        while self.open and self.open[0][4]:
            _, _, data, flags, state = self.open.pop(0)
            if state == 1:
                self.published.append((data, flags))
                done += 1
        assert count == done

    @rule(copy=st.booleans())
    def read(self, copy: bool) -> None:
        if copy:
            got = self.r.read()
            if not self.published:
                assert got is None
                return
            assert got == self.published.popleft()
            return
        rec = self.r.peek()
        if not self.published:
            assert rec is None
            return
        assert rec is not None
        pos, offset, length, flags, _ = rec
        assert (bytes(self.mem[offset : offset + length]), flags) == self.published.popleft()
        self.held.append(pos)

    @precondition(lambda self: bool(self.held))
    @rule(which=st.integers(0, 100))
    def release(self, which: int) -> None:
        self.r.release(self.held.pop(which % len(self.held)))


def _run_model(backend: str, examples: int, steps: int) -> None:
    machine = type(f"RingModel_{backend}", (RingModel,), {"backend": backend})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ring_model(backend: str) -> None:
    _run_model(backend, 150, 60)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ring_model_many(backend: str) -> None:
    _run_model(backend, 2000, 100)


# ------------------------------------------------------------------------------- hostile peer
def _published(n: int = 3, backend: str = "py") -> tuple[memoryview, Any, Any, int]:
    mem = new_ring()
    writer, reader = BACKENDS[backend]
    w, r = writer(mem), reader(mem)
    for k in range(n):
        w.write(bytes([k]) * 10)
    return mem, w, r, L.HEADER_SIZE  # first record's header


@pytest.mark.parametrize(
    ("kind", "offset", "value", "match"),
    [
        ("I", L.REC_LENGTH, 5000, "past its bounds"),
        ("I", L.REC_LENGTH, 0xFFFFFFFF, "past its bounds"),
        ("H", L.REC_FLAGS, 0x80, "flags"),
        ("H", L.REC_FLAGS, L.F_PAD | L.F_MORE, "flags"),
        ("Q", L.REC_SEQ, 7, "sequence"),
        ("I", L.REC_EPOCH, 3, "epoch"),
        ("I", L.REC_SKIP, 3, "multiple of 8"),
        ("I", L.REC_SKIP, 1 << 30, "past its bounds"),
    ],
)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_hostile_record(kind: str, offset: int, value: int, match: str, backend: str) -> None:
    mem, _, r, base = _published(backend=backend)
    views = {"I": mem.cast("I"), "H": mem.cast("H"), "Q": mem.cast("Q")}
    view = views[kind]
    view[(base + offset) // view.itemsize] = value
    with pytest.raises(ProtocolError, match=match):
        r.peek()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_hostile_close_with_payload(backend: str) -> None:
    mem = new_ring()
    writer, reader = BACKENDS[backend]
    w, r = writer(mem), reader(mem)
    w.write(b"bye", L.F_CLOSE)
    with pytest.raises(ProtocolError, match="close record"):
        r.peek()


@pytest.mark.parametrize("tail", [-1, 5000, 1 << 62])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_hostile_tail(tail: int, backend: str) -> None:
    mem, _, r, _ = _published(backend=backend)
    q = mem.cast("Q")
    q[L.TAIL // 8] = tail % (1 << 64) if tail < 0 else tail
    with pytest.raises(ProtocolError):
        while r.peek() is not None:
            pass


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_tail_inside_a_header(backend: str) -> None:
    mem, _, r, _ = _published(1, backend)
    mem.cast("Q")[L.TAIL // 8] = 8
    with pytest.raises(ProtocolError, match="inside a record header"):
        r.peek()


@pytest.mark.parametrize("head", [10_000, 1 << 40])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_hostile_head(head: int, backend: str) -> None:
    mem, w, _, _ = _published(backend=backend)
    mem.cast("Q")[L.HEAD // 8] = head
    with pytest.raises(ProtocolError, match="HEAD"):
        w.free()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_random_garbage_never_escapes(backend: str) -> None:
    """Random bytes over a ring with records: only ProtocolError, never another exception, a
    crash, or a record outside the data area."""
    rng = random.Random(11)
    for _ in range(3000):
        mem, _, r, _ = _published(rng.randint(0, 5), backend)
        for _ in range(rng.randint(1, 8)):
            off = rng.randrange(L.TAIL, L.HEADER_SIZE + 400)
            mem[off] = rng.randrange(256)
        try:
            for _ in range(20):
                rec = r.peek()
                if rec is None:
                    break
                pos, offset, length, _, _ = rec
                assert L.HEADER_SIZE <= offset <= offset + length <= len(mem)
                r.release(pos)
        except ProtocolError:
            pass
