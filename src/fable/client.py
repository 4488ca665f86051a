"""The library's side of the daemon protocol: one connection to ``fabled`` per process, held by
one control thread.

The control thread is the only reader of the daemon socket: it matches replies to requests (any
thread may send one), queues ``incoming`` connections for listeners, and reports this process's
flows and counters about once a second. If the daemon dies, existing connections keep working
(the daemon is not on the data path); the control thread finds a daemon again (starting one if
needed) and re-registers this process's names, listeners and flows, so a pending ``accept``
simply goes on waiting. A request that was in flight when the daemon died raises
``DaemonUnavailable``; a request made while none can be reached waits up to its timeout.

Which daemon: ``$FABLE_SOCKET`` if set; else the per-user socket if a daemon answers there;
else the system socket (``/run/fable/fabled.sock``) if one answers; else a per-user daemon is
started (a detached ``python -m fable.daemon``, logging to the state dir), under a lock next to
its socket so that two processes starting at once start one daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
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
from fable.errors import DaemonUnavailable, FableError
from fable.nameservice import CONTROL, SYSTEM_SOCKET, error_class, private_dir, user_socket
from fable.topology import node_of_cpu, thread_placement
from fable.version import __version__

__all__ = ["DaemonLink", "link", "socket_path"]

REPORT_INTERVAL_S = 1.0
PLACEMENT_INTERVAL_S = 0.02  # how often I/O threads' affinities are looked at (see _serve)
_START_TIMEOUT_S = 10.0
_DEFAULT_WAIT_S = 10.0


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
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


def start_daemon(path: Path) -> subprocess.Popen[bytes] | None:
    """Start a detached daemon on ``path`` unless one answers there (then None); safe against
    races (a lock file next to the socket)."""
    _spawned[:] = [p for p in _spawned if p.poll() is None]
    if path.parent != SYSTEM_SOCKET.parent:
        private_dir(path.parent)
    lock = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(path):
            return None
        state = private_dir(settings().state_dir)
        with open(state / "fabled.log", "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fable.daemon", "--socket", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,  # detached: not killed with our process group
                close_fds=True,
            )
        _spawned.append(proc)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _answers(path):
            if time.monotonic() > deadline:
                raise DaemonUnavailable(
                    f"started a daemon on {path} but it did not answer in {_START_TIMEOUT_S:g} s "
                    f"(see {state / 'fabled.log'})"
                )
            time.sleep(0.01)
        return proc
    finally:
        os.close(lock)


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
    incoming: queue.Queue[tuple[dict[str, Any], socket.socket]] = field(default_factory=queue.Queue)


class DaemonLink:
    """This process's daemon connection and control thread (get it with :func:`link`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # sending, and the state below
        self._sock: socket.socket | None = None
        self._up = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self.names: dict[str, _Name] = {}
        self._flows: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._flow_info: dict[int, dict[str, Any]] = {}
        self._stop = False
        self.path: Path | None = None
        self.hello: dict[str, Any] = {}
        self.last_error: str = ""  # why the last attempt to reach a daemon failed
        self._nodes = node_of_cpu()
        self._thread = threading.Thread(target=self._run, name="fable-control", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------ requests
    def request(
        self, op: str, wait: float | None = _DEFAULT_WAIT_S, **fields: Any
    ) -> tuple[dict[str, Any], int | None]:
        """Send a request and wait up to ``wait`` s for its reply (and for a daemon, while
        none is reachable); raises the error class the daemon names."""
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            while self._sock is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    why = f" ({self.last_error})" if self.last_error else ""
                    raise DaemonUnavailable(f"no fable daemon could be reached or started{why}")
                self._up.wait(left)
            rid = next(self._ids)
            slot = self._pending[rid] = _Pending()
            try:
                self._send({"op": op, "id": rid, **fields})
            except OSError:
                del self._pending[rid]
                raise DaemonUnavailable("the daemon connection broke") from None
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

    def _send(self, obj: dict[str, Any]) -> None:
        assert self._sock is not None
        self._sock.sendall(CONTROL.encode(obj), socket.MSG_NOSIGNAL)

    # ------------------------------------------------------------- state to replay
    def add_name(self, name: str) -> _Name:
        with self._lock:
            entry = self.names[name] = _Name(tid=threading.get_native_id())
        return entry

    def drop_name(self, name: str) -> None:
        with self._lock:
            self.names.pop(name, None)

    def add_flow(self, flow: dict[str, Any], role: int, conn: Any) -> None:
        info = dict(flow, role=role)
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
                    "safe": info["safe"],
                    "epoch": st.epoch,
                    "msgs": st.msgs_sent,
                    "bytes": st.bytes_sent,
                    "reason": conn._switcher.reason or info.get("reason", ""),
                    "last_switch": conn.last_switch,
                    "pollable": conn._switcher.fd_out,
                }
            )
        return out

    # ----------------------------------------------------------------- control thread
    def _connect(self) -> socket.socket:
        path, may_start = socket_path()
        if not _answers(path):
            if not may_start:
                raise DaemonUnavailable(f"no daemon answers on {path}")
            start_daemon(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(5.0)
        s.connect(str(path))
        self.path = path
        return s

    def _replay(self, s: socket.socket) -> None:
        """Say hello, then (after a restart) register our names and listeners and report our
        flows, before anyone else may send."""
        ids = itertools.count(-1, -1)

        def call(obj: dict[str, Any]) -> dict[str, Any]:
            return _call(s, next(ids), obj)

        self.hello = call({"op": "hello", "pid": os.getpid(), "lib": __version__})
        if not self.hello.get("ok"):  # e.g. a daemon of another fable version
            raise error_class(self.hello.get("error"))(str(self.hello.get("message")))
        for name, entry in list(self.names.items()):
            if not entry.registered:
                continue  # its own register request is on its way
            r = call({"op": "register", "name": name, **thread_placement(entry.tid, self._nodes)})
            if not r.get("ok"):
                continue  # taken meanwhile: the name is lost, its listener waits in vain
            if entry.listening:
                call(
                    {
                        "op": "listen",
                        "name": name,
                        "trusted": entry.trusted,
                        "allow_uids": entry.allow_uids,
                    }
                )
        call({"op": "report", "flows": self._flow_reports()})

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop:
            try:
                s = self._connect()
                with self._lock:
                    self._replay(s)
                    s.settimeout(None)
                    self._sock = s
                    self._up.notify_all()
                backoff = 0.05
                self.last_error = ""
                self._serve(s)
            except (OSError, FableError, EOFError) as e:
                self.last_error = f"{type(e).__name__}: {e}"
            with self._lock:
                if self._sock is not None:
                    self._sock.close()
                self._sock = None
                for slot in self._pending.values():
                    slot.error = DaemonUnavailable("the daemon went away during the request")
                    slot.done.set()
                self._pending.clear()
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

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

    def _serve(self, s: socket.socket) -> None:
        next_report = time.monotonic() + REPORT_INTERVAL_S
        self._placed: dict[str, tuple[tuple[int, ...], int]] = {}
        while not self._stop:
            left = min(next_report - time.monotonic(), PLACEMENT_INTERVAL_S)
            if left <= 0 or not select.select([s], [], [], left)[0]:
                if time.monotonic() < next_report and not (self._flows and self._placement_moved()):
                    continue
                with self._lock:
                    self._send(
                        {
                            "op": "report",
                            "id": next(self._ids),
                            "flows": self._flow_reports(),
                            "endpoints": [
                                {"name": n, **thread_placement(e.tid, self._nodes)}
                                for n, e in self.names.items()
                            ],
                        }
                    )
                next_report = time.monotonic() + REPORT_INTERVAL_S
                continue
            msg, fd = _read_frame(s)
            rid = msg.get("id")
            if rid is None:
                self._push(msg, fd)
                continue
            with self._lock:
                slot = self._pending.pop(rid, None)
            if slot is None:  # a report's answer
                if fd is not None:
                    os.close(fd)
                continue
            slot.reply, slot.fd = msg, fd
            slot.done.set()

    def _push(self, msg: dict[str, Any], fd: int | None) -> None:
        if msg.get("op") == "reconfigure":  # from `fable reconfigure`
            conn = self._flows.get(msg.get("flow"))  # type: ignore[arg-type]
            if conn is not None and not conn.closed:
                try:
                    conn.reconfigure(
                        str(msg.get("transport")),
                        msg.get("safe"),
                        reason=str(msg.get("reason", "asked for by the operator")),
                        wait=False,
                    )
                except (FableError, ValueError, OSError):
                    pass  # refused here (busy, no trust...): the flow stays as it is
            return
        if msg.get("op") == "incoming" and fd is not None:
            entry = self.names.get(str(msg.get("listener")))
            if entry is not None:
                entry.incoming.put((msg, socket.socket(fileno=fd)))
                return
        if fd is not None:
            os.close(fd)

    def close_after_fork(self) -> None:
        self._stop = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                os.close(self._sock.detach())


def _call(s: socket.socket, rid: int, obj: dict[str, Any]) -> dict[str, Any]:
    """Send one request on a socket nobody else reads and return its reply (frames with other
    ids, and any fd that comes with them, are dropped)."""
    s.sendall(CONTROL.encode({**obj, "id": rid}), socket.MSG_NOSIGNAL)
    while True:
        reply, fd = _read_frame(s)
        if fd is not None:
            os.close(fd)
        if reply.get("id") == rid:
            return reply


def _read_frame(s: socket.socket) -> tuple[dict[str, Any], int | None]:
    """The next frame from the daemon and the one fd it may carry (extra fds are closed)."""
    msg, fds = recv_frame(s, FrameReader(CONTROL), None)  # reads this frame and no further
    close_fds(fds[1:])
    return msg, (fds[0] if fds else None)


_link: DaemonLink | None = None
_link_lock = threading.Lock()


def link() -> DaemonLink:
    """This process's daemon link, started on first use."""
    global _link
    with _link_lock:
        if _link is None:
            _link = DaemonLink()
        return _link


def _forget_in_child() -> None:
    global _link
    if _link is not None:
        _link.close_after_fork()
    _link = None


os.register_at_fork(after_in_child=_forget_in_child)


def one_shot(op: str, path: Path | None = None, **fields: Any) -> dict[str, Any] | None:
    """One request on a connection of its own, for the CLI (never starts a daemon): the reply,
    or None when no daemon answers."""
    if path is None:
        path, _ = socket_path()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(5.0)
        try:
            s.connect(str(path))
        except OSError:
            return None
        for rid, obj in (
            (1, {"op": "hello", "pid": os.getpid(), "lib": __version__}),
            (2, {"op": op, **fields}),
        ):
            reply = _call(s, rid, obj)
            if not reply.get("ok"):
                raise error_class(reply.get("error"))(str(reply.get("message")))
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
