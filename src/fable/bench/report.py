"""What the bench prints and writes from its records: the table, the Markdown report, compare.

The table is grouped like the paper's Figure 4: one section per placement, one row per
transport and safety, for each size the median round trip (latency) and the one-way rate
(throughput). Where several CPU pairs share a placement (``--grid``), a cell is the median over
those pairs. Records are the JSON records of DESIGN.md §9.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from rich.table import Table

from fable.topology import OTHER_HOST, PLACEMENTS

__all__ = ["Summary", "compare_table", "markdown", "results_table"]

Record = dict[str, Any]


def row_name(r: Record) -> str:
    """``transport form``, and `` (batch)``/`` (buffer)`` for the other APIs (harness.APIS)."""
    t = str(r["transport"])
    if t == "floor" or t.startswith("peer:"):
        return t
    api = r.get("api", "msg")
    return f"{t} {'safe' if r['safe'] else 'unsafe'}" + ("" if api == "msg" else f" ({api})")


NOT_A_TRANSPORT = ("floor", "auto safe", "auto unsafe")  # never "the best transport"


def is_transport_row(row: str) -> bool:
    """A row that may be "the best transport": not the floor, not auto, not another API's."""
    return row not in NOT_A_TRANSPORT and "(" not in row


def row_order(name: str) -> tuple[int, str]:
    # floor first, fable's transports in REGISTRY order, auto, then the peers
    from fable.transports import REGISTRY

    if name == "floor":
        return (0, "")
    if name.startswith("auto"):
        return (2, name)
    if name.startswith("peer:"):
        return (3, name)
    t, _, rest = name.partition(" ")
    safety, _, api = rest.partition(" ")
    order = list(REGISTRY)
    return (1, f"{order.index(t) if t in order else 99:02d}{safety == 'unsafe':d}{api}")


def size_label(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


class Summary:
    """Verified records reduced to one value per (placement, row, size, mode): the median of
    p50 round trips (ns) or of rates (msgs/s) over the CPU pairs of that placement."""

    def __init__(self, records: Iterable[Record]) -> None:
        cells: dict[tuple[str, str, int, str], list[float]] = {}
        self.pairs: dict[str, set[tuple[int, int]]] = {}
        self.failed: list[Record] = []
        for r in records:
            if not r.get("verified"):
                self.failed.append(r)
                continue
            value = r["p50_ns"] if r["mode"] == "latency" else r["msgs_per_s"]
            key = (r["placement"], row_name(r), r["size"], r["mode"])
            cells.setdefault(key, []).append(float(value))
            a, b = r["cpus"]
            self.pairs.setdefault(r["placement"], set()).add((a, b))
        self.cells = {k: statistics.median(v) for k, v in cells.items()}
        self.placements = [p for p in (*PLACEMENTS, OTHER_HOST) if p in self.pairs]
        self.sizes = sorted({k[2] for k in self.cells if k[1] != "floor"}) or sorted(
            {k[2] for k in self.cells}
        )
        self.rows = sorted({k[1] for k in self.cells}, key=row_order)

    def get(self, placement: str, row: str, size: int, mode: str) -> float | None:
        return self.cells.get((placement, row, size, mode))

    def best(
        self, placement: str, size: int, mode: str, rows: Iterable[str] | None = None
    ) -> tuple[str, float] | None:
        """The best row (lowest round trip, highest rate) at a placement and size; the floor
        and auto never count: one is not a transport, the other is one of the others."""
        found = [
            (row, v)
            for row in (rows if rows is not None else self.rows)
            if is_transport_row(row) and (v := self.get(placement, row, size, mode)) is not None
        ]
        if not found:
            return None
        pick = min if mode == "latency" else max
        return pick(found, key=lambda rv: rv[1])

    def worst(self, placement: str, size: int, mode: str) -> tuple[str, float] | None:
        found = [
            (row, v)
            for row in self.rows
            if is_transport_row(row) and (v := self.get(placement, row, size, mode)) is not None
        ]
        if not found:
            return None
        pick = max if mode == "latency" else min
        return pick(found, key=lambda rv: rv[1])


def _us(ns: float) -> str:
    us = ns / 1000
    return f"{us:.2f}" if us < 100 else f"{us:.0f}"


def _mbps(msgs_per_s: float, size: int) -> str:
    return (
        f"{msgs_per_s * size / 1e6:,.0f}"
        if msgs_per_s * size >= 1e7
        else (f"{msgs_per_s * size / 1e6:.1f}")
    )


def results_table(records: list[Record]) -> list[Any]:
    """Renderables for the terminal: one table per placement (Figure 4's panels), then the
    failures. Bold marks the best transport of a column (the floor is not one)."""
    s = Summary(records)
    out: list[Any] = []
    for placement in s.placements:
        pairs = sorted(s.pairs[placement])
        where = (
            f"cpus {pairs[0][0]}:{pairs[0][1]}"
            if len(pairs) == 1
            else f"median of {len(pairs)} CPU pairs"
        )
        if placement == OTHER_HOST:
            where = f"test hosts h2 -> h1 over a veth bridge, {where}"
        t = Table(title=f"{placement} ({where})", title_justify="left", header_style="bold")
        t.add_column("transport")
        for size in s.sizes:
            t.add_column(f"{size_label(size)}\nrtt p50 us", justify="right")
            t.add_column(f"{size_label(size)}\nMB/s", justify="right")
        best = {
            (size, mode): s.best(placement, size, mode)
            for size in s.sizes
            for mode in ("latency", "throughput")
        }
        for row in s.rows:
            cells = [row]
            seen = False
            for size in s.sizes:
                lat = s.get(placement, row, size, "latency")
                thr = s.get(placement, row, size, "throughput")
                if row == "floor" and lat is None:
                    # the floor moves one cache line whatever the size: show it once
                    lat = s.get(placement, row, 64, "latency") if size == s.sizes[0] else None
                seen = seen or lat is not None or thr is not None
                for mode, v, text in (
                    ("latency", lat, _us(lat) if lat is not None else "-"),
                    ("throughput", thr, _mbps(thr, size) if thr is not None else "-"),
                ):
                    b = best[(size, mode)]
                    if v is not None and b is not None and b[0] == row:
                        text = f"[bold green]{text}[/]"
                    cells.append(text)
            if seen:
                t.add_row(*cells, style="italic" if row == "floor" else None)
        out.append(t)
    if s.failed:
        lines = ["[bold red]FAILED[/] (verified: false):"]
        for r in s.failed:
            lines.append(
                f"  {row_name(r)} {r['mode']} {size_label(r['size'])} "
                f"cpus {r['cpus'][0]}:{r['cpus'][1]}: {r.get('error')}"
            )
        out.append("\n".join(lines))
    return out


def _cell(rv: tuple[str, float], mode: str, size: int) -> str:
    if mode == "latency":
        return f"{rv[0]} {_us(rv[1])} us"
    return f"{rv[0]} {_mbps(rv[1], size)} MB/s"


def markdown(records: list[Record], machine: dict[str, Any], notes: list[str]) -> str:
    """The report ``--plot`` writes: best transport per placement and size, and the spread
    between best and worst (the paper's "4-15x"), fable against its peers."""
    s = Summary(records)
    lines = [
        "# fable bench report",
        "",
        f"Machine: {machine.get('cpu_model') or 'unknown CPU'}, {machine.get('cpus')} CPUs, "
        f"{machine.get('packages')} package(s), {machine.get('numa_nodes')} NUMA node(s), "
        f"kernel {machine.get('kernel')}, Python {machine.get('python')}, "
        f"fable {machine.get('fable')}.",
        "",
        "Round trips are medians (p50) of ping-pongs; rates are one way. `spread` is best / "
        "worst (rate) or worst / best (round trip) among the transports measured; the floor is a "
        "cache line bounced in C, the lower bound of any round trip, and never the best.",
        "",
    ]
    fable_rows = [r for r in s.rows if is_transport_row(r) and not r.startswith("peer:")]
    peer_rows = [r for r in s.rows if r.startswith("peer:")]
    for mode, title in (("latency", "Round trip (p50)"), ("throughput", "Throughput")):
        if not any(k[3] == mode and k[1] != "floor" for k in s.cells):
            continue
        lines += [f"## {title}", ""]
        head = "| placement | size | best | worst | spread |"
        if peer_rows:
            head += " best fable | best peer | fable vs peer |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for placement in s.placements:
            for size in s.sizes:
                b, w = s.best(placement, size, mode), s.worst(placement, size, mode)
                if b is None or w is None:
                    continue

                spread = w[1] / b[1] if mode == "latency" else b[1] / w[1]
                row = (
                    f"| {placement} | {size_label(size)} | {_cell(b, mode, size)} | "
                    f"{_cell(w, mode, size)} | {spread:.1f}x |"
                )
                if peer_rows:
                    bf = s.best(placement, size, mode, fable_rows)
                    bp = s.best(placement, size, mode, peer_rows)
                    if bf and bp:
                        ratio = bp[1] / bf[1] if mode == "latency" else bf[1] / bp[1]
                        row += (
                            f" {_cell(bf, mode, size)} | {_cell(bp, mode, size)} | {ratio:.2f}x |"
                        )
                    else:
                        row += " - | - | - |"
                lines.append(row)
        lines.append("")
    lines += auto_lines(records, s)
    floor = [
        f"{p}: {_us(v)} us"
        for p in s.placements
        if (v := s.get(p, "floor", 64, "latency")) is not None
    ]
    if floor:
        lines += ["Floor (cache-line round trip): " + ", ".join(floor) + ".", ""]
    if peer_rows:
        lines += [
            "`fable vs peer` > 1 means fable's best transport beat the best peer by that factor.",
            "",
        ]
    if s.failed:
        lines += ["## Failed points", ""]
        for r in s.failed:
            lines.append(
                f"- {row_name(r)} {r['mode']} {size_label(r['size'])} cpus "
                f"{r['cpus'][0]}:{r['cpus'][1]}: {r.get('error')}"
            )
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def auto_lines(records: list[Record], s: Summary) -> list[str]:
    """Markdown: what the policy chose at each point of the ``auto`` row, against the best
    transport it was allowed to pick, measured in the same run (safe rows: safe forms only;
    unsafe rows, where both ends trust: any form)."""
    autos = [r for r in records if r["transport"] == "auto" and r.get("verified")]
    if not autos:
        return []
    lines = [
        "## auto: the policy's choice against the best",
        "",
        "| placement | size | mode | safety | chosen | auto | best allowed | auto / best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(autos, key=lambda r: (r["placement"], r["size"], r["mode"], r["safe"])):
        safety = "safe" if r["safe"] else "unsafe"
        # a trusting pair may use either form; an untrusting one only safe forms
        rows = [
            x
            for x in s.rows
            if x not in NOT_A_TRANSPORT
            and not x.startswith("peer:")
            and (x.endswith(" safe") or not r["safe"])
        ]
        b = s.best(r["placement"], r["size"], r["mode"], rows)
        v = s.get(r["placement"], f"auto {safety}", r["size"], r["mode"])
        if b is None or v is None:
            continue
        ratio = b[1] / v if r["mode"] == "latency" else v / b[1]
        chosen = r.get("chosen")
        if r.get("chosen_rounds"):
            chosen = "/".join(sorted({str(c) for c in r["chosen_rounds"]}))
        lines.append(
            f"| {r['placement']} | {size_label(r['size'])} | {r['mode']} | {safety} | {chosen} | "
            f"{_cell(('', v), r['mode'], r['size']).strip()} | "
            f"{_cell(b, r['mode'], r['size'])} | {ratio:.2f} |"
        )
    lines += [
        "",
        "`auto / best` is 1.00 when the policy picked the best transport, lower when "
        "the pick was slower (round trips: best / auto; rates: auto / best).",
        "",
    ]
    return lines


def _key(r: Record) -> tuple[Any, ...]:
    return (r["transport"], r["safe"], r["mode"], r["size"], r.get("api", "msg"), tuple(r["cpus"]))


def compare_table(a: list[Record], b: list[Record]) -> tuple[Table, list[tuple[str, float]]]:
    """Points measured in both runs, with B / A for rates and A / B for round trips, so that a
    ratio above 1 always means B is better. Returns the table and each point's ratio (with a
    label naming the point)."""
    t = Table(header_style="bold")
    for col, just in (
        ("transport", "left"),
        ("mode", "left"),
        ("size", "right"),
        ("cpus", "left"),
        ("A", "right"),
        ("B", "right"),
        ("B better by", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    index = {_key(r): r for r in a if r.get("verified")}
    ratios: list[tuple[str, float]] = []
    for r in sorted(
        (r for r in b if r.get("verified") and _key(r) in index),
        key=lambda r: (row_order(row_name(r)), r["mode"], r["size"], r["cpus"]),
    ):
        ra = index[_key(r)]
        if r["mode"] == "latency":
            va, vb, unit = ra["p50_ns"] / 1000, r["p50_ns"] / 1000, "us"
            ratio = va / vb
        else:
            va, vb, unit = ra["bytes_per_s"] / 1e6, r["bytes_per_s"] / 1e6, "MB/s"
            ratio = vb / va if va else float("inf")
        style = "green" if ratio >= 1.1 else "red" if ratio <= 1 / 1.1 else ""
        t.add_row(
            row_name(r),
            r["mode"],
            size_label(r["size"]),
            f"{r['cpus'][0]}:{r['cpus'][1]}",
            f"{va:,.2f} {unit}",
            f"{vb:,.2f} {unit}",
            f"[{style}]{ratio:.2f}x[/]" if style else f"{ratio:.2f}x",
        )
        label = f"{row_name(r)} {r['mode']} {size_label(r['size'])} {r['cpus'][0]}:{r['cpus'][1]}"
        ratios.append((label, ratio))
    return t, ratios
