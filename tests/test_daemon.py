"""The name service: rendezvous, names, ownership, dead endpoints, racing auto-start, restart
under live traffic, protocol fuzzing. Every client runs in a forked child (each process has one
daemon link); the daemon is a real ``python -m fable.daemon`` on a private socket."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fable
from fable.cli import main
from fable.client import one_shot
from fable.nameservice import check_name
from helpers import (
    HELLO,
    UID,
    Child,
    ask,
    daemon_answers,
    frame,
    names,
    raw_client,
    read_reply,
    run,
    start_daemon,
    start_system_daemon,
    stop,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def echo_server(name: str, count: int = 1) -> Callable[[], Any]:
    def serve() -> Any:
        ctx = fable.register(name)
        lst = ctx.listen()
        for _ in range(count):
            c = lst.accept(timeout=30)
            for m in c:
                c.send(m.upper())
        return "done"

    return serve


# ------------------------------------------------------------------------------- rendezvous
def test_two_processes_find_each_other_by_name(daemon: Path) -> None:
    srv = Child(echo_server("bob"))
    wait_for(lambda: "bob" in names(daemon))

    def client() -> Any:
        ctx = fable.register("alice")
        conn = ctx.connect("xio://bob", timeout=10)
        flows_seen = one_shot("flows", daemon)
        for i in range(2000):
            conn.send(b"hi %d" % i)
            assert conn.recv() == b"HI %d" % i
        time.sleep(2.2)  # two counter reports
        flows_later = one_shot("flows", daemon)
        conn.close()
        return conn.transport, flows_seen, flows_later

    transport, seen, later = run(client)
    assert srv.result() == "done"
    # the flow is listed before connect returns, then its counters move
    (f,) = seen["flows"]
    assert f["ends"] == ["alice", "bob"] and f["transport"] == transport
    assert f["safe"] == [True, True] and f["epoch"] == 0
    assert f["reason"].startswith(f"{transport}: score") and "may share a core" in f["reason"]
    (g,) = later["flows"]
    assert g["id"] == f["id"] and g["msgs"] == 4000 and g["bytes"] > 4000 * 4


def test_fable_ls_and_flows_json(daemon: Path) -> None:
    srv = Child(echo_server("svc"))
    wait_for(lambda: "svc" in names(daemon))

    def client() -> Any:
        conn = fable.register("cli").connect("svc", timeout=10)
        conn.send(b"x")
        conn.recv()
        # both ends reported the message (each end reports its counters to the daemon)
        wait_for(lambda: [f["msgs"] for f in ask("flows", daemon)["flows"]] == [2], 10.0)
        r1 = CliRunner().invoke(main, ["ls", "--json"])
        r2 = CliRunner().invoke(main, ["flows", "--json"])
        r3 = CliRunner().invoke(main, ["flows"])
        conn.close()
        return r1.output, r2.output, r3.output

    ls_out, flows_out, text = run(client)
    srv.result()
    eps = {e["name"]: e for e in json.loads(ls_out)}
    assert eps["svc"]["listening"] is True and eps["cli"]["listening"] is False
    assert eps["svc"]["uid"] == os.getuid() and eps["svc"]["affinity"]
    (flow,) = json.loads(flows_out)
    for key in (
        "id",
        "ends",
        "transport",
        "safe",
        "epoch",
        "msgs",
        "bytes",
        "reason",
        "last_switch",
    ):
        assert key in flow
    assert flow["msgs"] == 2 and flow["last_switch"] is None
    assert "cli <-> svc" in text and "why:" in text


def test_trusted_on_both_sides_reads_in_place(daemon: Path) -> None:
    def server() -> Any:
        c = fable.register("t-srv").listen(trusted=True).accept(timeout=30)
        return c.safe, c.recv()  # c holds the connection while recv runs

    srv = Child(server)
    wait_for(lambda: "t-srv" in names(daemon))

    def client() -> Any:
        c = fable.register("t-cli").connect("t-srv", trusted=True, timeout=10)
        assert isinstance(c, fable.Connection)
        c.send(b"zero copy")
        c.close()
        return c.safe

    assert run(client) is False
    assert srv.result() == (False, b"zero copy")


def test_several_names_per_process_and_forced_transport(daemon: Path) -> None:
    def both() -> Any:
        a, b = fable.register("one"), fable.register("two")
        lst = b.listen()
        out = []
        for transport in ("unix", "shmem-pipe", "pipe"):
            c = a.connect("two", transport=transport, timeout=10)
            s = lst.accept(timeout=10)
            c.send(transport.encode())
            out.append((c.transport, s.transport, s.recv()))
        return out

    for sent, got, data in run(both):
        assert sent == got == data.decode()


def test_both_ends_know_whether_the_application_named_the_transport(daemon: Path) -> None:
    """A transport named in connect() is the application's (fileno() will not move it off a
    spinning one); one the policy picked is the library's, on both ends."""

    def both() -> Any:
        a, b = fable.register("one"), fable.register("two")
        lst = b.listen()
        out = []
        for transport in ("unix", None):
            c = a.connect("two", transport=transport, timeout=10)
            s = lst.accept(timeout=10)
            assert isinstance(c, fable.Connection)
            out.append((c._forced, s._forced))
        return out

    assert run(both) == [(True, True), (False, False)]


# ------------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "bad", ["", "/x", "x/", "-x", "a b", "é", "x" * 65, "a/" * 130 + "a", ".hidden", 5]
)
def test_invalid_names(bad: Any) -> None:
    with pytest.raises(fable.InvalidName):
        check_name(bad)


def test_valid_names() -> None:
    assert check_name("xio://svc/db.primary_1-a") == "svc/db.primary_1-a"
    assert check_name("a" * 64) == "a" * 64


def test_name_errors(daemon: Path) -> None:
    def scenario() -> Any:
        out = {}
        ctx = fable.register("taken")
        for what, call in (
            ("invalid", lambda: fable.register("bad name")),
            ("in use", lambda: fable.register("taken")),
            ("unknown", lambda: ctx.connect("nobody", timeout=1)),
            ("not listening", lambda: ctx.connect("taken", timeout=0.3)),
        ):
            try:
                call()
                out[what] = "no error"
            except fable.FableError as e:
                out[what] = type(e).__name__
        ctx.close()
        fable.register("taken").close()  # free again once closed
        return out

    assert run(scenario) == {
        "invalid": "InvalidName",
        "in use": "NameInUse",
        "unknown": "NameNotFound",
        "not listening": "Timeout",
    }


def test_connect_waits_for_a_late_listener(daemon: Path) -> None:
    def late() -> Any:
        ctx = fable.register("late")
        time.sleep(0.5)
        conn = ctx.listen().accept(timeout=10)
        return conn.recv()

    srv = Child(late)
    wait_for(lambda: "late" in names(daemon))

    def client() -> Any:
        t0 = time.monotonic()
        c = fable.register("early").connect("late", timeout=10)
        c.send(b"waited")
        c.close()
        return time.monotonic() - t0

    assert 0.3 < run(client) < 5
    assert srv.result() == b"waited"


def test_dead_process_loses_its_names_within_a_second(daemon: Path) -> None:
    def holder() -> Any:
        fable.register("doomed").listen()
        time.sleep(3600)

    c = Child(holder)
    wait_for(lambda: "doomed" in names(daemon))
    t0 = time.monotonic()
    os.kill(c.pid, signal.SIGKILL)
    os.waitpid(c.pid, 0)
    wait_for(lambda: "doomed" not in names(daemon), timeout=1.0)
    assert time.monotonic() - t0 < 1.0


# ------------------------------------------------------------------------------- auto-start
def test_racing_clients_start_one_daemon() -> None:
    path = Path(os.environ["FABLE_SOCKET"])
    assert not daemon_answers(path)

    def racer(name: str) -> Callable[[], Any]:
        def go() -> Any:
            fable.register(name)
            from fable.client import link

            return link().hello["daemon"]

        return go

    kids = [Child(racer(f"racer{i}")) for i in range(4)]
    pids = {k.result() for k in kids}
    assert len(pids) == 1
    (pid,) = pids
    assert psutil.pid_exists(pid)
    r = CliRunner().invoke(main, ["daemon", "--stop"])
    assert r.exit_code == 0, r.output
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")


# ---------------------------------------------------------------------------------- restart
def test_daemon_restart_under_live_traffic() -> None:
    path = Path(os.environ["FABLE_SOCKET"])
    first = start_daemon(path)

    def server() -> Any:
        ctx = fable.register("survivor")
        lst = ctx.listen()
        c = lst.accept(timeout=30)
        got = 0
        for m in c:
            assert m == b"%d" % got
            got += 1
            c.send(m)
        # a pending accept survives the restart: this connection is made after it
        c2 = lst.accept(timeout=30)
        return got, c2.recv()

    srv = Child(server)
    wait_for(lambda: "survivor" in names(path))

    def client() -> Any:
        ctx = fable.register("streamer")
        c = ctx.connect("survivor", timeout=10)
        sent = 0
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:  # traffic before the crash
            c.send(b"%d" % sent)
            assert c.recv() == b"%d" % sent
            sent += 1
        os.kill(first.pid, signal.SIGKILL)  # the daemon dies under live traffic
        wait_for(lambda: not daemon_answers(path))
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:  # the connection does not notice
            c.send(b"%d" % sent)
            assert c.recv() == b"%d" % sent
            sent += 1
        # the next call that needs a daemon starts one; names and flows come back
        c2 = fable.register("newcomer").connect("survivor", timeout=10)
        c2.send(b"after restart")
        c2.close()

        def reported() -> bool:  # the new daemon knows every name and the whole flow again
            flows = ask("flows", path)["flows"]
            return {"survivor", "streamer", "newcomer"} <= names(path) and any(
                f["ends"] == ["streamer", "survivor"] and f["msgs"] >= 2 * sent for f in flows
            )

        wait_for(reported, 10.0)
        eps = names(path)
        flows = ask("flows", path)["flows"]
        c.close()
        return sent, eps, flows

    sent, eps, flows = run(client)
    first.wait()
    got, late = srv.result()
    assert got == sent and late == b"after restart"
    assert {"survivor", "streamer", "newcomer"} <= eps
    assert any(f["ends"] == ["streamer", "survivor"] and f["msgs"] >= 2 * sent for f in flows)
    one_shot("stop", path)


def test_a_request_in_flight_when_the_daemon_dies_raises_daemon_unavailable() -> None:
    path = Path(os.environ["FABLE_SOCKET"])
    d = start_daemon(path)

    def waiter() -> Any:
        ctx = fable.register("impatient")
        try:
            ctx.connect("not-listening", timeout=60)  # waits in the daemon for it to listen
            return "connected"
        except fable.DaemonUnavailable as e:
            return f"DaemonUnavailable: {e}"

    def waited_for() -> int:
        return sum(
            e["waiting"] for e in ask("ls", path)["endpoints"] if e["name"] == "not-listening"
        )

    def registered_not_listening() -> None:
        fable.register("not-listening")
        time.sleep(60)

    late = Child(registered_not_listening)
    w: Child | None = None
    try:
        wait_for(lambda: "not-listening" in names(path))  # else the connect fails at once
        w = Child(waiter)
        wait_for(lambda: waited_for() == 1)  # the connect is in flight in the daemon
        d.kill()  # SIGKILL, with the connect waiting in it
        d.wait()
        assert w.result().startswith("DaemonUnavailable")
    finally:
        if d.poll() is None:
            d.kill()
            d.wait()
        late.kill()
        if w is not None:
            w.kill()
        if daemon_answers(path):  # a control thread started a new daemon: stop it
            one_shot("stop", path)


def test_a_daemon_stopped_on_purpose_stays_stopped_until_the_application_registers() -> None:
    """``fable daemon --stop``: a pending accept raises ``DaemonUnavailable`` at once; the
    process's control thread does not start a daemon again (it did, within 0.5 s), and other
    requests raise; the application's next ``register`` starts one."""
    path = Path(os.environ["FABLE_SOCKET"])
    d = start_daemon(path)
    to_kid, from_parent = os.pipe()
    from_kid, to_parent = os.pipe()

    def app() -> Any:
        lst = fable.register("stays-down").listen()
        os.write(to_parent, b"l")
        try:
            lst.accept(timeout=30)
            accepted = "accepted"
        except fable.DaemonUnavailable as e:
            accepted = f"DaemonUnavailable: {e}"
        os.write(to_parent, b"a")
        assert os.read(to_kid, 1) == b"g"
        try:
            fable.client.link().request("ls", wait=1)
            other = "answered"
        except fable.DaemonUnavailable as e:
            other = f"DaemonUnavailable: {e}"
        fable.register("back-again")
        return accepted, other, sorted(names(path))

    kid = Child(app)
    try:
        assert os.read(from_kid, 1) == b"l"
        wait_for(lambda: "stays-down" in names(path))
        r = CliRunner().invoke(main, ["daemon", "--stop"])
        assert r.exit_code == 0, r.output
        assert d.wait(10) == 0
        assert os.read(from_kid, 1) == b"a"
        time.sleep(1.5)  # (the control thread used to start one again within 0.5 s)
        stayed_down = not daemon_answers(path)
        os.write(from_parent, b"g")
        accepted, other, after = kid.result()
    finally:
        for fd in (to_kid, from_parent, from_kid, to_parent):
            os.close(fd)
        if daemon_answers(path):
            one_shot("stop", path)
            wait_for(lambda: not daemon_answers(path))
    assert stayed_down
    assert accepted.startswith("DaemonUnavailable: 'stays-down': the daemon was stopped on")
    assert "fable daemon --stop by uid" in accepted
    assert other.startswith("DaemonUnavailable: the daemon was stopped on purpose"), other
    assert after == ["back-again"]  # a name of before is not registered behind the app's back


def test_a_failure_in_the_control_thread_surfaces_and_the_link_starts_over() -> None:
    """A bug in the daemon link's work on the control thread (here: reading a reply raises
    KeyError once) is logged and raised as ``DaemonUnavailable`` by the application's next
    call; the link starts over, the names come back, and the call after that works (before,
    the link stopped being served and every later call hung until its timeout)."""
    path = Path(os.environ["FABLE_SOCKET"])
    d = start_daemon(path)

    def app() -> Any:
        from fable.client import DaemonLink

        lk = fable.client.link()
        fable.register("survives-a-bug")
        real = DaemonLink._dispatch
        calls = []

        def broken(self: DaemonLink, msg: dict[str, Any], fds: list[int]) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise KeyError("a bug")
            real(self, msg, fds)

        DaemonLink._dispatch = broken  # type: ignore[method-assign]
        try:
            lk.request("ls", wait=5)
            first = "answered"
        except fable.DaemonUnavailable as e:
            first = f"DaemonUnavailable: {e}"
        wait_for(lambda: "survives-a-bug" in names(path))
        reply, _ = lk.request("ls", wait=5)
        return first, [e["name"] for e in reply["endpoints"]]

    try:
        first, after = run(app)
    finally:
        stop(d)
    assert first.startswith("DaemonUnavailable") and "KeyError" in first, first
    assert after == ["survives-a-bug"]


def test_a_process_with_hundreds_of_flows_reports_them_all() -> None:
    """600 flows in one process: its report is over one frame's 64 KiB, so it goes in parts
    (before, encoding it raised in the control thread, which then stopped serving the link)."""
    path = Path(os.environ["FABLE_SOCKET"])
    d = start_daemon(path)

    class Stats:
        transport, safe, epoch, msgs_sent, bytes_sent = "unix", True, 0, 1, 64

    class Fake:  # what the report reads of a Connection
        closed, last_switch, polled = False, None, False

        def stats(self) -> Stats:
            return Stats()

    def app() -> int:
        lk = fable.client.link()
        fable.register("many-flows")
        fakes = [Fake() for _ in range(600)]
        for i, conn in enumerate(fakes):
            flow = {"id": 5 * 10**8 + i, "ends": ["many-flows", f"peer{i}"], "safe": [True, True]}
            lk.add_flow(flow, 0, conn, f"{i:032x}")  # type: ignore[arg-type]
        wait_for(lambda: len(ask("flows", path)["flows"]) == 600, timeout=10)
        reply, _ = lk.request("ls", wait=5)  # the link still answers
        return len(fakes) + len(reply["endpoints"])

    try:
        assert run(app) == 601
    finally:
        stop(d)


# --------------------------------------------------------------------------- socket choice
@pytest.fixture
def no_fable_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """FABLE_SOCKET unset, XDG_RUNTIME_DIR a fresh directory, and the system socket moved
    where this test controls it (none answers there unless the test starts one)."""
    import fable.client

    monkeypatch.delenv("FABLE_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir(mode=0o700)
    monkeypatch.setattr(fable.client, "SYSTEM_SOCKET", tmp_path / "sys" / "fabled.sock")
    fable.config.reload()
    return tmp_path


def test_the_per_user_socket_is_chosen_and_started(no_fable_socket: Path) -> None:
    from fable.client import socket_path

    mine = no_fable_socket / "xdg" / "fable" / "fabled.sock"
    assert socket_path() == (mine, True)  # nobody answers: ours, and we may start it

    def chooser() -> Any:
        fable.register("chooser")  # starts the per-user daemon there
        return names(mine)

    try:
        assert "chooser" in run(chooser)
        assert socket_path() == (mine, False)
        assert oct((mine.parent).stat().st_mode & 0o777) == "0o700"
    finally:
        if daemon_answers(mine):
            one_shot("stop", mine)


def test_without_xdg_the_socket_is_under_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    from fable.nameservice import user_socket

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert user_socket() == Path(f"/tmp/fable-{os.getuid()}/fabled.sock")


def test_the_system_socket_is_used_when_only_it_answers(no_fable_socket: Path) -> None:
    import fable.client

    system: Path = vars(fable.client)["SYSTEM_SOCKET"]  # moved by the fixture
    p = start_daemon(system, "--system")
    try:
        assert fable.client.socket_path() == (system, False)
    finally:
        stop(p)


@pytest.mark.parametrize("flaw", ["group-writable", "another-uid", "a-file"])
def test_a_socket_directory_that_is_not_ours_and_private_is_refused(
    no_fable_socket: Path, flaw: str
) -> None:
    assert os.geteuid() == 0, "this test needs root (chown to a second uid)"
    d = no_fable_socket / "xdg" / "fable"
    if flaw == "a-file":
        d.write_text("not a directory")
    else:
        d.mkdir(mode=0o700)
        if flaw == "group-writable":
            os.chmod(d, 0o770)
        else:
            os.chown(d, UID, UID)

    def careful() -> Any:
        try:
            fable.register("careful")
            return "registered"
        except fable.FableError as e:
            return str(e)

    t0 = time.monotonic()
    why = run(careful)
    assert time.monotonic() - t0 < 5.0, "a directory that cannot be fixed by waiting: no wait"
    assert re.search(r"must be a directory owned by uid \d+ with mode 0700|cannot use", why), why
    assert not (d / "fabled.sock").exists()


# ---------------------------------------------------------------------------- second user


def test_names_belong_to_their_uid_system_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.geteuid() == 0, "this test needs root (setresuid to a second uid)"
    path, done = start_system_daemon(monkeypatch)
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o666"

        def owner() -> Any:
            ctx = fable.register("root-svc")
            closed = fable.register("root-closed").listen()
            lst = ctx.listen(allow_uids=[UID])
            c = lst.accept(timeout=30)
            msg = c.recv()
            del closed
            return msg

        srv = Child(owner)
        wait_for(lambda: {"root-svc", "root-closed"} <= names(path))
        time.sleep(0.2)

        def other_user() -> Any:
            os.setresgid(UID, UID, UID)
            os.setresuid(UID, UID, UID)
            out: dict[str, Any] = {}
            ctx = fable.register("user-svc")
            mine = ctx.listen()  # no allow_uids: only this uid, and root
            out["uid"] = {e["name"]: e["uid"] for e in ask("ls", path)["endpoints"]}
            for what, call in (
                ("take", lambda: fable.register("root-svc")),
                ("connect-denied", lambda: ctx.connect("root-closed", timeout=2)),
            ):
                try:
                    call()
                    out[what] = "no error"
                except fable.FableError as e:
                    out[what] = type(e).__name__
            c = ctx.connect("root-svc", timeout=5)  # allowed by allow_uids
            c.send(b"from uid %d" % os.getuid())
            c.close()
            visitor = mine.accept(timeout=20)  # root may connect to anyone
            out["visitor"] = visitor.recv()
            return out

        user = Child(other_user)
        assert srv.result() == b"from uid %d" % UID

        def root_connects_anywhere() -> Any:
            try:
                fable.register("user-svc")  # root may connect to it, not take it
                return "root took the other user's name"
            except fable.PermissionDenied:
                pass
            c = fable.register("nosy").connect("user-svc", timeout=5)
            c.send(b"root was here")
            c.close()
            return "ok"

        assert run(root_connects_anywhere) == "ok"
        out = user.result()
        assert out["uid"]["user-svc"] == UID and out["uid"]["root-svc"] == 0
        assert out["take"] == "PermissionDenied"
        assert out["connect-denied"] == "PermissionDenied"
        assert out["visitor"] == b"root was here"

        def stop_as_other() -> Any:
            os.setresuid(UID, UID, UID)
            try:
                one_shot("stop", path)
            except fable.PermissionDenied:
                return "denied"
            return "stopped"

        assert run(stop_as_other) == "denied"
    finally:
        done()


# ----------------------------------------------------------------------------------- fuzzing


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (struct.pack(">I", 1 << 30), "closed"),  # oversized
        (struct.pack(">I", 5) + b"{nope", "closed"),  # not JSON
        (frame({"v": 99, "op": "hello", "id": 1}), "closed"),  # wrong version
        (frame({"v": 1, "op": "ls", "id": 1}), "closed"),  # no hello first
        (frame([1, 2]), "closed"),  # not an object
        (HELLO + frame({"v": 1, "op": "explode", "id": 1}), "ProtocolError"),
        (HELLO + frame({"v": 1, "op": ["port_listen"], "id": 1}), "ProtocolError"),
        (HELLO + frame({"v": 1, "op": {"a": 1}, "id": 1}), "ProtocolError"),
        (HELLO + frame({"v": 1, "op": "port_listen", "id": 1}), "ProtocolError"),  # no fd
        (HELLO + frame({"v": 1, "op": "port_resolve", "id": 1, "lookup": 5}), "ProtocolError"),
        (HELLO + frame({"v": 1, "op": "register", "id": 1, "name": 7}), "ProtocolError"),
        (HELLO + frame({"v": 1, "op": "register", "id": 1, "name": "a b"}), "InvalidName"),
        (HELLO + frame({"v": 1, "op": "listen", "id": 1, "name": "x"}), "NameNotFound"),
        (
            HELLO + frame({"v": 1, "op": "register", "id": 1, "name": "x", "affinity": "all"}),
            "ProtocolError",
        ),
        (
            HELLO + frame({"v": 1, "op": "report", "id": 1, "flows": [{"id": "x"}]}),
            "ProtocolError",
        ),
        (
            HELLO + frame({"v": 1, "op": "connect", "id": 1, "name": "x", "to": "y"}),
            "NameNotFound",
        ),
        (HELLO + struct.pack(">I", 100) + b"{", "closed"),  # truncated, then hang-up
    ],
)
def test_malformed_requests_do_not_hurt_others(daemon: Path, data: bytes, expect: str) -> None:
    bystander = raw_client(daemon)
    bystander.sendall(HELLO)
    assert read_reply(bystander) is not None
    s = raw_client(daemon)
    s.sendall(data)
    if data.endswith(b"{") and expect == "closed":
        s.shutdown(socket.SHUT_WR)
    replies = []
    while (r := read_reply(s)) is not None:
        replies.append(r)
        if r.get("id") == 1:
            break
    if expect == "closed":
        assert not any(r.get("ok") and r.get("id") == 1 for r in replies)
        assert s.recv(1) == b""  # the daemon hung up
    else:
        assert replies[-1]["ok"] is False and replies[-1]["error"] == expect, replies
    s.close()
    bystander.sendall(frame({"v": 1, "op": "ls", "id": 5}))
    assert read_reply(bystander)["ok"] is True  # type: ignore[index]
    bystander.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.binary(max_size=300), after_hello=st.booleans())
def test_fuzzed_bytes_never_stop_the_daemon(daemon: Path, junk: bytes, after_hello: bool) -> None:
    s = raw_client(daemon)
    try:
        s.sendall((HELLO if after_hello else b"") + junk)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
    except OSError:
        pass
    finally:
        s.close()
    assert one_shot("ls", daemon) is not None


# ------------------------------------------------------------------------------ plain peers
def test_plain_tcp_and_unix_peers(tmp_path: Path) -> None:
    import threading

    def echo_once(srv: socket.socket) -> None:
        c, _ = srv.accept()
        with c:
            while data := c.recv(4096):
                c.sendall(data[::-1])

    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "plain.sock"))
    unix.listen()
    threads = [threading.Thread(target=echo_once, args=(s,)) for s in (tcp, unix)]
    for t in threads:
        t.start()

    def client() -> Any:
        ctx = fable.register("plain-client")
        out = []
        for url in (f"tcp://127.0.0.1:{tcp.getsockname()[1]}", f"unix://{tmp_path}/plain.sock"):
            s = ctx.connect(url, timeout=5)
            assert isinstance(s, fable.PlainStream)
            s.send(b"stream")
            out.append(s.recv())
            s.close()
        for bad in ("tcp://nohost", "unix://relative", "tcp://127.0.0.1:1"):
            try:
                ctx.connect(bad, timeout=2)
                out.append(b"no error")
            except (ValueError, fable.FableError) as e:
                out.append(type(e).__name__.encode())
        return out

    try:
        assert run(client) == [
            b"maerts",
            b"maerts",
            b"ValueError",
            b"ValueError",
            b"ConnectionClosed",
        ]
    finally:
        for t in threads:
            t.join(5)
        tcp.close()
        unix.close()


def test_endpoint_placement_is_reported(daemon: Path) -> None:
    """The daemon learns the I/O thread's affinity and CPU (for the policy and triggers)."""
    cpus = sorted(os.sched_getaffinity(0))

    def pinned() -> Any:
        fable.register("placed")
        os.sched_setaffinity(0, {cpus[-1]})  # moved after registering
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            (ep,) = [e for e in ask("ls", daemon)["endpoints"] if e["name"] == "placed"]
            if ep["affinity"] == [cpus[-1]]:
                return ep
            time.sleep(0.1)
        return ep

    ep = run(pinned)
    assert ep["affinity"] == [cpus[-1]] and ep["cpu"] == cpus[-1]
    assert ep["pid"] != os.getpid() and ep["node"] in (-1, 0)


def test_connector_dying_while_waiting_leaves_no_flow(daemon: Path) -> None:
    def late() -> Any:
        ctx = fable.register("not-yet")  # registered, not listening: connects wait
        time.sleep(2.0)
        lst = ctx.listen()
        try:
            lst.accept(timeout=1.5)
            return "accepted a dead connection"
        except fable.Timeout:
            return "timeout"

    srv = Child(late)
    wait_for(lambda: "not-yet" in names(daemon))

    def waiter() -> Any:
        fable.register("impatient").connect("not-yet", timeout=60)

    w = Child(waiter)
    wait_for(  # its connect is waiting in the daemon
        lambda: (
            [e["waiting"] for e in ask("ls", daemon)["endpoints"] if e["name"] == "not-yet"] == [1]
        )
    )
    w.kill()
    assert srv.result() == "timeout"
    assert ask("flows", daemon)["flows"] == []


def test_fable_reconfigure_switches_a_live_flow(daemon: Path) -> None:
    srv = Child(echo_server("switchee"))
    wait_for(lambda: "switchee" in names(daemon))

    def client() -> Any:
        c = fable.register("switcher").connect("switchee", timeout=10)
        assert isinstance(c, fable.Connection)
        first = c.transport
        (flow,) = ask("flows", daemon)["flows"]
        target = "unix" if first != "unix" else "pipe"
        out: dict[str, Any] = {}

        def operator() -> None:
            r = CliRunner().invoke(main, ["reconfigure", str(flow["id"]), target])
            out["cli"] = (r.exit_code, r.output)

        import threading

        t = threading.Thread(target=operator)
        t.start()
        i = 0
        while t.is_alive() and i < 200_000:  # traffic goes on while the operator switches
            c.send(b"%d" % i)
            assert c.recv(timeout=10) == b"%d" % i
            i += 1
        t.join()
        wait_for(lambda: ask("flows", daemon)["flows"][0]["epoch"] == 1, 10.0)
        (after,) = ask("flows", daemon)["flows"]
        c.close()
        return first, target, c.transport, out["cli"], after

    first, target, now, (code, output), after = run(client)
    srv.result()
    assert code == 0 and f"{target} (epoch 1)" in output, output
    assert now == target and after["transport"] == target and after["epoch"] == 1
    last = after["last_switch"]
    assert last["from"] == first and last["to"] == target and "operator" in last["reason"]
