"""``fable bench --hosts``: the points between two hosts, measured the way the local ones are.

Two test hosts, h1 and h2 (network namespaces on one veth bridge, ``fable.testing.cluster``),
each with its daemon in one cluster (``--cluster``, ``--listen``). The peer process on h1
listens as ``bench/h1`` (``allow_remote``) and serves one point per connection; for each point
a fresh measuring process on h2 connects to it by name with the point's transport (``tcp`` or
``tcp-nodelay``: what crosses hosts) and runs the bench's own loops (``harness.measure``
there, ``harness.serve_peer`` on h1), pinned to the point's two CPUs. The records are the local
ones' (DESIGN.md §9) with ``placement: "other-host"`` and ``hosts: ["h2", "h1"]``; they land in
the same tables and report, and ``fable calibrate`` style tables can take them (the policy's
``other-host`` rows). Needs root (namespaces) and ZooKeeper, as the cluster tier's tests do.

    driver (this process)        h1                              h2
    Cluster(2, zookeeper)        python -m fable.bench.hosts     python -m fable.bench.hosts
                                 peer: listen, "ready";          measure POINT OPTS (a fresh
                                 accept; {size, full, cpu};      one per point): connect,
                                 serve_peer(conn) to "end";      {size, full, cpu}, measure,
                                 one JSON line per point         "end"; the result on stdout
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from fable.bench.harness import merge_rounds
from fable.bench.links import Point
from fable.topology import OTHER_HOST

__all__ = ["HOSTS", "PLACEMENT", "run_host_points"]

PLACEMENT = OTHER_HOST
HOSTS = ["h2", "h1"]  # the measuring side's host, then its peer's
PEER = "bench/h1"

Record = dict[str, Any]


def run_host_points(
    todo: Sequence[Point],
    progress: Callable[[Point | None], None],
    *,
    rounds: int = 1,
    repeats: int = 3,
    target_s: float = 0.1,
    verify: str = "seq",
    timeout_s: float = 60.0,
) -> list[Record]:
    """Measure ``todo`` between h2 and h1 (``rounds`` times, interleaved; each point's median
    kept). Never raises for a failing point: its record has ``verified: false`` and ``error``.
    RuntimeError if the test hosts cannot be made (not root, no ZooKeeper)."""
    from fable.testing.cluster import Cluster

    opts = {"repeats": repeats, "target_s": target_s, "verify": verify, "max_iters": 2_000_000}
    records: list[Record] = []
    with Cluster(2, zookeeper=True, daemons=False) as c:
        assert c.zookeeper is not None
        for h in c.hosts:
            h.start_daemon(
                "--cluster", f"zk://{c.zookeeper.hosts}/bench", "--listen", f"{h.address}:0"
            )
        h1, h2 = c.hosts
        peer = h1.popen(
            [sys.executable, "-m", "fable.bench.hosts", "peer"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if peer.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the bench's peer on h1 did not start: {peer.stderr.read()}")
            _until_listed(h2)
            for _ in range(rounds):
                for p in todo:
                    progress(p)
                    records.append(_point(h2, peer, p, opts, timeout_s))
        finally:
            peer.kill()
            peer.wait()
            for f in (peer.stdout, peer.stderr):
                if f is not None:
                    f.close()
    progress(None)
    return merge_rounds(records) if rounds > 1 else records


def _until_listed(h2: Any) -> None:
    """Until h2's daemon knows where ``bench/h1`` is (the cluster's cache)."""
    from fable.client import one_shot
    from fable.errors import FableError

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            reply = one_shot("ls", h2.socket, cluster=True, timeout=1.0)
        except FableError:
            reply = None
        if reply and any(e["name"] == PEER and e["listening"] for e in reply["endpoints"]):
            return
        time.sleep(0.05)
    raise RuntimeError("h2's daemon never saw the bench's peer on h1")


def _point(h2: Any, peer: Any, p: Point, opts: dict[str, Any], timeout_s: float) -> Record:
    record: Record = {
        "transport": p.transport,
        "safe": p.safe,
        "mode": p.mode,
        "size": p.size,
        "api": p.api,
        "cpus": list(p.cpus),
        "placement": PLACEMENT,
        "hosts": HOSTS,
        "repeats": opts["repeats"],
        "verify": opts["verify"],
    }
    try:
        r = h2.run(
            [
                sys.executable,
                "-m",
                "fable.bench.hosts",
                "measure",
                json.dumps(asdict(p)),
                json.dumps(opts),
            ],
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        record.update(verified=False, error=f"timed out after {timeout_s:g} s")
        return record
    lines = r.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {"verified": False, "error": f"the measuring process failed: {r.stderr[-500:]}"}
    if result.pop("connected", False):  # the peer served it: its word on this point
        said = json.loads(peer.stdout.readline() or "{}")
        if result.get("verified") and not said.get("ok"):
            result = {"verified": False, "error": f"peer: {said.get('error', 'no answer')}"}
    record.update(result)
    return record


# ------------------------------------------------------------------- the two processes
def _measure_main(point_json: str, opts_json: str) -> int:
    """h2: one point against ``bench/h1``; its result (JSON) on stdout."""
    import fable
    from fable.bench.harness import measure

    p = Point(**{**json.loads(point_json), "cpus": tuple(json.loads(point_json)["cpus"])})
    opts = json.loads(opts_json)
    connected = False
    try:
        os.sched_setaffinity(0, {p.cpus[0]})
        ctx = fable.register(f"bench/h2-{os.getpid()}")
        conn = ctx.connect(PEER, transport=p.transport, timeout=10)
        connected = True
        full = opts["verify"] == "full"
        conn.send(json.dumps({"size": p.size, "full": full, "cpu": p.cpus[1]}).encode())
        result = measure(conn, p, opts)  # type: ignore[arg-type]
        conn.send(json.dumps({"op": "end"}).encode())
        conn.close()
        result["verified"] = True
    except BaseException as e:  # the record says why; the driver goes on
        error = {"verified": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps({**error, "connected": connected}), flush=True)
        return 1
    print(json.dumps({**result, "connected": True}), flush=True)
    return 0


def _peer_main() -> int:
    """h1: serve points, one per connection, until killed; a JSON line per point."""
    import fable
    from fable.bench.harness import serve_peer

    lst = fable.register(PEER).listen(allow_remote=True)
    print("ready", flush=True)
    while True:
        conn = lst.accept()
        try:
            cfg = json.loads(conn.recv(timeout=30))
            os.sched_setaffinity(0, {int(cfg["cpu"])})
            serve_peer(conn, int(cfg["size"]), bool(cfg["full"]))
            said: dict[str, Any] = {"ok": True}
        except Exception as e:
            said = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        conn.close()
        print(json.dumps(said), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        sys.exit(_peer_main())
    if sys.argv[1:2] == ["measure"] and len(sys.argv) == 4:
        sys.exit(_measure_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m fable.bench.hosts peer | measure POINT OPTS", file=sys.stderr)
    sys.exit(2)
