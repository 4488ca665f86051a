"""The setup channel: records between the two sides of one connection, for its whole life.

It is an already-connected stream socket: AF_UNIX on a host, TCP between hosts (then records
carry no fds, and ``across`` holds what that needs: ``fable/transports/across.py``). Records
are frames of the one codec of ``fable._wire`` (``SETUP``: a u32 big-endian length, a JSON
object with ``"v": SETUP_VERSION``, fds attached by SCM_RIGHTS to its first byte). What
travels on it:

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

Sending never blocks either: the peer shares the socket's open file description (it may clear
``O_NONBLOCK``), so every send is a ``sendmsg`` with ``MSG_DONTWAIT``. What the kernel does not
take waits in an outgoing queue (``flush`` pushes it; ``on_backlog`` tells the control thread to
watch for room), bounded by ``MAX_BACKLOG`` bytes: an honest peer's control thread reads its
channel all the time, so a peer that lets that much pile up does not read it, and the channel
fails with ``ProtocolError`` (this connection is lost; the control thread, which answers for
every connection of the process, never waits on it).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fable._wire import Codec, FrameReader, close_fds
from fable.errors import FableError, PermissionDenied, ProtocolError, Timeout

if TYPE_CHECKING:
    from fable.transports.across import Across

__all__ = ["MAX_BACKLOG", "REFUSE", "SETUP", "SETUP_VERSION", "SetupChannel", "refusal_error"]

SETUP_VERSION = 3  # 3: offers carry "yours" (a form per reading side); REFUSE at epoch 0
SETUP = Codec("setup", SETUP_VERSION)

Record = tuple[dict[str, Any], list[int]]

# bytes of records the peer has not taken (beyond the socket's own buffer) before the channel
# fails: a switch is a handful of records of a few hundred bytes each
MAX_BACKLOG = 256 * 1024
# records read and not yet handled past which ``poll`` stops reading (the rest stays in the
# socket until the inbox is taken): a peer sends no faster than this side handles its records
INBOX_MAX = 64
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL

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

    def __init__(self, sock: socket.socket, across: Across | None = None) -> None:
        families = (socket.AF_UNIX,) if across is None else (socket.AF_INET, socket.AF_INET6)
        if sock.type != socket.SOCK_STREAM or sock.family not in families:
            raise ProtocolError(
                "the setup channel must be an AF_UNIX stream socket (TCP between hosts)"
            )
        self.across = across  # between hosts: the peer's data listener and ours
        sock.setblocking(True)
        self._sock: socket.socket | None = sock
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._reader = FrameReader(SETUP)
        self._inbox: deque[Record] = deque()
        self._error: ProtocolError | PermissionDenied | None = None
        # what the kernel has not taken yet: (the rest of a frame, our copies of its fds)
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._out_bytes = 0
        # called (on the sending thread) with True when records start to wait in the queue,
        # with False once ``flush`` emptied it: the control thread watches for room meanwhile
        self.on_backlog: Callable[[bool], None] | None = None
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
        """Send one record (``fds`` attached; they stay the caller's), never waiting: what the
        kernel does not take now is queued (module docstring). ``ProtocolError`` once the
        peer let ``MAX_BACKLOG`` bytes pile up (the channel is failed for every reader)."""
        if fds and self.across is not None:
            raise ProtocolError("a setup channel between hosts carries no fds")
        frame = memoryview(SETUP.encode(record))
        with self._send_lock:
            if self._error is not None:
                raise self._error
            sock = self.sock
            if not self._out:
                sent = self._push(sock, frame, fds)
                if sent == len(frame):
                    return
                if sent:
                    fds = ()  # they went with the first byte
                frame = frame[sent:]
            if self._out_bytes + len(frame) > MAX_BACKLOG:
                raise self._broken(
                    ProtocolError(
                        f"the peer does not read its setup channel ({self._out_bytes} bytes "
                        "of records wait for it)"
                    )
                )
            self._out.append((frame, [os.dup(fd) for fd in fds]))
            self._out_bytes += len(frame)
            started = len(self._out) == 1
        if started and self.on_backlog is not None:
            self.on_backlog(True)

    def _push(self, sock: socket.socket, data: memoryview, fds: list[int] | tuple[int, ...]) -> int:
        """One non-blocking sendmsg: the bytes the kernel took (0: none; a broken socket also
        takes everything: the reader side finds out that the peer is gone)."""
        try:
            if fds:
                return socket.send_fds(sock, [data], list(fds), _SEND_FLAGS)
            return sock.send(data, _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return len(data)

    def flush(self) -> bool:
        """Push queued records without waiting; True once none is left."""
        with self._send_lock:
            sock = self._sock
            while self._out:
                data, fds = self._out[0]
                sent = len(data) if sock is None else self._push(sock, data, fds)
                if sent and fds:
                    close_fds(fds)
                    fds = []
                self._out_bytes -= sent
                if sent < len(data):
                    self._out[0] = (data[sent:], fds)
                    return False
                self._out.popleft()
        if self.on_backlog is not None:
            self.on_backlog(False)
        return True

    @property
    def backlog(self) -> int:
        """Bytes of records queued for the peer."""
        return self._out_bytes

    def _broken(self, e: ProtocolError) -> ProtocolError:
        if self._error is None:
            self._error = e
        return e

    def say_close(self) -> None:
        """Tell the peer this side is closing cleanly (best effort)."""
        try:
            self.send({"op": "close"})
        except (OSError, FableError):
            pass

    # ------------------------------------------------------------------------ reading
    def poll(self) -> int:
        """Read what has arrived, without waiting (until INBOX_MAX records wait in the inbox):
        records go to the inbox (returns how many), a close notice sets ``peer_closed``, the
        end of the stream ``ended``.
        ``ProtocolError`` on malformed input (now and at every later call)."""
        queued = 0
        if self._out:
            self.flush()
        with self._read_lock:
            if self._error is not None:
                raise self._error
            sock = self._sock
            if sock is None or self.ended:
                return 0
            try:
                while len(self._inbox) < INBOX_MAX:
                    try:
                        n = self._reader.read_from(sock, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        break
                    except (ConnectionResetError, ConnectionAbortedError, TimeoutError, EOFError):
                        n = 0  # (TimeoutError: ETIMEDOUT, a TCP peer that stopped answering)
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
        fd = self.sock.fileno()
        while True:
            self.poll()
            poller.register(fd, select.POLLIN | (select.POLLOUT if self._out else 0))
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

    def settled_state(self, grace: float) -> str | None:
        """``peer_state``, waiting up to ``grace`` seconds while it is None: for a data path
        that found its peer gone, whose reason (a close notice, or the end of the stream when
        the process died) is on its way here."""
        state = self.peer_state()
        if state is None and grace > 0 and self._sock is not None:
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
            deadline = time.monotonic() + grace
            while state is None and (left := deadline - time.monotonic()) > 0:
                poller.poll(int(left * 1000) + 1)
                state = self.peer_state()
        return state

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
        if self._out:
            self.flush()  # the last records (a close notice) get one more chance, no wait
        with self._send_lock, self._read_lock:
            self._drop()

    def forget(self) -> None:
        """Drop this process's copy without telling the peer (after fork, in the child: no
        lock is taken, since a thread of the parent may have held one when it forked)."""
        self._drop()

    def _drop(self) -> None:
        self._reader.close()
        for _, fds in self._out:
            close_fds(fds)
        self._out.clear()
        self._out_bytes = 0
        for _, fds in self._inbox:
            close_fds(fds)
        self._inbox.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.across is not None:
            self.across.close()
