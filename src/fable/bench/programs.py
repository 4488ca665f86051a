"""``fable bench redis``: what ``fable run`` buys an unmodified program (issue 23's acceptance).

One ``redis-server`` runs under ``fable run`` (``--save ''``, a unix socket too); each round runs
``redis-benchmark -t set,get -n N -c 50 -P 1 -q`` three ways, in an order that rotates from
round to round: over plain TCP (``-p``), under ``fable run`` (``-p``, carried by unix sockets),
and over the server's own unix socket (``-s``). The result is each way's median requests/s per
test, fable's ratios to the other two, and what was checked on the way:

- ``flows``: the most ``fable run`` flows (``reconfigurable: false``) the daemon listed during a
  fable round (one per benchmark connection: ``-c``);
- ``out_segs``: how much the loopback ``Tcp: OutSegs`` (``/proc/net/snmp``) grew per round, each
  way (under fable only the rendezvous uses TCP: a few segments per connection);
- ``client_addr``: ``redis-cli client list`` under ``fable run`` shows ``addr=127.0.0.1:...``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fable.client import one_shot
from fable.errors import FableError
from fable.run import environment

__all__ = ["WAYS", "out_segs", "redis", "redis_server", "table"]

WAYS = ("tcp", "fable", "unix")
_RATE = re.compile(r"^\s*([A-Z]+): ([0-9.]+) requests per second", re.M)


def out_segs() -> int:
    """The host's (this network namespace's) TCP segments sent so far."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    for head, vals in itertools.pairwise(lines):
        if head[0] == "Tcp:" and vals[0] == "Tcp:" and "OutSegs" in head:
            return int(vals[head.index("OutSegs")])
    raise FableError("no Tcp: OutSegs in /proc/net/snmp")


def _need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise FableError(f"{', '.join(missing)} not found (Debian: redis-server, redis-tools)")


@contextlib.contextmanager
def redis_server(port: int, unix: str, dir: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server under ``fable run`` on 127.0.0.1/::1 ``port`` and the unix socket
    ``unix`` (snapshots, if asked for, in ``dir``), answering when this yields; shut down
    after."""
    _need("redis-server")
    where = ["--dir", dir] if dir else []
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
            unix,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *where,
        ],
        env=environment("redis-server"),
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FableError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _flows_seen(stop: threading.Event, out: list[int]) -> None:
    """The most fable-run flows the daemon lists, polled until ``stop``."""
    while not stop.wait(0.5):
        with contextlib.suppress(FableError, OSError):
            reply = one_shot("flows")
            n = sum(1 for f in (reply or {}).get("flows", []) if not f.get("reconfigurable", True))
            out.append(n)


def _benchmark(way: str, port: int, unix: str, requests: int, clients: int) -> dict[str, Any]:
    target = ["-s", unix] if way == "unix" else ["-p", str(port)]
    cmd = [
        "redis-benchmark",
        *target,
        "-t",
        "set,get",
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-P",
        "1",
        "-q",
    ]
    env = environment("redis-benchmark") if way == "fable" else None
    seen: list[int] = []
    stop = threading.Event()
    poller = threading.Thread(target=_flows_seen, args=(stop, seen), daemon=True)
    if way == "fable":
        poller.start()
    before = out_segs()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        if way == "fable":
            poller.join()
    segs = out_segs() - before
    text = done.stdout.replace("\r", "\n")
    rates = {k.lower(): float(v) for k, v in _RATE.findall(text)}
    if done.returncode != 0 or set(rates) != {"set", "get"}:
        raise FableError(f"redis-benchmark ({way}) failed: {done.stderr.strip() or text[-300:]}")
    return {"way": way, **rates, "out_segs": segs, "flows": max(seen, default=0)}


def redis(
    rounds: int = 5, requests: int = 100_000, clients: int = 50, port: int = 16379
) -> dict[str, Any]:
    """Interleaved rounds of redis-benchmark three ways (module docstring); the runs and the
    medians."""
    _need("redis-server", "redis-benchmark", "redis-cli")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fable-redis-") as tmp:
        unix = os.path.join(tmp, "redis.sock")
        with redis_server(port, unix, tmp):
            cl = subprocess.run(
                ["redis-cli", "-p", str(port), "client", "list"],
                env=environment("redis-cli"),
                capture_output=True,
                text=True,
                timeout=30,
            )
            for r in range(rounds):
                for k in range(len(WAYS)):
                    way = WAYS[(r + k) % len(WAYS)]
                    runs.append({"round": r, **_benchmark(way, port, unix, requests, clients)})
    med = {
        way: {
            t: statistics.median(x[t] for x in runs if x["way"] == way)
            for t in ("set", "get", "out_segs")
        }
        for way in WAYS
    }
    fable_runs = [x for x in runs if x["way"] == "fable"]
    return {
        "requests": requests,
        "clients": clients,
        "rounds": rounds,
        "runs": runs,
        "median": med,
        "ratio": {
            f"{t}_vs_{other}": med["fable"][t] / med[other][t]
            for t in ("set", "get")
            for other in ("unix", "tcp")
        },
        "flows": min(x["flows"] for x in fable_runs),
        "client_addr": "addr=127.0.0.1:" in cl.stdout,
    }


def table(result: dict[str, Any]) -> str:
    """The result as the README's table."""
    med, ratio = result["median"], result["ratio"]
    lines = [
        f"redis-benchmark -t set,get -n {result['requests']} -c {result['clients']} -P 1, "
        f"median of {result['rounds']} interleaved rounds",
        f"{'way':<8} {'SET req/s':>10} {'GET req/s':>10} {'TCP OutSegs':>12}",
    ]
    for way in WAYS:
        m = med[way]
        lines.append(f"{way:<8} {m['set']:>10,.0f} {m['get']:>10,.0f} {m['out_segs']:>12,.0f}")
    lines.append(
        f"fable/unix: SET {ratio['set_vs_unix']:.2f}x GET {ratio['get_vs_unix']:.2f}x; "
        f"fable/tcp: SET {ratio['set_vs_tcp']:.2f}x GET {ratio['get_vs_tcp']:.2f}x"
    )
    lines.append(
        f"flows listed during each fable round: at least {result['flows']}; "
        f"client list shows addr=127.0.0.1: {result['client_addr']}"
    )
    return "\n".join(lines)
