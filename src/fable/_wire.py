"""One framed codec for every control channel: the setup channel between the two sides of a
connection (``transports/channel.py``) and the link between a process and ``fabled``
(``client.py``, ``daemon/server.py``). Each of the two is a :class:`Codec` with its own version
and frame limit; the framing is the same:

    +--------------------+-----------------------------------------------+
    | length (u32, big-  | JSON object, UTF-8, at most ``max_frame`` B;  |  + fds (SCM_RIGHTS)
    | endian, body only) | ``"v"``: the protocol's version               |    on its first byte
    +--------------------+-----------------------------------------------+

Reading never goes past the end of the frame being read, so fds that come with a frame are
that frame's (the kernel attaches them to the first byte of the ``sendmsg`` that sent them, and
one frame is one ``sendmsg``). Everything read is checked: a length over the limit, a body that
is not a JSON object (or nests past the parser's recursion limit), the wrong version, too many
fds are a ``ProtocolError``; a frame cut short
by the end of the stream is ``EOFError``. A reader owns the fds it received until it hands them
out with a frame, and closes them if it fails or is closed first.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fable.errors import ProtocolError, Timeout

__all__ = ["HEADER", "MAX_FDS", "Codec", "FrameReader", "close_fds", "recv_frame"]

HEADER = struct.Struct(">I")
MAX_FDS = 8  # the most fds one frame may carry


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring the ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(frozen=True)
class Codec:
    """One control protocol over the frame format: its name (for errors), version and limit."""

    name: str
    version: int
    max_frame: int = 64 * 1024

    def encode(self, obj: dict[str, Any]) -> bytes:
        """A frame holding ``obj`` (with ``"v"`` added); ValueError if it is over the limit."""
        body = json.dumps({"v": self.version, **obj}, separators=(",", ":")).encode()
        if len(body) > self.max_frame:
            raise ValueError(f"{self.name} frame of {len(body)} B is over {self.max_frame} B")
        return HEADER.pack(len(body)) + body

    def length(self, head: bytes) -> int:
        """The body length a header announces; ``ProtocolError`` past the limit."""
        (n,) = HEADER.unpack(head)
        if n > self.max_frame:
            raise ProtocolError(f"{self.name} frame of {n} B announced; at most {self.max_frame}")
        return int(n)

    def decode(self, body: bytes) -> dict[str, Any]:
        """A body's JSON object, checked for the version; ``ProtocolError`` otherwise. Its
        depth is bounded by the parser's (the interpreter's recursion limit): a deeper body is
        a ``RecursionError`` there, caught here like any other malformed JSON."""
        try:
            obj = json.loads(body.decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ProtocolError(f"{self.name} frame is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.name} frame is not a JSON object")
        if obj.get("v") != self.version:
            raise ProtocolError(
                f"{self.name} protocol version {obj.get('v')!r}, this side speaks "
                f"{self.version} (both sides must come from the same fable version)"
            )
        return obj


class FrameReader:
    """Frames from a stream socket, read as they arrive (blocking or not), with their fds.

    ``read_from(sock)`` reads once, at most to the end of the current frame; ``pop()`` returns
    the next whole frame and its fds, or None."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._buf = bytearray()
        self._need = HEADER.size  # bytes still missing from the header, then from the body
        self._body = -1  # the body's length once the header is in
        self._fds: list[int] = []
        self._done: list[tuple[dict[str, Any], list[int]]] = []

    @property
    def partial(self) -> bool:
        """Whether part of a frame has been read (the peer is in the middle of one)."""
        return bool(self._buf) or self._body >= 0

    def read_from(self, sock: socket.socket, flags: int = 0) -> int:
        """One read of what the current frame still needs: the bytes read (0 at the end of the
        stream). ``BlockingIOError`` when nothing is there (non-blocking socket or
        ``MSG_DONTWAIT``)."""
        data, fds, mflags = _recv_fds(sock, self._need, flags)
        self._fds.extend(fds)
        if mflags & socket.MSG_CTRUNC:
            self.close()
            raise ProtocolError(f"too many fds (over {MAX_FDS}) with one {self.codec.name} frame")
        if len(self._fds) > MAX_FDS:
            self.close()
            raise ProtocolError(f"too many fds (over {MAX_FDS}) with one {self.codec.name} frame")
        if data:
            self._feed(data)
        elif self.partial or self._fds:
            self.close()
            raise EOFError(f"the {self.codec.name} channel ended in the middle of a frame")
        return len(data)

    def _feed(self, data: bytes) -> None:
        self._buf += data
        self._need -= len(data)
        if self._need:
            return
        if self._body < 0:
            try:
                self._body = self._need = self.codec.length(bytes(self._buf))
            except ProtocolError:
                self.close()
                raise
            self._buf.clear()
            if self._need:
                return
        body, fds = bytes(self._buf), self._fds
        self._buf.clear()
        self._fds = []
        self._body, self._need = -1, HEADER.size
        try:
            self._done.append((self.codec.decode(body), fds))
        except ProtocolError:
            close_fds(fds)
            self.close()
            raise

    def pop(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next whole frame and the fds that came with it (now the caller's), or None."""
        return self._done.pop(0) if self._done else None

    def close(self) -> None:
        """Close every fd received and not handed out."""
        close_fds(self._fds)
        self._fds = []
        for _, fds in self._done:
            close_fds(fds)
        self._done.clear()


_CMSG_ROOM = socket.CMSG_SPACE(MAX_FDS * 4)


def _recv_fds(sock: socket.socket, n: int, flags: int) -> tuple[bytes, list[int], int]:
    """``recvmsg`` with fds, close-on-exec. (``socket.recv_fds`` of Python 3.11 drops its
    ``flags`` argument, so a non-blocking read and ``MSG_CMSG_CLOEXEC`` need this.)"""
    data, anc, mflags, _ = sock.recvmsg(n, _CMSG_ROOM, flags | socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), mflags


def recv_frame(
    sock: socket.socket, reader: FrameReader, deadline: float | None
) -> tuple[dict[str, Any], list[int]]:
    """The next whole frame, waiting until the monotonic ``deadline`` (None: no limit) for all
    of it (one deadline for the frame, not per read): ``Timeout`` when it passes, ``EOFError``
    when the stream ends first."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        got = reader.pop()
        if got is not None:
            return got
        ms = None
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"no whole {reader.codec.name} frame arrived in time")
            ms = int(left * 1000) + 1
        poller.poll(ms)
        try:
            n = reader.read_from(sock, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        if n == 0:
            raise EOFError(f"the {reader.codec.name} channel ended")
