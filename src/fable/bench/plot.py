"""Figures of a bench run (``fable bench --plot DIR``), drawn with matplotlib's Agg backend.

- ``rtt-<transport>.png``: the paper's Figure 3, one heatmap per transport and safety: the
  median round trip between every pair of CPUs measured (rows: the CPU of the pinging side,
  columns: the echoing side; grey where a pair was not measured), one panel per size.
- ``throughput.png``: the paper's Figure 4, grouped bars of one-way throughput, one panel per
  placement, one group per size, one bar per transport (log scale).
- ``report.md``: the Markdown report of :func:`fable.bench.report.markdown`.
"""

from __future__ import annotations

import math
import os
from typing import Any

from fable.bench.report import Summary, markdown, row_name, row_order, size_label

__all__ = ["write_all"]

Record = dict[str, Any]


def _colors() -> tuple[Any, Any]:
    from matplotlib.colors import LogNorm, Normalize

    return LogNorm, Normalize


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe_name(row: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in row)


def heatmaps(records: list[Record], out_dir: str) -> list[str]:
    """One PNG per transport and safety with latency records on at least two CPU pairs."""
    plt = _pyplot()
    LogNorm, Normalize = _colors()
    by_row: dict[str, list[Record]] = {}
    for r in records:
        if r["mode"] == "latency" and r.get("verified"):
            by_row.setdefault(row_name(r), []).append(r)
    written = []
    for row in sorted(by_row, key=row_order):
        recs = by_row[row]
        if len({tuple(r["cpus"]) for r in recs}) < 2:
            continue
        cpus = sorted({c for r in recs for c in r["cpus"]})
        sizes = sorted({r["size"] for r in recs})
        idx = {c: i for i, c in enumerate(cpus)}
        scale = 1.0 if len(cpus) <= 8 else 1.4
        fig, axes = plt.subplots(
            1,
            len(sizes),
            figsize=(1.2 + 4.0 * len(sizes) * scale, 3.8 * scale),
            squeeze=False,
            layout="constrained",
        )
        for ax, size in zip(axes[0], sizes, strict=True):
            grid = [[math.nan] * len(cpus) for _ in cpus]
            for r in recs:
                if r["size"] == size:
                    a, b = r["cpus"]
                    grid[idx[a]][idx[b]] = r["p50_ns"] / 1000
            cmap = plt.get_cmap("viridis").with_extremes(bad="#cccccc")  # unmeasured pairs
            values = [v for line in grid for v in line if not math.isnan(v)]
            lo, hi = min(values), max(values)
            # a log scale where values span a decade (a spinning transport on one core)
            norm = LogNorm(lo, hi) if lo > 0 and hi / lo > 10 else Normalize(lo, hi)
            im = ax.imshow(grid, cmap=cmap, norm=norm, origin="upper", interpolation="nearest")
            ax.set_title(f"{size_label(size)} messages", fontsize=10)
            ax.set_xlabel("CPU of the echoing process")
            ax.set_ylabel("CPU of the pinging process")
            step = max(1, len(cpus) // 16)
            small = {"fontsize": 7} if len(cpus) > 8 else {}
            ax.set_xticks(range(0, len(cpus), step), [str(c) for c in cpus[::step]], **small)
            ax.set_yticks(range(0, len(cpus), step), [str(c) for c in cpus[::step]], **small)
            if len(cpus) <= 8:
                for i in range(len(cpus)):
                    for j in range(len(cpus)):
                        v = grid[i][j]
                        if not math.isnan(v):
                            dark = norm(v) < 0.6  # viridis is dark below ~0.6
                            ax.text(
                                j,
                                i,
                                f"{v:.1f}",
                                ha="center",
                                va="center",
                                color="white" if dark else "black",
                                fontsize=8,
                            )
            fig.colorbar(im, ax=ax, label="round trip p50 (us)")
        fig.suptitle(f"Ping-pong round trip by CPU pair: {row}")
        path = os.path.join(out_dir, f"rtt-{_safe_name(row)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def throughput_bars(records: list[Record], out_dir: str) -> str | None:
    """Figure 4: a panel per placement, bars of one-way throughput per size and transport."""
    plt = _pyplot()
    s = Summary(records)
    rows = [r for r in s.rows if r != "floor"]
    panels = [
        p
        for p in s.placements
        if any(s.get(p, row, size, "throughput") for row in rows for size in s.sizes)
    ]
    if not panels or not rows:
        return None
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(9.0, 1.0 + 0.28 * len(rows) * len(s.sizes)), 3.6 * len(panels)),
        squeeze=False,
        layout="constrained",
    )
    colors = plt.get_cmap("tab20").colors
    width = 0.8 / len(rows)
    for ax, placement in zip(axes[:, 0], panels, strict=True):
        for k, row in enumerate(rows):
            xs, ys = [], []
            for i, size in enumerate(s.sizes):
                v = s.get(placement, row, size, "throughput")
                if v:
                    xs.append(i - 0.4 + width * (k + 0.5))
                    ys.append(v * size / 1e6)
            ax.bar(
                xs,
                ys,
                width=width,
                color=colors[k % len(colors)],
                label=row,
                hatch="//" if row.startswith("peer:") else None,
                edgecolor="white",
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(s.sizes)), [size_label(x) for x in s.sizes])
        ax.set_xlabel("message size")
        ax.set_ylabel("throughput (MB/s, log)")
        pairs = sorted(s.pairs[placement])
        ax.set_title(
            f"{placement} (cpus {pairs[0][0]}:{pairs[0][1]}"
            + (f" and {len(pairs) - 1} more pairs)" if len(pairs) > 1 else ")")
        )
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="transport (hatched: peers)"
    )
    fig.suptitle("One-way throughput by placement and message size")
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(
    records: list[Record], machine: dict[str, Any], notes: list[str], out_dir: str
) -> list[str]:
    """Write every figure and the report into ``out_dir``; return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = heatmaps(records, out_dir)
    bars = throughput_bars(records, out_dir)
    if bars:
        written.append(bars)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown(records, machine, notes))
    written.append(path)
    return written
