"""Connections between hosts (``connect`` to a name on another host of the cluster): the daemon
link (fable/daemon/link.py), the TCP setup channel and its tokens (fable/transports/across.py),
tcp / tcp-nodelay between hosts and the switch between them, who may connect, and the failures:
a link that goes down, a host that dies, an address that does not answer, wrong and replayed
tokens, an impostor on the port. Test hosts in network namespaces with a real ZooKeeper (root
needed: fails without it). The demo (``python -m fable.testing.cluster demo``, the slow test
of test_cluster_tier.py) measures the stream and the bytes on the link."""

from __future__ import annotations

import itertools
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fable._wire import FrameReader, recv_frame
from fable.client import one_shot
from fable.errors import ConnectionClosed, ProtocolError, Timeout
from fable.testing.cluster import Cluster, Host, finish
from fable.transports.across import Across, join, new_token
from fable.transports.channel import SETUP

pytestmark = pytest.mark.timeout(120)

_roots = itertools.count(1)
PEER_TIMEOUT = "2"  # FABLE_PEER_TIMEOUT of every process here

# h1's side: listens (argv[1] = name, argv[2] = JSON of listen's keywords), echoes each
# connection; prints "listening", then one JSON line per connection as it ends
SERVE = """
import json, sys, threading, time, fable
lst = fable.register(sys.argv[1]).listen(**json.loads(sys.argv[2]))
print("listening", flush=True)
def serve(conn):
    n, err = 0, ""
    try:
        while True:
            conn.send(conn.recv(timeout=60))
            n += 1
    except fable.FableError as e:
        err = type(e).__name__
    print(json.dumps({"echoed": n, "end": err, "at": time.monotonic()}), flush=True)
try:
    while True:
        c = lst.accept(timeout=float(sys.argv[3]) if len(sys.argv) > 3 else 60)
        print(json.dumps({"accepted": c.transport}), flush=True)
        threading.Thread(target=serve, args=(c,)).start()
except fable.Timeout:
    print(json.dumps({"accept": "Timeout"}), flush=True)
"""

# h2's side: connect to argv[1] and run the steps of argv[2] (JSON); one JSON line of results
CALL = """
import json, sys, time, fable
from fable.client import one_shot
steps = json.loads(sys.argv[2])
out = {}
try:
    ctx = fable.register("caller")
    t0 = time.monotonic()
    conn = ctx.connect(sys.argv[1], timeout=steps.get("timeout", 5), mode=steps.get("mode"))
    out["transport"] = conn.transport
    seq = 0
    def burst(n):
        global seq
        for _ in range(n):
            m = seq.to_bytes(8, "little") * (1 + seq % 700)
            conn.send(m)
            got = conn.recv(timeout=30)
            assert got == m, f"message {seq} came back wrong"
            seq += 1
    burst(200)
    for t in steps.get("switch", []):
        conn.reconfigure(t)
        burst(300)
        out.setdefault("after", []).append(conn.transport)
    if steps.get("bad_switch"):
        try:
            conn.reconfigure(steps["bad_switch"])
            out["bad_switch"] = "done"
        except ValueError as e:
            out["bad_switch"] = str(e)
        burst(10)
    out["flows"] = one_shot("flows")["flows"]
    if steps.get("then") == "wait-death":
        print(json.dumps({**out, "ready": True}), flush=True)
        sys.stdin.readline()  # the test cuts the link (or kills the host) now
        t0 = time.monotonic()
        try:
            while True:
                burst(1)
        except fable.FableError as e:
            out["died"] = type(e).__name__
            out["after_s"] = time.monotonic() - t0
    out["sent"] = seq
    conn.close()
except fable.FableError as e:
    out["error"] = type(e).__name__
    out["message"] = str(e)
    out["after_s"] = time.monotonic() - t0
print(json.dumps(out), flush=True)
"""

# the hostile side: a daemon of h2 as far as h1's daemon can tell (it speaks the link from h2's
# address), then a process with the token it got: argv[1] = h1's link, argv[2] = the request's
# host field, argv[3] = what it does with the token. One JSON line; exit 0 when it ran through.
HOSTILE = """
import json, socket, sys, time
from fable._wire import FrameReader, recv_frame
from fable.daemon.link import LINK
from fable.transports.channel import SETUP
addr, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((addr, int(port)), timeout=5)
s.sendall(LINK.encode({"op": "remote-connect", "host": sys.argv[2], "name": "mallory",
    "to": "bob", "transport": "tcp-nodelay", "safe": [True, True], "reason": "attack",
    "flow": 99 * 10**10 + int(time.time() * 1000) % 10**9, "token": "ab" * 16, "timeout": 5}))
reply, _ = recv_frame(s, FrameReader(LINK), time.monotonic() + 10)
s.close()
out = {"reply": {k: reply.get(k) for k in ("ok", "error", "message")}}
def knock(token):
    # what the listening side does with a caller holding ``token``: "closed" (unanswered: its
    # connection ended, reset or refused), "silent" (no answer in 5 s) or the op it answered
    try:
        c = socket.create_connection((reply["address"], reply["port"]), timeout=5)
    except (ConnectionRefusedError, ConnectionResetError):  # (its listener closed)
        return "closed"
    try:
        c.sendall(SETUP.encode({"op": "join", "token": token, "port": 1}))
        got, _ = recv_frame(c, FrameReader(SETUP), time.monotonic() + 5)
        return got.get("op")
    except (EOFError, ConnectionResetError, BrokenPipeError):
        return "closed"
    except TimeoutError:
        return "silent"
    finally:
        c.close()
if reply.get("ok"):
    for what in sys.argv[3].split(","):
        # "right": the token the daemon gave (a second "right" is a replay)
        out.setdefault("knocks", []).append(knock("cd" * 16 if what == "wrong" else reply["token"]))
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three hosts and one ZooKeeper for the module; each test starts its own daemons."""
    with Cluster(3, daemons=False, zookeeper=True) as c:
        yield c


class Two:
    """One test's daemons on h1 and h2 (h3 too when asked), each with --listen, in a cluster
    root of its own; helpers to run processes in them."""

    def __init__(self, c: Cluster, n: int = 2) -> None:
        assert c.zookeeper is not None
        self.c = c
        self.url = f"zk://{c.zookeeper.hosts}/x{next(_roots)}"
        self.hosts = c.hosts[:n]
        self.h1, self.h2 = c.hosts[0], c.hosts[1]
        self.procs: list[Any] = []
        self.env = {"FABLE_PEER_TIMEOUT": PEER_TIMEOUT, "FABLE_CLUSTER_SESSION": "10"}
        self.logs = _log_sizes(c)
        for h in self.hosts:
            h.start_daemon("--cluster", self.url, "--listen", f"{h.address}:0", env=self.env)
        for h in self.hosts:  # every daemon sees every other's host znode
            deadline = time.monotonic() + 10
            while len(self.status(h)["hosts"]) < n:
                assert time.monotonic() < deadline, f"{h.name} does not see the other hosts"
                time.sleep(0.05)

    def status(self, h: Host) -> dict[str, Any]:
        reply = one_shot("cluster", h.socket)
        assert reply is not None
        return dict(reply["cluster"])

    def link(self, h: Host) -> str:
        return str(self.status(h)["link"])

    def serve(self, name: str = "bob", accept_timeout: float = 60, **listen: Any) -> Any:
        """A listener on h1 (its stdout: "listening", then JSON lines)."""
        p = self.h1.popen(
            [sys.executable, "-c", SERVE, name, json.dumps(listen), str(accept_timeout)],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        assert p.stdout.readline().strip() == "listening"
        self.wait_listed(name)
        return p

    def wait_listed(self, name: str) -> None:
        """Until h2's daemon has ``name`` in its cluster cache."""
        deadline = time.monotonic() + 10
        while True:
            reply = one_shot("ls", self.h2.socket, cluster=True, timeout=2)
            assert reply is not None
            if any(e["name"] == name and e["listening"] for e in reply["endpoints"]):
                return
            assert time.monotonic() < deadline, f"h2 never saw {name}"
            time.sleep(0.05)

    def call(self, to: str = "bob", limit: float = 60, **steps: Any) -> dict[str, Any]:
        r = self.h2.run(
            [sys.executable, "-c", CALL, to, json.dumps(steps)], env=self.env, timeout=limit
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return dict(json.loads(r.stdout.splitlines()[-1]))

    def connected_caller(self) -> tuple[Any, dict[str, Any]]:
        """A caller on h2 connected to bob that waits for a line on its stdin, then streams
        until its connection dies; its Popen and its first report (the flows, "ready")."""
        p = self.h2.popen(
            [sys.executable, "-c", CALL, "bob", json.dumps({"then": "wait-death"})],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        first = json.loads(p.stdout.readline())
        assert first.get("ready"), first
        return p, first

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        finish(self.procs)
        for h in self.c.hosts:
            h.stop_daemon()
        for h in self.c.hosts:
            path = h.dir / "fabled.out"
            if path.exists():  # what this test's daemons said
                said = path.read_bytes()[self.logs[h.name] :].decode(errors="replace")
                assert "Traceback" not in said, f"{h.name}'s daemon: {said[-3000:]}"


def _log_sizes(c: Cluster) -> dict[str, int]:
    return {
        h.name: (h.dir / "fabled.out").stat().st_size if (h.dir / "fabled.out").exists() else 0
        for h in c.hosts
    }


@pytest.fixture
def two(cluster: Cluster) -> Iterator[Two]:
    t = Two(cluster)
    try:
        yield t
    finally:
        t.close()


def _lines(p: Any, n: int) -> list[dict[str, Any]]:
    return [json.loads(p.stdout.readline()) for _ in range(n)]


def test_a_name_on_another_host_connects_streams_and_switches(two: Two) -> None:
    bob = two.serve(allow_remote=True)
    out = two.call(switch=["tcp", "tcp-nodelay", "tcp"], bad_switch="mempipe-futex")
    assert "error" not in out, out
    assert out["transport"] == "tcp-nodelay"  # the other-host rows: no Nagle
    assert out["after"] == ["tcp", "tcp-nodelay", "tcp"]
    assert "cannot connect two hosts" in out["bad_switch"]
    assert out["sent"] == 200 + 3 * 300 + 10  # every message came back whole, in order
    (flow,) = [f for f in out["flows"] if f["ends"] == ["caller", "bob"]]
    assert flow["hosts"] == ["h2", "h1"]
    assert "between hosts h2 (caller) and h1 (bob)" in flow["reason"]
    assert flow["id"] >= 10**10  # a number of the cluster's, above every local flow id
    got = _lines(bob, 2)
    assert got[0] == {"accepted": "tcp-nodelay"}
    assert got[1]["echoed"] == out["sent"] and got[1]["end"] == "ConnectionClosed"


def test_both_hosts_list_the_flow_under_one_id(two: Two) -> None:
    two.serve(allow_hosts=["h2"])
    p, first = two.connected_caller()
    (mine,) = [f for f in first["flows"] if f["ends"] == ["caller", "bob"]]

    def theirs() -> list[dict[str, Any]]:
        reply = one_shot("flows", two.h1.socket)
        assert reply is not None
        return [f for f in reply["flows"] if f["id"] == mine["id"]]

    deadline = time.monotonic() + 10
    while not theirs() or theirs()[0]["msgs"] == 0:  # (h1's process reports once a second)
        assert time.monotonic() < deadline, "h1's daemon never listed the flow"
        time.sleep(0.1)
    (flow,) = theirs()
    assert flow["ends"] == ["caller", "bob"] and flow["hosts"] == ["h2", "h1"]
    assert flow["transport"] == mine["transport"]
    for h in (two.h1, two.h2):  # the commands show it on both hosts, each end with its host
        for cmd in (["flows"], ["top", "--once"]):
            r = h.run([sys.executable, "-m", "fable.cli", *cmd], env={"COLUMNS": "250"})
            assert r.returncode == 0 and str(mine["id"]) in r.stdout, (cmd, r.stdout, r.stderr)
            # (fable top shows where a local end runs: caller@cpu1 on h2)
            assert re.search(r"caller[^<\n]*? on h2 <-> bob[^\n]*? on h1", r.stdout), (
                h.name,
                cmd,
                r.stdout,
            )
    p.stdin.close()  # (the caller ends: a closed stdin reads as the go, then it ends)
    p.kill()


@pytest.mark.parametrize("allow", [{}, {"allow_hosts": ["h3"]}])
def test_a_listener_that_does_not_allow_the_host_refuses(two: Two, allow: dict[str, Any]) -> None:
    bob = two.serve(accept_timeout=3, **allow)
    out = two.call()
    assert out.get("error") == "PermissionDenied", out
    assert "takes no connections from host h2" in out["message"]
    assert _lines(bob, 1) == [{"accept": "Timeout"}]  # nothing was delivered


def test_wrong_and_replayed_tokens_are_refused_and_nothing_is_delivered(two: Two) -> None:
    bob = two.serve(accept_timeout=4, allow_remote=True)
    r = two.h2.run([sys.executable, "-c", HOSTILE, two.link(two.h1), "h2", "wrong,right,right"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["reply"]["ok"] is True, out
    # a wrong token: closed unanswered; the right one: answered; the same again: closed
    assert out["knocks"] == ["closed", "joined", "closed"]
    # the caller with the right token never sent a hello: the listener delivered nothing
    assert _lines(bob, 1) == [{"accept": "Timeout"}]


def test_a_request_in_another_hosts_name_is_refused(two: Two) -> None:
    two.serve(accept_timeout=3, allow_remote=True)
    # from h2's address, in h3's name (h3 is a host id the cluster does not even have)
    r = two.h2.run([sys.executable, "-c", HOSTILE, two.link(two.h1), "h3", ""])
    assert r.returncode == 0, r.stderr[-3000:]
    reply = json.loads(r.stdout)["reply"]
    assert reply["ok"] is False and reply["error"] == "PermissionDenied", reply
    assert "not list as that host's" in reply["message"]


def test_the_link_going_down_mid_stream_is_peer_died_on_both_sides(two: Two) -> None:
    bob = two.serve(allow_remote=True)
    p, _ = two.connected_caller()
    assert _lines(bob, 1)[0]["accepted"]
    down = ["ip", "-n", two.h1.netns, "link", "set", "eth0", "down"]
    subprocess.run(down, check=True)
    try:
        t0 = time.monotonic()
        p.stdin.write("go\n")
        p.stdin.flush()
        out = json.loads(p.stdout.readline())
        ended = json.loads(bob.stdout.readline())
        bob_after = ended["at"] - t0
    finally:
        subprocess.run(["ip", "-n", two.h1.netns, "link", "set", "eth0", "up"], check=True)
    limit = float(PEER_TIMEOUT) + 2.0  # keepalive / TCP_USER_TIMEOUT, and a tick to notice
    assert out["died"] == "PeerDied" and out["after_s"] < limit, out
    assert ended["end"] == "PeerDied", ended
    assert bob_after < limit + 1.0, bob_after


def test_the_peers_host_killed_is_peer_died(two: Two) -> None:
    two.serve(allow_remote=True)
    p, _ = two.connected_caller()
    two.h1.crash()  # every process of h1, its daemon too
    p.stdin.write("go\n")
    p.stdin.flush()
    out = json.loads(p.stdout.readline())
    assert out["died"] == "PeerDied" and out["after_s"] < float(PEER_TIMEOUT) + 2.0, out


def test_an_advertised_address_that_does_not_answer_is_a_timeout(two: Two) -> None:
    two.serve(allow_remote=True)
    subprocess.run(["ip", "-n", two.h1.netns, "link", "set", "eth0", "down"], check=True)
    try:
        t0 = time.monotonic()
        out = two.call(limit=30, timeout=1)
        took = time.monotonic() - t0
    finally:
        subprocess.run(["ip", "-n", two.h1.netns, "link", "set", "eth0", "up"], check=True)
    assert out.get("error") == "Timeout", out
    assert "did not answer" in out["message"]
    assert took < float(PEER_TIMEOUT) + 5.0  # (the process's start included)


def test_a_name_whose_host_has_no_link_is_not_found(cluster: Cluster) -> None:
    assert cluster.zookeeper is not None
    url = f"zk://{cluster.zookeeper.hosts}/x{next(_roots)}"
    h1, h2 = cluster.hosts[:2]
    h1.start_daemon("--cluster", url)  # no --listen
    h2.start_daemon("--cluster", url, "--listen", f"{h2.address}:0")
    t = Two.__new__(Two)
    t.c, t.h1, t.h2, t.procs = cluster, h1, h2, []
    t.env = {"FABLE_PEER_TIMEOUT": PEER_TIMEOUT}
    t.logs = _log_sizes(cluster)
    try:
        t.serve(accept_timeout=2, allow_remote=True)
        out = t.call()
        assert out.get("error") == "NameNotFound", out
        assert "runs without --listen" in out["message"]
    finally:
        t.close()


def test_listen_needs_a_cluster_and_a_real_address(cluster: Cluster) -> None:
    h = cluster.hosts[0]
    for args, said in (
        (["--listen", f"{h.address}:0"], "needs --cluster"),
        (["--cluster", "zk://198.18.0.250/y", "--listen", "0.0.0.0:0"], "this host's address"),
        (["--cluster", "zk://198.18.0.250/y", "--listen", "nowhere"], "ADDR:PORT"),
    ):
        r = h.run([sys.executable, "-m", "fable.daemon", "--socket", str(h.dir / "x.sock"), *args])
        assert r.returncode == 1 and said in r.stderr, (args, r.stderr)


# ---------------------------------------------------------------- the tokens, on loopback
def _fake_listener(answer: dict[str, Any] | None) -> tuple[socket.socket, threading.Thread]:
    """A listener that reads a JOIN and answers ``answer`` (None: hangs up)."""
    lst = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        c, _ = lst.accept()
        recv_frame(c, FrameReader(SETUP), time.monotonic() + 5)
        if answer is not None:
            c.sendall(SETUP.encode(answer))
        c.close()

    t = threading.Thread(target=run)
    t.start()
    return lst, t


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ({"op": "joined", "token": "00" * 16}, "not the listener the daemons arranged"),
        (None, "refused the connection"),
    ],
)
def test_the_caller_refuses_what_does_not_hold_the_listeners_token(
    answer: dict[str, Any] | None, said: str
) -> None:
    lst, t = _fake_listener(answer)
    port = lst.getsockname()[1]
    remote = {"address": "127.0.0.1", "port": port, "token": new_token(), "peer_token": new_token()}
    with pytest.raises(ProtocolError, match=said):
        join(remote, 5)
    t.join(5)
    lst.close()


def test_a_data_connection_is_taken_by_its_token_only() -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    mine = Across(lst, "127.0.0.1", lst.getsockname()[1], "test")
    right = new_token()
    stray = socket.create_connection(lst.getsockname())  # says nothing
    wrong = socket.create_connection(lst.getsockname())
    wrong.sendall(SETUP.encode({"op": "dial", "token": new_token()}))
    good, token = mine.dial(5)
    with pytest.raises(ProtocolError):
        mine.take(123, 1)
    got = mine.take(token, 5)
    assert got.getpeername() == good.getsockname()
    for s in (stray, wrong):  # each closed unanswered
        s.settimeout(5)
        assert s.recv(10) == b""
    with pytest.raises(Timeout):
        mine.take(right, 0.3)
    for s in (stray, wrong, good, got):
        s.close()
    mine.close()


def test_callers_from_another_address_cannot_jam_a_switch() -> None:
    """Silent connections from an address other than the peer's, queued ahead of the peer's
    dial, are dropped unread: the dial is still taken within TAKE_S."""
    from fable.transports.across import TAKE_S

    lst = socket.create_server(("127.0.0.1", 0))
    mine = Across(lst, "127.0.0.1", lst.getsockname()[1], "test")
    jam = []
    for _ in range(5):  # (the listen backlog of the test listener is larger than this)
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(lst.getsockname())
        jam.append(s)
    good, token = mine.dial(5)
    t0 = time.monotonic()
    got = mine.take(token)
    assert time.monotonic() - t0 < TAKE_S and got.getpeername() == good.getsockname()
    for s in (*jam, good, got):
        s.close()
    mine.close()


def test_an_address_that_refuses_is_connection_closed() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    remote = {"address": "127.0.0.1", "port": port, "token": new_token(), "peer_token": new_token()}
    with pytest.raises(ConnectionClosed):
        join(remote, 2)


def test_the_readmes_example_runs_on_two_hosts(two: Two) -> None:
    """README "Connections between hosts": its h1 half on h1, its h2 half on h2."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("### Connections between hosts")
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    head, rest = block.split("# on host h1\n")
    bob_part, alice_part = rest.split("# on host h2\n")
    bob = two.h1.popen(
        [sys.executable, "-c", head + bob_part + "print('accepted', conn.transport)\n"],
        env=two.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    two.procs.append(bob)
    two.wait_listed("bob")
    r = two.h2.run([sys.executable, "-c", head + alice_part], env=two.env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "tcp-nodelay"
    assert bob.stdout.readline().strip() == "accepted tcp-nodelay"


# ------------------------------------------- a connection between "hosts" on loopback
def _listening_end(transport: str) -> tuple[dict[str, Any], threading.Thread, dict[str, Any]]:
    """A listening end set up the way a host's is (``admit``, then the first offer), in a
    thread on 127.0.0.1: the ``remote`` a caller joins with, the thread, and where its
    Connection lands (``["end"]``)."""
    from fable.connection import PendingEnd
    from fable.transports.across import admit

    lst = socket.create_server(("127.0.0.1", 0))
    remote = {
        "address": "127.0.0.1",
        "port": lst.getsockname()[1],
        "token": new_token(),
        "peer_token": new_token(),
        "host": "test",
    }
    got: dict[str, Any] = {}

    def accept() -> None:
        sock, across = admit(lst, remote, 5)
        got["end"] = PendingEnd(sock, across).open(5, trusted=False, expect=transport)

    t = threading.Thread(target=accept)
    t.start()
    return remote, t, got


def _pair_across(transport: str = "tcp-nodelay") -> tuple[Any, Any]:
    """Two ends of a connection set up the way two hosts do (join / admit, a TCP setup
    channel, dialed data paths), both in this process on 127.0.0.1."""
    from fable.connection import initiate

    remote, t, got = _listening_end(transport)
    sock, across = join(remote, 5)
    a = initiate(sock, transport, trusted=False, across=across)
    t.join(10)
    return a, got["end"]


def test_switches_between_hosts_keep_every_message() -> None:
    a, b = _pair_across()
    steps = (("tcp", a), ("tcp-nodelay", b), ("tcp", b), ("tcp-nodelay", a))
    echoed: list[int] = []

    def echo() -> None:  # both sides read all along (a switch ends once each read the END)
        try:
            while True:
                b.send(b.recv(timeout=10))
                echoed.append(1)
        except ConnectionClosed:
            pass

    echoer = threading.Thread(target=echo)
    echoer.start()
    try:
        assert a.crosses_hosts and b.crosses_hosts and b.transport == "tcp-nodelay"
        sent = 0

        def burst(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                m = sent.to_bytes(4, "little") * (1 + sent % 300)
                a.send(m)
                assert a.recv(timeout=10) == m
                sent += 1

        for target, by in steps:
            burst(50)
            by.reconfigure(target)
            burst(50)
            assert a.transport == b.transport == target
        with pytest.raises(ValueError, match="cannot connect two hosts"):
            a.reconfigure("unix")
        burst(10)
        assert sent == 100 * len(steps) + 10
    finally:
        a.close()
        echoer.join(10)
        b.close()
    assert len(echoed) == sent  # (each echo counted after it went out: looked at once done)


def test_an_offer_that_never_dials_is_refused_without_holding_the_peer() -> None:
    """The hostile side offers a switch whose data connection never comes: the other side
    refuses within TAKE_S (its control thread does not wait on the network), and its
    connection goes on."""
    from fable.transports.across import TAKE_S
    from fable.transports.stream import HEADER

    remote, t, got = _listening_end("tcp-nodelay")
    setup, across = join(remote, 5)  # the hostile side speaks the rest by hand
    data, token = across.dial(5)
    hello = {"op": "hello", "epoch": 0, "transport": "tcp-nodelay", "safe": True, "yours": None}
    setup.sendall(SETUP.encode({**hello, "params": {"token": token}}))
    t.join(10)
    victim = got["end"]
    try:
        t0 = time.monotonic()
        offer = {**hello, "op": "reconfig", "epoch": 1, "transport": "tcp"}
        setup.sendall(SETUP.encode({**offer, "params": {"token": new_token()}}))
        answer, _ = recv_frame(setup, FrameReader(SETUP), time.monotonic() + 10)
        took = time.monotonic() - t0
        assert answer["op"] == "reconfig-refuse" and answer["epoch"] == 1, answer
        assert "did not dial in" in answer["why"]
        assert took < TAKE_S + 1.0, took
        victim.send(b"x")  # its data path is as it was
        frame = b""
        data.settimeout(5)
        while len(frame) < HEADER.size + 1:
            frame += data.recv(64)
        assert frame[HEADER.size :] == b"x" and victim.transport == "tcp-nodelay"
    finally:
        victim.close()
        for s in (setup, data):
            s.close()
        across.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fable_bench_hosts_measures_the_other_host_rows(tmp_path: Any) -> None:
    """``fable bench --hosts``: the same loops between two test hosts of its own, records with
    placement other-host and the two hosts, in the same table."""
    out = tmp_path / "run.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fable.cli",
            "bench",
            "--hosts",
            "--transports",
            "tcp,tcp-nodelay",
            "--sizes",
            "4096",
            "--pairs",
            "0:1",
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    far = [x for x in records if x["placement"] == "other-host"]
    assert {(x["transport"], x["mode"]) for x in far} == {
        (t, m) for t in ("tcp", "tcp-nodelay") for m in ("latency", "throughput")
    }
    assert all(x["verified"] and x["hosts"] == ["h2", "h1"] and x["cpus"] == [0, 1] for x in far)
    assert all(x["p50_ns"] > 0 for x in far if x["mode"] == "latency")
    assert "other-host (test hosts h2 -> h1" in r.stdout
    assert len(records) == 2 * len(far)  # and the local rows beside them
