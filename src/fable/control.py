"""The one control thread of this process: an epoll over the daemon link and every setup channel,
and a few timers.

What must happen while the application is busy elsewhere happens here: answering a peer's
reconfiguration request (``fable/epochs.py``), writing the END of a side that is not writing,
reading the daemon's replies and pushes and reporting counters (``fable/client.py``).

The rule: the control thread never blocks on one peer. A callback does what it can without
waiting and returns; if something is left (an END that finds the ring full, frames that do not
fit the daemon socket), it asks to be called again: a timer, or its fd becoming ready. So one
slow or hostile peer cannot hold up the other connections of the process.

- Any thread may ``watch``/``unwatch`` an fd and ``call_later``; callbacks run on the control
  thread, one at a time. A callback that returns False (or raises: logged) stops being called.
- Callbacks hold no strong reference to what they serve (a dropped connection goes at once).
- ``fork()``: the child has no control thread; the first use there starts a fresh one. The
  child closes its copies of the parent's fds without touching the epoll set, which the two
  processes share.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Control", "PerProcess", "control"]

log = logging.getLogger("fable")

FdCallback = Callable[[int], bool]  # (epoll events) -> keep watching?
TimerCallback = Callable[[], float | None]  # -> seconds until the next call, or None: done


class Control:
    """The control thread and its epoll (module docstring). Get it with :func:`control`."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()
        self._fds: dict[int, FdCallback] = {}
        self._timers: list[tuple[float, int, TimerCallback]] = []
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="fable-control", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------- from any thread
    def watch(self, fd: int, callback: FdCallback, events: int = select.EPOLLIN) -> None:
        """Call ``callback(events)`` on the control thread whenever ``fd`` is ready."""
        with self._lock:
            if fd in self._fds:
                try:
                    self._ep.modify(fd, events)
                except FileNotFoundError:
                    # the fd we watched under this number was closed without ``unwatch`` (a
                    # connection dropped unclosed: the kernel left the set itself), and the
                    # number now names another file
                    self._ep.register(fd, events)
            else:
                try:
                    self._ep.register(fd, events)
                except FileExistsError:  # the same file, watched and forgotten: take it over
                    self._ep.modify(fd, events)
            self._fds[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        """Change what ``fd`` is watched for (e.g. EPOLLOUT while frames wait to be sent)."""
        with self._lock:
            if fd in self._fds:
                self._ep.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before closing it: its number may be reused at once)."""
        with self._lock:
            if self._fds.pop(fd, None) is not None:
                try:
                    self._ep.unregister(fd)
                except OSError:
                    pass  # closed already: the kernel dropped it from the set

    def call_later(self, delay: float, callback: TimerCallback) -> None:
        """Call ``callback()`` on the control thread in ``delay`` seconds, and again after the
        delay it returns, until it returns None."""
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), callback))
        os.eventfd_write(self._wake, 1)

    @property
    def on_thread(self) -> bool:
        """Whether the caller is the control thread."""
        return threading.current_thread() is self._thread

    # --------------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            with self._lock:
                first = self._timers[0][0] if self._timers else None
            timeout = -1.0 if first is None else max(0.0, first - time.monotonic())
            try:
                events = self._ep.poll(timeout)
            except OSError:  # pragma: no cover - the epoll fd is ours and stays open
                log.exception("fable control thread: epoll failed")
                time.sleep(0.1)
                continue
            for fd, ev in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    cb = self._fds.get(fd)
                if cb is not None:
                    self._call_fd(fd, cb, ev)
            self._due_timers()

    def _call_fd(self, fd: int, cb: FdCallback, ev: int) -> None:
        try:
            keep = cb(ev)
        except Exception:
            log.exception("fable control thread: a callback for fd %d failed", fd)
            keep = False
        if not keep:
            with self._lock:
                if self._fds.get(fd) is cb:
                    del self._fds[fd]
                    try:
                        self._ep.unregister(fd)
                    except OSError:
                        pass

    def _due_timers(self) -> None:
        now = time.monotonic()
        due: list[TimerCallback] = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for cb in due:
            try:
                again = cb()
            except Exception:
                log.exception("fable control thread: a timer failed")
                again = None
            if again is not None:
                with self._lock:
                    heapq.heappush(self._timers, (time.monotonic() + again, next(self._seq), cb))

    def forget(self) -> None:
        """In a forked child: close the fds copied from the parent, leave the epoll set alone."""
        self._ep.close()  # close(2) of the fd; no EPOLL_CTL_DEL, so the set is left as it is
        try:
            os.close(self._wake)
        except OSError:
            pass


T = TypeVar("T")


class PerProcess(Generic[T]):
    """One object per process, made on first use (``get``); in a forked child the parent's is
    dropped (``forget`` is called on it, which must neither lock nor touch what the parent
    still uses) and the child makes its own on first use."""

    def __init__(self, make: Callable[[], T], forget: Callable[[T], None]) -> None:
        self._make = make
        self._forget = forget
        self._obj: T | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def get(self) -> T:
        obj = self._obj
        if obj is not None:
            return obj
        with self._lock:
            if self._obj is None:
                self._obj = self._make()
            return self._obj

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held when it forked
        obj, self._obj = self._obj, None
        if obj is not None:
            self._forget(obj)


_control: PerProcess[Control] = PerProcess(Control, Control.forget)


def control() -> Control:
    """This process's control thread, started on first use."""
    return _control.get()
