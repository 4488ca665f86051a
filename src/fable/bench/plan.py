"""What a bench run measures, and where its results go: the points of ``fable bench`` and
``fable calibrate``, running them (interleaved rounds), and the run's JSON document
(DESIGN.md §9). The CLI parses its options into these and prints what comes back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from fable.bench.harness import (
    APIS,
    AUTO,
    FLOOR,
    FLOOR_SIZE,
    SCHEMA_VERSION,
    merge_rounds,
    run_point,
)
from fable.bench.links import Point
from fable.bench.peers import PEERS, missing
from fable.client import private_daemon
from fable.policy import SIZES
from fable.topology import Topology, machine_info
from fable.transports import REGISTRY

__all__ = [
    "APIS",
    "CALIBRATION_SIZES",
    "MODES",
    "QUICK",
    "Selection",
    "allowed_cpus",
    "calibration_points",
    "host_points",
    "points",
    "read_run",
    "run_points",
    "select_transports",
    "write_json",
    "write_run",
]

MODES = ("latency", "throughput")
CALIBRATION_SIZES = SIZES  # the sizes the policy's table is measured at
QUICK = {"target_s": 0.03, "timeout_s": 20.0}  # `--quick`, the preset of `make bench`

Record = dict[str, Any]


def allowed_cpus(topo: Topology) -> tuple[int, ...]:
    """The online CPUs this process may run on."""
    mine = os.sched_getaffinity(0)
    return tuple(c for c in topo.cpus if c in mine)


class Selection:
    """The rows a run measures: REGISTRY transports and ``auto``, peers, the floor row; and
    why a wanted peer is left out (``notes``)."""

    def __init__(self, names: list[str], peers: list[str], floor: bool) -> None:
        self.names = names
        self.floor = floor
        self.notes: list[str] = []
        self.peers: list[str] = []
        for peer in peers:
            why = missing(peer)
            if why:
                self.notes.append(f"peer:{peer} skipped: {why}")
            else:
                self.peers.append(peer)


def select_transports(text: str, with_peers: bool) -> Selection:
    """``--transports`` (``all``, or names: REGISTRY, ``auto``, ``floor``, ``peer:NAME``) and
    ``--peers`` -> the rows; ValueError naming what is known for an unknown name."""
    names = (
        [*REGISTRY, AUTO, FLOOR]
        if text == "all"
        else [n.strip() for n in text.split(",") if n.strip()]
    )
    fable_names, peer_names, floor = [], [], False
    for n in names:
        if n == FLOOR:
            floor = True
        elif n == AUTO or n in REGISTRY:
            fable_names.append(n)
        elif n.startswith("peer:"):
            if n[5:] not in PEERS:
                raise ValueError(f"unknown peer {n!r}; known: {', '.join(PEERS)}")
            peer_names.append(n[5:])
        else:
            raise ValueError(
                f"unknown transport {n!r}; known: {', '.join(REGISTRY)}, auto, floor, "
                + ", ".join(f"peer:{p}" for p in PEERS)
            )
    if with_peers:
        peer_names += [p for p in PEERS if p not in peer_names]
    return Selection(fable_names, peer_names, floor)


def points(
    sel: Selection,
    pairs: Iterable[tuple[int, int]],
    *,
    safety: Sequence[str] = ("safe", "unsafe"),
    sizes: Sequence[int] = CALIBRATION_SIZES,
    modes: Sequence[str] = MODES,
    apis: Sequence[str] = ("msg",),
) -> list[Point]:
    """Every point of a run, in the order it measures them: per CPU pair, the floor, then
    each row (each form a transport has, within ``safety``), size and mode; fable's rows once
    per API of ``apis`` (``batch`` for throughput only; the floor and peers: ``msg`` only)."""
    out = []
    for cpus in pairs:
        if sel.floor and "latency" in modes:
            out.append(Point(FLOOR, True, "latency", FLOOR_SIZE, cpus))
        rows = [
            (n, safe)
            for n in sel.names
            for safe in (REGISTRY[n].caps.forms if n in REGISTRY else (True, False))
        ]
        rows = [(n, safe) for n, safe in rows if ("safe" if safe else "unsafe") in safety]
        rows += [(f"peer:{peer}", True) for peer in sel.peers]
        for name, safe in rows:
            for api in apis if not name.startswith("peer:") else ("msg",):
                for size in sizes:
                    for mode in modes:
                        if api != "batch" or mode == "throughput":
                            out.append(Point(name, safe, mode, size, cpus, api))
    return out


def host_points(
    sel: Selection,
    pairs: Sequence[tuple[int, int]],
    *,
    sizes: Sequence[int] = CALIBRATION_SIZES,
    modes: Sequence[str] = MODES,
) -> list[Point]:
    """The points of ``fable bench --hosts``: each selected transport that crosses hosts, in
    its safe form (the only one those have), at each size and mode, pinned to the first CPU
    pair (the two test hosts share this machine's CPUs)."""
    cpus = next((p for p in pairs if p[0] != p[1]), pairs[0] if pairs else (0, 0))
    return [
        Point(n, True, mode, size, cpus)
        for n in sel.names
        if n in REGISTRY and REGISTRY[n].caps.cross_host
        for size in sizes
        for mode in modes
    ]


def calibration_points(topo: Topology) -> list[Point]:
    """What ``fable calibrate`` measures: every REGISTRY transport in every form, the
    policy's sizes, both modes, at one CPU pair of each placement class this machine has."""
    allowed = allowed_cpus(topo)
    pairs = [p for p in topo.default_pairs() if p[0] in allowed and p[1] in allowed]
    return points(Selection(list(REGISTRY), [], False), pairs)


Progress = Callable[[Point | None], None]  # called before each point, and with None at the end


def run_points(
    todo: list[Point], topo: Topology, progress: Progress, rounds: int = 1, **opts: Any
) -> list[Record]:
    """Measure every point (``rounds`` times, interleaved: the whole list, then again; each
    point's median kept); a daemon of our own serves the ``auto`` row while it runs."""
    records: list[Record] = []
    need_daemon = any(p.transport == AUTO for p in todo)
    with private_daemon() if need_daemon else contextlib.nullcontext():
        for _ in range(rounds):
            for p in todo:
                progress(p)
                records.append(run_point(p, placement=topo.placement(*p.cpus), **opts))
    progress(None)
    return merge_rounds(records) if rounds > 1 else records


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` whole or not at all (a reader, such as a daemon reloading its
    calibration, never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def write_run(path: str | Path, records: list[Record], notes: list[str] | None = None) -> None:
    """The bench JSON document: ``{"schema_version", "machine", "records"[, "notes"]}``."""
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "machine": machine_info(),
        "records": records,
    }
    if notes is not None:
        doc["notes"] = notes
    write_json(path, doc)


def read_run(path: str | Path) -> list[Record]:
    """The records of a bench JSON document; ValueError saying what is wrong with it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not a fable bench JSON file (schema_version 1)")
    records = doc.get("records")
    if not isinstance(records, list):
        raise ValueError(f"{path}: no records")
    return records
