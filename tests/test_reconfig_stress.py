"""The reconfiguration stress test (slow): messages of mixed sizes both ways, each with its
sequence number and a CRC, through more than 1000 switches that cover every ordered pair of
transports (an Eulerian circuit of the complete directed graph, walked again and again), with
write buffers held across some switches. The two processes are pinned to different CPUs so that
the spinning transport is not pathological. Nothing may be lost, duplicated, reordered or
corrupted, and no fd or mapping may be left behind."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import threading
import time
import traceback
import zlib
from typing import Any

import pytest

import fable
from fable.testing import fable_mappings, open_fds
from fable.transports import REGISTRY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAMES = list(REGISTRY)
SIZES = (0, 9, 64, 700, 4096, 20_000, 65_536)
MESSAGES_EACH_WAY = 500_000
LAPS = 13  # 13 x 81 ordered pairs = 1053 switches


def euler_circuit() -> list[str]:
    """A walk over the transports that takes every ordered pair (self-loops too) once."""
    out_edges = {a: list(NAMES) for a in NAMES}
    stack, walk = [NAMES[0]], []
    while stack:
        v = stack[-1]
        if out_edges[v]:
            stack.append(out_edges[v].pop())
        else:
            walk.append(stack.pop())
    return walk[::-1]


def _message(seq: int, rng: random.Random) -> bytes:
    body = rng.randbytes(SIZES[seq % len(SIZES)])
    return seq.to_bytes(8, "little") + zlib.crc32(body).to_bytes(4, "little") + body


def _check(m: bytes, want: int) -> None:
    seq = int.from_bytes(m[:8], "little")
    if seq != want:
        raise AssertionError(f"message {want}: got {seq} (lost, duplicated or reordered)")
    if zlib.crc32(m[12:]) != int.from_bytes(m[8:12], "little"):
        raise AssertionError(f"message {want}: corrupted")
    if len(m) - 12 != SIZES[seq % len(SIZES)]:
        raise AssertionError(f"message {want}: {len(m) - 12} B")


def _form(name: str, rng: random.Random) -> bool:
    return rng.choice(REGISTRY[name].caps.forms)


class Pump:
    """A writer thread (at least ``n`` messages, and on until ``go_on()`` is false, then an
    empty message as the end mark) and a reader thread (verifies everything up to the peer's
    end mark). Every ``hold_every``-th message is written through a write buffer held a moment
    (maybe across a switch), and every 991st message read through read buffers that are held
    until a few more messages were read (maybe from the next epoch)."""

    def __init__(self, conn: Any, n: int, seed: int, hold_every: int, go_on: Any) -> None:
        self.conn, self.n, self.seed, self.hold_every, self.go_on = conn, n, seed, hold_every, go_on
        self.errors: list[str] = []
        self.sent = self.received = 0
        self.held_reads = 0
        self.peer_done = threading.Event()
        self.threads = [threading.Thread(target=self._write), threading.Thread(target=self._read)]
        for t in self.threads:
            t.start()

    def _write(self) -> None:
        conn, rng = self.conn, random.Random(self.seed)
        try:
            while (self.sent < self.n or self.go_on()) and not self.errors:
                seq = self.sent
                m = _message(seq, rng)
                if self.hold_every and seq % self.hold_every == 0:
                    bufs = conn.getwritebuf(len(m))
                    time.sleep(0.001)
                    pos = 0
                    for b in bufs:
                        k = len(b.data)
                        b.data[:] = m[pos : pos + k]
                        pos += k
                    conn.commit(bufs, len(m))
                else:
                    conn.send(m)
                self.sent = seq + 1
            conn.send(b"")  # the end mark
        except BaseException as e:
            self.errors.append(f"writer: {type(e).__name__}: {e}\n{traceback.format_exc()}")

    def _read_held(self) -> tuple[list[bytes], list[Any]]:
        """Whole messages from getreadbuf: (all but the last, copied), the last one's buffers
        (still held)."""
        conn = self.conn
        done: list[bytes] = []
        cur: list[Any] = []
        deadline = time.monotonic() + 60
        while not cur or cur[-1].more:
            bufs = conn.getreadbuf()
            if not bufs:
                if time.monotonic() > deadline:
                    raise TimeoutError("no message through getreadbuf")
                time.sleep(0.0001)
                continue
            for b in bufs:
                if cur and not cur[-1].more:  # cur is whole: copy it out, start the next
                    done.append(b"".join(bytes(x.data) for x in cur))
                    for x in cur:
                        conn.release(x)
                    cur = []
                cur.append(b)
        return done, cur

    def _read(self) -> None:
        conn = self.conn
        held: list[Any] = []
        try:
            seq = 0
            while True:
                if seq % 991 == 990 and not held:
                    msgs, held = self._read_held()
                    msgs.append(b"".join(bytes(x.data) for x in held))
                    self.held_reads += 1
                else:
                    msgs = [conn.recv(timeout=60)]
                    if held and seq % 991 > 3:
                        for x in held:  # held across a few messages, maybe a switch
                            conn.release(x)
                        held = []
                for m in msgs:
                    if m == b"":
                        self.received = seq
                        return
                    _check(m, seq)
                    seq += 1
        except BaseException as e:
            self.errors.append(f"reader: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        finally:
            for x in held:
                with contextlib.suppress(fable.FableError):  # a failed run's dead buffers
                    conn.release(x)
            self.peer_done.set()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def test_a_million_messages_through_a_thousand_switches() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "needs two CPUs: the spinning transport must not share one"
    rng = random.Random(7)
    fds0, maps0 = open_fds(), fable_mappings()
    first = NAMES[0]
    conn, pending = fable.open_pair(first, safe=_form(first, rng), trusted=True)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.sched_setaffinity(0, {cpus[1]})
            peer = pending.open(trusted=True)
            done = threading.Event()
            pump = Pump(peer, MESSAGES_EACH_WAY, 2, 0, lambda: not done.is_set())
            pump.peer_done.wait(600)  # the parent's end mark: it is done switching
            done.set()
            pump.join(120)
            try:
                peer.recv(timeout=120)  # until the parent closes
            except fable.ConnectionClosed:
                pass
            errors = pump.errors
            if errors:
                print("child:", errors[:3], flush=True)
            code = 1 if errors else 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    pending.close()
    os.sched_setaffinity(0, {cpus[0]})
    switching = threading.Event()
    switching.set()
    t0 = time.monotonic()
    pump = Pump(conn, MESSAGES_EACH_WAY, 1, 997, switching.is_set)
    walk = euler_circuit()
    per = MESSAGES_EACH_WAY // (LAPS * (len(walk) - 1) + 1)  # messages sent between switches
    pairs: set[tuple[str, str]] = set()
    switches = 0
    try:
        cur = first
        for _ in range(LAPS):
            for nxt in walk[1:]:
                while pump.sent < (switches + 1) * per and not pump.errors:
                    time.sleep(0.0005)  # the traffic goes on between switches
                if pump.errors:
                    break
                conn.reconfigure(nxt, safe=_form(nxt, rng), timeout=30)
                pairs.add((cur, nxt))
                cur = nxt
                switches += 1
        switching.clear()
        pump.join(300)
        elapsed = time.monotonic() - t0
        st = conn.stats()
    finally:
        switching.clear()
        conn.close()
        _, status = os.waitpid(pid, 0)
    assert not pump.errors, pump.errors[:3]
    assert os.waitstatus_to_exitcode(status) == 0, "the child saw an error"
    assert pump.sent >= MESSAGES_EACH_WAY and pump.received >= MESSAGES_EACH_WAY
    assert st.msgs_sent == pump.sent + 1 and st.msgs_received == pump.received + 1  # + end marks
    assert switches >= 1000
    assert pairs == {(a, b) for a in NAMES for b in NAMES}
    assert pump.held_reads >= MESSAGES_EACH_WAY // 991 - 1
    del conn, pending, pump
    gc.collect()
    assert open_fds() - fds0 == set(), "fds left behind"
    assert fable_mappings() == maps0, "mappings left behind"
    print(f"{st.msgs_sent + st.msgs_received} messages, {switches} switches, {elapsed:.1f} s")
