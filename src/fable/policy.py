"""The policy: which transport a new flow gets, and why.

``rank(facts, table)`` scores every REGISTRY transport for two endpoints in two steps:

1. **Rules** read capabilities (never names) and exclude what cannot or must not be used:
   another host -> only ``cross_host`` transports; ends that could share a core (their CPU
   affinities overlap) -> nothing that ``spins``; a pollable fd asked for -> only ``pollable``;
   a latency flow -> nothing that ``delays_small`` (Nagle: a ping-pong bench cannot see the
   delayed-ACK stall it causes when a side waits for two messages before it answers);
   the reading sides' trust decides ``safe`` (unsafe only when both trust; no safe form, e.g.
   ``mutual_trust`` transports, excludes the transport for untrusting ends).
2. **Numbers** from a calibration table (bench records: ``fable calibrate``, else the built-in
   table) score the rest: for each placement the two ends may be in, each size and each mode
   asked for, a transport scores ``best / its own`` (1.0 = the best there; round trips lower is
   better, rates higher). Sizes and modes combine by geometric mean; placements by the minimum,
   so a transport must be good wherever the scheduler may put the ends. Unmeasured -> 0.
   Scores within ``TIE`` (10%) of the best are a tie, which goes to the transport that does
   not spin and can be polled (adaptive over spin): the table's spread cannot tell them apart.

The reason of the choice names the facts and the numbers used. The built-in table
(``policy_builtin.json``) is one ``fable bench --rounds 5`` of a 2-vCPU x86-64 KVM guest, the
common case of a small cloud VM: cross-core, shared memory wins latency and throughput (spin
and adaptive within a few percent: adaptive, by the tie rule); on one core, pipes win round
trips and adaptive shared memory wins throughput.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fable.topology import OTHER_HOST, PLACEMENTS, Topology, machine_info
from fable.transports import REGISTRY

__all__ = [
    "SIZES",
    "Choice",
    "Facts",
    "Table",
    "calibration_path",
    "load_table",
    "rank",
]

SIZES = (64, 4096, 65536)
MODES = ("latency", "throughput")
TIE = 0.10  # scores this close to the best are a tie: about the calibration table's spread
_BUILTIN = Path(__file__).with_name("policy_builtin.json")


@dataclass(frozen=True)
class Facts:
    """What the policy knows about a would-be flow."""

    same_host: bool = True
    affinity_a: frozenset[int] = frozenset()  # CPUs each end's I/O thread may run on
    affinity_b: frozenset[int] = frozenset()
    trusted_a: bool = False  # each reading side's trust
    trusted_b: bool = False
    pollable: bool = False
    msg_size: int | None = None
    mode: str | None = None  # "latency" | "throughput" | None (both)

    @property
    def apart(self) -> bool:
        """Can the two ends only ever run on different CPUs (disjoint affinities)?"""
        return (
            bool(self.affinity_a)
            and bool(self.affinity_b)
            and not (self.affinity_a & self.affinity_b)
        )

    def side_forms(self, name: str) -> tuple[list[bool], list[bool]]:
        """The forms each end may read ``name`` in: any the transport has for a trusting end,
        only the safe one for the other (DESIGN.md §2: trust is per reading side)."""
        forms = REGISTRY[name].caps.forms
        return (
            [f for f in forms if f or self.trusted_a],
            [f for f in forms if f or self.trusted_b],
        )


@dataclass
class Table:
    """Calibration: (placement, transport, safe, mode, size) -> p50 round trip ns or msgs/s."""

    values: dict[tuple[str, str, bool, str, int], float] = field(default_factory=dict)
    source: str = "empty"

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], source: str) -> Table:
        cells: dict[tuple[str, str, bool, str, int], list[float]] = {}
        for r in records:
            if not r.get("verified") or r.get("transport") not in REGISTRY:
                continue
            if r.get("api", "msg") != "msg":  # the batch and buffer rows: not what picks
                continue
            v = r["p50_ns"] if r["mode"] == "latency" else r["msgs_per_s"]
            key = (r["placement"], r["transport"], bool(r["safe"]), r["mode"], int(r["size"]))
            cells.setdefault(key, []).append(float(v))
        return cls({k: sorted(v)[len(v) // 2] for k, v in cells.items()}, source)

    def placements(self) -> set[str]:
        return {k[0] for k in self.values}


def calibration_path() -> Path:
    from fable.config import settings

    return settings().state_dir / "calibration.json"


def load_table(path: Path | None = None) -> Table:
    """This machine's calibration (``fable calibrate``) if there is a readable one made on a
    machine like this one (same CPU model and count), else the built-in table."""
    path = calibration_path() if path is None else path
    for p, label, mine in (
        (path, f"calibration {path}", True),
        (_BUILTIN, "the built-in table (a 2-vCPU VM)", False),
    ):
        try:
            doc = json.loads(p.read_text())
            if (
                not isinstance(doc, dict)
                or doc.get("schema_version") != 1
                or not isinstance(doc.get("records"), list)
            ):
                continue
            if mine and not machine_matches(doc):
                continue  # made on another machine (a copied state dir): not ours
            t = Table.from_records(doc["records"], label)
            if t.values:
                return t
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return Table()


def plausible_placements(facts: Facts, topo: Topology | None = None) -> list[str]:
    """The placement classes the two ends may be in, given their affinities."""
    topo = topo or Topology.read()
    a = sorted(facts.affinity_a & set(topo.cpus)) or list(topo.cpus)
    b = sorted(facts.affinity_b & set(topo.cpus)) or list(topo.cpus)
    found: set[str] = set()
    for i, x in enumerate(a):
        for y in b[:64] if i < 64 else b[:1]:
            found.add(topo.placement(x, y))
    return [p for p in PLACEMENTS if p in found]


@dataclass(frozen=True)
class Choice:
    transport: str
    safe: tuple[bool, bool]  # each end's reads (a, b): True = private copies
    score: float  # 0..1, 1 = the best wherever the ends may be
    reason: str
    excluded: bool = False


def _reads(safe: bool) -> str:
    return "safe (private copies)" if safe else "unsafe (zero-copy)"


def _exclusion(name: str, facts: Facts) -> str | None:
    caps = REGISTRY[name].caps
    if not facts.same_host and not caps.cross_host:
        return "the ends are on different hosts"
    if caps.spins and not facts.apart:
        return "it spins, and the ends could share a core (their CPU affinities overlap)"
    if facts.pollable and not caps.pollable:
        return "a pollable fd was asked for"
    if facts.mode == "latency" and caps.delays_small:
        return "a latency flow: it holds small messages back (Nagle's algorithm)"
    fa, fb = facts.side_forms(name)
    if not fa or not fb:
        return "both ends must trust each other" if caps.mutual_trust else "it has no safe form"
    return None


def _fmt(mode: str, v: float) -> str:
    return f"{v / 1000:.1f} us" if mode == "latency" else f"{v / 1e6:.2f} M msg/s"


def rank(facts: Facts, table: Table, topo: Topology | None = None) -> list[Choice]:
    """Every REGISTRY transport (in its best allowed form), best first; excluded ones last,
    with ``excluded=True``."""
    places = plausible_placements(facts, topo) if facts.same_host else [OTHER_HOST]
    if facts.msg_size is None:
        sizes = list(SIZES)
    else:  # the calibrated size nearest on a log scale
        sizes = [min(SIZES, key=lambda s: abs(math.log2(max(facts.msg_size or 1, 1) / s)))]
    modes = [facts.mode] if facts.mode in MODES else list(MODES)
    if not facts.same_host:
        where = f"ends on two hosts ({OTHER_HOST})"
    elif facts.apart:
        where = f"ends pinned apart ({', '.join(places)})"
    else:
        where = f"ends may share a core ({', '.join(places)})"
    ok = [
        (n, form)
        for n in REGISTRY
        if _exclusion(n, facts) is None
        for form in {f for forms in facts.side_forms(n) for f in forms}
    ]
    # the best value among the allowed transports and forms, per cell
    best: dict[tuple[str, str, int], float] = {}
    for p in places:
        for m in modes:
            for s in sizes:
                vals = [v for n, f in ok if (v := table.values.get((p, n, f, m, s))) is not None]
                if vals:
                    best[(p, m, s)] = min(vals) if m == "latency" else max(vals)

    def score(name: str, form: bool) -> tuple[float, list[str]]:
        per_place, notes = [], []
        for p in places:
            logs = []
            for m in modes:
                for s in sizes:
                    v = table.values.get((p, name, form, m, s))
                    b = best.get((p, m, s))
                    if v is None or b is None or v <= 0:
                        logs.append(math.log(1e-3))  # unmeasured: as good as 1/1000 of the best
                        continue
                    r = b / v if m == "latency" else v / b
                    logs.append(math.log(r))
                    notes.append(f"{p} {s} B {m} {_fmt(m, v)} ({r:.2f} of best)")
            per_place.append(math.exp(sum(logs) / len(logs)) if logs else 0.0)
        return (min(per_place) if per_place else 0.0), notes

    out = []
    for name in REGISTRY:
        why_not = _exclusion(name, facts)
        if why_not:
            safest = (not facts.trusted_a, not facts.trusted_b)
            out.append(Choice(name, safest, 0.0, f"{name}: excluded: {why_not}", True))
            continue
        # each end reads in the most zero-copy form its trust allows (DESIGN.md §2); the table
        # measures both ends in one form, so a pair scores the geometric mean of its two forms
        # (a form the table never measured scores as the transport's other one)
        fa, fb = facts.side_forms(name)
        per_form = {f: score(name, f) for f in set(fa + fb)}
        measured = [per_form[f] for f in per_form if per_form[f][1]]
        for f in per_form:
            if not per_form[f][1] and measured:
                per_form[f] = max(measured)
        a, b = min(fa), min(fb)  # False (zero-copy) before True
        (sa, notes), (sb, _) = per_form[a], per_form[b]
        sc = math.sqrt(sa * sb)
        form = (a, b)
        reads = (
            f"{_reads(a)} reads at both ends"
            if a == b
            else f"reads: the first end {_reads(a)}, the second {_reads(b)}"
        )
        shown = "; ".join(notes[:4]) + (" ..." if len(notes) > 4 else "")
        out.append(
            Choice(
                name,
                form,
                sc,
                f"{name}: score {sc:.2f} from {table.source}; {where}; {reads}"
                + (f"; {shown}" if shown else "; no calibration numbers"),
            )
        )
    return _break_ties(out)


def _frugal(name: str) -> tuple[bool, bool]:
    """Sort key among near-ties: what does not spin first, then what can be polled."""
    caps = REGISTRY[name].caps
    return (caps.spins, not caps.pollable)


def _break_ties(out: list[Choice]) -> list[Choice]:
    """Best first; but among the transports within TIE of the best score, which the table
    cannot tell apart (its measured spread), the one that burns less CPU and can be polled
    (adaptive over spin) goes first, and its reason says so."""
    out.sort(key=lambda c: (c.excluded, -c.score))
    top = out[0].score if out and not out[0].excluded else 0.0
    tied = [c for c in out if not c.excluded and top > 0 and c.score >= top * (1 - TIE)]
    if len(tied) < 2:
        return out
    tied.sort(key=lambda c: (*_frugal(c.transport), -c.score))
    if tied[0].transport != out[0].transport:
        tied[0] = dataclasses.replace(
            tied[0],
            reason=tied[0].reason
            + f"; within {TIE:.0%} of the best score ({out[0].transport} {top:.2f}), a tie the"
            " table cannot break: preferred for not spinning / being pollable",
        )
    names = {c.transport for c in tied}
    return tied + [c for c in out if c.transport not in names]


def facts_for(a: dict[str, Any], b: dict[str, Any], **hints: Any) -> Facts:
    """Facts from two endpoints as the daemon knows them (``Endpoint.public()``)."""
    return Facts(
        same_host=a.get("host") == b.get("host"),
        affinity_a=frozenset(a.get("affinity") or ()),
        affinity_b=frozenset(b.get("affinity") or ()),
        **hints,
    )


def machine_matches(doc: dict[str, Any]) -> bool:
    """Whether a calibration file describes this machine (CPU count and model)."""
    here, there = machine_info(), doc.get("machine") or {}
    return all(here.get(k) == there.get(k) for k in ("cpus", "cpu_model"))
