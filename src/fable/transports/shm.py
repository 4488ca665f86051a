"""Sealed memfds: the only shared memory fable maps (DESIGN.md §3, "Shared memory").

The creating side makes an anonymous memfd, sizes and fills it, then seals it against shrinking,
growing and further sealing (``SEALS``) before any fd goes to the peer. The receiving side calls
:func:`check_sealed_memfd` before mapping: a peer that passes something else (a regular file, an
unsealed memfd that it could later shrink to raise SIGBUS in us, the wrong size) gets a
``ProtocolError`` and nothing is mapped. No named objects live in /dev/shm.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import stat
from collections.abc import Callable

from fable._wire import close_fds
from fable.config import settings
from fable.errors import ProtocolError

__all__ = [
    "SEALS",
    "check_peer_ring",
    "check_sealed_memfd",
    "doorbells",
    "drain",
    "forget",
    "is_doorbell",
    "new_sealed_memfd",
    "unmap",
]

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def new_sealed_memfd(name: str, size: int, fill: Callable[[memoryview], None] | None = None) -> int:
    """A CLOEXEC memfd of ``size`` bytes, ``fill``ed through a temporary mapping, then sealed."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if fill is not None:
            with mmap.mmap(fd, size) as mm:
                mv = memoryview(mm)
                try:
                    fill(mv)
                finally:
                    mv.release()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed_memfd(fd: int, size: int) -> None:
    """Raise ProtocolError unless ``fd`` is a memfd of exactly ``size`` bytes, sealed (SEALS)."""
    st = os.fstat(fd)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    if not stat.S_ISREG(st.st_mode) or not target.startswith("/memfd:"):
        raise ProtocolError("the fd passed as shared memory is not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ProtocolError("the shared memory cannot be sealed (not a memfd)") from None
    if seals != SEALS:
        raise ProtocolError(
            f"the shared memory's seals are {seals:#x}, expected exactly {SEALS:#x} (sealed "
            "against shrinking and growing, writable)"
        )
    if st.st_size != size:
        raise ProtocolError(f"the shared memory is {st.st_size} B, expected {size} B")


def check_peer_ring(capacity: int) -> None:
    """ProtocolError if a peer offers a ring (or area) larger than this side maps."""
    cap = settings().max_peer_ring
    if capacity > cap:
        raise ProtocolError(
            f"the peer offered a ring of {capacity} B; this side maps at most {cap} B "
            "(FABLE_MAX_PEER_RING)"
        )


def is_doorbell(fd: int) -> bool:
    """Whether ``fd`` is an AF_UNIX stream socket (a readiness doorbell, ``doorbells``)."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
    finally:
        s.detach()


def doorbells() -> tuple[tuple[int, int], tuple[int, int]]:
    """Two doorbells, one per side, as ((own 0, peer 0), (own 1, peer 1)): each side waits on
    its own (readable when the peer rang) and rings the peer's with ``send(MSG_DONTWAIT)``. A
    doorbell is a socketpair, not an eventfd: a peer that shares an eventfd can clear
    its O_NONBLOCK and fill it, and the next ``write`` blocks; no peer can clear the per-call
    MSG_DONTWAIT. Non-blocking, close-on-exec."""
    kind = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    fds: list[int] = []
    try:
        for _ in range(2):
            a, b = socket.socketpair(socket.AF_UNIX, kind)
            fds += [a.detach(), b.detach()]
    except BaseException:
        close_fds(fds)
        raise
    rx0, tx1, rx1, tx0 = fds  # pair 0 wakes side 0 (side 1 rings it); pair 1 wakes side 1
    return (rx0, tx0), (rx1, tx1)


def drain(bell: socket.socket) -> None:
    """Read what waits on a doorbell, never blocking (MSG_DONTWAIT: the peer may have cleared
    O_NONBLOCK on the socket it shares): one system call unless over 4 KiB of rings wait (a
    stream socket, so that one read takes every ring, not one datagram per read)."""
    try:
        for _ in range(16):  # bounded: a peer that keeps ringing cannot keep us here
            if len(bell.recv(4096, socket.MSG_DONTWAIT)) < 4096:
                break
    except OSError:
        pass  # BlockingIOError: empty; anything else: nothing to read either


def unmap(mm: mmap.mmap, *views: memoryview | None) -> None:
    """Release ``views`` of ``mm`` and unmap it, unless the application still holds buffers
    into it: then the mapping (and the fd Python's mmap keeps) goes when the last one does."""
    for view in views:
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass
    try:
        mm.close()
    except BufferError:
        pass  # the caller must also ``forget`` its references, or it keeps the mapping


def forget(owner: object, *names: str) -> None:
    """Drop ``owner``'s references to a mapping ``unmap`` could not close (and its views):
    then the buffers the application holds are all that keep it, and it goes with the last
    of them even if the closed connection object lives on."""
    for name in names:
        owner.__dict__.pop(name, None)
