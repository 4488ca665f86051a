"""tcp and tcp-nodelay: a TCP connection (the second with Nagle off), on a host or between two.

On a host both ends are made by the initiating side (listen on 127.0.0.1:0, connect, accept)
and one is passed over the setup channel, so nothing but loopback is ever touched. Between
hosts (``create_across``) the offering side dials the peer's data listener with a fresh token
and the offer carries only that token; the answering side takes the connection that holds it
(``fable/transports/across.py``).
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from fable.config import settings
from fable.errors import ProtocolError
from fable.transports.across import Across
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


def _create_across(across: Across, options: dict[str, Any]) -> tuple[EndSpec, EndSpec]:
    sock, token = across.dial(_wait())
    return EndSpec([sock.detach()], {}), EndSpec([], {"token": token})


def _wait() -> float:
    """How long dialing the peer for a data connection between hosts may take:
    FABLE_PEER_TIMEOUT, at most FABLE_SETUP_TIMEOUT."""
    cfg = settings()
    return min(cfg.peer_timeout_s, cfg.setup_timeout_s)


def _opener(name: str, nodelay: bool) -> Any:
    def _open(
        spec: EndSpec, role: int, safe: bool, setup: SetupChannel, epoch: int = 0
    ) -> DataPath:
        if setup.across is None:
            sock = adopt_socket(spec, socket.AF_INET)
        elif role == 1:  # between hosts, the answering side: the connection the peer dialed
            if spec.fds:
                raise ProtocolError("an offer between hosts came with fds")
            sock = setup.across.take(spec.params.get("token"))
        else:
            sock = adopt_socket(spec, setup.sock.family)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        return StreamPath(name, setup, sock=sock, epoch=epoch)

    return _open


_CAPS = Capabilities(
    copies_unsafe=None, copies_safe=2, wait="kernel", pollable=True, cross_host=True, spins=False
)
_CAPS_NAGLE = dataclasses.replace(_CAPS, delays_small=True)

INFO = TransportInfo(
    name="tcp",
    caps=_CAPS_NAGLE,
    summary="TCP (loopback, or between hosts), Nagle's algorithm on",
    create=_create,
    open=_opener("tcp", nodelay=False),
    create_across=_create_across,
)
INFO_NODELAY = TransportInfo(
    name="tcp-nodelay",
    caps=_CAPS,
    summary="TCP (loopback, or between hosts) with TCP_NODELAY",
    create=_create,
    open=_opener("tcp-nodelay", nodelay=True),
    create_across=_create_across,
)
