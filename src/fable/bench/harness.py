"""One measurement point: two pinned processes, one transport, one size, one mode.

Method (docs/bench.md says the same for users):
- The driver forks worker A, which pins itself to CPU ``a``, makes the connection with
  ``open_pair`` and forks worker B (pinned to CPU ``b``) with the other end. The driver holds no
  connection; it only waits for A's JSON result, with a timeout, and kills both on expiry.
- Every message carries its sequence number in its first 8 bytes (all of it below 8 B); the
  receiver checks it, and with ``verify="full"`` compares every byte with what was sent.
- The writer builds every message anew (sequence + body), so it writes every byte it sends.
- latency: ping-pong round trips; A timestamps each one into a preallocated array
  (``time.perf_counter_ns``), so percentiles come from every sample, after a warm-up.
- throughput: A writes ``n`` messages with ``send_many`` in batches; B reads them with ``recv``
  and reports when the last arrived; rate = n / (last arrival - first send). Both clocks are the
  system's monotonic clock, shared by all processes.
- The iteration count grows from a short trial until one repeat lasts about ``target_s``.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any

from fable.connection import Connection
from fable.transports.setup import open_pair

__all__ = ["Point", "run_point"]

SCHEMA_VERSION = 1
_ns = time.perf_counter_ns


@dataclass(frozen=True)
class Point:
    transport: str
    safe: bool
    mode: str  # "latency" | "throughput"
    size: int
    cpus: tuple[int, int]


def _message(seq: int, body: bytes) -> bytes:
    if len(body) >= 8:
        return seq.to_bytes(8, "little") + body[8:]
    return (seq & ((1 << (8 * len(body))) - 1)).to_bytes(len(body), "little")


def _mask(size: int) -> int:
    return (1 << (8 * min(size, 8))) - 1


def _body(size: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


class VerifyError(AssertionError):
    pass


def _check(msg: bytes, seq: int, size: int, body: bytes, full: bool) -> None:
    if len(msg) != size:
        raise VerifyError(f"message {seq}: {len(msg)} B instead of {size} B")
    got = int.from_bytes(msg[:8], "little")
    if got != seq & _mask(size):
        raise VerifyError(f"message {seq}: sequence {got} (lost, duplicated or reordered)")
    if full and msg[8:] != body[8:]:
        raise VerifyError(f"message {seq}: payload corrupted")


# ---------------------------------------------------------------------------------- worker B
def _peer(conn: Connection, size: int, full: bool) -> None:
    body = _body(size)
    while True:
        cmd = json.loads(conn.recv())
        op, n = cmd["op"], cmd.get("n", 0)
        if op == "end":
            return
        first = cmd["first"]
        if op == "lat":
            recv, send = conn.recv, conn.send
            for seq in range(first, first + n):
                m = recv()
                _check(m, seq, size, body, full)
                send(m)
        elif op == "thr":
            recv = conn.recv
            m = recv()
            _check(m, first, size, body, full)
            for seq in range(first + 1, first + n):
                m = recv()
                if len(m) != size or int.from_bytes(m[:8], "little") != seq & _mask(size):
                    _check(m, seq, size, body, full)
                if full and m[8:] != body[8:]:
                    _check(m, seq, size, body, full)
            last = _ns()
            conn.send(json.dumps({"last_ns": last}).encode())


# ---------------------------------------------------------------------------------- worker A
def _latency(conn: Connection, size: int, n: int, first: int, full: bool) -> array.array[int]:
    body = _body(size)
    stamps = array.array("q", bytes(8 * (n + 1)))
    conn.send(json.dumps({"op": "lat", "n": n, "first": first}).encode())
    send, recv = conn.send, conn.recv
    stamps[0] = _ns()
    for i in range(n):
        seq = first + i
        send(_message(seq, body))
        m = recv()
        stamps[i + 1] = _ns()
        if len(m) != size or int.from_bytes(m[:8], "little") != seq & _mask(size):
            _check(m, seq, size, body, full)
        if full and m[8:] != body[8:]:
            _check(m, seq, size, body, full)
    return stamps


def _throughput(conn: Connection, size: int, n: int, first: int, batch: int) -> float:
    body = _body(size)
    tail = body[8:]
    conn.send(json.dumps({"op": "thr", "n": n, "first": first}).encode())
    send_many = conn.send_many
    t0 = _ns()
    seq = first
    end = first + n
    if size >= 8:
        while seq < end:
            k = min(batch, end - seq)
            send_many([s.to_bytes(8, "little") + tail for s in range(seq, seq + k)])
            seq += k
    else:
        while seq < end:
            k = min(batch, end - seq)
            send_many([_message(s, body) for s in range(seq, seq + k)])
            seq += k
    conn.flush()
    last = int(json.loads(conn.recv())["last_ns"])
    return n / ((last - t0) / 1e9)


def _batch_for(size: int) -> int:
    return max(1, min(256, (256 * 1024) // max(size, 1)))


def _worker_a(point: Point, opts: dict[str, Any], out_fd: int) -> None:
    os.sched_setaffinity(0, {point.cpus[0]})
    conn, pending = open_pair(point.transport, safe=point.safe)
    pid = os.fork()
    if pid == 0:  # worker B
        code = 0
        try:
            os.sched_setaffinity(0, {point.cpus[1]})
            peer = pending.open()
            _peer(peer, point.size, opts["verify"] == "full")
            peer.close()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    pending.close()
    full = opts["verify"] == "full"
    target = opts["target_s"]
    repeats = opts["repeats"]
    result: dict[str, Any] = {}
    first = 0
    try:
        if point.mode == "latency":
            # warm-up and trial, then grow the count until a repeat lasts about `target` s
            n = 50
            while True:
                t = _latency(conn, point.size, n, first, full)
                first += n
                took = (t[n] - t[0]) / 1e9
                if took >= target / 4 or n >= opts["max_iters"]:
                    break
                n = min(opts["max_iters"], max(n * 2, int(n * target / max(took, 1e-6) / 2)))
            n = min(opts["max_iters"], max(n, int(n * target / max(took, 1e-6))))
            samples: list[int] = []
            for _ in range(repeats):
                t = _latency(conn, point.size, n, first, full)
                first += n
                samples.extend(t[i + 1] - t[i] for i in range(n))
            samples.sort()
            result = {
                "p50_ns": samples[len(samples) // 2],
                "p99_ns": samples[min(len(samples) - 1, (len(samples) * 99) // 100)],
                "min_ns": samples[0],
                "max_ns": samples[-1],
                "mean_ns": int(statistics.fmean(samples)),
                "samples": len(samples),
                "iterations": n,
            }
        else:
            batch = _batch_for(point.size)
            n = batch * 4
            while True:
                t0 = time.perf_counter()
                _throughput(conn, point.size, n, first, batch)
                first += n
                took = time.perf_counter() - t0
                if took >= target / 4 or n >= opts["max_iters"]:
                    break
                n = min(opts["max_iters"], max(n * 2, int(n * target / max(took, 1e-6) / 2)))
            n = min(opts["max_iters"], max(n, int(n * target / max(took, 1e-6))))
            rates = []
            for _ in range(repeats):
                rates.append(_throughput(conn, point.size, n, first, batch))
                first += n
            rate = statistics.median(rates)
            result = {
                "msgs_per_s": rate,
                "bytes_per_s": rate * point.size,
                "rates": rates,
                "iterations": n,
                "batch": batch,
            }
        conn.send(json.dumps({"op": "end"}).encode())
        conn.close()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise VerifyError("the peer process failed (see its traceback above)")
        result["verified"] = True
    except BaseException as e:
        result = {"verified": False, "error": f"{type(e).__name__}: {e}"}
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
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
) -> dict[str, Any]:
    """Measure one point in two fresh pinned processes; returns its JSON record (never raises
    for a failing or stuck transport: the record then has ``verified: false`` and ``error``)."""
    if verify not in ("seq", "full"):
        raise ValueError("verify must be 'seq' or 'full'")
    opts = {"repeats": repeats, "target_s": target_s, "verify": verify, "max_iters": max_iters}
    record: dict[str, Any] = {
        "transport": point.transport,
        "safe": point.safe,
        "mode": point.mode,
        "size": point.size,
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
            _worker_a(point, opts, wfd)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if select.select([rfd], [], [], left)[0]:
                b = os.read(rfd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
    finally:
        os.close(rfd)
        if timed_out:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        os.waitpid(pid, 0)
    if timed_out:
        record.update(verified=False, error=f"timed out after {timeout_s:.0f} s")
        return record
    try:
        record.update(json.loads(b"".join(chunks)))
    except ValueError:
        record.update(verified=False, error="the measuring process died without a result")
    return record


def machine_info() -> dict[str, Any]:
    """What the JSON's ``machine`` object says about where the numbers came from."""
    import platform

    from fable import __version__
    from fable.bench.topology import Topology

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fable": __version__,
        **Topology.read().describe(),
    }
