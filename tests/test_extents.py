"""shmem-pipe's allocator (Extents) against a byte map: allocations never overlap and stay in
the area, free space coalesces, best fit picks the smallest free extent that fits, and the
outstanding-extent bound holds."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from fable.transports.shmem_pipe import ALIGN, Extents, _asize

CAP = 64 * ALIGN


class Model:
    def __init__(self) -> None:
        self.used = [False] * (CAP // ALIGN)

    def free_runs(self) -> list[tuple[int, int]]:
        runs, start = [], None
        for i, u in enumerate([*self.used, True]):
            if not u and start is None:
                start = i
            elif u and start is not None:
                runs.append((start * ALIGN, (i - start) * ALIGN))
                start = None
        return runs

    def take(self, off: int, n: int) -> None:
        for i in range(off // ALIGN, (off + n) // ALIGN):
            assert not self.used[i], f"extent {off}+{n} overlaps an allocation"
            self.used[i] = True

    def give(self, off: int, n: int) -> None:
        for i in range(off // ALIGN, (off + n) // ALIGN):
            assert self.used[i]
            self.used[i] = False


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, CAP // 3)),
        st.tuples(st.just("free"), st.integers(0, 10**6)),
        st.tuples(st.just("shrink"), st.integers(0, 10**6)),
    ),
    max_size=120,
)


def _run(seq: list[tuple[str, int]], max_out: int = 1000) -> None:
    ext, model = Extents(CAP, max_out), Model()
    live: list[tuple[int, int]] = []  # (offset, allocated size)
    for op, arg in seq:
        if op == "alloc":
            before = model.free_runs()
            off = ext.alloc(arg)
            size = _asize(arg)
            if off is None:
                assert len(live) >= max_out or all(n < size for _, n in before)
                continue
            assert off % ALIGN == 0 and off + size <= CAP
            containing = [(s, n) for s, n in before if s <= off < s + n]
            assert containing and containing[0][1] >= size
            model.take(off, size)
            live.append((off, size))
        elif live and op == "free":
            off, size = live.pop(arg % len(live))
            ext.free(off, size)
            model.give(off, size)
        elif live and op == "shrink":
            i = arg % len(live)
            off, size = live[i]
            used = arg % (size + 1)
            keep = ext.shrink(off, size, used)
            assert keep == _asize(used) or keep == size
            model.give(off + keep, size - keep)
            live[i] = (off, keep)
        assert ext.free_bytes == sum(n for _, n in model.free_runs())
        assert ext.count == len(live)
    for off, size in live:
        ext.free(off, size)
    assert ext.free_bytes == CAP
    assert ext.alloc(CAP) is not None  # everything coalesced back into one extent


@settings(max_examples=200, deadline=None)
@given(ops)
def test_extents_model(seq: list[tuple[str, int]]) -> None:
    _run(seq)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(ops, st.integers(1, 40))
def test_extents_model_long(seq: list[tuple[str, int]], max_out: int) -> None:
    _run(seq, max_out)


def test_best_fit_when_fragmented() -> None:
    ext = Extents(CAP, 100)
    offs = [ext.alloc(ALIGN) for _ in range(CAP // ALIGN)]
    assert sorted(o for o in offs if o is not None) == list(range(0, CAP, ALIGN))
    # holes of 3, 1 and 2 slots; the current extent is used up
    for i in (10, 11, 12, 20, 30, 31):
        ext.free(i * ALIGN, ALIGN)
    assert ext.alloc(2 * ALIGN) == 30 * ALIGN  # the hole of exactly two, not the first fit
    assert ext.alloc(ALIGN) == 20 * ALIGN
    assert ext.alloc(4 * ALIGN) is None
    assert ext.alloc(3 * ALIGN) == 10 * ALIGN


def test_outstanding_bound() -> None:
    ext = Extents(CAP, 3)
    assert [ext.alloc(1) for _ in range(4)] == [0, ALIGN, 2 * ALIGN, None]
    ext.free(ALIGN, ALIGN)
    assert ext.alloc(1) is not None
