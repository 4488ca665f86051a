"""Named endpoints: ``fable.register(name)`` -> Context; ``listen`` / ``accept``; ``connect``.

The daemon rendezvous the two ends and hands each a setup channel; the connecting side creates
the transport the daemon named and sends the listener its share (``connection.initiate``),
exactly as ``open_pair`` does between a parent and a child. After that the daemon is not on the
data path: it only hears each process's counters, once a second.

Trust is per reading side (DESIGN.md §2): a side reads "unsafe" (zero-copy views) only if it
passed ``trusted=True``. The daemon picks each end's form within that end's trust; each end
checks the offer against its own trust and the transport the daemon chose for it
(``fable/handshake.py``), so neither the peer nor the daemon can make its reads unsafe.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from fable.client import link
from fable.config import settings
from fable.connection import Connection, PendingEnd, initiate
from fable.errors import (
    ConnectionClosed,
    DaemonUnavailable,
    FableError,
    PeerDied,
    Timeout,
    WouldBlock,
)
from fable.nameservice import check_name
from fable.topology import thread_placement
from fable.transports.across import admit, join

__all__ = ["Context", "Listener", "PlainStream", "register"]


def register(name: str, *, timeout: float | None = 10.0) -> Context:
    """Register ``name`` with the daemon (starting one if none runs) and return its Context.

    Raises ``InvalidName``, ``NameInUse`` (registered already), ``PermissionDenied`` (another
    user's name), ``DaemonUnavailable``. The name is released by ``Context.close()`` or when
    this process exits."""
    bare = check_name(name)
    lk = link()
    entry = lk.add_name(bare)
    try:
        lk.request("register", wait=timeout, name=bare, **thread_placement())
    except BaseException:
        lk.drop_name(bare)
        raise
    entry.registered = True
    return Context(bare)


class Context:
    """A registered name. Several per process are fine; one thread per call at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._closed = False

    def listen(
        self,
        *,
        trusted: bool = False,
        allow_uids: list[int] | None = None,
        allow_remote: bool = False,
        allow_hosts: list[str] | None = None,
    ) -> Listener:
        """Accept connections to this name. ``trusted``: this side may read peers' memory in
        place (zero-copy) when they trust too. ``allow_uids``: other users of this host that
        may connect (this user and root always may). ``allow_remote``: processes on every other
        host of the daemon's cluster may connect; ``allow_hosts``: those on these hosts (ids)
        may. Without either, a connect from another host gets ``PermissionDenied`` (a uid of
        another host means nothing here: the daemons vouch for hosts, not users)."""
        self._check()
        lk = link()
        entry = lk.names[self.name]
        allow = None if allow_uids is None else sorted({int(u) for u in allow_uids})
        hosts = None if allow_hosts is None else sorted({str(h) for h in allow_hosts})
        lk.request(
            "listen",
            name=self.name,
            trusted=bool(trusted),
            allow_uids=allow,
            allow_remote=bool(allow_remote),
            allow_hosts=hosts,
        )
        entry.listening, entry.trusted, entry.allow_uids = True, bool(trusted), allow
        entry.allow_remote, entry.allow_hosts = bool(allow_remote), hosts
        return Listener(self)

    def connect(
        self,
        to: str,
        *,
        trusted: bool = False,
        transport: str | None = None,
        timeout: float | None = 5.0,
        pollable: bool = False,
        msg_size: int | None = None,
        mode: str | None = None,
    ) -> Connection | PlainStream:
        """Connect to the endpoint named ``to`` (``"xio://bob"`` or ``"bob"``), or to a program
        outside fable (``"tcp://host:port"``, ``"unix:///path"``: a :class:`PlainStream`).

        Waits up to ``timeout`` for ``to`` to listen (``Timeout``); ``NameNotFound`` if nobody
        registered it, ``PermissionDenied`` if its owner does not allow this user. ``transport``
        forces one (a REGISTRY name); ``pollable``, ``msg_size`` and ``mode`` ("latency" or
        "throughput") are hints for the daemon's choice.

        A name on another host of the daemon's cluster is reached there: the two daemons
        arrange it, over ``tcp`` or ``tcp-nodelay``; ``PermissionDenied`` if that listener does
        not take connections from this host, ``Timeout`` if that host does not answer."""
        self._check()
        if to.startswith(("tcp://", "unix://")):
            return PlainStream.open(to, timeout)
        target = check_name(to)
        if mode not in (None, "latency", "throughput"):
            raise ValueError("mode is 'latency', 'throughput' or None")
        wait = None if timeout is None else timeout + 5.0
        reply, fd = link().request(
            "connect",
            wait=wait,
            name=self.name,
            to=target,
            trusted=bool(trusted),
            transport=transport,
            timeout=timeout,
            pollable=bool(pollable),
            msg_size=msg_size,
            mode=mode,
        )
        remote = reply.get("remote")
        across = None
        if isinstance(remote, dict):  # on another host: reach its process as arranged
            if fd is not None:
                os.close(fd)
            sock, across = join(remote, settings().peer_timeout_s if timeout is None else timeout)
        elif fd is None:
            raise FableError("the daemon answered connect without a setup channel")
        else:
            sock = socket.socket(fileno=fd)
        opts = reply["options"]
        conn = initiate(
            sock,
            opts["transport"],
            safe=opts["safe"],
            peer_safe=opts.get("peer_safe"),
            trusted=bool(trusted),
            forced=bool(opts.get("forced", True)),
            across=across,
        )
        link().add_flow(reply["flow"], 0, conn, str(reply.get("token", "")))
        return conn

    def close(self) -> None:
        """Unregister the name (connections made through it stay open)."""
        if self._closed:
            return
        self._closed = True
        lk = link()
        lk.drop_name(self.name)
        try:
            lk.request("unregister", name=self.name)
        except FableError:
            pass  # the daemon is gone or forgot us: the name is not registered either way

    def _check(self) -> None:
        if self._closed:
            raise FableError(f"context {self.name!r} is closed")

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fable.Context {self.name!r}{' closed' if self._closed else ''}>"


class Listener:
    """Connections to a Context's name, in arrival order."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def accept(self, timeout: float | None = None) -> Connection:
        """The next connection (``timeout=None`` waits forever, ``0`` raises ``WouldBlock``,
        else ``Timeout``). Survives a daemon restart: the name is registered again and the
        wait goes on."""
        import queue

        entry = link().names.get(self.ctx.name)
        if entry is None:
            raise FableError(f"context {self.ctx.name!r} is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if entry.lost:  # the daemon was stopped on purpose, or restarted and the name
                # could not be registered again
                if entry.lost_error is DaemonUnavailable:
                    raise DaemonUnavailable(f"{self.ctx.name!r}: {entry.lost}")
                raise entry.lost_error(
                    f"{self.ctx.name!r} could not be registered again after the daemon "
                    f"restarted: {entry.lost}"
                )
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    item = entry.incoming.get_nowait()
                else:
                    item = entry.incoming.get(timeout=left)
            except queue.Empty:
                if timeout == 0:
                    raise WouldBlock("no connection is waiting") from None
                raise Timeout(f"no connection to {self.ctx.name!r} in {timeout:g} s") from None
            if item is None:
                continue  # look at entry.lost
            msg, sock = item
            options = msg.get("options", {})
            forced = bool(options.get("forced", True))
            remote = msg.get("remote")
            try:
                across = None
                if isinstance(remote, dict):  # from another host: the caller with its token
                    sock, across = admit(sock, remote, settings().setup_timeout_s)
                conn = PendingEnd(sock, across).open(
                    timeout=settings().setup_timeout_s,
                    trusted=entry.trusted,
                    forced=forced,
                    expect=str(options.get("transport")),
                )
            except FableError:
                continue  # the connecting process died during the setup, or offered what
                # this side does not accept: wait for the next
            link().add_flow(msg["flow"], 1, conn, str(msg.get("token", "")))
            return conn


class PlainStream:
    """A raw byte stream to a program outside fable (``tcp://host:port``, ``unix:///path``):
    no message boundaries, no framing, no reconfiguration; ``Context.connect`` returns one.
    ``recv`` returns what has arrived (at most ``max_bytes``); the peer's close is
    ``ConnectionClosed``, a reset ``PeerDied``."""

    def __init__(self, sock: socket.socket, url: str) -> None:
        self._sock = sock
        self.url = url
        self.transport = url.split(":", 1)[0]

    @classmethod
    def open(cls, url: str, timeout: float | None) -> PlainStream:
        if url.startswith("unix://"):
            path = url[len("unix://") :]
            if not path.startswith("/"):
                raise ValueError(f"{url!r}: a unix:// URL names an absolute path (unix:///run/x)")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            target: Any = path
        else:
            rest = url[len("tcp://") :]
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit() or not host or int(port) > 65535:
                raise ValueError(f"{url!r}: a tcp:// URL is tcp://host:port")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = (host, int(port))
        sock.settimeout(timeout)
        try:
            sock.connect(target)
        except TimeoutError:
            sock.close()
            raise Timeout(f"{url}: no answer in {timeout:g} s") from None
        except OSError as e:
            sock.close()
            raise ConnectionClosed(f"{url}: {e.strerror or e}") from None
        sock.settimeout(None)
        return cls(sock, url)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._sock.sendall(data, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise PeerDied(f"{self.url}: {e.strerror}") from None

    def recv(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(max_bytes)
        except TimeoutError:
            raise Timeout(f"{self.url}: nothing arrived in {timeout:g} s") from None
        except ConnectionResetError as e:
            raise PeerDied(f"{self.url}: {e.strerror}") from None
        finally:
            if self._sock.fileno() >= 0:
                self._sock.settimeout(None)
        if not data:
            raise ConnectionClosed(f"{self.url}: the peer closed the stream")
        return data

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PlainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
