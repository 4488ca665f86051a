"""Buffer: a single-owner view of transport memory, valid until it is handed back.

Legal call order (write buffers):  getwritebuf -> fill .data -> (commit | abort) -> dead
Legal call order (read buffers):   getreadbuf -> read .data -> release -> dead

A Buffer belongs to exactly one connection and is used once: after ``commit``, ``abort`` or
``release`` its ``data`` raises :class:`fable.DeadBuffer`, and it can never be handed back twice.
Between trusted peers this ownership is advisory (a memoryview taken from ``data`` before the
hand-back still points at transport memory; do not keep one). ``epoch`` names the transport
generation the buffer came from (reconfiguration); ``more`` on a read buffer says that further
fragments of the same message follow.

``Buffer`` is the C core's type (``fable._core.Buffer``, made by the rings' buffer fast path
without calling into Python); :class:`PyBuffer` is the reference it follows, used when the C
core is not built. Both keep this contract, checked over both by the tests.
"""

from __future__ import annotations

from typing import Any

from fable.errors import DeadBuffer

__all__ = ["Buffer", "PyBuffer"]


class PyBuffer:
    """A fragment of a message: ``data`` (a memoryview), ``more``, ``epoch``, ``writable``."""

    __slots__ = ("_data", "_owner", "_token", "epoch", "more", "writable")

    def __init__(
        self, data: memoryview, owner: object, token: Any, *, more: bool, epoch: int, writable: bool
    ) -> None:
        self._data: memoryview | None = data
        self._owner = owner
        self._token = token
        self.more = more
        self.epoch = epoch
        self.writable = writable

    @property
    def owner(self) -> object:
        """The data path that handed the buffer out (one epoch of one connection)."""
        return self._owner

    @property
    def data(self) -> memoryview:
        """The buffer's memory: writable for write buffers, read-only for read buffers."""
        data = self._data
        if data is None:
            raise DeadBuffer("buffer was already committed, released or aborted")
        return data

    @property
    def alive(self) -> bool:
        """True until the buffer is committed, released or aborted."""
        return self._data is not None

    def __len__(self) -> int:
        return len(self.data)

    def _take(self, owner: object) -> Any:
        """Hand the buffer back to its owner (used by transports); returns its token."""
        data = self._data
        if data is None:
            raise DeadBuffer("buffer was already committed, released or aborted")
        if owner is not self._owner:
            raise DeadBuffer("buffer belongs to another connection")
        self._data = None
        return self._token

    def __repr__(self) -> str:
        state = f"{len(self._data)} B" if self._data is not None else "dead"
        kind = "write" if self.writable else "read"
        return f"<fable.Buffer {kind} {state} epoch={self.epoch} more={self.more}>"


try:
    from fable._core import Buffer
except ImportError:  # pragma: no cover - the package warns at import when the core is missing
    Buffer = PyBuffer  # type: ignore[misc,assignment]
