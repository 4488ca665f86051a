"""Live reconfiguration: move a connection to another transport without losing a message.

    X (asks: conn.reconfigure)                  Y
    ------------------------------------------  ------------------------------------------
    create epoch e+1, open X's end
    setup: PROPOSE(e+1, transport, safe,  ──►   noticed by the control thread, or by any call
           params) + fds                        that reads the setup channel; Y opens its end
    (X keeps writing on epoch e)          ◄──   setup: ACCEPT(e+1)    (or REFUSE(e+1, why): the
                                                 connection stays on epoch e)
                                                Y's next write (or its control thread, if Y
    X's next write after ACCEPT (or X's         is not writing): END(e) in band on e, then
    control thread): END(e) in band on e,       every write goes to e+1
    then every write goes to e+1
    each reader: reads e up to the peer's END(e), then e+1 (a message never straddles epochs:
    END is written between whole messages, after every write buffer of e is committed)
    each side, once it wrote END(e) and read the peer's: setup: DONE(e)
    each side frees its end of e once it sent DONE(e) and got the peer's

- END(e) is the transport's in-band close record: it follows every message of epoch e, so it
  can never overtake data. A reader tells END from a real close by the ACCEPT or PROPOSE that
  preceded it on the setup channel.
- Both sides ask at once: the proposal of the side that set the connection up (role 0) wins;
  the other side drops its own and accepts.
- Write buffers of epoch e that the application holds keep the write switch waiting (writes
  go on in epoch e meanwhile, in order); when they are still held after the grace period
  (``FABLE_GRACE_PERIOD``), the connection fails with an error naming them. Read buffers of
  epoch e stay valid: release them any time.
- Until the first reconfiguration a connection's hot methods are bound straight to its
  transport; the switch rebinds them (writes through a wrapper until the write switch is done).
  A method the application looked up before the switch still works: after END (writes) or the
  peer's END (reads) the old path forwards the call to the connection's current one.
- ``fileno()`` is an epoll fd of the connection's own that follows the path being read.
- Lock order: ``wlock`` (one write switch, and writes while one is pending) before ``lock``
  (the state here); ``lock`` is never held while waiting for the peer.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import select
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fable._wire import close_fds
from fable.config import settings
from fable.errors import DeadBuffer, FableError, PermissionDenied, ProtocolError, Timeout
from fable.transports.base import ConnectionStats, DataPath, EndSpec

if TYPE_CHECKING:
    from fable.connection import Connection
    from fable.transports.setup import SetupChannel

__all__ = ["CONTROL_OPS", "Switcher"]

IDLE_TICK = 0.005  # seconds between the control thread's looks at a pending write switch

PROPOSE, ACCEPT, REFUSE, DONE = "reconfig", "reconfig-accept", "reconfig-refuse", "reconfig-done"
CONTROL_OPS = frozenset({PROPOSE, ACCEPT, REFUSE, DONE})
WRITE_NAMES = ("getwritebuf", "commit", "abort", "flush", "send", "send_many")
READ_NAMES = ("getreadbuf", "recv", "recv_into")


@dataclass
class _Proposal:
    epoch: int
    path: DataPath
    reason: str
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class Switcher:
    """One connection's transports across epochs, and the switch protocol (module docstring).

    ``tx`` takes writes; ``rx`` (oldest first) are the paths being read: the first until the
    peer's END on it. ``lock`` guards everything here and is never held while waiting for the
    peer; the write switch runs on the writing thread, the read switch on the reading thread,
    control records wherever they are seen."""

    def __init__(self, conn: Connection, path: DataPath, setup: SetupChannel, role: int) -> None:
        self._conn = weakref.ref(conn)
        self.ch = setup
        self.role = role
        self.lock = threading.RLock()
        self.wlock = threading.RLock()  # writes while a switch is pending (see switch_writes)
        self.epoch = path.epoch  # newest epoch both sides agreed on
        self.tx: DataPath = path
        self.tx_pending: list[DataPath] = []  # agreed; writes move there at the next write
        self.rx: list[DataPath] = [path]
        self.proposal: _Proposal | None = None
        self.ends: dict[int, set[str]] = {}  # epoch -> {"tx", "rx", "sent", "peer"}
        self.by_epoch: dict[int, DataPath] = {path.epoch: path}  # paths not yet freed
        self.owned: weakref.WeakSet[DataPath] = weakref.WeakSet([path])  # every path, ever
        self.grace_deadline = 0.0
        self.carried = [0, 0, 0, 0]  # counters of freed paths: msgs/bytes out, msgs/bytes in
        self.last_switch: dict[str, Any] | None = None
        self.reason = ""
        self.trusted = not path.safe
        self._fd_r = self._fd_w = -1  # reconfig_fileno, made on first use
        self._ep: select.epoll | None = None  # fileno(): follows the path being read
        self._ep_src = -1  # the fd registered in _ep (the read head's own fileno)
        self._kick = -1  # an always-readable eventfd in _ep while the head spins (see below)
        self._ender: threading.Thread | None = None  # idle_switch's thread, while it runs
        # the application named the transport (open_pair, connect(transport=...)): fileno()
        # on a spinning connection raises instead of moving it (Connection.fileno)
        self.forced = True
        _hook(path, self)

    # ------------------------------------------------------------------ asking
    def reconfigure(
        self, transport: str, safe: bool | None, reason: str, wait: bool, timeout: float | None
    ) -> None:
        from fable.transports import REGISTRY

        info = REGISTRY.get(transport)
        if info is None:
            raise ValueError(f"unknown transport {transport!r}; known: {', '.join(REGISTRY)}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # one request at a time: wait for the peer's answer to the previous one
            with self.lock:
                self.pump()
                prev = self.proposal
                if prev is None:
                    break
            if not wait or (deadline is not None and time.monotonic() > deadline):
                raise FableError("a reconfiguration of this connection is in progress")
            prev.done.wait(0.01)  # set by whoever reads the answer (see wait)
        with self.lock:
            if self.proposal is not None:
                raise FableError("a reconfiguration of this connection is in progress")
            if safe is None:
                safe = self.newest.safe if self.newest.safe in info.caps.forms else True
            why = info.no_form(safe)
            if why is not None:
                raise ValueError(why)
            if self._ep is not None and info.caps.spins:
                raise FableError(
                    f"fileno() of this connection was handed out: {transport} spins and has "
                    "no readiness fd"
                )
            if not safe and not self.trusted:
                raise PermissionDenied(
                    "unsafe (zero-copy) reads need this side's trust (trusted=True)"
                )
            epoch = self.epoch + 1
            local, remote = info.create({})
            try:
                path = info.open(local, 0, safe, self.ch, epoch)
            except BaseException:
                close_fds(remote.fds)
                raise
            try:
                self.ch.send(
                    {
                        "op": PROPOSE,
                        "epoch": epoch,
                        "transport": transport,
                        "safe": safe,
                        "params": remote.params,
                        "reason": reason[:500],
                    },
                    remote.fds,
                )
            except BaseException:
                _teardown(path)
                raise
            finally:
                close_fds(remote.fds)
            self.proposal = _Proposal(epoch, path, reason)
            self._signal(True)
        if wait:
            self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float | None) -> None:
        """Wait until the peer accepted or refused our proposal (``FableError`` if refused)."""
        prop = self.proposal
        if prop is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not prop.done.is_set():
            self.pump()
            if prop.done.is_set():
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout("the peer did not answer the reconfiguration in time")
            # The control thread watches the setup channel too and may take the answer first
            # (then it sets ``done``): wait on the event, and look at the channel now and then
            # in case no control thread does.
            prop.done.wait(min(0.01, left) if left is not None else 0.01)
        if prop.error is not None:
            raise FableError(f"the peer refused to switch: {prop.error}")

    @property
    def busy(self) -> bool:
        return self.proposal is not None or bool(self.tx_pending) or len(self.rx) > 1

    @property
    def newest(self) -> DataPath:
        if self.tx_pending:
            return self.tx_pending[-1]
        return self.by_epoch.get(self.epoch) or self.tx

    # ------------------------------------------------------------------ control records
    def pump(self) -> None:
        """Handle every control record waiting on the setup channel (never blocks long)."""
        with self.lock:
            while True:
                op = self.ch.peek_op()
                if op not in CONTROL_OPS:
                    return
                record, fds = self.ch.recv(1.0)
                try:
                    self._handle(record, fds)
                except ProtocolError as e:
                    self._fail(e)
                    raise

    def _handle(self, rec: dict[str, Any], fds: list[int]) -> None:
        op, epoch = rec.get("op"), rec.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            close_fds(fds)
            raise ProtocolError(f"reconfiguration record without a valid epoch: {rec!r:.200}")
        if op != PROPOSE:
            close_fds(fds)
        if op == PROPOSE:
            self._on_propose(rec, epoch, fds)
        elif op in (ACCEPT, REFUSE):
            prop = self.proposal
            if prop is None or prop.epoch != epoch:
                return  # an answer to a proposal we dropped (both asked at once): ignore
            self.proposal = None
            if op == ACCEPT:
                self._agree(prop.path, epoch, prop.reason, prop.started)
            else:
                prop.error = str(rec.get("why", "refused"))[:500]
                _teardown(prop.path)
                self._signal(self.busy)
            prop.done.set()
        elif op == DONE:
            self.ends.setdefault(epoch, set()).add("peer")
            self._maybe_free(epoch)

    def _on_propose(self, rec: dict[str, Any], epoch: int, fds: list[int]) -> None:
        from fable.transports import REGISTRY

        mine = self.proposal
        if mine is not None and mine.epoch == epoch:
            if self.role == 0:
                close_fds(fds)  # both asked at once: ours wins, the peer will accept it
                return
            self.proposal = None  # theirs wins: drop ours
            mine.error = "the peer asked for another switch at the same time (its request won)"
            _teardown(mine.path)
            mine.done.set()
        if epoch != self.epoch + 1:
            close_fds(fds)
            raise ProtocolError(f"reconfiguration to epoch {epoch} while at epoch {self.epoch}")
        name, safe, params = rec.get("transport"), rec.get("safe"), rec.get("params")
        info = REGISTRY.get(name) if isinstance(name, str) else None
        why = None
        if info is None or not isinstance(safe, bool) or not isinstance(params, dict):
            why = f"unknown transport or malformed request ({name!r})"
        elif safe not in info.caps.forms:
            why = f"{name} has no {'safe' if safe else 'unsafe'} form"
        elif not safe and not self.trusted:
            why = "this side does not trust its peer: no unsafe (zero-copy) reads"
        elif self._ep is not None and info.caps.spins:
            why = f"fileno() was handed out on this side: {name} spins and has no readiness fd"
        path = None
        if why is None:
            assert info is not None and isinstance(safe, bool) and isinstance(params, dict)
            try:
                path = info.open(EndSpec(fds, params), 1, safe, self.ch, epoch)
            except Exception as e:  # the peer's resources did not check out: stay on epoch e
                why = f"{type(e).__name__}: {e}"
        else:
            close_fds(fds)
        if path is None:
            self.ch.send({"op": REFUSE, "epoch": epoch, "why": why})
            return
        self.ch.send({"op": ACCEPT, "epoch": epoch})
        self._agree(path, epoch, str(rec.get("reason", "asked for by the peer"))[:500], None)

    def _agree(self, path: DataPath, epoch: int, reason: str, started: float | None) -> None:
        old = self.by_epoch[self.epoch]
        self.epoch = epoch
        self.by_epoch[epoch] = path
        self.owned.add(path)
        self.tx_pending.append(path)
        self.rx.append(path)
        _hook(path, self)
        self.grace_deadline = time.monotonic() + settings().grace_period_s
        self.reason = reason
        self.last_switch = {
            "at": time.time(),
            "from": old.transport,
            "to": path.transport,
            "reason": reason,
        }
        conn = self._conn()
        if conn is not None:
            d = conn.__dict__
            for name in WRITE_NAMES:  # the next write switches first
                d[name] = functools.partial(self._write, name)
            d["release"] = self.release
        self._signal(True)

    # ------------------------------------------------------------------ the write switch
    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A write while a switch is pending (or one that reached a path after its END):
        switch first where possible, then write, holding ``wlock`` so that the control
        thread does not end the path under it (``idle_switch``)."""
        with self.wlock:
            if self.tx_pending:
                self.switch_writes()
            return getattr(self.tx, name)(*args, **kwargs)

    forward = _write  # where a path sends writes that reach it after its END

    def read_forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Where a path sends reads that reach it after the peer's END on it (a method the
        application looked up before the switch): the path being read now."""
        return getattr(self.rx[0], name)(*args, **kwargs)

    def idle_switch(self) -> None:
        """From the control thread: finish a pending write switch the application does not
        do because it is not writing (a quiet side would otherwise keep the peer reading the
        old path, spinning, and both ends' resources, until its next write). Only when no
        write is under way: ``wlock`` free, no write buffer held, no thread inside a write
        method of the old path (a write that looked the method up before the switch and
        calls it later is forwarded by the path, after its END, to the next one). END is
        written on a thread of its own: it may wait for the peer to read, and the control
        thread serves every connection of the process."""
        if not self.tx_pending or (self._ender is not None and self._ender.is_alive()):
            return
        if self._idle() is not None:
            self._ender = threading.Thread(target=self._end_idle, name="fable-end", daemon=True)
            self._ender.start()

    def _idle(self) -> DataPath | None:
        """The path to end if this side is not writing now (the caller holds the GIL)."""
        if not self.tx_pending or not self.wlock.acquire(blocking=False):
            return None
        try:
            old = self.tx
            if not self.tx_pending or _write_buffers_held(old) or _writing_on(old):
                return None
            return old
        finally:
            self.wlock.release()

    def _end_idle(self) -> None:
        with self.wlock:  # the application may have started writing meanwhile: look again
            if self._idle() is None:
                return
            with contextlib.suppress(Exception):  # a failed END fails the path: its
                self.switch_writes()  # application hears of it at its next call

    def switch_writes(self, force: bool = False, linger: float | None = None) -> None:
        """END(e) on the old path and writes to the next one (through every agreed epoch),
        unless write buffers of the old path are still held (then later; past the grace
        period the connection fails).

        Writing END may wait for the peer's reader (a full ring or pipe), and the peer's reader
        may need this side's ``lock`` to move on to the epoch the peer's own END is stuck in:
        END is written holding only ``wlock`` (one write switch at a time), never ``lock``."""
        with self.wlock:
            while True:
                with self.lock:
                    if not self.tx_pending:
                        return
                    old = self.tx
                    if not force and _write_buffers_held(old):
                        if time.monotonic() > self.grace_deadline:
                            raise self._fail(
                                FableError(
                                    f"write buffers of epoch {old.epoch} ({old.transport}) were "
                                    "held past the grace period "
                                    f"({settings().grace_period_s:g} s, FABLE_GRACE_PERIOD) of a "
                                    "reconfiguration: commit or abort them"
                                )
                            )
                        return
                # waits for room like a write without a timeout (the peer reads, or dies)
                old._end_writes(linger)  # type: ignore[attr-defined]
                with self.lock:
                    nxt = self.tx = self.tx_pending.pop(0)
                    if not self.tx_pending:  # the next write goes straight to the new path
                        conn = self._conn()
                        if conn is not None:
                            d = conn.__dict__
                            for name in WRITE_NAMES:
                                d[name] = getattr(nxt, name)
                    self.ends.setdefault(old.epoch, set()).add("tx")
                    self._maybe_free(old.epoch)

    # ------------------------------------------------------------------ the read switch
    def on_end(self, path: DataPath) -> DataPath | None:
        """Called by ``path`` on the reading thread after it read the peer's in-band end:
        the next path (a switch), or None (the peer closed)."""
        with self.lock:
            with contextlib.suppress(OSError, FableError):
                self.pump()  # the ACCEPT or PROPOSE that came before this END
            if len(self.rx) < 2 or self.rx[0] is not path:
                return None
            self.rx.pop(0)
            path._end_reads()  # type: ignore[attr-defined]
            nxt = self.rx[0]
            self._repoint(nxt)
            conn = self._conn()
            if conn is not None:  # the next read goes straight to the new head
                d = conn.__dict__
                for name in READ_NAMES:
                    d[name] = getattr(nxt, name)
            self.ends.setdefault(path.epoch, set()).add("rx")
            self._maybe_free(path.epoch)
            return nxt

    def release(self, buf: Any) -> None:
        """Read buffers go back to the path (epoch) they came from."""
        owner: Any = getattr(buf, "_owner", None)
        if owner is None or owner not in self.owned:
            raise DeadBuffer("buffer belongs to another connection")
        if owner._closed:  # freed after the switch: the buffer just dies
            owner._take_read(buf)
            return
        owner.release(buf)

    # ------------------------------------------------------------------ freeing
    def _maybe_free(self, epoch: int) -> None:
        ends = self.ends.setdefault(epoch, set())
        if {"tx", "rx"} <= ends and "sent" not in ends:
            with contextlib.suppress(OSError, FableError):
                self.ch.send({"op": DONE, "epoch": epoch})
            ends.add("sent")
        if {"sent", "peer"} <= ends:
            path = self.by_epoch.pop(epoch, None)
            del self.ends[epoch]
            if path is not None:
                st = path.stats()
                for i, v in enumerate(
                    (st.msgs_sent, st.bytes_sent, st.msgs_received, st.bytes_received)
                ):
                    self.carried[i] += v
                _teardown(path)
            self._signal(self.busy)

    def stats(self) -> ConnectionStats:
        live = [p.stats() for p in self.by_epoch.values()]
        cur = self.newest.stats()
        c = self.carried
        return ConnectionStats(
            transport=cur.transport,
            safe=cur.safe,
            epoch=self.epoch,
            msgs_sent=c[0] + sum(s.msgs_sent for s in live),
            bytes_sent=c[1] + sum(s.bytes_sent for s in live),
            msgs_received=c[2] + sum(s.msgs_received for s in live),
            bytes_received=c[3] + sum(s.bytes_received for s in live),
            read_buffers_held=sum(s.read_buffers_held for s in live),
            write_buffers_held=sum(s.write_buffers_held for s in live),
            pending_bytes=sum(s.pending_bytes for s in live),
        )

    # ------------------------------------------------------------------ closing
    def close(self, linger: float) -> None:
        """Close: the pending write switch first (so END and close are in order), wait up to
        ``linger`` for the peer to finish reading old epochs, close the writing path, free
        the rest."""
        deadline = time.monotonic() + linger
        if self.tx_pending:
            with contextlib.suppress(FableError, OSError):
                self.switch_writes(force=True, linger=linger)
        with self.lock:
            prop, self.proposal = self.proposal, None
            if prop is not None:
                _teardown(prop.path)
        while any("tx" in e and "peer" not in e for e in self.ends.values()):
            if time.monotonic() > deadline:
                break
            with contextlib.suppress(OSError, FableError):
                self.pump()
                select.select([self.ch.sock], [], [], 0.02)
        with self.lock:
            tx = self.tx
            try:
                tx.close(max(0.0, deadline - time.monotonic()))
            finally:
                for p in self.by_epoch.values():
                    if p is not tx:
                        _teardown(p)
                self._close_fd()

    def forget(self) -> None:
        for p in list(self.by_epoch.values()):
            with contextlib.suppress(Exception):
                p.forget()
        if self.proposal is not None:
            _teardown(self.proposal.path)
        self._close_fd()

    def _fail(self, exc: BaseException) -> BaseException:
        for p in self.by_epoch.values():
            fail = getattr(p, "_fail", None)
            if fail is not None:
                fail(exc)
        return exc

    # ------------------------------------------------------------------ fileno
    @property
    def fd_out(self) -> bool:
        """Whether the application has the connection's fileno()."""
        return self._ep is not None

    def read_fileno(self) -> int:
        """The connection's readiness fd: an epoll fd, made on first use, that watches the
        path being read and is re-pointed at the next one at each read switch, so the number
        the application registered stays valid. Once handed out, no switch goes to a spinning
        transport (``reconfigure`` raises, a peer's request is refused). While the path being
        read still spins (a switch away from it is agreed but the peer's END not read yet) the
        fd stays readable: spurious wake-ups until the read switch, never a missed one.
        ``io.UnsupportedOperation`` if it spins with no such switch agreed."""
        with self.lock:
            if self._ep is None:
                head = self.rx[0]
                if _spins(head) and not any(not _spins(p) for p in self.rx):
                    raise io.UnsupportedOperation(f"{head.transport} spins and has no readiness fd")
                ep = select.epoll()
                try:
                    self._ep = ep
                    self._watch(head)
                except BaseException:
                    self._ep = None
                    ep.close()
                    raise
            return self._ep.fileno()

    def _watch(self, path: DataPath) -> None:
        """Point the epoll fd at ``path`` (or at the kick while ``path`` spins)."""
        ep = self._ep
        assert ep is not None
        if _spins(path):
            if self._kick < 0:
                self._kick = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fd = self._kick
        else:
            fd = path.fileno()  # arms the path's readiness
        ep.register(fd, select.EPOLLIN)
        self._ep_src = fd

    def _repoint(self, nxt: DataPath) -> None:
        ep = self._ep
        if ep is None:
            return
        with contextlib.suppress(OSError):
            ep.unregister(self._ep_src)
        self._ep_src = -1
        self._watch(nxt)
        if self._kick >= 0 and self._ep_src != self._kick:
            os.close(self._kick)
            self._kick = -1

    # ------------------------------------------------------------------ reconfig_fileno
    def fileno(self) -> int:
        with self.lock:
            if self._fd_r < 0:
                self._fd_r, self._fd_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._signal(self.busy)
            return self._fd_r

    def _signal(self, busy: bool) -> None:
        """Make reconfig_fileno readable while a switch is in progress, empty otherwise."""
        if self._fd_r < 0:
            return
        try:
            if busy:
                os.write(self._fd_w, b"x")
            else:
                while os.read(self._fd_r, 64):
                    pass
        except (BlockingIOError, OSError):
            pass

    def _close_fd(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        if self._kick >= 0:
            os.close(self._kick)
            self._kick = -1
        for fd in (self._fd_r, self._fd_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd_r = self._fd_w = -1


def _spins(path: DataPath) -> bool:
    """Whether ``path``'s transport spins (has no readiness fd)."""
    from fable.transports import REGISTRY

    info = REGISTRY.get(path.transport)
    return info is not None and info.caps.spins


def _hook(path: DataPath, sw: Switcher) -> None:
    path._on_end = sw.on_end  # type: ignore[attr-defined]
    path._forward = sw.forward  # type: ignore[attr-defined]
    path._read_forward = sw.read_forward  # type: ignore[attr-defined]
    path._release_forward = sw.release  # type: ignore[attr-defined]


_write_codes: dict[type, frozenset[Any]] = {}


def _writing_on(path: DataPath) -> bool:
    """Whether another thread is inside a write method of ``path`` now (the caller holds the
    GIL, so no thread enters one meanwhile; the C fast paths hold the GIL throughout)."""
    cls = type(path)
    codes = _write_codes.get(cls)
    if codes is None:
        found = set()
        for klass in cls.__mro__:
            for name in (*WRITE_NAMES, "_send_slow"):
                fn = klass.__dict__.get(name)
                if isinstance(fn, types.FunctionType):
                    found.add(fn.__code__)
        codes = _write_codes[cls] = frozenset(found)
    me = threading.get_ident()
    for tid, frame in sys._current_frames().items():
        f = frame if tid != me else None
        while f is not None:
            if f.f_code in codes and f.f_locals.get("self") is path:
                return True
            f = f.f_back
    return False


def _teardown(path: DataPath) -> None:
    """Free a path of a finished (or abandoned) epoch: no close notice, the connection goes on."""
    teardown: Callable[[bool], None] | None = getattr(path, "_teardown", None)
    with contextlib.suppress(Exception):
        if teardown is not None and not getattr(path, "_closed", False):
            teardown(True)


def _write_buffers_held(path: DataPath) -> int:
    held: Callable[[], int] | None = getattr(path, "_write_buffers_held", None)
    return held() if held is not None else 0


# ---------------------------------------------------------------------- the watcher thread
class _Watcher:
    """One thread per process: notices reconfiguration requests on the setup channels of live
    connections whose application is not reading or writing. It holds weak references only,
    and a strong one just while it handles a record, so a dropped connection goes at once."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.watched: dict[int, weakref.ref[Connection]] = {}  # setup fd -> connection
        self.thread = threading.Thread(target=self._run, name="fable-reconfig", daemon=True)
        self.thread.start()

    def add(self, fd: int, conn: Connection) -> None:
        with self.lock:
            self.watched[fd] = weakref.ref(conn)

    def remove(self, fd: int) -> None:
        with self.lock:
            self.watched.pop(fd, None)

    def _run(self) -> None:
        pending = False
        while True:
            with self.lock:
                fds = [fd for fd, ref in self.watched.items() if ref() is not None]
            if not fds:
                time.sleep(0.2)
                continue
            try:  # a pending write switch is looked at again every IDLE_TICK
                ready = select.select(fds, [], [], IDLE_TICK if pending else 0.2)[0]
            except (OSError, ValueError):  # an fd closed meanwhile: rebuild the list
                time.sleep(0.01)
                continue
            for fd in ready:
                self._handle(fd)
            pending = self._idle_switches(fds)

    def _idle_switches(self, fds: list[int]) -> bool:
        """Finish the write switches of sides that are not writing; whether some are left."""
        left = False
        for fd in fds:
            with self.lock:
                ref = self.watched.get(fd)
            conn = ref() if ref is not None else None
            if conn is None or conn.closed or not conn._switcher.tx_pending:
                continue
            try:
                conn._switcher.idle_switch()
            except Exception:
                continue  # the connection failed: its application hears of it
            left = left or bool(conn._switcher.tx_pending)
        return left

    def _handle(self, fd: int) -> None:
        with self.lock:
            ref = self.watched.get(fd)
        conn = ref() if ref is not None else None
        if conn is None or conn.closed:
            self.remove(fd)
            return
        sw = conn._switcher
        try:
            op = sw.ch.peek_op()
            if op in CONTROL_OPS:
                sw.pump()
            elif op is None or op == "close":
                self.remove(fd)  # the peer is gone or closing: nothing more to watch
        except Exception:
            self.remove(fd)


_watcher: _Watcher | None = None
_watcher_lock = threading.Lock()


def watch(conn: Connection) -> None:
    """Start watching ``conn``'s setup channel for reconfiguration requests."""
    global _watcher
    with _watcher_lock:
        if _watcher is None or _watcher.pid != os.getpid():
            _watcher = _Watcher()
        w = _watcher
    sock = conn._switcher.ch._sock
    if sock is not None:
        w.add(sock.fileno(), conn)


def unwatch(conn: Connection) -> None:
    """Stop watching ``conn`` (it is closing: its setup fd is about to be reused)."""
    w = _watcher
    sock = conn._switcher.ch._sock
    if w is not None and w.pid == os.getpid() and sock is not None:
        w.remove(sock.fileno())
