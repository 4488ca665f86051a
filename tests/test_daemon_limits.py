"""fabled's limits (issue 19): what keeps one misbehaving client from taking the daemon from
everyone. Connections in all (FABLE_MAX_CONNS), hello and half-frame timeouts
(FABLE_FRAME_TIMEOUT), idle connections (FABLE_IDLE_TIMEOUT), running out of fds (the accept loop
backs off and goes on), listings too big for one frame (paged: 10,000 names and flows), reports
too big for one frame (sent in parts), the daemon's rotated log. The per-uid limits need a
second uid: ``test_local_users.py``.

Each test starts its own daemon with the settings it needs (the daemon reads them at start).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import fable
from fable.cli import main
from fable.client import REPORT_BYTES, _report_frames, one_shot
from fable.errors import DaemonUnavailable
from fable.nameservice import CONTROL, PROTOCOL_VERSION
from helpers import (
    HELLO,
    Child,
    echo_pair,
    flood,
    frame,
    raw_client,
    read_reply,
    start_daemon,
    stop,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def _daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Any:
    """A daemon on this test's socket with ``env`` set, logging to ``tmp_path/fabled.log``."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fable.config.reload()
    return start_daemon(Path(os.environ["FABLE_SOCKET"]), "--log", str(tmp_path / "fabled.log"))


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the daemon hangs up ``s`` within ``seconds`` (replies before that are read)."""
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _hello(path: Path) -> socket.socket:
    s = raw_client(path)
    s.sendall(HELLO)
    reply = read_reply(s)
    assert reply is not None and reply["ok"], reply
    return s


def test_no_hello_or_half_a_frame_is_closed_and_nobody_else_notices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Slow loris: a client that says nothing, one that sends half a header, one that sends
    half a body: each closed within FABLE_FRAME_TIMEOUT (and the watchdog's quarter), while a
    bystander that sends whole frames is served throughout."""
    p = _daemon(monkeypatch, tmp_path, FABLE_FRAME_TIMEOUT="0.5")
    path = Path(os.environ["FABLE_SOCKET"])
    try:
        bystander = _hello(path)
        silent = raw_client(path)
        half_head = _hello(path)
        half_head.sendall(b"\x00\x00")
        half_body = _hello(path)
        body = frame({"v": PROTOCOL_VERSION, "op": "ls", "id": 1})
        half_body.sendall(body[:10])
        start = time.monotonic()
        for s in (silent, half_head, half_body):
            assert _closed_within(s, 3.0)
        assert time.monotonic() - start < 3.0
        bystander.sendall(frame({"v": PROTOCOL_VERSION, "op": "ls", "id": 2}))
        reply = read_reply(bystander)
        assert reply is not None and reply["ok"]
        for s in (bystander, silent, half_head, half_body):
            s.close()
    finally:
        stop(p)
    log = (tmp_path / "fabled.log").read_text()
    assert "no hello within 0.5 s (FABLE_FRAME_TIMEOUT)" in log
    assert log.count("a frame not finished within 0.5 s (FABLE_FRAME_TIMEOUT)") == 2


def test_an_idle_connection_is_closed_a_reporting_library_is_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """FABLE_IDLE_TIMEOUT=2: a client that said hello and then nothing is closed; a process
    using fable (its library reports every second) keeps its name."""
    p = _daemon(monkeypatch, tmp_path, FABLE_IDLE_TIMEOUT="2")
    path = Path(os.environ["FABLE_SOCKET"])
    r, w = os.pipe()
    try:

        def holder() -> None:
            fable.register("keeps-its-name")
            os.read(r, 1)

        kid = Child(holder)
        wait_for(lambda: "keeps-its-name" in _names(path))
        idle = _hello(path)
        assert _closed_within(idle, 4.0)
        idle.close()
        assert "keeps-its-name" in _names(path)
        os.write(w, b"x")
        kid.result()
    finally:
        os.close(r)
        os.close(w)
        stop(p)
    assert "nothing sent for 2 s (FABLE_IDLE_TIMEOUT)" in (tmp_path / "fabled.log").read_text()


def _names(path: Path) -> set[str]:
    return {e["name"] for e in (one_shot("ls", path) or {"endpoints": []})["endpoints"]}


def _flows(path: Path) -> list[dict[str, Any]]:
    return list((one_shot("flows", path) or {"flows": []})["flows"])


def _served(path: Path) -> bool:
    """Whether an ``ls`` is answered now; a refusal at the connection limit is a "not yet"."""
    try:
        return one_shot("ls", path) is not None
    except DaemonUnavailable as e:
        assert "FABLE_MAX_CONNS" in str(e), e
        return False


def test_the_total_connection_limit_refuses_clearly_then_recovers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """FABLE_MAX_CONNS=4: the fifth connection gets ``DaemonUnavailable`` naming the limit (a
    ``bye`` frame, then the daemon hangs up), and a line in the log; once one closes, the next
    is served."""
    p = _daemon(monkeypatch, tmp_path, FABLE_MAX_CONNS="4")
    path = Path(os.environ["FABLE_SOCKET"])
    held: list[socket.socket] = []
    try:
        held += [_hello(path) for _ in range(4)]
        for _ in range(3):  # (the bye may come before or after the hello is sent)
            with pytest.raises(DaemonUnavailable, match="serves 4 connections, FABLE_MAX_CONNS"):
                one_shot("ls", path)
        held.pop().close()
        wait_for(lambda: _served(path))  # (the daemon sees the hang-up when its loop next turns)
    finally:
        for s in held:
            s.close()
        stop(p)
    log = (tmp_path / "fabled.log").read_text()
    assert f"refused uid {os.getuid()} (pid {os.getpid()}): the daemon serves 4" in log


def test_out_of_fds_the_daemon_backs_off_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The daemon's fd limit cut to 64 while 120 clients connect: it cannot accept them all
    (EMFILE), logs it and goes on; a flow set up before keeps working throughout; once the
    clients are gone, a fresh ``ls`` answers within 1 s, and a new connection works."""
    p = _daemon(monkeypatch, tmp_path)
    path = Path(os.environ["FABLE_SOCKET"])
    go_r, go_w = os.pipe()
    pair: tuple[Child, ...] = ()
    try:
        srv, cli = pair = echo_pair(path, "fd", go_r)
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (64, 64))
        flooding = flood(path, 120)
        wait_for(lambda: "cannot accept clients" in (tmp_path / "fabled.log").read_text())
        os.write(go_w, b"g")
        assert cli.result()[0] == b"after"  # the data path never needs the daemon
        for s in flooding:
            s.close()
        start = time.monotonic()
        wait_for(lambda: one_shot("ls", path) is not None, timeout=5)
        took = time.monotonic() - start
        srv.result()
    finally:
        os.close(go_r)
        os.close(go_w)
        for kid in pair:
            kid.kill()  # (after a failure: they wait on our pipe)
        stop(p)
    assert took < 1.0, f"ls answered {took:.2f} s after the flood ended"
    assert "accepting clients again" in (tmp_path / "fabled.log").read_text()


def _pipeline(s: socket.socket, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ``frames`` on ``s`` in batches, reading the replies of each batch (the daemon
    closes a client that does not read); returns the replies."""
    replies = []
    for i in range(0, len(frames), 500):
        batch = frames[i : i + 500]
        s.sendall(b"".join(CONTROL.encode(f) for f in batch))
        for _ in batch:
            r = read_reply(s)
            assert r is not None
            replies.append(r)
    return replies


def test_ten_thousand_names_and_flows_are_listed_whole(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """10,000 names (one client, the daemon's own uid: no per-uid limit) and 10,000 flows
    (reported after a "restart", in parts): ``fable ls --json`` and ``fable flows --json`` list
    every one (the daemon pages them, 48 KiB a page); a final report that leaves flows out
    ends them."""
    p = _daemon(monkeypatch, tmp_path)
    path = Path(os.environ["FABLE_SOCKET"])
    try:
        s = _hello(path)
        s.settimeout(30)
        regs = [{"op": "register", "id": i + 1, "name": f"n{i:05d}"} for i in range(10_000)]
        assert all(r["ok"] for r in _pipeline(s, regs))
        flows = [
            {
                "id": 10**9 + i,
                "ends": ["n00000", f"n{i:05d}"],
                "transport": "unix",
                "safe": [True, True],
                "token": f"{i:032x}",
            }
            for i in range(10_000)
        ]
        parts = _report_frames(flows, [])
        assert len(parts) > 10 and all(f.get("more") for f in parts[:-1])
        assert all(len(CONTROL.encode(f)) < CONTROL.max_frame for f in parts)
        replies = _pipeline(s, [{**f, "id": 100_000 + k} for k, f in enumerate(parts)])
        assert all(r["ok"] for r in replies), replies[0]
        runner = CliRunner()
        out = runner.invoke(main, ["ls", "--json"])
        assert out.exit_code == 0, out.output
        assert sorted(e["name"] for e in json.loads(out.output)) == [f["name"] for f in regs]
        out = runner.invoke(main, ["flows", "--json"])
        assert out.exit_code == 0, out.output
        assert sorted(f["id"] for f in json.loads(out.output)) == [f["id"] for f in flows]
        # one whole report of one flow: the client has that flow and no other
        (r,) = _pipeline(s, [{"op": "report", "id": 7, "flows": flows[:1]}])
        assert r["ok"], r
        assert [f["id"] for f in _flows(path)] == [flows[0]["id"]]
        s.close()
    finally:
        stop(p)


def test_report_parts_fit_a_frame_and_hold_everything_once() -> None:
    """A process with many flows and names sends its report in parts, each under the frame
    limit (before, one frame over 64 KiB killed its control thread)."""
    flows = [{"id": i, "reason": "r" * 400} for i in range(500)]
    eps = [{"name": f"e{i}", "affinity": list(range(4096))} for i in range(3)]
    parts = _report_frames(flows, eps)
    assert all(len(CONTROL.encode({**f, "id": 1})) <= CONTROL.max_frame for f in parts)
    assert [f["id"] for p in parts for f in p["flows"]] == list(range(500))
    assert [e["name"] for p in parts for e in p["endpoints"]] == ["e0", "e1", "e2"]
    assert [bool(p.get("more")) for p in parts] == [True] * (len(parts) - 1) + [False]
    assert _report_frames([], []) == [{"op": "report", "flows": [], "endpoints": []}]
    assert CONTROL.max_frame // 2 > REPORT_BYTES


def test_the_daemon_log_rotates(tmp_path: Path) -> None:
    """``--log FILE``: a RotatingFileHandler, 1 MiB a file, 3 kept."""
    from fable.daemon.server import LOG_BACKUPS, LOG_BYTES, setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("fable.daemon").level
    try:
        setup_logging(tmp_path / "fabled.log")
        log = logging.getLogger("fable.daemon")
        for i in range(5 * LOG_BYTES // 100):
            log.info("line %d %s", i, "x" * 80)
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("fable.daemon").setLevel(saved[2])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fabled.log"] + [f"fabled.log.{k}" for k in range(1, LOG_BACKUPS + 1)]
    assert all((tmp_path / f).stat().st_size <= LOG_BYTES for f in files)


@pytest.mark.parametrize("token", ["\u00e9t\u00e9", "\ud800", "", "x" * 10_000])
def test_a_token_of_any_string_is_refused_not_a_crash(token: str) -> None:
    """A report's token is any JSON string: one with non-ASCII characters (or a lone
    surrogate) is a wrong token, ``PermissionDenied``, not a ``TypeError`` out of
    ``hmac.compare_digest`` (found by the protocol fuzz run); also for a flow saved by the
    daemon before a restart (its token hashed)."""
    from fable.daemon.registry import Endpoint, Registry
    from fable.errors import PermissionDenied

    reg = Registry()
    reg.register(Endpoint("a", 1, 1000, "h", client=1))
    flow = reg.new_flow(("a", "b"), "unix", (True, True), "r", {1}, {1000})
    report = {"id": flow.id, "ends": ["a", "b"], "transport": "unix", "safe": [True, True]}
    report.update(msgs=0, bytes=0, epoch=0, role=0, reason="", last_switch=None, token=token)
    with pytest.raises(PermissionDenied, match="does not hold its token"):
        reg.report(1, 1000, [report], 0.0, set())
    after = Registry()
    after.reserve(reg.snapshot(), time.monotonic() + 10)
    with pytest.raises(PermissionDenied, match="does not hold its token"):
        after.report(1, 1000, [report], 0.0, set())
    report["token"] = flow.token
    (adopted, _), *_ = after.report(1, 1000, [report], 0.0, set())
    assert adopted.owners == {1000} and not adopted.adopted


def test_a_bye_before_the_hello_is_still_heard() -> None:
    """The daemon may send its ``bye`` and hang up before the client's hello goes out (the
    send then fails with EPIPE): the client reads the bye anyway and raises what it names,
    not ``BrokenPipeError`` (seen once in CI)."""
    from fable.client import _call

    ours, daemons = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bye = {"op": "bye", "error": "DaemonUnavailable", "message": "a limit, FABLE_MAX_CONNS"}
    daemons.sendall(CONTROL.encode(bye))
    daemons.close()
    try:
        with pytest.raises(DaemonUnavailable, match="refused us: a limit, FABLE_MAX_CONNS"):
            _call(ours, 1, {"op": "hello"})
    finally:
        ours.close()


def test_a_client_cannot_pile_up_waiting_connects(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each connect that waits for a listener is a task in the daemon: one client may have
    MAX_CONNECTING of them; the next is refused at once (``PermissionDenied``), and once the
    client goes, so do its waits."""
    from fable.daemon.server import MAX_CONNECTING

    p = _daemon(monkeypatch, tmp_path)
    path = Path(os.environ["FABLE_SOCKET"])
    try:
        s = _hello(path)
        v = PROTOCOL_VERSION
        s.sendall(frame({"v": v, "op": "register", "id": 1, "name": "never-listens"}))
        assert read_reply(s)["ok"]  # type: ignore[index]
        waits = [
            {"v": v, "op": "connect", "id": 2 + k, "name": "never-listens", "to": "never-listens"}
            for k in range(MAX_CONNECTING + 1)
        ]
        s.sendall(b"".join(frame(w) for w in waits))
        r = read_reply(s)
        assert r is not None and r["id"] == MAX_CONNECTING + 2, r
        assert r["error"] == "PermissionDenied" and f"{MAX_CONNECTING} connects" in r["message"]
        s.close()
        wait_for(lambda: not any(e["waiting"] for e in one_shot("ls", path)["endpoints"]))  # type: ignore[index]
    finally:
        stop(p)
