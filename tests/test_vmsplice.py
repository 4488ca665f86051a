"""vmsplice-coop beyond the conformance suite: many laps of the writer's arena with every kind
of message size (fragments, the arena's end), a slow reader, so that pages are reused only
after the reader's tokens say so; the pipe is enlarged; the safe form is refused."""

from __future__ import annotations

import fcntl
import random
import time

import pytest

import fable
from fable import config
from fable.connection import Connection
from fable.testing import Child, pattern, verify
from fable.transports.pipe import PIPE_SIZE, _pipe_max
from fable.transports.stream import FRAGMENT
from fable.transports.vmsplice import VmsplicePath

SIZES = [0, 1, 63, 64, 4095, 4096, 4097, FRAGMENT - 1, FRAGMENT, FRAGMENT + 1, 300_000]


def _writer(c: Connection, sizes: list[int]) -> None:
    p = c._path
    assert isinstance(p, VmsplicePath)
    assert fcntl.fcntl(p._wfd, fcntl.F_GETPIPE_SZ) == min(PIPE_SIZE, _pipe_max())
    for i, n in enumerate(sizes):
        if i % 3 == 0 and n <= p.max_write:
            bufs = c.getwritebuf(n)
            data, pos = pattern(i, n), 0
            for b in bufs:
                b.data[:] = data[pos : pos + len(b.data)]
                pos += len(b.data)
            c.commit(bufs, n)
        else:
            c.send(pattern(i, n))
    laps = p._ahead / p._asize
    assert laps > 3, f"the arena went round only {laps:.1f} times"


@pytest.mark.timeout(120)
def test_arena_laps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABLE_RING_SIZE", "65536")
    config.reload()
    rng = random.Random(5)
    sizes = [rng.choice([*SIZES, rng.randrange(70_000)]) for _ in range(120)]
    sizes += [rng.randrange(150_000) for _ in range(40)]
    conn, pending = fable.open_pair("vmsplice-coop", safe=False)
    ch = Child(pending, _writer, sizes)
    with conn:
        for i, n in enumerate(sizes):
            if i % 25 == 0:
                time.sleep(0.05)  # a slow reader: the writer must wait for tokens, not reuse
            verify(i, conn.recv(timeout=30), n)
    ch.expect_success()


def test_safe_form_refused() -> None:
    with pytest.raises(ValueError, match="trust each other"):
        fable.open_pair("vmsplice-coop", safe=True)
    assert fable.REGISTRY["vmsplice-coop"].caps.mutual_trust
    assert fable.REGISTRY["vmsplice-coop"].caps.forms == (False,)
