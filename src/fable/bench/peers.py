"""The bench's peers: other IPC libraries, measured by the same harness as fable's transports.

Each peer is a :class:`~fable.bench.links.Link`: the same two pinned processes, sizes, message
pattern and sequence checks; records are named ``peer:NAME``. A peer whose library is not
installed is reported as skipped (``missing``), never measured some other way. Install them all
with ``pip install 'fable-ipc[peers]'``.

=================  =================================================================
name               what is measured
=================  =================================================================
pyzmq-ipc          a ZeroMQ PAIR socket over ``ipc://`` (a Unix socket)
pyzmq-tcp          a ZeroMQ PAIR socket over ``tcp://127.0.0.1``
mp-pipe            ``multiprocessing.Pipe()`` (``send_bytes`` / ``recv_bytes``)
zenoh              eclipse-zenoh, two sessions in peer mode over loopback TCP,
                   shared memory on: every message is put from a ``ShmProvider`` buffer
iceoryx2           iceoryx2's Python binding, one publish-subscribe service per
                   direction (``Slice[c_uint8]``); the receiver polls, yielding the CPU
                   between polls (iceoryx2's Python API has no blocking receive)
=================  =================================================================

Every peer copies each message at least once, like fable's safe forms: records say ``safe``.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

from fable.bench.links import Channel, Point

__all__ = ["PEERS", "PeerMissing", "missing", "peer_link"]

_CONNECT_TIMEOUT_S = 10.0


class PeerMissing(ImportError):
    """The peer's library is not installed."""


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # the import that must work
    package: str  # what to pip install
    make: Callable[[], Any]  # a new Link


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Adapter:
    """The parts of ``Channel`` every peer writes the same way."""

    def send(self, data: bytes, /) -> None:
        raise NotImplementedError

    def send_many(self, msgs: Sequence[bytes], /) -> None:
        send = self.send
        for m in msgs:
            send(m)

    def flush(self) -> None:
        pass


class _NoLeftovers:
    def cleanup(self) -> None:
        pass


# ------------------------------------------------------------------------------------ pyzmq
class _Zmq(_Adapter):
    def __init__(self, sock: Any, ctx: Any) -> None:
        self._sock, self._ctx = sock, ctx
        self.send = sock.send  # type: ignore[method-assign]
        self.recv = sock.recv

    def close(self) -> None:
        self._sock.close(linger=5000)  # the last messages still reach the peer
        self._ctx.term()


class ZmqLink(_NoLeftovers):
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def setup(self, point: Point) -> None:
        if self.kind == "ipc":
            self._dir = tempfile.mkdtemp(prefix="fable-bench-")
            self.addr = f"ipc://{self._dir}/pair.sock"
        else:
            self.addr = f"tcp://127.0.0.1:{_free_port()}"

    def end(self, side: int) -> Channel:
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        if side == 0:
            sock.bind(self.addr)
        else:
            sock.connect(self.addr)  # retried by zmq until A has bound
        return _Zmq(sock, ctx)


# --------------------------------------------------------------------- multiprocessing.Pipe
class _MpPipe(_Adapter):
    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.send = conn.send_bytes  # type: ignore[method-assign]
        self.recv = conn.recv_bytes

    def close(self) -> None:
        self._conn.close()


class MpPipeLink(_NoLeftovers):
    def setup(self, point: Point) -> None:
        self._ends = multiprocessing.Pipe(duplex=True)

    def end(self, side: int) -> Channel:
        self._ends[1 - side].close()
        return _MpPipe(self._ends[side])


# ------------------------------------------------------------------------------------ zenoh
class _Zenoh(_Adapter):
    def __init__(self, session: Any, pub: Any, sub: Any, size: int) -> None:
        import zenoh.shm

        self._session, self._pub, self._sub = session, pub, sub
        self._shm = zenoh.shm
        self._provider = zenoh.shm.ShmProvider.default_backend(max(4 << 20, 64 * size))
        self._policy = zenoh.shm.BlockOn(zenoh.shm.GarbageCollect())

    def send(self, data: bytes, /) -> None:
        buf = self._provider.alloc(max(len(data), 1), policy=self._policy)
        buf[0 : len(data)] = data
        self._pub.put(buf if len(data) else b"")

    def recv(self) -> bytes:
        return bytes(self._sub.recv().payload.to_bytes())

    def close(self) -> None:
        time.sleep(0.05)  # let the last put leave before the session goes
        self._session.close()
        # drop the provider now: its shared memory files go with it (an os._exit would not)
        del self._provider, self._pub, self._sub, self._session


class ZenohLink:
    _SHM_DIR = "/dev/shm"

    def __init__(self) -> None:
        self._before = self._segments()

    def _segments(self) -> set[str]:
        try:
            return {n for n in os.listdir(self._SHM_DIR) if n.endswith(".zenoh")}
        except OSError:
            return set()

    def cleanup(self) -> None:
        # zenoh leaves its shared-memory segments in /dev/shm when a process ends without
        # running its destructors (as the harness's workers end); remove the ones made here
        for name in self._segments() - self._before:
            try:
                os.unlink(os.path.join(self._SHM_DIR, name))
            except OSError:
                pass

    def setup(self, point: Point) -> None:
        self.port = _free_port()
        self.prefix = f"fable/bench/{os.getpid()}"
        self.size = point.size

    def end(self, side: int) -> Channel:
        import json

        import zenoh

        conf = zenoh.Config()
        conf.insert_json5("mode", '"peer"')
        conf.insert_json5("scouting/multicast/enabled", "false")
        conf.insert_json5("transport/shared_memory/enabled", "true")
        endpoint = json.dumps([f"tcp/127.0.0.1:{self.port}"])
        conf.insert_json5("listen/endpoints" if side == 0 else "connect/endpoints", endpoint)
        session = zenoh.open(conf)
        pub = session.declare_publisher(
            f"{self.prefix}/{side}", congestion_control=zenoh.CongestionControl.BLOCK
        )
        sub = session.declare_subscriber(
            f"{self.prefix}/{1 - side}", zenoh.handlers.FifoChannel(1024)
        )
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while not getattr(
            pub.matching_status, "matching", False
        ):  # a put before the peer subscribed is lost
            if time.monotonic() > deadline:
                raise TimeoutError("zenoh: the other session never subscribed")
            time.sleep(0.001)
        return _Zenoh(session, pub, sub, self.size)


# --------------------------------------------------------------------------------- iceoryx2
class _Iceoryx2(_Adapter):
    def __init__(self, node: Any, pub: Any, sub: Any, services: Any) -> None:
        self._node, self._pub, self._sub, self._services = node, pub, sub, services

    def send(self, data: bytes, /) -> None:
        n = len(data)
        deadline = 0.0
        while True:
            sample = self._pub.loan_slice_uninit(n)
            ctypes.memmove(sample.payload().data_ptr, data, n)
            if sample.assume_init().send():  # how many subscribers it reached
                return
            # None: the subscriber's end of the connection was not set up yet when we last
            # looked (seen now and then right after the start). Nobody has this message, so
            # sending it again duplicates nothing.
            if not deadline:
                deadline = time.monotonic() + _CONNECT_TIMEOUT_S
            elif time.monotonic() > deadline:
                raise TimeoutError("iceoryx2: no subscriber receives what we publish")
            self._pub.update_connections()
            os.sched_yield()

    def recv(self) -> bytes:
        receive, pause = self._sub.receive, os.sched_yield
        while True:
            s = receive()
            if s is not None:
                p = s.payload()
                data = ctypes.string_at(p.data_ptr, p.number_of_elements)
                s.delete()
                return data
            pause()

    def close(self) -> None:
        # Deleting a publisher can take back what its subscriber has not read yet, and the last
        # message (the harness's "end") must arrive: leave our subscription first, then wait
        # for the peer to leave its own (it has read all it will read), then delete.
        self._sub.delete()
        out = self._services[0]
        deadline = time.monotonic() + 2.0
        while out.dynamic_config.number_of_subscribers and time.monotonic() < deadline:
            time.sleep(0.0005)
        self._pub.delete()
        # drop the node now, which removes its records (an os._exit would leave them)
        del self._services, self._pub, self._sub, self._node


class Iceoryx2Link:
    def __init__(self) -> None:
        self.prefix = f"fable-bench-{os.getpid()}-{time.monotonic_ns()}"

    def setup(self, point: Point) -> None:
        self.size = point.size

    def cleanup(self) -> None:
        # processes killed by a timeout leave their nodes' records; iceoryx2 removes the
        # records of dead nodes (and their services) when asked
        try:
            import iceoryx2 as iox2

            iox2.set_log_level(iox2.LogLevel.Error)
            iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc).try_cleanup_dead_nodes()
        except Exception:
            pass  # leftovers are the library's to clean; the measurement is done

    def end(self, side: int) -> Channel:
        import iceoryx2 as iox2

        iox2.set_log_level(iox2.LogLevel.Error)  # not "no config file was loaded" every time
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)

        def service(direction: int) -> Any:
            return (
                node.service_builder(iox2.ServiceName.new(f"{self.prefix}/{direction}"))
                .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                .enable_safe_overflow(False)  # never overwrite an unread message
                .subscriber_max_buffer_size(256)
                .history_size(0)
                .open_or_create()
            )

        out, inn = service(side), service(1 - side)
        pub = (
            out.publisher_builder()
            .initial_max_slice_len(max(self.size, 1024))
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        sub = inn.subscriber_builder().create()
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while out.dynamic_config.number_of_subscribers < 1:  # nobody would get what we send
            if time.monotonic() > deadline:
                raise TimeoutError("iceoryx2: the other side never subscribed")
            time.sleep(0.001)
        pub.update_connections()
        return _Iceoryx2(node, pub, sub, (out, inn))


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("pyzmq-ipc", "zmq", "pyzmq", lambda: ZmqLink("ipc")),
        Peer("pyzmq-tcp", "zmq", "pyzmq", lambda: ZmqLink("tcp")),
        Peer("mp-pipe", "multiprocessing", "(standard library)", MpPipeLink),
        Peer("zenoh", "zenoh", "eclipse-zenoh", ZenohLink),
        Peer("iceoryx2", "iceoryx2", "iceoryx2", Iceoryx2Link),
    )
}


def missing(name: str) -> str | None:
    """Why peer ``name`` cannot run here (its library is not installed), or None."""
    peer = PEERS[name]
    if find_spec(peer.module) is None:
        return f"{peer.package} is not installed (pip install 'fable-ipc[peers]')"
    return None


def peer_link(name: str) -> Any:
    """A new Link for peer ``name``; ``PeerMissing`` if its library is not installed."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    why = missing(name)
    if why:
        raise PeerMissing(f"peer:{name}: {why}")
    return PEERS[name].make()
