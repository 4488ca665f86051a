"""What this kernel offers fable: each probe tries the real system call once.

``fable doctor`` prints these; the transports that need a feature check it themselves too.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Feature", "kernel_features"]

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_FUTEX_WAKE = 1


@dataclass(frozen=True)
class Feature:
    name: str
    ok: bool
    detail: str


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _memfd() -> str:
    fd = os.memfd_create("fable-doctor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.close(fd)
    return "memfd_create with MFD_ALLOW_SEALING"


def _sealing() -> str:
    fd = os.memfd_create("fable-doctor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4096)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        got = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if got & seals != seals:
            raise OSError("seals did not stick")
    finally:
        os.close(fd)
    return "F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL"


def _futex() -> str:
    nr = _SYS_FUTEX.get(platform.machine())
    if nr is None:
        raise OSError(f"no futex syscall number known for {platform.machine()}")
    word = ctypes.c_uint32(0)
    libc = _libc()
    r = libc.syscall(nr, ctypes.byref(word), _FUTEX_WAKE, 1, None, None, 0)
    if r < 0:
        raise OSError(ctypes.get_errno(), "futex(FUTEX_WAKE)")
    return f"futex (syscall {nr}), shared wake"


def _eventfd() -> str:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    os.close(fd)
    return "eventfd2"


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _vmsplice() -> str:
    r, w = os.pipe()
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE)
        try:
            buf = (ctypes.c_char * mmap.PAGESIZE).from_buffer(page)
            iov = _Iovec(ctypes.addressof(buf), mmap.PAGESIZE)
            libc = _libc()
            libc.vmsplice.restype = ctypes.c_ssize_t
            n = libc.vmsplice(w, ctypes.byref(iov), 1, 0)
            if n < 0:
                raise OSError(ctypes.get_errno(), "vmsplice")
            os.read(r, n)
            del buf
        finally:
            page.close()
    finally:
        os.close(r)
        os.close(w)
    return f"vmsplice moved {n} B into a pipe"


def _pipe_size() -> str:
    with open("/proc/sys/fs/pipe-max-size") as f:
        limit = int(f.read())
    r, w = os.pipe()
    try:
        got = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, limit)
    finally:
        os.close(r)
        os.close(w)
    return f"pipe-max-size {limit} B (F_SETPIPE_SZ gave {got} B)"


def _peercred() -> str:
    a, b = socket.socketpair()
    try:
        raw = a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, _uid, _gid = struct.unpack("3i", raw)
    finally:
        a.close()
        b.close()
    if pid != os.getpid():
        raise OSError("SO_PEERCRED returned another pid")
    return "SO_PEERCRED on AF_UNIX sockets"


def _sigpipe() -> str:
    if signal.getsignal(signal.SIGPIPE) is not signal.SIG_IGN:
        raise OSError("SIGPIPE is not ignored in this process (the pipe transport ignores it)")
    return "ignored (a dead reader gives PeerDied, not a signal)"


def _cpus() -> str:
    allowed = sorted(os.sched_getaffinity(0))
    return f"{os.cpu_count()} online, this process may run on {allowed}"


PROBES: tuple[tuple[str, Callable[[], str]], ...] = (
    ("memfd", _memfd),
    ("sealing", _sealing),
    ("futex", _futex),
    ("eventfd", _eventfd),
    ("vmsplice", _vmsplice),
    ("pipe size", _pipe_size),
    ("SO_PEERCRED", _peercred),
    ("SIGPIPE", _sigpipe),
    ("CPUs", _cpus),
)


def kernel_features() -> list[Feature]:
    """Run every probe; a probe that fails says why in ``detail``."""
    out = []
    for name, probe in PROBES:
        try:
            out.append(Feature(name, True, probe()))
        except Exception as e:  # a probe's failure is the answer, not an error
            out.append(Feature(name, False, f"{type(e).__name__}: {e}"))
    return out
