"""The daemon's half of ``fable run``: it pairs the two ends of a loopback TCP connection
between two programs run under ``fable run`` with a unix socketpair, for the LD_PRELOAD
library (``src/fable/_shim/shim.c``), which swaps the ends in with ``dup3``.

Three ops, each one frame with one socket fd attached. Everything is checked on that fd with
the kernel (its type, addresses, inode, network namespace); what a process says is never
believed, so a process can pair only the sockets it holds:

- ``port_listen`` + a listening TCP socket on a loopback or wildcard address: the listener is
  registered by its inode (a registration lives exactly as long as the kernel lists that
  listener; closing it in any process that shares it ends it).
- ``port_connect`` + an unconnected TCP socket, ``host``/``port``: where it is about to
  connect. If every TCP listener that could take the connection is a registered one, the
  daemon binds the socket to a loopback port if it has none (a pair is known by its source
  address), makes a socketpair, keeps one end (and the TCP socket, to see what became of its
  connect) under that address, and replies ``{"pair": true}`` with the other end. Otherwise
  ``{"pair": false}``: the program stays on TCP. The process connects over TCP after the
  reply, so the pair is known before the listener can accept.
- ``port_accept`` + a TCP socket a registered listener accepted: the pair waiting under its
  peer's address, if that peer is the very socket that connected to it (both addresses and the
  namespace match), is handed out: ``{"pair": true}`` + the kept end; else ``{"pair": false}``.

And ``port_resolve`` (no fd), ``lookup``: a name: ``{"found": bool, "ports": [...]}``, whether
a program run with ``fable run --name NAME`` listens here (the library resolves ``NAME.fable``
to the loopback address with it).

A pair whose TCP connect failed (the socket is closed and never connected), or whose listener
is gone, is dropped by the sweep (``Ports.sweep``). A paired connection is a flow
(``reconfigurable: false``: an unmodified program holds one kernel fd, nothing can move it) that
lives while either unix socket exists (``/proc/net/unix``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from fable.errors import FableError, PermissionDenied

__all__ = ["Ports", "listeners", "unix_inodes"]

log = logging.getLogger("fable.daemon")

MAX_PENDING_PER_UID = 1024  # pairs one uid may have waiting for their listener's accept
CONNECT_GRACE_S = 2.0  # a pair whose TCP socket has not connected after this is dropped
_SO_NETNS_COOKIE = 71  # Linux 5.14+
_TCP_LISTEN, _TCP_CLOSE = 10, 7

# sock_diag (netlink): the TCP listeners of this network namespace
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 4, 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI48s")  # inet_diag_req_v2: family, protocol, ext, pad, states, id
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def listeners(port: int) -> list[tuple[_IP, int]]:
    """(address, inode) of every TCP socket listening on ``port`` in this network namespace,
    both families (the kernel's own list, through sock_diag)."""
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            req = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN, b"")
            flags = _NLM_F_REQUEST | _NLM_F_DUMP
            nl.send(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, flags, 1, 0) + req)
            done = False
            while not done:
                data = nl.recv(65536)
                off = 0
                while off + _NLMSG.size <= len(data):
                    length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
                    if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < _NLMSG.size:
                        done = True
                        break
                    msg = _MSG.unpack_from(data, off + _NLMSG.size)
                    fam, sport, src, inode = msg[0], msg[4], msg[6], msg[14]
                    if int.from_bytes(sport, "big") == port:
                        raw = src[:4] if fam == socket.AF_INET else src
                        out.append((ipaddress.ip_address(raw), inode))
                    off += (length + 3) & ~3
    return out


def unix_inodes() -> set[int]:
    """The inodes of every unix socket of this network namespace (``/proc/net/unix``)."""
    out = set()
    with open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 7:
                out.add(int(parts[6]))
    return out


def _addr(sa: Any) -> tuple[str, int]:
    """A socket address as (address, port), an IPv4-mapped IPv6 address as the IPv4 one."""
    ip = ipaddress.ip_address(sa[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(sa[1])


def _reaches(listener: _IP, dest: _IP) -> bool:
    """Whether a TCP listener on address ``listener`` may take a connect to ``dest`` (an IPv4
    address for IPv4-mapped ones too): its own address, or a wildcard of the family that can
    carry it (an IPv6 wildcard takes IPv4 unless it is V6ONLY: counted, to be safe)."""
    if isinstance(listener, ipaddress.IPv4Address):
        return dest.version == 4 and (listener.is_unspecified or listener == dest)
    if listener.is_unspecified:
        return True
    return listener == dest or (dest.version == 4 and listener.ipv4_mapped == dest)


def _bind_loopback(sock: socket.socket, dest: _IP) -> tuple[str, int]:
    """Bind an unbound socket about to connect to the loopback ``dest`` to a loopback port of
    its family (what its connect would have chosen); its address."""
    if sock.family == socket.AF_INET:
        host = "127.0.0.1"
    else:
        host = "::ffff:127.0.0.1" if dest.version == 4 else "::1"
    try:
        sock.bind((host, 0))
    except OSError as e:
        raise FableError(f"port_connect: no loopback port to bind: {e}") from None
    return _addr(sock.getsockname())


def _netns(sock: socket.socket) -> int | None:
    """The socket's network namespace cookie (None: the kernel cannot say)."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return None


def _tcp_socket(fd: int, what: str) -> socket.socket:
    """The fd as a socket object (it owns the fd now), checked to be a TCP socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise FableError(f"{what}: the fd sent is not a socket") from None
    if (
        sock.family not in (socket.AF_INET, socket.AF_INET6)
        or sock.type != socket.SOCK_STREAM
        or sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_TCP
    ):
        sock.close()
        raise FableError(f"{what}: the fd sent is not a TCP socket")
    return sock


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


@dataclass
class Pending:
    """A pair waiting for its listener to accept: the connecting TCP socket and the unix end
    the accepting side will get."""

    tcp: socket.socket
    end: socket.socket
    to: tuple[str, int]
    uid: int
    pid: int
    name: str
    since: float = field(default_factory=time.monotonic)
    inode: int = 0  # the connecting side's unix end

    def close(self) -> None:
        self.tcp.close()
        self.end.close()


@dataclass
class Listener:
    port: int
    uid: int
    pid: int
    name: str


class Ports:
    """What the daemon holds for ``fable run``: registered listeners, waiting pairs, and the
    unix socket inodes of each paired flow. ``new_flow(ends, reason, uids)`` makes the
    registry's flow and returns its id; ``drop_flow(id)`` forgets it; ``room(uid)``: whether
    that uid may have one more flow (a connection that would be one too many stays TCP)."""

    def __init__(self, new_flow: Any, drop_flow: Any, room: Any) -> None:
        self.registered: dict[int, Listener] = {}  # listener inode ->
        self.pending: dict[tuple[str, int], Pending] = {}  # connecting socket's address ->
        self.flows: dict[int, tuple[int, int]] = {}  # flow id -> its unix sockets' inodes
        self._new_flow = new_flow
        self._drop_flow = drop_flow
        self._room = room
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            self.netns = _netns(s)

    # ------------------------------------------------------------------------------- ops
    def listen(self, uid: int, pid: int, name: str, fd: int) -> dict[str, Any]:
        with _tcp_socket(fd, "port_listen") as sock:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise FableError("port_listen: the socket sent is not listening")
            if _netns(sock) != self.netns:
                raise FableError("port_listen: the socket is in another network namespace")
            address, port = _addr(sock.getsockname())
            ip = ipaddress.ip_address(address)
            if not (ip.is_loopback or ip.is_unspecified):
                raise FableError(f"port_listen: {address} is neither loopback nor a wildcard")
            self.registered[os.fstat(sock.fileno()).st_ino] = Listener(port, uid, pid, name)
        log.info("port %d: %s (pid %d, uid %d) listens under fable run", port, name, pid, uid)
        return {"port": port}

    def _registered(self, host: str, port: int) -> list[Listener]:
        """The listeners a connect to host:port can reach, if every one is registered (else
        none: a listener outside fable would get a connection it cannot read)."""
        dest = ipaddress.ip_address(host)
        found = [inode for ip, inode in listeners(port) if _reaches(ip, dest)]
        if not all(i in self.registered for i in found):
            return []
        return [self.registered[i] for i in found]

    def connect(
        self, uid: int, pid: int, name: str, req: dict[str, Any], fd: int
    ) -> tuple[dict[str, Any], int | None]:
        host, port = req.get("host"), req.get("port")
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(_tcp_socket(fd, "port_connect"))
            try:
                dest = ipaddress.ip_address(host) if isinstance(host, str) else None
            except ValueError:
                dest = None
            if isinstance(dest, ipaddress.IPv6Address) and dest.ipv4_mapped is not None:
                dest = dest.ipv4_mapped
            if dest is None or not dest.is_loopback or not isinstance(port, int):
                raise FableError("port_connect: host is a loopback address and port a number")
            if not 0 < port < 65536:
                raise FableError(f"port_connect: no port {port}")
            try:
                sock.getpeername()
                raise FableError("port_connect: the socket is connected already")
            except OSError:
                pass
            here = _addr(sock.getsockname())
            if here[1] and not ipaddress.ip_address(here[0]).is_loopback:
                raise FableError("port_connect: the socket is bound to a non-loopback address")
            if _netns(sock) != self.netns:
                return {"pair": False}, None
            reach = self._registered(str(dest), port)
            if not reach or not all(self._room(u) for u in {uid} | {r.uid for r in reach}):
                return {"pair": False}, None
            if sum(1 for p in self.pending.values() if p.uid == uid) >= MAX_PENDING_PER_UID:
                raise PermissionDenied(
                    f"uid {uid} has {MAX_PENDING_PER_UID} connections waiting for an accept"
                )
            if not here[1]:  # a pair is known by its source address: give it one now
                here = _bind_loopback(sock, dest)
            old = self.pending.pop(here, None)
            if old is not None:  # that source address connected before and was never accepted
                old.close()
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            stack.pop_all()
        pending = Pending(sock, theirs, _addr((str(dest), port)), uid, pid, name)
        pending.inode = os.fstat(mine.fileno()).st_ino
        self.pending[here] = pending
        return {"pair": True}, mine.detach()

    def accept(self, uid: int, pid: int, name: str, fd: int) -> tuple[dict[str, Any], int | None]:
        with _tcp_socket(fd, "port_accept") as sock:
            try:
                peer, here = _addr(sock.getpeername()), _addr(sock.getsockname())
            except OSError:
                return {"pair": False}, None
            p = self.pending.get(peer)
            if p is None:
                return {"pair": False}, None
            try:  # the socket that connected from there must be the accepted one's peer
                same = _addr(p.tcp.getpeername()) == here == p.to and _netns(sock) == _netns(p.tcp)
            except OSError:
                same = False
            if not same:
                return {"pair": False}, None
            del self.pending[peer]
            ends = (p.name, f"port/{here[1]}")
            reason = (
                f"fable run: a loopback TCP connection from {p.name} (pid {p.pid}) to port "
                f"{here[1]} of {name} (pid {pid}), both under fable run, carried by a unix "
                "socket; not reconfigurable (each program holds one kernel fd)"
            )
            fid = self._new_flow(ends, reason, {p.uid, uid})
            self.flows[fid] = (p.inode, os.fstat(p.end.fileno()).st_ino)
            p.tcp.close()
            return {"pair": True, "flow": fid}, p.end.detach()

    def resolve(self, name: str) -> dict[str, Any]:
        """``NAME.fable`` (the library's getaddrinfo): whether a fable-run program of that name
        listens here now, and on which ports."""
        ports = sorted(
            {
                r.port
                for inode, r in self.registered.items()
                if r.name == name and inode in {i for _, i in listeners(r.port)}
            }
        )
        return {"found": bool(ports), "ports": ports}

    # ----------------------------------------------------------------------------- sweep
    def sweep(self) -> None:
        """Drop the pairs that will never be accepted and the flows whose sockets are gone."""
        now = time.monotonic()
        ports = {p.to[1] for p in self.pending.values()}
        live_ports: set[int] = set()
        live_listeners: set[int] = set()
        for port in ports | {r.port for r in self.registered.values()}:
            for _, inode in listeners(port):
                live_listeners.add(inode)
                if inode in self.registered:
                    live_ports.add(port)
        for inode in [i for i in self.registered if i not in live_listeners]:
            del self.registered[inode]
        for key, p in list(self.pending.items()):
            try:
                never = now - p.since > CONNECT_GRACE_S and _tcp_state(p.tcp) == _TCP_CLOSE
            except OSError:
                never = True
            if never or p.to[1] not in live_ports:
                why = "its TCP connect failed" if never else "no listener of fable run's"
                log.info("port %d: dropped %s's pair (pid %d): %s", p.to[1], p.name, p.pid, why)
                del self.pending[key]
                p.close()
        if self.flows:
            alive = unix_inodes()
            for fid, (a, b) in list(self.flows.items()):
                if a not in alive and b not in alive:
                    del self.flows[fid]
                    self._drop_flow(fid)

    def close(self) -> None:
        for p in self.pending.values():
            p.close()
        self.pending.clear()
