"""What ``fabled`` knows: endpoints (named, owned by a uid) and flows (connections it set up).

Pure state and rules, no I/O: the server calls these methods and turns the exceptions into
error replies. Ownership rules:

- A name belongs to the uid that registered it, for as long as an endpoint holds it. The same
  uid registering it again gets ``NameInUse``; another uid (root included) ``PermissionDenied``.
- ``connect`` to a listener is allowed for the listener's own uid, for the uids the listener
  named in ``allow_uids``, and for root (uid 0), which may connect to anything but take no
  other user's name.
- An endpoint goes with the client connection that registered it: a process that dies loses
  its endpoints as soon as the kernel closes its socket (well within a second).
- A flow lives while at least one of its ends' processes reports it. It belongs to its two
  ends: only a report that holds the secret token both ends got at its creation touches it
  (after a daemon restart, the token of the first end to report it again, which must hold one
  of its end names by then), from the uids of its ends (or root); only those uids may switch
  it (``fable reconfigure``). Counters never go back.
- Over a restart: the daemon saves which uid holds each name and each flow's owners and token
  (hashed) next to its socket (:meth:`Registry.snapshot`); the next daemon reserves them
  (:meth:`Registry.reserve`) for FABLE_RESTART_GRACE seconds: a name only its uid may register
  again, a flow only a report with its token from its owners may adopt.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fable.errors import NameInUse, NameNotFound, PermissionDenied

__all__ = ["Endpoint", "Flow", "Registry"]


@dataclass
class Endpoint:
    name: str
    pid: int
    uid: int
    host: str
    client: int  # the server's id of the client connection that registered it
    affinity: list[int] = field(default_factory=list)
    cpu: int = -1
    node: int = -1
    listening: bool = False
    trusted: bool = False
    allow_uids: frozenset[int] | None = None
    allow_remote: bool = False  # processes on every other host of the cluster may connect
    allow_hosts: frozenset[str] = frozenset()  # ... or those on these hosts
    since: float = field(default_factory=time.time)

    def takes_host(self, host: str) -> bool:
        """Whether a process on ``host`` (another host of the cluster) may connect."""
        return self.listening and (self.allow_remote or host in self.allow_hosts)

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "uid": self.uid,
            "host": self.host,
            "affinity": self.affinity,
            "cpu": self.cpu,
            "node": self.node,
            "listening": self.listening,
            "since": self.since,
        }


@dataclass
class Flow:
    id: int
    ends: tuple[str, str]  # (connecting side, listening side)
    transport: str
    safe: tuple[bool, bool]  # each end's reads, in the order of ends
    reason: str
    epoch: int = 0
    msgs: int = 0
    bytes: int = 0
    last_switch: dict[str, Any] | None = None
    clients: set[int] = field(default_factory=set)  # clients that report it
    # client -> (when, msgs, bytes) of its last report (the triggers' rates come from these)
    counters: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    since: float = field(default_factory=time.time)
    trusted: tuple[bool, bool] | None = None  # each end's trust (None: adopted, see safe)
    hints: dict[str, Any] = field(default_factory=dict)  # pollable, msg_size, mode of connect
    # the latest refused switch an end told of: {ticket, why, at} (fable reconfigure prints it)
    refused: dict[str, Any] | None = None
    # the secret its two ends got at its creation: only a report that holds it touches the
    # flow (ids are public in `fable flows`); and the uids of its ends, who may switch it
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    owners: set[int] = field(default_factory=set)
    adopted: bool = False  # reported again after a restart: its owners are who holds the token
    hosts: tuple[str, str] = ("", "")  # each end's host, in the order of ends
    reconfigurable: bool = True  # False: fable run's flows (a program's one kernel fd)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ends": list(self.ends),
            "transport": self.transport,
            "safe": list(self.safe),
            "epoch": self.epoch,
            "msgs": self.msgs,
            "bytes": self.bytes,
            "reason": self.reason,
            "last_switch": self.last_switch,
            "refused": self.refused,
            "since": self.since,
            "hosts": list(self.hosts),
            "reconfigurable": self.reconfigurable,
        }


# local flow ids stay below this (they start at seconds x 1000, under 1e9): the ids of flows
# between hosts are above it (``ClusterTier.flow_base``)
LOCAL_IDS = 2 * 10**9
# a new flow an end has not reported yet stays this long without its report (its process is
# still setting it up: between hosts that is a TCP connection or two)
FRESH_S = 30.0


class Registry:
    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.flows: dict[int, Flow] = {}
        self.names_of: dict[int, int] = {}  # uid -> how many names it holds
        self.version = 0  # counts changes to names and flows (the daemon saves on change)
        # what the daemon before held, reserved until ``reserved_until`` (monotonic):
        # name -> uid; flow id -> (sha256 of its token, its owners' uids)
        self.reserved_names: dict[str, int] = {}
        self.reserved_flows: dict[int, tuple[str, set[int]]] = {}
        self.reserved_until = 0.0
        # flow ids of a new daemon start past those of an earlier one (whose flows the
        # libraries report again after a restart): seconds since the epoch x 1000
        self._ids = itertools.count(int(time.time()) % 1_000_000 * 1000 + 1)

    # ---------------------------------------------------------------------------- endpoints
    def register(self, ep: Endpoint) -> Endpoint:
        old = self.endpoints.get(ep.name)
        if old is not None:
            if old.uid != ep.uid:
                raise PermissionDenied(f"name {ep.name!r} belongs to another user (uid {old.uid})")
            raise NameInUse(f"name {ep.name!r} is registered already (pid {old.pid})")
        self._expire()
        held = self.reserved_names.get(ep.name)
        if held is not None and held != ep.uid:
            left = self.reserved_until - time.monotonic()
            raise PermissionDenied(
                f"name {ep.name!r} is reserved for uid {held} for {left:.1f} s more: the daemon "
                "restarted and its process registers it again"
            )
        self.version += 1
        self.endpoints[ep.name] = ep
        self.names_of[ep.uid] = self.names_of.get(ep.uid, 0) + 1
        return ep

    def _drop(self, name: str) -> None:
        self.version += 1
        uid = self.endpoints.pop(name).uid
        left = self.names_of.get(uid, 1) - 1
        if left:
            self.names_of[uid] = left
        else:
            self.names_of.pop(uid, None)

    def owned(self, name: str, client: int) -> Endpoint:
        ep = self.endpoints.get(name)
        if ep is None or ep.client != client:
            raise NameNotFound(f"this process has not registered {name!r}")
        return ep

    def unregister(self, name: str, client: int) -> None:
        self.owned(name, client)
        self._drop(name)

    def listener(self, to: str, uid: int) -> Endpoint | None:
        """The listening endpoint ``to`` if ``uid`` may connect to it; None if it is registered
        but not listening (yet); NameNotFound / PermissionDenied otherwise."""
        ep = self.endpoints.get(to)
        if ep is None:
            raise NameNotFound(f"no endpoint is registered as {to!r}")
        if not ep.listening:
            return None
        if uid not in (0, ep.uid) and (ep.allow_uids is None or uid not in ep.allow_uids):
            raise PermissionDenied(f"{to!r} (uid {ep.uid}) does not allow uid {uid} to connect")
        return ep

    def client_gone(self, client: int) -> list[str]:
        """Forget what a closed client connection held; returns the names it had."""
        names = [n for n, ep in self.endpoints.items() if ep.client == client]
        for n in names:
            self._drop(n)
        for fid in [f.id for f in self.flows.values() if client in f.clients]:
            flow = self.flows[fid]
            flow.clients.discard(client)
            flow.counters.pop(client, None)
            if not flow.clients:
                del self.flows[fid]
                self.version += 1
        return names

    # -------------------------------------------------------------------------------- flows
    def new_flow(
        self,
        ends: tuple[str, str],
        transport: str,
        safe: tuple[bool, bool],
        reason: str,
        clients: set[int],
        owners: set[int],
        hosts: tuple[str, str] = ("", ""),
        fid: int | None = None,
    ) -> Flow:
        """A new flow: ``fid`` given for one between hosts (the connecting daemon numbers it,
        ``ClusterTier.flow_base``), else the next local id. ValueError if ``fid`` is taken."""
        if fid is None:
            fid = next(self._ids)
        elif fid in self.flows:
            raise ValueError(f"flow {fid} exists already")
        flow = Flow(fid, ends, transport, safe, reason, clients=set(clients))
        flow.owners = set(owners)
        flow.hosts = hosts
        self.flows[flow.id] = flow
        self.version += 1
        return flow

    # ------------------------------------------------------------------------- restarts
    def snapshot(self) -> dict[str, Any]:
        """What the next daemon must reserve if this one ends now (JSON-able): who holds each
        name, each flow's owners and the hash of its token (never the token)."""
        return {
            "names": {n: ep.uid for n, ep in self.endpoints.items()},
            "flows": {str(f.id): [_digest(f.token), sorted(f.owners)] for f in self.flows.values()},
        }

    def reserve(self, saved: Any, until: float) -> None:
        """Reserve what a daemon before saved (``snapshot``) until monotonic ``until``;
        ``ValueError`` if ``saved`` is not a snapshot (nothing reserved then)."""
        names, flows = saved.get("names"), saved.get("flows")
        if not (isinstance(names, dict) and isinstance(flows, dict)):
            raise ValueError("not a saved registry")
        rnames = {str(n): int(u) for n, u in names.items() if isinstance(u, int)}
        rflows = {
            int(fid): (str(v[0]), {int(u) for u in v[1]})
            for fid, v in flows.items()
            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], list)
        }
        self.reserved_names, self.reserved_flows, self.reserved_until = rnames, rflows, until
        local = [f for f in rflows if f < LOCAL_IDS]  # (flows between hosts: their own ids)
        if local:  # new flow ids start past the saved ones
            self._ids = itertools.count(max(max(local) + 1, next(self._ids)))

    def _expire(self) -> None:
        """Forget the reservations once their grace period is over."""
        if self.reserved_until and time.monotonic() >= self.reserved_until:
            self.reserved_names, self.reserved_flows, self.reserved_until = {}, {}, 0.0

    def flows_of(self, uid: int) -> int:
        """How many flows ``uid`` is an end of."""
        return sum(1 for f in self.flows.values() if uid in f.owners)

    def report(
        self,
        client: int,
        uid: int,
        flows: list[dict[str, Any]],
        now: float,
        earlier: set[int] | None = None,
    ) -> list[tuple[Flow, tuple[float, int, int] | None]]:
        """A client's (of ``uid``) periodic report (at monotonic time ``now``): the flows it
        has open and their counters. A flow it reports that the registry does not know (after
        a daemon restart) is adopted, with the token the report holds. ``PermissionDenied``
        (nothing changed) for a flow whose token it does not hold, or of other users; a
        ``ValueError`` for counters that went back. Returns each reported flow with the
        client's counters before.

        A report too big for one frame comes in parts: ``earlier`` holds the ids the parts
        before reported (None: this part is not the last, so the client's other flows stay)."""
        self._expire()
        for f in flows:  # every check first: a refused report changes nothing
            flow = self.flows.get(f["id"])
            if flow is None and f["id"] in self.reserved_flows:
                # the daemon before saved it: its token and its owners decide
                digest, owners = self.reserved_flows[f["id"]]
                if not _same(_digest(str(f.get("token", ""))), digest):
                    raise PermissionDenied(f"flow {f['id']}: this report does not hold its token")
                if uid != 0 and uid not in owners:
                    raise PermissionDenied(f"flow {f['id']} belongs to other users")
                continue
            if flow is None:
                # not ours (a restart): taken only by a user holding one of its end names now
                # (a process registers its names again before it reports its flows)
                held = [self.endpoints.get(n) for n in f["ends"]]
                if uid != 0 and not any(ep is not None and ep.uid == uid for ep in held):
                    raise PermissionDenied(
                        f"flow {f['id']}: uid {uid} holds neither of its ends {f['ends']}"
                    )
                continue
            if not _same(str(f.get("token", "")), flow.token):
                raise PermissionDenied(f"flow {flow.id}: this report does not hold its token")
            if uid != 0 and not flow.adopted and uid not in flow.owners:
                raise PermissionDenied(f"flow {flow.id} belongs to other users")
            before = flow.counters.get(client)
            if before is not None and (f["msgs"] < before[1] or f["bytes"] < before[2]):
                raise ValueError(f"flow {flow.id}: counters went back")
        seen = set()
        out: list[tuple[Flow, tuple[float, int, int] | None]] = []
        for f in flows:
            fid = f["id"]
            seen.add(fid)
            flow = self.flows.get(fid)
            if flow is None:
                flow = Flow(
                    fid,
                    (f["ends"][0], f["ends"][1]),
                    f["transport"],
                    (f["safe"][0], f["safe"][1]),
                    f["reason"],
                )
                flow.token = str(f.get("token", ""))  # the first end to report it again
                flow.adopted = True
                flow.hosts = f.get("hosts", ("", ""))
                saved = self.reserved_flows.pop(fid, None)
                if saved is not None:  # its owners as they were, not whoever reports first
                    flow.owners = set(saved[1])
                    flow.adopted = False
                self.flows[fid] = flow
                self.version += 1
                if fid < LOCAL_IDS:
                    self._ids = itertools.count(max(fid + 1, next(self._ids)))
            flow.owners.add(uid)  # (an end that holds the token)
            flow.clients.add(client)
            flow.transport, flow.epoch = f["transport"], f["epoch"]
            role = f.get("role", 0)  # the reporting end's own form is the one it knows
            pair = list(flow.safe)
            pair[role] = bool(f["safe"][role])
            flow.safe = (pair[0], pair[1])
            last = f.get("last_switch")
            if isinstance(last, dict) and (
                flow.last_switch is None or last.get("at", 0) >= flow.last_switch.get("at", 0)
            ):
                flow.last_switch = last
            out.append((flow, flow.counters.get(client)))
            flow.counters[client] = (now, f["msgs"], f["bytes"])
            flow.msgs = sum(m for _, m, _ in flow.counters.values())
            flow.bytes = sum(b for _, _, b in flow.counters.values())
        if earlier is None:
            return out
        seen |= earlier
        fresh = time.time() - FRESH_S
        for flow in list(self.flows.values()):
            if client in flow.clients and flow.id not in seen:
                if client not in flow.counters and flow.since > fresh:
                    continue  # not reported yet: its process is still setting it up
                flow.clients.discard(client)
                flow.counters.pop(client, None)
                if not flow.clients:
                    del self.flows[flow.id]
                    self.version += 1
        return out


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # (JSON may hold lone surrogates)


def _digest(token: str) -> str:
    """What a saved registry keeps of a flow's token."""
    return hashlib.sha256(_bytes(token)).hexdigest()


def _same(given: str, secret: str) -> bool:
    """Whether a token given in a request is the secret one, in constant time (any string:
    ``hmac.compare_digest`` takes only ASCII ones)."""
    return hmac.compare_digest(_bytes(given), _bytes(secret))
