"""Helpers for the tests that need a daemon and client processes (imported by test modules)."""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fable.client import one_shot

__all__ = [
    "Child",
    "ask",
    "names",
    "one_shot_safe",
    "run",
    "start_daemon",
    "stop",
    "wait_for",
]


class Child:
    """A forked process running ``fn``; ``result()`` returns what it returned or raises
    RuntimeError with its exception's text."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(r)
            try:
                out: tuple[str, Any] = ("ok", fn())
            except BaseException as e:
                out = ("err", f"{type(e).__name__}: {e}")
            data = pickle.dumps(out)
            os.write(w, struct.pack("<I", len(data)) + data)
            os._exit(0)
        os.close(w)
        self._r = r

    def result(self, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        buf = b""

        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                self.kill()
                raise TimeoutError("child did not finish")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                break
            buf += chunk
        os.close(self._r)
        os.waitpid(self.pid, 0)
        if not buf:
            raise RuntimeError("child died without a result")
        kind, value = pickle.loads(buf[4:])
        if kind == "err":
            raise RuntimeError(value)
        return value

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def run(fn: Callable[[], Any]) -> Any:
    return Child(fn).result()


def start_daemon(path: Path, *extra: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [sys.executable, "-m", "fable.daemon", "--socket", str(path), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while one_shot_safe(path) is None:
        assert time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.02)
    return p


def one_shot_safe(path: Path, op: str = "ls") -> dict[str, Any] | None:
    try:
        return one_shot(op, path)
    except Exception:
        return None


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0


def ask(op: str, path: Path) -> dict[str, Any]:
    reply = one_shot(op, path)
    assert reply is not None, "no daemon answers"
    return reply


def names(path: Path) -> set[str]:
    return {e["name"] for e in ask("ls", path)["endpoints"]}


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
