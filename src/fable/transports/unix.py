"""unix: a Unix domain stream socket pair. Two copies, kernel wake-ups, pollable, one host."""

from __future__ import annotations

import socket
from typing import Any

from fable._wire import close_fds
from fable.errors import ProtocolError
from fable.transports.base import Capabilities, DataPath, EndSpec, TransportInfo
from fable.transports.channel import SetupChannel
from fable.transports.stream import StreamPath


def adopt_socket(spec: EndSpec, family: int) -> socket.socket:
    """Turn the one fd of ``spec`` into a socket of ``family``, or fail with ProtocolError."""
    if len(spec.fds) != 1:
        close_fds(spec.fds)
        raise ProtocolError(f"expected 1 fd for a socket transport, got {len(spec.fds)}")
    try:
        sock = socket.socket(fileno=spec.fds[0])
    except OSError:
        close_fds(spec.fds)
        raise ProtocolError("the fd passed for a socket transport is not a socket") from None
    if sock.family != family or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise ProtocolError("the fd passed for a socket transport is the wrong kind of socket")
    return sock


def _create(options: dict[str, Any]) -> tuple[EndSpec, EndSpec]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return EndSpec([a.detach()], {}), EndSpec([b.detach()], {})


def _open(spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0) -> DataPath:
    return StreamPath("unix", setup, sock=adopt_socket(spec, socket.AF_UNIX), epoch=epoch)


INFO = TransportInfo(
    name="unix",
    caps=Capabilities(
        copies_unsafe=None,
        copies_safe=2,
        wait="kernel",
        pollable=True,
        cross_host=False,
        spins=False,
    ),
    summary="Unix domain socket in stream mode",
    create=_create,
    open=_open,
)
