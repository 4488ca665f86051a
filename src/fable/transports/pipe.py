"""pipe: two POSIX pipes, one per direction. Two copies, kernel wake-ups, pollable, one host.

Each pipe is enlarged to ``PIPE_SIZE`` (or the kernel's pipe-max-size, if lower) so a 64 KiB
message does not need several wake-ups. Writes rely on SIGPIPE being ignored, as Python sets it
at start-up; opening a pipe end restores that if the application changed it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import threading
from typing import Any

from fable._wire import close_fds
from fable.errors import ProtocolError
from fable.transports.base import Capabilities, DataPath, EndSpec, TransportInfo
from fable.transports.channel import SetupChannel
from fable.transports.stream import StreamPath

PIPE_SIZE = 1 << 20
logger = logging.getLogger("fable")


def _pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65536


def new_pipe() -> tuple[int, int]:
    """A CLOEXEC pipe (read end, write end), enlarged to PIPE_SIZE where the kernel allows."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, min(PIPE_SIZE, _pipe_max()))
    except OSError:
        pass  # an unprivileged process over its pipe-user-pages quota keeps the default
    return r, w


def _create(options: dict[str, Any]) -> tuple[EndSpec, EndSpec]:
    r1, w1 = new_pipe()  # initiator -> peer
    r2, w2 = new_pipe()  # peer -> initiator
    return EndSpec([r2, w1], {}), EndSpec([r1, w2], {})


def check_pipe(fd: int, mode: int) -> None:
    """ProtocolError unless ``fd`` is a pipe end opened for ``mode`` (os.O_RDONLY/O_WRONLY)."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        raise ProtocolError("an fd passed as a pipe is not a pipe")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != mode:
        raise ProtocolError("a pipe end passed by the peer has the wrong direction")


def pipe_ends(fds: list[int], modes: tuple[int, ...], role: int) -> None:
    """Check the pipe ends ``fds[-len(modes):]`` (each opened for its mode in ``modes``), in
    place. Role 1 (ends the peer passed) opens each again through /proc/self/fd: the new fd has
    an open file description of its own, whose O_NONBLOCK only this process can change (the
    peer that created the pipe may keep the description it passed and clear O_NONBLOCK on it,
    so that a write meant not to wait blocks). ProtocolError otherwise (e.g. a write end whose
    pipe has no reader any more); ``fds`` always holds what the caller must close."""
    first = len(fds) - len(modes)
    for i, mode in enumerate(modes, first):
        check_pipe(fds[i], mode)
        if role == 1:
            fds[i] = _reopen(fds[i], mode)


def _reopen(fd: int, mode: int) -> int:
    """``fd`` opened again (a description of our own), ``fd`` closed; ProtocolError (``fd``
    left open) if it cannot be."""
    try:
        new = os.open(f"/proc/self/fd/{fd}", mode | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ProtocolError(f"a pipe passed by the peer cannot be opened again: {e}") from None
    os.close(fd)
    return new


def ignore_sigpipe() -> None:
    """Writes to a pipe whose reader died must give EPIPE (PeerDied), not kill the process.
    Python ignores SIGPIPE at start-up; restore that if the application changed it."""
    if (
        signal.getsignal(signal.SIGPIPE) is not signal.SIG_IGN
        and threading.current_thread() is threading.main_thread()
    ):
        logger.info("pipe transports: ignoring SIGPIPE (a dead reader gives PeerDied instead)")
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def _open(spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0) -> DataPath:
    if len(spec.fds) != 2:
        close_fds(spec.fds)
        raise ProtocolError(f"expected 2 fds for the pipe transport, got {len(spec.fds)}")
    fds = list(spec.fds)
    try:
        pipe_ends(fds, (os.O_RDONLY, os.O_WRONLY), role)
    except BaseException:
        close_fds(fds)
        raise
    rfd, wfd = fds
    ignore_sigpipe()
    return StreamPath("pipe", setup, rfd=rfd, wfd=wfd, epoch=epoch)


INFO = TransportInfo(
    name="pipe",
    caps=Capabilities(
        copies_unsafe=None,
        copies_safe=2,
        wait="kernel",
        pollable=True,
        cross_host=False,
        spins=False,
    ),
    summary="two POSIX pipes, one per direction",
    create=_create,
    open=_open,
)
