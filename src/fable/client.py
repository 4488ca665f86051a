"""The library's side of the name service: this process's link to ``fabled``, served by the
process's one control thread (``fable/control.py``).

The control thread is the only reader of the daemon socket: it matches replies to requests (any
thread may send one), queues ``incoming`` connections for listeners, hands operator and trigger
requests (``reconfigure``) to the connection they name, and reports this process's flows and
counters about once a second (at once when an I/O thread's CPU affinity changes). If the daemon
dies, existing connections keep working (the daemon is not on the data path); the control
thread finds a daemon again (starting one if needed) and registers this process's names,
listeners and flows again, so a pending ``accept`` simply goes on waiting; if its name was taken
meanwhile, that ``accept`` raises. A request that was in flight when the daemon died raises
``DaemonUnavailable``; a request made while none can be reached waits up to its timeout.

The control thread never blocks here: it connects without waiting, starts a daemon as a detached
process and looks for its socket on timer ticks, and queues frames the socket cannot take now,
sending them when it is writable.

Which daemon: ``$FABLE_SOCKET`` if set; else the per-user socket if a daemon answers there;
else the system socket (``/run/fable/fabled.sock``) if one answers; else a per-user daemon is
started (a detached ``python -m fable.daemon``, logging to the state dir). Two processes may
start one at once: a daemon holds a lock next to its socket for its whole life, and one that
cannot take it exits at once, so one daemon serves the socket.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fable._wire import FrameReader, close_fds, recv_frame
from fable.config import settings
from fable.connection import Connection
from fable.control import PerProcess, control
from fable.errors import DaemonUnavailable, FableError, ProtocolError
from fable.nameservice import (
    CONTROL,
    SYSTEM_SOCKET,
    UnsafeDirectory,
    UntrustedDaemon,
    check_daemon_dir,
    check_daemon_peer,
    error_class,
    private_dir,
    user_socket,
)
from fable.topology import node_of_cpu, thread_placement
from fable.version import __version__

__all__ = [
    "DaemonLink",
    "link",
    "one_shot",
    "private_daemon",
    "socket_path",
    "spawn_daemon",
    "start_daemon",
]

log = logging.getLogger("fable")

REPORT_INTERVAL_S = 1.0
PLACEMENT_INTERVAL_S = 0.02  # how often I/O threads' affinities are looked at
START_TIMEOUT_S = 10.0  # how long a daemon we started may take to answer
DEFAULT_WAIT_S = 10.0
MAX_OUTBOX = 1 << 20  # bytes of frames queued for a daemon that does not read
_RETRY_FIRST_S, _RETRY_MAX_S = 0.05, 0.5


def _answers(path: Path) -> bool:
    """Whether a daemon accepts connections on ``path`` now (a connect that never waits)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def socket_path() -> tuple[Path, bool]:
    """The socket to use, and whether a daemon may be started there."""
    env = settings().socket
    if env:
        return Path(env).expanduser(), True
    mine = user_socket()
    if _answers(mine):
        return mine, False
    if _answers(SYSTEM_SOCKET):
        return SYSTEM_SOCKET, False
    return mine, True


# Daemons this process started: kept so that the Popen objects are not collected while the
# daemon runs (a ResourceWarning); a daemon outlives us unless stopped (private_daemon waits).
_spawned: list[subprocess.Popen[bytes]] = []


def spawn_daemon(path: Path) -> subprocess.Popen[bytes] | None:
    """Start a detached daemon on ``path`` unless one answers there (then None), without
    waiting for it. Safe against races: of two daemons started at once, one serves (the other
    finds the socket's lock taken and exits)."""
    _spawned[:] = [p for p in _spawned if p.poll() is None]
    if path.parent != SYSTEM_SOCKET.parent:
        private_dir(path.parent)
    if _answers(path):
        return None
    state = private_dir(settings().state_dir)
    logfile = state / "fabled.log"  # rotated by the daemon; its own output (a crash before it
    # could log) goes to fabled.out
    with open(state / "fabled.out", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fable.daemon", "--socket", str(path), "--log", str(logfile)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # detached: not killed with our process group
            close_fds=True,
        )
    _spawned.append(proc)
    return proc


def start_daemon(path: Path) -> subprocess.Popen[bytes] | None:
    """``spawn_daemon``, then wait until a daemon answers on ``path`` (the CLI, the bench)."""
    proc = spawn_daemon(path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(path):
        if time.monotonic() > deadline:
            raise DaemonUnavailable(
                f"started a daemon on {path} but it did not answer in {START_TIMEOUT_S:g} s "
                f"(see {settings().state_dir / 'fabled.log'})"
            )
        time.sleep(0.01)
    return proc


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    fd: int | None = None
    error: BaseException | None = None


@dataclass
class _Name:
    tid: int = 0  # the thread that registered it: its I/O thread, whose placement we report
    registered: bool = False  # confirmed by the daemon: register it again after a restart
    listening: bool = False
    trusted: bool = False
    allow_uids: list[int] | None = None
    allow_remote: bool = False  # connections from every host of the cluster
    allow_hosts: list[str] | None = None  # ... or from these hosts
    lost: str = ""  # why it could not be registered again after a restart (accept raises)
    lost_error: type[FableError] = FableError  # what accept raises (the daemon's error class)
    # connections for the listener; None wakes it to look at ``lost``
    incoming: queue.Queue[tuple[dict[str, Any], socket.socket] | None] = field(
        default_factory=queue.Queue
    )


class DaemonLink:
    """This process's daemon connection, served by the control thread (get it with
    :func:`link`). ``_lock`` guards the socket, the outgoing frames and the state below."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up = threading.Condition(self._lock)  # notified when a daemon is reached
        self._sock: socket.socket | None = None
        self._reader = FrameReader(CONTROL)
        self._out = bytearray()  # frames the socket has not taken yet
        self._ids = itertools.count(1)  # requests of the application: positive ids
        self._replay_ids = itertools.count(-1, -1)  # our own after a (re)connect: negative
        self._replays: dict[int, tuple[str, str]] = {}  # id -> (op, name)
        self._pending: dict[int, _Pending] = {}
        self.names: dict[str, _Name] = {}
        self._flows: weakref.WeakValueDictionary[int, Connection] = weakref.WeakValueDictionary()
        self._flow_info: dict[int, dict[str, Any]] = {}
        self.path: Path | None = None
        self.hello: dict[str, Any] = {}
        self.last_error: str = ""  # why the last attempt to reach a daemon failed
        # a daemon cannot be started here until the operator acts (the socket's directory is
        # unsafe): requests fail at once with this, instead of waiting (retries go on)
        self._refused: str = ""
        self._refusal: type[DaemonUnavailable] = DaemonUnavailable  # what it is raised as
        self._nodes = node_of_cpu()
        self._placed: dict[str, tuple[tuple[int, ...], int]] = {}
        self._next_report = 0.0
        self._starting: tuple[float, Path] | None = None  # a daemon we started: until when
        self._retry = _RETRY_FIRST_S
        self._stopped = False
        # the daemon was stopped on purpose (`fable daemon --stop`): not reached or started
        # again until the application registers a name; other requests fail with this
        self._halted = ""
        # an unexpected error in this link's control-thread work: the next request raises it
        # (as DaemonUnavailable), and the link starts over
        self._failure = ""
        ctl = control()
        ctl.call_later(0.0, self._connect_tick)
        ctl.call_later(PLACEMENT_INTERVAL_S, self._report_tick)

    # ------------------------------------------------------------------------ requests
    def request(
        self, op: str, wait: float | None = DEFAULT_WAIT_S, **fields: Any
    ) -> tuple[dict[str, Any], int | None]:
        """Send a request and wait up to ``wait`` s for its reply (and for a daemon, while
        none is reachable); raises the error class the daemon names."""
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            if self._failure:
                failure, self._failure = self._failure, ""
                raise DaemonUnavailable(f"the fable control thread failed ({failure}); retrying")
            while self._sock is None:
                if self._halted:
                    if op != "register":
                        raise DaemonUnavailable(self._halted)
                    self._halted = ""  # the application wants a daemon again
                    control().call_later(0.0, self._connect_tick)
                if self._refused:
                    raise self._refusal(f"no fable daemon can be used: {self._refused}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    why = f" ({self.last_error})" if self.last_error else ""
                    raise DaemonUnavailable(f"no fable daemon could be reached or started{why}")
                self._up.wait(left)
            rid = next(self._ids)
            slot = self._pending[rid] = _Pending()
            try:
                self._queue({"op": op, "id": rid, **fields})
            except DaemonUnavailable:
                del self._pending[rid]
                raise
        if not slot.done.wait(
            None if deadline is None else max(0.0, deadline - time.monotonic()) + 1
        ):
            with self._lock:
                self._pending.pop(rid, None)
            raise DaemonUnavailable(f"the daemon did not answer {op!r}")
        if slot.error is not None:
            raise slot.error
        assert slot.reply is not None
        if not slot.reply.get("ok"):
            if slot.fd is not None:
                os.close(slot.fd)
            raise error_class(slot.reply.get("error"))(str(slot.reply.get("message")))
        return slot.reply, slot.fd

    def _queue(self, obj: dict[str, Any]) -> None:
        """Queue a frame and send what the socket takes now (``_lock`` held; never waits)."""
        if len(self._out) > MAX_OUTBOX:
            raise DaemonUnavailable("the daemon does not read its requests")
        self._out += CONTROL.encode(obj)
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            while self._out:
                n = sock.send(self._out, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                del self._out[:n]
        except BlockingIOError:
            pass
        except OSError:
            return  # broken: the control thread sees the hang-up and starts over
        events = select.EPOLLIN | (select.EPOLLOUT if self._out else 0)
        control().modify(sock.fileno(), events)

    # ------------------------------------------------------------- state to replay
    def add_name(self, name: str) -> _Name:
        with self._lock:
            entry = self.names[name] = _Name(tid=threading.get_native_id())
        return entry

    def drop_name(self, name: str) -> None:
        with self._lock:
            self.names.pop(name, None)

    def add_flow(self, flow: dict[str, Any], role: int, conn: Connection, token: str) -> None:
        """A flow this process is an end of (``token``: its secret, which every report of it
        holds)."""
        info = dict(flow, role=role, token=token)
        with self._lock:
            self._flows[flow["id"]] = conn
            self._flow_info[flow["id"]] = info

    def _flow_reports(self) -> list[dict[str, Any]]:
        out = []
        for fid, info in list(self._flow_info.items()):
            conn = self._flows.get(fid)
            if conn is None or conn.closed:
                self._flow_info.pop(fid, None)
                continue
            try:
                st = conn.stats()
            except FableError:
                continue
            out.append(
                {
                    "id": fid,
                    "ends": info["ends"],
                    "transport": st.transport,
                    "safe": [st.safe if info["role"] == k else info["safe"][k] for k in (0, 1)],
                    "role": info["role"],
                    "epoch": st.epoch,
                    "msgs": st.msgs_sent,
                    "bytes": st.bytes_sent,
                    "reason": (conn.last_switch or {}).get("reason") or info.get("reason", ""),
                    "last_switch": conn.last_switch,
                    "pollable": conn.polled,
                    "token": info["token"],
                    "hosts": info.get("hosts") or ["", ""],
                }
            )
        return out

    # ----------------------------------------------------------------- control thread
    def _connect_tick(self) -> float | None:
        """Reach a daemon (starting one if needed) without waiting; the seconds until the
        next try, or None once connected (or halted: ``fable daemon --stop``)."""
        if self._stopped or self._sock is not None or self._halted:
            return None
        try:
            return self._try_connect()
        except Exception as e:  # a bug here must not end the link's retries for good
            self._fault(e)
            return _RETRY_MAX_S

    def _try_connect(self) -> float | None:
        now = time.monotonic()
        try:
            if self._starting is not None:
                until, path = self._starting
                if not _answers(path):
                    if now < until:
                        return 0.01
                    self._starting = None
                    raise DaemonUnavailable(
                        f"started a daemon on {path} but it did not answer in "
                        f"{START_TIMEOUT_S:g} s (see {settings().state_dir / 'fabled.log'})"
                    )
                self._starting = None
            path, may_start = socket_path()
            if not _answers(path):
                if not may_start:
                    raise DaemonUnavailable(f"no daemon answers on {path}")
                try:
                    spawn_daemon(path)
                except UnsafeDirectory as e:
                    with self._lock:
                        self._refused, self._refusal = str(e), DaemonUnavailable
                        self._up.notify_all()
                    raise
                self._starting = (now + START_TIMEOUT_S, path)
                return 0.01
            s = self._trusted_connect(path)
        except (OSError, FableError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            retry, self._retry = self._retry, min(self._retry * 2, _RETRY_MAX_S)
            return retry
        self._connected(s, path)
        return None

    def _trusted_connect(self, path: Path) -> socket.socket:
        """Connect to the daemon on ``path`` if it is one this user may trust (its directory
        before, its process's uid after: ``check_daemon_dir``, ``check_daemon_peer``); an
        untrusted one makes requests fail at once, naming what was found."""
        try:
            check_daemon_dir(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.setblocking(False)
            try:
                s.connect(str(path))
                check_daemon_peer(s, path)
            except BaseException:
                s.close()
                raise
        except UntrustedDaemon as e:
            with self._lock:
                self._refused, self._refusal = str(e), UntrustedDaemon
                self._up.notify_all()
            raise
        return s

    def _connected(self, s: socket.socket, path: Path) -> None:
        """Say hello and (after a restart) register our names and listeners and report our
        flows again, before anything the application sends (frames go out in order)."""
        with self._lock:
            self._sock, self.path = s, path
            self._reader = FrameReader(CONTROL)
            self._out.clear()
            self._replays.clear()
            self._placed = {}
            control().watch(s.fileno(), self._on_ready)

            def replay(obj: dict[str, Any], name: str = "") -> None:
                rid = next(self._replay_ids)
                self._replays[rid] = (obj["op"], name)
                self._queue({**obj, "id": rid})

            replay({"op": "hello", "pid": os.getpid(), "lib": __version__})
            for name, entry in self.names.items():
                if not entry.registered:
                    continue  # its own register request is on its way
                facts = thread_placement(entry.tid, self._nodes)
                replay({"op": "register", "name": name, **facts}, name)
                if entry.listening:
                    replay(
                        {
                            "op": "listen",
                            "name": name,
                            "trusted": entry.trusted,
                            "allow_uids": entry.allow_uids,
                            "allow_remote": entry.allow_remote,
                            "allow_hosts": entry.allow_hosts,
                        },
                        name,
                    )
            for frame in _report_frames(self._flow_reports(), []):
                replay(frame)
            self.last_error = self._refused = ""
            self._up.notify_all()

    def _fault(self, e: BaseException) -> None:
        """An unexpected error in the link's work on the control thread: logged; the next
        request raises it as ``DaemonUnavailable``; the link starts over (what was in flight
        fails, the daemon is reached again and this process's state registered again)."""
        log.error("fable: the daemon link failed; starting over", exc_info=e)
        with self._lock:
            if not self._pending:  # (requests in flight fail with it in _lost)
                self._failure = f"{type(e).__name__}: {e}"
            connected = self._sock is not None
        if connected:  # (else the connect ticks go on as they are)
            self._lost(f"internal error: {type(e).__name__}: {e}")

    def _on_ready(self, events: int) -> bool:
        """The daemon socket is readable or writable (the control thread)."""
        try:
            return self._serve_socket(events)
        except Exception as e:
            self._fault(e)
            return False

    def _serve_socket(self, events: int) -> bool:
        if events & select.EPOLLOUT:
            with self._lock:
                self._flush()
        if not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return True
        sock = self._sock
        if sock is None:
            return False
        try:
            while True:
                try:
                    n = self._reader.read_from(sock, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return True
                while (got := self._reader.pop()) is not None:
                    self._dispatch(*got)
                if n == 0:
                    raise EOFError("the daemon closed the connection")
        except (OSError, EOFError, FableError) as e:
            self._lost(f"{type(e).__name__}: {e}")
            return False

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        close_fds(fds[1:])
        fd = fds[0] if fds else None
        rid = msg.get("id")
        if rid is None:
            self._push(msg, fd)
            return
        if not isinstance(rid, int):
            if fd is not None:
                os.close(fd)
            raise ProtocolError(f"a reply from the daemon with id {rid!r}")
        if fd is not None and rid < 0:
            os.close(fd)
            fd = None
        with self._lock:
            slot = self._pending.pop(rid, None)
            replay = self._replays.pop(rid, None)
        if replay is not None:
            self._replayed(replay, msg)
        if slot is None:  # a report's answer, or our own
            if fd is not None:
                os.close(fd)
            return
        slot.reply, slot.fd = msg, fd
        slot.done.set()

    def _replayed(self, what: tuple[str, str], msg: dict[str, Any]) -> None:
        op, name = what
        if op == "hello":
            if not msg.get("ok"):  # e.g. a daemon of another fable version
                raise error_class(msg.get("error"))(str(msg.get("message")))
            self.hello = msg
            self._retry = _RETRY_FIRST_S  # (not before: a daemon that refuses us is retried
            # less and less often)
        elif op == "register" and not msg.get("ok"):
            entry = self.names.get(name)
            if entry is not None:  # taken meanwhile: its listener must not wait in vain
                entry.lost = str(msg.get("message", "taken"))
                entry.lost_error = error_class(msg.get("error"))
                entry.incoming.put(None)

    def _lost(self, why: str) -> None:
        """The link broke: fail what was in flight, and find a daemon again."""
        with self._lock:
            if self._sock is not None:
                control().unwatch(self._sock.fileno())
                self._sock.close()
            self._sock = None
            self._out.clear()
            self._reader.close()
            for slot in self._pending.values():
                slot.error = DaemonUnavailable(f"the daemon went away during the request ({why})")
                slot.done.set()
            self._pending.clear()
            self.last_error = why
        control().call_later(self._retry, self._connect_tick)

    def _report_tick(self) -> float | None:
        """Report counters every REPORT_INTERVAL_S, and at once when an I/O thread moved."""
        if self._stopped:
            return None
        try:
            return self._report()
        except Exception as e:
            self._fault(e)
            return PLACEMENT_INTERVAL_S

    def _report(self) -> float | None:
        if self._sock is None:
            return PLACEMENT_INTERVAL_S
        now = time.monotonic()
        if now >= self._next_report or (self._flows and self._placement_moved()):
            with self._lock:
                try:
                    places = [
                        {"name": n, **thread_placement(e.tid, self._nodes)}
                        for n, e in self.names.items()
                    ]
                    for frame in _report_frames(self._flow_reports(), places):
                        self._queue({**frame, "id": next(self._ids)})
                except DaemonUnavailable:
                    pass  # the daemon does not read: its hang-up or our next try says more
            self._next_report = now + REPORT_INTERVAL_S
        return PLACEMENT_INTERVAL_S

    def _placement_moved(self) -> bool:
        """Whether an I/O thread's affinity or NUMA node changed since the last report (an
        operator's ``taskset``: the daemon's placement trigger wants to know at once)."""
        moved = False
        for n, e in list(self.names.items()):
            f = thread_placement(e.tid, self._nodes)
            key = (tuple(f["affinity"]), f["node"])
            if self._placed.get(n) != key:
                self._placed[n] = key
                moved = True
        return moved

    def _push(self, msg: dict[str, Any], fd: int | None) -> None:
        if msg.get("op") == "bye":  # refused (a limit): the daemon closes; we try again later
            if fd is not None:
                os.close(fd)
            raise error_class(msg.get("error"))(f"the daemon refused us: {msg.get('message')}")
        if msg.get("op") == "stopping":  # `fable daemon --stop`: stay away until registered
            self._halt(f"the daemon was stopped on purpose ({msg.get('why')})")
            return
        if msg.get("op") == "reconfigure":  # from `fable reconfigure` or a trigger
            self._reconfigure(msg)
            return
        if msg.get("op") == "incoming" and fd is not None:
            entry = self.names.get(str(msg.get("listener")))
            if entry is not None:
                entry.incoming.put((msg, socket.socket(fileno=fd)))
                return
        if fd is not None:
            os.close(fd)

    def _halt(self, why: str) -> None:
        """The daemon is stopping on purpose: pending accepts raise ``DaemonUnavailable``, our
        names are not registered again, and no daemon is reached or started until the
        application registers a name (``request``)."""
        with self._lock:
            self._halted = why
            for entry in self.names.values():
                entry.registered = False
                entry.lost, entry.lost_error = why, DaemonUnavailable
                entry.incoming.put(None)

    def _reconfigure(self, msg: dict[str, Any]) -> None:
        """Switch the flow a push names: ``safe`` is [form of ends[0], form of ends[1]] (each
        None: that end's most zero-copy form within its trust). A refusal, here or by the
        peer, goes back to the daemon with the push's ``ticket`` (``fable reconfigure``
        prints it)."""
        fid = msg.get("flow")
        conn = self._flows.get(fid)  # type: ignore[arg-type]
        info = self._flow_info.get(fid)  # type: ignore[arg-type]
        if conn is None or conn.closed or info is None:
            return
        forms = msg.get("safe")
        if not (isinstance(forms, list) and len(forms) == 2):
            forms = [None, None]
        role = int(info["role"])
        ticket = msg.get("ticket")

        def answered(error: BaseException | None) -> None:
            if error is not None and ticket is not None:
                with self._lock, contextlib.suppress(DaemonUnavailable):
                    self._queue(
                        {
                            "op": "refused",
                            "id": next(self._ids),
                            "flow": fid,
                            "ticket": ticket,
                            "why": str(error)[:500],
                        }
                    )

        def switch() -> None:
            try:
                conn.reconfigure(
                    str(msg.get("transport")),
                    forms[role] if isinstance(forms[role], bool) else None,
                    peer_safe=forms[1 - role] if isinstance(forms[1 - role], bool) else None,
                    reason=str(msg.get("reason", "asked for by the operator")),
                    wait=False,
                    on_answer=answered,
                )
            except (FableError, ValueError, OSError) as e:  # refused here (busy, no trust...)
                answered(e)

        if conn.crosses_hosts:  # its offer dials the other host: not on the control thread,
            # which must never wait on one peer (up to FABLE_PEER_TIMEOUT for a dead one)
            threading.Thread(target=switch, name="fable-switch", daemon=True).start()
        else:
            switch()

    def close_after_fork(self) -> None:
        """In a forked child: drop the parent's link without touching it."""
        self._stopped = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                os.close(self._sock.detach())


REPORT_BYTES = 24 * 1024  # flows and endpoints in one report frame; more go in further parts


def _report_frames(
    flows: list[dict[str, Any]], endpoints: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One report as frames that fit the daemon's frame limit: every part but the last says
    ``more`` (the daemon forgets the flows a report leaves out only at its last part)."""
    frames: list[dict[str, Any]] = []
    part: dict[str, list[dict[str, Any]]] = {"flows": [], "endpoints": []}
    size = 0
    for key, item in [("flows", f) for f in flows] + [("endpoints", e) for e in endpoints]:
        n = len(json.dumps(item, separators=(",", ":")))
        if size and size + n > REPORT_BYTES:
            frames.append({"op": "report", **part, "more": True})
            part, size = {"flows": [], "endpoints": []}, 0
        part[key].append(item)
        size += n
    frames.append({"op": "report", **part})
    return frames


def _call(s: socket.socket, rid: int, obj: dict[str, Any]) -> dict[str, Any]:
    """Send one request on a socket nobody else reads and return its reply (frames with other
    ids, and any fd that comes with them, are dropped)."""
    try:
        s.sendall(CONTROL.encode({**obj, "id": rid}), socket.MSG_NOSIGNAL)
    except (BrokenPipeError, ConnectionResetError):
        pass  # it hung up: what it said first (a ``bye`` naming a limit) is still to be read
    while True:
        reply, fds = recv_frame(s, FrameReader(CONTROL), None)  # this frame and no further
        close_fds(fds)
        if reply.get("id") == rid:
            return reply
        if reply.get("op") == "bye":  # refused (a limit), then closed
            raise error_class(reply.get("error"))(f"the daemon refused us: {reply.get('message')}")


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply, or the error it names raised."""
    if not reply.get("ok"):
        raise error_class(reply.get("error"))(str(reply.get("message")))
    return reply


_link: PerProcess[DaemonLink] = PerProcess(DaemonLink, DaemonLink.close_after_fork)


def link() -> DaemonLink:
    """This process's daemon link, started on first use."""
    return _link.get()


_PAGED = {"ls": "endpoints", "flows": "flows"}  # listings the daemon answers a page at a time


def one_shot(op: str, path: Path | None = None, **fields: Any) -> dict[str, Any] | None:
    """One request on a connection of its own, for the CLI (never starts a daemon): the reply,
    or None when no daemon answers. A listing (``ls``, ``flows``) comes whole: its pages are
    asked for one after another on this connection (a listing that changes meanwhile may miss
    what was added behind the page being read)."""
    if path is None:
        path, _ = socket_path()
    try:
        check_daemon_dir(path)
    except UntrustedDaemon:
        raise
    except DaemonUnavailable:
        return None  # no directory: no daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(5.0)
        try:
            s.connect(str(path))
        except OSError:
            return None
        check_daemon_peer(s, path)
        rid = itertools.count(1)
        _checked(_call(s, next(rid), {"op": "hello", "pid": os.getpid(), "lib": __version__}))
        reply = _checked(_call(s, next(rid), {"op": op, **fields}))
        key = _PAGED.get(op)
        page = reply
        while key is not None and page.get("more"):
            page = _checked(_call(s, next(rid), {"op": op, **fields, "after": page["next"]}))
            reply[key].extend(page[key])
        reply.pop("more", None)
        reply.pop("next", None)
        return reply
    finally:
        s.close()


@contextlib.contextmanager
def private_daemon() -> Iterator[Path]:
    """A daemon of our own on a fresh socket, for this process and its children (the bench's
    ``auto`` row): ``FABLE_SOCKET`` points at it inside the block; it is stopped afterwards."""
    import tempfile

    from fable import config

    d = Path(tempfile.mkdtemp(prefix="fable-bench-"))
    path = d / "fabled.sock"
    old = os.environ.get("FABLE_SOCKET")
    os.environ["FABLE_SOCKET"] = str(path)
    config.reload()
    proc = None
    try:
        proc = start_daemon(path)
        yield path
    finally:
        with contextlib.suppress(Exception):
            one_shot("stop", path)
        deadline = time.monotonic() + 5
        while _answers(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ValueError):
                _spawned.remove(proc)
        if old is None:
            os.environ.pop("FABLE_SOCKET", None)
        else:
            os.environ["FABLE_SOCKET"] = old
        config.reload()
        import shutil

        shutil.rmtree(d, ignore_errors=True)
