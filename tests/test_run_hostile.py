"""``fable run`` against a hostile side: a process that speaks the port ops by hand with fds of
its choosing, and a daemon impostor of another user. Each attack has one outcome, and the
attacker's own exit status is checked where it runs apart."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from fable.client import one_shot
from fable.daemon.ports import CONNECT_GRACE_S
from fable.nameservice import PROTOCOL_VERSION
from fable.run import shim_path
from helpers import (
    HELLO,
    UID,
    as_uid,
    fork,
    frame,
    kinds_in_own_netns,
    need_root,
    read_reply,
    wait_for,
)

PEER = str(Path(__file__).with_name("fablerun_peer.py"))


def _op(path: Path, op: str, fds: list[int], **fields: Any) -> tuple[dict[str, Any], list[int]]:
    """One port op by hand (hello first): the reply and the fds that came with it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(HELLO)
        assert read_reply(s) is not None
        socket.send_fds(s, [frame({"v": PROTOCOL_VERSION, "op": op, "id": 1, **fields})], fds)
        head, got, _, _ = socket.recv_fds(s, 4, 4)
        n = int.from_bytes(head, "big")
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
        return json.loads(body), got


def _fds(path: Path) -> int:
    return len(_fd_links(path))


def _settles(path: Path, base: set[str], timeout: float) -> None:
    """Wait until the daemon holds no more fds than it did (``base``: ``_fd_links``)."""
    try:
        wait_for(lambda: len(_fd_links(path)) <= len(base), timeout)
    except AssertionError:
        raise AssertionError(f"the daemon still holds {_fd_links(path) - base}") from None


def _fd_links(path: Path) -> set[str]:
    """What the daemon's fds are (their /proc links; sockets by inode)."""
    pid = (one_shot("hello", path) or {})["daemon"]
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.add(f"{fd} {os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return out


def _listener() -> socket.socket:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    return ls


def test_port_ops_with_the_wrong_fds_are_refused(daemon: Path) -> None:
    base = _fd_links(daemon)
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ls = _listener()
    connected = socket.create_connection(ls.getsockname())
    unbound = socket.socket()
    eth = socket.socket()
    eth.bind(("0.0.0.0", 0))  # (a wildcard: not a loopback address either; nothing is sent)
    try:
        refusals: list[tuple[str, list[int], dict[str, Any], str]] = [
            ("port_listen", [], {}, "takes one socket fd, not 0"),
            ("port_listen", [r, w], {}, "takes one socket fd, not 2"),
            ("port_listen", [r], {}, "not a socket"),
            ("port_listen", [udp.fileno()], {}, "not a TCP socket"),
            ("port_listen", [unbound.fileno()], {}, "not listening"),
            ("port_connect", [connected.fileno()], {"host": "127.0.0.1", "port": 1}, "connected"),
            ("port_connect", [eth.fileno()], {"host": "127.0.0.1", "port": 1}, "non-loopback"),
            ("port_connect", [unbound.fileno()], {"host": "198.18.0.9", "port": 1}, "loopback"),
            ("port_connect", [unbound.fileno()], {"host": "127.0.0.1", "port": 0}, "no port 0"),
            ("port_connect", [unbound.fileno()], {"host": ["x"], "port": "y"}, "loopback"),
        ]
        for op, fds, fields, why in refusals:
            reply, got = _op(daemon, op, fds, **fields)
            assert not got and reply["ok"] is False and why in reply["message"], (op, reply)
        # an accepted socket nobody paired: no pair
        peer, _ = ls.accept()
        with peer:
            reply, got = _op(daemon, "port_accept", [peer.fileno()])
        assert reply["ok"] and reply["pair"] is False and not got
    finally:
        for s in (udp, ls, connected, unbound, eth):
            s.close()
        os.close(r)
        os.close(w)
    _settles(daemon, base, 10)  # every fd sent was closed by the daemon


def test_pairs_that_never_connect_are_dropped(daemon: Path) -> None:
    """A process asks for pairs to a registered port and never connects: the daemon lets them
    go after its grace period (ports.CONNECT_GRACE_S), and holds nothing more."""
    ls = _listener()
    port = ls.getsockname()[1]
    reply, _ = _op(daemon, "port_listen", [ls.fileno()])
    assert reply["ok"] and reply["port"] == port
    base = _fd_links(daemon)
    socks, ends = [], []
    for _ in range(20):
        s = socket.socket()  # unbound: the daemon binds it to a loopback port
        reply, got = _op(daemon, "port_connect", [s.fileno()], host="127.0.0.1", port=port)
        assert reply["ok"] and reply["pair"] is True and len(got) == 1
        socks.append(s)
        ends += got
    assert _fds(daemon) >= len(base) + 39  # each: its TCP socket and the accepting side's end
    for s in socks:
        s.close()
    for fd in ends:
        os.close(fd)
    _settles(daemon, base, CONNECT_GRACE_S + 10)
    ls.close()


def test_a_listener_outside_fable_on_the_port_means_tcp(daemon: Path) -> None:
    """Two listeners share a port (SO_REUSEPORT); only one is registered: the other could get
    the connection, so the daemon pairs none."""
    a, b = socket.socket(), socket.socket()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    a.bind(("127.0.0.1", 0))
    b.bind(a.getsockname())
    a.listen()
    b.listen()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        assert _op(daemon, "port_listen", [a.fileno()])[0]["ok"]
        port = a.getsockname()[1]
        reply, got = _op(daemon, "port_connect", [s.fileno()], host="127.0.0.1", port=port)
        assert reply["ok"] and reply["pair"] is False and not got
    finally:
        for x in (a, b, s):
            x.close()


def test_a_second_socket_on_the_same_address_gets_no_pair(daemon: Path) -> None:
    """Two sockets share a source address (SO_REUSEPORT, one user): one asks for a pair to a
    registered port and never connects; the other connects to a listener of the attacker's
    own, whose accepted socket then claims the pair. Its peer is not the socket that asked:
    no pair."""
    ls = _listener()
    mine = _listener()
    asker, other = socket.socket(), socket.socket()
    try:
        assert _op(daemon, "port_listen", [ls.fileno()])[0]["ok"]
        for s in (asker, other):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        asker.bind(("127.0.0.1", 0))
        other.bind(asker.getsockname())
        port = ls.getsockname()[1]
        reply, got = _op(daemon, "port_connect", [asker.fileno()], host="127.0.0.1", port=port)
        assert reply["pair"] is True
        os.close(got[0])
        other.connect(mine.getsockname())
        peer, _ = mine.accept()
        with peer:
            assert peer.getpeername() == asker.getsockname()  # the same address
            reply, got = _op(daemon, "port_accept", [peer.fileno()])
        assert reply["ok"] and reply["pair"] is False and not got
    finally:
        for x in (ls, mine, asker, other):
            x.close()


def test_a_pair_for_one_port_is_not_taken_at_another(daemon: Path) -> None:
    """A process asks for a pair to a registered port, then connects the socket to another
    listener (its own) and claims the pair there: no pair (the pair is for where it said)."""
    ls, mine = _listener(), _listener()
    s = socket.socket()
    try:
        assert _op(daemon, "port_listen", [ls.fileno()])[0]["ok"]
        port = ls.getsockname()[1]
        reply, got = _op(daemon, "port_connect", [s.fileno()], host="127.0.0.1", port=port)
        assert reply["pair"] is True
        os.close(got[0])
        s.connect(mine.getsockname())  # not where it said
        peer, _ = mine.accept()
        with peer:
            reply, got = _op(daemon, "port_accept", [peer.fileno()])
        assert reply["ok"] and reply["pair"] is False and not got
    finally:
        for x in (ls, mine, s):
            x.close()


def test_an_impostor_daemon_of_another_user_gets_nothing() -> None:
    """FABLE_RUN_SOCKET names a socket another (non-root) user serves: the library sees its
    credentials, sends nothing, and the connection stays TCP."""
    need_root()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o777)  # (pytest's own temporary directories are root's alone)
        _impostor(Path(tmp))


def _impostor(tmp_path: Path) -> None:
    sock = tmp_path / "impostor.sock"
    got = tmp_path / "got"
    ready_r, ready_w = os.pipe()

    def impostor() -> None:
        os.close(ready_r)
        as_uid(UID + 1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ls:
            ls.bind(str(sock))
            os.chmod(sock, 0o777)
            ls.listen()
            os.write(ready_w, b"x")
            ls.settimeout(20)  # the first caller; then it ends 3 s after the last one
            calls = received = 0
            try:
                while True:
                    c, _ = ls.accept()
                    calls += 1
                    ls.settimeout(3)
                    c.settimeout(2)
                    with c:
                        try:
                            while d := c.recv(4096):
                                received += len(d)
                        except TimeoutError:
                            pass
            except TimeoutError:
                pass
            got.write_text(f"{calls} {received}")

    pid = fork(impostor)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)

    shim = tmp_path / "shim.so"  # where the other uid can read it
    shutil.copy(shim_path(), shim)
    shim.chmod(0o755)

    def victim() -> None:
        as_uid(UID)
        env = {"LD_PRELOAD": str(shim), "FABLE_RUN_SOCKET": str(sock)}
        code = (
            "import os, socket\n"
            f"assert {str(shim)!r} in open('/proc/self/maps').read()  # the library is in\n"
            "ls=socket.socket(); ls.bind(('127.0.0.1',0)); ls.listen()\n"
            "c=socket.create_connection(ls.getsockname()); a,_=ls.accept()\n"
            "c.sendall(b'x'); assert a.recv(1)==b'x'\n"
            "unix = {int(x.split()[6]) for x in list(open('/proc/net/unix'))[1:]}\n"
            "assert os.fstat(c.fileno()).st_ino not in unix\n"
        )
        os.execve("/usr/bin/python3", ["python3", "-c", code], env)

    vpid = fork(victim)
    _, status = os.waitpid(vpid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # the victim ran, over TCP
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # the impostor ran to its end
    calls, received = map(int, got.read_text().split())
    assert calls >= 2 and received == 0  # reached (listen, connect), and sent nothing at all


def test_a_client_in_another_network_namespace_stays_tcp(daemon: Path) -> None:
    """A port registered in the daemon's namespace says nothing of the same port number in
    another one: a program there is never paired (here its own server, in its namespace,
    answers it over TCP)."""
    need_root()
    ls = _listener()
    port = ls.getsockname()[1]
    assert _op(daemon, "port_listen", [ls.fileno()])[0]["ok"]
    env = {**os.environ, "LD_PRELOAD": str(shim_path()), "FABLE_RUN_SOCKET": str(daemon)}
    try:
        kinds = kinds_in_own_netns(env, "", "127.0.0.1", port)
    finally:
        ls.close()
    assert kinds == ["tcp", "tcp"]
