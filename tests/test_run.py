"""``fable run``: plain-socket programs (tests/fablerun_peer.py) under the LD_PRELOAD library,
paired by the daemon (daemon/ports.py). Each test checks what the kernel says the fds are, the
bytes (reversed back, checked by the client), and the programs' exit statuses."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fable.client import one_shot
from fable.run import environment, not_preloadable, shim_path
from helpers import start_daemon, wait_for

PEER = str(Path(__file__).with_name("fablerun_peer.py"))


class Program:
    """A peer program under fable run: its JSON lines, read as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, name: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, PEER, *args],
            env=env if env is not None else environment(name or None),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the program ended (status {self.proc.returncode}): {err}")
        return dict(json.loads(text))

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def done(self) -> list[dict[str, Any]]:
        """The rest of its lines; it must exit 0."""
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return [json.loads(x) for x in out.splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    made: list[Program] = []
    yield made
    for p in made:
        p.kill()


def _run_flows() -> list[dict[str, Any]]:
    reply = one_shot("flows") or {"flows": []}
    return [f for f in reply["flows"] if not f["reconfigurable"]]


def _daemon_fds(path: Path) -> int:
    pid = (one_shot("hello", path) or {})["daemon"]
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_connection_between_two_programs_is_a_unix_socket(
    daemon: Path, programs: list[Program]
) -> None:
    srv = Program("serve", "--count", "2", name="srv")
    programs.append(srv)
    port = srv.line()["port"]
    cli = Program("connect", "--port", str(port), "--n", "2", "--hold", name="cli")
    programs.append(cli)
    held = cli.line()
    assert held["kind"] == "unix" and held["peer"] == ["127.0.0.1", port]
    assert held["sockname"][0] == "127.0.0.1" and held["sockname"][1] != 0
    flows = _run_flows()
    assert [f["ends"] for f in flows] == [["cli", f"port/{port}"]]
    assert flows[0]["transport"] == "unix" and "fable run" in flows[0]["reason"]
    cli.go()
    got = srv.line()
    # the server saw the address the client has, through accept and getpeername alike; its
    # TCP_NODELAY was remembered (a unix socket has none)
    assert got["kind"] == "unix" and got["got"] == 100_000 and got["nodelay"] == 1
    assert got["peer"] == got["accepted"] == held["sockname"]
    assert got["sockname"] == ["127.0.0.1", port]
    cli.line()
    assert cli.line()["held"]
    cli.go()
    cli.done()
    srv.done()
    wait_for(lambda: not _run_flows(), 10)  # the flows end with their sockets


def test_fable_run_command_passes_the_exit_status_and_names_the_end(
    daemon: Path, programs: list[Program]
) -> None:
    fable = [sys.executable, "-m", "fable.cli", "run"]
    assert subprocess.run([*fable, "--", "sh", "-c", "exit 7"], timeout=60).returncode == 7
    assert subprocess.run([*fable, "--", "/no/such/program"], timeout=60).returncode == 127
    bad = subprocess.run([*fable, "--name", "a:b", "--", "true"], capture_output=True, timeout=60)
    assert bad.returncode == 2
    srv = Program("serve", name="srv")
    programs.append(srv)
    port = srv.line()["port"]
    cli = subprocess.Popen(
        [
            *fable,
            "--name",
            "named-end",
            "--",
            sys.executable,
            PEER,
            "connect",
            "--port",
            str(port),
            "--hold",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None and cli.stdin is not None
        assert json.loads(cli.stdout.readline())["kind"] == "unix"
        assert [f["ends"][0] for f in _run_flows()] == ["named-end"]
        cli.stdin.write("\n")
        cli.stdin.flush()
        assert cli.wait(30) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.communicate()
    srv.done()


def test_not_preloadable_programs_are_named(daemon: Path, tmp_path: Path) -> None:
    assert not_preloadable(sys.executable) is None
    assert not_preloadable("sh") is None
    suid = tmp_path / "suid"
    suid.write_bytes(Path(sys.executable).resolve().read_bytes()[:64])
    suid.chmod(0o4755)
    assert "setuid" in (not_preloadable(str(suid)) or "")
    static = tmp_path / "static"  # an ELF header with no program interpreter
    static.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57))
    static.chmod(0o755)
    assert "statically linked" in (not_preloadable(str(static)) or "")
    script = tmp_path / "script"
    script.write_text(f"#!{static}\n")
    script.chmod(0o755)
    assert "statically linked" in (not_preloadable(str(script)) or "")
    assert shim_path().is_file()
    # fable run warns, then runs it as usual (this one is no real program: exec fails)
    done = subprocess.run(
        [sys.executable, "-m", "fable.cli", "run", "--", str(static)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 127
    assert "statically linked" in done.stderr and "runs over plain TCP" in done.stderr


def _kinds(programs: list[Program], *args: str, env: dict[str, str] | None = None) -> list[str]:
    """One connection (``args``: the client's options) between a server and a client under
    fable run (``env``: their environment): the kinds of the client's and the server's fds."""
    srv = Program("serve", env=env)
    programs.append(srv)
    port = srv.line()["port"]
    cli = Program("connect", "--port", str(port), *args, env=env)
    programs.append(cli)
    return [cli.done()[0]["kind"], srv.done()[0]["kind"]]


def test_no_daemon_everything_stays_tcp(tmp_path: Path, programs: list[Program]) -> None:
    env = {**os.environ, "LD_PRELOAD": str(shim_path()), "FABLE_RUN_SOCKET": str(tmp_path / "x")}
    assert _kinds(programs, env=env) == ["tcp", "tcp"]


def test_daemon_killed_mid_run(tmp_path: Path, programs: list[Program]) -> None:
    path = Path(os.environ["FABLE_SOCKET"])
    d = start_daemon(path)
    try:
        srv = Program("serve", "--count", "2")
        programs.append(srv)
        port = srv.line()["port"]
        cli = Program("connect", "--port", str(port), "--hold")
        programs.append(cli)
        assert cli.line()["kind"] == "unix"
        d.kill()  # the connection is the kernel's: it goes on; the next one is plain TCP
        d.wait()
        cli.go()
        assert srv.line()["kind"] == "unix"
        cli.done()
        cli2 = Program("connect", "--port", str(port))
        programs.append(cli2)
        assert cli2.done()[0]["kind"] == "tcp"
        assert srv.done()[0]["kind"] == "tcp"
    finally:
        if d.poll() is None:
            d.kill()
            d.wait()


def test_a_hung_daemon_costs_a_timeout_not_a_freeze(programs: list[Program]) -> None:
    """A daemon that accepts and never answers (SIGSTOP): each call of the library gives up
    after its timeout (2 s) and the programs go on over TCP."""
    path = Path(os.environ["FABLE_SOCKET"])
    d = start_daemon(path)
    try:
        env = environment(None)
        os.kill(d.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert _kinds(programs, env=env) == ["tcp", "tcp"]
        assert time.monotonic() - t0 < 30
    finally:
        os.kill(d.pid, signal.SIGCONT)
        d.kill()
        d.wait()


@pytest.mark.parametrize("mode", ["--nonblock", "--epoll"])
def test_nonblocking_connect_and_epoll(mode: str, daemon: Path, programs: list[Program]) -> None:
    # non-blocking: EINPROGRESS, then writable, SO_ERROR 0, on a unix socket; a socket in an
    # epoll set before its connect stays TCP (epoll would watch the old socket)
    want = "unix" if mode == "--nonblock" else "tcp"
    assert _kinds(programs, mode) == [want, want]


def test_close_range_leaves_no_stale_state(daemon: Path, programs: list[Program]) -> None:
    srv = Program("serve", "--count", "3")
    programs.append(srv)
    port = srv.line()["port"]
    cli = Program("connect", "--port", str(port), "--n", "3", "--closerange")
    programs.append(cli)
    got = cli.done()
    assert [g["kind"] for g in got] == ["unix"] * 3
    assert len({g["fd"] for g in got}) == 1  # the same fd number each time
    assert len({tuple(g["sockname"]) for g in got}) == 3
    assert [g["kind"] for g in srv.done()] == ["unix"] * 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", ["", "--nonblock"])
def test_refused_port_same_errno(mode: str, daemon: Path, programs: list[Program]) -> None:
    port = _free_port()
    args = ["connect", "--port", str(port), "--expect-error", *([mode] if mode else [])]
    plain = Program(*args, env=dict(os.environ))
    under = Program(*args)
    programs += [plain, under]
    assert plain.done() == under.done() == [{"errno": errno.ECONNREFUSED}]
    # a registered listener that is closed again: refused too, and nothing waits in the daemon
    srv = Program("serve", "--close-listener")
    programs.append(srv)
    port = srv.line()["port"]
    assert Program(*args[:2], str(port), *args[3:]).done() == [{"errno": errno.ECONNREFUSED}]
    srv.go()
    srv.done()


def test_a_thousand_short_connections(daemon: Path, programs: list[Program]) -> None:
    srv = Program("serve", "--count", "1000", "--summary")
    programs.append(srv)
    port = srv.line()["port"]
    time.sleep(0.3)
    base = _daemon_fds(daemon)
    cli = Program("connect", "--port", str(port), "--n", "1000", "--size", "64")
    programs.append(cli)
    got = cli.done()
    assert len(got) == 1000 and {g["kind"] for g in got} == {"unix"}
    assert srv.done() == [{"kinds": {"unix": 1000}}]
    wait_for(lambda: _daemon_fds(daemon) <= base, 10)  # nothing held for a connection that ended
    wait_for(lambda: not _run_flows(), 10)


def test_server_on_a_non_loopback_address_stays_tcp(daemon: Path) -> None:
    from helpers import kinds_in_own_netns, need_root

    need_root()
    # in a network namespace of its own, where 198.18.0.1 is an address of this host (on lo,
    # but not a loopback address: the library goes by the address)
    setup = "ip addr add 198.18.0.1/32 dev lo"
    assert kinds_in_own_netns(environment(None), setup, "198.18.0.1") == ["tcp", "tcp"]


def test_fable_names_resolve_to_a_fable_run_program(daemon: Path, programs: list[Program]) -> None:
    """``NAME.fable`` is the loopback address while a program run with ``--name NAME`` listens;
    any other ``.fable`` name is EAI_NONAME (never asked of DNS)."""
    srv = Program("serve", name="web")
    programs.append(srv)
    port = srv.line()["port"]
    cli = Program("connect", "--host", "web.fable", "--port", str(port), name="cli")
    programs.append(cli)
    got = cli.done()[0]
    assert got["kind"] == "unix" and got["peer"] == ["127.0.0.1", port]
    assert srv.done()[0]["kind"] == "unix"
    code = (
        "import socket\n"
        "for n in ('nope.fable', 'web.fable', 'bad!name.fable'):\n"
        "    try:\n"
        "        print(socket.getaddrinfo(n, 80, socket.AF_INET)[0][4][0])\n"
        "    except socket.gaierror as e:\n"
        "        print(e.errno == socket.EAI_NONAME)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=environment(None),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # (web stopped listening when its program ended: the name is gone with it)
    assert done.stdout.split() == ["True", "True", "True"], done.stderr


def test_the_library_lists_what_it_interposes() -> None:
    """shim.c stays small (its budget: 650 lines), and its first lines name every function it
    interposes (every function it exports)."""
    src = (Path(__file__).resolve().parent.parent / "src/fable/_shim/shim.c").read_text()
    assert len(src.splitlines()) <= 650
    header = src[: src.index("*/")]
    exported = re.findall(r"^int (\w+)\(", src, re.M)
    assert sorted(exported) == sorted(
        [
            "listen",
            "connect",
            "accept",
            "accept4",
            "getsockname",
            "getpeername",
            "setsockopt",
            "getsockopt",
            "getaddrinfo",
        ]
    )
    for name in exported:
        assert re.search(rf"\b{name}\b", header), name
    nm = subprocess.run(
        ["nm", "-D", "--defined-only", str(shim_path())], capture_output=True, text=True, check=True
    ).stdout
    assert sorted(re.findall(r" T (\w+)$", nm, re.M)) == sorted(exported)
