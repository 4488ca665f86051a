"""The ``fable`` command line. Start-up stays fast: heavy modules are imported inside commands.

fable doctor          settings in force and what this kernel offers
fable daemon          run the name service in the foreground (--stop ends a running one)
fable ls, fable flows the daemon's endpoints and flows (--json)
fable explain A B     the policy's ranking of transports for a connection from A to B
fable calibrate       measure this machine for the policy (about 30 s on 2 vCPUs)
fable reconfigure     switch a live flow to another transport
fable run -- CMD      run an unmodified program; its loopback TCP to other fable-run programs
                      is carried by unix sockets (LD_PRELOAD, fable/run.py)
fable bench           measure the transports between pinned processes (DESIGN.md §9)
fable bench compare   two runs' JSON side by side
fable bench redis     redis-benchmark over TCP, under fable run, over a unix socket
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
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
    """Print the settings in force, the kernel features fable can use and the daemon's
    cluster state."""
    from fable.config import settings
    from fable.doctor import kernel_features

    feats = kernel_features()
    rows = settings().describe()
    cluster = _cluster_state()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "settings": {n: {"value": v, "env": e, "source": s} for n, v, e, s in rows},
                    "kernel": {f.name: {"ok": f.ok, "detail": f.detail} for f in feats},
                    "cluster": cluster,
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
    click.echo("\nCluster:")
    if not isinstance(cluster, dict):
        click.echo(f"  {cluster}")
        return
    click.echo(
        f"  {cluster['url']} as host {cluster['host']}: {cluster['state']}, "
        f"session {cluster['session']}, {'joined' if cluster['joined'] else 'not joined'}; "
        f"link {cluster.get('link') or 'none (no --listen: no connections between hosts)'}"
    )
    if cluster["refused"]:
        click.echo(f"  refused: {cluster['refused']}")
    click.echo(
        f"  hosts: {', '.join(cluster['hosts']) or '-'}; names in the cluster: "
        f"{cluster['names']}; ours published: {cluster['published']}"
    )
    if cluster["pending"]:
        click.echo(f"  waiting to be published: {', '.join(cluster['pending'])}")
    for name, holder in cluster["conflicts"].items():
        click.echo(f"  conflict: {name} is held by host {holder} (it stays local here)")


def _cluster_state() -> dict[str, Any] | str:
    """The daemon's cluster tier (``cluster`` op), or a line saying why there is none."""
    from fable.client import one_shot

    try:
        reply = one_shot("cluster")
    except FableError as e:
        return f"the daemon did not answer: {type(e).__name__}: {e}"
    if reply is None:
        return "no daemon is running"
    return reply["cluster"] or "the daemon is in no cluster (fable daemon --cluster zk://...)"


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
@click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="log to this file (rotated at 1 MiB, 3 kept) instead of stderr",
)
@click.option(
    "--cluster",
    default=None,
    metavar="zk://ADDR[:PORT][,...]/ROOT",
    help="join this cluster: publish this host's endpoints in ZooKeeper, names unique across "
    "hosts (default: $FABLE_CLUSTER)",
)
@click.option(
    "--listen",
    default=None,
    metavar="ADDR:PORT",
    help="with --cluster: take connections from other hosts' daemons here (this host's "
    "address; port 0: any; default: $FABLE_LISTEN)",
)
def daemon(
    system: bool,
    sock: str | None,
    stop: bool,
    log_file: str | None,
    cluster: str | None,
    listen: str | None,
) -> None:
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
    from fable.daemon.server import serve, setup_logging

    setup_logging(Path(log_file) if log_file else None)
    try:
        serve(path, system=system, cluster=cluster, listen=listen)
    except (FableError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def _listing(op: str, as_json: bool, **fields: Any) -> list[dict[str, Any]] | None:
    """The daemon's list for ``ls``/``flows``; printed here as JSON, or "no daemon is
    running" (then None: nothing more to print)."""
    from fable.client import one_shot

    try:
        reply = one_shot(op, **fields)
    except FableError as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from None
    items = None if reply is None else list(reply["endpoints" if op == "ls" else "flows"])
    if as_json:
        click.echo(json.dumps(items or [], indent=1))
        return None
    if items is None:
        click.echo("no daemon is running")
    return items


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
@click.option("--cluster", is_flag=True, help="every host's endpoints, from the cluster tier")
@click.option(
    "--timeout",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, 30),
    help="--cluster: seconds to wait for ZooKeeper",
)
def ls_cmd(as_json: bool, cluster: bool, timeout: float) -> None:
    """The registered endpoints (--cluster: on every host of the daemon's cluster; exit
    status 1 when its ZooKeeper does not answer)."""
    if cluster:
        eps = _listing("ls", as_json, cluster=True, timeout=timeout)
        if eps is None:
            return
        click.echo(f"{'name':<32} {'host':<20} {'uid':>6} {'listening':<9} remote")
        for e in eps:
            click.echo(
                f"{e['name']:<32} {e['host']:<20} {e['uid']:>6} "
                f"{'yes' if e['listening'] else 'no':<9} {'yes' if e['remote'] else 'no'}"
            )
        return
    eps = _listing("ls", as_json)
    if eps is None:
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
    fl = _listing("flows", as_json)
    if fl is None:
        return
    click.echo(
        f"{'id':>10}  {'ends':<30} {'transport':<17} {'safe':<11} {'epoch':>5} "
        f"{'msgs':>10} {'bytes':>12}"
    )
    for f in fl:
        ends = _ends(f)
        safe = "/".join("safe" if x else "unsafe" for x in f["safe"])
        click.echo(
            f"{f['id']:>10}  {ends:<30} {f['transport']:<17} {safe:<11} "
            f"{f['epoch']:>5} {f['msgs']:>10} {f['bytes']:>12}"
        )
        click.echo(f"{'':>10}  why: {f['reason']}")


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--name", default=None, metavar="N", help="this program's name in `fable flows`")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def run(name: str | None, cmd: tuple[str, ...]) -> None:
    """Run CMD (after --) so that its loopback TCP connections with other programs run under
    fable run are carried by unix sockets, listed by `fable flows`."""
    import re

    from fable.run import run as run_program

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise click.BadParameter("1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    run_program(list(cmd), name)


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


def _ends(f: dict[str, Any], name: Callable[[str], str] = str) -> str:
    """A flow's two ends, each with its host when they are on two (``name``: how an end's
    name is shown)."""
    hosts = f.get("hosts") or ["", ""]
    apart = len(hosts) == 2 and all(hosts) and hosts[0] != hosts[1]
    return " <-> ".join(
        name(n) + (f" on {h}" if apart else "") for n, h in zip(f["ends"], hosts, strict=False)
    )


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
            _ends(f, lambda n: _where(n, endpoints or {})),
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
@click.option(
    "--safe/--unsafe",
    "safe",
    default=None,
    help="the form of the ends' reads (default: each end's most zero-copy form within its "
    "own trust); an end that does not trust its peer refuses --unsafe",
)
@click.option("--end", default=None, metavar="NAME", help="apply --safe/--unsafe to this end only")
@click.option("--auto", is_flag=True, help="hand the flow back to the automatic triggers")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0))
def reconfigure(
    flow_id: int,
    transport: str | None,
    safe: bool | None,
    end: str | None,
    auto: bool,
    timeout: float,
) -> None:
    """Switch a live flow (see `fable flows`) to TRANSPORT, without losing a message. Waits
    until the flow's epoch moves (the ends switch as they go on reading and writing); if an end
    refuses, prints why and exits 1. The operator's choice holds: no automatic trigger moves
    the flow until `--auto`."""
    import time

    from fable.client import one_shot

    if auto == (transport is not None):
        raise click.UsageError("name a TRANSPORT, or pass --auto (not both)")
    if end is not None and safe is None:
        raise click.UsageError("--end says which end --safe or --unsafe is for")
    try:
        reply = one_shot("reconfigure", flow=flow_id, transport=transport, safe=safe, end=end)
    except FableError as e:
        raise click.ClickException(str(e)) from None
    if reply is None:
        raise click.ClickException("no daemon is running")
    if auto:
        click.echo(f"flow {flow_id}: back under the automatic triggers")
        return
    before, ticket = reply["flow"]["epoch"], reply.get("ticket")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = one_shot("flows") or {"flows": []}
        flow = next((f for f in now["flows"] if f["id"] == flow_id), None)
        if flow is None:
            raise click.ClickException(f"flow {flow_id} is gone")
        if flow["epoch"] > before:
            safe_now = "/".join("safe" if x else "unsafe" for x in flow["safe"])
            epoch = flow["epoch"]
            click.echo(f"flow {flow_id}: {flow['transport']} (epoch {epoch}), reads {safe_now}")
            return
        refused = flow.get("refused") or {}
        if ticket is not None and refused.get("ticket") == ticket:
            raise click.ClickException(f"flow {flow_id}: refused: {refused.get('why')}")
    raise click.ClickException(
        f"flow {flow_id} did not switch in {timeout:g} s (its ends report once a second)"
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
    from fable.bench import plan
    from fable.nameservice import private_dir
    from fable.policy import calibration_path
    from fable.topology import Topology

    topo = Topology.read()
    todo = plan.calibration_points(topo)
    records = plan.run_points(
        todo, topo, _progress_bar(len(todo)), repeats=repeats, target_s=target_s, timeout_s=20.0
    )
    path = calibration_path()
    private_dir(path.parent)
    plan.write_run(path, records)
    bad = [r for r in records if not r.get("verified")]
    pairs = sorted({p.cpus for p in todo})
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
    """``64``, ``4K``, ``64KiB``, ``1M`` -> bytes."""
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
    """``0:1,0:0`` -> CPU pairs, each CPU one of ``online``."""
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


def _progress_bar(total: int) -> Callable[[Any], None]:
    """A live progress bar on stderr, fed one point at a time (None: done)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("bench", total=total)
    started = False

    def step(p: Any) -> None:
        nonlocal started
        if p is None:
            bar.stop()
            return
        if not started:
            bar.start()
            started = True
        else:
            bar.advance(task)
        bar.update(
            task,
            description=f"{p.transport} {'safe' if p.safe else 'unsafe'} {p.mode[:3]} "
            f"{p.size} B {p.cpus[0]}:{p.cpus[1]}",
        )

    return step


def _option(convert: Callable[[], Any]) -> Any:
    """An option's value, its ValueError a usage error."""
    try:
        return convert()
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


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
@click.option(
    "--api",
    "apis",
    default="msg",
    show_default=True,
    help="how fable's rows move messages: msg (send/recv), batch (send_many/recv_many, 64 a "
    "call; throughput only), buffer (getwritebuf/commit, getreadbuf/release); several: one "
    "row each, e.g. msg,batch,buffer",
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
    "--hosts",
    is_flag=True,
    help="also measure the transports that cross hosts (tcp, tcp-nodelay) between two test "
    "hosts (network namespaces on a veth bridge, a daemon each, one ZooKeeper): the "
    "other-host rows; needs root and ZooKeeper",
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
    type=click.Choice(["coschedule", "switch", "connect"]),
    default=None,
    help="instead of the grid: coschedule = a ping-pong on mempipe-spin whose two processes "
    "are pinned to one CPU midway, with the daemon's triggers on and then off; switch = the "
    "time of a live reconfiguration for every ordered pair of transports; connect = connect "
    "+ first echo through the daemon, beside TCP and unix sockets",
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
    apis: str,
    repeats: int,
    rounds: int,
    target_s: float,
    verify: str,
    timeout_s: float,
    quick: bool,
    peers: bool,
    hosts: bool,
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

    from fable.bench import plan
    from fable.bench.report import results_table
    from fable.topology import Topology, machine_info

    if quick:  # the preset's values, where the command line did not set its own
        target_s = target_s if _given(ctx, "target_s") else plan.QUICK["target_s"]
        timeout_s = timeout_s if _given(ctx, "timeout_s") else plan.QUICK["timeout_s"]
    sel = _option(lambda: plan.select_transports(transports, peers))
    wanted_safety = _csv(safety)
    for s in wanted_safety:
        if s not in ("safe", "unsafe"):
            raise click.BadParameter(f"--safety takes safe and/or unsafe, not {s!r}")
    mode_list = _csv(modes)
    for m in mode_list:
        if m not in plan.MODES:
            raise click.BadParameter(f"--modes takes latency and/or throughput, not {m!r}")
    api_list = _csv(apis)
    for a in api_list:
        if a not in plan.APIS:
            raise click.BadParameter(f"--api takes {', '.join(plan.APIS)}, not {a!r}")
    size_list = [_size(s) for s in _csv(sizes)]
    if grid and pairs:
        raise click.BadParameter("--grid and --pairs exclude each other")
    topo = Topology.read()
    allowed = plan.allowed_cpus(topo)
    if grid:
        pair_list = [(a, b) for a in allowed for b in allowed]
    elif pairs:
        pair_list = _pairs(pairs, allowed)
    else:
        pair_list = [p for p in topo.default_pairs() if p[0] in allowed and p[1] in allowed]
    todo = plan.points(
        sel, pair_list, safety=wanted_safety, sizes=size_list, modes=mode_list, apis=api_list
    )
    across = []
    if hosts:
        if os.geteuid() != 0:
            raise click.ClickException(
                "--hosts makes test hosts in network namespaces: run as root"
            )
        across = plan.host_points(sel, pair_list, sizes=size_list, modes=mode_list)
        if not across:
            raise click.BadParameter(
                "--hosts: none of --transports crosses hosts (tcp, tcp-nodelay)"
            )
    err = Console(stderr=True)
    for n in sel.notes:
        err.print(f"[yellow]note:[/] {n}")
    opts: dict[str, Any] = {
        "rounds": rounds,
        "repeats": repeats,
        "target_s": target_s,
        "verify": verify,
        "timeout_s": timeout_s,
    }
    records = plan.run_points(todo, topo, _progress_bar(len(todo) * rounds), **opts)
    if across:
        from fable.bench.hosts import run_host_points

        try:
            records += run_host_points(across, _progress_bar(len(across) * rounds), **opts)
        except RuntimeError as e:
            raise click.ClickException(f"--hosts: {e}") from None
    out = Console(soft_wrap=False, width=max(100, Console().width))
    for part in results_table(records):
        out.print(part)
    if json_path:
        plan.write_run(json_path, records, sel.notes)
        click.echo(f"wrote {len(records)} records to {json_path}")
    if plot_dir:
        from fable.bench.plot import write_all

        written = write_all(records, machine_info(), sel.notes, plot_dir)
        click.echo(
            f"wrote {len(written)} files to {plot_dir}: "
            + ", ".join(os.path.basename(w) for w in written)
        )
    if not all(r.get("verified") for r in records):
        sys.exit(1)


def _scenario(name: str, pairs: str | None, duration: float, json_path: str | None) -> None:
    """``fable bench --scenario coschedule``: the table, the timeline, the JSON."""

    from rich.console import Console
    from rich.table import Table

    from fable.bench.scenario import coschedule
    from fable.topology import Topology

    topo = Topology.read()
    chosen = _pairs(pairs, topo.cpus) if pairs else []
    cpus = chosen[0] if chosen else (topo.cpus[0], topo.cpus[1] if len(topo.cpus) > 1 else -1)
    if cpus[1] < 0 or cpus[0] == cpus[1]:
        raise click.ClickException(f"the {name} scenario needs two different CPUs (--pairs A:B)")
    console = Console()
    if name == "switch":
        _switch_scenario(console, (int(cpus[0]), int(cpus[1])), json_path)
        return
    if name == "connect":
        _connect_scenario(console, (int(cpus[0]), int(cpus[1])), json_path)
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
        _write_scenario(json_path, name, (int(cpus[0]), int(cpus[1])), {"runs": runs})


def _switch_scenario(console: Any, cpus: tuple[int, int], json_path: str | None) -> None:
    import statistics

    from rich.table import Table

    from fable.bench.scenario import switch_times
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
        rows = [{"from": a, "to": b, "ms": round(x, 3)} for (a, b), x in ms.items()]
        _write_scenario(json_path, "switch", cpus, {"ms": rows})


def _write_scenario(json_path: str, name: str, cpus: tuple[int, int], body: dict[str, Any]) -> None:
    """A scenario's JSON: its name, the machine, the CPUs, then ``body``."""
    from fable.bench.plan import write_json
    from fable.topology import machine_info

    write_json(json_path, {"scenario": name, "machine": machine_info(), "cpus": list(cpus), **body})


def _connect_scenario(console: Any, cpus: tuple[int, int], json_path: str | None) -> None:
    from rich.table import Table

    from fable.bench.scenario import CONNECTS, connect_times

    console.print(
        f"connect: from nothing to the first 64 B message echoed back, {CONNECTS} connections "
        f"each; this process on CPU {cpus[0]}, the accepting one on CPU {cpus[1]}"
    )
    res = connect_times(cpus)
    t = Table(title="connect + first echo")
    for col in ("kind", "median us", "p90 us", "vs tcp", "CPU us"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    tcp = res["tcp"]["median_us"]
    for kind, r in res.items():
        label = f"fable ({r['transport']})" if kind == "fable" else kind
        cpu = r["cpu_us"]
        t.add_row(
            label,
            f"{r['median_us']:,.1f}",
            f"{r['p90_us']:,.1f}",
            f"{r['median_us'] / tcp:.2f}x",
            " + ".join(f"{cpu[k]:,.0f}" for k in ("this", "accepting", "daemon") if k in cpu),
        )
    console.print(t)
    console.print(
        "CPU us: what this process + the accepting one (+ the daemon) ran per connection "
        "(connect, echo, close); where the sum nears the time the CPUs have, CPU bounds "
        "the median, not waiting"
    )
    if json_path:
        _write_scenario(json_path, "connect", cpus, res)


def _fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


@bench.command()
@click.argument("a", type=click.Path(exists=True, dir_okay=False))
@click.argument("b", type=click.Path(exists=True, dir_okay=False))
def compare(a: str, b: str) -> None:
    """Compare two runs (--json files) point by point: a ratio above 1 means B is better
    (shorter round trip, higher rate); then the median ratio and the lowest one."""
    from rich.console import Console

    from fable.bench.plan import read_run
    from fable.bench.report import compare_table

    table, ratios = compare_table(_option(lambda: read_run(a)), _option(lambda: read_run(b)))
    if not ratios:
        raise click.ClickException("the two runs have no verified point in common")
    console = Console()
    console.print(table)
    worst = min(ratios, key=lambda p: p[1])
    console.print(
        f"{len(ratios)} points: median ratio {statistics.median(r for _, r in ratios):.3f}, "
        f"lowest {worst[1]:.3f} ({worst[0]})"
    )


@bench.command()
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--requests", default=100_000, show_default=True, type=click.IntRange(1000))
@click.option("--clients", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--port", default=16379, show_default=True, type=click.IntRange(1, 65535))
@click.option("--json", "json_path", default=None, metavar="FILE", help="write the result")
def redis(rounds: int, requests: int, clients: int, port: int, json_path: str | None) -> None:
    """redis-benchmark against a redis-server under `fable run`, three ways (plain TCP, under
    fable run, the server's unix socket), interleaved rounds, medians (bench/programs.py)."""
    from fable.bench import programs

    try:
        result = programs.redis(rounds, requests, clients, port)
    except FableError as e:
        raise click.ClickException(str(e)) from None
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    click.echo(programs.table(result))


if __name__ == "__main__":  # pragma: no cover
    main()
