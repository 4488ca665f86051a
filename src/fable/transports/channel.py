"""The setup channel: records between the two sides of one connection, for its whole life.

It is an already-connected AF_UNIX stream socket. Records are frames of the one codec of
``fable._wire`` (``SETUP``: a u32 big-endian length, a JSON object with ``"v": SETUP_VERSION``,
fds attached by SCM_RIGHTS to its first byte). What travels on it:

    hello        the first offer (epoch 0), with the answering side's fds   (fable/handshake.py)
    reconfig, reconfig-accept, reconfig-refuse, reconfig-done
                 a later offer and its answer, the end of an old epoch       (fable/epochs.py)
    close        this side closes cleanly: its last message is on the data path already

A side that closes says so (``close``) before its data-path fds go, so the other side can tell
a clean close (``peer_state() == "closed"``) from a death (``"died"``: the stream ended with no
close notice). Reading never blocks the caller: :meth:`poll` takes what has arrived, keeps the
records in an inbox (``take``) and notes a close notice and the end of the stream; whichever
thread looks first (the control thread, or a data path checking that its peer lives) reads
for everyone. Anything malformed is a ``ProtocolError``, raised to every later reader.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fable._wire import Codec, FrameReader, close_fds, send_frame
from fable.errors import FableError, PermissionDenied, ProtocolError, Timeout

__all__ = ["REFUSE", "SETUP", "SETUP_VERSION", "SetupChannel", "refusal_error"]

SETUP_VERSION = 3  # 3: offers carry "yours" (a form per reading side); REFUSE at epoch 0
SETUP = Codec("setup", SETUP_VERSION)

Record = tuple[dict[str, Any], list[int]]

# an offer refused (fable/handshake.py); at epoch 0 the connection never opened on the other side,
# so every later look at this channel (and at the data path, which reads it) raises the reason
REFUSE = "reconfig-refuse"


def refusal_error(record: dict[str, Any], what: str) -> ProtocolError | PermissionDenied:
    """The error a REFUSE record stands for on the offering side: ``PermissionDenied`` for
    trust (``kind: "permission"``), ``ProtocolError`` otherwise."""
    why = f"the peer refused {what}: {str(record.get('why', 'refused'))[:500]}"
    return PermissionDenied(why) if record.get("kind") == "permission" else ProtocolError(why)


class SetupChannel:
    """One connection's setup channel (see the module docstring). Any thread may send (records
    stay whole) or poll; the inbox is the caller's to take from."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ProtocolError("the setup channel must be an AF_UNIX stream socket")
        sock.setblocking(True)
        self._sock: socket.socket | None = sock
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._reader = FrameReader(SETUP)
        self._inbox: deque[Record] = deque()
        self._error: ProtocolError | PermissionDenied | None = None
        self.peer_closed = False  # the peer's close notice was read
        self.ended = False  # the stream ended (the peer's socket is gone)
        # called (on the reading thread) when ``peer_state`` put records in the inbox: whoever
        # handles them must hear of it, since the socket will not say so again
        self.on_records: Callable[[], None] | None = None

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise FableError("setup channel is closed")
        return self._sock

    def fileno(self) -> int:
        return self.sock.fileno()

    # ------------------------------------------------------------------------ sending
    def send(self, record: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one record (``fds`` attached; they stay the caller's)."""
        frame = SETUP.encode(record)
        with self._send_lock:
            send_frame(self.sock, frame, fds)

    def say_close(self) -> None:
        """Tell the peer this side is closing cleanly (best effort)."""
        try:
            self.send({"op": "close"})
        except (OSError, FableError):
            pass

    # ------------------------------------------------------------------------ reading
    def poll(self) -> int:
        """Read whatever has arrived, without waiting: records go to the inbox (returns how
        many), a close notice sets ``peer_closed``, the end of the stream ``ended``.
        ``ProtocolError`` on malformed input (now and at every later call)."""
        queued = 0
        with self._read_lock:
            if self._error is not None:
                raise self._error
            sock = self._sock
            if sock is None or self.ended:
                return 0
            try:
                while True:
                    try:
                        n = self._reader.read_from(sock, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        break
                    except (ConnectionResetError, EOFError):
                        n = 0
                    while (rec := self._reader.pop()) is not None:
                        if rec[0].get("op") == "close":
                            close_fds(rec[1])
                            self.peer_closed = True
                        elif rec[0].get("op") == REFUSE and rec[0].get("epoch") == 0:
                            close_fds(rec[1])
                            raise refusal_error(rec[0], "the connection")
                        else:
                            self._inbox.append(rec)
                            queued += 1
                    if n == 0:
                        self.ended = True
                        break
            except (ProtocolError, PermissionDenied) as e:
                self._error = e
                self.ended = True
                raise
        return queued

    @property
    def has_records(self) -> bool:
        """Whether records read earlier wait in the inbox."""
        return bool(self._inbox)

    def take(self) -> Record | None:
        """The oldest record read and not yet taken (its fds are now the caller's), or None."""
        with self._read_lock:
            return self._inbox.popleft() if self._inbox else None

    def next(self, timeout: float | None) -> Record:
        """The next record, waiting up to ``timeout`` seconds for all of it (one deadline, not
        one per read): ``Timeout``; ``ProtocolError`` if the channel ends first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            self.poll()
            rec = self.take()
            if rec is not None:
                return rec
            if self.ended or self.peer_closed:
                raise ProtocolError("the setup channel closed before a record arrived")
            ms = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout("the other side of the setup channel did not answer in time")
                ms = int(left * 1000) + 1
            poller.poll(ms)

    def peer_state(self) -> str | None:
        """None while the peer lives; "closed" once its close notice came; "died" when the
        stream ended without one. Reads what has arrived first (and tells ``on_records``)."""
        if self.poll() and self.on_records is not None:
            self.on_records()
        if self.peer_closed:
            return "closed"
        return "died" if self.ended else None

    # ------------------------------------------------------------------------ the end
    def close(self) -> None:
        with self._read_lock:
            self._drop()

    def forget(self) -> None:
        """Drop this process's copy without telling the peer (after fork, in the child: no
        lock is taken, since a thread of the parent may have held one when it forked)."""
        self._drop()

    def _drop(self) -> None:
        self._reader.close()
        for _, fds in self._inbox:
            close_fds(fds)
        self._inbox.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
