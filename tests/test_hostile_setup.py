"""A hostile peer's setup for the shared-memory transports: the receiving side checks the memfd
(kind, seals, size), the doorbells and the pipes before it maps or uses anything, refuses extra
or missing fds and truncated records, and leaks nothing when it refuses."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import struct
from collections.abc import Callable

import pytest

from fable.connection import PendingEnd
from fable.errors import ProtocolError
from fable.ring import layout as L
from fable.ring.pyring import format_ring
from fable.testing import open_fds
from fable.transports.channel import SETUP_VERSION

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
    """A doorbell: one end of an AF_UNIX stream socketpair (the other end dropped)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    return a.detach()


def _open(
    fds: list[int],
    params: dict[str, object],
    transport: str = "mempipe-futex",
    safe: bool = True,
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    body = json.dumps(
        {"v": SETUP_VERSION, "op": "hello", "transport": transport, "safe": safe, "params": params}
    ).encode()
    a.sendmsg(
        [struct.pack(">I", len(body)) + body],
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
    "unsealed": (lambda: [_memfd(seals=0), _evfd(), _evfd()], {}, "seals are 0x0, expected"),
    "only shrink sealed": (
        lambda: [_memfd(seals=fcntl.F_SEAL_SHRINK), _evfd(), _evfd()],
        {},
        "seals are .*expected exactly",
    ),
    # sealed against writing too: mapping it writable would raise PermissionError out of accept
    "write sealed": (
        lambda: [_memfd(seals=SEALS | fcntl.F_SEAL_WRITE), _evfd(), _evfd()],
        {},
        "seals are .*expected exactly",
    ),
    # a ring past FABLE_MAX_PEER_RING (default 256 MiB): a sparse memfd of the size it claims
    "oversized ring": (
        lambda: [_memfd(size=2 * (L.HEADER_SIZE + (1 << 30)), fmt=False), _evfd(), _evfd()],
        {"capacity": 1 << 30, "size": 2 * (L.HEADER_SIZE + (1 << 30))},
        "FABLE_MAX_PEER_RING",
    ),
    "too small": (lambda: [_memfd(size=SIZE - 4096), _evfd(), _evfd()], {}, "is .* B, expected"),
    "not a memfd": (lambda: [_tmpfile(), _evfd(), _evfd()], {}, "not a memfd"),
    "pipe for doorbell": (lambda: [_memfd(), *os.pipe()], {}, "not AF_UNIX stream sockets"),
    # an eventfd (the old doorbell) can be made blocking by the peer that shares it
    "eventfd for doorbell": (
        lambda: [_memfd(), os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)],
        {},
        "not AF_UNIX stream sockets",
    ),
    "datagram socket for doorbell": (
        lambda: [_memfd(), *[s.detach() for s in socket.socketpair(type=socket.SOCK_DGRAM)]],
        {},
        "not AF_UNIX stream sockets",
    ),
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


# ---------------------------------------------------------------- shmem-pipe and vmsplice-coop
SHM_CAP = 65536


def _rd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _wr() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def _sock() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def _shm(size: int = 2 * SHM_CAP, seals: int = SEALS) -> int:
    return _memfd(size=size, seals=seals, fmt=False)


PIPE_CASES: dict[str, tuple[str, Callable[[], list[int]], dict[str, object], bool, str]] = {
    "shmem unsealed": (
        "shmem-pipe",
        lambda: [_shm(seals=0), _rd(), _wr(), _rd(), _wr()],
        {},
        True,
        "seals are 0x0",
    ),
    "shmem write sealed": (
        "shmem-pipe",
        lambda: [_shm(seals=SEALS | fcntl.F_SEAL_WRITE), _rd(), _wr(), _rd(), _wr()],
        {},
        True,
        "seals are .*expected exactly",
    ),
    "shmem oversized area": (
        "shmem-pipe",
        lambda: [_shm(2 << 30), _rd(), _wr(), _rd(), _wr()],
        {"capacity": 1 << 30},
        True,
        "FABLE_MAX_PEER_RING",
    ),
    "shmem too small": (
        "shmem-pipe",
        lambda: [_shm(SHM_CAP), _rd(), _wr(), _rd(), _wr()],
        {},
        True,
        "is .* B, expected",
    ),
    "shmem not a memfd": (
        "shmem-pipe",
        lambda: [_tmpfile(), _rd(), _wr(), _rd(), _wr()],
        {},
        True,
        "not a memfd",
    ),
    "shmem socket for a pipe": (
        "shmem-pipe",
        lambda: [_shm(), _sock(), _wr(), _rd(), _wr()],
        {},
        True,
        "not a pipe",
    ),
    "shmem pipe backwards": (
        "shmem-pipe",
        lambda: [_shm(), _wr(), _wr(), _rd(), _wr()],
        {},
        True,
        "wrong direction",
    ),
    "shmem extra fd": (
        "shmem-pipe",
        lambda: [_shm(), _rd(), _wr(), _rd(), _wr(), _rd()],
        {},
        True,
        "expected 5 fds",
    ),
    "shmem too few fds": ("shmem-pipe", lambda: [_shm(), _rd(), _wr()], {}, True, "expected 5 fds"),
    "shmem bad capacity": (
        "shmem-pipe",
        lambda: [_shm(), _rd(), _wr(), _rd(), _wr()],
        {"capacity": 1000},
        True,
        "capacity",
    ),
    "vmsplice socket for a pipe": (
        "vmsplice-coop",
        lambda: [_sock(), _wr(), _rd(), _wr()],
        {},
        False,
        "not a pipe",
    ),
    "vmsplice pipe backwards": (
        "vmsplice-coop",
        lambda: [_rd(), _rd(), _rd(), _wr()],
        {},
        False,
        "wrong direction",
    ),
    "vmsplice extra fd": (
        "vmsplice-coop",
        lambda: [_rd(), _wr(), _rd(), _wr(), _rd()],
        {},
        False,
        "expected 4 fds",
    ),
    "vmsplice asked safe": (
        "vmsplice-coop",
        lambda: [_rd(), _wr(), _rd(), _wr()],
        {},
        True,
        "no safe form",
    ),
}


@pytest.mark.parametrize("case", list(PIPE_CASES))
def test_hostile_pipe_transport_setup(case: str) -> None:
    transport, make, override, safe, match = PIPE_CASES[case]
    before = open_fds()
    params: dict[str, object] = {"capacity": SHM_CAP, **override}
    with pytest.raises(ProtocolError, match=match):
        _open(make(), params, transport, safe)
    assert open_fds() == before


@pytest.mark.parametrize("cut", [2, 4, 20])
def test_truncated_hello(cut: int) -> None:
    """A hello cut short (the peer hangs up mid-record) is refused; its fds are not kept."""
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    body = json.dumps(
        {"v": SETUP_VERSION, "op": "hello", "transport": "shmem-pipe", "safe": True}
    ).encode()
    record = struct.pack(">I", len(body)) + body
    fd = _shm()
    a.sendmsg([record[:cut]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    os.close(fd)
    a.close()
    with pytest.raises(ProtocolError):
        PendingEnd(b).open(timeout=5)
    assert open_fds() == before
