"""How the two processes of a bench point get connected: the :class:`Link` contract, the
:class:`Channel` the measuring loops use, and fable's own links (a REGISTRY transport through
``open_pair``, the ``auto`` row through a daemon). The peers' links are in ``peers.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

__all__ = ["AutoLink", "Channel", "FableLink", "Link", "Point"]


@dataclass(frozen=True)
class Point:
    transport: str  # a REGISTRY name, "floor" or "peer:NAME"
    safe: bool
    mode: str  # "latency" | "throughput"
    size: int
    cpus: tuple[int, int]
    api: str = "msg"  # "msg": send/recv; "batch": send_many/recv_many; "buffer": the buffer API


class Channel(Protocol):
    """What the measuring loops use of a connection (a fable ``Connection`` is one; the
    ``batch`` and ``buffer`` APIs also use its ``recv_many`` and buffer methods)."""

    def send(self, data: bytes, /) -> None: ...
    def send_many(self, msgs: Sequence[bytes], /) -> Any: ...
    def recv(self) -> bytes: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class Link(Protocol):
    """How the two processes of a point get connected. The driver makes the link; ``setup``
    runs in worker A before B is forked; then ``end(0)`` runs in A and ``end(1)`` in B, each
    returning its side's channel. ``cleanup`` runs in the driver once both processes are gone
    (killed or not): it removes what a library leaves behind its processes."""

    def setup(self, point: Point) -> None: ...
    def end(self, side: int) -> Channel: ...
    def cleanup(self) -> None: ...


class FableLink:
    """A REGISTRY transport, connected by ``open_pair`` (no daemon)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def setup(self, point: Point) -> None:
        from fable import open_pair

        self._conn, self._pending = open_pair(self.name, safe=point.safe)

    def end(self, side: int) -> Channel:
        if side == 0:
            self._pending.close()
            return cast(Channel, self._conn)
        return cast(Channel, self._pending.open())

    def cleanup(self) -> None:
        pass  # fable's memory and fds go with the processes


class AutoLink:
    """The ``auto`` row: both processes are pinned first, then register with the daemon
    (``FABLE_SOCKET``) and connect through it; the daemon's policy picks the transport, told the
    point's size and mode. A listens (in ``setup``), B connects."""

    def setup(self, point: Point) -> None:
        import fable

        self.point = point
        self.ctx = fable.register(f"bench/{os.getpid()}/a")
        self.listener = self.ctx.listen(trusted=not point.safe)

    def end(self, side: int) -> Channel:
        import fable

        if side == 0:
            return cast(Channel, self.listener.accept(timeout=30))
        a = os.getppid()  # B is A's child
        ctx = fable.register(f"bench/{a}/b")
        p = self.point
        conn = ctx.connect(
            f"bench/{a}/a", trusted=not p.safe, msg_size=p.size, mode=p.mode, timeout=30
        )
        return cast(Channel, conn)

    def cleanup(self) -> None:
        pass  # the names go with the processes
