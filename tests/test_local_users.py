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

import os
import select
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import fable
from fable.client import link, one_shot
from fable.nameservice import UntrustedDaemon
from helpers import UID, Child, ask, fork, names, start_system_daemon, wait_for

pytestmark = pytest.mark.timeout(60)

FAKE_S = 4.0  # how long the fake daemon serves


def _root() -> None:
    assert os.geteuid() == 0, "this test needs root (setresuid to a second uid)"


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
    _root()
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
    _root()
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
    _root()
    path, done = start_system_daemon(monkeypatch)
    go_r, go_w = os.pipe()
    try:

        def echo() -> None:
            c = fable.register("root-echo").listen().accept(timeout=30)
            for m in c:
                c.send(m)

        srv = Child(echo)
        wait_for(lambda: "root-echo" in names(path))

        def client() -> Any:
            c = fable.register("root-client").connect("root-echo", timeout=10)
            c.send(b"before")
            assert c.recv(timeout=10) == b"before"
            assert os.read(go_r, 1) == b"g"  # the attack is over
            c.send(b"after")
            got = c.recv(timeout=10)
            c.close()
            return got, c.transport

        cli = Child(client)
        wait_for(lambda: any(f["msgs"] for f in ask("flows", path)["flows"]), timeout=10)
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
            os.setresgid(UID, UID, UID)
            os.setresuid(UID, UID, UID)
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
