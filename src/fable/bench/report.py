"""Tables of bench records (plain text, one row per transport, safety, size and CPU pair)."""

from __future__ import annotations

from typing import Any

__all__ = ["table"]


def _us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.2f}"


def _rate(r: dict[str, Any] | None) -> tuple[str, str]:
    if r is None or "msgs_per_s" not in r:
        return "-", "-"
    return f"{r['msgs_per_s'] / 1e6:.3f}", f"{r['bytes_per_s'] / 1e9:.3f}"


def table(records: list[dict[str, Any]]) -> str:
    """Latency and throughput of the same point side by side; failures listed under the table."""
    rows: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in records:
        key = (r["transport"], r["safe"], r["size"], tuple(r["cpus"]), r["placement"])
        rows.setdefault(key, {})[r["mode"]] = r
    head = (
        "transport",
        "safety",
        "size",
        "cpus",
        "placement",
        "rtt p50 us",
        "rtt p99 us",
        "Mmsg/s",
        "GB/s",
        "verified",
    )
    lines = [head]
    errors = []
    for (name, safe, size, cpus, placement), modes in rows.items():
        lat, thr = modes.get("latency"), modes.get("throughput")
        ok = all(m.get("verified") for m in modes.values())
        for m in modes.values():
            if not m.get("verified"):
                errors.append(f"{name} {m['mode']} {size} B cpus {cpus}: {m.get('error')}")
        mps, gbs = _rate(thr)
        lines.append(
            (
                name,
                "safe" if safe else "unsafe",
                str(size),
                f"{cpus[0]}:{cpus[1]}",
                placement,
                _us(lat.get("p50_ns") if lat else None),
                _us(lat.get("p99_ns") if lat else None),
                mps,
                gbs,
                "yes" if ok else "NO",
            )
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = []
    for j, row in enumerate(lines):
        out.append(
            "  ".join(
                str(c).rjust(w) if i in (2, 5, 6, 7, 8) else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    if errors:
        out.append("")
        out.extend("FAILED " + e for e in errors)
    return "\n".join(out)
