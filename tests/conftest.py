"""Shared fixtures: every test gets a clean fable settings object and its fds checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

import fable.config

EXTRA_FDS = "FABLE_TEST_EXTRA_FDS"  # open this many fds first: what fable opens is above 1024
_extra: list[int] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    # The suite tests the C core: it must have been built and loaded.
    import os
    import resource

    import fable._core  # noqa: F401

    extra = int(os.environ.get(EXTRA_FDS, "0"))
    if extra:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = extra + 4096
        if soft < want:
            if hard != resource.RLIM_INFINITY and hard < want:
                raise pytest.UsageError(f"{EXTRA_FDS}={extra} needs RLIMIT_NOFILE >= {want}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        _extra.extend(os.open("/dev/null", os.O_RDONLY) for _ in range(extra))
        assert max(_extra) >= 1024, "the extra fds did not reach 1024"


def _stray_daemons() -> list[int]:
    """Daemons some test started (on a socket in pytest's or a test's temporary directory)
    and did not stop; a developer's own daemon (/tmp/fable-UID/) is not one of them."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "fable.daemon" in cmd and "--socket" in cmd:
            sock = cmd[cmd.index("--socket") + 1] if cmd.index("--socket") + 1 < len(cmd) else ""
            if "/pytest-of-" in sock or "/fable-sys-" in sock:
                found.append(p.pid)
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # no daemon is left running after the suite: a stray one fails the run (and is killed)
    import os
    import signal

    stray = _stray_daemons()
    for pid in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if stray and session.exitstatus == 0:
        print(f"\nFAILED: fable daemons left running after the suite: pids {stray}")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in [f.metadata["env"] for f in dataclasses.fields(fable.config.Settings)]:
        monkeypatch.delenv(var, raising=False)
    fable.config.reload()
    yield
    fable.config._current = None  # read afresh (after monkeypatch undoes the test's variables)


@pytest.fixture(autouse=True)
def _private_daemon_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No test talks to (or starts) the machine's real daemon: FABLE_SOCKET points into a
    fresh directory, and a daemon that a test left there is stopped afterwards."""
    import os

    d = tmp_path_factory.mktemp("fabled")
    os.chmod(d, 0o700)
    sock = d / "fabled.sock"
    monkeypatch.setenv("FABLE_SOCKET", str(sock))
    monkeypatch.setenv("FABLE_STATE_DIR", str(d / "state"))
    fable.config.reload()
    yield
    if sock.exists():
        from fable.client import one_shot

        try:
            one_shot("stop", sock)
        except (EOFError, OSError):
            pass  # it stopped before it answered


@pytest.fixture
def daemon() -> Iterator[Path]:
    """A daemon on this test's private socket (FABLE_SOCKET), stopped afterwards."""
    import os

    from helpers import start_daemon, stop

    path = Path(os.environ["FABLE_SOCKET"])
    p = start_daemon(path)
    yield path
    stop(p)
