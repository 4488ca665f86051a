"""The cluster tier of the name service: ``fable daemon --cluster zk://ADDR[,ADDR...]/ROOT``.

Each daemon publishes its host and its endpoints in ZooKeeper as ephemeral znodes (they go with
its session: a daemon that dies takes its names out of the cluster within the session timeout),
watches the tree and keeps a cache of it for cluster-wide listings. The layout, under ROOT:

    ROOT/hosts/<host id>     ephemeral  {"v": 1, "host", "addresses", "networks",
                                         "pid", "boot", "start", "link"}
                             ("link": "ADDR:PORT" of its daemon link, ``link.py``, or null)
    ROOT/seq/<host id>-NNNNNNNNNN   ephemeral, sequential: a number no other daemon's join got,
                             which makes the ids of flows between hosts unique (``flow_base``)
    ROOT/names/<name>        ephemeral  {"v": 1, "name", "host", "uid", "listening", "remote"}
                             (the name with each '/' written as '+', which names never hold)

Rules:

- A host id is one daemon's. A daemon that finds its host's znode held by a live daemon (the
  same boot id, and that pid alive with the same start time) refuses to start; one left by a
  dead daemon of this boot (its previous session) it replaces; one from another boot (another
  machine with the same id, or this one before a reboot) it waits for, up to the session
  timeout + 1 s, then refuses. A persistent znode where an ephemeral belongs is no daemon's:
  it is replaced.
- A name is unique in the cluster: creating its znode is the claim, and ZooKeeper orders two
  claims (exactly one wins; the other ``register`` raises ``NameInUse``). A znode naming this
  host but another session is this daemon's from before: it is replaced.
- A znode of ours that another client deletes or writes over (nothing stops one: there are
  no ACLs) is put back when its watch fires.
- ZooKeeper unreachable: local registration and rendezvous go on; names registered meanwhile
  are published when it is back (a name another host took in between is a conflict: logged,
  shown by ``fable doctor``, retried). Cluster listings wait up to their timeout and raise
  ``DaemonUnavailable``. Every (re)connection re-reads the tree and republishes what is missing
  (a ZooKeeper that lost its data included: a new session, everything created again).
- What is read from ZooKeeper is checked: a persistent znode, data over MAX_DATA bytes, not
  JSON, or whose fields do not fit (its path's name or host id, types) is ignored and logged
  once per version.
- Threads: kazoo runs its own. Everything here runs on the daemon's event loop: requests go out
  through kazoo's ``*_async`` calls; their results, watch events and session changes come back
  through ``call_soon_threadsafe``. Nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fable.config import HOST_ID, parse_listen
from fable.errors import DaemonUnavailable, FableError, InvalidName, NameInUse
from fable.nameservice import check_name

__all__ = ["ClusterTier", "ClusterURL", "host_facts", "parse_url"]

log = logging.getLogger("fable.daemon")

FORMAT = 1  # the "v" of every znode's data
MAX_DATA = 4096  # bytes of a znode's data read at most (a bigger one is ignored)
JOIN_WAIT_S = 3.0  # a starting daemon waits this long for ZooKeeper, then serves and joins later
OP_TIMEOUT_S = 5.0  # a ZooKeeper request not answered by then is connection trouble
CLAIM_TIMEOUT_S = 2.0  # a register waits this long for its cluster claim, then publishes later
RETRY_S = 1.0  # after a failed sync, the next try
FLOW_SPAN = 10**10  # ids of one daemon's flows between hosts (``flow_base``); local ids < 2e9
ZXID_RESET_S = 1.0  # a connection not back by then may be to a ZooKeeper that lost its data
REFUSED_RETRY_S = 5.0  # a host id held by another daemon: asked again this often (joined late)
DEFAULT_PORT = 2181

_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252})(?::(\d{1,5}))?")
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


# ------------------------------------------------------------------------------------ the URL
@dataclass(frozen=True)
class ClusterURL:
    """Where the cluster's ZooKeeper is: its servers (``address:port``) and the root znode."""

    servers: tuple[str, ...]
    root: str

    def __str__(self) -> str:
        return f"zk://{','.join(self.servers)}{self.root}"


def parse_url(url: str) -> ClusterURL:
    """``zk://ADDR[:PORT][,ADDR[:PORT]...]/ROOT[/...]`` checked (FableError saying what is
    wrong); ADDR is a host name, an IPv4 address or ``[IPv6]``; PORT defaults to 2181."""
    m = re.fullmatch(r"zk://([^/]*)(/.*)?", url)
    if m is None:
        raise FableError(f"cluster {url!r}: expected zk://ADDR[:PORT][,ADDR[:PORT]...]/ROOT")
    servers = []
    for part in m.group(1).split(","):
        hp = _HOSTPORT.fullmatch(part)
        port = int(hp.group(2) or DEFAULT_PORT) if hp else 0
        if hp is None or not 0 < port < 65536:
            raise FableError(f"cluster {url!r}: {part!r} is not ADDR[:PORT]")
        servers.append(f"{hp.group(1)}:{port}")
    root = m.group(2) or ""
    segs = root.split("/")[1:]
    if not segs or not all(_SEGMENT.fullmatch(s) for s in segs) or segs[0] == "zookeeper":
        raise FableError(
            f"cluster {url!r}: the root is /NAME[/NAME...] (letters, digits, '.', '_', '-'; "
            "not /zookeeper), e.g. zk://10.0.0.5:2181/fable"
        )
    return ClusterURL(tuple(servers), root)


# ------------------------------------------------------------------------------- host facts
def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; /proc/PID/stat field 22), or None
    if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def host_facts(host: str, link: str | None = None) -> dict[str, Any]:
    """This host's znode data: its id, its addresses and networks (loopback and link-local
    left out), who this daemon is (pid, boot id, start time: to tell a live daemon's znode
    from a dead one's) and where its daemon link listens (``link``: ADDR:PORT, or None)."""
    import psutil

    addresses, networks = [], []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name not in ("AF_INET", "AF_INET6") or not a.netmask:
                continue
            try:
                iface = ipaddress.ip_interface(f"{a.address.split('%')[0]}/{a.netmask}")
            except ValueError:
                continue
            if iface.ip.is_loopback or iface.ip.is_link_local:
                continue
            addresses.append(str(iface.ip))
            networks.append(str(iface.network))
    pid = os.getpid()
    return {
        "v": FORMAT,
        "host": host,
        "addresses": sorted(set(addresses)),
        "networks": sorted(set(networks)),
        "pid": pid,
        "boot": _boot_id(),
        "start": _start_time(pid),
        "link": link,
    }


def znode_name(name: str) -> str:
    """The znode of endpoint ``name`` under ROOT/names ('/' -> '+')."""
    return name.replace("/", "+")


# --------------------------------------------------------------------------- checking data
class _Bad(ValueError):
    """A znode's data that is not what a daemon writes (why, for the log)."""


def _load(data: bytes | None) -> dict[str, Any]:
    if data is None or len(data) > MAX_DATA:
        raise _Bad(f"{len(data or b'')} bytes of data, more than {MAX_DATA}")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _Bad("its data is not JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != FORMAT:
        raise _Bad(f"its data is not a format-{FORMAT} object")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_host(child: str, data: bytes | None) -> dict[str, Any]:
    """A ROOT/hosts znode's data, checked (``_Bad`` if not a daemon's)."""
    obj = _load(data)
    if obj.get("host") != child or not HOST_ID.fullmatch(child):
        raise _Bad("its host id is not its znode's name")
    for key in ("addresses", "networks"):
        v = obj.get(key)
        if not isinstance(v, list) or len(v) > 256 or not all(isinstance(x, str) for x in v):
            raise _Bad(f"{key} is not a list of strings")
    if not _is_int(obj.get("pid")) or not isinstance(obj.get("boot"), str):
        raise _Bad("pid or boot missing")
    if obj.get("start") is not None and not _is_int(obj.get("start")):
        raise _Bad("start is not an int")
    link = obj.get("link")
    if link is not None:
        try:
            parse_listen(link if isinstance(link, str) else "")
        except ValueError:
            raise _Bad("link is not ADDR:PORT") from None
    return obj


def check_endpoint(child: str, data: bytes | None) -> dict[str, Any]:
    """A ROOT/names znode's data, checked (``_Bad`` if not a daemon's)."""
    obj = _load(data)
    name = obj.get("name")
    try:
        if not isinstance(name, str) or check_name(name) != name or znode_name(name) != child:
            raise _Bad("its name is not its znode's")
    except InvalidName:
        raise _Bad("its name is not a valid name") from None
    if not isinstance(obj.get("host"), str) or not HOST_ID.fullmatch(obj["host"]):
        raise _Bad("its host is not a host id")
    if not _is_int(obj.get("uid")) or not 0 <= obj["uid"] < 1 << 32:
        raise _Bad("its uid is not a uid")
    if not isinstance(obj.get("listening"), bool) or not isinstance(obj.get("remote"), bool):
        raise _Bad("listening or remote is not a bool")
    return {k: obj[k] for k in ("name", "host", "uid", "listening", "remote")}


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# ------------------------------------------------------------------------------- the tier
class ClusterTier:
    """One daemon's membership in the cluster (module docstring). The daemon calls
    :meth:`start` once (FableError: this host id is another live daemon's), :meth:`claim` for
    each name it registers, :meth:`changed` when its endpoints change, :meth:`listing` for
    ``fable ls --cluster``, :meth:`status` for ``fable doctor`` and :meth:`stop` at the end.
    ``want`` returns what it holds now: name -> {"uid", "listening", "remote"}."""

    def __init__(
        self,
        url: ClusterURL,
        host: str,
        session_s: float,
        want: Callable[[], dict[str, dict[str, Any]]],
    ) -> None:
        self.url = url
        self.host = host
        self.session_s = session_s
        self.want = want
        self.state = "connecting"  # connecting, connected, suspended, lost, stopped
        self.session: int | None = None  # the session our ephemerals belong to
        self.joined = False  # our host znode is ours in this session
        self.refused = ""  # why another daemon holds our host id (then we do not join)
        self._host_data = b""  # our host znode's data
        self.link: str | None = None  # our daemon link's ADDR:PORT, set before ``start``
        self.number: int | None = None  # our join's number (ROOT/seq): ``flow_base``
        self.hosts: dict[str, dict[str, Any]] = {}  # the cache: host id -> its data
        self.names: dict[str, dict[str, Any]] = {}  # name -> its data
        self.published: dict[str, bytes] = {}  # our name znodes in this session -> data
        self._versions: dict[str, int] = {}
        self.conflicts: dict[str, str] = {}  # name -> the host that holds it instead of us
        self.claiming: set[str] = set()
        self.synced = asyncio.Event()  # the cache is whole for this connection
        self._dirty = asyncio.Event()
        self._first = asyncio.Event()  # the first join attempt ended (joined or refused)
        self._reread = True  # watches are gone (a new connection): read the whole tree
        self._kicked: set[str] = set()  # paths whose watch fired
        self._logged: set[tuple[str, int]] = set()  # (path, mzxid) of bad data, logged once
        self._task: asyncio.Future[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.zk: Any = None

    # -------------------------------------------------------------------------- lifecycle
    async def start(self, wait: float = JOIN_WAIT_S) -> None:
        """Connect and claim this host id, waiting at most ``wait`` s for ZooKeeper (then the
        daemon serves locally and joins when it answers); FableError if a live daemon holds
        this host id, or kazoo is missing."""
        try:
            from kazoo.client import KazooClient
            from kazoo.retry import KazooRetry
        except ImportError:
            raise FableError("--cluster needs kazoo: pip install 'fable-ipc[cluster]'") from None
        logging.getLogger("kazoo").setLevel(logging.ERROR)  # (it logs every refused reconnect)
        self.loop = asyncio.get_running_loop()
        self.zk = KazooClient(
            hosts=",".join(self.url.servers),
            timeout=self.session_s,
            # reconnect soon after ZooKeeper is back: every 0.5 s at most
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=1.5, max_delay=0.5),
        )
        self.zk.add_listener(self._on_state)
        self._task = asyncio.ensure_future(self._run())
        self.zk.start_async()
        try:
            await asyncio.wait_for(self._first.wait(), wait)
        except TimeoutError:
            if self.state == "connected":  # it answers: our host id's holder may be going
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._first.wait(), self.session_s + 2.0)
        if not self._first.is_set():
            log.warning(
                "cluster %s: ZooKeeper does not answer (%s): serving locally, joining when it does",
                self.url,
                self.state,
            )
        if self.refused:
            self.stop()
            raise FableError(self.refused)
        if self.joined:
            log.info("cluster %s: joined as host %s", self.url, self.host)

    def stop(self) -> None:
        """Leave: the session ends, so the cluster drops our znodes at once (waits at most 2 s
        for ZooKeeper; after that the session times out)."""
        self.state = "stopped"
        if self._task is not None:
            self._task.cancel()
        zk, self.zk = self.zk, None
        if zk is None:
            return

        def close() -> None:
            with contextlib.suppress(Exception):
                zk.stop()
                zk.close()

        t = threading.Thread(target=close, name="fable-cluster-stop", daemon=True)
        t.start()
        t.join(2.0)

    def changed(self) -> None:
        """The daemon's endpoints changed: publish them."""
        self._dirty.set()

    # ----------------------------------------------------------- kazoo's threads -> the loop
    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon stopped
            loop.call_soon_threadsafe(fn, *args)

    def _on_state(self, state: str) -> None:  # (kazoo's thread)
        sid = None
        with contextlib.suppress(Exception):
            cid = self.zk.client_id if self.zk is not None else None
            sid = cid[0] if cid else None
        self._to_loop(self._state_now, str(state), sid)

    def _on_watch(self, event: Any) -> None:  # (kazoo's thread)
        self._to_loop(self._kick, event.path)

    def _state_now(self, state: str, sid: int | None) -> None:
        if self.state == "stopped":
            return
        was, self.state = self.state, state.lower()
        if self.state != was:
            shown = sid if self.state == "connected" else self.session
            log.info("cluster %s: %s (session %s)", self.url, self.state, _hex(shown))
        if self.state != "connected":
            self.synced.clear()
            if self.state == "suspended" and was != "suspended":
                self.loop.call_later(ZXID_RESET_S, self._forget_zxid, self.zk)  # type: ignore[union-attr]
            return
        self._reread = True  # kazoo forgot our watches when the connection dropped
        self._dirty.set()

    def _forget_zxid(self, zk: Any) -> None:
        """Still not reconnected: let kazoo's next attempt say it saw no transaction. A server
        refuses a client that saw a later transaction than its own (so that it reads nothing
        older); a ZooKeeper restarted with an empty data dir would refuse us forever. The
        server then gives our session back if it knows it, else a new one (its ephemerals are
        published again, `_sync`); the tree is read again either way."""
        if zk is self.zk and self.state == "suspended":
            zk.last_zxid = 0

    def _kick(self, path: str) -> None:
        self._kicked.add(path)
        self._dirty.set()

    async def _call(self, method: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run kazoo's ``method`` (an ``*_async`` one) and await its result (TimeoutError
        after OP_TIMEOUT_S, kazoo's exceptions as they are)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(res: Any) -> None:
            if fut.done():
                return
            if res.successful():
                fut.set_result(res.value)
            else:
                fut.set_exception(res.exception)

        method(*args, **kw).rawlink(lambda res: self._to_loop(settle, res))
        return await asyncio.wait_for(fut, OP_TIMEOUT_S)

    # ------------------------------------------------------------------------- the sync task
    async def _run(self) -> None:
        from kazoo.exceptions import KazooException

        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self.state != "connected" or self.zk is None:
                continue
            try:
                await self._sync()
            except (KazooException, TimeoutError) as e:
                if self.state == "connected":
                    log.warning("cluster %s: %s; trying again", self.url, type(e).__name__)
                    self.loop.call_later(RETRY_S, self._dirty.set)  # type: ignore[union-attr]
            except Exception:
                if self.state == "stopped":  # (a sync that ran on after stop(): asyncio's
                    return  # wait_for of 3.11 may drop a cancel that meets a result)
                log.exception("cluster %s: sync failed", self.url)
                self.loop.call_later(RETRY_S, self._dirty.set)  # type: ignore[union-attr]

    async def _sync(self) -> None:
        """Make ZooKeeper and the cache agree with this daemon: a new session claims the host
        again and republishes; a new connection re-reads the tree (setting fresh watches);
        then the watched paths that fired are read again and our endpoints published."""
        cid = self.zk.client_id
        sid = cid[0] if cid else None
        if sid != self.session:  # a new session: our ephemerals of the old one are gone
            self.session, self.joined = sid, False
            self.published.clear()
            self._versions.clear()
            self._reread = True
        if not self.joined:
            for d in ("hosts", "names"):
                await self._call(self.zk.ensure_path_async, f"{self.url.root}/{d}")
            await self._claim_host()
            if self.joined and self.number is None:
                await self._take_number()
            self._first.set()
            if not self.joined:
                self.loop.call_later(REFUSED_RETRY_S, self._dirty.set)  # type: ignore[union-attr]
                return
        if self._reread:
            self._reread = False
            self._kicked.clear()
            await self._read_dir("hosts", everything=True)
            await self._read_dir("names", everything=True)
            self.synced.set()
        kicked, self._kicked = self._kicked, set()
        for d in ("hosts", "names"):
            if f"{self.url.root}/{d}" in kicked:
                await self._read_dir(d)
        for path in kicked:
            d, _, child = path[len(self.url.root) + 1 :].partition("/")
            if child and d in ("hosts", "names"):
                await self._read_node(d, child)
        if not self.joined:  # our host znode went: claim it again first (the next turn)
            return
        await self._publish()

    async def _read_dir(self, d: str, everything: bool = False) -> None:
        """Read ROOT/d's children (watching them); those new to the cache (or all of them)
        are read (watching their data), those gone leave the cache."""
        cache = self.hosts if d == "hosts" else self.names
        children = await self._call(
            self.zk.get_children_async, f"{self.url.root}/{d}", watch=self._on_watch
        )
        now = set(children)
        for gone in [c for c in cache if (znode_name(c) if d == "names" else c) not in now]:
            del cache[gone]
            self._not_ours_now(d, gone, None, None)
        known = {znode_name(c) if d == "names" else c for c in cache}
        todo = [c for c in now if everything or c not in known]
        await asyncio.gather(*(self._read_node(d, c) for c in todo))

    async def _read_node(self, d: str, child: str) -> None:
        from kazoo.exceptions import NoNodeError

        path = f"{self.url.root}/{d}/{child}"
        key = child.replace("+", "/") if d == "names" else child
        cache = self.hosts if d == "hosts" else self.names
        try:
            data, stat = await self._call(self.zk.get_async, path, watch=self._on_watch)
        except NoNodeError:
            cache.pop(key, None)
            self._not_ours_now(d, key, None, None)
            return
        self._not_ours_now(d, key, data, stat)
        try:
            if stat.ephemeralOwner == 0:
                raise _Bad("persistent: no daemon's (a daemon's znodes are ephemeral)")
            obj = check_host(child, data) if d == "hosts" else check_endpoint(child, data)
        except _Bad as e:
            cache.pop(key, None)
            if (path, stat.mzxid) not in self._logged:
                self._logged.add((path, stat.mzxid))
                if len(self._logged) > 4096:  # (a flood of bad znodes: forget the oldest)
                    self._logged = set(list(self._logged)[2048:])
                log.warning("cluster %s: ignoring znode %s: %s", self.url, path, e)
            return
        cache[key] = obj

    def _not_ours_now(self, d: str, key: str, data: bytes | None, stat: Any) -> None:
        """A znode of ours read as gone, another session's or with other data (another client
        deleted or wrote it; nobody may): publish it again (the host: claim it again)."""
        if d == "names":
            ours = self.published.get(key)
        else:
            ours = self._host_data if key == self.host and self.joined else None
        if ours is None or (
            stat is not None and stat.ephemeralOwner == self.session and data == ours
        ):
            return
        log.warning(
            "cluster %s: %s/%s was deleted or changed by another client: putting it back",
            self.url,
            d,
            key,
        )
        if d == "names":
            self.published.pop(key, None)
            self._versions.pop(key, None)
        else:
            self.joined = False
        self._dirty.set()

    # ------------------------------------------------------------------------------- claims
    async def _create(self, path: str, data: bytes) -> tuple[bytes, Any] | None:
        """Create the ephemeral znode ``path`` with ``data``: None when made, else the data
        and stat of the one that stands there (TimeoutError if it keeps coming and going)."""
        from kazoo.exceptions import NodeExistsError, NoNodeError

        for _ in range(5):
            try:
                await self._call(self.zk.create_async, path, data, ephemeral=True)
                return None
            except NodeExistsError:
                pass
            with contextlib.suppress(NoNodeError):  # (gone meanwhile: create it again)
                got: tuple[bytes, Any] = await self._call(self.zk.get_async, path)
                return got
        raise TimeoutError(f"{path} keeps coming and going")

    async def _claim_host(self) -> None:
        """Create our host znode, or find out whose it is (module docstring)."""
        from kazoo.exceptions import BadVersionError, NoNodeError

        path = f"{self.url.root}/hosts/{self.host}"
        data = self._host_data = _dumps(host_facts(self.host, self.link))
        waited_until: float | None = None
        while True:
            there = await self._create(path, data)
            if there is None:
                self.joined, self.refused = True, ""
                return
            got, stat = there
            if stat.ephemeralOwner == self.session:  # ours, maybe written over by another
                if got != data:
                    await self._call(self.zk.set_async, path, data, version=stat.version)
                self.joined, self.refused = True, ""
                return
            why = self._holder(got, stat.ephemeralOwner)
            if why is None:
                # a dead daemon's znode (or one no daemon wrote): ours to replace
                log.warning(
                    "cluster %s: replacing the znode of %s left by a daemon that is gone "
                    "(or not a daemon's)",
                    self.url,
                    path,
                )
                with contextlib.suppress(NoNodeError, BadVersionError):
                    await self._call(self.zk.delete_async, path, version=stat.version)
                continue
            if why:  # a live daemon of this boot
                self.refused = why
                log.error("cluster %s: %s", self.url, why)
                return
            # another boot's daemon: its session ends within its timeout if it is dead
            now = time.monotonic()
            if waited_until is None:
                waited_until = now + self.session_s + 1.0
                log.warning(
                    "cluster %s: %s is held by another boot's daemon; waiting up to %.1f s "
                    "for its session to end",
                    self.url,
                    path,
                    self.session_s + 1.0,
                )
            if now >= waited_until:
                self.refused = (
                    f"host id {self.host!r} is held in the cluster by a daemon of another boot "
                    f"(ZooKeeper session {_hex(stat.ephemeralOwner)}) that is still alive: each "
                    "daemon needs its own FABLE_HOST_ID"
                )
                log.error("cluster %s: %s", self.url, self.refused)
                return
            await asyncio.sleep(0.25)

    async def _take_number(self) -> None:
        """A number no other join got (ZooKeeper's sequence under ROOT/seq), once."""
        path = await self._call(
            self.zk.create_async,
            f"{self.url.root}/seq/{self.host}-",
            b"",
            ephemeral=True,
            sequence=True,
            makepath=True,
        )
        self.number = int(str(path).rsplit("-", 1)[1])

    def flow_base(self) -> int | None:
        """The first id of this daemon's flows between hosts (None: not numbered yet): ids
        ``(number + 1) * FLOW_SPAN + n``, above every local flow id (``Registry``) and apart
        from every other daemon's."""
        return None if self.number is None else (self.number + 1) * FLOW_SPAN

    def _holder(self, data: bytes | None, owner: int) -> str | None:
        """Who holds our host znode with ``data``: None if nobody alive (a persistent znode,
        bad data, or a dead daemon of this boot), "" if a daemon of another boot, else why
        we refuse (a live daemon of this boot)."""
        if owner == 0:
            return None
        try:
            info = check_host(self.host, data)
        except _Bad:
            return ""  # not ours to judge at once: wait for its session like another boot's
        if info["boot"] != _boot_id():
            return ""
        pid = info["pid"]
        if pid == os.getpid() or _start_time(pid) != info["start"]:
            return None
        return (
            f"host id {self.host!r} is held in the cluster by fabled pid {pid} on this machine "
            f"(ZooKeeper session {_hex(owner)}): each daemon needs its own FABLE_HOST_ID"
        )

    def _endpoint_data(self, name: str, ep: dict[str, Any]) -> bytes:
        return _dumps(
            {
                "v": FORMAT,
                "name": name,
                "host": self.host,
                "uid": int(ep["uid"]),
                "listening": bool(ep["listening"]),
                "remote": bool(ep.get("remote", False)),
            }
        )

    async def _put(self, name: str, data: bytes) -> str:
        """Publish endpoint ``name`` with ``data``: "" when done, else the host that holds
        the name (kazoo's errors and TimeoutError pass through)."""
        from kazoo.exceptions import BadVersionError, NoNodeError

        path = f"{self.url.root}/names/{znode_name(name)}"
        sid = self.session
        for _ in range(5):  # (each turn follows a change by someone else; a few are plenty)
            if name in self.published:
                try:
                    stat = await self._call(
                        self.zk.set_async, path, data, version=self._versions[name]
                    )
                    self.published[name], self._versions[name] = data, stat.version
                    return ""
                except (NoNodeError, BadVersionError):
                    self.published.pop(name, None)
            there = await self._create(path, data)
            if there is None:
                self.published[name], self._versions[name] = data, 0
                self.conflicts.pop(name, None)
                return ""
            got, stat = there
            if stat.ephemeralOwner == sid:  # ours (a claim that timed out, then landed)
                self.published[name], self._versions[name] = got, stat.version
                continue
            try:
                holder = check_endpoint(znode_name(name), got)["host"]
            except _Bad:
                holder = ""
            if stat.ephemeralOwner != 0 and holder != self.host:
                return holder or "an unknown holder (its znode is not a daemon's)"
            # ours from an earlier session, or a persistent znode no daemon wrote
            log.warning(
                "cluster %s: replacing %s (an earlier session's, or not a daemon's)", self.url, path
            )
            with contextlib.suppress(NoNodeError, BadVersionError):
                await self._call(self.zk.delete_async, path, version=stat.version)
        raise TimeoutError(f"{path} keeps changing")

    async def claim(self, name: str, ep: dict[str, Any]) -> None:
        """Claim ``name`` for endpoint ``ep`` in the cluster: NameInUse if another host holds
        it. Not joined, or ZooKeeper slow or gone: the name is published later (returns)."""
        from kazoo.exceptions import KazooException

        if self.state != "connected" or not self.joined:
            return
        self.claiming.add(name)
        try:
            holder = await asyncio.wait_for(
                self._put(name, self._endpoint_data(name, ep)), CLAIM_TIMEOUT_S
            )
        except (KazooException, TimeoutError):
            self._dirty.set()
            return
        finally:
            self.claiming.discard(name)
        if holder:
            raise NameInUse(f"name {name!r} is registered on host {holder}")

    async def _publish(self) -> None:
        """Our endpoints, as the daemon holds them now, into ZooKeeper: new and changed ones
        put, gone ones deleted (only znodes of this session)."""
        from kazoo.exceptions import BadVersionError, NoNodeError

        want = {n: ep for n, ep in self.want().items() if n not in self.claiming}
        for name in [n for n in self.published if n not in want and n not in self.claiming]:
            path = f"{self.url.root}/names/{znode_name(name)}"
            with contextlib.suppress(NoNodeError, BadVersionError):
                await self._call(self.zk.delete_async, path, version=self._versions[name])
            self.published.pop(name, None)
            self._versions.pop(name, None)
        for name in [n for n in self.conflicts if n not in want]:
            del self.conflicts[name]
        for name, ep in want.items():
            data = self._endpoint_data(name, ep)
            if self.published.get(name) == data:
                continue
            holder = await self._put(name, data)
            if holder and self.conflicts.get(name) != holder:
                log.warning(
                    "cluster %s: %s is held by host %s: it stays local to this host",
                    self.url,
                    name,
                    holder,
                )
            if holder:
                self.conflicts[name] = holder

    # ---------------------------------------------------------------------------- answers
    async def listing(self, timeout: float) -> list[dict[str, Any]]:
        """Every host's endpoints as the cluster holds them, by name; DaemonUnavailable if
        ZooKeeper does not answer within ``timeout`` s."""
        try:
            await asyncio.wait_for(self.synced.wait(), max(0.0, timeout))
        except TimeoutError:
            raise DaemonUnavailable(
                f"the cluster's ZooKeeper ({self.url}) did not answer within {timeout:g} s "
                f"(this daemon: {self.state})"
            ) from None
        return [self.names[n] for n in sorted(self.names)]

    def link_of(self, host: str) -> tuple[str, int] | None:
        """Where ``host``'s daemon takes connections from other hosts (None: nowhere)."""
        got = self.hosts.get(host)
        link = None if got is None else got.get("link")
        return None if not isinstance(link, str) else parse_listen(link)

    def addresses_of(self, host: str) -> list[str]:
        """``host``'s addresses as its znode lists them ([] for a host the cluster lacks)."""
        got = self.hosts.get(host)
        return [] if got is None else list(got.get("addresses", []))

    def host_of(self, name: str) -> str | None:
        """The host that holds ``name`` as the cache has it (None: unknown to the cluster)."""
        got = self.names.get(name)
        return None if got is None else str(got["host"])

    def status(self) -> dict[str, Any]:
        """The cluster state for ``fable doctor``."""
        want = self.want()
        return {
            "url": str(self.url),
            "host": self.host,
            "state": self.state,
            "session": _hex(self.session),
            "joined": self.joined,
            "refused": self.refused,
            "link": self.link,
            "hosts": sorted(self.hosts),
            "names": len(self.names),
            "published": len(self.published),
            "pending": sorted(
                n for n in want if n not in self.published and n not in self.conflicts
            ),
            "conflicts": dict(sorted(self.conflicts.items())),
        }


def _hex(sid: int | None) -> str:
    return "-" if sid is None else f"0x{sid:x}"
