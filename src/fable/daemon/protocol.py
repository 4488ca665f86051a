"""The control protocol between a process's library and ``fabled``; names; socket paths.

Frames, both ways, over an AF_UNIX stream socket:

    +-----------------+---------------------------------------------+
    | length (u32 BE) | JSON object, UTF-8, at most MAX_FRAME bytes |  + one fd (SCM_RIGHTS),
    +-----------------+---------------------------------------------+    daemon -> client only

Every object has ``"v": PROTOCOL_VERSION``. A client's first frame is ``hello``; then requests,
each with an ``"id"`` (int) and an ``"op"``; the daemon answers each with the same ``"id"`` and
``"ok": true`` plus results, or ``"ok": false, "error": <class name in fable.errors>,
"message": <text>``. Unsolicited frames from the daemon have no ``"id"`` and an ``"op"``
(``incoming``: a connection for a listener, with its setup channel attached).

  op          request fields                                   reply fields
  ----------  -----------------------------------------------  ---------------------------
  hello       pid, lib                                         daemon, host, system
  register    name, affinity, cpu, node                        endpoint
  unregister  name                                             -
  listen      name, trusted, allow_uids (list | null)          -
  connect     name, to, trusted, transport, pollable,          flow (+ the setup channel fd)
              msg_size, mode, timeout
  report      flows: [{id, ends, transport, safe, epoch,       -
              msgs, bytes, reason, role}], endpoints:
              [{name, affinity, cpu, node}]
  ls          -                                                endpoints
  flows       -                                                flows
  stop        -                                                -

The daemon reads frames with plain ``recv``: fds a client attaches are dropped by the kernel.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

from fable.errors import FableError, InvalidName, ProtocolError

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "SYSTEM_SOCKET",
    "check_name",
    "decode",
    "encode",
    "error_class",
    "user_socket",
]

PROTOCOL_VERSION = 1
MAX_FRAME = 64 * 1024
HEADER = struct.Struct(">I")
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


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps({"v": PROTOCOL_VERSION, **obj}, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"control frame of {len(body)} B is over {MAX_FRAME} B")
    return HEADER.pack(len(body)) + body


def frame_length(head: bytes) -> int:
    """The body length a frame header announces; ``ProtocolError`` past MAX_FRAME."""
    (n,) = HEADER.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"control frame of {n} B announced; at most {MAX_FRAME} B")
    return int(n)


def decode(body: bytes) -> dict[str, Any]:
    """A frame's JSON object, checked for the version; ``ProtocolError`` otherwise."""
    try:
        obj = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"control frame is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame is not a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"control protocol version {obj.get('v')!r}, this side speaks {PROTOCOL_VERSION}: "
            "library and daemon come from different fable versions (restart the daemon)"
        )
    return obj


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


def private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory of this user, or check that it is one (another
    user's or a group/world-writable directory could hand us someone else's daemon)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as e:
        raise FableError(f"cannot use {path}: {e}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise FableError(
            f"{path} must be a directory owned by uid {os.getuid()} with mode 0700 "
            f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
        )
    return path
