"""The name service's contract, shared by both sides: endpoint names, the control protocol
between a process's library (``client.py``) and ``fabled`` (``daemon/``), and where the
daemon's socket lives. It sits below both, so that neither imports the other.

Frames, both ways, over an AF_UNIX stream socket, in the one framed codec of ``fable._wire``
(a u32 big-endian length, then a JSON object of at most 64 KiB; fds only daemon -> client).

Every object has ``"v": PROTOCOL_VERSION``. A client's first frame is ``hello``; then requests,
each with an ``"id"`` (int) and an ``"op"``; the daemon answers each with the same ``"id"`` and
``"ok": true`` plus results, or ``"ok": false, "error": <class name in fable.errors>,
"message": <text>``. Unsolicited frames from the daemon have no ``"id"`` and an ``"op"``
(``incoming``: a connection for a listener, with its setup channel attached).

  op           request fields                                  reply fields
  -----------  ----------------------------------------------  ---------------------------
  hello        pid, lib                                        daemon, host, system
  register     name, affinity, cpu, node                       endpoint
  unregister   name                                            -
  listen       name, trusted, allow_uids (list | null)         -
  connect      name, to, trusted, transport, pollable,         flow, token, options (+ the
               msg_size, mode, timeout                         setup channel fd)
  report       flows: [{id, ends, transport, safe, epoch,      -
               msgs, bytes, reason, last_switch, pollable,
               token}],
               endpoints: [{name, affinity, cpu, node}]
  explain      a, b, trusted, pollable, msg_size, mode         source, ranking
  reconfigure  flow, transport (null: back to the triggers),   flow
               safe
  ls           -                                               endpoints
  flows        -                                               flows
  stop         -                                               -

  pushed by the daemon (no id)
  incoming     listener, flow, token, options (+ the setup channel fd): a connection to
               accept (``token``: the flow's secret, which the reports of its ends hold)
  reconfigure  flow, transport, safe, reason: switch this flow (operator or trigger)

The daemon accepts no fds: any a client attaches are closed unread.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
from pathlib import Path

from fable._wire import Codec
from fable.errors import DaemonUnavailable, FableError, InvalidName

__all__ = [
    "CONTROL",
    "PROTOCOL_VERSION",
    "SYSTEM_SOCKET",
    "UnsafeDirectory",
    "UntrustedDaemon",
    "check_daemon_dir",
    "check_daemon_peer",
    "check_name",
    "error_class",
    "private_dir",
    "user_socket",
]

PROTOCOL_VERSION = 1
CONTROL = Codec("control", PROTOCOL_VERSION)  # the frames between a library and fabled
SYSTEM_SOCKET = Path("/run/fable/fabled.sock")

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def check_name(name: object) -> str:
    """``name`` if it is a valid endpoint name (DESIGN.md §2), else ``InvalidName``; accepts
    ``xio://name`` too."""
    if not isinstance(name, str):
        raise InvalidName(f"a name is a string, not {type(name).__name__}")
    bare = name.removeprefix("xio://")
    if not bare or len(bare.encode()) > 255:
        raise InvalidName(f"name {name!r}: 1 to 255 bytes")
    for seg in bare.split("/"):
        if not _SEGMENT.match(seg):
            raise InvalidName(
                f"name {name!r}: each '/'-separated part starts with a letter or digit and has "
                "at most 64 of A-Z a-z 0-9 . _ -"
            )
    return bare


def error_class(name: object) -> type[FableError]:
    """The fable error a reply's ``error`` field names (FableError for anything unknown)."""
    import fable.errors as errors

    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, FableError):
        return cls
    return FableError


def user_socket() -> Path:
    """The per-user socket path: $XDG_RUNTIME_DIR/fable/fabled.sock, else /tmp/fable-$UID/."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "fable" if xdg else Path(f"/tmp/fable-{os.getuid()}")
    return base / "fabled.sock"


class UnsafeDirectory(FableError):
    """A directory for the daemon's socket or state is not this user's private one: nothing
    is started there until the operator fixes it."""


def private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory of this user, or check that it is one (another
    user's or a group/world-writable directory could hand us someone else's daemon);
    ``UnsafeDirectory`` otherwise."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as e:
        raise UnsafeDirectory(f"cannot use {path}: {e}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UnsafeDirectory(
            f"{path} must be a directory owned by uid {os.getuid()} with mode 0700 "
            f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
        )
    return path


class UntrustedDaemon(DaemonUnavailable):
    """Something answers on the daemon's socket, but this user may not trust it (another user
    could have put it there, or runs it): no request goes to it."""


def check_daemon_dir(path: Path) -> None:
    """Before connecting to a daemon on ``path``: nobody but this user or root can have put a
    socket there. Its directory must belong to this user or to root and be writable by its
    owner only (``/tmp/fable-$UID`` is a name another user can create first; a directory of
    root's, like the system daemon's, only root can fill). ``UntrustedDaemon`` naming what was
    found (``DaemonUnavailable`` when there is no directory)."""
    d = path.parent
    try:
        st = d.lstat()
    except OSError as e:
        raise DaemonUnavailable(f"no daemon on {path}: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.getuid(), 0) or mode & 0o022:
        raise UntrustedDaemon(
            f"refusing the daemon socket {path}: its directory {d} belongs to uid {st.st_uid} "
            f"with mode {mode:o} (it must be uid {os.getuid()}'s or root's, writable by its "
            "owner only: another user may have made it)"
        )


_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def check_daemon_peer(sock: socket.socket, path: Path) -> None:
    """After connecting: the daemon's process (``SO_PEERCRED``, what the kernel says, not what
    the peer claims) runs as this user or as root; ``UntrustedDaemon`` naming the uid and pid
    found otherwise."""
    pid, uid, _ = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    if uid not in (os.getuid(), 0):
        raise UntrustedDaemon(
            f"refusing the daemon on {path}: it runs as uid {uid} (pid {pid}), neither this "
            f"user (uid {os.getuid()}) nor root"
        )
