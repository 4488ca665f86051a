"""Every fable setting, in one place, read from ``FABLE_*`` environment variables.

A setting is read when :func:`settings` is first called (and again after :func:`reload`);
API calls that take a keyword argument for the same thing let it override the setting.
``fable doctor`` prints the values in force and where each came from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings", "parse_listen", "reload", "settings", "state_dir"]

logger = logging.getLogger("fable")
HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what FABLE_HOST_ID may be


def _default_state_dir() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "fable"


@dataclass(frozen=True)
class Settings:
    """The settings in force. Each field names its environment variable in ``metadata``."""

    ring_size: int = field(
        default=4 << 20,
        metadata={
            "env": "FABLE_RING_SIZE",
            "help": "bytes of buffer space per direction of a connection (the staging area of "
            "the socket transports, the ring of the shared-memory ones); a power of two",
        },
    )
    read_buffers: int = field(
        default=1024,
        metadata={
            "env": "FABLE_READ_BUFFERS",
            "help": "read buffers the application may hold before getreadbuf raises NoSpace",
        },
    )
    max_message: int = field(
        default=1 << 30,
        metadata={
            "env": "FABLE_MAX_MESSAGE",
            "help": "largest message recv() reassembles (a peer sending more fails with "
            "ProtocolError); getreadbuf streams fragments and has no such limit",
        },
    )
    max_fragments: int = field(
        default=65536,
        metadata={
            "env": "FABLE_MAX_FRAGMENTS",
            "help": "most fragments (commits with more=True) recv() reassembles into one "
            "message (a peer sending more fails with ProtocolError)",
        },
    )
    max_peer_ring: int = field(
        default=256 << 20,
        metadata={
            "env": "FABLE_MAX_PEER_RING",
            "help": "largest ring or shared area (bytes per direction) this side maps when a "
            "peer offers it (a larger offer is refused); apart from FABLE_RING_SIZE, so that "
            "two processes with different ring sizes still connect",
        },
    )
    setup_timeout_s: float = field(
        default=10.0,
        metadata={
            "env": "FABLE_SETUP_TIMEOUT",
            "help": "seconds a peer has, in all, to send its whole first offer",
        },
    )
    peer_timeout_s: float = field(
        default=10.0,
        metadata={
            "env": "FABLE_PEER_TIMEOUT",
            "help": "between hosts: seconds after which a peer that stopped answering (its link "
            "down, its host gone) is dead: PeerDied (TCP keepalive and TCP_USER_TIMEOUT); also "
            "the most a connect waits for the other host's daemon",
        },
    )
    listen: str = field(
        default="",
        metadata={
            "env": "FABLE_LISTEN",
            "help": "daemon: ADDR:PORT where it takes connections from other hosts' daemons "
            "(empty: none; `fable daemon --listen` overrides; needs a cluster)",
        },
    )
    # Spin budget: on this machine kind (2-vCPU KVM guest) `fable bench --sizes 64 --pairs 0:1
    # --transports mempipe-futex,mempipe-spin` measured a 64 B cross-core round trip of ~90 us
    # (futex) against ~3 us (spin), so a sleeping hop costs ~45 us of wake-up. Spinning up to
    # 50 us (about one wake-up) wins whenever the answer comes within that time, and costs at
    # most one wake-up's worth of CPU otherwise.
    spin_budget_ns: int = field(
        default=50_000,
        metadata={
            "env": "FABLE_SPIN_BUDGET_NS",
            "help": "how long an adaptive wait spins before it yields and then sleeps",
        },
    )
    grace_period_s: float = field(
        default=5.0,
        metadata={
            "env": "FABLE_GRACE_PERIOD",
            "help": "seconds old-epoch buffers may still be used after a reconfiguration",
        },
    )
    close_linger_s: float = field(
        default=5.0,
        metadata={
            "env": "FABLE_CLOSE_LINGER",
            "help": "seconds close() waits to hand queued messages to a slow reader",
        },
    )
    triggers: bool = field(
        default=True,
        metadata={
            "env": "FABLE_TRIGGERS",
            "help": "the daemon's automatic reconfiguration triggers on/off (daemon/triggers.py)",
        },
    )
    trigger_dwell_s: float = field(
        default=3.0,
        metadata={
            "env": "FABLE_TRIGGER_DWELL",
            "help": "seconds a flow keeps its transport before a trigger other than placement "
            "moves it again (hysteresis)",
        },
    )
    # What one daemon serves (daemon/server.py): limits against a flood from other local
    # users, each refused with a clear error and a line in the daemon log. Per-uid limits apply
    # to every uid but the daemon's own (root for the system daemon), which only the totals bound.
    max_conns: int = field(
        default=4096,
        metadata={
            "env": "FABLE_MAX_CONNS",
            "help": "daemon: client connections it serves in all (more are refused)",
        },
    )
    max_conns_per_uid: int = field(
        default=256,
        metadata={
            "env": "FABLE_MAX_CONNS_PER_UID",
            "help": "daemon: client connections of one uid (processes using fable, CLI calls)",
        },
    )
    max_names_per_uid: int = field(
        default=1024,
        metadata={
            "env": "FABLE_MAX_NAMES_PER_UID",
            "help": "daemon: endpoint names one uid may hold at once",
        },
    )
    max_flows_per_uid: int = field(
        default=16384,
        metadata={
            "env": "FABLE_MAX_FLOWS_PER_UID",
            "help": "daemon: flows (connections) one uid may have at once",
        },
    )
    idle_timeout_s: float = field(
        default=60.0,
        metadata={
            "env": "FABLE_IDLE_TIMEOUT",
            "help": "daemon: seconds a client connection may send nothing before it is closed "
            "(the library reports every second)",
        },
    )
    frame_timeout_s: float = field(
        default=5.0,
        metadata={
            "env": "FABLE_FRAME_TIMEOUT",
            "help": "daemon: seconds a client has for its hello after connecting, and to "
            "finish a frame it began, before it is closed",
        },
    )
    restart_grace_s: float = field(
        default=10.0,
        metadata={
            "env": "FABLE_RESTART_GRACE",
            "help": "daemon: seconds after a restart during which the names and flows of the "
            "daemon before stay reserved for their uids (their processes register them again)",
        },
    )
    host_id: str = field(
        default="",
        metadata={
            "env": "FABLE_HOST_ID",
            "help": "daemon: this host's id among hosts (empty: /etc/machine-id); letters, "
            "digits, '.', '_' and '-', at most 64, starting with a letter or digit",
        },
    )
    cluster: str = field(
        default="",
        metadata={
            "env": "FABLE_CLUSTER",
            "help": "daemon: the cluster it joins, zk://ADDR[:PORT][,ADDR[:PORT]...]/ROOT "
            "(empty: none; `fable daemon --cluster` overrides)",
        },
    )
    cluster_session_s: float = field(
        default=10.0,
        metadata={
            "env": "FABLE_CLUSTER_SESSION",
            "help": "daemon: ZooKeeper session timeout in seconds: a dead daemon's names leave "
            "the cluster this long after it died (the server bounds it: 2 to 20 ticks)",
        },
    )
    state_dir: Path = field(
        default_factory=_default_state_dir,
        metadata={"env": "FABLE_STATE_DIR", "help": "daemon log, calibration table"},
    )
    socket: str = field(
        default="",
        metadata={
            "env": "FABLE_SOCKET",
            "help": "daemon socket (empty: the per-user one if a daemon answers, else the "
            "system one, else start a per-user daemon)",
        },
    )
    log_level: str = field(
        default="WARNING",
        metadata={"env": "FABLE_LOG_LEVEL", "help": "level of the 'fable' logger"},
    )
    backend: str = field(
        default="auto",
        metadata={"env": "FABLE_BACKEND", "help": "ring backend: auto, c or py"},
    )

    def describe(self) -> list[tuple[str, str, str, str]]:
        """(name, value, environment variable, source) for each setting."""
        rows = []
        for f in dataclasses.fields(self):
            env = f.metadata["env"]
            source = "environment" if env in os.environ else "default"
            rows.append((f.name, str(getattr(self, f.name)), env, source))
        return rows


def _parse(f: dataclasses.Field[object], raw: str) -> object:
    name = f.metadata["env"]
    kind = type(f.default) if f.default is not dataclasses.MISSING else Path
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw, 0)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw).expanduser()
        return raw.strip()
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def _validate(s: Settings) -> None:
    if s.ring_size < 4096 or s.ring_size & (s.ring_size - 1):
        raise ValueError(f"FABLE_RING_SIZE={s.ring_size} must be a power of two >= 4096")
    if s.read_buffers < 1:
        raise ValueError("FABLE_READ_BUFFERS must be >= 1")
    if s.max_message < 1 or s.max_fragments < 1:
        raise ValueError("FABLE_MAX_MESSAGE and FABLE_MAX_FRAGMENTS must be >= 1")
    if s.max_peer_ring < 4096:
        raise ValueError(f"FABLE_MAX_PEER_RING={s.max_peer_ring} must be >= 4096")
    if min(s.spin_budget_ns, s.grace_period_s, s.close_linger_s, s.trigger_dwell_s) < 0:
        raise ValueError(
            "FABLE_SPIN_BUDGET_NS, FABLE_GRACE_PERIOD, FABLE_CLOSE_LINGER and "
            "FABLE_TRIGGER_DWELL must be >= 0"
        )
    if min(s.max_conns, s.max_conns_per_uid, s.max_names_per_uid, s.max_flows_per_uid) < 1:
        raise ValueError(
            "FABLE_MAX_CONNS, FABLE_MAX_CONNS_PER_UID, FABLE_MAX_NAMES_PER_UID and "
            "FABLE_MAX_FLOWS_PER_UID must be >= 1"
        )
    if min(s.idle_timeout_s, s.frame_timeout_s) <= 0 or s.restart_grace_s < 0:
        raise ValueError(
            "FABLE_IDLE_TIMEOUT and FABLE_FRAME_TIMEOUT must be > 0, FABLE_RESTART_GRACE >= 0"
        )
    if s.setup_timeout_s <= 0:
        raise ValueError("FABLE_SETUP_TIMEOUT must be > 0")
    if not 1 <= s.peer_timeout_s <= 3600:
        raise ValueError("FABLE_PEER_TIMEOUT must be 1 to 3600 seconds")
    if s.listen:
        parse_listen(s.listen)
    if s.backend not in ("auto", "c", "py"):
        raise ValueError(f"FABLE_BACKEND={s.backend!r} must be auto, c or py")
    if s.host_id and not HOST_ID.fullmatch(s.host_id):
        raise ValueError(
            f"FABLE_HOST_ID={s.host_id!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if s.cluster and not s.cluster.startswith("zk://"):
        raise ValueError(f"FABLE_CLUSTER={s.cluster!r} must be zk://ADDR[:PORT][,...]/ROOT")
    if not 0.1 <= s.cluster_session_s <= 3600:
        raise ValueError("FABLE_CLUSTER_SESSION must be 0.1 to 3600 seconds")
    if s.log_level.upper() not in logging.getLevelNamesMapping():
        raise ValueError(f"FABLE_LOG_LEVEL={s.log_level!r} is not a logging level")


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6) as (address, port); ValueError otherwise."""
    import ipaddress

    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"listen address {text!r} must be ADDR:PORT (an IP address)") from None
    return host, int(port)


def _load() -> Settings:
    values: dict[str, object] = {}
    for f in dataclasses.fields(Settings):
        raw = os.environ.get(f.metadata["env"])
        if raw is not None:
            values[f.name] = _parse(f, raw)
    s = Settings(**values)  # type: ignore[arg-type]
    _validate(s)
    logger.setLevel(s.log_level.upper())
    return s


_current: Settings | None = None


def settings() -> Settings:
    """The settings in force (read from the environment on first use)."""
    global _current
    if _current is None:
        _current = _load()
    return _current


def reload() -> Settings:
    """Read the environment again (tests and long-running daemons use this)."""
    global _current
    _current = _load()
    return _current


def state_dir() -> Path:
    """Directory for the daemon log and the calibration table (not created here)."""
    return settings().state_dir
