"""The cluster tier (``fable daemon --cluster``, fable/daemon/cluster.py) on test hosts with a
real ZooKeeper: names listed across hosts and unique among them, bad znodes, races, stale
znodes of a killed daemon, ZooKeeper down and back. One ZooKeeper serves the whole module
(each test uses a root znode of its own); needs root, like test_cluster.py: fails without it.
The bounds of the failures are measured by ``python -m fable.testing.cluster demo`` (the slow
test at the end runs it)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fable.client import one_shot
from fable.daemon.cluster import MAX_DATA, check_endpoint, check_host, parse_url
from fable.errors import FableError
from fable.testing.cluster import Cluster, Host, finish, namespaces
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)

_roots = itertools.count(1)

HOLD = """
import sys, fable
from fable.errors import NameInUse
got = []
for n in sys.argv[1:]:
    try:
        c = fable.register(n)
        c.listen()
        got.append(c)
        print("registered", n, flush=True)
    except NameInUse as e:
        print("NameInUse", n, e, flush=True)
print("done", flush=True)
sys.stdin.read()
"""

RACE = """
import sys, fable
from fable.errors import NameInUse
sys.stdin.readline()  # go
try:
    c = fable.register(sys.argv[1])
    print("won", flush=True)
except NameInUse:
    print("NameInUse", flush=True)
sys.stdin.read()
"""

CONNECT = """
import sys, fable
from fable.errors import NameNotFound
try:
    fable.register("caller").connect("xio://" + sys.argv[1], timeout=5)
    print("connected")
except NameNotFound as e:
    print("NameNotFound:", e)
"""

# the hostile side: a ZooKeeper client of its own that writes what it is given, says
# "ready" and keeps its session (its ephemeral znodes) until its stdin closes
ZK_WRITER = """
import json, sys
from kazoo.client import KazooClient
zk = KazooClient(hosts=sys.argv[1], timeout=5)
zk.start(timeout=10)
for path, data, ephemeral in json.loads(sys.argv[2]):
    if isinstance(data, int):
        data = b"x" * data
    elif isinstance(data, str):
        data = data.encode("latin-1")
    else:
        data = json.dumps(data).encode()
    zk.create(path, data, ephemeral=ephemeral, makepath=True)
print("ready", flush=True)
sys.stdin.read()
zk.stop()
"""

# the hostile side again: deletes or overwrites znodes, then exits 0 (checked by the test)
ZK_VANDAL = """
import json, sys
from kazoo.client import KazooClient
zk = KazooClient(hosts=sys.argv[1], timeout=5)
zk.start(timeout=10)
for op, path, *data in json.loads(sys.argv[2]):
    if op == "delete":
        zk.delete(path)
    else:
        zk.set(path, json.dumps(data[0]).encode())
zk.stop()
print("done")
"""

# a daemon with fds 3..1102 taken first (inherited), as a process with many files open
MANY_FDS = """
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
fd = os.open("/dev/null", os.O_RDONLY)
for _ in range(1100):
    os.set_inheritable(os.dup(fd), True)
os.execv(sys.executable, [sys.executable, "-m", "fable.daemon", *sys.argv[1:]])
"""

ZK_READ = """
import json, sys
from kazoo.client import KazooClient
zk = KazooClient(hosts=sys.argv[1], timeout=5)
zk.start(timeout=10)
out = {}
for path in sys.argv[2:]:
    got = zk.exists(path)
    out[path] = None if got is None else got.ephemeralOwner
print(json.dumps(out))
zk.stop()
"""


@pytest.fixture(scope="module")
def hosts() -> Iterator[Cluster]:
    """Three hosts and one ZooKeeper for the module; no daemons (each test starts its own)."""
    with Cluster(3, daemons=False, zookeeper=True) as c:
        yield c


class Tier:
    """One test's view: its cluster URL (a root of its own) and helpers."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        assert c.zookeeper is not None
        self.zk = c.zookeeper
        self.root = f"/t{next(_roots)}"
        self.url = f"zk://{self.zk.hosts}{self.root}"
        self.procs: list[subprocess.Popen[str]] = []
        # where each host's daemon log stood: close() reads what this test's daemons wrote
        self._logs = {h.name: _size(h.dir / "fabled.out") for h in c.hosts}

    def start(self, h: Host, session: float = 3.0, **env: str) -> None:
        h.start_daemon("--cluster", self.url, env={"FABLE_CLUSTER_SESSION": str(session), **env})

    def listing(self, h: Host, timeout: float = 1.0) -> dict[str, str] | None:
        """name -> host through ``h``'s daemon; None while the cluster does not answer."""
        try:
            reply = one_shot("ls", h.socket, cluster=True, timeout=timeout)
        except FableError:
            return None
        assert reply is not None
        return {e["name"]: e["host"] for e in reply["endpoints"]}

    def hold(self, h: Host, *names: str) -> dict[str, str]:
        """Register ``names`` in a process of ``h`` that keeps them until the test ends;
        name -> "registered" or "NameInUse"."""
        p = h.popen(
            [sys.executable, "-c", HOLD, *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        said = {}
        for line in p.stdout:
            if line.strip() == "done":
                break
            word, name = line.split()[:2]
            said[name] = word
        assert set(said) == set(names), f"the holder said {said}"
        return said

    def hostile(self, h: Host, writes: list[Any]) -> subprocess.Popen[str]:
        """A ZooKeeper client in ``h`` that made ``writes`` (path, data, ephemeral) and holds
        them; the test checks its exit status at the end."""
        p: subprocess.Popen[str] = h.popen(
            [sys.executable, "-c", ZK_WRITER, self.zk.hosts, json.dumps(writes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        assert p.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        return p

    def owners(self, h: Host, *paths: str) -> dict[str, int | None]:
        """Each znode's ephemeral owner (a session id; 0: persistent; None: no znode)."""
        r = h.run([sys.executable, "-c", ZK_READ, self.zk.hosts, *paths], timeout=30)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    def log(self, h: Host) -> str:
        return (h.dir / "fabled.out").read_text(errors="replace")

    def close(self) -> None:
        finish(self.procs)
        for h in self.c.hosts:
            h.stop_daemon()
            h.crash()  # (a daemon a library started when ours died)
        if self.zk.proc is None:
            self.zk.start()
        # the tier's catch-all logs a bug and goes on: here a bug fails the test
        for h in self.c.hosts:
            if not (h.dir / "fabled.out").exists():
                continue  # (no daemon of ours ran there yet)
            with open(h.dir / "fabled.out", "rb") as f:
                f.seek(self._logs[h.name])
                said = f.read().decode(errors="replace")
            for bad in ("Traceback", "sync failed", "internal error"):
                assert bad not in said, f"{h.name}'s daemon log: {said[-3000:]}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.fixture
def tier(hosts: Cluster) -> Iterator[Tier]:
    t = Tier(hosts)
    try:
        yield t
    finally:
        t.close()


def _cli(h: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return h.run([sys.executable, "-m", "fable.cli", *args], timeout=60)


# -------------------------------------------------------------------------------- no hosts
def test_cluster_urls_are_checked() -> None:
    u = parse_url("zk://198.18.0.250:2181,zk2,[fd00::1]:2182/fable/prod")
    assert u.servers == ("198.18.0.250:2181", "zk2:2181", "[fd00::1]:2182")
    assert (
        u.root == "/fable/prod"
        and str(u) == "zk://198.18.0.250:2181,zk2:2181,[fd00::1]:2182/fable/prod"
    )
    for bad in (
        "198.18.0.250:2181/fable",  # no scheme
        "zk://198.18.0.250:2181",  # no root
        "zk://198.18.0.250:2181/",
        "zk:///fable",  # no server
        "zk://a:0/fable",
        "zk://a:99999/fable",
        "zk://a b/fable",
        "zk://a/../x",
        "zk://a/zookeeper",
        "zk://a/fable//x",
    ):
        with pytest.raises(FableError, match="cluster"):
            parse_url(bad)


def _ep(**kw: Any) -> bytes:
    obj = {"v": 1, "name": "svc/a", "host": "h1", "uid": 5, "listening": True, "remote": False}
    return json.dumps({**obj, **kw}).encode()


def test_znode_data_is_checked() -> None:
    assert check_endpoint("svc+a", _ep()) == {
        "name": "svc/a",
        "host": "h1",
        "uid": 5,
        "listening": True,
        "remote": False,
    }
    bad = [
        ("svc+a", None),
        ("svc+a", b"\xff\xfe"),
        ("svc+a", b"[1]"),
        ("svc+a", _ep(v=2)),
        ("svc+b", _ep()),  # not its path's name
        ("svc+a", _ep(name="svc+a")),
        ("..", _ep(name="..")),
        ("svc+a", _ep(host="../h1")),
        ("svc+a", _ep(uid=-1)),
        ("svc+a", _ep(uid=True)),
        ("svc+a", _ep(listening="yes")),
        ("svc+a", _ep(pad="x" * MAX_DATA)),  # too big, JSON or not
    ]
    for child, data in bad:
        with pytest.raises(ValueError):
            check_endpoint(child, data)
    good = {"v": 1, "host": "h1", "addresses": [], "networks": [], "pid": 1, "boot": "b"}
    assert check_host("h1", json.dumps(good).encode())["host"] == "h1"
    for child, obj in [
        ("h2", good),
        ("h1", {**good, "pid": "1"}),
        ("h1", {**good, "addresses": "198.18.0.1"}),
        ("h1", {**good, "start": 1.5}),
    ]:
        with pytest.raises(ValueError):
            check_host(child, json.dumps(obj).encode())


# ------------------------------------------------------------------------------ on hosts
def test_names_are_listed_across_hosts_and_unique_among_them(tier: Tier) -> None:
    h1, h2, h3 = tier.c.hosts
    for h in (h1, h2, h3):
        tier.start(h)
    for h in (h1, h2, h3):
        assert tier.hold(h, f"svc/{h.name}") == {f"svc/{h.name}": "registered"}
    everyone = {"svc/h1": "h1", "svc/h2": "h2", "svc/h3": "h3"}
    wait_for(lambda: tier.listing(h3) == everyone)
    r = _cli(h1, "ls", "--cluster", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [(e["name"], e["host"], e["listening"], e["remote"]) for e in listed] == [
        ("svc/h1", "h1", True, False),
        ("svc/h2", "h2", True, False),
        ("svc/h3", "h3", True, False),
    ]
    table = _cli(h2, "ls", "--cluster")
    assert table.returncode == 0 and "svc/h3" in table.stdout and "h3" in table.stdout
    # a name another host holds: NameInUse, and it is not registered here either
    assert tier.hold(h2, "svc/h1", "svc/other") == {
        "svc/h1": "NameInUse",
        "svc/other": "registered",
    }
    r = _cli(h2, "ls", "--json")
    assert "svc/h1" not in [e["name"] for e in json.loads(r.stdout)]
    # a connect to it from h2 says where it is, and why it cannot go there: these daemons
    # run without --listen (connections between hosts: test_across_hosts.py)
    r = h2.run([sys.executable, "-c", CONNECT, "svc/h1"], timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == (
        "NameNotFound: 'svc/h1' is registered on host h1, whose daemon takes no "
        "connections from other hosts (it runs without --listen)"
    ), r.stderr
    r = h2.run([sys.executable, "-c", CONNECT, "svc/nowhere"], timeout=60)
    assert r.stdout.strip() == "NameNotFound: no endpoint is registered as 'svc/nowhere'"
    # the doctor says how the daemon stands in the cluster
    wait_for(
        lambda: (one_shot("cluster", h1.socket) or {})["cluster"]["hosts"] == ["h1", "h2", "h3"]
    )
    r = _cli(h1, "doctor", "--json")
    st = json.loads(r.stdout)["cluster"]
    assert (st["url"], st["host"], st["state"], st["joined"]) == (tier.url, "h1", "connected", True)
    assert st["hosts"] == ["h1", "h2", "h3"] and st["published"] == 1 and not st["conflicts"]
    assert "joined" in _cli(h1, "doctor").stdout
    # a name given up is free for another host
    holder = tier.procs[0]  # h1's: it ends
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(10) == 0
    wait_for(lambda: "svc/h1" not in (tier.listing(h3) or {"svc/h1": ""}))
    assert tier.hold(h3, "svc/h1") == {"svc/h1": "registered"}
    wait_for(lambda: (tier.listing(h1) or {}).get("svc/h1") == "h3")
    # a daemon that stops ends its session: its names leave at once, not a session timeout later
    h2.stop_daemon()
    wait_for(lambda: "svc/h2" not in (tier.listing(h1) or {"svc/h2": ""}), timeout=2.5)


def test_one_name_registered_on_two_hosts_at_once_has_one_winner(tier: Tier) -> None:
    h1, h2, _ = tier.c.hosts
    tier.start(h1)
    tier.start(h2)
    for rnd in range(5):
        name = f"race/{rnd}"
        ps = []
        for h in (h1, h2):
            p = h.popen(
                [sys.executable, "-c", RACE, name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            tier.procs.append(p)
            ps.append(p)
        time.sleep(0.5)  # both up and waiting for "go"
        for p in ps:
            p.stdin.write("go\n")
            p.stdin.flush()
        said = [p.stdout.readline().strip() for p in ps]
        assert sorted(said) == ["NameInUse", "won"], said
        winner = ("h1", "h2")[said.index("won")]

        def listed(n: str = name, w: str = winner) -> bool:  # (on both: watches are async)
            return all((tier.listing(h) or {}).get(n) == w for h in (h1, h2))

        wait_for(listed)


def test_two_daemons_claiming_one_host_id_the_second_refuses(tier: Tier) -> None:
    h1, h2, _ = tier.c.hosts
    tier.start(h1)
    first = one_shot("hello", h1.socket)
    assert first is not None and first["cluster"] == tier.url
    sock = h2.dir / "run" / "second.sock"
    t0 = time.monotonic()
    r = h2.run(
        [sys.executable, "-m", "fable.daemon", "--socket", str(sock), "--cluster", tier.url],
        env={"FABLE_HOST_ID": "h1", "FABLE_CLUSTER_SESSION": "3"},
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert f"host id 'h1' is held in the cluster by fabled pid {first['daemon']}" in r.stderr
    assert time.monotonic() - t0 < 10
    assert not sock.exists()
    # the first goes on as before
    assert tier.hold(h1, "svc/one") == {"svc/one": "registered"}
    wait_for(lambda: tier.listing(h1) == {"svc/one": "h1"})


def test_a_host_id_held_by_another_boot_is_waited_for_then_refused_or_taken(tier: Tier) -> None:
    """A znode for our host id from a daemon on another boot (another machine): a daemon waits
    up to its session timeout + 1 s for it to go; it stays: refused; it goes: joined."""
    _, h2, h3 = tier.c.hosts
    other = {"v": 1, "host": "h2", "addresses": [], "networks": [], "pid": 1, "boot": "elsewhere"}
    squat = tier.hostile(h3, [(f"{tier.root}/hosts/h2", other, True)])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="held in the cluster by a daemon of another boot"):
        tier.start(h2, session=2.0)
    assert 3.0 <= time.monotonic() - t0 < 10
    # the squatter goes while a daemon waits for it: that daemon joins
    starter = h2.popen(
        [sys.executable, "-m", "fable.daemon", "--socket", str(h2.socket), "--cluster", tier.url],
        env={"FABLE_CLUSTER_SESSION": "4"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        squat.stdin.close()  # type: ignore[union-attr]
        assert squat.wait(10) == 0  # (the attack did what it meant to)
        wait_for(lambda: (one_shot("hello", h2.socket) or {}).get("host") == "h2", timeout=10)
        assert tier.hold(h2, "svc/h2") == {"svc/h2": "registered"}
        wait_for(lambda: tier.listing(h2) == {"svc/h2": "h2"})
    finally:
        starter.terminate()
        starter.wait(10)
        if starter.stderr:
            starter.stderr.close()


def test_bad_znodes_are_ignored_and_logged(tier: Tier) -> None:
    h1, _, h3 = tier.c.hosts
    names, hosts_ = f"{tier.root}/names", f"{tier.root}/hosts"
    good = {"v": 1, "name": "x", "host": "h9", "uid": 0, "listening": True, "remote": False}
    attack = tier.hostile(
        h3,
        [
            (f"{names}/garbage", "\xff\xfe not json", True),
            (f"{names}/big", 1 << 20, True),  # 1 MiB
            (f"{names}/other", {**good, "name": "not-other"}, True),
            (f"{names}/badhost", {**good, "name": "badhost", "host": "../h9"}, True),
            (f"{names}/squat", {**good, "name": "squat"}, False),  # persistent: no daemon's
            (f"{names}/fine", {**good, "name": "fine"}, True),
            (f"{hosts_}/h9", "garbage", True),
        ],
    )
    tier.start(h1)
    assert tier.hold(h1, "svc/h1") == {"svc/h1": "registered"}
    wait_for(lambda: tier.listing(h1) == {"fine": "h9", "svc/h1": "h1"})
    log = tier.log(h1)
    for child, why in [
        ("names/garbage", "its data is not JSON"),
        ("names/big", f"{1 << 20} bytes of data, more than {MAX_DATA}"),
        ("names/other", "its name is not its znode's"),
        ("names/badhost", "its host is not a host id"),
        ("names/squat", "persistent"),
        ("hosts/h9", "its data is not JSON"),
    ]:
        assert f"ignoring znode {tier.root}/{child}: {why}" in log, (child, log[-3000:])
    assert log.count(f"ignoring znode {tier.root}/names/big") == 1  # (once, not per read)
    # a live session's znode with garbage holds the name; a persistent one holds nothing
    assert tier.hold(h1, "garbage", "squat") == {"garbage": "NameInUse", "squat": "registered"}
    wait_for(lambda: (tier.listing(h1) or {}).get("squat") == "h1")
    st = one_shot("cluster", h1.socket)
    assert st is not None and st["cluster"]["hosts"] == ["h1"]
    attack.stdin.close()  # type: ignore[union-attr]
    assert attack.wait(10) == 0
    wait_for(lambda: tier.listing(h1) == {"svc/h1": "h1", "squat": "h1"})


def test_a_killed_daemons_znodes_are_replaced_by_the_next(tier: Tier) -> None:
    """Killed with its processes, a daemon leaves its host znode and its names' znodes until
    its session times out; the daemon started after it takes them over at once."""
    h1, h2, _ = tier.c.hosts
    tier.start(h1, session=10.0)
    tier.start(h2)
    assert tier.hold(h1, "svc/stale") == {"svc/stale": "registered"}
    wait_for(lambda: tier.listing(h2) == {"svc/stale": "h1"})
    h1.crash()  # the daemon and its processes: no goodbye to ZooKeeper
    h1.stop_daemon()
    paths = [f"{tier.root}/hosts/h1", f"{tier.root}/names/svc+stale"]
    old = tier.owners(h2, *paths)
    assert all(old.values()), old  # still there: the old session has not timed out
    t0 = time.monotonic()
    tier.start(h1, session=10.0)
    assert tier.hold(h1, "svc/stale") == {"svc/stale": "registered"}
    assert time.monotonic() - t0 < 8  # well within the old session's 10 s
    now = tier.owners(h2, *paths)
    st = one_shot("cluster", h1.socket)
    assert st is not None
    mine = int(st["cluster"]["session"], 16)
    assert now == {p: mine for p in paths} and mine not in old.values()
    wait_for(lambda: tier.listing(h2) == {"svc/stale": "h1"})
    assert "replacing" in tier.log(h1)


def test_zookeeper_down_local_work_goes_on_and_everything_comes_back(tier: Tier) -> None:
    h1, h2, _ = tier.c.hosts
    tier.start(h1)
    tier.start(h2)
    assert tier.hold(h1, "svc/h1") == {"svc/h1": "registered"}
    wait_for(lambda: tier.listing(h2) == {"svc/h1": "h1"})
    tier.zk.stop()
    # local work goes on: a register (published later)
    assert tier.hold(h1, "late/h1") == {"late/h1": "registered"}
    # a cluster listing says the cluster does not answer, within its timeout
    t0 = time.monotonic()
    r = _cli(h1, "ls", "--cluster", "--timeout", "1")
    assert r.returncode == 1 and "DaemonUnavailable" in r.stderr, (r.stdout, r.stderr)
    assert time.monotonic() - t0 < 1 + 5  # (+ the command's start)
    st = json.loads(_cli(h1, "doctor", "--json").stdout)["cluster"]
    assert st["state"] != "connected" and st["pending"] == ["late/h1"]
    both = {"svc/h1": "h1", "late/h1": "h1"}
    tier.zk.start()
    wait_for(lambda: tier.listing(h2) == both, timeout=10)
    tier.zk.stop()
    tier.zk.start(empty=True)
    wait_for(lambda: tier.listing(h2) == both and tier.listing(h1) == both, timeout=10)


def test_a_daemon_started_while_zookeeper_is_down_serves_and_joins_later(tier: Tier) -> None:
    h1, _, h3 = tier.c.hosts
    tier.start(h1)
    tier.zk.stop()
    t0 = time.monotonic()
    tier.start(h3)
    assert time.monotonic() - t0 < 8
    assert tier.hold(h3, "svc/h3") == {"svc/h3": "registered"}
    tier.zk.start()
    wait_for(lambda: tier.listing(h1) == {"svc/h3": "h3"}, timeout=10)


def test_a_name_taken_elsewhere_while_cut_off_is_a_conflict_until_freed(tier: Tier) -> None:
    """h1 loses its link; h2 takes a name; h1 registers it locally meanwhile. With the link
    back, h1's name stays local (a conflict, in `fable doctor`) until h2 frees it; then h1
    publishes it."""
    h1, h2, _ = tier.c.hosts
    tier.start(h1, session=10.0)  # (longer than the cut: h1 keeps its session)
    tier.start(h2)

    def link(state: str) -> None:
        subprocess.run(["ip", "-n", h1.netns, "link", "set", "eth0", state], check=True)

    link("down")
    try:
        wait_for(lambda: tier.listing(h1, timeout=0.2) is None, timeout=10)
        assert tier.hold(h2, "svc/x") == {"svc/x": "registered"}
        assert tier.hold(h1, "svc/x") == {"svc/x": "registered"}  # (locally: not published)
    finally:
        link("up")

    def state() -> dict[str, Any]:
        reply = one_shot("cluster", h1.socket)
        assert reply is not None
        return dict(reply["cluster"])

    wait_for(lambda: state()["conflicts"] == {"svc/x": "h2"}, timeout=10)
    assert state()["state"] == "connected" and tier.listing(h1) == {"svc/x": "h2"}
    assert "conflict: svc/x is held by host h2" in _cli(h1, "doctor").stdout
    assert "svc/x is held by host h2: it stays local to this host" in tier.log(h1)
    h2_holder = tier.procs[0]
    assert h2_holder.stdin is not None
    h2_holder.stdin.close()
    assert h2_holder.wait(10) == 0
    wait_for(lambda: tier.listing(h2) == {"svc/x": "h1"}, timeout=10)
    assert state()["conflicts"] == {}


def test_a_daemon_the_library_starts_joins_the_cluster_of_its_setting(tier: Tier) -> None:
    h1, h2, _ = tier.c.hosts
    tier.start(h1)
    env = {"FABLE_CLUSTER": tier.url, "FABLE_CLUSTER_SESSION": "3"}
    p = h2.popen(  # no daemon on h2: the library starts one, with h2's settings
        [sys.executable, "-c", HOLD, "svc/auto"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    tier.procs.append(p)
    assert p.stdout.readline().split()[:2] == ["registered", "svc/auto"]
    wait_for(lambda: tier.listing(h1) == {"svc/auto": "h2"}, timeout=10)
    hello = one_shot("hello", h2.socket)
    assert hello is not None and (hello["host"], hello["cluster"]) == ("h2", tier.url)


def test_a_daemons_znodes_deleted_or_overwritten_by_another_client_come_back(tier: Tier) -> None:
    """Anyone who reaches ZooKeeper can write the tree (no ACLs): a daemon whose host or name
    znodes another client deletes or overwrites puts them back, and lists them again."""
    h1, h2, h3 = tier.c.hosts
    tier.start(h1)
    tier.start(h2)
    assert tier.hold(h1, "svc/a", "svc/b") == {"svc/a": "registered", "svc/b": "registered"}
    wait_for(lambda: tier.listing(h2) == {"svc/a": "h1", "svc/b": "h1"})
    root = tier.root
    lie = {"v": 1, "name": "svc/b", "host": "h2", "uid": 0, "listening": False, "remote": False}
    r = h3.run(
        [
            sys.executable,
            "-c",
            ZK_VANDAL,
            tier.zk.hosts,
            json.dumps(
                [
                    ["delete", f"{root}/names/svc+a"],
                    ["set", f"{root}/names/svc+b", lie],
                    ["delete", f"{root}/hosts/h1"],
                ]
            ),
        ],
        timeout=60,
    )
    assert (r.returncode, r.stdout.strip()) == (0, "done"), r.stderr  # the attack ran whole
    paths = [f"{root}/hosts/h1", f"{root}/names/svc+a", f"{root}/names/svc+b"]

    def restored() -> bool:
        st = one_shot("cluster", h1.socket)
        assert st is not None
        mine = int(st["cluster"]["session"], 16)
        return tier.owners(h3, *paths) == {p: mine for p in paths} and tier.listing(h2) == {
            "svc/a": "h1",
            "svc/b": "h1",
        }

    wait_for(restored, timeout=10)
    st = one_shot("cluster", h2.socket)
    assert st is not None and st["cluster"]["hosts"] == ["h1", "h2"]


def test_a_daemon_with_fds_above_1024_joins(tier: Tier) -> None:
    """A daemon started with fds 3..1102 open (inherited) joins: nothing on its way to
    ZooKeeper may use select(), which fails on an fd above 1024 (kazoo waits with selectors
    and makes its wake-up pair with socketpair; this keeps it so)."""
    h1, h2, _ = tier.c.hosts
    tier.start(h2)
    p = h1.popen(
        [sys.executable, "-c", MANY_FDS, "--socket", str(h1.socket), "--cluster", tier.url],
        env={"FABLE_CLUSTER_SESSION": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tier.procs.append(p)
    wait_for(lambda: p.poll() is not None or one_shot("hello", h1.socket) is not None, 15)
    assert p.poll() is None, p.stdout.read() if p.stdout else ""
    assert tier.hold(h1, "svc/many") == {"svc/many": "registered"}
    wait_for(lambda: tier.listing(h2) == {"svc/many": "h1"})


def test_a_daemon_without_cluster_is_in_none(tier: Tier) -> None:
    h1 = tier.c.hosts[0]
    h1.start_daemon()
    hello = one_shot("hello", h1.socket)
    assert hello is not None and hello["cluster"] is None
    r = _cli(h1, "ls", "--cluster")
    assert r.returncode == 1 and "in no cluster" in r.stderr
    assert "the daemon is in no cluster" in _cli(h1, "doctor").stdout
    # and a bad cluster URL stops a daemon with the reason
    r = h1.run(
        [
            sys.executable,
            "-m",
            "fable.daemon",
            "--socket",
            str(h1.dir / "x.sock"),
            "--cluster",
            "zk://nowhere",
        ],
        timeout=60,
    )
    assert r.returncode == 1 and "the root is /NAME" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_demo_holds_every_bound_and_leaves_nothing() -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "fable.testing.cluster", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = p.communicate(timeout=280)
    assert p.returncode == 0, out
    assert "FAIL" not in out and "h3 dies: its names leave the cluster" in out
    assert "ZooKeeper back with an empty data dir" in out
    assert not [ns for ns in namespaces() if ns.startswith(f"fable-{p.pid}-")]
