"""The ``fable`` command line. Start-up stays fast: heavy modules are imported inside commands.

fable doctor          settings in force and what this kernel offers
fable daemon          run the name service in the foreground (--stop ends a running one)
fable ls, fable flows the daemon's endpoints and flows (--json)
fable explain A B     the policy's ranking of transports for a connection from A to B
fable calibrate       measure this machine for the policy (about 30 s on 2 vCPUs)
fable reconfigure     switch a live flow to another transport
fable bench           measure the transports between pinned processes (DESIGN.md §9)
fable bench compare   two runs' JSON side by side
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from fable.errors import FableError

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


# ----------------------------------------------------------------------------- name service
@main.command()
@click.option("--system", is_flag=True, help="serve every user of this host (/run/fable)")
@click.option(
    "--socket",
    "sock",
    type=click.Path(dir_okay=False),
    default=None,
    help="socket path (default: $FABLE_SOCKET, else the per-user socket)",
)
@click.option("--stop", is_flag=True, help="stop the daemon that answers on the socket")
def daemon(system: bool, sock: str | None, stop: bool) -> None:
    """Run fabled, the name service, in the foreground (the library starts one by itself
    when none runs)."""
    from pathlib import Path

    from fable.config import settings
    from fable.nameservice import SYSTEM_SOCKET, user_socket

    env = settings().socket
    path = Path(sock) if sock else SYSTEM_SOCKET if system else Path(env) if env else user_socket()
    if stop:
        from fable.client import one_shot

        if one_shot("stop", path) is None:
            click.echo(f"no daemon answers on {path}")
            sys.exit(1)
        click.echo(f"stopped the daemon on {path}")
        return
    import logging

    from fable.daemon.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fabled %(message)s")
    try:
        serve(path, system=system)
    except FableError as e:
        raise click.ClickException(str(e)) from None


def _ask(op: str) -> list[dict[str, Any]] | None:
    from fable.client import one_shot

    reply = one_shot(op)
    return None if reply is None else list(reply["endpoints" if op == "ls" else "flows"])


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def ls_cmd(as_json: bool) -> None:
    """The registered endpoints."""
    eps = _ask("ls")
    if as_json:
        click.echo(json.dumps(eps or [], indent=1))
        return
    if eps is None:
        click.echo("no daemon is running")
        return
    click.echo(f"{'name':<24} {'pid':>7} {'uid':>6} {'listening':<9} {'cpu':>3}  affinity")
    for e in eps:
        aff = ",".join(str(c) for c in e["affinity"])
        click.echo(
            f"{e['name']:<24} {e['pid']:>7} {e['uid']:>6} "
            f"{'yes' if e['listening'] else 'no':<9} {e['cpu']:>3}  {aff}"
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON list (DESIGN.md §4)")
def flows(as_json: bool) -> None:
    """The connections the daemon set up, with their live counters."""
    fl = _ask("flows")
    if as_json:
        click.echo(json.dumps(fl or [], indent=1))
        return
    if fl is None:
        click.echo("no daemon is running")
        return
    click.echo(
        f"{'id':>10}  {'ends':<30} {'transport':<17} {'safe':<11} {'epoch':>5} "
        f"{'msgs':>10} {'bytes':>12}"
    )
    for f in fl:
        ends = " <-> ".join(f["ends"])
        safe = "/".join("safe" if x else "unsafe" for x in f["safe"])
        click.echo(
            f"{f['id']:>10}  {ends:<30} {f['transport']:<17} {safe:<11} "
            f"{f['epoch']:>5} {f['msgs']:>10} {f['bytes']:>12}"
        )
        click.echo(f"{'':>10}  why: {f['reason']}")


@main.command()
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--once", is_flag=True, help="print one frame and exit")
def top(interval: float, once: bool) -> None:
    """A live view of every flow: ends, transport, safe, epoch, rates, waiting mode, the last
    switch and why (rates are the daemon's Kalman-smoothed ones, fable/daemon/triggers.py)."""
    import time

    from rich.console import Console
    from rich.live import Live

    from fable.client import one_shot

    def frame() -> Any:
        try:
            reply = one_shot("flows")
        except FableError as e:
            return f"the daemon did not answer: {e}"
        if reply is None:
            return "no daemon is running"
        eps = (one_shot("ls") or {}).get("endpoints", [])
        return top_table(reply["flows"], time.time(), {e["name"]: e for e in eps})

    console = Console()
    if once:
        console.print(frame())
        return
    with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(frame())
        except KeyboardInterrupt:
            pass


def _si(v: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.1f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


def _where(name: str, endpoints: dict[str, dict[str, Any]]) -> str:
    """``name@cpuN``, the CPU its I/O thread last ran on, and ``pinned N`` (or ``pinned k
    CPUs``) when its affinity is narrower than the machine."""
    ep = endpoints.get(name)
    if ep is None or ep.get("cpu", -1) < 0:
        return name
    aff = ep.get("affinity") or []
    pinned = ""
    if aff and len(aff) < (os.cpu_count() or 0):
        pinned = f" pinned {aff[0]}" if len(aff) == 1 else f" pinned {len(aff)} CPUs"
    return f"{name}@cpu{ep['cpu']}{pinned}"


def top_table(
    flows: list[dict[str, Any]], now: float, endpoints: dict[str, dict[str, Any]] | None = None
) -> Any:
    """The `fable top` table for the daemon's flow records (``endpoints``: `fable ls`'s, by
    name, to show where each end runs)."""
    from rich.table import Table

    from fable.transports import REGISTRY

    t = Table(title=f"fable top: {len(flows)} flow(s)", expand=True)
    for col in ("id", "ends", "transport", "safe", "epoch", "msgs/s", "bytes/s", "waits"):
        t.add_column(
            col, justify="right" if col in ("id", "epoch", "msgs/s", "bytes/s") else "left"
        )
    t.add_column("last switch", ratio=1)
    for f in sorted(flows, key=lambda f: f["id"]):
        info = REGISTRY.get(f["transport"])
        waits = info.caps.wait if info is not None else "?"
        last = f.get("last_switch")
        if last:
            ago = max(0.0, now - float(last.get("at", now)))
            switch = f"{ago:.0f} s ago {last.get('from')} -> {last.get('to')}: {last.get('reason')}"
        else:
            switch = "-"
        if f.get("hold"):
            switch += " [held by the operator]"
        t.add_row(
            str(f["id"]),
            " <-> ".join(_where(n, endpoints or {}) for n in f["ends"]),
            f["transport"],
            "/".join("safe" if x else "unsafe" for x in f["safe"]),
            str(f["epoch"]),
            _si(float(f.get("msg_rate", 0.0)), ""),
            _si(float(f.get("byte_rate", 0.0)), "B"),
            waits,
            switch,
        )
    return t


@main.command()
@click.argument("flow_id", type=int)
@click.argument("transport", required=False)
@click.option("--safe/--unsafe", "safe", default=None, help="the form (default: keep)")
@click.option("--auto", is_flag=True, help="hand the flow back to the automatic triggers")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0))
def reconfigure(
    flow_id: int, transport: str | None, safe: bool | None, auto: bool, timeout: float
) -> None:
    """Switch a live flow (see `fable flows`) to TRANSPORT, without losing a message. Waits
    until the flow's epoch moves (the ends switch as they go on reading and writing). The
    operator's choice holds: no automatic trigger moves the flow until `--auto`."""
    import time

    from fable.client import one_shot

    if auto == (transport is not None):
        raise click.UsageError("name a TRANSPORT, or pass --auto (not both)")
    try:
        reply = one_shot("reconfigure", flow=flow_id, transport=transport, safe=safe)
    except FableError as e:
        raise click.ClickException(str(e)) from None
    if reply is None:
        raise click.ClickException("no daemon is running")
    if auto:
        click.echo(f"flow {flow_id}: back under the automatic triggers")
        return
    before = reply["flow"]["epoch"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = one_shot("flows") or {"flows": []}
        flow = next((f for f in now["flows"] if f["id"] == flow_id), None)
        if flow is None:
            raise click.ClickException(f"flow {flow_id} is gone")
        if flow["epoch"] > before:
            click.echo(f"flow {flow_id}: {flow['transport']} (epoch {flow['epoch']})")
            return
    raise click.ClickException(
        f"flow {flow_id} did not switch in {timeout:g} s (its ends report once a second; "
        "an end that refused, e.g. without trust for unsafe reads, keeps the flow as it is)"
    )


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--trusted", is_flag=True, help="as if both ends passed trusted=True")
@click.option("--pollable", is_flag=True, help="as if a pollable fd was asked for")
@click.option("--size", "msg_size", default=None, help="message size hint (64, 4K...)")
@click.option("--mode", type=click.Choice(["latency", "throughput"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the ranking as JSON")
def explain(
    a: str,
    b: str,
    trusted: bool,
    pollable: bool,
    msg_size: str | None,
    mode: str | None,
    as_json: bool,
) -> None:
    """How the daemon would rank the transports for a connection from A to B (two registered
    names), best first, with the facts and numbers behind each score."""
    from fable.client import one_shot

    fields: dict[str, Any] = {
        "a": a,
        "b": b,
        "trusted": trusted,
        "pollable": pollable,
        "mode": mode,
        "msg_size": _size(msg_size) if msg_size else None,
    }
    try:
        reply = one_shot("explain", **fields)
    except FableError as e:
        raise click.ClickException(str(e)) from None
    if reply is None:
        raise click.ClickException("no daemon is running")
    if as_json:
        click.echo(json.dumps(reply["ranking"], indent=1))
        return
    click.echo(f"{a} -> {b}, numbers from {reply['source']}:")
    for i, c in enumerate(reply["ranking"], 1):
        mark = "  -" if c["excluded"] else f"{i:>3}"
        click.echo(f"{mark} {c['reason']}")


@main.command()
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--target",
    "target_s",
    default=0.03,
    show_default=True,
    type=click.FloatRange(0.001),
    help="seconds one repeat should last",
)
def calibrate(repeats: int, target_s: float) -> None:
    """Measure every transport at this machine's placements (about 30 s on 2 vCPUs) and store the
    table the daemon's policy ranks transports with ($FABLE_STATE_DIR/calibration.json; a
    running daemon picks it up at its next connect)."""
    from fable.bench.harness import SCHEMA_VERSION
    from fable.bench.links import Point
    from fable.nameservice import private_dir
    from fable.policy import SIZES, calibration_path
    from fable.topology import Topology, machine_info
    from fable.transports import REGISTRY

    topo = Topology.read()
    allowed = tuple(c for c in topo.cpus if c in os.sched_getaffinity(0))
    pairs = [p for p in topo.default_pairs() if p[0] in allowed and p[1] in allowed]
    points = [
        Point(name, safe, mode, size, cpus)
        for cpus in pairs
        for name, info in REGISTRY.items()
        for safe in info.caps.forms
        for size in SIZES
        for mode in ("latency", "throughput")
    ]
    records = _run_points(points, topo, repeats=repeats, target_s=target_s, timeout_s=20.0)
    path = calibration_path()
    private_dir(path.parent)
    doc = {"schema_version": SCHEMA_VERSION, "machine": machine_info(), "records": records}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=0))
    os.replace(tmp, path)  # a daemon never reads half a file
    bad = [r for r in records if not r.get("verified")]
    click.echo(
        f"wrote {len(records)} points ({len(pairs)} placements: "
        + ", ".join(topo.placement(*p) for p in pairs)
        + f") to {path}"
        + (f"; {len(bad)} failed and are left out" if bad else "")
    )


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


def _split_transports(text: str, peers: bool) -> tuple[list[str], list[str], bool]:
    """--transports (and --peers) -> (REGISTRY names and auto, peer names, floor row wanted)."""
    from fable.bench.peers import PEERS
    from fable.transports import REGISTRY

    names = [*REGISTRY, "auto", "floor"] if text == "all" else _csv(text)
    fable_names, peer_names, floor = [], [], False
    for n in names:
        if n == "floor":
            floor = True
        elif n == "auto":
            fable_names.append(n)
        elif n.startswith("peer:"):
            if n[5:] not in PEERS:
                raise click.BadParameter(f"unknown peer {n!r}; known: {', '.join(PEERS)}")
            peer_names.append(n[5:])
        elif n in REGISTRY:
            fable_names.append(n)
        else:
            raise click.BadParameter(
                f"unknown transport {n!r}; known: {', '.join(REGISTRY)}, auto, floor, "
                + ", ".join(f"peer:{p}" for p in PEERS)
            )
    if peers:
        peer_names += [p for p in PEERS if p not in peer_names]
    return fable_names, peer_names, floor


QUICK = {"target_s": 0.03, "timeout_s": 20.0}


def _run_points(points: list[Any], topo: Any, rounds: int = 1, **opts: Any) -> list[dict[str, Any]]:
    """Measure every point (``rounds`` times, interleaved: the whole list, then again) under a
    live progress bar; a daemon of our own serves the ``auto`` row while it runs."""
    import contextlib

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from fable.bench.harness import AUTO, merge_rounds, run_point
    from fable.client import private_daemon

    records: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    need_daemon = any(p.transport == AUTO for p in points)
    with private_daemon() if need_daemon else contextlib.nullcontext(), progress:
        task = progress.add_task("bench", total=len(points) * rounds)
        for _ in range(rounds):
            for p in points:
                progress.update(
                    task,
                    description=f"{p.transport} {'safe' if p.safe else 'unsafe'} {p.mode[:3]} "
                    f"{p.size} B {p.cpus[0]}:{p.cpus[1]}",
                )
                records.append(run_point(p, placement=topo.placement(*p.cpus), **opts))
                progress.advance(task)
    return merge_rounds(records) if rounds > 1 else records


@main.group(invoke_without_command=True)
@click.option(
    "--transports",
    default="all",
    show_default=True,
    help="comma-separated REGISTRY names, 'floor', 'peer:NAME' (all: every transport + floor)",
)
@click.option("--safety", default="safe,unsafe", show_default=True, help="safe, unsafe or both")
@click.option(
    "--sizes", default="64,4096,65536", show_default=True, help="message sizes (4K, 64KiB...)"
)
@click.option("--pairs", default=None, help="CPU pairs a:b (default: one pair per placement class)")
@click.option("--grid", is_flag=True, help="every ordered pair of CPUs (the paper's Figure 3)")
@click.option(
    "--modes", default="latency,throughput", show_default=True, help="latency, throughput or both"
)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--rounds",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100),
    help="measure the whole list this many times, interleaved, and keep each point's median",
)
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
    help="seq: check every sequence number; full: also every byte (in C)",
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
    "--quick",
    is_flag=True,
    help="the preset of `make bench`: short repeats (--target 0.03), --timeout 20; about a "
    "minute on 2 cores with the default transports and pairs",
)
@click.option(
    "--peers",
    is_flag=True,
    help="also measure other IPC libraries (pyzmq, multiprocessing, zenoh, iceoryx2) as "
    "peer:NAME rows; a peer that is not installed is skipped with a note",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="write the records here (schema: DESIGN.md §9)",
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="write figures (PNG heatmaps and bars) and report.md into this directory",
)
@click.option(
    "--scenario",
    type=click.Choice(["coschedule", "switch"]),
    default=None,
    help="instead of the grid: coschedule = a ping-pong on mempipe-spin whose two processes "
    "are pinned to one CPU midway, with the daemon's triggers on and then off; switch = the "
    "time of a live reconfiguration for every ordered pair of transports",
)
@click.option(
    "--duration",
    default=6.0,
    show_default=True,
    type=click.FloatRange(1.0, 600.0),
    help="seconds of ping-pong per scenario run",
)
@click.pass_context
def bench(
    ctx: click.Context,
    transports: str,
    safety: str,
    sizes: str,
    pairs: str | None,
    grid: bool,
    modes: str,
    repeats: int,
    rounds: int,
    target_s: float,
    verify: str,
    timeout_s: float,
    quick: bool,
    peers: bool,
    json_path: str | None,
    plot_dir: str | None,
    scenario: str | None,
    duration: float,
) -> None:
    """Measure latency (round trip) and throughput (one way) of every transport between two
    pinned processes, verified message by message.

    The `auto` row lets the daemon's policy pick: both processes are pinned, then register and
    connect through a daemon of the bench's own. The `floor` row is a cache line bounced between
    the two CPUs in C: the lower bound of a round trip between them. (The paper measured
    hardware inter-processor interrupts under Xen for its lower bound; user space cannot send
    those.)

    `fable bench compare A.json B.json` compares two runs."""
    if ctx.invoked_subcommand is not None:
        return
    if scenario is not None:
        _scenario(scenario, pairs, duration, json_path)
        return
    from rich.console import Console

    from fable.bench.harness import FLOOR, FLOOR_SIZE, SCHEMA_VERSION
    from fable.bench.links import Point
    from fable.bench.peers import missing
    from fable.bench.report import results_table
    from fable.topology import Topology, machine_info
    from fable.transports import REGISTRY

    if quick:  # the preset's values, where the command line did not set its own
        target_s = target_s if _given(ctx, "target_s") else QUICK["target_s"]
        timeout_s = timeout_s if _given(ctx, "timeout_s") else QUICK["timeout_s"]
    fable_names, peer_names, floor = _split_transports(transports, peers)
    wanted_safety = _csv(safety)
    for s in wanted_safety:
        if s not in ("safe", "unsafe"):
            raise click.BadParameter(f"--safety takes safe and/or unsafe, not {s!r}")
    mode_list = _csv(modes)
    for m in mode_list:
        if m not in ("latency", "throughput"):
            raise click.BadParameter(f"--modes takes latency and/or throughput, not {m!r}")
    size_list = [_size(s) for s in _csv(sizes)]
    if grid and pairs:
        raise click.BadParameter("--grid and --pairs exclude each other")
    topo = Topology.read()
    allowed = tuple(c for c in topo.cpus if c in os.sched_getaffinity(0))
    if grid:
        pair_list = [(a, b) for a in allowed for b in allowed]
    elif pairs:
        pair_list = _pairs(pairs, allowed)
    else:
        pair_list = [p for p in topo.default_pairs() if p[0] in allowed and p[1] in allowed]
    notes: list[str] = []
    runnable_peers = []
    for peer in peer_names:
        why = missing(peer)
        if why:
            notes.append(f"peer:{peer} skipped: {why}")
        else:
            runnable_peers.append(peer)
    points = []
    for cpus in pair_list:
        if floor and "latency" in mode_list:
            points.append(Point(FLOOR, True, "latency", FLOOR_SIZE, cpus))
        rows = [
            (n, safe)
            for n in fable_names
            for safe in (REGISTRY[n].caps.forms if n in REGISTRY else (True, False))
        ]
        rows = [(n, safe) for n, safe in rows if ("safe" if safe else "unsafe") in wanted_safety]
        rows += [(f"peer:{peer}", True) for peer in runnable_peers]
        for name, safe in rows:
            for size in size_list:
                for mode in mode_list:
                    points.append(Point(name, safe, mode, size, cpus))
    err = Console(stderr=True)
    for n in notes:
        err.print(f"[yellow]note:[/] {n}")
    records = _run_points(
        points,
        topo,
        rounds=rounds,
        repeats=repeats,
        target_s=target_s,
        verify=verify,
        timeout_s=timeout_s,
    )
    out = Console(soft_wrap=False, width=max(100, Console().width))
    for part in results_table(records):
        out.print(part)
    machine = machine_info()
    if json_path:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "machine": machine,
            "records": records,
            "notes": notes,
        }
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
        click.echo(f"wrote {len(records)} records to {json_path}")
    if plot_dir:
        from fable.bench.plot import write_all

        written = write_all(records, machine, notes, plot_dir)
        click.echo(
            f"wrote {len(written)} files to {plot_dir}: "
            + ", ".join(os.path.basename(w) for w in written)
        )
    if not all(r.get("verified") for r in records):
        sys.exit(1)


def _scenario(name: str, pairs: str | None, duration: float, json_path: str | None) -> None:
    """``fable bench --scenario coschedule``: the table, the timeline, the JSON."""
    import json

    from rich.console import Console
    from rich.table import Table

    from fable.bench.scenario import coschedule
    from fable.topology import Topology, machine_info

    topo = Topology.read()
    chosen = _pairs(pairs, topo.cpus) if pairs else []
    cpus = chosen[0] if chosen else (topo.cpus[0], topo.cpus[1] if len(topo.cpus) > 1 else -1)
    if cpus[1] < 0 or cpus[0] == cpus[1]:
        raise click.ClickException(f"the {name} scenario needs two different CPUs (--pairs A:B)")
    console = Console()
    if name == "switch":
        _switch_scenario(console, (int(cpus[0]), int(cpus[1])), json_path)
        return
    console.print(
        f"coschedule: 64 B ping-pong over mempipe-spin, CPUs {cpus[0]} and {cpus[1]}; both "
        f"pinned to CPU {cpus[0]} after {duration / 2:g} s ({name}, triggers on, then off)"
    )
    runs = coschedule((int(cpus[0]), int(cpus[1])), duration)
    t = Table(title="round trip p50 (us)")
    for col in ("triggers", "before", "pinned, before the switch", "after the switch", "switch"):
        t.add_column(col, justify="right")
    t.add_column("now on")
    for r in runs:
        t.add_row(
            "on" if r["triggers"] else "off",
            _fmt_us(r["before_us"]),
            f"{_fmt_us(r['during_us'])} ({r['during_round_trips']} round trips)",
            _fmt_us(r["after_us"]),
            "-" if r["switch_ms"] is None else f"{r['switch_ms']:.1f} ms",
            r["final_transport"],
        )
    console.print(t)
    tl = Table(title="timeline: round trip p50 (us) per slice, t = 0 at the pinning")
    tl.add_column("t (s)", justify="right")
    for r in runs:
        tl.add_column(f"triggers {'on' if r['triggers'] else 'off'}", justify="right")
    for k, slot in enumerate(runs[0]["timeline"]):
        tl.add_row(
            f"{slot['t_s']:+.2f}",
            *(
                f"{_fmt_us(r['timeline'][k]['p50_us'])} ({r['timeline'][k]['round_trips']})"
                for r in runs
            ),
        )
    console.print(tl)
    for r in runs:
        if r["last_switch"]:
            console.print(f"switch: {r['last_switch']['reason']}")
    if json_path:
        doc = {"scenario": name, "machine": machine_info(), "cpus": list(cpus), "runs": runs}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)


def _switch_scenario(console: Any, cpus: tuple[int, int], json_path: str | None) -> None:
    import json
    import statistics

    from rich.table import Table

    from fable.bench.scenario import switch_times
    from fable.topology import machine_info
    from fable.transports import REGISTRY

    console.print(
        f"switch: conn.reconfigure(B) to the first message echoed over B, ms (median of 3); "
        f"this process on CPU {cpus[0]}, the echo on CPU {cpus[1]}"
    )
    ms = switch_times(cpus)
    t = Table(title="from (row) to (column), ms")
    t.add_column("from \\ to")
    for b in REGISTRY:
        t.add_column(b, justify="right")
    for a in REGISTRY:
        t.add_row(a, *(f"{ms[(a, b)]:.2f}" for b in REGISTRY))
    console.print(t)
    v = sorted(ms.values())
    console.print(f"median {statistics.median(v):.2f} ms, min {v[0]:.2f}, max {v[-1]:.2f}")
    if json_path:
        doc = {
            "scenario": "switch",
            "machine": machine_info(),
            "cpus": list(cpus),
            "ms": [{"from": a, "to": b, "ms": round(x, 3)} for (a, b), x in ms.items()],
        }
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)


def _fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _load_run(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"{path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != 1:
        raise click.BadParameter(f"{path}: not a fable bench JSON file (schema_version 1)")
    records = doc.get("records")
    if not isinstance(records, list):
        raise click.BadParameter(f"{path}: no records")
    return records


@bench.command()
@click.argument("a", type=click.Path(exists=True, dir_okay=False))
@click.argument("b", type=click.Path(exists=True, dir_okay=False))
def compare(a: str, b: str) -> None:
    """Compare two runs (--json files) point by point: a ratio above 1 means B is better
    (shorter round trip, higher rate)."""
    from rich.console import Console

    from fable.bench.report import compare_table

    table, n = compare_table(_load_run(a), _load_run(b))
    if n == 0:
        raise click.ClickException("the two runs have no verified point in common")
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
