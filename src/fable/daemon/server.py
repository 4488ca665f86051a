"""``fabled``: the name service, one asyncio loop over an AF_UNIX listening socket.

It registers names, rendezvous a ``connect`` with a listener and hands both a fresh setup channel
(a socketpair; the daemon keeps no end of it, so it is never on the data path), and keeps the
flows the libraries report. Every client is read with a size limit and a checked decoder; a
client that sends garbage gets an error reply or is disconnected, and nobody else notices.

Against a flood (another local user on the system daemon): connections are limited per uid
and in all (a ``bye`` frame names the limit), names and flows per uid; a watchdog closes
clients that say no hello, stop in the middle of a frame, or go idle; out of fds, the accept
loop backs off and goes on; a failing request is answered, never the end of its client;
listings are paged. Another user's endpoints show no pid or placement, their flows not at all.
What the registry holds is saved next to the socket so that the next daemon reserves it
(``registry.py``). Every refusal is a log line with its uid (``setup_logging``: rotated).

With ``--cluster zk://.../ROOT`` it is one host of a cluster (``cluster.py``): its endpoints are
published in ZooKeeper, a register claims its name across hosts, ``ls`` can list every host's.
With ``--listen ADDR:PORT`` too, it arranges connections between hosts with the other daemons
(``link.py``): a connect to a name on another host asks that host's daemon, and the two
processes then meet over TCP (``fable/transports/across.py``); neither daemon is on that path.

Run it with ``fable daemon`` (foreground) or let ``fable.register`` start it (``client.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import itertools
import json
import logging
import logging.handlers
import os
import re
import resource
import signal
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fable._wire import FrameReader, close_fds
from fable.config import HOST_ID, settings
from fable.daemon.cluster import ClusterTier, parse_url
from fable.daemon.link import LinkServer, ask
from fable.daemon.ports import Ports
from fable.daemon.registry import Endpoint, Flow, Registry
from fable.daemon.triggers import FlowFacts, FlowState, decide, note_asked
from fable.errors import (
    DaemonUnavailable,
    FableError,
    NameInUse,
    NameNotFound,
    PermissionDenied,
    ProtocolError,
    Timeout,
)
from fable.nameservice import CONTROL, SYSTEM_SOCKET, check_name, private_dir, user_socket
from fable.transports.across import new_token

__all__ = ["Daemon", "host_id", "serve", "setup_logging"]

log = logging.getLogger("fable.daemon")

_SEND_TIMEOUT_S = 5.0
MAX_CONNECTING = 64  # connects one client may have waiting for a listener at once
_TAKES_FD = frozenset({"port_listen", "port_connect", "port_accept"})  # fable run's (ports.py)
_PROGRAM = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")  # a fable-run program's name
_ACCEPT_BACKOFF_S = (0.02, 0.25)  # out of fds: wait this long before accepting again, doubling
LOG_BYTES, LOG_BACKUPS = 1 << 20, 3  # the daemon log rotates at 1 MiB and keeps 3 old files


def setup_logging(path: Path | None) -> None:
    """The daemon's log: to ``path`` (rotated: LOG_BYTES, LOG_BACKUPS), or stderr if None."""
    fmt = logging.Formatter("%(asctime)s fabled %(process)d %(levelname)s %(message)s")
    if path is None:
        handler: logging.Handler = logging.StreamHandler()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS
        )
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    log.setLevel(logging.INFO)  # (FABLE_LOG_LEVEL is the library's, in the processes it serves)


def host_id() -> str:
    """This host's id: ``FABLE_HOST_ID`` when set (test hosts in network namespaces share
    ``/etc/machine-id``), else the machine id, else the host name."""
    if settings().host_id:
        return settings().host_id
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return socket.gethostname()


def _hosts(v: Any) -> tuple[str, str]:
    """A reported flow's two hosts (("", "") when not two host ids)."""
    if (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(h, str) and HOST_ID.fullmatch(h) for h in v)
    ):
        return (v[0], v[1])
    return ("", "")


class _BadRequest(FableError):
    """A request whose fields are missing or of the wrong type (answered, not fatal)."""


def _field(
    req: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    v = req.get(name, default)
    if v is ...:
        raise _BadRequest(f"{req.get('op')}: missing field {name!r}")
    if (v is not default and not isinstance(v, kind)) or (isinstance(v, bool) and kind is int):
        raise _BadRequest(f"{req.get('op')}: field {name!r} has the wrong type")
    return v


def _int_list(v: Any, what: str) -> list[int]:
    if (
        not isinstance(v, list)
        or len(v) > 4096
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31 for x in v)
    ):
        raise _BadRequest(f"{what} must be a list of small non-negative ints")
    return v


def _last_switch(v: Any) -> dict[str, Any] | None:
    """A reported last_switch, checked: {at: number, from/to/reason: str} or None."""
    if not isinstance(v, dict):
        return None
    at = v.get("at")
    fields = [v.get(k) for k in ("from", "to", "reason")]
    if not isinstance(at, (int, float)) or not all(isinstance(x, str) for x in fields):
        raise _BadRequest("report: malformed last_switch")
    return {
        "at": float(at),
        "from": str(fields[0])[:64],
        "to": str(fields[1])[:64],
        "reason": str(fields[2])[:500],
    }


# A page of a listing fills a reply frame up to this many bytes (the rest of the 64 KiB limit
# is room for the reply's other fields); an item larger than that (an endpoint with thousands
# of CPUs in its affinity, at most ~46 KB) comes alone
PAGE_BYTES = 48 * 1024


def _page(key: str, rows: Iterable[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """The first rows (sort key, item) that fit PAGE_BYTES (at least one) as ``{key: items,
    "more": whether rows are left, "next": the key to ask for the page after}``."""
    items: list[dict[str, Any]] = []
    size, last = 0, None
    for k, item in rows:
        n = len(json.dumps(item, separators=(",", ":")))
        if items and size + n > PAGE_BYTES:
            return {key: items, "more": True, "next": last}
        items.append(item)
        size += n
        last = k
    return {key: items, "more": False}


class Client:
    """One library connection: its socket, credentials, and a lock that keeps frames whole."""

    _ids = itertools.count(1)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.id = next(self._ids)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.lock = asyncio.Lock()
        self.closed = False
        self.reader = FrameReader(CONTROL)
        # for the watchdog (Daemon._watchdog): when it connected, said hello, sent its last
        # whole frame, began the frame it is in the middle of (None: not in one)
        self.since = self.last = time.monotonic()
        self.helloed = False
        self.partial_since: float | None = None
        self.reported: set[int] = set()  # flow ids of the report in parts being received
        self.connecting = 0  # its connects waiting in the daemon (at most MAX_CONNECTING)

    def kick(self, why: str) -> None:
        """End this client's connection (its loop sees the end of the stream and cleans up)."""
        if not self.closed:
            log.warning("closing client %d (uid %d, pid %d): %s", self.id, self.uid, self.pid, why)
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    async def send(self, obj: dict[str, Any], fd: int | None = None) -> None:
        """Send one frame (with ``fd`` attached); a client that does not read for
        _SEND_TIMEOUT_S is disconnected."""
        data = CONTROL.encode(obj)
        fds = [fd] if fd is not None else []
        loop = asyncio.get_running_loop()
        async with self.lock:
            deadline = time.monotonic() + _SEND_TIMEOUT_S
            while data:
                if self.closed:
                    raise ConnectionError("client gone")
                try:
                    n = socket.send_fds(self.sock, [data], fds, socket.MSG_NOSIGNAL)
                    data, fds = data[n:], []
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        # part of a frame may be out: nothing more can be sent on this stream
                        self.kick("it does not read its replies")
                        raise ConnectionError("client does not read its replies") from None
                    fut = loop.create_future()
                    loop.add_writer(self.sock, fut.set_result, None)
                    try:
                        await asyncio.wait_for(fut, left)
                    except TimeoutError:
                        pass
                    finally:
                        loop.remove_writer(self.sock)


class Daemon:
    def __init__(
        self, path: Path, *, system: bool = False, cluster: str = "", listen: str = ""
    ) -> None:
        self.path = path
        self.system = system
        self.registry = Registry()
        self._tickets = itertools.count(1)  # one per `fable reconfigure` request
        self._remote_ids = itertools.count(1)  # our flows between hosts: flow_base() + n
        self.host = host_id()
        self.cluster: ClusterTier | None = None  # the cluster tier (--cluster), cluster.py
        if cluster:
            self.cluster = ClusterTier(
                parse_url(cluster), self.host, settings().cluster_session_s, self._published
            )
        self.link: LinkServer | None = None  # --listen: the other daemons' way in (link.py)
        if listen:
            from fable.config import parse_listen

            address, port = parse_listen(listen)
            if self.cluster is None:
                raise FableError("--listen takes connections from other hosts: it needs --cluster")
            if ipaddress.ip_address(address).is_unspecified:
                raise FableError(
                    f"--listen {listen}: give this host's address (the other hosts dial it)"
                )
            self.link = LinkServer(address, port, self._on_link)
        self.clients: dict[int, Client] = {}
        self.listen_changed = asyncio.Event()
        self.waiting: dict[str, int] = {}  # name -> connects waiting for it to listen (fable ls)
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._table: Any = None
        self._table_stamp = -1
        self._topo: Any = None
        self._ranked: tuple[Any, dict[Any, tuple[Any, ...]]] = (None, {})  # table, facts -> ranking
        self.trig: dict[int, FlowState] = {}  # flow id -> the triggers' memory of it
        self._lock_fd = -1  # the socket's lock, held while this daemon lives (bind)
        self.conns_of: dict[int, int] = {}  # uid -> client connections it has open
        # who held what, saved for the daemon after this one (Registry.snapshot)
        self.state_path = path.with_name(path.name + ".state")
        self.uid = os.getuid()  # per-uid limits bind every uid but this one (config.py)
        # fable run's listeners, pairs and flows (ports.py)
        self.ports = Ports(self._port_flow, self._drop_flow, self._room)

    def _trig(self, fid: int) -> FlowState:
        """What the triggers remember of flow ``fid``."""
        st = self.trig.get(fid)
        if st is None:
            st = self.trig[fid] = FlowState()
        return st

    def _public(self, flow: Flow) -> dict[str, Any]:
        """A flow as ``fable flows`` shows it: the registry's record and the triggers' view."""
        return {**flow.public(), **self._trig(flow.id).public()}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------ serving
    def bind(self) -> socket.socket:
        if self.system:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(self.path.parent, 0o755)
        else:
            private_dir(self.path.parent)
        # One daemon per socket: it holds this lock for its whole life (the kernel drops it
        # when the process ends). Of two started at once, the second stops here.
        lock = os.open(str(self.path) + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise FableError(f"another daemon serves {self.path}, or is starting there") from None
        self._lock_fd = lock
        with contextlib.suppress(FileNotFoundError):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise FableError(f"a daemon already answers on {self.path}")
            except ConnectionRefusedError:
                os.unlink(self.path)  # a dead daemon's socket
            finally:
                probe.close()
        self._load_state()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o666 if self.system else 0o600)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if self.cluster is not None:
            try:  # (clients that connect meanwhile wait in the backlog)
                if self.link is not None:
                    await self.link.start()
                    self.cluster.link = f"{self.link.address}:{self.link.port}"
                await self.cluster.start()
            except BaseException:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                raise
        log.info("fabled %d serving on %s", os.getpid(), self.path)
        accept = asyncio.ensure_future(self._accept_loop(sock))  # cancelled below
        watchdog = asyncio.ensure_future(self._watchdog())
        saver = asyncio.ensure_future(self._saver())
        sweeper = asyncio.ensure_future(self._port_sweeper())
        await self.stopping.wait()
        accept.cancel()
        watchdog.cancel()
        saver.cancel()
        sweeper.cancel()
        self.ports.close()
        self._save()  # (a planned restart: the names of now are reserved for their users)
        if self.link is not None:
            self.link.stop()
        if self.cluster is not None:
            self.cluster.stop()  # (our znodes go with the session, at once)
        for c in list(self.clients.values()):
            c.closed = True
            c.sock.close()
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("fabled %d stopped", os.getpid())

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept clients for good: out of fds (``EMFILE``/``ENFILE``, or memory), it logs,
        waits a little (the waiting connections stay in the backlog) and goes on; a client over
        a connection limit gets a ``bye`` naming the limit and is closed."""
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue  # that one connection, not the listener
                    raise
                if not backoff:
                    log.warning("cannot accept clients (%s): retrying until fds are free", e)
                backoff = min(max(backoff * 2, _ACCEPT_BACKOFF_S[0]), _ACCEPT_BACKOFF_S[1])
                await asyncio.sleep(backoff)
                continue
            if backoff:
                log.warning("accepting clients again")
                backoff = 0.0
            try:
                conn.setblocking(False)
                client = Client(conn)
            except OSError:
                conn.close()
                continue
            why = self._over_limit(client.uid)
            if why:
                self._bye(client, why)
                continue
            self.clients[client.id] = client
            self.conns_of[client.uid] = self.conns_of.get(client.uid, 0) + 1
            self._spawn(self._client_loop(client))

    def _load_state(self) -> None:
        """Reserve what the daemon before this one saved (its names and flows), for
        FABLE_RESTART_GRACE seconds; a missing or unreadable file reserves nothing."""
        try:
            with open(self.state_path, "rb") as f:
                saved = json.loads(f.read(64 << 20))
            grace = settings().restart_grace_s
            self.registry.reserve(saved, time.monotonic() + grace)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring %s: %s", self.state_path, e)
            return
        log.info(
            "reserving %d names and %d flows of the daemon before for %g s",
            len(self.registry.reserved_names),
            len(self.registry.reserved_flows),
            grace,
        )

    async def _saver(self) -> None:
        """Save the registry's names and flows (``Registry.snapshot``) when they changed, at
        most every 0.2 s, so that the next daemon can reserve them."""
        saved = -1
        while True:
            await asyncio.sleep(0.2)
            if self.registry.version == saved:
                continue
            saved = self.registry.version
            self._save()

    def _save(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w") as f:
                json.dump(self.registry.snapshot(), f, separators=(",", ":"))
            os.replace(tmp, self.state_path)
        except OSError as e:
            log.warning("could not save %s: %s", self.state_path, e)

    def _flow_room(self, uid: int, more: int) -> None:
        """``PermissionDenied`` if ``uid`` may not have ``more`` flows (FABLE_MAX_FLOWS_PER_UID)."""
        if uid == self.uid or not more:
            return
        n = self.registry.flows_of(uid)
        if n + more > settings().max_flows_per_uid:
            raise PermissionDenied(
                f"uid {uid} has {n} flows, the most FABLE_MAX_FLOWS_PER_UID allows"
            )

    def _over_limit(self, uid: int) -> str:
        """Why a new connection of ``uid`` is refused, or "" (config.py: FABLE_MAX_CONNS...)."""
        cfg = settings()
        if len(self.clients) >= cfg.max_conns:
            return f"the daemon serves {len(self.clients)} connections, FABLE_MAX_CONNS"
        n = self.conns_of.get(uid, 0)
        if uid != self.uid and n >= cfg.max_conns_per_uid:
            return f"uid {uid} has {n} connections open, FABLE_MAX_CONNS_PER_UID"
        return ""

    def _bye(self, client: Client, why: str) -> None:
        """Refuse a connection: one frame saying why (not waiting for it to be read), then
        close."""
        log.warning("refused uid %d (pid %d): %s", client.uid, client.pid, why)
        with contextlib.suppress(OSError, ValueError):
            client.sock.send(
                CONTROL.encode({"op": "bye", "error": "DaemonUnavailable", "message": why}),
                socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL,
            )
        client.closed = True
        client.sock.close()

    async def _watchdog(self) -> None:
        """Close clients that hold a connection without using it: no hello within
        FABLE_FRAME_TIMEOUT of connecting, a frame begun and not finished within it, nothing
        sent for FABLE_IDLE_TIMEOUT (the library reports every second)."""
        while True:
            cfg = settings()
            await asyncio.sleep(min(cfg.frame_timeout_s, cfg.idle_timeout_s) / 4)
            now = time.monotonic()
            for c in list(self.clients.values()):
                if not c.helloed and now - c.since > cfg.frame_timeout_s:
                    c.kick(f"no hello within {cfg.frame_timeout_s:g} s (FABLE_FRAME_TIMEOUT)")
                elif c.partial_since is not None and now - c.partial_since > cfg.frame_timeout_s:
                    c.kick(
                        f"a frame not finished within {cfg.frame_timeout_s:g} s "
                        "(FABLE_FRAME_TIMEOUT)"
                    )
                elif now - c.last > cfg.idle_timeout_s:
                    c.kick(f"nothing sent for {cfg.idle_timeout_s:g} s (FABLE_IDLE_TIMEOUT)")

    async def _next_frame(self, client: Client) -> tuple[dict[str, Any], list[int]]:
        """The client's next request and the fds it attached (now the caller's)."""
        loop = asyncio.get_running_loop()
        reader = client.reader
        while True:
            got = reader.pop()
            if got is not None:
                client.last = time.monotonic()
                return got
            try:
                if reader.read_from(client.sock) == 0:
                    raise EOFError
                if not reader.partial:
                    client.partial_since = None
                elif client.partial_since is None:
                    client.partial_since = time.monotonic()
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_reader(client.sock, fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_reader(client.sock)

    async def _client_loop(self, client: Client) -> None:
        try:
            first = True
            while True:
                req, fds = await self._next_frame(client)
                if first and req.get("op") != "hello":
                    close_fds(fds)
                    raise ProtocolError("the first control frame must be a hello")
                first = False
                client.helloed = True
                op = req.get("op")
                if isinstance(op, str) and op in _TAKES_FD:
                    await self._dispatch(client, req, fds)
                else:  # the daemon takes fds with fable run's port ops only
                    close_fds(fds)
                    await self._dispatch(client, req)
        except (EOFError, ConnectionError, OSError):
            pass
        except ProtocolError as e:
            # the stream cannot be trusted any more: say why, then hang up
            with contextlib.suppress(Exception):
                await client.send({"ok": False, "error": "ProtocolError", "message": str(e)})
        except Exception:
            log.exception("client %d (pid %d): internal error", client.id, client.pid)
        finally:
            client.closed = True
            client.reader.close()
            client.sock.close()
            self.clients.pop(client.id, None)
            left = self.conns_of.get(client.uid, 1) - 1
            if left:
                self.conns_of[client.uid] = left
            else:
                self.conns_of.pop(client.uid, None)
            names = self.registry.client_gone(client.id)
            if names:
                log.info("pid %d gone: %s", client.pid, ", ".join(names))
                self._listeners_changed()

    def _listeners_changed(self) -> None:
        self.listen_changed.set()
        self.listen_changed = asyncio.Event()
        if self.cluster is not None:
            self.cluster.changed()

    def _published(self) -> dict[str, dict[str, Any]]:
        """What the cluster tier publishes of our endpoints: name -> uid, listening, remote
        (it takes connections from some other host)."""
        return {
            n: {
                "uid": ep.uid,
                "listening": ep.listening,
                "remote": ep.listening and (ep.allow_remote or bool(ep.allow_hosts)),
            }
            for n, ep in self.registry.endpoints.items()
        }

    # ---------------------------------------------------------------------------- requests
    async def _dispatch(
        self, client: Client, req: dict[str, Any], fds: list[int] | None = None
    ) -> None:
        rid = req.get("id")
        op = req.get("op")
        handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        try:
            if not isinstance(rid, int) or isinstance(rid, bool):
                close_fds(fds or [])
                raise ProtocolError("a request needs an integer id")
            if handler is None:
                raise _BadRequest(f"unknown op {op!r}")
            if fds is not None:  # a port op: exactly one fd, which it takes
                if len(fds) != 1:
                    close_fds(fds)
                    raise _BadRequest(f"{op} takes one socket fd, not {len(fds)}")
                req = {**req, "_fd": fds[0]}
            if op == "connect":
                # waiting for a listener must not hold up this client's other requests; each
                # waiting connect is a task: a client may not pile them up
                if client.connecting >= MAX_CONNECTING:
                    raise PermissionDenied(
                        f"{MAX_CONNECTING} connects of this process wait already"
                    )
                client.connecting += 1
                self._spawn(self._answer(client, rid, handler(client, req)))
                return
            result = await handler(client, req)
        except ProtocolError:
            raise
        except Exception as e:  # answered: one request's failure is not the client's end
            await client.send({"id": rid, "ok": False, **self._error(client, op, e)})
            return
        reply, fd = result
        try:
            frame = {"id": rid, "ok": True, **reply}
            CONTROL.encode(frame)  # (a reply over the frame limit is a bug: say so)
        except ValueError as e:
            if fd is not None:
                os.close(fd)
            await client.send({"id": rid, "ok": False, **self._error(client, op, e)})
            return
        try:
            await client.send(frame, fd)
        finally:  # (sent: the client holds its copy)
            if fd is not None:
                os.close(fd)

    def _error(self, client: Client, op: Any, e: BaseException) -> dict[str, str]:
        """The error fields of a reply to a request that failed with ``e``; refusals are
        logged with the uid they refused."""
        if isinstance(e, _BadRequest):
            err = "ProtocolError"
        elif isinstance(e, FableError):
            err = type(e).__name__
        else:  # the daemon's own trouble (out of fds, a reply too big, a bug): say so
            log.error("%s of uid %d (pid %d) failed", op, client.uid, client.pid, exc_info=e)
            err, e = "DaemonUnavailable", DaemonUnavailable(f"the daemon could not do {op}: {e}")
        if isinstance(e, PermissionDenied):
            log.warning("refused %s of uid %d (pid %d): %s", op, client.uid, client.pid, e)
        return {"error": err, "message": str(e)}

    async def _answer(self, client: Client, rid: int, work: Any) -> None:
        fd = None
        reply: dict[str, Any] = {}
        try:
            reply, fd = await work
            if client.closed:
                raise ConnectionError("the connecting process went away")
            await client.send({"id": rid, "ok": True, **reply}, fd)
        except FableError as e:
            with contextlib.suppress(ConnectionError, OSError):
                await client.send({"id": rid, "ok": False, **self._error(client, "connect", e)})
        except (ConnectionError, OSError):
            # the connector is gone: its flow never started (the listener's accept skips it)
            if "flow" in reply:
                self.registry.flows.pop(reply["flow"]["id"], None)
        finally:
            client.connecting -= 1
            if fd is not None:
                os.close(fd)

    async def _op_hello(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        cluster = None if self.cluster is None else str(self.cluster.url)
        return {
            "daemon": os.getpid(),
            "host": self.host,
            "system": self.system,
            "cluster": cluster,
        }, None

    async def _op_cluster(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        """The cluster tier's state (``fable doctor``): {"cluster": None} without one."""
        return {"cluster": None if self.cluster is None else self.cluster.status()}, None

    async def _op_register(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], None]:
        name = check_name(_field(req, "name", str))
        ep = Endpoint(
            name,
            client.pid,
            client.uid,
            self.host,
            client.id,
            affinity=_int_list(req.get("affinity", []), "affinity"),
            cpu=_field(req, "cpu", int, -1),
            node=_field(req, "node", int, -1),
        )
        held = self.registry.names_of.get(client.uid, 0)
        limit = settings().max_names_per_uid
        if client.uid != self.uid and held >= limit and name not in self.registry.endpoints:
            raise PermissionDenied(
                f"uid {client.uid} holds {held} names, the most FABLE_MAX_NAMES_PER_UID allows"
            )
        self.registry.register(ep)
        if self.cluster is not None:  # unique in the cluster: another host's name is taken
            try:
                await self.cluster.claim(name, {"uid": ep.uid, "listening": False})
            except NameInUse:
                if self.registry.endpoints.get(name) is ep:
                    self.registry.unregister(name, client.id)
                raise
        log.info("registered %s (pid %d, uid %d)", name, client.pid, client.uid)
        self._listeners_changed()
        return {"endpoint": ep.public()}, None

    async def _op_unregister(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], None]:
        self.registry.unregister(check_name(_field(req, "name", str)), client.id)
        self._listeners_changed()
        return {}, None

    async def _op_listen(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        ep = self.registry.owned(check_name(_field(req, "name", str)), client.id)
        allow = req.get("allow_uids")
        ep.allow_uids = None if allow is None else frozenset(_int_list(allow, "allow_uids"))
        ep.trusted = _field(req, "trusted", bool, False)
        ep.allow_remote = _field(req, "allow_remote", bool, False)
        hosts = _field(req, "allow_hosts", (list, type(None)), None) or []
        if len(hosts) > 1024 or not all(isinstance(h, str) and HOST_ID.fullmatch(h) for h in hosts):
            raise _BadRequest("listen: allow_hosts is a list of host ids")
        ep.allow_hosts = frozenset(hosts)
        ep.listening = True
        self._listeners_changed()
        return {}, None

    async def _op_connect(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], int | None]:
        me = self.registry.owned(check_name(_field(req, "name", str)), client.id)
        to = check_name(_field(req, "to", str))
        trusted = _field(req, "trusted", bool, False)
        transport = _field(req, "transport", (str, type(None)), None)
        timeout = _field(req, "timeout", (int, float, type(None)), None)
        _field(req, "pollable", bool, False)
        _field(req, "msg_size", (int, type(None)), None)
        if req.get("mode") not in (None, "latency", "throughput"):
            raise _BadRequest("connect: mode is 'latency', 'throughput' or null")
        from fable.handshake import own_form
        from fable.transports import REGISTRY

        if transport is not None and transport not in REGISTRY:
            raise _BadRequest(f"unknown transport {transport!r}")
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        self.waiting[to] = self.waiting.get(to, 0) + 1
        try:
            while True:
                if client.closed:  # do not wait forever for a process that is gone
                    raise ConnectionError("the connecting process went away")
                try:
                    listener = self.registry.listener(to, client.uid)
                except NameNotFound:
                    host = self._elsewhere(to)
                    if host is None:
                        raise
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    return await self._connect_remote(client, me, to, host, req, left)
                if listener is not None:
                    owner = self.clients.get(listener.client)
                    if owner is not None:
                        break
                changed = self.listen_changed
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"{to!r} is registered but did not listen in time")
                try:  # woken by any listen/register change; at least once a second for liveness
                    await asyncio.wait_for(changed.wait(), 1.0 if left is None else min(left, 1.0))
                except TimeoutError:
                    pass
        finally:
            self.waiting[to] -= 1
            if not self.waiting[to]:
                del self.waiting[to]
        if client.closed:  # the connector died while it waited: do not bother the listener
            raise ConnectionError("the connecting process went away")
        if transport is not None:
            name = transport
            info = REGISTRY[name]
            try:  # each end's most zero-copy form within its own trust
                forms = (own_form(info, trusted, None), own_form(info, listener.trusted, None))
            except PermissionDenied:
                raise FableError(
                    f"{name} has only unsafe (zero-copy) reads: both ends must pass trusted=True"
                ) from None
            reason = f"{name}: asked for by {me.name} with transport={name!r}; reads: " + ", ".join(
                "zero-copy" if not f else "private copies" for f in forms
            )
        else:
            choice = self._choose(me, listener, trusted, req)
            name, reason, forms = choice.transport, choice.reason, choice.safe
        self._flow_room(client.uid, 1)
        flow = self.registry.new_flow(
            (me.name, listener.name),
            name,
            forms,
            reason,
            {client.id, listener.client},
            {client.uid, listener.uid},
            hosts=(self.host, self.host),
        )
        flow.trusted = (trusted, listener.trusted)
        flow.hints = {k: req.get(k) for k in ("pollable", "msg_size", "mode")}
        try:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:  # out of fds: this connect fails, the daemon goes on
            self.registry.flows.pop(flow.id, None)
            raise DaemonUnavailable(f"the daemon could not make a setup channel: {e}") from None
        try:
            await owner.send(
                {
                    "op": "incoming",
                    "listener": listener.name,
                    "flow": self._public(flow),
                    "token": flow.token,
                    "options": {
                        "transport": name,
                        "safe": forms[1],
                        "forced": transport is not None,
                    },
                },
                b.fileno(),
            )
        except (ConnectionError, OSError):
            a.close()
            self.registry.flows.pop(flow.id, None)
            raise Timeout(f"{to!r} went away during the rendezvous") from None
        finally:
            b.close()
        log.info("flow %d: %s -> %s over %s", flow.id, me.name, listener.name, name)
        options = {
            "transport": name,
            "safe": forms[0],
            "peer_safe": forms[1],
            "forced": transport is not None,
        }
        return {"flow": self._public(flow), "token": flow.token, "options": options}, a.detach()

    # ---------------------------------------------------------------- fable run (ports.py)
    def _port_args(self, client: Client, req: dict[str, Any]) -> tuple[int, int, str, int]:
        """uid, pid, the program's name and the fd of a port op."""
        name = req.get("name")
        if not isinstance(name, str) or not _PROGRAM.match(name):
            name = "program"
        return client.uid, client.pid, name, req["_fd"]

    async def _op_port_listen(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], None]:
        return self.ports.listen(*self._port_args(client, req)), None

    async def _op_port_connect(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], int | None]:
        uid, pid, name, fd = self._port_args(client, req)
        return self.ports.connect(uid, pid, name, req, fd)

    async def _op_port_accept(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], int | None]:
        return self.ports.accept(*self._port_args(client, req))

    async def _op_port_resolve(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], None]:
        name = _field(req, "lookup", str)
        return self.ports.resolve(name if _PROGRAM.match(name) else ""), None

    def _room(self, uid: int) -> bool:
        """Whether ``uid`` may have one more flow (FABLE_MAX_FLOWS_PER_UID)."""
        return uid == self.uid or self.registry.flows_of(uid) < settings().max_flows_per_uid

    def _port_flow(self, ends: tuple[str, str], reason: str, uids: set[int]) -> int:
        flow = self.registry.new_flow(
            ends, "unix", (True, True), reason, set(), uids, hosts=(self.host, self.host)
        )
        flow.reconfigurable = False
        log.info("flow %d: %s -> %s over unix (fable run)", flow.id, *ends)
        return flow.id

    def _drop_flow(self, fid: int) -> None:
        if self.registry.flows.pop(fid, None) is not None:
            self.registry.version += 1
        self.trig.pop(fid, None)

    async def _port_sweeper(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.ports.registered or self.ports.pending or self.ports.flows:
                try:
                    self.ports.sweep()
                except OSError:
                    log.exception("the fable run sweep failed; it runs again in a second")

    def _elsewhere(self, name: str) -> str | None:
        """The other host the cluster has ``name`` on (None: on none)."""
        host = None if self.cluster is None else self.cluster.host_of(name)
        return host if host is not None and host != self.host else None

    # ------------------------------------------------------------------ between hosts
    async def _connect_remote(
        self,
        client: Client,
        me: Endpoint,
        to: str,
        host: str,
        req: dict[str, Any],
        timeout: float | None,
    ) -> tuple[dict[str, Any], None]:
        """A connect to ``to`` on ``host``: choose the transport (an ``other-host`` flow),
        number the flow, ask that host's daemon (``link.py``), and tell our process where to
        go and the two tokens (``fable/transports/across.py``). Its daemon's refusals are
        raised here (NameNotFound, PermissionDenied, Timeout...)."""
        from fable.transports import REGISTRY

        assert self.cluster is not None
        where = self.cluster.link_of(host)
        if where is None:
            raise NameNotFound(
                f"{to!r} is registered on host {host}, whose daemon takes no connections from "
                "other hosts (it runs without --listen)"
            )
        base = self.cluster.flow_base()
        if base is None:
            raise DaemonUnavailable("this daemon has not joined its cluster yet: try again")
        trusted = _field(req, "trusted", bool, False)
        transport = _field(req, "transport", (str, type(None)), None)
        between = f"between hosts {self.host} ({me.name}) and {host} ({to})"
        if transport is not None:
            if not REGISTRY[transport].caps.cross_host:
                crossing = ", ".join(n for n, i in REGISTRY.items() if i.caps.cross_host)
                raise FableError(f"{transport} cannot connect two hosts; between hosts: {crossing}")
            name, forms = transport, (True, True)
            reason = f"{name}: asked for by {me.name} with transport={name!r}; {between}"
        else:
            choice = self._choose(me, Endpoint(to, 0, 0, host, -1), trusted, req)
            name, forms = choice.transport, choice.safe
            reason = f"{choice.reason}; {between}"
        self._flow_room(client.uid, 1)
        fid = base + next(self._remote_ids)
        token = new_token()  # T2: the listener's process proves itself with it
        reply = await ask(
            where[0],
            where[1],
            {
                "op": "remote-connect",
                "host": self.host,
                "name": me.name,
                "to": to,
                "transport": name,
                "safe": list(forms),
                "forced": transport is not None,
                "reason": reason,
                "flow": fid,
                "token": token,
                "timeout": timeout,
            },
            settings().peer_timeout_s,
            None if timeout is None else timeout + settings().peer_timeout_s,
        )
        address, port, t1 = reply.get("address"), reply.get("port"), reply.get("token")
        try:
            ipaddress.ip_address(address if isinstance(address, str) else "")
            if not (isinstance(port, int) and 0 < port < 65536 and isinstance(t1, str)):
                raise ValueError
        except ValueError:
            raise ProtocolError(
                f"host {host}'s daemon answered a connect without a place"
            ) from None
        if client.closed:
            raise ConnectionError("the connecting process went away")
        flow = self.registry.new_flow(
            (me.name, to), name, forms, reason, {client.id}, {client.uid}, (self.host, host), fid
        )
        flow.trusted = (trusted, False)
        flow.hints = {k: req.get(k) for k in ("pollable", "msg_size", "mode")}
        log.info("flow %d: %s -> %s on host %s over %s", fid, me.name, to, host, name)
        options = {
            "transport": name,
            "safe": forms[0],
            "peer_safe": forms[1],
            "forced": transport is not None,
        }
        remote = {"address": address, "port": port, "token": t1, "peer_token": token, "host": host}
        return {
            "flow": self._public(flow),
            "token": flow.token,
            "options": options,
            "remote": remote,
        }, None

    async def _on_link(self, peer: str, here: str, req: dict[str, Any]) -> dict[str, Any]:
        """A request of another host's daemon (``link.py``): ``remote-connect``."""
        from fable.transports import REGISTRY

        if req.get("op") != "remote-connect":
            raise _BadRequest(f"unknown link op {req.get('op')!r}")
        assert self.cluster is not None
        host = _field(req, "host", str)
        if not HOST_ID.fullmatch(host) or host == self.host:
            raise _BadRequest("remote-connect: host is another host's id")
        if peer not in self.cluster.addresses_of(host):
            raise PermissionDenied(
                f"a connect in the name of host {host} came from {peer}, which the cluster does "
                "not list as that host's"
            )
        name, to = check_name(_field(req, "name", str)), check_name(_field(req, "to", str))
        transport = _field(req, "transport", str)
        info = REGISTRY.get(transport)
        if info is None or not info.caps.cross_host:
            raise _BadRequest(f"remote-connect: {transport!r} does not cross hosts")
        safe = req.get("safe")
        if not (
            isinstance(safe, list) and len(safe) == 2 and all(isinstance(f, bool) for f in safe)
        ):
            raise _BadRequest("remote-connect: safe is two bools")
        if any(info.no_form(f) for f in safe):
            raise _BadRequest(f"remote-connect: {transport} has no such form")
        fid = _field(req, "flow", int)
        from fable.daemon.registry import LOCAL_IDS

        if fid < LOCAL_IDS or fid >= 1 << 53 or fid in self.registry.flows:
            raise _BadRequest(f"remote-connect: flow id {fid} is not one a daemon gives")
        token = _field(req, "token", str)
        if len(token) != 32 or not all(c in "0123456789abcdef" for c in token):
            raise _BadRequest("remote-connect: token is 32 hex digits")
        timeout = _field(req, "timeout", (int, float, type(None)), None)
        reason = str(_field(req, "reason", str, ""))[:500]
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        while True:  # as a local connect: wait for the name to listen
            ep = self.registry.endpoints.get(to)
            if ep is None:
                raise NameNotFound(f"no endpoint is registered as {to!r} on host {self.host}")
            if ep.listening:
                if not ep.takes_host(host):
                    raise PermissionDenied(
                        f"{to!r} takes no connections from host {host} (its listener passes "
                        "allow_remote=True or allow_hosts to take some)"
                    )
                owner = self.clients.get(ep.client)
                if owner is not None and not owner.closed:
                    break
            changed = self.listen_changed
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(
                    f"{to!r} is registered on host {self.host} but did not listen in time"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0 if left is None else min(left, 1.0))
        self._flow_room(ep.uid, 1)
        family = socket.AF_INET6 if ":" in here else socket.AF_INET
        lst = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            lst.bind((here, 0))
            lst.listen(8)
        except OSError as e:
            lst.close()
            raise DaemonUnavailable(f"no listening socket for {to!r}: {e}") from None
        t1 = new_token()  # the connecting process proves itself with it
        flow = self.registry.new_flow(
            (name, to),
            transport,
            (safe[0], safe[1]),
            reason,
            {ep.client},
            {ep.uid},
            (host, self.host),
            fid,
        )
        flow.trusted = (False, ep.trusted)
        try:
            await owner.send(
                {
                    "op": "incoming",
                    "listener": to,
                    "flow": self._public(flow),
                    "token": flow.token,
                    "options": {
                        "transport": transport,
                        "safe": safe[1],
                        "forced": req.get("forced") is True,
                    },
                    "remote": {"host": host, "token": t1, "peer_token": token},
                },
                lst.fileno(),
            )
        except (ConnectionError, OSError):
            self.registry.flows.pop(flow.id, None)
            raise Timeout(f"{to!r} went away during the rendezvous") from None
        finally:
            port = lst.getsockname()[1]
            lst.close()
        log.info("flow %d: %s on host %s -> %s over %s", fid, name, host, to, transport)
        return {"address": here, "port": port, "token": t1, "flow": fid}

    def table(self) -> Any:
        """The calibration table, reloaded when ``fable calibrate`` rewrote it."""
        from fable.policy import calibration_path, load_table

        path = calibration_path()
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = 0
        if self._table is None or stamp != self._table_stamp:
            self._table, self._table_stamp = load_table(path), stamp
            log.info("transport choices from %s", self._table.source)
        return self._table

    def _ranking(
        self, a: Endpoint, b: Endpoint, trusted_a: bool, trusted_b: bool, req: dict[str, Any]
    ) -> list[Any]:
        from fable.policy import facts_for, rank

        size = req.get("msg_size")
        mode = req.get("mode")
        facts = facts_for(
            a.public(),
            b.public(),
            trusted_a=trusted_a,
            trusted_b=trusted_b,
            pollable=bool(req.get("pollable", False)),
            msg_size=size
            if isinstance(size, int) and not isinstance(size, bool) and size > 0
            else None,
            mode=mode if mode in ("latency", "throughput") else None,
        )
        if self._topo is None:
            from fable.topology import Topology

            self._topo = Topology.read()
        table = self.table()
        if self._ranked[0] is not table or len(self._ranked[1]) > 4096:
            self._ranked = (table, {})  # a new table (or too many kinds of flow): start over
        # the triggers rank every flow at every report: flows alike share one ranking
        got = self._ranked[1].get(facts)
        if got is None:
            got = self._ranked[1][facts] = tuple(rank(facts, table, self._topo))
        return list(got)

    def _choose(self, a: Endpoint, b: Endpoint, trusted_a: bool, req: dict[str, Any]) -> Any:
        ranking = self._ranking(a, b, trusted_a, b.trusted, req)
        if not ranking or ranking[0].excluded:
            raise FableError("no transport fits these two endpoints")
        return ranking[0]

    async def _op_explain(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        """The ranking a connect from ``a`` to ``b`` would use now (``fable explain``)."""

        eps = []
        for key in ("a", "b"):
            name = check_name(_field(req, key, str))
            ep = self.registry.endpoints.get(name)
            if ep is None:
                raise NameNotFound(f"no endpoint is registered as {name!r}")
            if not self._sees_all(client, ep.uid):  # the reasons tell where it runs
                raise PermissionDenied(f"{name!r} is another user's: only they or root may ask")
            eps.append(ep)
        trusted = _field(req, "trusted", bool, False)
        ranking = self._ranking(eps[0], eps[1], trusted, trusted or eps[1].trusted, req)
        return {
            "source": self.table().source,
            "ranking": [
                {
                    "transport": c.transport,
                    "safe": list(c.safe),
                    "score": round(c.score, 4),
                    "excluded": c.excluded,
                    "reason": c.reason,
                }
                for c in ranking
            ],
        }, None

    async def _op_report(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        flows = req.get("flows", [])
        if not isinstance(flows, list) or len(flows) > 65536:
            raise _BadRequest("report: flows must be a list")
        checked = []
        for f in flows:
            if not isinstance(f, dict):
                raise _BadRequest("report: a flow is an object")
            ends, safe = f.get("ends"), f.get("safe")
            if not (
                isinstance(ends, list)
                and len(ends) == 2
                and isinstance(safe, list)
                and len(safe) == 2
                and all(isinstance(s, bool) for s in safe)
            ):
                raise _BadRequest("report: malformed flow")
            checked.append(
                {
                    "id": _field(f, "id", int),
                    "ends": [check_name(e) for e in ends],
                    "transport": _field(f, "transport", str),
                    "safe": safe,
                    "role": _field(f, "role", int, 0) & 1,
                    "epoch": _field(f, "epoch", int, 0),
                    "msgs": _field(f, "msgs", int, 0),
                    "bytes": _field(f, "bytes", int, 0),
                    "reason": _field(f, "reason", str, ""),
                    "last_switch": _last_switch(f.get("last_switch")),
                    "pollable": f.get("pollable") is True,
                    "token": _field(f, "token", str, ""),
                    "hosts": _hosts(f.get("hosts")),
                }
            )
        for e in req.get("endpoints", []) if isinstance(req.get("endpoints"), list) else []:
            if isinstance(e, dict) and isinstance(e.get("name"), str):
                ep = self.registry.endpoints.get(e["name"])
                if ep is not None and ep.client == client.id:
                    ep.affinity = _int_list(e.get("affinity", ep.affinity), "affinity")
                    ep.cpu = _field(e, "cpu", int, ep.cpu)
                    ep.node = _field(e, "node", int, ep.node)
        self._flow_room(client.uid, sum(1 for f in checked if f["id"] not in self.registry.flows))
        now = time.monotonic()
        final = req.get("more") is not True  # the last (or only) part of this report
        try:
            reported = self.registry.report(
                client.id, client.uid, checked, now, client.reported if final else None
            )
        except ValueError as e:
            raise _BadRequest(f"report: {e}") from None
        for flow, before in reported:
            st = self._trig(flow.id)
            st.counted(client.id, before, flow.counters[client.id])
            last = flow.last_switch or {}
            st.switched(flow.epoch, str(last.get("reason", "")), now)
        for f in checked:
            known = self.registry.flows.get(f["id"])
            if known is not None and f["pollable"]:  # an end handed its fileno() out:
                known.hints["pollable"] = True  # no spinning transport from now on
        if not final:
            client.reported |= {f["id"] for f in checked}
            return {}, None
        client.reported = set()
        for fid in [fid for fid in self.trig if fid not in self.registry.flows]:
            del self.trig[fid]
        mine = {ep.name for ep in self.registry.endpoints.values() if ep.client == client.id}
        for flow in list(self.registry.flows.values()):
            if client.id in flow.clients or mine & set(flow.ends):
                await self._trigger(flow, now)
        return {}, None

    async def _trigger(self, flow: Any, now: float) -> None:
        """Ask one end of ``flow`` for the switch the triggers want now, if any."""
        cfg = settings()
        st = self._trig(flow.id)
        a = self.registry.endpoints.get(flow.ends[0])
        b = self.registry.endpoints.get(flow.ends[1])
        if a is None or b is None or flow.hosts[0] != flow.hosts[1]:
            return  # an end unregistered its name (where it runs is not known any more), or
            # it runs on another host (no placement to follow: the flow stays as it is)
        trusted = flow.trusted or (not flow.safe[0], not flow.safe[1])
        try:
            ranking = self._ranking(a, b, trusted[0], trusted[1], flow.hints)
        except Exception:  # no topology or table: no trigger, the flow goes on as it is
            log.exception("flow %d: no ranking for the triggers", flow.id)
            return
        assert self._topo is not None
        facts = FlowFacts(
            transport=flow.transport,
            safe=flow.safe,
            epoch=flow.epoch,
            nodes=(a.node, b.node),
            numa_nodes=len(set(self._topo.node.values())) or 1,
            ranking=ranking,
        )
        if not cfg.triggers or st.hold:  # what they would do, on a copy: nothing changes
            d = decide(dataclasses.replace(st, hold=False), facts, now, dwell=cfg.trigger_dwell_s)
            st.would = None if d is None else f"{d.transport}: {d.reason}"
            return
        d = decide(st, facts, now, dwell=cfg.trigger_dwell_s)
        st.would = None if d is None else f"{d.transport}: {d.reason}"
        if d is None:
            return
        for cid in sorted(flow.clients):
            end = self.clients.get(cid)
            if end is None or end.closed:
                continue
            log.info("flow %d: %s -> %s (%s)", flow.id, flow.transport, d.transport, d.reason)
            note_asked(st, flow.epoch, now)
            with contextlib.suppress(ConnectionError, OSError):
                await end.send(
                    {
                        "op": "reconfigure",
                        "flow": flow.id,
                        "transport": d.transport,
                        "safe": list(d.safe),
                        "reason": d.reason,
                    }
                )
            return

    def _sees_all(self, client: Client, uid: int) -> bool:
        """Whether ``client`` may see the private side (pid, placement, flows) of ``uid``'s
        endpoints: its own, or root's view of everyone's."""
        return client.uid in (0, uid)

    async def _op_ls(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        """Endpoints, one page (``after``: the last name of the page before). Another user's
        endpoint shows its name, uid, host and whether it listens; not its pid or placement.
        ``cluster``: every host's endpoints as the cluster tier knows them (DaemonUnavailable
        when its ZooKeeper does not answer within ``timeout`` s, default 2)."""
        after = _field(req, "after", str, "")
        if _field(req, "cluster", bool, False):
            if self.cluster is None:
                raise FableError("this daemon is in no cluster (fable daemon --cluster zk://...)")
            timeout = _field(req, "timeout", (int, float), 2.0)
            eps = await self.cluster.listing(min(float(timeout), 30.0))
            return _page("endpoints", ((e["name"], e) for e in eps if e["name"] > after)), None

        def rows() -> Iterator[tuple[str, dict[str, Any]]]:
            for name in sorted(n for n in self.registry.endpoints if n > after):
                ep = self.registry.endpoints[name]
                pub = ep.public()
                if self._sees_all(client, ep.uid):
                    yield name, {**pub, "waiting": self.waiting.get(name, 0)}
                else:
                    yield name, {k: pub[k] for k in ("name", "uid", "host", "listening")}

        return _page("endpoints", rows()), None

    async def _op_flows(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        """The flows this client's uid is an end of (root: all), one page (``after``: the last
        id of the page before)."""
        after = _field(req, "after", int, -1)
        rows = (
            (f.id, self._public(f))
            for fid, f in sorted(self.registry.flows.items())
            if fid > after and (client.uid == 0 or client.uid in f.owners)
        )
        return _page("flows", rows), None

    async def _op_reconfigure(
        self, client: Client, req: dict[str, Any]
    ) -> tuple[dict[str, Any], None]:
        """``fable reconfigure``: ask one end of a flow to switch it (the switch itself runs
        between the two processes; the flow's epoch and last_switch show when it is done)."""
        from fable.transports import REGISTRY

        fid = _field(req, "flow", int)
        transport = _field(req, "transport", (str, type(None)), None)
        safe = _field(req, "safe", (bool, type(None)), None)
        end = _field(req, "end", (str, type(None)), None)
        if transport is not None and transport not in REGISTRY:
            raise _BadRequest(f"unknown transport {transport!r}; known: {', '.join(REGISTRY)}")
        flow = self.registry.flows.get(fid)
        if flow is None:
            raise NameNotFound(f"no flow {fid}")
        if client.uid != 0 and client.uid not in flow.owners:
            raise PermissionDenied("only the users of a flow's ends, or root, may switch it")
        if not flow.reconfigurable:
            raise _BadRequest(f"flow {fid} is not reconfigurable: {flow.reason}")
        if transport is None:  # --auto: hand the flow back to the triggers
            self._trig(flow.id).hold = False
            await self._trigger(flow, time.monotonic())
            return {"flow": self._public(flow)}, None
        crossing = flow.hosts[0] != flow.hosts[1]
        if transport is not None and crossing and not REGISTRY[transport].caps.cross_host:
            raise _BadRequest(
                f"flow {fid} is between hosts {flow.hosts[0]} and {flow.hosts[1]}: "
                f"{transport} cannot cross hosts"
            )
        if end is not None and end not in flow.ends:
            raise _BadRequest(f"flow {fid} has no end {end!r}; its ends: {', '.join(flow.ends)}")
        # the form for each end, in the order of ends (None: that end's most zero-copy form
        # within its own trust); --end applies it to one end only
        forms = [safe if end is None or end == name else None for name in flow.ends]
        self._trig(flow.id).hold = True  # the operator's choice holds until the operator changes it
        ticket = next(self._tickets)
        for cid in sorted(flow.clients):
            peer = self.clients.get(cid)
            if peer is None:
                continue
            reason = f"asked for by the operator (uid {client.uid}, pid {client.pid})"
            await peer.send(
                {
                    "op": "reconfigure",
                    "flow": fid,
                    "transport": transport,
                    "safe": forms,
                    "reason": reason,
                    "ticket": ticket,
                }
            )
            return {"flow": self._public(flow), "ticket": ticket}, None
        raise NameNotFound(f"flow {fid} has no live end")

    async def _op_refused(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        """An end's word that the switch asked for with ``ticket`` was refused, and why (by
        that end or by its peer): ``fable flows`` shows it, ``fable reconfigure`` prints it."""
        fid = _field(req, "flow", int)
        flow = self.registry.flows.get(fid)
        if flow is not None and client.id in flow.clients:
            flow.refused = {
                "ticket": _field(req, "ticket", int),
                "why": str(_field(req, "why", str))[:500],
                "at": time.time(),
            }
        return {}, None

    async def _op_stop(self, client: Client, req: dict[str, Any]) -> tuple[dict[str, Any], None]:
        """Stop on purpose: every client is told first, so that none starts a daemon again
        until its application registers a name (client.py)."""
        if client.uid not in (0, os.getuid()):
            raise PermissionDenied("only the daemon's user or root may stop it")
        log.warning("stopped by uid %d (pid %d)", client.uid, client.pid)
        why = f"fable daemon --stop by uid {client.uid}"
        for c in list(self.clients.values()):
            if c is not client:
                self._spawn(_quietly(c.send({"op": "stopping", "why": why})))
        asyncio.get_running_loop().call_later(0.2, self.stopping.set)
        return {}, None


async def _quietly(send: Any) -> None:
    """Await a send to a client that may be gone."""
    with contextlib.suppress(ConnectionError, OSError):
        await send


def serve(
    path: Path | None = None,
    *,
    system: bool = False,
    cluster: str | None = None,
    listen: str | None = None,
) -> None:
    """Run a daemon in this process until SIGTERM/SIGINT or a ``stop`` request; ``cluster``
    (default FABLE_CLUSTER): the cluster it joins, ``zk://ADDR[,ADDR...]/ROOT``; ``listen``
    (default FABLE_LISTEN): ``ADDR:PORT`` where the other hosts' daemons reach it."""
    if path is None:
        path = SYSTEM_SOCKET if system else user_socket()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # all CPUs, whatever we inherited
    # room for FABLE_MAX_CONNS clients and a setup channel being handed out for each
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * settings().max_conns + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            top = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))

    async def main() -> None:
        cfg = settings()
        d = Daemon(
            path,
            system=system,
            cluster=cfg.cluster if cluster is None else cluster,
            listen=cfg.listen if listen is None else listen,
        )
        await d.serve(d.bind())

    asyncio.run(main())
