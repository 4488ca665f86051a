"""The setup channel, and ``open_pair``: two processes connected without a daemon.

The setup channel is an already-connected AF_UNIX stream socket between the two sides of a
connection. It carries records in the framed codec of ``fable._wire`` (a u32 big-endian length,
a JSON object with ``"v": SETUP_VERSION``, fds attached by SCM_RIGHTS to its first byte).

It lives as long as the connection: the hello that sets a transport up, and later
reconfiguration requests and acknowledgements, travel on it; a side that closes cleanly says so
on it (``{"op": "close"}``) before its data-path fds go, so the other side can tell a clean close
from a death. Everything read from it is checked: a malformed record is a ``ProtocolError``.

``open_pair(name)`` makes a connection whose other end is not open yet: the caller keeps the
returned :class:`Connection` and gives the :class:`PendingEnd` to a child, which calls
``open()`` after ``fork()`` or, after a spawn that passed ``pending.fileno()`` along,
``fable.transports.attach(fd)``. The parent then closes its copy of the PendingEnd.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from fable._wire import HEADER, Codec, FrameReader, close_fds, recv_frame, send_frame
from fable.errors import FableError, ProtocolError, Timeout
from fable.transports.base import EndSpec

__all__ = [
    "SETUP",
    "SETUP_VERSION",
    "PendingEnd",
    "SetupChannel",
    "attach",
    "initiate",
    "open_pair",
]

SETUP_VERSION = 2
SETUP = Codec("setup", SETUP_VERSION)
MAX_RECORD = SETUP.max_frame
_LEN = HEADER


class SetupChannel:
    """Length-prefixed JSON records with attached fds over a connected AF_UNIX socket."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ProtocolError("the setup channel must be an AF_UNIX stream socket")
        sock.setblocking(True)
        self._sock: socket.socket | None = sock

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise FableError("setup channel is closed")
        return self._sock

    def send(self, record: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        send_frame(self.sock, SETUP.encode(record), fds)

    def recv(self, timeout: float | None) -> tuple[dict[str, Any], list[int]]:
        """The next record and the fds that came with it (closed for you if this raises)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reader = FrameReader(SETUP)
        try:
            return recv_frame(self.sock, reader, deadline)
        except Timeout:
            reader.close()
            raise Timeout("the other side of the setup channel did not answer in time") from None
        except EOFError:
            raise ProtocolError("the setup channel closed before a record arrived") from None

    def say_close(self) -> None:
        """Tell the peer this side is closing cleanly (best effort)."""
        try:
            self.send({"op": "close"})
        except (OSError, FableError):
            pass

    def peer_said_close(self) -> bool:
        """Whether the peer's close notice waits on the channel (peeks; consumes nothing)."""
        if self._sock is None:
            return False
        try:
            data = self._sock.recv(MAX_RECORD, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return False
        pos = 0
        while pos + _LEN.size <= len(data):
            (length,) = _LEN.unpack_from(data, pos)
            body = data[pos + _LEN.size : pos + _LEN.size + length]
            if len(body) < length:
                break
            try:
                if json.loads(body).get("op") == "close":
                    return True
            except (ValueError, AttributeError):
                return False
            pos += _LEN.size + length
        return False

    def peek_op(self) -> str | None:
        """The op of the first record waiting (consumes nothing): "" when no whole record is
        there yet, None when the peer is gone (end of stream)."""
        if self._sock is None:
            return None
        try:
            data = self._sock.recv(MAX_RECORD + _LEN.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return ""
        except OSError:
            return None
        if not data:
            return None
        if len(data) < _LEN.size:
            return ""
        (length,) = _LEN.unpack_from(data, 0)
        if length > MAX_RECORD:
            return "?"  # recv() will fail it with a ProtocolError
        body = data[_LEN.size : _LEN.size + length]
        if len(body) < length:
            return ""
        try:
            op = json.loads(body).get("op")
        except (ValueError, AttributeError):
            return "?"
        return op if isinstance(op, str) else "?"

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def forget(self) -> None:
        """Drop this process's copy without telling the peer (after fork, in the child)."""
        self.close()


def _open_end(ch: SetupChannel, timeout: float | None) -> Any:
    from fable.connection import Connection
    from fable.transports import REGISTRY

    record, fds = ch.recv(timeout)
    try:
        if record.get("op") != "hello":
            raise ProtocolError(f"expected a hello on the setup channel, got {record.get('op')!r}")
        name = record.get("transport")
        info = REGISTRY.get(name) if isinstance(name, str) else None
        if info is None:
            raise ProtocolError(f"the peer asked for an unknown transport {name!r}")
        safe = record.get("safe")
        params = record.get("params")
        if not isinstance(safe, bool) or not isinstance(params, dict):
            raise ProtocolError("malformed hello on the setup channel")
        why = info.no_form(safe)
        if why is not None:
            raise ProtocolError(why)
    except BaseException:
        close_fds(fds)
        raise
    path = info.open(EndSpec(fds, params), 1, safe, ch, 0)
    return Connection(path, ch, role=1)


class PendingEnd:
    """The not-yet-opened other end of an ``open_pair`` connection (hand it to a child)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    def fileno(self) -> int:
        """The setup channel fd, to pass to a spawned child (``pass_fds``), then ``attach(fd)``."""
        if self._sock is None:
            raise FableError("this PendingEnd was already opened or closed")
        return self._sock.fileno()

    def open(self, timeout: float | None = 10.0) -> Any:
        """Open this end (in the child) and return its :class:`fable.Connection`."""
        if self._sock is None:
            raise FableError("this PendingEnd was already opened or closed")
        sock, self._sock = self._sock, None
        ch = SetupChannel(sock)
        try:
            return _open_end(ch, timeout)
        except BaseException:
            ch.close()
            raise

    def close(self) -> None:
        """Drop this process's copy (the parent, once the child has its own)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> PendingEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(fd: int, timeout: float | None = 10.0) -> Any:
    """Open the end of an ``open_pair`` connection whose setup channel fd this process inherited."""
    return PendingEnd(socket.socket(fileno=fd)).open(timeout)


def _check_form(name: str, safe: bool | None) -> tuple[Any, bool]:
    from fable.transports import REGISTRY

    info = REGISTRY.get(name)
    if info is None:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(REGISTRY)}")
    forms = info.caps.forms
    if safe is None:
        safe = forms[0]
    why = info.no_form(safe)
    if why is not None:
        raise ValueError(why)
    return info, safe


def initiate(
    sock: socket.socket,
    name: str,
    *,
    safe: bool | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Set transport ``name`` up over the setup channel ``sock`` (this side creates it and sends
    the peer its share in a hello) and return this side's Connection; the peer opens its end
    with ``PendingEnd(sock).open()`` or ``attach(fd)``. Takes ``sock`` over, closing it on
    failure. Raises ValueError for an unknown transport or a form it does not have."""
    from fable.connection import Connection

    try:
        info, safe = _check_form(name, safe)
        ch = SetupChannel(sock)
    except BaseException:
        sock.close()
        raise
    try:
        local, remote = info.create(dict(options or {}))
        try:
            ch.send(
                {"op": "hello", "transport": name, "safe": safe, "params": remote.params},
                remote.fds,
            )
        finally:
            close_fds(remote.fds)
        path = info.open(local, 0, safe, ch, 0)
    except BaseException:
        ch.close()
        raise
    return Connection(path, ch, role=0)


def open_pair(
    name: str, *, safe: bool | None = None, options: dict[str, Any] | None = None
) -> tuple[Any, PendingEnd]:
    """A connection over transport ``name``: this side's Connection, and the other end to hand on.

    ``safe``: whether the readers get private copies (default: the transport's safe form when it
    has one). Raises ValueError for an unknown transport or a form it does not have.
    """
    _check_form(name, safe)
    s0, s1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn = initiate(s0, name, safe=safe, options=options)
    except BaseException:
        s1.close()
        raise
    return conn, PendingEnd(s1)
