"""Test hosts (``fable.testing.cluster``): network namespaces on a bridge, each with its own
daemon and host id; what one run leaves, the next sweeps. Needs root (CI runs as root): without
it these fail, never skip."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from fable.client import one_shot
from fable.testing import cluster
from fable.testing.cluster import Cluster

pytestmark = pytest.mark.timeout(120)

ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
c, peer = s.accept()
c.sendall(c.recv(100) + b" from " + peer[0].encode())
"""

ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"ping")
print(c.recv(100).decode())
"""

REGISTER = """
import json, os, sys, fable
from fable.client import link
ctx = fable.register("svc/" + os.environ["FABLE_HOST_ID"])
ctx.listen()
print(json.dumps(link().hello), flush=True)
sys.stdin.read()  # registered until the test closes our stdin
"""


def test_each_host_has_its_daemon_its_id_and_a_route_to_the_others() -> None:
    with Cluster(2) as c:
        h1, h2 = c.hosts
        assert [h.address for h in c.hosts] == ["198.18.0.1", "198.18.0.2"]
        # each daemon says the host id it was given (not this machine's id)
        for h in c.hosts:
            reply = one_shot("hello", h.socket)
            assert reply is not None and reply["host"] == h.name
        # a process started in a host registers with that host's daemon, and only there
        with h1.popen(
            [sys.executable, "-c", REGISTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as svc:
            assert json.loads(svc.stdout.readline())["host"] == "h1"
            listed = {}
            for h in c.hosts:
                r = h.run([sys.executable, "-m", "fable.cli", "ls", "--json"])
                assert r.returncode == 0, r.stderr
                listed[h.name] = [(e["name"], e["host"]) for e in json.loads(r.stdout)]
            svc.stdin.close()
            assert svc.wait(10) == 0
        assert listed == {"h1": [("svc/h1", "h1")], "h2": []}
        # TCP from h1 to h2 goes over the bridge, from h1's address
        with h2.popen(
            [sys.executable, "-c", ECHO_SERVER, h2.address], stdout=subprocess.PIPE, text=True
        ) as server:
            port = server.stdout.readline().strip()
            r = h1.run([sys.executable, "-c", ECHO_CLIENT, h2.address, port])
            assert (r.returncode, r.stdout.strip()) == (0, "ping from 198.18.0.1"), r.stderr
            assert server.wait(10) == 0
        # and nothing leaves the test network: a host's only route is the bridge's subnet
        for h in c.hosts:
            routes = subprocess.run(
                ["ip", "-n", h.netns, "route"], capture_output=True, text=True, check=True
            ).stdout
            assert routes.split()[:3] == ["198.18.0.0/24", "dev", "eth0"], routes
            assert len(routes.strip().splitlines()) == 1, routes


def test_close_removes_the_namespaces_the_daemons_and_the_directory() -> None:
    c = Cluster(2)
    daemons = [h.daemon for h in c.hosts]
    made = [h.netns for h in c.hosts] + [c.switch]
    assert set(made) <= set(cluster.namespaces())
    sleeper = c.hosts[0].popen(["sleep", "60"])  # something still running in a host
    c.close()
    assert sleeper.wait(10) == -9
    assert all(p is not None and p.poll() is not None for p in daemons)
    assert not set(made) & set(cluster.namespaces())
    assert not c.dir.exists()


def test_sweep_removes_what_a_dead_run_left_and_nothing_else() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"fable-{dead.pid}-h1"
    live = f"fable-{os.getpid()}-h9"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    subprocess.run(["ip", "netns", "add", live], check=True)
    try:
        sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
        r = subprocess.run(
            [sys.executable, "-m", "fable.testing.cluster", "sweep"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert f"removed {stale}" in r.stdout and live not in r.stdout
        assert sleeper.wait(10) == -9
        left = cluster.namespaces()
        assert stale not in left and live in left
    finally:
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


KAZOO = """
import sys
from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError
zk = KazooClient(hosts=sys.argv[1], timeout=2)
try:
    zk.start(timeout=3)
except KazooTimeoutError:
    sys.exit(3)
if sys.argv[2] == "put":
    zk.create(sys.argv[3], sys.argv[4].encode(), makepath=True)
else:
    print(zk.get(sys.argv[3])[0].decode() if zk.exists(sys.argv[3]) else "(none)")
zk.stop()
"""


def test_the_zookeeper_serves_every_host_and_stops_and_starts_on_demand() -> None:
    """A real ZooKeeper on the bridge: what h1 writes, h2 reads; stopped, a client's connect
    times out; started again it has its data, started empty it has none."""
    with Cluster(2, daemons=False, zookeeper=True) as c:
        zk = c.zookeeper
        assert zk is not None and zk.hosts == "198.18.0.250:2181"
        h1, h2 = c.hosts

        def kazoo(h: cluster.Host, *args: str) -> tuple[int, str]:
            r = h.run([sys.executable, "-c", KAZOO, zk.hosts, *args])
            assert r.returncode in (0, 3), r.stderr
            return r.returncode, r.stdout.strip()

        assert kazoo(h1, "put", "/t/x", "from h1") == (0, "")
        assert kazoo(h2, "get", "/t/x") == (0, "from h1")
        zk.stop()
        assert not zk.answers() and kazoo(h2, "get", "/t/x") == (3, "")
        zk.start()
        assert kazoo(h2, "get", "/t/x") == (0, "from h1")
        zk.stop()
        zk.start(empty=True)
        assert kazoo(h2, "get", "/t/x") == (0, "(none)")
        made = zk.netns
    assert made not in cluster.namespaces()


def test_a_bad_host_id_stops_the_daemon_with_the_reason() -> None:
    with Cluster(1, daemons=False) as c:
        h = c.hosts[0]
        h.env["FABLE_HOST_ID"] = "../h1"
        with pytest.raises(RuntimeError, match=re.escape("FABLE_HOST_ID='../h1' must be")):
            h.start_daemon()
