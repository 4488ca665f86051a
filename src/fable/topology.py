"""Where things run: the CPU topology from /sys, the placement class of a pair of CPUs, the
machine record of bench results, and a thread's CPU, affinity and NUMA node.

Placement classes (DESIGN.md §9), from closest to farthest; a pair gets the first that fits:

    same-core      the same logical CPU (the two processes time-share it)
    smt-sibling    two hardware threads of one core
    shared-cache   different cores sharing a cache (L2 or L3)
    same-package   one package (socket), no shared cache
    other-package  different packages, same NUMA node
    other-node     different NUMA nodes

``Topology.read(root)`` takes the directory that stands for ``/sys`` so tests can use fixtures.
The policy, the daemon, the library's reports and the bench all read placements from here;
psutil answers where it knows (a thread's current CPU), /sys where only the kernel's files do
(caches, packages, NUMA nodes).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "OTHER_HOST",
    "PLACEMENTS",
    "Topology",
    "current_cpu",
    "machine_info",
    "node_of_cpu",
    "parse_cpulist",
    "thread_placement",
]

OTHER_HOST = "other-host"  # the placement of two ends on two hosts (no CPU pair to it)
PLACEMENTS = (
    "same-core",
    "smt-sibling",
    "shared-cache",
    "same-package",
    "other-package",
    "other-node",
)


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse the kernel's cpulist format ("0-3,8,10-11")."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return frozenset(cpus)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class Topology:
    cpus: tuple[int, ...]
    siblings: dict[int, frozenset[int]] = field(default_factory=dict)  # SMT threads of a core
    caches: dict[int, tuple[frozenset[int], ...]] = field(default_factory=dict)  # L2+ shared sets
    package: dict[int, int] = field(default_factory=dict)
    node: dict[int, int] = field(default_factory=dict)

    @classmethod
    def read(cls, root: str | Path = "/sys") -> Topology:
        base = Path(root) / "devices" / "system" / "cpu"
        online = _read(base / "online")
        if online is not None:
            cpus = sorted(parse_cpulist(online))
        else:
            cpus = sorted(int(p.name[3:]) for p in base.glob("cpu[0-9]*") if p.name[3:].isdigit())
        siblings, caches, package, node = {}, {}, {}, {}
        for cpu in cpus:
            d = base / f"cpu{cpu}"
            sib = _read(d / "topology" / "thread_siblings_list")
            siblings[cpu] = parse_cpulist(sib) if sib else frozenset({cpu})
            pkg = _read(d / "topology" / "physical_package_id")
            package[cpu] = int(pkg) if pkg and pkg.strip().lstrip("-").isdigit() else 0
            shared = []
            for idx in sorted((d / "cache").glob("index[0-9]*")):
                level = _read(idx / "level")
                lst = _read(idx / "shared_cpu_list")
                if level and lst and int(level) >= 2:
                    shared.append(parse_cpulist(lst))
            caches[cpu] = tuple(shared)
        node.update(node_of_cpu(root))
        for cpu in cpus:
            node.setdefault(cpu, 0)
        return cls(tuple(cpus), siblings, caches, package, node)

    def placement(self, a: int, b: int) -> str:
        """The placement class of CPUs ``a`` and ``b``."""
        for cpu in (a, b):
            if cpu not in self.cpus:
                raise ValueError(f"CPU {cpu} is not online (online: {list(self.cpus)})")
        if a == b:
            return "same-core"
        if b in self.siblings.get(a, frozenset()):
            return "smt-sibling"
        if self.node.get(a) != self.node.get(b):
            return "other-node"
        if self.package.get(a) != self.package.get(b):
            return "other-package"
        if any(b in shared for shared in self.caches.get(a, ())):
            return "shared-cache"
        return "same-package"

    def default_pairs(self) -> list[tuple[int, int]]:
        """One pair per placement class this machine has (the first CPU pair found for each)."""
        found: dict[str, tuple[int, int]] = {}
        first = self.cpus[0]
        for b in self.cpus:
            found.setdefault(self.placement(first, b), (first, b))
        for a in self.cpus:
            for b in self.cpus:
                found.setdefault(self.placement(a, b), (a, b))
        order = [p for p in PLACEMENTS if p in found]
        # cross-core first: it is the case most users care about
        order.sort(key=lambda p: (p == "same-core", PLACEMENTS.index(p)))
        return [found[p] for p in order]

    def describe(self) -> dict[str, object]:
        return {
            "cpus": len(self.cpus),
            "packages": len(set(self.package.values())),
            "numa_nodes": len(set(self.node.values())),
            "smt": any(len(s) > 1 for s in self.siblings.values()),
        }


def node_of_cpu(root: str | Path = "/sys") -> dict[int, int]:
    """CPU -> NUMA node (empty where the kernel has no NUMA information)."""
    out: dict[int, int] = {}
    for nd in (Path(root) / "devices" / "system" / "node").glob("node[0-9]*"):
        lst = _read(nd / "cpulist")
        try:
            for cpu in parse_cpulist(lst or ""):
                out[cpu] = int(nd.name[4:])
        except ValueError:
            continue
    return out


def current_cpu(tid: int = 0) -> int:
    """The CPU thread ``tid`` (a native thread id; 0: the caller) last ran on, or -1."""
    try:
        return int(psutil.Process(tid or _native_tid()).cpu_num())
    except (psutil.Error, OSError, ValueError):
        return -1


def _native_tid() -> int:
    import threading

    return threading.get_native_id()


def thread_placement(tid: int = 0, nodes: dict[int, int] | None = None) -> dict[str, Any]:
    """Where thread ``tid`` (0: the caller) may and does run: ``affinity`` (its CPUs, sorted),
    ``cpu`` (the one it last ran on, -1: unknown), ``node`` (that CPU's NUMA node, -1: unknown).
    A thread that has ended reports its process's affinity."""
    cpu = current_cpu(tid)
    nodes = node_of_cpu() if nodes is None else nodes
    try:
        affinity = sorted(os.sched_getaffinity(tid))
    except OSError:
        affinity = sorted(os.sched_getaffinity(0))
    return {"affinity": affinity, "cpu": cpu, "node": nodes.get(cpu, -1)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:  # psutil does not name the CPU model
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info() -> dict[str, Any]:
    """The machine a measurement was made on: CPU model, kernel, Python, fable, and the
    topology's summary (bench JSON's ``machine``; the policy matches calibrations by it)."""
    from fable.version import __version__

    return {
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fable": __version__,
        **Topology.read().describe(),
    }
