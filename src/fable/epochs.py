"""Live reconfiguration: the epochs of one connection, and the switch from one to the next.

    X (asks: conn.reconfigure)                  Y
    ------------------------------------------  ------------------------------------------
    create epoch e+1, open X's end
    setup: PROPOSE(e+1, transport, safe,  ──►   read by Y's control thread (or any call
           yours, params) + fds                 that reads the setup channel); Y checks the
                                                offer against its own state, picks its own
                                                form (fable/handshake.py) and opens its
    (X keeps writing on epoch e)          ◄──   end: ACCEPT(e+1), or REFUSE(e+1, why, kind):
                                                the connection stays on epoch e
                                                Y's next write (or Y's control thread, if Y
    X's next write after ACCEPT (or X's         is not writing): END(e) in band on e, then
    control thread): END(e) in band on e,       every write goes to e+1
    then every write goes to e+1
    each reader: reads e up to the peer's END(e), then e+1 (a message never straddles epochs:
    END is written between whole messages, after every write buffer of e is committed)
    each side, once it wrote END(e) and read the peer's: setup: DONE(e)
    each side frees its end of e once it sent DONE(e) and got the peer's

- END(e) is the transport's in-band close record: it follows every message of epoch e, so it
  can never overtake data. A reader tells END from a real close by the ACCEPT or PROPOSE that
  preceded it on the setup channel (read before it moves on: ``next_path``).
- The offer and its checks are ``fable/handshake.py``'s, the same as for the first transport.
- One switch at a time, and at most one old epoch not yet ended: a side proposes e+1 only once
  the peer said DONE for every epoch before e (``reconfigure`` waits for it), and refuses a
  PROPOSE(e+1) while it has not said DONE for one of them itself (a chain of proposals would
  keep every old path's fds and mappings). A slow reader is not failed: the peer waits.
- Both sides ask at once: the proposal of the side that set the connection up (role 0) wins;
  the other side drops its own and accepts.
- Write buffers of epoch e that the application holds keep the write switch waiting (writes
  go on in epoch e meanwhile, in order); when they are still held after the grace period
  (``FABLE_GRACE_PERIOD``), the connection fails with an error naming them. Read buffers of
  epoch e stay valid: release them any time.
- A side that is not writing: its control thread seals the old path (only when no write is in
  flight and no write buffer held: ``DataPath.end_writes`` refuses otherwise) and writes END
  without waiting; an END that finds no room is retried every ``IDLE_TICK``, so a slow reader
  never holds up the control thread, which serves every connection of the process.
- Until the first reconfiguration a connection's hot methods are bound straight to its
  transport; the switch rebinds them through the connection's ``bind`` (writes go through
  ``_write`` until the write switch is done). A method the application looked up before the
  switch still works: once its path's epoch ended for it, the path hands the call to
  ``forward``.
- Lock order: ``wlock`` (one write switch at a time, and writes while one is pending) before
  ``lock`` (the state here). ``lock`` is never held while waiting for the peer's reader; the
  control thread takes neither without ``blocking=False``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fable import handshake
from fable._wire import close_fds
from fable.buffer import Buffer
from fable.config import settings
from fable.control import control
from fable.errors import (
    ConnectionClosed,
    DeadBuffer,
    FableError,
    PermissionDenied,
    ProtocolError,
    Timeout,
)
from fable.readiness import BusyFd, StableFd
from fable.transports import ConnectionStats, DataPath, SetupChannel

log = logging.getLogger("fable")

__all__ = ["CONTROL_OPS", "GROUPS", "IDLE_TICK", "Epoch", "Epochs", "Proposal"]

IDLE_TICK = 0.005  # seconds between the control thread's looks at a quiet side's pending END

PROPOSE = handshake.PROPOSE
REFUSE = handshake.REFUSE
ACCEPT, DONE = "reconfig-accept", "reconfig-done"
CONTROL_OPS = frozenset({PROPOSE, ACCEPT, REFUSE, DONE})
WRITE_NAMES = ("getwritebuf", "commit", "abort", "flush", "send", "send_many")
READ_NAMES = ("getreadbuf", "recv", "recv_many", "recv_into")
# the connection's data methods, by what rebinds them (Connection.bind)
GROUPS: dict[str, tuple[str, ...]] = {
    "write": WRITE_NAMES,
    "read": READ_NAMES,
    "release": ("release",),
    "all": (*WRITE_NAMES, *READ_NAMES, "release"),
}

Bind = Callable[[str, object], None]  # (group of GROUPS, object with those methods)


@dataclass
class Epoch:
    """One transport generation of the connection, until both sides are done with it."""

    number: int
    path: DataPath
    wrote_end: bool = False  # this side sealed the path: its END follows every message of e
    read_end: bool = False  # this side read the peer's END(e)
    said_done: bool = False  # this side sent DONE(e)
    peer_done: bool = False  # the peer's DONE(e) came


@dataclass
class Proposal:
    """This side's request for the next epoch, until the peer answers it."""

    number: int
    path: DataPath
    reason: str
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: FableError | None = None
    on_answer: Callable[[FableError | None], None] | None = None  # who else wants to know

    def answer(self, error: FableError | None) -> None:
        self.error = error
        self.done.set()
        if self.on_answer is not None:
            try:
                self.on_answer(error)
            except Exception:  # the switch is unaffected; whoever wanted to know did not hear
                log.exception("fable: a reconfiguration's on_answer callback failed")


@dataclass
class Carried:
    """The counters of paths already freed (``stats`` adds the live ones)."""

    msgs_out: int = 0
    bytes_out: int = 0
    msgs_in: int = 0
    bytes_in: int = 0

    def add(self, st: ConnectionStats) -> None:
        self.msgs_out += st.msgs_sent
        self.bytes_out += st.bytes_sent
        self.msgs_in += st.msgs_received
        self.bytes_in += st.bytes_received


class _WriteRelay:
    """The connection's write methods while a write switch is pending: each one switches first
    (``Epochs._write``)."""

    def __init__(self, write: Callable[..., Any]) -> None:
        for name in WRITE_NAMES:
            setattr(self, name, functools.partial(write, name))


class Epochs:
    """One connection's transports across epochs, and the switch protocol (module docstring).

    ``tx`` takes writes; ``pending`` are agreed epochs the writes move to next; ``rx`` (oldest
    first) are the paths being read: the first until the peer's END on it; ``live`` holds every
    epoch not yet freed. Implements the paths' :class:`~fable.transports.EpochHooks`."""

    def __init__(
        self,
        path: DataPath,
        channel: SetupChannel,
        role: int,
        *,
        trusted: bool,
        bind: Bind,
        fd: StableFd,
        busy: BusyFd,
    ) -> None:
        self.ch = channel
        self.role = role
        self.trusted = trusted
        self._bind = bind
        self._fd = fd
        self._busy = busy
        self.lock = threading.RLock()
        self.wlock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # an epoch was freed, or the peer left
        self.epoch = path.epoch  # the newest epoch both sides agreed on
        self.tx = path
        self.pending: list[DataPath] = []
        self.rx: list[DataPath] = [path]
        self.proposal: Proposal | None = None
        self.live: dict[int, Epoch] = {path.epoch: Epoch(path.epoch, path)}
        self.owned: weakref.WeakSet[DataPath] = weakref.WeakSet([path])  # every path, ever
        self.owed: list[DataPath] = []  # sealed, their END not yet in the transport
        self.doomed: list[DataPath] = []  # freed epochs whose path a write still holds
        self.grace_deadline = 0.0
        self.carried = Carried()
        self.last_switch: dict[str, Any] | None = None
        self._ticking = False
        path.epochs = self

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        """Whether a reconfiguration is in progress: asked, agreed, not yet read through, or
        an old epoch not yet freed by both sides."""
        return (
            self.proposal is not None
            or bool(self.pending)
            or len(self.rx) > 1
            or len(self.live) > 1
        )

    @property
    def newest(self) -> DataPath:
        """The path of the newest agreed epoch."""
        if self.pending:
            return self.pending[-1]
        e = self.live.get(self.epoch)
        return e.path if e is not None else self.tx

    # ------------------------------------------------------------------ asking
    def _unended(self, mine: bool) -> int | None:
        """An old epoch (before the newest) not yet over: by this side's DONE (``mine``) or by
        the peer's; None if there is none (module docstring: one switch at a time)."""
        for number, e in self.live.items():
            if number < self.epoch and not (e.said_done if mine else e.peer_done):
                return number
        return None

    def reconfigure(
        self,
        transport: str,
        safe: bool | None,
        peer_safe: bool | None,
        reason: str,
        wait: bool,
        timeout: float | None,
        on_answer: Callable[[FableError | None], None] | None = None,
    ) -> None:
        """Propose epoch e+1 on ``transport``, this side reading in form ``safe`` and asking
        the peer for ``peer_safe`` (None: each side's most zero-copy form within its trust);
        with ``wait``, until the peer answers. ``on_answer`` is called with the peer's answer
        (None: accepted) on whichever thread reads it."""
        info = handshake.transport_info(transport)
        safe = handshake.own_form(info, self.trusted, safe)
        if peer_safe is not None:
            handshake.choose_form(info, peer_safe)
        if self._fd.handed_out and info.caps.spins:
            raise FableError(
                f"fileno() of this connection was handed out: {transport} spins and has "
                "no readiness fd"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            # one request at a time, and the previous switch over on both sides
            while self.proposal is not None or self._unended(mine=False) is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if not wait:
                    raise FableError("a reconfiguration of this connection is in progress")
                if left is not None and left <= 0:
                    raise Timeout("the previous reconfiguration did not end in time")
                if self.ch.ended:
                    raise ConnectionClosed("the peer went away")
                self.changed.wait(0.05 if left is None else min(left, 0.05))
            number = self.epoch + 1
            path = handshake.make_offer(
                self.ch,
                info,
                safe=safe,
                epoch=number,
                op=PROPOSE,
                reason=reason,
                yours=peer_safe,
            )
            self.proposal = Proposal(number, path, reason, on_answer=on_answer)
            self._busy.set(True)
        if wait:
            self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float | None) -> None:
        """Wait until the peer accepted or refused our proposal (its reason raised if it
        refused: ``PermissionDenied`` for trust, ``ProtocolError`` otherwise)."""
        prop = self.proposal
        if prop is None:
            return
        if not prop.done.wait(timeout):
            raise Timeout("the peer did not answer the reconfiguration in time")
        if prop.error is not None:
            raise prop.error

    # ------------------------------------------------------------------ the setup channel
    def on_channel(self) -> bool:
        """Handle what came on the setup channel (the control thread calls this when it is
        readable; readers call it too). Never waits for the peer. Returns False once there is
        nothing more to watch (the channel ended or broke)."""
        try:
            self.ch.poll()
        except (ProtocolError, PermissionDenied) as e:  # (a refused first offer: whoever
            self.fail(e)  # reads the refusal, the connection fails with it)
            return False
        if not self.lock.acquire(blocking=False):
            # an application thread holds the state: handle the inbox a moment later
            ref = weakref.WeakMethod(self._inbox_later)
            control().call_later(0.001, lambda: _call(ref))
            return not self.ch.ended
        try:
            self._handle_inbox()
        except ProtocolError as e:
            self.fail(e)
            return False
        finally:
            self.lock.release()
        return not self.ch.ended

    def _inbox_later(self) -> float | None:
        self.on_channel()
        return None

    def _handle_inbox(self) -> None:
        """Every record read so far (the caller holds ``lock``)."""
        while (rec := self.ch.take()) is not None:
            self._handle(*rec)
        if self.ch.ended:
            prop, self.proposal = self.proposal, None
            if prop is not None:
                prop.path.teardown()
                prop.answer(ConnectionClosed("the peer went away"))
            self.changed.notify_all()

    def _handle(self, rec: dict[str, Any], fds: list[int]) -> None:
        op, number = rec.get("op"), rec.get("epoch")
        if op not in CONTROL_OPS:
            close_fds(fds)
            raise ProtocolError(f"unexpected record {op!r} on the setup channel")
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            close_fds(fds)
            raise ProtocolError(f"reconfiguration record without a valid epoch: {rec!r:.200}")
        if op == PROPOSE:
            self._on_propose(rec, number, fds)
            return
        close_fds(fds)
        if op == DONE:
            e = self.live.get(number)
            if e is not None:  # else freed already, or never ours: nothing to do
                e.peer_done = True
                self._maybe_free(number)
                self.changed.notify_all()  # a proposal may wait for this
            return
        prop = self.proposal
        if prop is None or prop.number != number:
            return  # an answer to a proposal we dropped (both asked at once): ignore
        self.proposal = None
        self.changed.notify_all()  # a reconfigure may wait for the proposal to be answered
        if op == ACCEPT:
            self._agree(prop.path, number, prop.reason)
            prop.answer(None)
        else:
            prop.path.teardown()
            self._busy.set(self.busy)
            prop.answer(handshake.refusal_error(rec, f"to switch to {prop.path.transport}"))

    def _on_propose(self, rec: dict[str, Any], number: int, fds: list[int]) -> None:
        mine = self.proposal
        if mine is not None and mine.number == number:
            if self.role == 0:
                close_fds(fds)  # both asked at once: ours wins, the peer will accept it
                return
            self.proposal = None  # theirs wins: drop ours
            mine.path.teardown()
            mine.answer(
                FableError("the peer asked for another switch at the same time (its request won)")
            )
        if number != self.epoch + 1:
            close_fds(fds)
            raise ProtocolError(f"reconfiguration to epoch {number} while at epoch {self.epoch}")
        old = self._unended(mine=True)
        busy = None if old is None else f"epoch {old} is not over here yet: one switch at a time"
        stance = handshake.Stance(trusted=self.trusted, no_spin=self._fd.handed_out)
        try:
            path, offer = handshake.answer(self.ch, rec, fds, PROPOSE, number, stance, busy)
        except FableError:
            return  # refused, and the peer told why: the connection stays on epoch e
        self.ch.send({"op": ACCEPT, "epoch": number})
        self._agree(path, number, offer.reason or "asked for by the peer")

    def _agree(self, path: DataPath, number: int, reason: str) -> None:
        """Both sides agreed on epoch ``number``: reads will follow the peer's END, the next
        write switches first."""
        old = self.newest
        self.epoch = number
        self.live[number] = Epoch(number, path)
        self.owned.add(path)
        path.epochs = self
        self.pending.append(path)
        self.rx.append(path)
        self.grace_deadline = time.monotonic() + settings().grace_period_s
        self.last_switch = {
            "at": time.time(),
            "from": old.transport,
            "to": path.transport,
            "reason": reason,
        }
        self._bind("write", _WriteRelay(self._write))
        self._bind("release", self)
        self._busy.set(True)
        self._start_ticking()

    # ------------------------------------------------------------------ the write switch
    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A write while a switch is pending (or one that reached a path after its END):
        switch first where possible, then write, holding ``wlock`` so that the control
        thread does not end the path under it."""
        with self.wlock:
            if self.pending:
                self.switch_writes()
            return getattr(self.tx, name)(*args, **kwargs)

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Where a path sends a call that reached it after its epoch ended for that call (a
        method looked up before the switch): reads to the path being read now, writes to
        ``_write``."""
        if name in READ_NAMES:
            return getattr(self.rx[0], name)(*args, **kwargs)
        return self._write(name, *args, **kwargs)

    def switch_writes(self, force: bool = False, linger: float | None = None) -> None:
        """On the writing thread: END(e) on the old path and writes to the next one (through
        every agreed epoch), waiting for room for END like a write without a timeout (or
        ``linger`` seconds: closing). Unless write buffers of the old path are held: then
        later, and past the grace period the connection fails (``force``: drop them)."""
        with self.wlock:
            while True:
                with self.lock:
                    if not self.pending:
                        return
                    old = self.tx
                if not old.end_writes(wait=True, force=force):
                    if time.monotonic() > self.grace_deadline:
                        raise self.fail(
                            FableError(
                                f"write buffers of epoch {old.epoch} ({old.transport}) were "
                                "held past the grace period "
                                f"({settings().grace_period_s:g} s, FABLE_GRACE_PERIOD) of a "
                                "reconfiguration: commit or abort them"
                            )
                        )
                    return
                self._sealed(old)
                if old.push_end(linger):
                    self._end_out(old)
                elif linger is not None:
                    return  # closing: what did not fit in time stays unsent

    def _sealed(self, old: DataPath) -> None:
        """``old`` takes no more writes: the next agreed path does."""
        with self.lock:
            nxt = self.tx = self.pending.pop(0)
            if not self.pending:  # the next write goes straight to the new path
                self._bind("write", nxt)
            self.owed.append(old)
            e = self.live.get(old.epoch)
            if e is not None:
                e.wrote_end = True
                self._maybe_free(old.epoch)

    def _end_out(self, path: DataPath) -> None:
        with self.lock:
            if path in self.owed:
                self.owed.remove(path)

    def _start_ticking(self) -> None:
        if not self._ticking:
            self._ticking = True
            ref = weakref.WeakMethod(self._tick)
            control().call_later(IDLE_TICK, lambda: _call(ref))

    def _tick(self) -> float | None:
        """On the control thread: end the old epoch of a side that is not writing, and push
        ENDs that found no room, without ever waiting (module docstring)."""
        if not self.wlock.acquire(blocking=False):
            return IDLE_TICK  # the application is writing: it switches itself
        try:
            while True:
                with self.lock:
                    if not self.pending:
                        break
                    old = self.tx
                if not old.end_writes(wait=False):
                    break  # a write is in flight, or write buffers are held: later
                self._sealed(old)
            for path in list(self.owed):
                try:
                    done = path.push_end(0)
                except (FableError, OSError):
                    done = True  # the path failed: its application hears of it
                if done:
                    self._end_out(path)
            with self.lock:
                self.doomed = [p for p in self.doomed if not p.teardown(wait=False)]
        except (FableError, OSError):
            pass  # a failed path: the application hears of it at its next call
        finally:
            self.wlock.release()
        with self.lock:
            self._ticking = bool(self.pending or self.owed or self.doomed) and not self.tx.closed
            return IDLE_TICK if self._ticking else None

    # ------------------------------------------------------------------ the read switch
    def next_path(self, path: DataPath) -> DataPath | None:
        """Called by ``path`` on the reading thread after it read the peer's in-band end:
        the next path (a switch), or None (the peer closed)."""
        with self.lock:
            try:
                self.ch.poll()
                self._handle_inbox()  # the ACCEPT or PROPOSE that came before this END
            except (ProtocolError, PermissionDenied) as err:
                self.fail(err)
            if len(self.rx) < 2 or self.rx[0] is not path:
                return None
            self.rx.pop(0)
            path.end_reads()
            nxt = self.rx[0]
            self._fd.follow(nxt)
            self._bind("read", nxt)
            e = self.live.get(path.epoch)
            if e is not None:
                e.read_end = True
                self._maybe_free(path.epoch)
            return nxt

    def release(self, buf: Buffer) -> None:
        """Read buffers go back to the path (epoch) they came from, freed or not."""
        owner = buf.owner
        if not isinstance(owner, DataPath) or owner not in self.owned:
            raise DeadBuffer("buffer belongs to another connection")
        owner.release(buf)

    # ------------------------------------------------------------------ freeing
    def _maybe_free(self, number: int) -> None:
        """Say DONE once this side is through with epoch ``number``; free it once both are
        (the caller holds ``lock``)."""
        e = self.live.get(number)
        if e is None:
            return
        if e.wrote_end and e.read_end and not e.said_done:
            try:
                self.ch.send({"op": DONE, "epoch": number})
            except (OSError, FableError):
                pass  # the peer is gone: its end goes with it
            e.said_done = True
        if e.said_done and e.peer_done:
            del self.live[number]
            self.carried.add(e.path.stats())
            if e.path in self.owed:
                self.owed.remove(e.path)
            if not e.path.teardown(wait=False):  # not under a write (its END) in flight:
                self.doomed.append(e.path)  # the control thread frees it a moment later
                self._start_ticking()
            self._busy.set(self.busy)
            self.changed.notify_all()

    def stats(self) -> ConnectionStats:
        """Counters over every epoch, the freed ones included."""
        live = [e.path.stats() for e in self.live.values()]
        cur = self.newest.stats()
        c = self.carried
        return ConnectionStats(
            transport=cur.transport,
            safe=cur.safe,
            epoch=self.epoch,
            msgs_sent=c.msgs_out + sum(s.msgs_sent for s in live),
            bytes_sent=c.bytes_out + sum(s.bytes_sent for s in live),
            msgs_received=c.msgs_in + sum(s.msgs_received for s in live),
            bytes_received=c.bytes_in + sum(s.bytes_received for s in live),
            read_buffers_held=sum(s.read_buffers_held for s in live),
            write_buffers_held=sum(s.write_buffers_held for s in live),
            pending_bytes=sum(s.pending_bytes for s in live),
        )

    # ------------------------------------------------------------------ the end
    def close(self, linger: float) -> None:
        """Close: the pending write switch first (so END and close are in order), wait up to
        ``linger`` for the peer to finish reading old epochs, close the writing path, free
        the rest."""
        deadline = time.monotonic() + linger
        if self.pending:
            try:
                self.switch_writes(force=True, linger=linger)
            except (FableError, OSError):
                pass
        with self.lock:
            prop, self.proposal = self.proposal, None
            if prop is not None:
                prop.path.teardown()
                prop.answer(ConnectionClosed("the connection was closed"))
            while any(e.wrote_end and not e.peer_done for e in self.live.values()):
                left = deadline - time.monotonic()
                if left <= 0 or self.ch.ended:
                    break
                self.changed.wait(left)  # the control thread handles the peer's DONE
            tx = self.tx
            try:
                tx.close(max(0.0, deadline - time.monotonic()))
            finally:
                for p in [e.path for e in self.live.values()] + self.doomed:
                    if p is not tx:
                        p.teardown()
                self.owed.clear()
                self.doomed.clear()

    def forget(self) -> None:
        """In a forked child: drop every path without telling the peer (no lock is taken: a
        thread of the parent may have held one when it forked)."""
        paths = [e.path for e in self.live.values()]
        if self.proposal is not None:
            paths.append(self.proposal.path)
        for p in paths:
            try:
                p.forget()
            except Exception:
                pass

    def fail(self, exc: BaseException) -> BaseException:
        """Fail every live path with ``exc`` (returned, for ``raise``)."""
        for e in list(self.live.values()):
            e.path.fail(exc)
        return exc


def _call(ref: weakref.WeakMethod[Callable[[], float | None]]) -> float | None:
    """Call a weakly held method (a dropped connection is not kept alive by its timers)."""
    m = ref()
    return m() if m is not None else None
