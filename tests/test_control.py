"""The control thread's fd watching (fable/control.py)."""

from __future__ import annotations

import os
import socket
import threading

from fable.control import control


def test_watch_a_reused_fd_number_after_a_close_without_unwatch() -> None:
    """A connection dropped without close() leaves its setup channel's fd in the watch table
    (the kernel already left the epoll set when the fd closed); a new socket that gets the
    same number must be watched, not fail with ENOENT (test_daemon caught this once, under
    coverage: ``self._ep.modify(fd, events)`` raised FileNotFoundError in connect)."""
    ctl = control()
    a, b = socket.socketpair()
    fd = a.fileno()
    ctl.watch(fd, lambda ev: True)
    a.close()  # no unwatch: what a garbage-collected, unclosed connection does
    b.close()
    c, d = socket.socketpair()
    try:
        if c.fileno() != fd:  # make the new socket take the old number
            os.dup2(c.fileno(), fd)
            c.close()
            c = socket.socket(fileno=fd)
        fired = threading.Event()

        def seen(ev: int) -> bool:
            fired.set()
            return False  # once is enough

        ctl.watch(fd, seen)
        d.send(b"x")
        assert fired.wait(10), "the new fd under the old number was never reported"
    finally:
        ctl.unwatch(fd)
        c.close()
        d.close()
