"""fabled among hostile local users (issue 19): what another uid on the machine can try.

Run as root (CI is): the attacker is a forked child that drops to a second uid with
``setresuid``; a missing capability fails the test, it never skips. Each attack checks the
attacker's own exit status, so a broken attack cannot pass.

Impersonation: another user who makes the per-user daemon's directory first
(``/tmp/fable-$UID`` when ``XDG_RUNTIME_DIR`` is unset, a name anyone can create) and runs a
fake daemon there, or who runs the daemon behind a socket in a directory we trust, is refused:
the client checks the socket's directory before it connects and the daemon process's uid
(``SO_PEERCRED``) after, and raises ``UntrustedDaemon`` (a ``DaemonUnavailable``) naming what it
found. Nothing of ours reaches the fake daemon.

Flow hijack: flow ids are public (`fable flows`); a report or a switch of a flow needs its
secret token (given to its two ends only) and the uid of one of its ends, or root.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import fable
from fable.client import link, one_shot
from fable.nameservice import PROTOCOL_VERSION, UntrustedDaemon
from helpers import (
    HELLO,
    UID,
    Child,
    as_uid,
    ask,
    daemon_answers,
    echo_pair,
    fork,
    frame,
    names,
    need_root,
    raw_client,
    read_reply,
    start_daemon,
    start_system_daemon,
    stop,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

FAKE_S = 4.0  # how long the fake daemon serves


def _fake_daemon(path: Path, ready: int, report: int, done: int, bind_first: bool) -> None:
    """As uid UID: listen on ``path`` (bound before dropping to UID when ``bind_first``: the
    directory is not UID's), answer nothing until ``done`` is readable (or FAKE_S), and write
    to ``report`` how many bytes clients sent it (a trusting client would have said hello)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if bind_first:
        listener.bind(str(path))
        os.chmod(path, 0o666)
    os.setresgid(UID, UID, UID)
    os.setresuid(UID, UID, UID)
    if not bind_first:
        path.parent.mkdir(mode=0o700)
        listener.bind(str(path))
    listener.listen(16)  # SO_PEERCRED of its connections: the uid at listen(), UID
    listener.settimeout(0.1)
    os.write(ready, b"r")
    got = 0
    conns: list[socket.socket] = []
    end = time.monotonic() + FAKE_S
    finished = select.poll()  # (not select.select: the suite also runs with fds above 1024)
    finished.register(done, select.POLLIN)
    while time.monotonic() < end and not finished.poll(0):
        try:
            c, _ = listener.accept()
            c.setblocking(False)
            conns.append(c)
        except TimeoutError:
            pass
        for c in conns:
            try:
                got += len(c.recv(65536))
            except BlockingIOError:
                pass
    os.write(report, str(got).encode())


def _impersonate(path: Path, bind_first: bool) -> tuple[dict[str, str], int, int]:
    """Start the fake daemon in a child, then the victim in another; returns what the victim
    got, how many bytes the fake daemon got, and the fake daemon's exit status."""
    ready_r, ready_w = os.pipe()
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()

    def body() -> None:
        os.close(done_w)  # the parent's end: its close says "done"
        _fake_daemon(path, ready_w, report_w, done_r, bind_first)

    pid = fork(body)
    for fd in (ready_w, report_w, done_r):
        os.close(fd)
    try:
        assert os.read(ready_r, 1) == b"r", "the fake daemon did not start"
        out = Child(_victim).result()
    finally:
        os.close(done_w)
        got = int(os.read(report_r, 64) or b"-1")
        status = os.waitpid(pid, 0)[1]
        os.close(ready_r)
        os.close(report_r)
    return out, got, os.waitstatus_to_exitcode(status)


def _victim() -> Any:
    """In a fresh process: what a register, a request and the CLI's one-shot get."""
    out: dict[str, str] = {}
    for what, call in (
        ("register", lambda: fable.register("victim-svc")),
        ("request", lambda: link().request("ls", wait=3)),
        ("one_shot", lambda: one_shot("ls")),
    ):
        try:
            call()
            out[what] = "no error"
        except fable.FableError as e:
            out[what] = f"{type(e).__name__}: {e}"
    return out


def _refused(attempt: tuple[dict[str, str], int, int], found: str) -> None:
    """Every call of the victim raised UntrustedDaemon naming ``found``; the fake daemon ran
    (exit status 0) and got nothing."""
    out, got, status = attempt
    assert status == 0, "the fake daemon failed"
    for what, raised in out.items():
        assert raised.startswith(UntrustedDaemon.__name__), f"{what}: {raised}"
        assert found in raised, f"{what}: {raised}"
    assert got == 0, f"the fake daemon got {got} bytes from a client"


def test_a_daemon_in_a_directory_another_user_made_first_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other user creates our per-user daemon directory ($XDG_RUNTIME_DIR/fable here, as
    /tmp/fable-$UID would be) and serves a fake daemon in it: refused before connecting."""
    need_root()
    base = Path(tempfile.mkdtemp(prefix="fable-race-"))
    os.chmod(base, 0o1777)  # like /tmp: anyone may create a name in it
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    monkeypatch.delenv("FABLE_SOCKET")
    fable.config.reload()
    try:
        attempt = _impersonate(base / "fable" / "fabled.sock", bind_first=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    _refused(attempt, f"belongs to uid {UID}")


def test_a_daemon_run_by_another_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory is one we trust (root's, 0700), but the process behind the socket runs
    as another uid (it listened after dropping to it): refused after connecting, before a byte
    is sent."""
    need_root()
    d = Path(tempfile.mkdtemp(prefix="fable-peer-"))  # root's, 0700
    path = d / "fabled.sock"
    monkeypatch.setenv("FABLE_SOCKET", str(path))
    fable.config.reload()
    try:
        attempt = _impersonate(path, bind_first=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    _refused(attempt, f"runs as uid {UID}")


# ------------------------------------------------------------------------------ flow hijack
def test_another_user_cannot_report_or_switch_a_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a system daemon, uid UID reads root's flow in `fable flows` (its id is public) and
    reports it with fake counters (no token, then a guessed one), then asks to switch it:
    ``PermissionDenied`` each time, and the flow is unchanged (transport, epoch, counters) and
    still carries root's messages. (Before, the report was accepted, adopted the reporter as an
    end, and the switch went through.)"""
    need_root()
    path, done = start_system_daemon(monkeypatch)
    go_r, go_w = os.pipe()
    try:
        srv, cli = echo_pair(path, "root", go_r)
        (flow,) = ask("flows", path)["flows"]
        fake = {
            "id": flow["id"],
            "ends": flow["ends"],
            "transport": "unix",
            "safe": [True, True],
            "epoch": flow["epoch"] + 5,
            "msgs": 10**12,
            "bytes": 10**15,
            "reason": "mine now",
        }

        def attacker() -> Any:
            as_uid()
            out = {}
            for what, fields in (
                ("report", {"flows": [fake]}),
                ("report-guess", {"flows": [{**fake, "token": "00" * 16}]}),
                ("reconfigure", {"flow": flow["id"], "transport": "unix"}),
                ("auto", {"flow": flow["id"], "transport": None}),
            ):
                op = "reconfigure" if what in ("reconfigure", "auto") else "report"
                try:
                    one_shot(op, path, **fields)
                    out[what] = "accepted"
                except fable.FableError as e:
                    out[what] = type(e).__name__
            return out

        out = run_as_child(attacker)
        after = {f["id"]: f for f in ask("flows", path)["flows"]}[flow["id"]]
        os.write(go_w, b"g")
        got, transport = cli.result()
        srv.result()
    finally:
        os.close(go_w)
        os.close(go_r)
        done()
    assert out == dict.fromkeys(out, "PermissionDenied"), out
    assert len(out) == 4
    assert (after["transport"], after["epoch"]) == (flow["transport"], flow["epoch"])
    assert after["msgs"] < 10**12 and after["reason"] == flow["reason"]
    assert got == b"after" and transport == flow["transport"]


def run_as_child(fn: Any) -> Any:
    return Child(fn).result(timeout=30)


# ------------------------------------------------------------------------------- visibility
def test_another_users_pids_placement_and_flows_stay_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a system daemon, root holds names and a flow whose report carries a canary string;
    uid UID does the same. Each sees the other's names (public), never the other's pid,
    placement, flow, token or canary, and may not ``explain`` the other's endpoints; root sees
    everything."""
    need_root()
    path, done = start_system_daemon(monkeypatch)

    def holder(tag: str) -> Any:
        """Register NAME-TAG-a/b and report a flow between them carrying canaries; returns
        what this uid sees then (as text) while the other uid's holder still runs."""
        s = raw_client(path)
        s.settimeout(10)
        s.sendall(HELLO)
        read_reply(s)
        flow = {
            "id": 10**8 + os.getuid(),
            "ends": [f"vis-{tag}-a", f"vis-{tag}-b"],
            "transport": "unix",
            "safe": [True, True],
            "token": f"TOKEN{tag}".ljust(32, "0"),
            "last_switch": {"at": 1.0, "from": "tcp", "to": "unix", "reason": f"CANARY{tag}"},
        }
        requests: list[dict[str, Any]] = [
            {"op": "register", "name": f"vis-{tag}-a", "affinity": [0]},
            {"op": "register", "name": f"vis-{tag}-b", "affinity": [0]},
            {"op": "report", "flows": [flow]},
        ]
        for i, f in enumerate(requests):
            s.sendall(frame({"v": PROTOCOL_VERSION, "id": i + 1, **f}))
            r = read_reply(s)
            assert r is not None and r["ok"], r
        return s

    r_go, w_go = os.pipe()
    r_seen, w_seen = os.pipe()

    def other() -> Any:
        as_uid()
        s = holder("user")
        os.write(w_seen, b"r")
        assert os.read(r_go, 1) == b"g"  # root's names and flow are there now
        seen = {op: json.dumps(one_shot(op, path)) for op in ("ls", "flows")}
        try:
            one_shot("explain", path, a="vis-root-a", b="vis-root-b")
            seen["explain"] = "answered"
        except fable.FableError as e:
            seen["explain"] = type(e).__name__
        s.close()
        return seen, os.getpid()

    try:
        kid = Child(other)
        assert os.read(r_seen, 1) == b"r"
        mine = holder("root")
        # root looks before the other uid does: it closes its names (and flow) once it has
        root_view = {op: json.dumps(one_shot(op, path)) for op in ("ls", "flows")}
        os.write(w_go, b"g")
        seen, kid_pid = kid.result()
        mine.close()
    finally:
        for fd in (r_go, w_go, r_seen, w_seen):
            os.close(fd)
        done()
    ls = json.loads(seen["ls"])["endpoints"]
    assert {e["name"] for e in ls} >= {"vis-root-a", "vis-root-b", "vis-user-a"}
    for e in ls:
        if e["name"].startswith("vis-root"):
            assert set(e) == {"name", "uid", "host", "listening"}, e
    flows = json.loads(seen["flows"])["flows"]
    assert [f["ends"] for f in flows] == [["vis-user-a", "vis-user-b"]]
    text = seen["ls"] + seen["flows"]
    for canary in ("CANARYroot", "TOKENroot", f'"pid": {os.getpid()}'):
        assert canary not in text, canary
    assert seen["explain"] == "PermissionDenied"
    everything = root_view["ls"] + root_view["flows"]
    assert "CANARYuser" in everything and "CANARYroot" in everything
    assert f'"pid": {kid_pid}' in everything
    assert "TOKEN" not in everything  # tokens are never shown, not even to root


# ---------------------------------------------------------------------------- per-uid limits
def test_per_uid_limits_bind_another_user_not_the_daemons(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FABLE_MAX_CONNS_PER_UID=3, FABLE_MAX_NAMES_PER_UID=4 on a system daemon (root's): uid
    UID's fourth connection gets a ``bye`` naming the limit, its fifth name
    ``PermissionDenied`` naming the other; root, the daemon's own uid, is bound only by the
    totals."""
    need_root()
    monkeypatch.setenv("FABLE_MAX_CONNS_PER_UID", "3")
    monkeypatch.setenv("FABLE_MAX_NAMES_PER_UID", "4")
    path, done = start_system_daemon(monkeypatch)

    def hello(s: socket.socket) -> dict[str, Any] | None:
        s.sendall(HELLO)
        return read_reply(s)

    def attacker() -> Any:
        as_uid()
        held = [raw_client(path) for _ in range(3)]
        assert all(hello(s)["ok"] for s in held)  # type: ignore[index]
        fourth = hello(raw_client(path))
        got = []
        for i in range(5):
            held[0].sendall(
                frame({"v": PROTOCOL_VERSION, "op": "register", "id": 9 + i, "name": f"q{i}"})
            )
            got.append(read_reply(held[0]))
        return fourth, got

    try:
        fourth, got = Child(attacker).result()
        root_conns = [raw_client(path) for _ in range(5)]
        assert all(hello(s)["ok"] for s in root_conns)  # type: ignore[index]
        for i in range(6):
            root_conns[0].sendall(
                frame({"v": PROTOCOL_VERSION, "op": "register", "id": 9 + i, "name": f"r{i}"})
            )
            r = read_reply(root_conns[0])
            assert r is not None and r["ok"], r
        for s in root_conns:
            s.close()
    finally:
        done()
    assert fourth is not None and fourth.get("op") == "bye", fourth
    assert fourth["error"] == "DaemonUnavailable"
    assert f"uid {UID} has 3 connections open, FABLE_MAX_CONNS_PER_UID" in fourth["message"]
    assert [r["ok"] for r in got] == [True] * 4 + [False]
    assert got[4]["error"] == "PermissionDenied"
    assert "FABLE_MAX_NAMES_PER_UID" in got[4]["message"]


# ---------------------------------------------------------------------------------- restarts
def test_another_user_cannot_take_a_name_or_a_flow_during_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Root's echo pair runs over a flow; the system daemon is killed and a new one started
    while root's two processes are stopped (SIGSTOP: they cannot register again yet). Uid UID
    then tries to register both end names and to report the flow with a guessed token: each
    ``PermissionDenied`` naming the reservation. Root's processes go on, get their names
    back, and the flow is theirs (same id, same transport) and still carries their messages.
    (Before, the names were free until root's processes came back, and the flow went to
    whoever held an end name when reporting it.)"""
    need_root()
    path, done = start_system_daemon(monkeypatch)
    go_r, go_w = os.pipe()
    second = None
    try:
        srv, cli = echo_pair(path, "kept", go_r)
        (flow,) = ask("flows", path)["flows"]
        time.sleep(0.5)  # the daemon saves what changed every 0.2 s
        for kid in (srv, cli):
            os.kill(kid.pid, signal.SIGSTOP)
        os.kill(ask("hello", path)["daemon"], signal.SIGKILL)
        wait_for(lambda: not daemon_answers(path))
        second = start_daemon(path, "--system")

        def attacker() -> Any:
            as_uid()
            out: dict[str, Any] = {}
            for name in ("kept-echo", "kept-client"):
                s = raw_client(path)
                s.sendall(HELLO)
                read_reply(s)
                s.sendall(frame({"v": PROTOCOL_VERSION, "op": "register", "id": 1, "name": name}))
                out[name] = read_reply(s)
                s.close()
            fake = {**flow, "token": "00" * 16, "safe": [True, True]}
            try:
                one_shot("report", path, flows=[fake])
                out["report"] = "accepted"
            except fable.FableError as e:
                out["report"] = f"{type(e).__name__}: {e}"
            return out

        out = Child(attacker).result(timeout=30)
        for kid in (srv, cli):
            os.kill(kid.pid, signal.SIGCONT)
        wait_for(lambda: {"kept-echo", "kept-client"} <= names(path), timeout=10)
        wait_for(lambda: [f["id"] for f in ask("flows", path)["flows"]] == [flow["id"]])
        (after,) = ask("flows", path)["flows"]
        os.write(go_w, b"g")
        got, _ = cli.result()
        srv.result()
    finally:
        os.close(go_w)
        os.close(go_r)
        if second is not None:
            stop(second)
        done()
    for name in ("kept-echo", "kept-client"):
        r = out[name]
        assert r is not None and r["error"] == "PermissionDenied", r
        assert "reserved for uid 0" in r["message"], r
    assert out["report"].startswith("PermissionDenied"), out["report"]
    assert "does not hold its token" in out["report"]
    assert after["transport"] == flow["transport"] and after["ends"] == flow["ends"]
    assert got == b"after"
