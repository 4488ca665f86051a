"""tcp and tcp-nodelay: a TCP connection over loopback (the second with Nagle off).

Both ends are made by the initiating side (listen on 127.0.0.1:0, connect, accept) and one is
passed over the setup channel, so nothing but loopback is ever touched. Across hosts (later) the
same data path runs over a connection the two hosts make themselves.
"""

from __future__ import annotations

import socket
from typing import Any

from fable.transports.base import Capabilities, DataPath, EndSpec, TransportInfo
from fable.transports.channel import SetupChannel
from fable.transports.stream import StreamPath
from fable.transports.unix import adopt_socket


def _create(options: dict[str, Any]) -> tuple[EndSpec, EndSpec]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    return EndSpec([a.detach()], {}), EndSpec([b.detach()], {})


def _opener(name: str, nodelay: bool) -> Any:
    def _open(
        spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0
    ) -> DataPath:
        sock = adopt_socket(spec, socket.AF_INET)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        return StreamPath(name, setup, sock=sock, epoch=epoch)

    return _open


_CAPS = Capabilities(
    copies_unsafe=None, copies_safe=2, wait="kernel", pollable=True, cross_host=True, spins=False
)

INFO = TransportInfo(
    name="tcp",
    caps=_CAPS,
    summary="TCP over loopback, Nagle's algorithm on",
    create=_create,
    open=_opener("tcp", nodelay=False),
)
INFO_NODELAY = TransportInfo(
    name="tcp-nodelay",
    caps=_CAPS,
    summary="TCP over loopback with TCP_NODELAY",
    create=_create,
    open=_opener("tcp-nodelay", nodelay=True),
)
