"""The transport table: the one place that knows which transports exist and what each can do.

``REGISTRY`` maps a canonical name (used everywhere: CLI, JSON, daemon, docs) to its
:class:`TransportInfo`. The policy and the bench read capabilities from here and never branch on
names. Each transport lives in its own module; adding one means adding its module and its row.

    name          copies (safe)  wait    fileno  cross-host   module
    tcp           2              kernel  yes     yes          transports/tcp.py
    tcp-nodelay   2              kernel  yes     yes          transports/tcp.py
    unix          2              kernel  yes     no           transports/unix.py
    pipe          2              kernel  yes     no           transports/pipe.py
    shmem-pipe    1 (0 unsafe)   pipe    yes     no           transports/shmem_pipe.py
    vmsplice-coop 1 (no safe form: both sides must trust) kernel yes no transports/vmsplice.py
    mempipe-futex 1 (0 unsafe)   futex   yes     no           transports/mempipe.py
    mempipe-spin  1 (0 unsafe)   spin    no      no           transports/mempipe.py
    mempipe-adaptive 1 (0)       adaptive yes    no           transports/mempipe.py
"""

from __future__ import annotations

from fable.transports import mempipe, pipe, shmem_pipe, tcp, unix, vmsplice
from fable.transports.base import (
    Capabilities,
    ConnectionStats,
    DataPath,
    EndSpec,
    EpochHooks,
    TransportInfo,
)
from fable.transports.channel import SetupChannel

__all__ = [
    "REGISTRY",
    "Capabilities",
    "ConnectionStats",
    "DataPath",
    "EndSpec",
    "EpochHooks",
    "SetupChannel",
    "TransportInfo",
    "spins",
]

REGISTRY: dict[str, TransportInfo] = {
    info.name: info
    for info in (
        tcp.INFO,
        tcp.INFO_NODELAY,
        unix.INFO,
        pipe.INFO,
        shmem_pipe.INFO,
        vmsplice.INFO,
        mempipe.INFO_FUTEX,
        mempipe.INFO_SPIN,
        mempipe.INFO_ADAPTIVE,
    )
}


def spins(path: DataPath) -> bool:
    """Whether ``path``'s transport spins (has no readiness fd)."""
    info = REGISTRY.get(path.transport)
    return info is not None and info.caps.spins
