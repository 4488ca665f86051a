"""A hostile peer's setup for the shared-memory transports: the receiving side checks the memfd
(kind, seals, size) and the eventfds before it maps anything, and leaks nothing when it refuses."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import struct
from collections.abc import Callable

import pytest

from fable.errors import ProtocolError
from fable.ring import layout as L
from fable.ring.pyring import format_ring
from fable.testing import open_fds
from fable.transports.setup import PendingEnd

CAP = 4096
SIZE = 2 * (L.HEADER_SIZE + CAP)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _memfd(size: int = SIZE, seals: int = SEALS, fmt: bool = True) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if fmt and size >= SIZE:
        with mmap.mmap(fd, size) as mm:
            mv = memoryview(mm)
            format_ring(mv[: L.HEADER_SIZE + CAP], CAP)
            format_ring(mv[L.HEADER_SIZE + CAP : SIZE], CAP)
            mv.release()
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _evfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def _open(fds: list[int], params: dict[str, object]) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    body = json.dumps(
        {"v": 1, "op": "hello", "transport": "mempipe-futex", "safe": True, "params": params}
    ).encode()
    a.sendmsg(
        [struct.pack("<I", len(body)) + body],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))],
    )
    for fd in fds:
        os.close(fd)
    a.close()
    PendingEnd(b).open(timeout=5)


def _tmpfile() -> int:
    fd = os.open("/tmp", os.O_TMPFILE | os.O_RDWR)
    os.ftruncate(fd, SIZE)
    return fd


CASES: dict[str, tuple[Callable[[], list[int]], dict[str, object], str]] = {
    "unsealed": (lambda: [_memfd(seals=0), _evfd(), _evfd()], {}, "not sealed"),
    "only shrink sealed": (
        lambda: [_memfd(seals=fcntl.F_SEAL_SHRINK), _evfd(), _evfd()],
        {},
        "not sealed",
    ),
    "too small": (lambda: [_memfd(size=SIZE - 4096), _evfd(), _evfd()], {}, "is .* B, expected"),
    "not a memfd": (lambda: [_tmpfile(), _evfd(), _evfd()], {}, "not a memfd"),
    "pipe for eventfd": (lambda: [_memfd(), *os.pipe()], {}, "not eventfds"),
    "too few fds": (lambda: [_memfd(), _evfd()], {}, "expected 3 fds"),
    "bad capacity": (lambda: [_memfd(), _evfd(), _evfd()], {"capacity": 5000}, "power of two"),
    "size mismatch": (lambda: [_memfd(), _evfd(), _evfd()], {"size": SIZE * 2}, "does not match"),
    "not a ring": (lambda: [_memfd(fmt=False), _evfd(), _evfd()], {}, "bad magic"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_ring_setup(case: str) -> None:
    make, override, match = CASES[case]
    before = open_fds()
    params: dict[str, object] = {"capacity": CAP, "size": SIZE, **override}
    with pytest.raises(ProtocolError, match=match):
        _open(make(), params)
    assert open_fds() == before
