"""Helpers for the tests that need a daemon and client processes (imported by test modules)."""

from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fable.config
from fable.client import one_shot
from fable.errors import ConnectionClosed, PeerDied, Timeout, WouldBlock
from fable.nameservice import PROTOCOL_VERSION

__all__ = [
    "HELLO",
    "UID",
    "Child",
    "RemoteEnd",
    "as_uid",
    "ask",
    "daemon_answers",
    "echo_pair",
    "flood",
    "fork",
    "frame",
    "names",
    "need_root",
    "raw_client",
    "read_reply",
    "run",
    "start_daemon",
    "start_system_daemon",
    "stop",
    "wait_for",
]


UID = 54321  # a second user, unused on the machine: tests never add users (they setresuid)


def need_root() -> None:
    """Fail (never skip) a test that drops to other uids when it does not run as root."""
    assert os.geteuid() == 0, "this test needs root (setresuid to other uids)"


def as_uid(uid: int = UID) -> None:
    """Become ``uid`` for good (in a forked child)."""
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGKILL this process when the test process that forked it ends (a test that fails or is
    killed by its timeout leaves no child waiting on a pipe forever)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child that always ends with ``os._exit``: 0 if it returned,
    1 (its traceback on stderr) if it raised. Returns the child's pid."""
    from_main = threading.current_thread() is threading.main_thread()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if from_main:  # (the signal comes when the forking *thread* ends)
                _die_with_parent()
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


class Child:
    """A forked process running ``fn``; ``result()`` returns what it returned or raises
    RuntimeError with its exception's text."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        r, w = os.pipe()

        def body() -> None:
            os.close(r)
            try:
                out: tuple[str, Any] = ("ok", fn())
            except BaseException as e:  # reported by result(), with where it was raised
                out = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            _put(w, out)

        self.pid = fork(body)
        os.close(w)
        self._r = r

    def result(self, timeout: float = 60) -> Any:
        ready = select.poll()  # not select.select: fds above 1024 work
        ready.register(self._r, select.POLLIN)
        if not ready.poll(int(timeout * 1000)):
            self.kill()
            raise TimeoutError("child did not finish")
        out = _get(self._r)  # the child writes its whole result, then exits
        os.close(self._r)
        status = os.waitpid(self.pid, 0)[1]
        if out is None:
            raise RuntimeError(f"child died without a result (status {status})")
        kind, value = out
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
    deadline = time.monotonic() + 30  # generous: a loaded 2-core machine, under coverage
    while not daemon_answers(path):
        if time.monotonic() > deadline or p.poll() is not None:
            p.kill()  # never leave it running (or unreaped) for a later test to trip over
            p.wait()
            raise AssertionError(f"daemon did not start (exit status {p.returncode})")
        time.sleep(0.02)
    return p


def start_system_daemon(env: Any, *extra: str) -> tuple[Path, Callable[[], None]]:
    """A ``--system`` daemon (with ``extra`` arguments) on a socket in a fresh 0755 directory
    (a second uid can reach it), ``FABLE_SOCKET`` pointing at it (``env``: the test's
    MonkeyPatch); returns the socket and the function that stops the daemon and removes the
    directory."""
    d = Path(tempfile.mkdtemp(prefix="fable-sys-"))
    os.chmod(d, 0o755)
    path = d / "run" / "fabled.sock"
    p = start_daemon(path, "--system", *extra)
    env.setenv("FABLE_SOCKET", str(path))
    fable.config.reload()

    def done() -> None:
        try:
            if p.poll() is None:
                stop(p)
            else:
                p.wait()  # (the test killed it)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    return path, done


def daemon_answers(path: Path) -> bool:
    """Whether a daemon answers on ``path`` now. A daemon that is starting or stopping may
    accept and then hang up (EOFError, OSError): that is "no"; any other error is raised."""
    try:
        return one_shot("ls", path) is not None
    except (EOFError, OSError):
        return False


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0


def ask(op: str, path: Path) -> dict[str, Any]:
    reply = one_shot(op, path)
    assert reply is not None, "no daemon answers"
    return reply


def names(path: Path) -> set[str]:
    return {e["name"] for e in ask("ls", path)["endpoints"]}


# --------------------------------------------------------------- speaking to fabled by hand
def raw_client(path: Path) -> socket.socket:
    """A plain connection to the daemon on ``path`` (5 s timeout), nothing sent yet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def frame(obj: Any) -> bytes:
    """``obj`` as one control frame (the caller puts in ``"v"``)."""
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def read_reply(s: socket.socket) -> dict[str, Any] | None:
    """The next frame the daemon sends on ``s``, or None when it hangs up first."""
    head = s.recv(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    reply: dict[str, Any] = json.loads(body)
    return reply


HELLO = frame({"v": PROTOCOL_VERSION, "op": "hello", "id": 0})


def flood(path: Path, n: int) -> list[socket.socket]:
    """``n`` connections to the daemon on ``path`` that say hello and nothing more, made
    without waiting (past the daemon's backlog they fail: that is what a flood does)."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
            s.send(HELLO)
        except OSError:
            pass  # the backlog is full
        out.append(s)
    return out


def echo_pair(path: Path, prefix: str, go: int) -> tuple[Child, Child]:
    """A flow to watch through an attack, in two processes: PREFIX-echo listens and echoes;
    PREFIX-client connects, sends b"before" and checks the echo, then waits for a byte on fd
    ``go`` and sends b"after". Returns once the daemon counts the flow's messages; the
    client's result is (what came back after, its transport)."""

    def echo() -> None:
        c = fable.register(f"{prefix}-echo").listen().accept(timeout=30)
        for m in c:
            c.send(m)

    srv = Child(echo)
    wait_for(lambda: f"{prefix}-echo" in names(path))

    def client() -> Any:
        c = fable.register(f"{prefix}-client").connect(f"{prefix}-echo", timeout=10)
        c.send(b"before")
        assert c.recv(timeout=10) == b"before"
        assert os.read(go, 1) == b"g"
        c.send(b"after")
        got = c.recv(timeout=10)
        c.close()
        return got, c.transport

    cli = Child(client)
    wait_for(lambda: any(f["msgs"] for f in ask("flows", path)["flows"]), timeout=10)
    return srv, cli


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ------------------------------------------------------------------- an end in another process
class RemoteBuf:
    """A read buffer of a RemoteEnd: its bytes as read (a snapshot), ``more``, its id there."""

    def __init__(self, ident: int, data: bytes, more: bool) -> None:
        self.id, self.data, self.more = ident, data, more


class RemoteEnd:
    """The other end of ``pending``, opened in a forked child and driven from here, so that
    a test written for two ends in one process runs across two. The calls the tests use go
    there over a pipe and their results come back (bytes, not views); WouldBlock, Timeout,
    ValueError and ConnectionClosed raised there are raised here as the same class (its
    message kept); anything else ends the child with its traceback, and the next call (or
    ``close``) fails here. ``close`` checks the child's exit status."""

    _RAISED = {
        "WouldBlock": WouldBlock,
        "Timeout": Timeout,
        "ValueError": ValueError,
        "ConnectionClosed": ConnectionClosed,
        "PeerDied": PeerDied,
    }

    def __init__(self, pending: Any, trusted: bool | None = None) -> None:
        c2p_r, c2p_w = os.pipe()
        p2c_r, p2c_w = os.pipe()

        def body() -> None:
            os.close(c2p_r)
            os.close(p2c_w)
            _serve(pending.open(trusted=trusted), p2c_r, c2p_w)

        self.pid = fork(body)
        pending.close()
        os.close(c2p_w)
        os.close(p2c_r)
        self._r, self._w = c2p_r, p2c_w
        self.closed = False

    def _call(self, op: str, *args: Any) -> Any:
        _put(self._w, (op, args))
        reply = _get(self._r)
        if reply is None:
            raise AssertionError(f"the remote end died during {op} (traceback on stderr)")
        if reply[0] == "raise":
            raise self._RAISED[reply[1]](reply[2])
        return reply[1]

    def send(self, data: bytes, timeout: float | None = None) -> None:
        self._call("send", bytes(data), timeout)

    def send_many(self, msgs: list[bytes]) -> int:
        return int(self._call("send_many", [bytes(m) for m in msgs]))

    def send_later(self, delay: float, data: bytes) -> None:
        """``send(data)`` there, ``delay`` seconds from now (this call returns at once)."""
        self._call("send_later", delay, bytes(data))

    def send_all_and_close_later(self, msgs: list[bytes]) -> None:
        """There, on a thread of its own: send every message, then close (returns at once)."""
        self._call("send_all_and_close_later", [bytes(m) for m in msgs])

    def recv(self, timeout: float | None = None) -> bytes:
        return bytes(self._call("recv", timeout))

    def recv_into(self, buf: bytearray, timeout: float | None = None) -> int:
        n, data = self._call("recv_into", len(buf), timeout)
        buf[:n] = data
        return int(n)

    def getreadbuf(self) -> list[RemoteBuf]:
        return [RemoteBuf(*x) for x in self._call("getreadbuf")]

    def release(self, buf: RemoteBuf) -> None:
        self._call("release", buf.id)

    def wait_readable(self, timeout: float) -> None:
        self._call("wait_readable", timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._call("close")
        finally:
            os.close(self._r)
            os.close(self._w)
            status = os.waitpid(self.pid, 0)[1]
        assert os.waitstatus_to_exitcode(status) == 0, f"the remote end failed ({status})"

    def kill(self) -> None:
        """End the child without a word (after a failure here)."""
        if not self.closed:
            self.closed = True
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self._r)
            os.close(self._w)

    def __enter__(self) -> RemoteEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.kill()


def _put(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(data)) + data)


def _get(fd: int) -> Any:
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    body = _read_exactly(fd, struct.unpack("<I", head)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def _serve(conn: Any, r: int, w: int) -> None:
    """The child's loop: run each call on ``conn`` and send back its result."""
    import threading

    from fable.testing import wait_readable

    held: dict[int, Any] = {}
    ids = iter(range(1 << 62))
    timers: list[threading.Timer] = []
    while True:
        msg = _get(r)
        if msg is None:
            return  # the test went away
        op, args = msg
        try:
            out: Any = None
            if op == "send":
                conn.send(args[0], timeout=args[1])
            elif op == "send_many":
                out = conn.send_many(args[0])
            elif op == "send_later":
                t = threading.Timer(args[0], conn.send, args=(args[1],))
                timers.append(t)
                t.start()
            elif op == "send_all_and_close_later":

                def send_all(msgs: list[bytes] = args[0]) -> None:
                    conn.send_many(msgs)
                    conn.close()

                t = threading.Timer(0, send_all)
                timers.append(t)
                t.start()
            elif op == "recv":
                out = bytes(conn.recv(timeout=args[0]))
            elif op == "recv_into":
                buf = bytearray(args[0])
                n = conn.recv_into(buf, timeout=args[1])
                out = (n, bytes(buf[:n]))
            elif op == "getreadbuf":
                out = []
                for b in conn.getreadbuf():
                    i = next(ids)
                    held[i] = b
                    out.append((i, bytes(b.data), b.more))
            elif op == "release":
                conn.release(held.pop(args[0]))
            elif op == "wait_readable":
                wait_readable(conn, args[0])
            elif op == "close":
                for t in timers:
                    t.join()
                for b in held.values():
                    conn.release(b)
                conn.close()
                _put(w, ("ok", None))
                return
            else:
                raise ValueError(f"unknown call {op!r}")
        except (WouldBlock, Timeout, ValueError, ConnectionClosed) as e:
            _put(w, ("raise", type(e).__name__, str(e)))
            continue
        _put(w, ("ok", out))


def kinds_in_own_netns(env: dict[str, str], setup: str, host: str, port: int = 0) -> list[str]:
    """Run tests/fablerun_peer.py's server and one client in a network namespace of their own
    (``unshare -n``; ``setup``: shell commands first, lo is up), under ``env``: the kind of each
    end's fd (the client's, then the server's)."""
    peer = Path(__file__).with_name("fablerun_peer.py")
    script = (
        f"ip link set lo up; {setup}\n"
        f"{sys.executable} {peer} serve --host {host} --port {port} > $T/srv &\n"
        "until [ -s $T/srv ]; do sleep 0.1; done\n"
        f"{sys.executable} {peer} connect --host {host} --port "
        '$(sed -E "s/.*: ([0-9]+).*/\\1/" $T/srv); wait; cat $T/srv\n'
    )
    with tempfile.TemporaryDirectory() as t:
        done = subprocess.run(
            ["unshare", "-n", "sh", "-ec", script],
            env={**env, "T": t},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    return [json.loads(x)["kind"] for x in done.stdout.splitlines() if '"kind"' in x]
