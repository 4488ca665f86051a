"""A plain-sockets program for the ``fable run`` tests (tests/test_run.py): it knows nothing of
fable. Every fact goes to stdout as one JSON line; a connection's ``kind`` is what the kernel
says its fd is (``unix`` if its inode is in /proc/net/unix), whatever the library answers.

    serve [--host H] [--port P] [--count N] [--close-listener] [--summary]
        listen (port 0: any), print {"port": P}; per connection: read to EOF, send the bytes
        back reversed, close, print {"kind", "peer", "sockname", "nodelay"} (--summary: only
        {"kinds": {kind: count}} at the end)
    connect --port P [--host H] [--n N] [--size S] [--nonblock] [--epoll] [--closerange]
            [--hold] [--expect-error]
        N connections one after the other, each: send S bytes, shut down writing, read the
        reversed bytes back (checked), print {"kind", "peer", "sockname", "fd"}; --hold: wait
        for a line on stdin before closing each; --expect-error: print {"errno"} of connect
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import sys


def unix_inodes() -> set[int]:
    with open("/proc/net/unix") as f:
        next(f)
        return {int(line.split()[6]) for line in f if len(line.split()) >= 7}


def kind(sock: socket.socket) -> str:
    return "unix" if os.fstat(sock.fileno()).st_ino in unix_inodes() else "tcp"


def say(**facts: object) -> None:
    print(json.dumps(facts), flush=True)


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        d = sock.recv(1 << 16)
        if not d:
            return bytes(out)
        out += d


def serve(a: argparse.Namespace) -> None:
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.host, a.port))
    ls.listen(128)
    say(port=ls.getsockname()[1])
    if a.close_listener:
        ls.close()
        sys.stdin.readline()
        return
    kinds: dict[str, int] = {}
    for _ in range(a.count):
        c, addr = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nodelay = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        facts: dict[str, object] = dict(
            kind=kind(c), peer=list(c.getpeername()[:2]), accepted=list(addr[:2])
        )
        facts.update(sockname=list(c.getsockname()[:2]), nodelay=nodelay)
        data = read_all(c)
        c.sendall(data[::-1])
        c.close()
        if a.summary:
            k = str(facts["kind"])
            kinds[k] = kinds.get(k, 0) + 1
        else:
            say(**facts, got=len(data))
    if a.summary:
        say(kinds=kinds)


def one(a: argparse.Namespace, i: int) -> None:
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    c = socket.socket(family, socket.SOCK_STREAM)
    ep = None
    if a.epoll:
        c.setblocking(False)
        ep = select.epoll()
        ep.register(c.fileno(), select.EPOLLOUT)
    if a.nonblock:
        c.setblocking(False)
    if a.epoll or a.nonblock:
        err = c.connect_ex((a.host, a.port))
        if a.expect_error and err not in (0, errno.EINPROGRESS):
            say(errno=err)
            return
        assert err in (0, errno.EINPROGRESS), errno.errorcode.get(err, err)
        if ep is not None:
            ep.poll(10)
        else:
            select.select([], [c], [], 10)
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if a.expect_error:
            say(errno=err)
            return
        assert err == 0, errno.errorcode.get(err, err)
        c.setblocking(True)
    else:
        try:
            c.connect((a.host, a.port))
        except OSError as e:
            if a.expect_error:
                say(errno=e.errno)
                return
            raise
    data = bytes((i + k) % 251 for k in range(a.size))
    facts = dict(kind=kind(c), peer=list(c.getpeername()[:2]), sockname=list(c.getsockname()[:2]))
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    if a.hold:
        say(**facts, held=True)
        sys.stdin.readline()
    back = read_all(c)
    assert back == data[::-1], (len(back), len(data))
    say(**facts, fd=c.fileno())
    c.close()
    if ep is not None:
        ep.close()


def connect(a: argparse.Namespace) -> None:
    for i in range(a.n):
        one(a, i)
        if a.closerange and i == 0:
            os.closerange(3, 1 << 16)  # close_range(2) on this kernel: every fd but stdio


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--close-listener", action="store_true")
    s.add_argument("--summary", action="store_true")
    c = sub.add_parser("connect")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--n", type=int, default=1)
    c.add_argument("--size", type=int, default=100_000)
    for flag in ("--nonblock", "--epoll", "--closerange", "--hold", "--expect-error"):
        c.add_argument(flag, action="store_true")
    a = p.parse_args()
    serve(a) if a.cmd == "serve" else connect(a)


if __name__ == "__main__":
    main()
