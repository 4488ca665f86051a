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

from fable.errors import ProtocolError
from fable.transports.base import Capabilities, DataPath, EndSpec, TransportInfo
from fable.transports.setup import SetupChannel, _close_all
from fable.transports.stream import StreamPath

PIPE_SIZE = 1 << 20
logger = logging.getLogger("fable")


def _pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65536


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, min(PIPE_SIZE, _pipe_max()))
    except OSError:
        pass  # an unprivileged process over its pipe-user-pages quota keeps the default
    return r, w


def _create(options: dict[str, Any]) -> tuple[EndSpec, EndSpec]:
    r1, w1 = _new_pipe()  # initiator -> peer
    r2, w2 = _new_pipe()  # peer -> initiator
    return EndSpec([r2, w1], {}), EndSpec([r1, w2], {})


def _check_pipe(fd: int, mode: int) -> None:
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        raise ProtocolError("an fd passed for the pipe transport is not a pipe")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != mode:
        raise ProtocolError("a pipe end passed for the pipe transport has the wrong direction")


def _open(spec: EndSpec, role: int, safe: bool, setup: SetupChannel) -> DataPath:
    if len(spec.fds) != 2:
        _close_all(spec.fds)
        raise ProtocolError(f"expected 2 fds for the pipe transport, got {len(spec.fds)}")
    rfd, wfd = spec.fds
    try:
        _check_pipe(rfd, os.O_RDONLY)
        _check_pipe(wfd, os.O_WRONLY)
    except BaseException:
        _close_all(spec.fds)
        raise
    if (
        signal.getsignal(signal.SIGPIPE) is not signal.SIG_IGN
        and threading.current_thread() is threading.main_thread()
    ):
        logger.info("pipe transport: ignoring SIGPIPE (a dead reader gives PeerDied instead)")
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return StreamPath("pipe", setup, rfd=rfd, wfd=wfd)


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
