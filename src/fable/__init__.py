"""fable: reconfigurable I/O channels between processes.

The core is the transport table (``fable.transports.REGISTRY``): each mechanism, from TCP to
shared-memory rings driven by the C core ``fable._core``, moves framed messages between two
processes behind one contract, ``DataPath``. Above it, a ``Connection`` binds its per-message
methods straight to the transport, and ``xpoll``/asyncio wait on connections and fds together.
Public: ``register`` (a named endpoint, through the name service ``fabled``: ``Context.listen``,
``Listener.accept``, ``Context.connect``), ``Connection``, ``Buffer``, the errors, ``open_pair``
(two processes, no daemon), ``xpoll``, ``fable.xio`` (the paper's names) and ``fable.testing``.
"""

from __future__ import annotations

import logging
import sys

if not sys.platform.startswith("linux"):  # pragma: no cover
    raise ImportError("fable needs Linux (memfd, futex, SCM_RIGHTS, /proc)")

from fable.buffer import Buffer
from fable.connection import Connection, PendingEnd, attach, open_pair
from fable.endpoint import Context, Listener, PlainStream, register
from fable.errors import (
    ConnectionClosed,
    DaemonUnavailable,
    DeadBuffer,
    FableError,
    InvalidName,
    NameInUse,
    NameNotFound,
    NoSpace,
    PeerDied,
    PermissionDenied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from fable.poll import xpoll
from fable.transports import REGISTRY
from fable.transports.base import ConnectionStats
from fable.version import __version__

logging.getLogger("fable").addHandler(logging.NullHandler())

try:
    from fable import _core as _core
except ImportError as _e:  # pragma: no cover - a broken build
    import warnings

    warnings.warn(
        f"fable's C core did not load ({_e}); the shared-memory fast path is unavailable. "
        "Reinstall with a C compiler present.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "REGISTRY",
    "Buffer",
    "Connection",
    "ConnectionClosed",
    "ConnectionStats",
    "Context",
    "DaemonUnavailable",
    "DeadBuffer",
    "FableError",
    "InvalidName",
    "Listener",
    "NameInUse",
    "NameNotFound",
    "NoSpace",
    "PeerDied",
    "PendingEnd",
    "PermissionDenied",
    "PlainStream",
    "ProtocolError",
    "Timeout",
    "WouldBlock",
    "__version__",
    "attach",
    "open_pair",
    "register",
    "xpoll",
]
