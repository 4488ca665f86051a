"""One measurement point: two pinned processes, one link, one size, one mode.

Method (docs/bench.md says the same for users):
- The driver forks worker A, which pins itself to CPU ``a``, sets the link up (``Link.setup``:
  ``open_pair`` for a REGISTRY transport, a rendezvous for a peer library) and forks worker B,
  pinned to CPU ``b``, which opens the other end. The driver holds no connection; it waits for
  A's JSON result with a timeout and kills both (their process group) on expiry, so a stuck
  transport or peer becomes a record with ``verified: false`` and an ``error``, never a hung run.
- Message ``n`` is ``_native.message(n, size)``: ``n`` in its first 8 bytes, every other byte a
  function of ``n`` and its offset (layout: bench/native.c). The writer builds every message anew
  in C, so it writes every byte it sends. The receiver checks every sequence number (a lost,
  duplicated or reordered message fails the point); ``verify="full"`` checks every byte, in C.
- latency: ping-pong round trips; A stamps each one into a preallocated array, so percentiles come
  from every sample, after a warm-up.
- throughput: A writes ``n`` messages with ``send_many`` in batches; B reads them with ``recv``
  and reports when the last arrived; rate = n / (last arrival - first send), both on the
  system's monotonic clock.
- ``api`` (fable's own rows): ``msg`` is the above; ``batch`` (throughput only) is
  ``send_many``/``recv_many`` in batches of ``API_BATCH`` (at most ``API_BATCH_BYTES``),
  checked in C a batch at a time;
  ``buffer`` is the zero-copy API both ways: ``getwritebuf``/``commit`` (``flush=False`` and one
  ``flush`` a batch for throughput) and ``getreadbuf``/``release``, which never waits: the
  reader calls it in a loop, and after ``BUFFER_SPINS`` empty calls waits on ``fileno()`` (not
  on a spinning transport, which has none).
- The iteration count grows from a short trial (the warm-up) until one repeat lasts about
  ``target_s``.
- ``floor`` is not a transport: one cache line bounced between the two CPUs in C
  (``_native.floor``), the lower bound of any round trip between them (latency only).
"""

from __future__ import annotations

import array
import io
import json
import mmap
import os
import select
import signal
import statistics
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from fable.bench import _native
from fable.bench.links import AutoLink, Channel, FableLink, Link, Point
from fable.bench.peers import peer_link
from fable.transports import REGISTRY

__all__ = [
    "APIS",
    "API_BATCH",
    "AUTO",
    "FLOOR",
    "SCHEMA_VERSION",
    "VerifyError",
    "link_for",
    "measure",
    "run_point",
    "serve_peer",
]

SCHEMA_VERSION = 1
FLOOR = "floor"
AUTO = "auto"
FLOOR_SIZE = 64  # one cache line moves per hop
APIS = ("msg", "batch", "buffer")  # how fable's rows move messages (module docstring)
API_BATCH = 64  # messages per send_many/recv_many call of the batch API
API_BATCH_BYTES = 1 << 20  # ... and at most this many bytes a batch (16 of 64 KiB)
BUFFER_SPINS = 64  # empty getreadbuf calls before the buffer API's reader waits on fileno()
_ns = time.perf_counter_ns  # CLOCK_MONOTONIC, shared by all processes (and by _native.floor)


def link_for(transport: str) -> Link:
    """The link of a record's ``transport`` name (REGISTRY name, ``auto`` or ``peer:NAME``)."""
    if transport == AUTO:
        return AutoLink()
    if transport.startswith("peer:"):
        return cast(Link, peer_link(transport[5:]))

    if transport not in REGISTRY:
        raise ValueError(f"unknown transport {transport!r}; known: {', '.join(REGISTRY)}")
    return FableLink(transport)


# ------------------------------------------------------------------------------ verification
class VerifyError(AssertionError):
    pass


def _mask(size: int) -> int:
    return (1 << (8 * min(size, 8))) - 1


def verify(msg: bytes, seq: int, size: int, full: bool) -> None:
    """Raise ``VerifyError`` saying what is wrong unless ``msg`` is bench message ``seq``."""
    if len(msg) != size:
        raise VerifyError(f"message {seq}: {len(msg)} B instead of {size} B")
    got = int.from_bytes(msg[:8], "little")
    if got != seq & _mask(size):
        raise VerifyError(
            f"message {seq}: got sequence {got} instead (lost, duplicated or reordered)"
        )
    if full:
        bad = _native.check(msg, seq)
        if bad >= 0:
            raise VerifyError(f"message {seq}: payload corrupted at byte {bad}")


# ------------------------------------------------------------------------------- buffer API
def _buffer_reader(ch: Any) -> Callable[[], list[Any]]:
    """The buffer API's blocking read: a function returning the read buffers of the next
    message (getreadbuf never waits: it is called in a loop, then ``fileno()`` is polled)."""
    get = ch.getreadbuf
    pending: deque[Any] = deque()
    waiter = None
    if not REGISTRY[ch.transport].caps.spins:
        try:
            waiter = select.poll()
            waiter.register(ch.fileno(), select.POLLIN)
        except io.UnsupportedOperation:
            waiter = None

    def next_message() -> list[Any]:
        out: list[Any] = []
        while True:
            spins = 0
            while not pending:
                bufs: list[Any] = get()
                if bufs:
                    if not out and len(bufs) == 1 and not bufs[0].more:
                        return bufs  # the common case: one message, one buffer
                    pending.extend(bufs)
                    break
                spins += 1
                if waiter is not None and spins >= BUFFER_SPINS:
                    waiter.poll(1000)
                    spins = 0
            b = pending.popleft()
            out.append(b)
            if not b.more:
                return out

    return next_message


def _joined(bufs: list[Any]) -> bytes | memoryview:
    return bufs[0].data if len(bufs) == 1 else b"".join(bytes(b.data) for b in bufs)


def _spread(bufs: list[Any], data: bytes | memoryview) -> None:
    """``data`` into the write buffers of one getwritebuf call, in order."""
    pos = 0
    for b in bufs:
        b.data[:] = data[pos : pos + len(b.data)]
        pos += len(b.data)


def _write_buffers(ch: Any, seq: int, size: int, flush: bool) -> None:
    """Message ``seq`` written in place with getwritebuf/commit."""
    bufs = ch.getwritebuf(size)
    if len(bufs) == 1:
        _native.fill(bufs[0].data, seq)
    else:
        _spread(bufs, _native.message(seq, size))
    ch.commit(bufs, size, flush=flush)


def _echo_buffers(ch: Any, bufs: list[Any]) -> None:
    """Send back the message in ``bufs`` through write buffers, then release them."""
    data = _joined(bufs)
    n = len(data)
    out = ch.getwritebuf(n)
    if len(out) == 1:
        out[0].data[:] = data
    else:
        _spread(out, data)
    for b in bufs:
        ch.release(b)
    ch.commit(out, n)


# ---------------------------------------------------------------------------------- worker B
def _bad(m: bytes | memoryview, seq: int, size: int, mask: int, full: bool) -> bool:
    return (
        len(m) != size
        or int.from_bytes(m[:8], "little") != seq & mask
        or (full and _native.check(m, seq) >= 0)
    )


def serve_peer(ch: Channel, size: int, full: bool) -> None:
    """Worker B: answer the measuring side's commands (``lat``: echo each message, ``thr``:
    take them, then say when the last came) until ``end``, checking every message."""
    check, mask = _native.check, _mask(size)
    buffers: Callable[[], list[Any]] | None = None
    while True:
        cmd = json.loads(ch.recv())
        op, n, api = cmd["op"], cmd.get("n", 0), cmd.get("api", "msg")
        if op == "end":
            return
        first = cmd["first"]
        recv = ch.recv
        if api == "buffer" and buffers is None:
            buffers = _buffer_reader(ch)
        if op == "lat" and api == "buffer":
            assert buffers is not None
            c = cast(Any, ch)
            getw, commit, release = c.getwritebuf, c.commit, c.release
            for seq in range(first, first + n):
                bufs = buffers()
                if len(bufs) == 1:  # inline, as the msg loop below
                    m = bufs[0].data
                    if (
                        len(m) != size
                        or int.from_bytes(m[:8], "little") != seq & mask
                        or (full and check(m, seq) >= 0)
                    ):
                        verify(bytes(m), seq, size, full)
                    out = getw(size)
                    if len(out) == 1:
                        out[0].data[:] = m
                        release(bufs[0])
                        commit(out, size)
                        continue
                    c.abort(out)
                m = _joined(bufs)
                if _bad(m, seq, size, mask, full):
                    verify(bytes(m), seq, size, full)
                _echo_buffers(ch, bufs)
        elif op == "lat":
            send = ch.send
            for seq in range(first, first + n):
                m = recv()
                if (  # inline, as below: a function call a message would cost a tenth
                    len(m) != size
                    or int.from_bytes(m[:8], "little") != seq & mask
                    or (full and check(m, seq) >= 0)
                ):
                    verify(m, seq, size, full)
                send(m)
        elif op == "thr":
            if api == "batch":
                recv_many = cast(Any, ch).recv_many
                seq, end = first, first + n
                while seq < end:
                    msgs = recv_many(min(API_BATCH, end - seq))
                    bad = _native.check_many(msgs, seq, size, full)
                    if bad >= 0:
                        verify(msgs[bad], seq + bad, size, full)
                    seq += len(msgs)
            elif api == "buffer":
                assert buffers is not None
                release = cast(Any, ch).release
                for seq in range(first, first + n):
                    bufs = buffers()
                    if len(bufs) == 1:  # inline, as the msg loop below
                        m = bufs[0].data
                        if (
                            len(m) != size
                            or int.from_bytes(m[:8], "little") != seq & mask
                            or (full and check(m, seq) >= 0)
                        ):
                            verify(bytes(m), seq, size, full)
                        release(bufs[0])
                        continue
                    m = _joined(bufs)
                    if _bad(m, seq, size, mask, full):
                        verify(bytes(m), seq, size, full)
                    for b in bufs:
                        release(b)
            else:
                for seq in range(first, first + n):
                    m = recv()
                    if (
                        len(m) != size
                        or int.from_bytes(m[:8], "little") != seq & mask
                        or (full and check(m, seq) >= 0)
                    ):
                        verify(m, seq, size, full)
            last = _ns()
            ch.send(json.dumps({"last_ns": last}).encode())


# ---------------------------------------------------------------------------------- worker A
def _latency(
    ch: Channel, size: int, n: int, first: int, full: bool, api: str = "msg"
) -> array.array[int]:
    message, mask = _native.message, _mask(size)
    stamps = array.array("q", bytes(8 * (n + 1)))
    ch.send(json.dumps({"op": "lat", "n": n, "first": first, "api": api}).encode())
    send, recv = ch.send, ch.recv
    if api == "buffer":
        buffers = _buffer_reader(ch)
        c = cast(Any, ch)
        release, getw, commit, fill = c.release, c.getwritebuf, c.commit, _native.fill
        stamps[0] = _ns()
        for i in range(n):
            seq = first + i
            out = getw(size)
            if len(out) == 1:  # inline: _write_buffers
                fill(out[0].data, seq)
                commit(out, size)
            else:
                c.abort(out)
                _write_buffers(ch, seq, size, True)
            bufs = buffers()
            stamps[i + 1] = _ns()
            m = _joined(bufs)
            if _bad(m, seq, size, mask, full):
                verify(bytes(m), seq, size, full)
            for b in bufs:
                release(b)
        return stamps
    check = _native.check
    stamps[0] = _ns()
    for i in range(n):
        seq = first + i
        send(message(seq, size))
        m = recv()
        stamps[i + 1] = _ns()
        if (
            len(m) != size
            or int.from_bytes(m[:8], "little") != seq & mask
            or (full and check(m, seq) >= 0)
        ):
            verify(m, seq, size, full)
    return stamps


def _throughput(ch: Channel, size: int, n: int, first: int, batch: int, api: str = "msg") -> float:
    messages = _native.messages
    ch.send(json.dumps({"op": "thr", "n": n, "first": first, "api": api}).encode())
    send_many = ch.send_many
    t0 = _ns()
    seq, end = first, first + n
    if api == "buffer":
        c = cast(Any, ch)
        flush, getw, commit, fill = c.flush, c.getwritebuf, c.commit, _native.fill
        while seq < end:
            k = min(batch, end - seq)
            for s in range(seq, seq + k):
                out = getw(size)
                if len(out) == 1:  # inline: _write_buffers
                    fill(out[0].data, s)
                    commit(out, size, flush=False)
                else:
                    c.abort(out)
                    _write_buffers(ch, s, size, False)
            flush()
            seq += k
    else:
        while seq < end:
            k = min(batch, end - seq)
            send_many(messages(seq, k, size))
            seq += k
    ch.flush()
    last = int(json.loads(ch.recv())["last_ns"])
    return n / ((last - t0) / 1e9)


def _batch_for(size: int) -> int:
    return max(1, min(256, (256 * 1024) // max(size, 1)))


def _grow(run: Callable[[int], float], n: int, opts: dict[str, Any]) -> int:
    """Run ``run(n)`` (which returns seconds) with a growing n until a run lasts a quarter of the
    target; return the count for one repeat of about the target. The trial is the warm-up."""
    target: float = opts["target_s"]
    cap: int = opts["max_iters"]
    while True:
        took = run(n)
        if took >= target / 4 or n >= cap:
            break
        n = min(cap, max(n * 2, int(n * target / max(took, 1e-6) / 2)))
    return min(cap, max(n, int(n * target / max(took, 1e-6))))


def _latency_result(samples: list[int], n: int) -> dict[str, Any]:
    samples.sort()
    return {
        "p50_ns": samples[len(samples) // 2],
        "p99_ns": samples[min(len(samples) - 1, (len(samples) * 99) // 100)],
        "min_ns": samples[0],
        "max_ns": samples[-1],
        "mean_ns": int(statistics.fmean(samples)),
        "samples": len(samples),
        "iterations": n,
    }


def measure(ch: Channel, point: Point, opts: dict[str, Any]) -> dict[str, Any]:
    """Worker A: measure ``point`` over ``ch`` against ``serve_peer`` (counts grow until a
    repeat lasts ``opts["target_s"]``); the record's result fields."""
    full = opts["verify"] == "full"
    size, repeats, api = point.size, opts["repeats"], point.api
    first = 0

    if point.mode == "latency":

        def trial(n: int) -> float:
            nonlocal first
            t = _latency(ch, size, n, first, full, api)
            first += n
            return (t[n] - t[0]) / 1e9

        n = _grow(trial, 50, opts)
        samples: list[int] = []
        for _ in range(repeats):
            t = _latency(ch, size, n, first, full, api)
            first += n
            samples.extend(t[i + 1] - t[i] for i in range(n))
        return _latency_result(samples, n)

    batch = min(API_BATCH, max(1, API_BATCH_BYTES // size)) if api == "batch" else _batch_for(size)

    def trial_thr(n: int) -> float:
        nonlocal first
        t0 = time.perf_counter()
        _throughput(ch, size, n, first, batch, api)
        first += n
        return time.perf_counter() - t0

    n = _grow(trial_thr, batch * 4, opts)
    rates = []
    for _ in range(repeats):
        rates.append(_throughput(ch, size, n, first, batch, api))
        first += n
    rate = statistics.median(rates)
    return {
        "msgs_per_s": rate,
        "bytes_per_s": rate * size,
        "rates": rates,
        "iterations": n,
        "batch": batch,
    }


def _floor(point: Point, opts: dict[str, Any]) -> dict[str, Any]:
    """The floor row: a cache line ping-pong in C between the two pinned CPUs."""
    mem = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and MAP_SHARED: seen by the forked child
    cmd_r, cmd_w = os.pipe()
    hop_ns = 2_000_000_000  # a peer that does not answer a hop in 2 s is gone
    pid = os.fork()
    if pid == 0:  # worker B: the ponger
        code = 0
        try:
            os.close(cmd_w)
            os.sched_setaffinity(0, {point.cpus[1]})
            base = 0
            with os.fdopen(cmd_r, "rb") as cmds:
                for line in cmds:
                    n = int(line)
                    if not _native.floor(mem, 1, base, n, None, hop_ns):
                        raise TimeoutError("the pinger stopped")
                    base += 2 * n
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(cmd_r)
    base = 0

    def rally(n: int) -> array.array[int]:
        nonlocal base
        stamps = array.array("q", bytes(8 * (n + 1)))
        os.write(cmd_w, b"%d\n" % n)
        if not _native.floor(mem, 0, base, n, stamps, hop_ns):
            raise VerifyError("the ponger stopped answering")
        base += 2 * n
        return stamps

    def trial(n: int) -> float:
        t = rally(n)
        return (t[n] - t[0]) / 1e9

    try:
        n = _grow(trial, 1000, opts)
        samples: list[int] = []
        for _ in range(opts["repeats"]):
            t = rally(n)
            samples.extend(t[i + 1] - t[i] for i in range(n))
    finally:
        os.close(cmd_w)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise VerifyError("the ponger failed (see its traceback above)")
    return _latency_result(samples, n)


def _worker_a(point: Point, link: Link | None, opts: dict[str, Any], out_fd: int) -> None:
    """Pin, connect, fork B, measure; write the result (JSON) to ``out_fd``."""
    os.sched_setaffinity(0, {point.cpus[0]})
    result: dict[str, Any]
    if point.transport == FLOOR:
        try:
            result = {**_floor(point, opts), "verified": True}
        except BaseException as e:
            result = {"verified": False, "error": f"{type(e).__name__}: {e}"}
        os.write(out_fd, json.dumps(result).encode())
        return
    assert link is not None
    err_r, err_w = os.pipe()  # B's error, if it fails, for A's record
    link.setup(point)
    pid = os.fork()
    if pid == 0:  # worker B
        os.close(err_r)
        code = 0
        try:
            os.sched_setaffinity(0, {point.cpus[1]})
            ch = link.end(1)
            serve_peer(ch, point.size, opts["verify"] == "full")
            ch.close()
        except BaseException as e:
            os.write(err_w, f"{type(e).__name__}: {e}".encode()[:4000])
            if not isinstance(e, VerifyError):
                traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(err_w)
    try:
        ch = link.end(0)
        chosen = (getattr(ch, "transport", None), getattr(ch, "safe", None))
        result = measure(ch, point, opts)
        if point.transport == AUTO:
            result["chosen"], result["chosen_safe"] = chosen
        ch.send(json.dumps({"op": "end"}).encode())
        ch.close()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise VerifyError("the peer process failed")
        result["verified"] = True
    except BaseException as e:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        error = f"{type(e).__name__}: {e}"
        peer_error = os.read(err_r, 4096).decode(errors="replace")
        if peer_error:
            error = f"peer: {peer_error} (here: {error})"
        result = {"verified": False, "error": error}
    os.write(out_fd, json.dumps(result).encode())


def run_point(
    point: Point,
    *,
    placement: str,
    repeats: int = 3,
    target_s: float = 0.1,
    verify: str = "seq",
    timeout_s: float = 60.0,
    max_iters: int = 2_000_000,
    link: Link | None = None,
) -> dict[str, Any]:
    """Measure one point in two fresh pinned processes; return its JSON record (DESIGN.md §9).

    Never raises for a failing or stuck transport: the record then has ``verified: false`` and
    ``error``. ``link`` replaces the one ``point.transport`` names (tests inject faulty ones)."""
    if verify not in ("seq", "full"):
        raise ValueError("verify must be 'seq' or 'full'")
    if point.transport == FLOOR and point.mode != "latency":
        raise ValueError("the floor row measures latency only")
    if point.api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}")
    if point.api != "msg" and (point.transport == FLOOR or point.transport.startswith("peer:")):
        raise ValueError("the batch and buffer APIs are fable's: not for the floor or a peer")
    if point.api == "batch" and point.mode != "throughput":
        raise ValueError("the batch API measures throughput only")
    opts = {"repeats": repeats, "target_s": target_s, "verify": verify, "max_iters": max_iters}
    if link is None and point.transport != FLOOR:
        link = link_for(point.transport)
    record: dict[str, Any] = {
        "transport": point.transport,
        "safe": point.safe,
        "mode": point.mode,
        "size": point.size,
        "api": point.api,
        "cpus": list(point.cpus),
        "placement": placement,
        "repeats": repeats,
        "verify": verify,
    }
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # worker A
        code = 0
        try:
            os.close(rfd)
            os.setpgid(0, 0)
            _worker_a(point, link, opts, wfd)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout_s
    timed_out = False
    result = select.poll()  # not select.select: any fd number works
    result.register(rfd, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if result.poll(int(left * 1000) + 1):
                b = os.read(rfd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
    finally:
        os.close(rfd)
        try:
            os.killpg(pid, signal.SIGKILL)  # B too, and anything a peer library left running
        except OSError:
            pass
        os.waitpid(pid, 0)
        if link is not None:
            link.cleanup()
    if timed_out:
        record.update(verified=False, error=f"timed out after {timeout_s:g} s")
        return record
    try:
        record.update(json.loads(b"".join(chunks)))
    except ValueError:
        record.update(verified=False, error="the measuring process died without a result")
    return record


def merge_rounds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the same point from several interleaved rounds -> one record per point: the
    round with the median p50 (latency) or rate (throughput); ``rounds`` says how many, and a
    point fails if any round failed."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        key = (
            r["transport"],
            r["safe"],
            r["mode"],
            r["size"],
            r.get("api", "msg"),
            tuple(r["cpus"]),
            r.get("placement"),  # (other-host points run on the same CPUs as local ones)
        )
        groups.setdefault(key, []).append(r)
    out = []
    for rs in groups.values():
        bad = [r for r in rs if not r.get("verified")]
        if bad:
            pick = dict(bad[0])
        else:
            metric = "p50_ns" if rs[0]["mode"] == "latency" else "msgs_per_s"
            pick = dict(sorted(rs, key=lambda r: r[metric])[len(rs) // 2])
            pick["round_values"] = [r[metric] for r in rs]
            if rs[0]["transport"] == AUTO:
                pick["chosen_rounds"] = [r.get("chosen") for r in rs]
        pick["rounds"] = len(rs)
        out.append(pick)
    return out
