"""The ``fable`` command line. Start-up stays fast: heavy modules are imported inside commands.

fable doctor     settings in force and what this kernel offers
fable bench      measure the transports between pinned processes (DESIGN.md §9)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fable-ipc", prog_name="fable")
def main() -> None:
    """fable: reconfigurable I/O channels and an IPC benchmark suite."""


# ------------------------------------------------------------------------------------ doctor
@main.command()
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def doctor(as_json: bool) -> None:
    """Print the settings in force and the kernel features fable can use."""
    from fable.config import settings
    from fable.doctor import kernel_features

    feats = kernel_features()
    rows = settings().describe()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "settings": {n: {"value": v, "env": e, "source": s} for n, v, e, s in rows},
                    "kernel": {f.name: {"ok": f.ok, "detail": f.detail} for f in feats},
                },
                indent=2,
            )
        )
        return
    click.echo("Settings (FABLE_* environment variables):")
    width = max(len(n) for n, *_ in rows)
    for name, value, env, source in rows:
        click.echo(f"  {name:<{width}}  {value:<24} {env} ({source})")
    click.echo("\nKernel:")
    width = max(len(f.name) for f in feats)
    for f in feats:
        mark = "yes" if f.ok else "NO "
        click.echo(f"  {f.name:<{width}}  {mark}  {f.detail}")


# ------------------------------------------------------------------------------------ bench
def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = 1
    for suffix, m in (("KI", 1024), ("K", 1024), ("MI", 1 << 20), ("M", 1 << 20)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        value = int(t) * mult
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (try 64, 4K, 64KiB)") from None
    if value < 0:
        raise click.BadParameter("sizes must be >= 0")
    return value


def _pairs(text: str, online: tuple[int, ...]) -> list[tuple[int, int]]:
    out = []
    for p in _csv(text):
        try:
            a, b = (int(x) for x in p.split(":"))
        except ValueError:
            raise click.BadParameter(f"not a CPU pair: {p!r} (try 0:1)") from None
        for cpu in (a, b):
            if cpu not in online:
                raise click.BadParameter(f"CPU {cpu} is not online (online: {list(online)})")
        out.append((a, b))
    return out


@main.command()
@click.option(
    "--transports", default="all", show_default=True, help="comma-separated REGISTRY names"
)
@click.option("--safety", default="safe,unsafe", show_default=True, help="safe, unsafe or both")
@click.option(
    "--sizes", default="64,4096,65536", show_default=True, help="message sizes (4K, 64KiB...)"
)
@click.option("--pairs", default=None, help="CPU pairs a:b (default: one pair per placement class)")
@click.option(
    "--modes", default="latency,throughput", show_default=True, help="latency, throughput or both"
)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--target",
    "target_s",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0.001),
    help="seconds one repeat should last",
)
@click.option(
    "--verify",
    type=click.Choice(["seq", "full"]),
    default="seq",
    show_default=True,
    help="seq: check every sequence number; full: also every byte",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=60.0,
    show_default=True,
    type=click.FloatRange(1),
    help="seconds before a stuck point is recorded as failed",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="write the records here (schema: DESIGN.md §9)",
)
def bench(
    transports: str,
    safety: str,
    sizes: str,
    pairs: str | None,
    modes: str,
    repeats: int,
    target_s: float,
    verify: str,
    timeout_s: float,
    json_path: str | None,
) -> None:
    """Measure latency (round trip) and throughput (one way) of every transport between two
    pinned processes, verified message by message."""
    from fable.bench.harness import SCHEMA_VERSION, Point, machine_info, run_point
    from fable.bench.report import table
    from fable.bench.topology import Topology
    from fable.transports import REGISTRY

    names = list(REGISTRY) if transports == "all" else _csv(transports)
    for n in names:
        if n not in REGISTRY:
            raise click.BadParameter(f"unknown transport {n!r}; known: {', '.join(REGISTRY)}")
    wanted_safety = _csv(safety)
    for s in wanted_safety:
        if s not in ("safe", "unsafe"):
            raise click.BadParameter(f"--safety takes safe and/or unsafe, not {s!r}")
    mode_list = _csv(modes)
    for m in mode_list:
        if m not in ("latency", "throughput"):
            raise click.BadParameter(f"--modes takes latency and/or throughput, not {m!r}")
    size_list = [_size(s) for s in _csv(sizes)]
    topo = Topology.read()
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    pair_list = (
        _pairs(pairs, allowed)
        if pairs
        else [p for p in topo.default_pairs() if p[0] in allowed and p[1] in allowed]
    )
    points = []
    for name in names:
        for safe in REGISTRY[name].caps.forms:
            if ("safe" if safe else "unsafe") not in wanted_safety:
                continue
            for size in size_list:
                for cpus in pair_list:
                    for mode in mode_list:
                        points.append(Point(name, safe, mode, size, cpus))
    records: list[dict[str, Any]] = []
    for i, p in enumerate(points, 1):
        click.echo(
            f"\r[{i}/{len(points)}] {p.transport} {'safe' if p.safe else 'unsafe'} {p.mode} "
            f"{p.size} B cpus {p.cpus[0]}:{p.cpus[1]}".ljust(70),
            nl=False,
            err=True,
        )
        records.append(
            run_point(
                p,
                placement=topo.placement(*p.cpus),
                repeats=repeats,
                target_s=target_s,
                verify=verify,
                timeout_s=timeout_s,
            )
        )
    click.echo("", err=True)
    click.echo(table(records))
    if json_path:
        doc = {"schema_version": SCHEMA_VERSION, "machine": machine_info(), "records": records}
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
        click.echo(f"wrote {len(records)} records to {json_path}")
    if not all(r.get("verified") for r in records):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
