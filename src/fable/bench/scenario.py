"""``fable bench --scenario coschedule``: what the placement trigger buys (daemon/triggers.py);
``--scenario switch``: how long a live reconfiguration takes, per ordered pair of transports;
``--scenario connect``: what setting a connection up costs (``connect_times``), beside TCP and
unix sockets.

Two processes, pinned to two CPUs, register with a daemon of the bench's own and ping-pong
64 B messages over mempipe-spin (forced at connect: the initial choice, not an operator hold;
the hints msg_size=64 and mode="latency" tell the policy what matters when it must choose).
Midway the driver pins every thread of both processes to the first CPU, as an operator's
``taskset -a`` would. With triggers on, the daemon sees the ends' affinities overlap, the
policy now excludes the spinning transport, and it switches the flow to the best transport
for one shared core; with triggers off the flow keeps spinning and every round trip waits for
the scheduler. The run is done once each way; the result has the round-trip times before the
pinning, between the pinning and the switch, and after the switch, the switch time (from the
pinning to the first round trip on the new transport) and a timeline.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import statistics
import time
import traceback
from collections.abc import Iterator
from typing import Any

import psutil

__all__ = ["CONNECTS", "connect_times", "coschedule", "pin_process", "switch_times"]

SIZE = 64


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (``taskset -a -p``)."""
    for t in psutil.Process(pid).threads():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(t.id, cpus)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _read_all(fd: int) -> bytes:
    out = []
    while chunk := os.read(fd, 1 << 20):
        out.append(chunk)
    os.close(fd)
    return b"".join(out)


def _echo(cpu: int, name: str, ready_w: int) -> None:
    import fable

    os.sched_setaffinity(0, {cpu})
    ctx = fable.register(name)
    lst = ctx.listen()
    os.write(ready_w, b"r")
    conn = lst.accept(timeout=30)
    try:
        while True:
            conn.send(conn.recv())
    except fable.ConnectionClosed:
        pass


def _pinger(cpu: int, name: str, to: str, duration: float, out_w: int, go_w: int) -> None:
    import fable

    os.sched_setaffinity(0, {cpu})
    ctx = fable.register(name)
    conn = ctx.connect(to, transport="mempipe-spin", msg_size=SIZE, mode="latency", timeout=30)
    assert not isinstance(conn, fable.PlainStream)
    msg = b"p" * SIZE
    for _ in range(2000):  # warm up
        conn.send(msg)
        conn.recv()
    t_end, rtt, epochs = array.array("q"), array.array("q"), array.array("i")
    clock = time.monotonic_ns
    os.write(go_w, b"g")
    stop = clock() + int(duration * 1e9)
    now = clock()
    while now < stop:
        t0 = now
        conn.send(msg)
        conn.recv()
        now = clock()
        t_end.append(now)
        rtt.append(now - t0)
        epochs.append(conn.epoch)
    last = conn.last_switch
    conn.close()
    head = json.dumps({"n": len(rtt), "transport": conn.transport, "last_switch": last}).encode()
    os.write(out_w, len(head).to_bytes(4, "little") + head)
    for arr in (t_end, rtt, epochs):
        data = arr.tobytes()
        view = memoryview(data)
        while view:
            view = view[os.write(out_w, view) :]


def _child(fn: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    return pid


def _run_once(cpus: tuple[int, int], duration: float, triggers: bool) -> dict[str, Any]:
    from fable.client import private_daemon

    with _env("FABLE_TRIGGERS", "1" if triggers else "0"), private_daemon():
        tag = f"cosched/{os.getpid()}/{int(triggers)}"
        rr, rw = os.pipe()
        b = _child(_echo, cpus[1], f"{tag}/b", rw)
        os.close(rw)
        if os.read(rr, 1) != b"r":
            raise RuntimeError("the echo process did not start")
        os.close(rr)
        out_r, out_w = os.pipe()
        go_r, go_w = os.pipe()
        a = _child(_pinger, cpus[0], f"{tag}/a", f"{tag}/b", duration, out_w, go_w)
        os.close(out_w)
        os.close(go_w)
        try:
            if os.read(go_r, 1) != b"g":
                raise RuntimeError("the ping-pong did not start")
            time.sleep(duration / 2)
            t_pin = time.monotonic_ns()
            for pid in (a, b):
                pin_process(pid, {cpus[0]})
            raw = _read_all(out_r)
        finally:
            os.close(go_r)
            for pid in (a, b):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    if len(raw) < 4:
        raise RuntimeError("the ping-pong process failed (see above)")
    hlen = int.from_bytes(raw[:4], "little")
    head = json.loads(raw[4 : 4 + hlen])
    n = head["n"]
    body = memoryview(raw)[4 + hlen :]
    t_end, rtt, epochs = array.array("q"), array.array("q"), array.array("i")
    t_end.frombytes(body[: 8 * n])
    rtt.frombytes(body[8 * n : 16 * n])
    epochs.frombytes(body[16 * n : 20 * n])
    return _summarize(t_end, rtt, epochs, t_pin, duration, head, triggers)


def _us(values: list[int]) -> float | None:
    return round(statistics.median(values) / 1000, 1) if values else None


def _summarize(
    t_end: Any, rtt: Any, epochs: Any, t_pin: int, duration: float, head: Any, triggers: bool
) -> dict[str, Any]:
    first_new = next((i for i, e in enumerate(epochs) if e > epochs[0]), None)
    t_switch = t_end[first_new] if first_new is not None else None
    before = [r for t, r in zip(t_end, rtt, strict=True) if t < t_pin]
    end_during = t_switch if t_switch is not None else (t_end[-1] if len(t_end) else t_pin)
    during = [r for t, r in zip(t_end, rtt, strict=True) if t_pin <= t < end_during]
    after = [r for t, r in zip(t_end, rtt, strict=True) if t_switch is not None and t > t_switch]
    buckets = 24
    start = t_end[0] - rtt[0] if len(t_end) else t_pin
    width = int(duration * 1e9 / buckets)
    timeline = []
    for k in range(buckets):
        lo, hi = start + k * width, start + (k + 1) * width
        vals = [r for t, r in zip(t_end, rtt, strict=True) if lo <= t < hi]
        timeline.append(
            {
                "t_s": round((lo - t_pin) / 1e9, 2),
                "round_trips": len(vals),
                "p50_us": _us(vals),
            }
        )
    return {
        "triggers": triggers,
        "round_trips": len(rtt),
        "before_us": _us(before),
        "during_us": _us(during),
        "during_round_trips": len(during),
        "after_us": _us(after),
        "switch_ms": round((t_switch - t_pin) / 1e6, 1) if t_switch is not None else None,
        "final_transport": head["transport"],
        "last_switch": head["last_switch"],
        "timeline": timeline,
    }


def coschedule(cpus: tuple[int, int], duration: float = 6.0) -> list[dict[str, Any]]:
    """The scenario with triggers on, then off (module docstring)."""
    return [_run_once(cpus, duration, True), _run_once(cpus, duration, False)]


def switch_times(cpus: tuple[int, int], repeats: int = 3) -> dict[tuple[str, str], float]:
    """Milliseconds from ``conn.reconfigure(b)`` on a connection over ``a`` to the first message
    echoed back over ``b`` (median of ``repeats``), for every ordered pair of transports; this
    process on ``cpus[0]``, a forked echo process on ``cpus[1]``, both trusting (every form)."""
    import fable
    from fable.transports import REGISTRY

    def form(name: str) -> bool:
        return REGISTRY[name].caps.forms[0]

    def echo(peer: Any) -> None:
        os.sched_setaffinity(0, {cpus[1]})
        with contextlib.suppress(fable.ConnectionClosed):
            for m in peer:
                peer.send(m)

    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    out: dict[tuple[str, str], float] = {}
    try:
        for a in REGISTRY:
            for b in REGISTRY:
                conn, pending = fable.open_pair(a, safe=form(a), trusted=True)
                pid = _child(lambda p=pending: echo(p.open(trusted=True)))
                pending.close()
                times = []
                try:
                    cur = a
                    for _ in range(2 * repeats):  # a -> b, then back, so that each is timed
                        for _ in range(20):
                            conn.send(b"x")
                            conn.recv(timeout=10)
                        nxt = b if cur == a else a
                        t0 = time.perf_counter()
                        conn.reconfigure(nxt, safe=form(nxt), timeout=10)
                        conn.send(b"first")
                        if conn.recv(timeout=10) != b"first":
                            raise RuntimeError(f"{a} -> {b}: the echo came back wrong")
                        times.append(time.perf_counter() - t0)
                        if conn.transport != nxt or conn.epoch != len(times):
                            raise RuntimeError(
                                f"{cur} -> {nxt}: the connection is on {conn.transport} "
                                f"(epoch {conn.epoch}) after switch {len(times)}"
                            )
                        cur = nxt
                finally:
                    conn.close()
                    status = os.waitpid(pid, 0)[1]
                if os.waitstatus_to_exitcode(status) != 0:
                    raise RuntimeError(f"{a} -> {b}: the echo process failed (status {status})")
                out[(a, b)] = statistics.median(times[0::2]) * 1e3
    finally:
        os.sched_setaffinity(0, old)
    return out


CONNECTS = 200  # connections each kind of the connect scenario makes


def _serve_fable(cpu: int, name: str, ready_w: int) -> None:
    """Accept connections one after another; echo the first message of each, then wait for
    the peer's close."""
    import fable

    os.sched_setaffinity(0, {cpu})
    lst = fable.register(name).listen()
    os.write(ready_w, b"r")
    os.close(ready_w)
    while True:
        conn = lst.accept(timeout=60)
        with contextlib.suppress(fable.ConnectionClosed, fable.PeerDied):
            conn.send(conn.recv(timeout=10))
            conn.recv(timeout=10)  # the peer's close
        conn.close()


def _serve_socket(cpu: int, lst: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        c, _ = lst.accept()
        with c:
            c.sendall(c.recv(SIZE))
            c.recv(1)  # the peer's close


def _cpu_s(pid: int) -> float:
    """CPU seconds the threads of process ``pid`` alive now have run (/proc's schedstat: in
    nanoseconds, where ``stat`` counts 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{tid}/schedstat") as f,
        ):
            total += int(f.read().split()[0])
    return total / 1e9


def _cpu_per(pids: dict[str, int], before: dict[str, float], n: int) -> dict[str, float]:
    return {k: round((_cpu_s(p) - before[k]) / n * 1e6, 1) for k, p in pids.items()}


def connect_times(cpus: tuple[int, int], n: int | None = None) -> dict[str, dict[str, Any]]:
    """Microseconds from nothing to the first 64 B message echoed back, ``n`` (``CONNECTS``)
    times per kind:
    ``fable`` (``connect`` to a name through a daemon of the bench's own, no hints: the
    policy's pick), and TCP over loopback and a unix socket (connect, send, receive) for
    scale; this process on ``cpus[0]``, the accepting one on ``cpus[1]``. Each kind: median,
    p90, for fable the transport it got, and ``cpu_us``: the CPU time each process involved
    used per connection (connect, echo and close; ``this``, ``accepting``, ``daemon``), which
    says what bounds the time on a machine with few CPUs."""
    import socket
    import tempfile

    import fable
    from fable.client import one_shot, private_daemon

    n = CONNECTS if n is None else n
    old = os.sched_getaffinity(0)
    out: dict[str, dict[str, Any]] = {}
    msg = b"c" * SIZE

    def stats(times: list[float], **extra: Any) -> dict[str, Any]:
        times.sort()
        return {
            "median_us": round(statistics.median(times) * 1e6, 1),
            "p90_us": round(times[int(len(times) * 0.9)] * 1e6, 1),
            "n": len(times),
            **extra,
        }

    try:
        with private_daemon() as daemon, tempfile.TemporaryDirectory() as tmp:
            rr, rw = os.pipe()
            name = f"connect/{os.getpid()}"
            server = _child(_serve_fable, cpus[1], name, rw)
            os.close(rw)
            try:
                if os.read(rr, 1) != b"r":
                    raise RuntimeError("the accepting process did not start")
                os.sched_setaffinity(0, {cpus[0]})
                ctx = fable.register(f"{name}/client")
                hello = one_shot("hello", daemon)
                if hello is None:
                    raise RuntimeError("the bench's own daemon does not answer")
                pids = {"this": os.getpid(), "accepting": server, "daemon": hello["daemon"]}
                before = {k: _cpu_s(p) for k, p in pids.items()}
                times, got = [], set()
                for _ in range(n):
                    t0 = time.perf_counter()
                    conn = ctx.connect(name, timeout=10)
                    conn.send(msg)
                    if conn.recv(timeout=10) != msg:
                        raise RuntimeError("the echo came back wrong")
                    times.append(time.perf_counter() - t0)
                    got.add(getattr(conn, "transport", "?"))
                    conn.close()
                cpu = _cpu_per(pids, before, n)
                out["fable"] = stats(times, transport=",".join(sorted(got)), cpu_us=cpu)
            finally:
                os.close(rr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server, 9)
                os.waitpid(server, 0)
            for kind, family, addr in (
                ("tcp", socket.AF_INET, ("127.0.0.1", 0)),
                ("unix", socket.AF_UNIX, os.path.join(tmp, "s")),
            ):
                lst = socket.socket(family, socket.SOCK_STREAM)
                lst.bind(addr)
                lst.listen(64)
                where = lst.getsockname()
                pid = _child(_serve_socket, cpus[1], lst)
                lst.close()
                try:
                    pids = {"this": os.getpid(), "accepting": pid}
                    before = {k: _cpu_s(p) for k, p in pids.items()}
                    times = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        with socket.socket(family, socket.SOCK_STREAM) as c:
                            c.connect(where)
                            c.sendall(msg)
                            got_back = b""
                            while len(got_back) < SIZE:
                                got_back += c.recv(SIZE)
                            times.append(time.perf_counter() - t0)
                    out[kind] = stats(times, cpu_us=_cpu_per(pids, before, n))
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                    os.waitpid(pid, 0)
    finally:
        os.sched_setaffinity(0, old)
    return out
