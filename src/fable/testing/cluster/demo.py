"""``python -m fable.testing.cluster demo``: the cluster tier on three test hosts, and how it
fails (exit status 0 when every bound holds).

It makes three hosts and a ZooKeeper (``Cluster``), starts each host's daemon with
``--cluster``, registers two names on each, lists them with ``fable ls --cluster --json`` run
inside h1, then breaks things and measures each recovery against its bound:

- a host dies (everything in it killed): its names leave the cluster within the session
  timeout + 1 s;
- ZooKeeper down: a register, connect and echo on h1 still work; a cluster listing raises
  DaemonUnavailable within its timeout (+ 1 s for the command's start);
- ZooKeeper back (with its data, then with an empty data dir): every name, the one registered
  while it was down too, is listed again within 5 s;
- a daemon started while ZooKeeper is down starts, serves locally, and joins within 5 s of
  ZooKeeper's return.

Between hosts (each daemon also has ``--listen``): a process on h2 connects by name to one on
h1 and sends MESSAGES sequence-checked messages of mixed sizes, echoed back; the flow is on a
transport that crosses hosts, with a reason that names both hosts, and both hosts' ``eth0``
received at least the payload (the bytes really crossed the link); a latency flow
(``mode="latency"``) is on tcp-nodelay.

At the end everything is removed, and it checks that no namespace of this run is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from fable.errors import FableError
from fable.testing.cluster import Cluster, Host, finish, namespaces

SESSION_S = 3.0  # FABLE_CLUSTER_SESSION of the demo's daemons
LISTING_TIMEOUT_S = 2.0
BACK_S = 5.0  # the bound for everything being published again after ZooKeeper returns

HOLD = """
import sys, fable
ctxs = [fable.register(n) for n in sys.argv[1:]]
for c in ctxs:
    c.listen()
print("registered", flush=True)
sys.stdin.read()
"""

ECHO = """
import sys, threading, fable
lst = fable.register(sys.argv[1]).listen()
def serve():
    conn = lst.accept(timeout=10)
    conn.send(conn.recv(timeout=10))
t = threading.Thread(target=serve); t.start()
cli = fable.register(sys.argv[1] + "-client")
conn = cli.connect(sys.argv[1], timeout=10)
conn.send(b"ping")
assert conn.recv(timeout=10) == b"ping"
t.join()
print("echoed", flush=True)
"""


MESSAGES = 10_000
SIZES = (1, 100, 1500, 4096, 20_000, 65_536)  # the demo's mixed sizes, in turn

# h1's side: echo every message of every connection
SERVE = """
import sys, threading, fable
lst = fable.register(sys.argv[1]).listen(allow_remote=True)
print("listening", flush=True)
def serve(conn):
    try:
        while True:
            conn.send(conn.recv(timeout=60))
    except fable.ConnectionClosed:
        pass
while True:
    try:
        c = lst.accept(timeout=60)
    except fable.Timeout:
        break
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# h2's side of the demo: the checked stream, then a latency flow; one JSON line
ACROSS = """
import json, sys, fable
from fable.client import one_shot
n, sizes = int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
ctx = fable.register("demo/h2")
conn = ctx.connect(sys.argv[1], timeout=10)
payload = 0
for i in range(n):
    m = i.to_bytes(8, "little") * (sizes[i % len(sizes)] // 8 + 1)
    m = m[: sizes[i % len(sizes)]]
    conn.send(m)
    if conn.recv(timeout=30) != m:
        raise SystemExit(f"message {i} came back wrong")
    payload += len(m)
flows = one_shot("flows")["flows"]
fast = ctx.connect(sys.argv[1], timeout=10, mode="latency")
fast.send(b"ping")
assert fast.recv(timeout=10) == b"ping"
print(json.dumps({"transport": conn.transport, "payload": payload, "flows": flows,
                  "latency": fast.transport}), flush=True)
conn.close()
fast.close()
"""


def _rx_bytes(h: Host) -> int:
    """What ``h``'s eth0 has received, in bytes."""
    r = h.run(["cat", "/sys/class/net/eth0/statistics/rx_bytes"])
    return int(r.stdout)


def _listed(h: Host) -> dict[str, str] | None:
    """name -> host of the cluster listing through ``h``'s daemon, or None if it fails."""
    from fable.client import one_shot

    try:
        reply = one_shot("ls", h.socket, cluster=True, timeout=1.0)
    except (FableError, OSError):  # (DaemonUnavailable while ZooKeeper is away)
        return None
    return None if reply is None else {e["name"]: e["host"] for e in reply["endpoints"]}


def _until(cond: Callable[[], bool], limit: float) -> float | None:
    """Seconds until ``cond()`` held (polled every 50 ms), or None if not within ``limit``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


class _Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool]] = []

    def timed(self, what: str, bound: float, took: float | None, ok: bool = True) -> None:
        """A recovery: ``took`` seconds (None: never) against ``bound``; ``ok`` its outcome."""
        good = ok and took is not None and took <= bound
        self._row(what, f"<= {bound:g} s", "never" if took is None else f"{took:.2f} s", good)

    def check(self, what: str, ok: bool) -> None:
        """A fact with no time to it."""
        self._row(what, "-", "-", ok)

    def _row(self, what: str, bound: str, took: str, good: bool) -> None:
        self.rows.append((what, bound, took, good))
        print(f"  {'ok  ' if good else 'FAIL'} {what}: {took} (bound {bound})", flush=True)

    def print(self) -> None:
        w = max(len(r[0]) for r in self.rows)
        print(f"\n{'failure':<{w}}  {'bound':>9}  {'measured':>9}  result")
        for what, bound, took, good in self.rows:
            print(f"{what:<{w}}  {bound:>9}  {took:>9}  {'ok' if good else 'FAIL'}")


def _serve(h: Host, name: str, holders: list[Any]) -> Any:
    """Start the echo listener ``name`` in ``h``; its Popen."""
    p = h.popen([sys.executable, "-c", SERVE, name], stdout=subprocess.PIPE, text=True)
    holders.append(p)
    if p.stdout.readline().strip() != "listening":
        raise RuntimeError(f"{h.name}: {name} did not listen")
    return p


def _between_hosts(table: _Table, h1: Host, h2: Host, holders: list[Any]) -> None:
    """The connection between hosts: a checked stream h2 <-> h1 by name (module docstring)."""
    server = _serve(h1, "echo/h1", holders)
    rx1, rx2 = _rx_bytes(h1), _rx_bytes(h2)
    t0 = time.monotonic()
    r = h2.run(
        [sys.executable, "-c", ACROSS, "echo/h1", str(MESSAGES), ",".join(map(str, SIZES))],
        timeout=120,
    )
    took = time.monotonic() - t0
    got = json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 else {}
    grown = (_rx_bytes(h1) - rx1, _rx_bytes(h2) - rx2)
    payload = got.get("payload", 0)
    table.timed(
        f"h2 -> h1 by name: {MESSAGES} checked messages, echoed",
        60,
        took,
        ok=r.returncode == 0,
    )
    if r.returncode:
        print(r.stderr[-2000:])
    flow: dict[str, Any] = next((f for f in got.get("flows", []) if f["ends"][1] == "echo/h1"), {})
    reason = str(flow.get("reason", ""))
    print(f"  the flow: {flow.get('transport')} on hosts {flow.get('hosts')}: {reason[:160]}...")
    table.check(
        "  over a transport between hosts, its reason naming h1 and h2",
        flow.get("transport") in ("tcp", "tcp-nodelay")
        and flow.get("hosts") == ["h2", "h1"]
        and "h1" in reason
        and "h2" in reason,
    )
    print(f"  eth0 received: h1 {grown[0]} B, h2 {grown[1]} B; payload {payload} B each way")
    table.check(
        "  both hosts' eth0 received at least the payload", payload > 0 and min(grown) >= payload
    )
    table.check("  a latency flow h2 -> h1 is on tcp-nodelay", got.get("latency") == "tcp-nodelay")
    server.kill()  # (its name leaves the cluster: the rest of the demo counts names)
    server.wait()
    _until(lambda: "echo/h1" not in (_listed(h1) or {"echo/h1": ""}), 10)


def demo() -> int:
    table = _Table()
    holders: list[Any] = []
    prefix = ""
    with Cluster(3, zookeeper=True, daemons=False) as c:
        prefix = c.prefix
        zk = c.zookeeper
        assert zk is not None
        url = f"zk://{zk.hosts}/fable"
        env = {"FABLE_CLUSTER_SESSION": str(SESSION_S)}
        print(f"3 hosts, ZooKeeper at {zk.hosts}; daemons join {url} (session {SESSION_S:g} s)")
        for h in c.hosts:
            h.start_daemon("--cluster", url, "--listen", f"{h.address}:0", env=env)
        h1, h2, h3 = c.hosts
        try:
            names = {h.name: [f"svc/{h.name}", f"db/{h.name}"] for h in c.hosts}
            for h in c.hosts:
                p = h.popen(
                    [sys.executable, "-c", HOLD, *names[h.name]],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                holders.append(p)
                if p.stdout.readline().strip() != "registered":
                    raise RuntimeError(f"{h.name}: could not register {names[h.name]}")
            everyone = {n: h for h, ns in names.items() for n in ns}
            r = h1.run([sys.executable, "-m", "fable.cli", "ls", "--cluster", "--json"])
            listed = (
                {e["name"]: e["host"] for e in json.loads(r.stdout)} if r.returncode == 0 else {}
            )
            print("\nfable ls --cluster, run inside h1:")
            for n, host in sorted(listed.items()):
                print(f"  {n:<12} on {host}")
            table.check("all three hosts' names listed on h1", listed == everyone)
            _between_hosts(table, h1, h2, holders)

            # a host dies: its daemon and processes are killed
            h3.crash()
            h3.stop_daemon()
            gone = _until(
                lambda: (got := _listed(h1)) is not None and not set(names["h3"]) & set(got),
                SESSION_S + 5,
            )
            table.timed("h3 dies: its names leave the cluster", SESSION_S + 1, gone)

            # ZooKeeper down
            zk.stop()
            t0 = time.monotonic()
            r = h1.run([sys.executable, "-c", ECHO, "late/h1"], timeout=30)
            table.timed(
                "ZooKeeper down: register, connect, echo on h1",
                10,
                time.monotonic() - t0,
                ok=r.returncode == 0 and "echoed" in r.stdout,
            )
            late = h1.popen(
                [sys.executable, "-c", HOLD, "late/h1"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(late)
            late_ok = late.stdout.readline().strip() == "registered"
            t0 = time.monotonic()
            r = h1.run(
                [sys.executable, "-m", "fable.cli", "ls", "--cluster", "--timeout", "2"],
                timeout=30,
            )
            table.timed(
                "ZooKeeper down: a cluster listing raises DaemonUnavailable",
                LISTING_TIMEOUT_S + 1,
                time.monotonic() - t0,
                ok=r.returncode == 1 and "DaemonUnavailable" in r.stderr,
            )
            alive = {n: h for n, h in everyone.items() if h != "h3"} | {"late/h1": "h1"}

            def all_back() -> bool:
                return _listed(h1) == alive and _listed(h2) == alive

            zk.start()
            table.check("ZooKeeper down: a name registers on h1", late_ok)
            table.timed("ZooKeeper back: every name listed again", BACK_S, _until(all_back, 30))
            zk.stop()
            zk.start(empty=True)
            table.timed(
                "ZooKeeper back with an empty data dir: every name again",
                BACK_S,
                _until(all_back, 30),
            )

            # a daemon started while ZooKeeper is down
            zk.stop()
            t0 = time.monotonic()
            h3.start_daemon("--cluster", url, env=env)
            table.timed("ZooKeeper down: h3's daemon starts", 6.0, time.monotonic() - t0)
            p = h3.popen(
                [sys.executable, "-c", HOLD, *names["h3"]],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(p)
            table.check(
                "  and serves locally (its names register)",
                p.stdout.readline().strip() == "registered",
            )
            zk.start()
            everyone_now = alive | {n: "h3" for n in names["h3"]}
            joined = _until(lambda: _listed(h1) == everyone_now, 30)
            table.timed("ZooKeeper back: h3 joins, its names listed on h1", BACK_S, joined)
        finally:
            finish(holders)
    left = [ns for ns in namespaces() if ns.startswith(prefix)]
    table.check("everything removed (no namespace of this run left)", not left)
    table.print()
    return 0 if all(r[3] for r in table.rows) else 1
