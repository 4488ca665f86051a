"""Test hosts: network namespaces on one bridge, each running its own fable daemon.

The paper's name service spans hosts; a test makes its "hosts" here, on one machine:

    namespace fable-<pid>-sw    bridge br0, up, no address
                                  |  port p1      |  port p2     ...
    namespace fable-<pid>-h1    eth0 198.18.0.1/24, lo; fabled with FABLE_HOST_ID=h1
    namespace fable-<pid>-h2    eth0 198.18.0.2/24, lo; fabled with FABLE_HOST_ID=h2
    namespace fable-<pid>-zk    eth0 198.18.0.250/24: ZooKeeper on port 2181 (zookeeper=True)

``<pid>`` is the process that made them. Each host's veth pair is created with one end in the
host and the other in the switch namespace, so nothing is added to the namespace this process
runs in, and the addresses are in 198.18.0.0/15 (set aside for benchmarking, RFC 2544). A
host's daemon has its own ``FABLE_SOCKET`` and ``FABLE_STATE_DIR`` under the cluster's
directory (unix sockets are files: this process reaches every host's daemon through its path,
while TCP between hosts goes over the bridge). ``Host.env`` holds those settings for a process
that should belong to the host; ``Host.run``/``Host.popen`` start one inside its namespace.

The ZooKeeper is a real one, from the Debian ``zookeeper`` package (``java -cp
/usr/share/java/zookeeper.jar ... ZooKeeperServerMain`` with a generated config: ``tickTime=500``,
the admin server off, its data under the cluster's directory); ``Cluster.zookeeper`` stops and
starts it again (with its data, or empty) for failure tests.

``Cluster.close()`` stops the daemons, kills whatever still runs in the namespaces and deletes
them. ``sweep()`` does the same for namespaces whose maker is gone (a run that was killed);
``Cluster`` sweeps before it starts. Needs root (``ip netns``), like the tests that use it.

    python -m fable.testing.cluster sweep     # remove what earlier runs left
    python -m fable.testing.cluster demo      # the cluster tier and its failures (demo.py)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["Cluster", "Host", "ZooKeeper", "finish", "sweep"]

PREFIX = "fable-"
_OURS = re.compile(r"fable-(\d+)-(sw|zk|h\d+)")
NETWORK = "198.18.0"  # hosts are NETWORK.1, .2, ... /24
DAEMON_START_S = 10.0
ZK_JAR = Path("/usr/share/java/zookeeper.jar")  # the Debian package's (`make test` installs it)
ZK_INDEX, ZK_PORT = 250, 2181
ZK_START_S = 30.0


def _ip(*args: str) -> str:
    """Run ``ip`` with ``args``; its output, or RuntimeError with what it said."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


def namespaces() -> list[str]:
    """The network namespaces this module makes (any run's), by name."""
    names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    return [ns for ns in names if _OURS.fullmatch(ns)]


def _kill_inside(ns: str) -> None:
    """SIGKILL every process in namespace ``ns`` (our own children are reaped by whoever
    holds their Popen)."""
    with contextlib.suppress(RuntimeError):
        for pid in _ip("netns", "pids", ns).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _remove(ns: str) -> None:
    _kill_inside(ns)
    with contextlib.suppress(RuntimeError):
        _ip("netns", "del", ns)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Delete the namespaces of runs whose process is gone, killing what runs in them;
    returns their names. (A maker's pid reused since keeps its namespaces until that process
    is gone too.)"""
    gone = []
    for ns in namespaces():
        m = _OURS.fullmatch(ns)
        if m and not _alive(int(m.group(1))):
            _remove(ns)
            gone.append(ns)
    return gone


class Host:
    """One test host: its namespace, address, directory and daemon."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.index = index
        self.name = f"h{index}"
        self.netns = f"{cluster.prefix}{self.name}"
        self.address = f"{NETWORK}.{index}"
        self.dir = cluster.dir / self.name
        self.socket = self.dir / "run" / "fabled.sock"
        self.daemon: subprocess.Popen[bytes] | None = None
        # the settings of a process that belongs to this host
        self.env = {
            "FABLE_HOST_ID": self.name,
            "FABLE_SOCKET": str(self.socket),
            "FABLE_STATE_DIR": str(self.dir / "state"),
        }

    def _argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {**os.environ, **self.env, **(extra or {})}

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host (its namespace and fable settings, plus ``env``) to
        the end; its exit status and output (text)."""
        return subprocess.run(
            self._argv(argv), env=self._env(env), capture_output=True, text=True, timeout=timeout
        )

    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> Any:
        """Start ``argv`` inside this host; the Popen (the caller waits for it)."""
        return subprocess.Popen(self._argv(argv), env=self._env(env), **kw)

    def start_daemon(self, *args: str, env: dict[str, str] | None = None) -> None:
        """Start this host's ``fabled`` (with ``args``, e.g. ``--cluster URL``, and ``env``)
        and wait until it answers (RuntimeError with its output if it does not within
        DAEMON_START_S)."""
        from fable.client import one_shot

        for d in (self.socket.parent, self.dir / "state"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        with open(self.dir / "fabled.out", "ab") as out:  # (the child keeps its own copy)
            self.daemon = self.popen(
                [sys.executable, "-m", "fable.daemon", "--socket", str(self.socket), *args],
                env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + DAEMON_START_S
        while True:
            with contextlib.suppress(OSError):  # (not listening yet, or gone: looked at below)
                if one_shot("hello", self.socket) is not None:
                    return
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                said = (self.dir / "fabled.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name}: its daemon did not start: {said}")
            time.sleep(0.02)

    def crash(self) -> None:
        """Kill every process in this host at once (SIGKILL): a host that dies. Its daemon is
        reaped by ``stop_daemon``."""
        _kill_inside(self.netns)

    def stop_daemon(self) -> None:
        """Stop this host's daemon (SIGTERM, then SIGKILL after 5 s) and reap it."""
        p, self.daemon = self.daemon, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} netns={self.netns}>"


def finish(procs: list[Any], wait: float = 10.0) -> None:
    """End processes started with a pipe on stdin that run until it closes: close every
    stdin, wait up to ``wait`` s for each (then SIGKILL), close their pipes."""
    for p in procs:
        if p.stdin:
            with contextlib.suppress(OSError):
                p.stdin.close()
    for p in procs:
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            if f:
                f.close()


_RUOK = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
        s.sendall(b"ruok")
        sys.exit(0 if s.recv(4) == b"imok" else 1)
except OSError:
    sys.exit(1)
"""


class ZooKeeper:
    """The cluster's ZooKeeper server, in a namespace of its own on the bridge."""

    def __init__(self, cluster: Cluster) -> None:
        self.netns = f"{cluster.prefix}zk"
        self.address = f"{NETWORK}.{ZK_INDEX}"
        self.port = ZK_PORT
        self.dir = cluster.dir / "zk"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        """``address:port``, as a ZooKeeper client takes it."""
        return f"{self.address}:{self.port}"

    def start(self, *, empty: bool = False) -> None:
        """Start the server (``empty``: with its data directory wiped first, as a ZooKeeper
        that lost its disk) and wait until it answers ``ruok``; RuntimeError with its output if
        it does not within ZK_START_S (or if the package is missing)."""
        if self.proc is not None:
            raise RuntimeError("ZooKeeper runs already")
        if not ZK_JAR.exists():
            raise RuntimeError(f"{ZK_JAR} is missing: install the Debian package `zookeeper`")
        data = self.dir / "data"
        if empty:
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "zoo.cfg"
        cfg.write_text(
            "tickTime=500\n"
            f"dataDir={data}\n"
            f"clientPort={self.port}\n"
            f"clientPortAddress={self.address}\n"
            "admin.enableServer=false\n"
            "maxClientCnxns=0\n"
            "4lw.commands.whitelist=ruok,stat\n"
        )
        with open(self.dir / "zookeeper.out", "ab") as out:
            # (jute.maxbuffer: znodes up to 4 MiB, so that tests can write 1 MiB of data)
            java = ["java", "-Xmx256m", "-Djute.maxbuffer=4194304", "-cp", str(ZK_JAR)]
            main = "org.apache.zookeeper.server.ZooKeeperServerMain"
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *java, main, str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + ZK_START_S
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = (self.dir / "zookeeper.out").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"ZooKeeper did not start: {said}")
            time.sleep(0.1)

    def answers(self) -> bool:
        """Whether the server answers ``ruok`` (asked from inside its namespace)."""
        probe = [sys.executable, "-c", _RUOK, self.address, str(self.port)]
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns, *probe],
            capture_output=True,
            timeout=30,
        )
        return r.returncode == 0

    def stop(self) -> None:
        """Kill the server (SIGKILL: a crash, nothing flushed) and reap it."""
        p, self.proc = self.proc, None
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class Cluster:
    """``n`` test hosts on one bridge, each with its daemon running (module docstring), and a
    ZooKeeper when asked. A context manager; ``close()`` removes everything it made, whatever
    happened."""

    def __init__(self, n: int, *, daemons: bool = True, zookeeper: bool = False) -> None:
        if not 1 <= n < ZK_INDEX:
            raise ValueError(f"a cluster has 1 to {ZK_INDEX - 1} hosts")
        sweep()
        self.prefix = f"{PREFIX}{os.getpid()}-"
        if any(ns.startswith(self.prefix) for ns in namespaces()):
            raise RuntimeError(f"this process has a cluster already ({self.prefix}*)")
        self.dir = Path(tempfile.mkdtemp(prefix="fable-cluster-"))
        self.switch = f"{self.prefix}sw"
        self.hosts: list[Host] = []
        self.zookeeper: ZooKeeper | None = None
        self._made: list[str] = []  # namespaces, in the order made
        try:
            self._made.append(self.switch)
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i in range(1, n + 1):
                h = Host(self, i)
                self.hosts.append(h)
                self._plug(h.netns, f"p{i}", h.address)
            if zookeeper:
                self.zookeeper = ZooKeeper(self)
                self._plug(self.zookeeper.netns, "pzk", self.zookeeper.address)
                self.zookeeper.start()
            if daemons:
                for h in self.hosts:
                    h.start_daemon()
        except BaseException:
            self.close()
            raise

    def _plug(self, ns: str, port: str, address: str) -> None:
        """Make namespace ``ns`` with ``eth0`` at ``address``/24, its other end ``port`` on
        the bridge."""
        self._made.append(ns)
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def close(self) -> None:
        """Stop the daemons, kill what runs in the namespaces, delete them and the directory."""
        for h in self.hosts:
            h.stop_daemon()
        if self.zookeeper is not None:
            self.zookeeper.stop()
        for ns in reversed(self._made):
            _remove(ns)
        self._made = []
        self.hosts = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
