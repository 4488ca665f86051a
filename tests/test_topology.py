"""Placement classes from /sys topology fixtures: a 2-core VM, an SMT desktop, a NUMA server."""

from __future__ import annotations

from pathlib import Path

import pytest

from fable.topology import PLACEMENTS, Topology, parse_cpulist


def _cpu(root: Path, cpu: int, siblings: str, package: int, caches: dict[int, str]) -> None:
    d = root / "devices/system/cpu" / f"cpu{cpu}"
    (d / "topology").mkdir(parents=True)
    (d / "topology/thread_siblings_list").write_text(siblings + "\n")
    (d / "topology/physical_package_id").write_text(f"{package}\n")
    for i, (level, shared) in enumerate(sorted(caches.items())):
        c = d / "cache" / f"index{i}"
        c.mkdir(parents=True)
        (c / "level").write_text(f"{level}\n")
        (c / "shared_cpu_list").write_text(shared + "\n")


def _nodes(root: Path, nodes: dict[int, str]) -> None:
    for n, cpus in nodes.items():
        d = root / "devices/system/node" / f"node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")


def _online(root: Path, text: str) -> None:
    (root / "devices/system/cpu/online").write_text(text + "\n")


@pytest.fixture
def vm2(tmp_path: Path) -> Topology:
    """This machine's kind: 2 vCPUs, private L2s, one shared L3."""
    for c in (0, 1):
        _cpu(tmp_path, c, str(c), 0, {1: str(c), 2: str(c), 3: "0-1"})
    _online(tmp_path, "0-1")
    _nodes(tmp_path, {0: "0-1"})
    return Topology.read(tmp_path)


@pytest.fixture
def desktop(tmp_path: Path) -> Topology:
    """4 cores x 2 threads: cpu n and n+4 are siblings; L3 shared by all."""
    for c in range(8):
        core = c % 4
        _cpu(tmp_path, c, f"{core},{core + 4}", 0, {2: f"{core},{core + 4}", 3: "0-7"})
    _online(tmp_path, "0-7")
    return Topology.read(tmp_path)  # no node directory: everything on node 0


@pytest.fixture
def numa(tmp_path: Path) -> Topology:
    """2 sockets x 2 NUMA nodes... simplified: 4 packages of 2 cores; nodes 0-1 and 2-3 of them.
    Within package p, cores share an L3 except in package 1, whose L3 is split per core."""
    nodes = {0: "0-3", 1: "4-7"}
    for c in range(8):
        pkg = c // 2
        l3 = f"{2 * pkg}-{2 * pkg + 1}" if pkg != 1 else str(c)
        _cpu(tmp_path, c, str(c), pkg, {2: str(c), 3: l3})
    _online(tmp_path, "0-7")
    _nodes(tmp_path, nodes)
    return Topology.read(tmp_path)


def test_cpulist() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("") == frozenset()


def test_vm(vm2: Topology) -> None:
    assert vm2.placement(0, 0) == "same-core"
    assert vm2.placement(0, 1) == "shared-cache"
    assert vm2.default_pairs() == [(0, 1), (0, 0)]
    assert vm2.describe() == {"cpus": 2, "packages": 1, "numa_nodes": 1, "smt": False}


def test_smt_desktop(desktop: Topology) -> None:
    assert desktop.placement(1, 5) == "smt-sibling"
    assert desktop.placement(1, 2) == "shared-cache"
    assert [desktop.placement(*p) for p in desktop.default_pairs()] == [
        "smt-sibling",
        "shared-cache",
        "same-core",
    ]
    assert desktop.describe()["smt"] is True


def test_numa_server(numa: Topology) -> None:
    assert numa.placement(0, 1) == "shared-cache"
    assert numa.placement(2, 3) == "same-package"
    assert numa.placement(0, 2) == "other-package"
    assert numa.placement(0, 7) == "other-node"
    classes = [numa.placement(*p) for p in numa.default_pairs()]
    assert classes == [p for p in PLACEMENTS if p != "smt-sibling" and p != "same-core"] + [
        "same-core"
    ]


def test_offline_cpu(vm2: Topology) -> None:
    with pytest.raises(ValueError, match="not online"):
        vm2.placement(0, 5)


def test_this_machine() -> None:
    t = Topology.read()
    assert t.cpus and all(t.placement(c, c) == "same-core" for c in t.cpus)


@pytest.fixture
def two_socket(tmp_path: Path) -> Topology:
    """A 2-socket server: 2 packages x 4 cores x 2 threads, one NUMA node and one L3 per socket.
    Linux numbers threads socket by socket, siblings last: cpu c and c+8 share a core."""
    for c in range(16):
        core = c % 8
        pkg = core // 4
        sib = f"{core},{core + 8}"
        l3 = f"{4 * pkg}-{4 * pkg + 3},{4 * pkg + 8}-{4 * pkg + 11}"
        _cpu(tmp_path, c, sib, pkg, {1: sib, 2: sib, 3: l3})
    _online(tmp_path, "0-15")
    _nodes(tmp_path, {0: "0-3,8-11", 1: "4-7,12-15"})
    return Topology.read(tmp_path)


def test_two_socket_numa_server(two_socket: Topology) -> None:
    t = two_socket
    assert t.placement(3, 11) == "smt-sibling"
    assert t.placement(0, 3) == "shared-cache"
    assert t.placement(0, 11) == "shared-cache"
    assert t.placement(0, 4) == "other-node"
    assert t.placement(12, 1) == "other-node"
    assert [t.placement(*p) for p in t.default_pairs()] == [
        "smt-sibling",
        "shared-cache",
        "other-node",
        "same-core",
    ]
    assert t.describe() == {"cpus": 16, "packages": 2, "numa_nodes": 2, "smt": True}
