"""fabled under load from many local users (issue 19, slow): eight uids holding connections up
to their limits and half-sent frames, then the daemon out of fds, then everything released; and
a protocol fuzz run of 10^5 random and mutated frames from several uids.

Run as root (CI is): each uid is a forked child that drops to it with ``setresuid``; a missing
capability fails the test. Every child reports what it saw and its exit status is checked.
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fable
from fable.nameservice import PROTOCOL_VERSION
from helpers import (
    HELLO,
    UID,
    Child,
    as_uid,
    ask,
    flood,
    frame,
    names,
    need_root,
    raw_client,
    read_reply,
    start_system_daemon,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

USERS = [UID + k for k in range(8)]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------------------ eight users
PER_UID = 24  # FABLE_MAX_CONNS_PER_UID in this test
LORIS = 8  # of which half-sent frames


def test_eight_users_at_their_limits_then_out_of_fds_then_released(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each of 8 uids opens PER_UID connections (LORIS of them stuck in half a frame, the
    rest idle) and 4 more, which get a ``bye`` naming FABLE_MAX_CONNS_PER_UID; the loris
    connections are closed after FABLE_FRAME_TIMEOUT. Then the daemon's fd limit is cut to
    what it holds and root floods it: it cannot accept (EMFILE), and logs it. Throughout, a
    flow made before carries messages. Then everything is released: a fresh ``ls`` answers
    within 1 s, and a new connection through the daemon works."""
    need_root()
    monkeypatch.setenv("FABLE_MAX_CONNS_PER_UID", str(PER_UID))
    monkeypatch.setenv("FABLE_FRAME_TIMEOUT", "3")
    log = tmp_path / "fabled.log"
    path, done = start_system_daemon(monkeypatch, "--log", str(log))
    daemon = ask("hello", path)["daemon"]
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    kids: list[Child] = []  # killed at the end whatever happens (they wait on our pipes)
    try:

        def echo() -> None:
            lst = fable.register("load-echo").listen()
            for _ in range(2):
                c = lst.accept(timeout=60)
                for m in c:
                    c.send(m)

        srv = Child(echo)
        kids.append(srv)
        wait_for(lambda: "load-echo" in names(path))

        def client() -> list[bytes]:
            c = fable.register("load-client").connect("load-echo", timeout=10)
            got = []
            for _ in range(2):  # during the flood, then after it
                assert os.read(go_r, 1) == b"g"
                c.send(b"ping")
                got.append(c.recv(timeout=10))
            c.close()
            return got

        cli = Child(client)
        kids.append(cli)

        def user(uid: int) -> Any:
            as_uid(uid)
            held, refused = [], []
            for k in range(PER_UID + 4):
                s = raw_client(path)
                if k < LORIS:
                    s.sendall(HELLO + struct.pack(">I", 100) + b'{"v":')  # and no more
                    held.append(s)
                    continue
                s.sendall(HELLO)
                r = read_reply(s)
                if r is not None and r.get("op") == "bye":
                    refused.append(r["message"])
                    s.close()
                else:
                    assert r is not None and r["ok"], r
                    held.append(s)
            os.write(ready_w, b"r")
            loris_closed = 0
            for s in held[:LORIS]:
                s.settimeout(10)
                try:
                    while s.recv(4096):
                        pass
                    loris_closed += 1
                except OSError:
                    loris_closed += 1
            os.read(release_r, 1)  # held until the parent releases everyone
            for s in held:
                s.close()
            return len(held), refused, loris_closed

        users = [Child(lambda u=u: user(u)) for u in USERS]  # type: ignore[misc]
        kids += users
        for _ in USERS:
            assert os.read(ready_r, 1) == b"r"
        # the daemon out of fds: its limit cut to what it holds, and root connects more
        soft, hard = resource.prlimit(daemon, resource.RLIMIT_NOFILE)
        resource.prlimit(daemon, resource.RLIMIT_NOFILE, (_fds(daemon) + 4, hard))
        flooding = flood(path, 64)
        os.write(go_w, b"g")  # a message over the flow made before, during the flood
        time.sleep(1.0)
        resource.prlimit(daemon, resource.RLIMIT_NOFILE, (soft, hard))
        for s in flooding:
            s.close()
        os.write(release_w, b"x" * len(USERS))
        results = [u.result(timeout=60) for u in users]
        start = time.monotonic()
        wait_for(lambda: ask("ls", path) is not None, timeout=5)
        took = time.monotonic() - start
        os.write(go_w, b"g")
        got = cli.result()

        def newcomer() -> bytes:
            c = fable.register("load-late").connect("load-echo", timeout=10)
            c.send(b"late")
            got = c.recv(timeout=10)
            c.close()
            return got

        late = Child(newcomer).result()
        srv.result()
    finally:
        for fd in (release_r, release_w, ready_r, ready_w, go_r, go_w):
            os.close(fd)
        for kid in kids:
            kid.kill()
        done()
    for held, refused, loris_closed in results:
        assert held == PER_UID
        assert len(refused) == 4 and all("FABLE_MAX_CONNS_PER_UID" in m for m in refused)
        assert loris_closed == LORIS
    assert got == [b"ping", b"ping"] and late == b"late"
    assert took < 1.0, f"ls answered {took:.2f} s after the release"
    text = log.read_text()
    assert "cannot accept clients" in text and "accepting clients again" in text
    assert text.count(f"has {PER_UID} connections open, FABLE_MAX_CONNS_PER_UID") == 4 * 8


# ------------------------------------------------------------------------------------ fuzz
FRAMES_PER_EXAMPLE = 1000
EXAMPLES = 100  # 10^5 frames in all
FUZZ_USERS = USERS[:4]

TEMPLATES: list[dict[str, Any]] = [
    {"op": "hello"},
    {"op": "register", "name": "fz", "affinity": [0, 1], "cpu": 0, "node": 0},
    {"op": "unregister", "name": "fz"},
    {"op": "listen", "name": "fz", "trusted": False, "allow_uids": [0]},
    {"op": "connect", "name": "fz", "to": "fz", "timeout": 0.01, "transport": None},
    {"op": "ls", "after": ""},
    {"op": "flows", "after": -1},
    {"op": "explain", "a": "fz", "b": "fz"},
    {"op": "reconfigure", "flow": 1, "transport": "unix", "safe": True, "end": None},
    {"op": "refused", "flow": 1, "ticket": 1, "why": "x"},
    {"op": "stop"},
    {
        "op": "report",
        "flows": [
            {
                "id": 1,
                "ends": ["fz", "fy"],
                "transport": "unix",
                "safe": [True, False],
                "role": 0,
                "epoch": 0,
                "msgs": 0,
                "bytes": 0,
                "token": "t",
                "last_switch": {"at": 1, "from": "a", "to": "b", "reason": "r"},
            }
        ],
        "endpoints": [{"name": "fz", "affinity": [0]}],
        "more": False,
    },
]


def _junk(rnd: random.Random, depth: int = 0) -> Any:
    """A random JSON value (sometimes large, sometimes nested)."""
    kind = rnd.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.choice([True, False])
    if kind == 2:
        return rnd.choice([0, -1, 1, 2**31, 2**63, -(2**70), rnd.randrange(-1000, 1000)])
    if kind == 3:
        return rnd.random() * rnd.choice([1, 1e300, -1e-300])
    if kind == 4:
        return "".join(rnd.choice("ab/.-_xio:\u00e9\x00 ") for _ in range(rnd.randrange(0, 80)))
    if kind == 5:
        return "n" * rnd.choice([1, 64, 255, 256, 5000])
    if kind == 6:
        return [_junk(rnd, depth + 1) for _ in range(rnd.randrange(0, 6))]
    if kind == 7:
        return {str(_junk(rnd, 3)): _junk(rnd, depth + 1) for _ in range(rnd.randrange(0, 5))}
    return [list(range(rnd.randrange(0, 5000)))]


def _mutate(rnd: random.Random, rid: int) -> bytes:
    """One frame: a valid request mutated (fields replaced, dropped, added, the op changed),
    or its bytes mangled (flipped, cut short, a lying length, deep nesting)."""
    msg = json.loads(json.dumps(rnd.choice(TEMPLATES)))
    msg["v"], msg["id"] = PROTOCOL_VERSION, rid
    for _ in range(rnd.randrange(0, 4)):
        what = rnd.randrange(5)
        key = rnd.choice(sorted(msg))
        if what == 0 and key not in ("v",):
            msg[key] = _junk(rnd)
        elif what == 1 and key not in ("v", "id"):
            del msg[key]
        elif what == 2:
            msg[str(_junk(rnd, 3))[:20]] = _junk(rnd)
        elif what == 3:
            msg["op"] = rnd.choice(TEMPLATES)["op"]
        elif what == 4 and isinstance(msg.get("flows"), list) and msg["flows"]:
            first = msg["flows"][0]
            if isinstance(first, dict) and first:
                first[rnd.choice(sorted(first))] = _junk(rnd)
    data = frame(msg)
    mangle = rnd.randrange(40)
    if mangle == 0:  # flipped bytes in the body
        b = bytearray(data)
        for _ in range(3):
            b[rnd.randrange(4, len(b))] ^= 1 << rnd.randrange(8)
        return bytes(b)
    if mangle == 1:  # a length that promises more than comes (the rest: the next frame)
        return struct.pack(">I", len(data) - 4 + rnd.randrange(1, 50)) + data[4:]
    if mangle == 2:  # over the limit
        return struct.pack(">I", rnd.choice([65537, 2**31]))
    if mangle == 3:  # deep nesting
        d = rnd.choice([40, 2000, 30000])
        body = b'{"v":%d,"id":%d,"op":"ls","x":' % (PROTOCOL_VERSION, rid) + b"[" * d
        return struct.pack(">I", len(body) + d + 1) + body + b"]" * d + b"}"
    return data


def _fuzz_as(path: Path, uid: int, seed: int) -> dict[str, int]:
    """As ``uid``: FRAMES_PER_EXAMPLE frames from ``seed``, over as many connections as the
    daemon's hang-ups take; replies are read as they come (the daemon drops a client that does
    not read). Each frame's answer (a reply or a hang-up) is waited for before the next is
    sent, so every frame reaches the daemon. Returns counts of replies and hang-ups."""
    as_uid(uid)
    rnd = random.Random(seed)
    counts = {"replies": 0, "hangups": 0}
    s: socket.socket | None = None
    poll = select.poll()

    def drain(conn: socket.socket, wait_ms: int) -> bool:
        """Read what is there; False when the daemon hung up."""
        while poll.poll(wait_ms):
            try:
                data = conn.recv(1 << 16)
            except OSError:
                return False
            if not data:
                return False
            counts["replies"] += data.count(b'"id"')
            wait_ms = 0
        return True

    for i in range(FRAMES_PER_EXAMPLE):
        if s is None:
            s = raw_client(path)
            s.setblocking(False)
            poll = select.poll()
            poll.register(s.fileno(), select.POLLIN)
            if rnd.random() < 0.9:
                s.send(HELLO)
        try:
            s.send(_mutate(rnd, i + 1), socket.MSG_NOSIGNAL)
            alive = drain(s, 20)  # its reply, or the hang-up (a connect may wait: 20 ms)
        except OSError:
            alive = False
        if not alive:
            counts["hangups"] += 1
            s.close()
            s = None
    if s is not None:
        drain(s, 200)
        s.close()
    return counts


def test_a_protocol_fuzz_of_a_hundred_thousand_frames_from_four_users(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """10^5 frames (hypothesis picks each batch's seed and uid; the frames are valid requests
    mutated, or mangled bytes) from four uids: the daemon never dies, keeps answering, and
    its RSS grows by at most 20 MiB from 10^4 to 10^5 frames; no request makes it fail
    inside (its log has no internal error)."""
    need_root()
    log = tmp_path / "fabled.log"
    path, done = start_system_daemon(monkeypatch, "--log", str(log))
    daemon = ask("hello", path)["daemon"]
    seen: list[dict[str, int]] = []
    rss: list[int] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(seed=st.integers(0, 2**32), uid=st.sampled_from(FUZZ_USERS))
    def batch(seed: int, uid: int) -> None:
        seen.append(Child(lambda: _fuzz_as(path, uid, seed)).result(timeout=120))
        assert Path(f"/proc/{daemon}").exists(), "the daemon died"
        if len(seen) == 10:
            rss.append(_rss(daemon))

    try:
        batch()
        assert ask("ls", path) is not None
        rss.append(_rss(daemon))
    finally:
        done()
    print({k: sum(c[k] for c in seen) for k in seen[0]}, [r >> 20 for r in rss], "MiB")
    assert len(seen) == EXAMPLES  # every batch ran: 10^5 frames
    assert sum(c["replies"] for c in seen) > EXAMPLES * FRAMES_PER_EXAMPLE // 2
    assert sum(c["hangups"] for c in seen) > EXAMPLES  # the mangled frames did hang up
    assert rss[1] - rss[0] <= 20 << 20, f"RSS {rss[0] >> 20} -> {rss[1] >> 20} MiB"
    errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
    assert not errors, errors[:3]
