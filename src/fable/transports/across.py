"""What a connection between two hosts adds to one on a host: TCP sockets where a host uses an
AF_UNIX pair and passed fds, one-time tokens where a host has the kernel's word on who is at
the other end, and a peer timeout where a host has a process's death.

The two daemons rendezvous the connection (``fable/daemon/link.py``) and each issues a token:
T1 by the listener's daemon, T2 by the connecting one. Each daemon gives both tokens to its own
process only; the listener's daemon also hands its process a listening TCP socket bound to the
address the other daemon reached it on. Then, between the two processes:

    connecting process                                 listening process (Listener.accept)
    connect(address, port) ──────────────────────────► accept; the first frame within
    JOIN {token: T1, port: P (its own data listener)}    ADMIT_S, else the next caller
                                                       T1 wrong: closed, nothing said, wait on
                                                         for the next (nothing is delivered)
                               ◄─────────────────────── JOINED {token: T2}  (T1 is spent: the
    T2 wrong: ProtocolError (an impostor holds           listening socket now takes only DIALs)
      the port: nothing is sent to it)
    the setup channel: this TCP socket, records without fds (fable/transports/channel.py)

Every data path of the connection (epoch 0 and each switch) is a new TCP connection that the
offering side makes to the other side's data listener (the connecting process's ``P``, the
listening process's socket above), opening with DIAL {token} for a token the offering side
made up and sends in its offer on the (already trusted) setup channel; the answering side takes
the connection holding that token from its listener (``Across.take``) and drops any other.
The offering side sends its offer only once the peer's kernel acknowledged the DIAL, so the
answering side (on a switch, the process's control thread) finds it there and never waits on
the network: ``take`` gives a peer that offers without dialing TAKE_S, then refuses.

Every socket gets ``tune``: keepalive and ``TCP_USER_TIMEOUT`` of FABLE_PEER_TIMEOUT, so a
link that goes down or a host that vanishes ends the connection with ``PeerDied`` within that
time, whether data is in flight or the connection is quiet.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import time
from typing import Any

from fable._wire import FrameReader, recv_frame
from fable.errors import ConnectionClosed, FableError, ProtocolError, Timeout

__all__ = ["ADMIT_S", "TAKE_S", "Across", "admit", "join", "new_token", "tune"]

JOIN, JOINED, DIAL = "join", "joined", "dial"
ADMIT_S = 1.0  # a caller on a listening socket has this long to say who it is
TAKE_S = 0.5  # an offer's dial is in the kernel before the offer: this is scheduling slack
SIOCOUTQ = 0x5411  # bytes of a TCP socket the peer has not acknowledged (linux/sockios.h)
TOKEN_CHARS = 32  # a token: 16 random bytes in hex


def new_token() -> str:
    """A fresh one-time token."""
    return secrets.token_hex(TOKEN_CHARS // 2)


def _same(a: Any, b: str) -> bool:
    return isinstance(a, str) and len(a) == len(b) and hmac.compare_digest(a, b)


def tune(sock: socket.socket, timeout: float | None = None) -> None:
    """Keepalive and ``TCP_USER_TIMEOUT`` so that a dead peer or link is found out within
    ``timeout`` seconds (default FABLE_PEER_TIMEOUT), quiet or not; Nagle off for the records."""
    from fable.config import settings

    t = settings().peer_timeout_s if timeout is None else timeout
    idle = max(1, int(t / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(t) - idle))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(t * 1000)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connect(address: str, port: int, timeout: float, what: str) -> socket.socket:
    """A TCP connection to ``address:port``, tuned: ``Timeout`` if nothing answers in
    ``timeout`` s, ``ConnectionClosed`` if it is refused or unreachable."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        tune(sock)
        sock.settimeout(max(0.001, timeout))
        sock.connect((address, port))
        sock.settimeout(None)
    except TimeoutError:
        sock.close()
        raise Timeout(f"{what} at {address}:{port} did not answer in {timeout:g} s") from None
    except OSError as e:
        sock.close()
        raise ConnectionClosed(f"{what} at {address}:{port}: {e.strerror or e}") from None
    return sock


def _send(sock: socket.socket, record: dict[str, Any]) -> None:
    from fable.transports.channel import SETUP

    sock.sendall(SETUP.encode(record), socket.MSG_NOSIGNAL)


def _first(sock: socket.socket, deadline: float) -> dict[str, Any]:
    """The first record on a new connection, by ``deadline``; ProtocolError, Timeout,
    EOFError otherwise (fds, which TCP cannot carry, never come)."""
    from fable.transports.channel import SETUP

    reader = FrameReader(SETUP)
    record, _ = recv_frame(sock, reader, deadline)
    return record


class Across:
    """One connection's reach to its peer on another host: this side's data listener, where
    the peer dials in, and the peer's (``address``, ``port``), where this side dials."""

    def __init__(self, listener: socket.socket, address: str, port: int, host: str) -> None:
        self.listener = listener
        self.address = address
        self.port = port
        self.host = host  # the peer's host id (for errors)
        listener.setblocking(False)

    def dial(self, timeout: float) -> tuple[socket.socket, str]:
        """A new TCP connection to the peer's data listener, opened with a DIAL of a fresh
        token (the peer takes it by that token: ``take``); returns it and the token."""
        token = new_token()
        deadline = time.monotonic() + timeout
        sock = _connect(self.address, self.port, timeout, f"the peer on host {self.host}")
        try:
            _send(sock, {"op": DIAL, "token": token})
            _acked(sock, deadline, f"the peer on host {self.host}")
        except OSError as e:
            sock.close()
            if isinstance(e, FableError):
                raise
            raise ConnectionClosed(f"the peer on host {self.host}: {e.strerror or e}") from None
        return sock, token

    def take(self, token: Any, timeout: float = TAKE_S) -> socket.socket:
        """The connection on this side's data listener that opens with DIAL ``token`` (a
        ``ProtocolError`` for a token that is not a token); any other is closed unread.
        ``Timeout`` if it does not come within ``timeout`` s (an honest peer's is there
        already: module docstring)."""
        if not isinstance(token, str) or len(token) != TOKEN_CHARS:
            raise ProtocolError("an offer across hosts without a valid dial token")
        deadline = time.monotonic() + timeout
        return _accept(
            self.listener,
            deadline,
            lambda r: r.get("op") == DIAL and _same(r.get("token"), token),
            f"the peer on host {self.host} did not dial in",
            only=self.address,
        )

    def close(self) -> None:
        self.listener.close()


def _acked(sock: socket.socket, deadline: float, what: str) -> None:
    """Wait until the peer's kernel acknowledged every byte sent on ``sock`` (``Timeout`` at
    ``deadline``): what was sent is then in its receive queue."""
    import array
    import fcntl

    left = array.array("i", [0])
    pause = 0.0001
    while True:
        fcntl.ioctl(sock.fileno(), SIOCOUTQ, left)
        if left[0] == 0:
            return
        if time.monotonic() >= deadline:
            raise Timeout(f"{what} did not acknowledge a dial in time")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def _accept(
    lst: socket.socket, deadline: float, good: Any, what: str, only: str | None = None
) -> socket.socket:
    """The first connection on ``lst`` whose first record ``good`` approves, by ``deadline``.
    Each caller has ADMIT_S to say who it is; any other is closed unanswered, and one from
    another address than ``only`` (when given: the peer's) at once, unread."""
    import select

    poller = select.poll()
    poller.register(lst.fileno(), select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"{what} in time")
        if not poller.poll(int(left * 1000) + 1):
            continue
        try:
            conn, where = lst.accept()
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as e:
            raise FableError(f"accepting on the data listener: {e}") from None
        if only is not None and where[0] != only:
            conn.close()  # not the peer's host: it may not even spend our time
            continue
        conn.setblocking(True)
        try:
            record = _first(conn, min(deadline, time.monotonic() + ADMIT_S))
            if good(record):
                tune(conn)
                return conn
        except (FableError, EOFError, OSError):
            pass
        conn.close()  # a wrong or spent token, garbage, silence: nothing is said


def join(remote: dict[str, Any], timeout: float) -> tuple[socket.socket, Across]:
    """The connecting process: reach the listening process as the daemons arranged
    (``remote``: address, port, token T1, peer_token T2, host) and return the setup channel's
    socket and the connection's ``Across``. ``Timeout`` when the address does not answer,
    ``ProtocolError`` when what answers does not hold T2."""
    address, port = str(remote["address"]), int(remote["port"])
    host = str(remote.get("host", "?"))
    deadline = time.monotonic() + timeout
    sock = _connect(address, port, timeout, f"the listener on host {host}")
    try:
        mine = sock.getsockname()[0]
        lst = socket.socket(sock.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            lst.bind((mine, 0))
            lst.listen(8)
            _send(sock, {"op": JOIN, "token": remote["token"], "port": lst.getsockname()[1]})
            try:
                record = _first(sock, deadline)
            except EOFError:
                raise ProtocolError(
                    f"the listener on host {host} refused the connection (its token was "
                    "wrong or spent)"
                ) from None
            if record.get("op") != JOINED or not _same(record.get("token"), remote["peer_token"]):
                raise ProtocolError(
                    f"what answers at {address}:{port} is not the listener the daemons "
                    "arranged (it does not hold their token)"
                )
        except BaseException:
            lst.close()
            raise
    except OSError as e:
        sock.close()
        if isinstance(e, FableError):
            raise
        raise ConnectionClosed(f"the listener on host {host}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock, Across(lst, address, port, host)


def admit(
    lst: socket.socket, remote: dict[str, Any], timeout: float
) -> tuple[socket.socket, Across]:
    """The listening process: on the listening socket its daemon handed it, the one caller
    that holds T1 (``remote["token"]``), answered with T2; returns the setup channel's socket
    and the connection's ``Across`` (whose data listener is ``lst``). ``Timeout`` if no caller
    holds T1 within ``timeout`` s (``lst`` is closed then)."""
    port: list[int] = []

    def good(record: dict[str, Any]) -> bool:
        p = record.get("port")
        if record.get("op") != JOIN or not _same(record.get("token"), str(remote["token"])):
            return False
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
            return False
        port.append(p)
        return True

    try:
        sock = _accept(lst, time.monotonic() + timeout, good, "the connecting process never came")
        try:
            _send(sock, {"op": JOINED, "token": str(remote["peer_token"])})
        except OSError as e:
            sock.close()
            raise ConnectionClosed(f"the connecting process went away: {e}") from None
    except BaseException:
        lst.close()
        raise
    return sock, Across(lst, sock.getpeername()[0], port[-1], str(remote.get("host", "?")))
