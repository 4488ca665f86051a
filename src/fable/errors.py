"""The error vocabulary of fable: every error the library raises is one of these.

One small hierarchy, reused by every layer (API, transports, daemon, CLI):

    FableError
    ├── NameNotFound          no endpoint registered under that name
    ├── NameInUse             the name is registered already
    ├── InvalidName           the name breaks the naming rules
    ├── PermissionDenied      the caller's uid may not do this
    ├── WouldBlock            (also BlockingIOError) timeout=0 and the call would have to wait
    ├── Timeout               (also TimeoutError) the timeout expired; nothing was lost
    ├── NoSpace               the application holds too many read buffers; release some
    ├── DeadBuffer            a Buffer was used after commit / release / abort
    ├── ConnectionClosed      (also ConnectionError) the peer closed cleanly
    │   └── PeerDied          the peer vanished without closing (killed, crashed)
    ├── ProtocolError         malformed input from a peer or the daemon
    └── DaemonUnavailable     the name service cannot be reached or started
"""

from __future__ import annotations

__all__ = [
    "ConnectionClosed",
    "DaemonUnavailable",
    "DeadBuffer",
    "FableError",
    "InvalidName",
    "NameInUse",
    "NameNotFound",
    "NoSpace",
    "PeerDied",
    "PermissionDenied",
    "ProtocolError",
    "Timeout",
    "WouldBlock",
]


class FableError(Exception):
    """Base class of every error fable raises."""


class NameNotFound(FableError):
    """No endpoint is registered under the name."""


class NameInUse(FableError):
    """The name is already registered (by this or another process)."""


class InvalidName(FableError, ValueError):
    """The name breaks the naming rules (DESIGN.md §2: segments of [A-Za-z0-9][A-Za-z0-9._-]*)."""


class PermissionDenied(FableError, PermissionError):
    """The caller's uid is not allowed to do this."""


class WouldBlock(FableError, BlockingIOError):
    """The call was asked not to wait (timeout=0) and would have had to."""


class Timeout(FableError, TimeoutError):
    """The timeout expired before the call could complete; no data was lost or consumed."""


class NoSpace(FableError):
    """The application holds too many read buffers: release some before asking for more.

    Copy the data of held buffers into private memory and release them early to make room
    (the paper's ENOSPACE)."""


class DeadBuffer(FableError):
    """A Buffer was touched after it was committed, released or aborted (buffers are single-use)."""


class ConnectionClosed(FableError, ConnectionError):
    """The peer closed the connection cleanly (or this side closed it), after all its messages
    were delivered."""


class PeerDied(ConnectionClosed):
    """The peer vanished without closing: killed, crashed, or its end was lost.

    Every complete message it committed before dying has been delivered first."""


class ProtocolError(FableError):
    """Malformed, out-of-order or hostile input from a peer or the daemon.

    Only the connection that received it fails; the process and its other connections go on."""


class DaemonUnavailable(FableError):
    """The name service daemon cannot be reached or started."""
