"""The fds a connection hands to an event loop, which must outlive its transports.

- :class:`StableFd` is ``Connection.fileno()``: an epoll fd of the connection's own, made on first
  use, that watches the path being read and is re-pointed at the next one at each read switch,
  so the number the application registered stays valid across reconfigurations. While the path
  being read spins (it has no fd of its own: a switch away from it agreed, the peer's END not
  read yet), the epoll watches an always-readable eventfd instead: spurious wake-ups until the
  switch, never a missed one.
- :class:`BusyFd` is ``Connection.reconfig_fileno()``: a pipe that is readable while a
  reconfiguration is in progress and empty otherwise.

Both are owned by one connection and closed with it; after ``fork()`` the child closes its
copies without touching the epoll set, which it shares with the parent.
"""

from __future__ import annotations

import contextlib
import io
import os
import select

from fable.transports import DataPath, spins

__all__ = ["BusyFd", "StableFd"]


class StableFd:
    """The connection's readiness fd (module docstring)."""

    def __init__(self) -> None:
        self._ep: select.epoll | None = None
        self._src = -1  # the fd registered in the epoll (the read path's own, or the kick)
        self._kick = -1  # an always-readable eventfd, while the read path spins

    @property
    def handed_out(self) -> bool:
        """Whether the application has it (then no switch may go to a spinning transport)."""
        return self._ep is not None

    @property
    def kicking(self) -> bool:
        """Whether it watches the always-readable kick (the read path spins)."""
        return self._kick >= 0

    def fileno(self, reading: list[DataPath]) -> int:
        """The fd, made on first use to watch ``reading[0]`` (the paths being read, oldest
        first). ``io.UnsupportedOperation`` if that path spins and no later one is pollable."""
        if self._ep is None:
            head = reading[0]
            if spins(head) and all(spins(p) for p in reading):
                raise io.UnsupportedOperation(f"{head.transport} spins and has no readiness fd")
            ep = select.epoll()
            self._ep = ep
            try:
                self._watch(head)
            except BaseException:
                self._ep = None
                ep.close()
                raise
        return self._ep.fileno()

    def follow(self, path: DataPath) -> None:
        """Watch ``path`` from now on (the read switch moved to it)."""
        ep = self._ep
        if ep is None:
            return
        with contextlib.suppress(OSError):
            ep.unregister(self._src)
        self._src = -1
        self._watch(path)
        if self._kick >= 0 and self._src != self._kick:
            os.close(self._kick)
            self._kick = -1

    def _watch(self, path: DataPath) -> None:
        assert self._ep is not None
        if spins(path):
            if self._kick < 0:
                self._kick = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fd = self._kick
        else:
            fd = path.fileno()  # arms the path's readiness
        self._ep.register(fd, select.EPOLLIN)
        self._src = fd

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()  # closes the fd only: the epoll set itself is not touched
            self._ep = None
        if self._kick >= 0:
            os.close(self._kick)
            self._kick = -1


class BusyFd:
    """``reconfig_fileno()``: readable while a reconfiguration is in progress."""

    def __init__(self) -> None:
        self._r = self._w = -1
        self._busy = False

    def fileno(self) -> int:
        if self._r < 0:
            self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._show()
        return self._r

    def set(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self._show()

    def _show(self) -> None:
        if self._r < 0:
            return
        try:
            if self._busy:
                os.write(self._w, b"x")
            else:
                while os.read(self._r, 64):
                    pass
        except OSError:  # full (readable anyway) or empty (not readable): both what we want
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._r = self._w = -1
