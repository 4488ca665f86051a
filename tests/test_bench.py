"""The bench harness: message patterns checked in C, verification that catches lost, duplicated,
reordered and corrupted messages, stuck points that time out, the floor row, the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from fable.bench import _native, plan
from fable.bench.harness import run_point
from fable.bench.links import FableLink, Point
from fable.bench.plot import write_all
from fable.bench.report import Summary, compare_table, markdown, results_table
from fable.transports import REGISTRY

REGISTRY_NAMES = set(REGISTRY)

SIZE = 100  # no control message (JSON) of the harness has this length


# ------------------------------------------------------------------------------ the pattern
@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 15, 16, 17, 64, 4096, 65536 + 3])
def test_message_pattern_roundtrip(size: int) -> None:
    m = _native.message(12345, size)
    assert len(m) == size
    assert _native.check(m, 12345) == -1
    buf = bytearray(size)
    _native.fill(buf, 12345)
    assert bytes(buf) == m
    if size:
        assert _native.check(m, 12346) >= 0  # another message's bytes are not this one's


@pytest.mark.parametrize("offset", [0, 7, 8, 15, 99])
def test_check_names_the_first_wrong_byte(offset: int) -> None:
    m = bytearray(_native.message(7, SIZE))
    m[offset] ^= 0x40
    assert _native.check(m, 7) == offset


def test_bodies_differ_between_messages() -> None:
    # a byte left over from an earlier message is caught, not only a wrong sequence number
    a, b = _native.message(1, 64), _native.message(2, 64)
    assert all(a[i : i + 8] != b[i : i + 8] for i in range(0, 64, 8))


# ------------------------------------------------------------------- faults the check catches
class _FaultyChannel:
    def __init__(self, inner: Any, fault: str, at: int, size: int) -> None:
        self.inner, self.fault, self.at, self.size = inner, fault, at, size
        self.count = 0
        self.queue: list[bytes] = []
        self.send_many, self.flush, self.close = inner.send_many, inner.flush, inner.close

    def recv(self) -> bytes:
        if self.queue:
            return self.queue.pop(0)
        m: bytes = self.inner.recv()
        if len(m) != self.size or self.fault == "echo-twice":
            return m  # a control message, or a fault on the sending side
        self.count += 1
        if self.count != self.at:
            return m
        if self.fault == "drop":
            return bytes(self.inner.recv())
        if self.fault == "duplicate":
            self.queue.append(m)
            return m
        if self.fault == "reorder":
            nxt = bytes(self.inner.recv())
            self.queue.append(m)
            return nxt
        if self.fault == "corrupt":
            c = bytearray(m)
            c[-1] ^= 1
            return bytes(c)
        raise AssertionError(self.fault)

    def recv_many(self, max_msgs: int) -> list[bytes]:
        """The batch API's read, with the same fault: "drop" loses the ``at``-th message."""
        msgs: list[bytes] = self.inner.recv_many(max_msgs)
        out = []
        for m in msgs:
            self.count += len(m) == self.size
            if not (self.fault == "drop" and self.count == self.at and len(m) == self.size):
                out.append(m)
        return out or self.recv_many(max_msgs)

    def send(self, data: bytes) -> None:
        self.inner.send(data)
        if self.fault == "echo-twice" and len(data) == self.size:
            self.count += 1
            if self.count == self.at:
                self.inner.send(data)


class FaultyLink:
    """A pipe whose reading side (B) damages the ``at``-th message it gets."""

    def __init__(self, fault: str, at: int = 5) -> None:
        self.inner = FableLink("pipe")
        self.fault, self.at = fault, at

    def setup(self, point: Point) -> None:
        self.size = point.size
        self.inner.setup(point)

    def end(self, side: int) -> Any:
        ch = self.inner.end(side)
        return _FaultyChannel(ch, self.fault, self.at, self.size) if side == 1 else ch

    def cleanup(self) -> None:
        pass


def _run(
    fault: str, mode: str = "throughput", verify: str = "seq", api: str = "msg"
) -> dict[str, Any]:
    return run_point(
        Point("pipe", True, mode, SIZE, (0, 0), api),
        placement="same-core",
        repeats=1,
        target_s=0.01,
        verify=verify,
        timeout_s=20,
        link=FaultyLink(fault),
    )


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("drop", "message 4: got sequence 5"),
        ("duplicate", "message 5: got sequence 4"),
        ("reorder", "message 4: got sequence 5"),
    ],
)
def test_lost_duplicated_reordered_messages_fail_the_point(fault: str, words: str) -> None:
    r = _run(fault)
    assert r["verified"] is False
    assert words in r["error"] and "lost, duplicated or reordered" in r["error"], r["error"]
    assert "msgs_per_s" not in r


def test_a_lost_message_fails_a_batch_point() -> None:
    r = _run("drop", api="batch")
    assert r["verified"] is False
    assert "message 4: got sequence 5" in r["error"], r["error"]


def test_check_many_names_the_first_wrong_message() -> None:
    msgs = _native.messages(10, 6, 100)
    assert _native.check_many(msgs, 10, 100, True) == -1
    assert _native.check_many(msgs[:2] + msgs[3:], 10, 100, False) == 2  # one lost
    bad = bytearray(msgs[4])
    bad[50] ^= 1
    damaged = [*msgs[:4], bytes(bad), *msgs[5:]]
    assert _native.check_many(damaged, 10, 100, False) == -1  # seq only: unseen
    assert _native.check_many(damaged, 10, 100, True) == 4
    assert _native.check_many([*msgs[:1], msgs[1][:99]], 10, 100, False) == 1  # short


@pytest.mark.parametrize("transport", ["mempipe-spin", "unix"])
def test_the_batch_and_buffer_apis_measure_verified_points(transport: str) -> None:
    for mode, api in (("throughput", "batch"), ("latency", "buffer"), ("throughput", "buffer")):
        for size in (64, 300_000):
            r = run_point(
                Point(transport, True, mode, size, (0, 0), api),
                placement="same-core",
                repeats=1,
                target_s=0.01,
                verify="full",
                timeout_s=60,
            )
            assert r["verified"] is True and r["api"] == api, r


def test_the_other_apis_are_for_fables_rows_only() -> None:
    sel = plan.select_transports("floor,unix", False)
    todo = plan.points(sel, [(0, 0)], sizes=[64], apis=["msg", "batch", "buffer"])
    got = {(p.transport, p.mode, p.api) for p in todo}
    assert ("floor", "latency", "msg") in got
    assert not any(p.transport == "floor" and p.api != "msg" for p in todo)
    assert ("unix", "latency", "batch") not in got  # batch: throughput only
    assert {("unix", m, a) for m in ("latency", "throughput") for a in ("msg", "buffer")} <= got
    with pytest.raises(ValueError, match="throughput only"):
        run_point(Point("unix", True, "latency", 64, (0, 0), "batch"), placement="x")


def test_a_corrupted_payload_fails_a_full_check_only() -> None:
    r = _run("corrupt", verify="full")
    assert r["verified"] is False
    assert f"message 4: payload corrupted at byte {SIZE - 1}" in r["error"], r["error"]
    # --verify seq checks sequence numbers only: the same damage goes unseen, by design
    assert _run("corrupt", verify="seq")["verified"] is True


def test_a_duplicated_echo_fails_a_latency_point() -> None:
    r = _run("echo-twice", mode="latency")
    assert r["verified"] is False and "got sequence 4" in r["error"], r["error"]


def test_an_honest_link_passes_full_verification() -> None:
    for mode in ("latency", "throughput"):
        r = run_point(
            Point("pipe", True, mode, SIZE, (0, 0)),
            placement="same-core",
            repeats=2,
            target_s=0.01,
            verify="full",
        )
        assert r["verified"] is True, r


# ------------------------------------------------------------------------------- timeouts
class StuckLink:
    """B never opens its end: A waits forever for the first echo."""

    def __init__(self) -> None:
        self.inner = FableLink("unix")

    def setup(self, point: Point) -> None:
        self.inner.setup(point)

    def end(self, side: int) -> Any:
        if side == 1:
            time.sleep(3600)
        return self.inner.end(side)

    def cleanup(self) -> None:
        self.cleaned = True


def test_a_stuck_point_times_out_as_a_failed_record() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    r = run_point(
        Point("unix", True, "latency", 64, (0, 0)),
        placement="same-core",
        timeout_s=2,
        link=StuckLink(),
    )
    assert time.monotonic() - t0 < 10
    assert r["verified"] is False and r["error"] == "timed out after 2 s"
    for key in ("transport", "safe", "mode", "size", "cpus", "placement", "repeats", "verify"):
        assert key in r
    time.sleep(0.2)
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left, "the stuck point's processes were not killed"


# ---------------------------------------------------------------------------------- floor
def test_floor_row_measures_a_round_trip() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    pair = (cpus[0], cpus[-1])
    r = run_point(Point("floor", True, "latency", 64, pair), placement="x", target_s=0.01)
    assert r["verified"] is True, r
    assert 0 < r["min_ns"] <= r["p50_ns"] <= r["p99_ns"] <= r["max_ns"]
    with pytest.raises(ValueError, match="latency only"):
        run_point(Point("floor", True, "throughput", 64, pair), placement="x")


def test_floor_detects_a_dead_ponger() -> None:
    import mmap

    mem = mmap.mmap(-1, 4096)
    t0 = time.monotonic()
    assert _native.floor(mem, 0, 0, 10, None, 50_000_000) is False  # nobody answers
    assert time.monotonic() - t0 < 2
    with pytest.raises(ValueError):
        _native.floor(bytearray(8), 0, 0, 1, None, 1)


# --------------------------------------------------------------------------------- report
def _rec(
    t: str,
    safe: bool,
    mode: str,
    size: int,
    placement: str,
    cpus: list[int],
    v: float,
    ok: bool = True,
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "transport": t,
        "safe": safe,
        "mode": mode,
        "size": size,
        "cpus": cpus,
        "placement": placement,
        "repeats": 1,
        "verify": "seq",
        "verified": ok,
    }
    if not ok:
        r["error"] = "timed out after 20 s"
    elif mode == "latency":
        r.update(p50_ns=v, p99_ns=v, min_ns=v, max_ns=v)
    else:
        r.update(msgs_per_s=v, bytes_per_s=v * size)
    return r


RECORDS = [
    _rec("floor", True, "latency", 64, "shared-cache", [0, 1], 100),
    _rec("pipe", True, "latency", 64, "shared-cache", [0, 1], 40_000),
    _rec("pipe", True, "throughput", 64, "shared-cache", [0, 1], 1e6),
    _rec("mempipe-spin", True, "latency", 64, "shared-cache", [0, 1], 3_000),
    _rec("mempipe-spin", True, "throughput", 64, "shared-cache", [0, 1], 4e6),
    _rec("mempipe-spin", True, "latency", 64, "same-core", [0, 0], 8_000_000),
    _rec("mempipe-spin", True, "throughput", 64, "same-core", [0, 0], 0.5e6),
    _rec("pipe", True, "latency", 64, "same-core", [0, 0], 7_000),
    _rec("pipe", True, "throughput", 64, "same-core", [0, 0], 1.5e6),
    _rec("peer:pyzmq-ipc", True, "latency", 64, "shared-cache", [0, 1], 80_000),
    _rec("peer:pyzmq-ipc", True, "throughput", 64, "shared-cache", [0, 1], 2e6),
    _rec("tcp", True, "throughput", 64, "same-core", [0, 0], 0, ok=False),
]


def test_summary_best_worst_and_never_the_floor() -> None:
    s = Summary(RECORDS)
    assert s.placements == ["same-core", "shared-cache"]
    assert s.best("shared-cache", 64, "latency") == ("mempipe-spin safe", 3_000)
    assert s.best("same-core", 64, "latency") == ("pipe safe", 7_000)
    assert s.worst("same-core", 64, "throughput") == ("mempipe-spin safe", 0.5e6)
    assert len(s.failed) == 1


def test_markdown_names_best_transport_spread_and_peers() -> None:
    md = markdown(RECORDS, {"cpus": 2}, ["peer:zenoh skipped: eclipse-zenoh is not installed"])
    assert "| same-core | 64 B | pipe safe 7.00 us | mempipe-spin safe 8000 us | 1142.9x |" in md
    # fable's best against the best peer: 3 us vs 80 us round trip, 4 vs 2 M msg/s
    assert "mempipe-spin safe 3.00 us | peer:pyzmq-ipc 80.00 us | 26.67x |" in md
    assert "| 2.00x |" in md
    assert "Floor (cache-line round trip): shared-cache: 0.10 us" in md
    assert "tcp safe throughput 64 B cpus 0:0: timed out after 20 s" in md
    assert "peer:zenoh skipped" in md


def test_results_table_renders_every_row_and_the_failures() -> None:
    from rich.console import Console

    console = Console(width=200, record=True)
    for part in results_table(RECORDS):
        console.print(part)
    text = console.export_text()
    for word in (
        "same-core (cpus 0:0)",
        "shared-cache (cpus 0:1)",
        "floor",
        "peer:pyzmq-ipc",
        "mempipe-spin safe",
        "FAILED",
        "timed out",
    ):
        assert word in text


def test_compare_ratios_say_which_run_is_better() -> None:
    from rich.console import Console

    faster = [dict(r) for r in RECORDS]
    for r in faster:
        if r["transport"] == "pipe" and r["verified"]:
            if r["mode"] == "latency":
                r["p50_ns"] /= 2
            else:
                r["msgs_per_s"] *= 3
                r["bytes_per_s"] *= 3
    table, ratios = compare_table(RECORDS, faster)
    assert len(ratios) == len(RECORDS) - 1  # the failed point is not compared
    assert sorted({round(r, 2) for _, r in ratios}) == [1.0, 2.0, 3.0]
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "2.00x" in text and "3.00x" in text and "1.00x" in text


def test_plots_and_report_are_written(tmp_path: Path) -> None:
    written = write_all(RECORDS, {"cpus": 2}, [], str(tmp_path))
    names = {os.path.basename(w) for w in written}
    assert {
        "throughput.png",
        "report.md",
        "rtt-mempipe-spin-safe.png",
        "rtt-pipe-safe.png",
    } <= names
    for w in written:
        if w.endswith(".png"):
            assert Path(w).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_coschedule_scenario(tmp_path: Path) -> None:
    """`fable bench --scenario coschedule`: with triggers the flow leaves mempipe-spin after the
    pinning, without them it stays (the numbers themselves are the bench's, not asserted)."""
    from click.testing import CliRunner

    from fable.cli import main

    out = tmp_path / "cosched.json"
    r = CliRunner().invoke(
        main, ["bench", "--scenario", "coschedule", "--duration", "2", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "timeline" in r.output and "triggers" in r.output
    on, off = json.loads(out.read_text())["runs"]
    assert on["triggers"] and not off["triggers"]
    assert on["switch_ms"] is not None and on["final_transport"] != "mempipe-spin"
    assert on["last_switch"]["reason"].startswith("placement:")
    assert on["before_us"] is not None and on["after_us"] is not None
    assert off["switch_ms"] is None and off["final_transport"] == "mempipe-spin"
    assert len(on["timeline"]) == len(off["timeline"]) == 24


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_switch_scenario(tmp_path: Path) -> None:
    """`fable bench --scenario switch`: a time for every ordered pair of transports."""
    from click.testing import CliRunner

    from fable.cli import main
    from fable.transports import REGISTRY

    out = tmp_path / "switch.json"
    r = CliRunner().invoke(main, ["bench", "--scenario", "switch", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["ms"]
    assert {(x["from"], x["to"]) for x in rows} == {(a, b) for a in REGISTRY for b in REGISTRY}
    # each time is of a switch the scenario saw done (it checks the transport and the epoch
    # after each, and the echo process's exit status); a switch waits at most 10 s
    assert all(0 < x["ms"] < 10_000 for x in rows)


def test_the_connect_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fable bench --scenario connect`: fable's connect + first echo beside TCP and unix."""
    from click.testing import CliRunner

    from fable.bench import scenario
    from fable.cli import main

    monkeypatch.setattr(scenario, "CONNECTS", 20)
    out = tmp_path / "connect.json"
    r = CliRunner().invoke(main, ["bench", "--scenario", "connect", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    for kind in ("fable", "tcp", "unix"):
        assert doc[kind]["n"] == 20 and 0 < doc[kind]["median_us"] <= doc[kind]["p90_us"]
    assert doc["fable"]["transport"] in REGISTRY_NAMES
    assert set(doc["fable"]["cpu_us"]) == {"this", "accepting", "daemon"}
    assert set(doc["tcp"]["cpu_us"]) == {"this", "accepting"}
    # every process did some work for each connection (a wrong pid would read as 0)
    assert all(v > 0 for k in ("fable", "tcp") for v in doc[k]["cpu_us"].values())
    assert "vs tcp" in r.output and "CPU us" in r.output


@pytest.mark.timeout(120)
def test_the_cli_exits_1_on_a_failed_point_and_keeps_each_points_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fable bench --rounds 3`: one record per point, the median round of three interleaved
    ones (`round_values` in the order they ran); a point that failed in a round fails, and
    the command exits with status 1 after writing every record."""
    from click.testing import CliRunner

    from fable.bench import harness
    from fable.cli import main

    real = harness.link_for
    monkeypatch.setattr(
        harness, "link_for", lambda name: FaultyLink("drop") if name == "pipe" else real(name)
    )
    out = tmp_path / "run.json"
    args = ["bench", "--transports", "pipe,unix", "--safety", "safe", "--sizes", "64"]
    args += ["--modes", "throughput", "--pairs", "0:0", "--rounds", "3", "--target", "0.01"]
    r = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert r.exit_code == 1, r.output
    recs = {x["transport"]: x for x in json.loads(out.read_text())["records"]}
    assert set(recs) == {"pipe", "unix"}
    assert recs["pipe"]["verified"] is False and "got sequence" in recs["pipe"]["error"]
    assert recs["pipe"]["rounds"] == 3
    good = recs["unix"]
    assert good["verified"] is True and good["rounds"] == 3 and len(good["round_values"]) == 3
    assert good["msgs_per_s"] == sorted(good["round_values"])[1]  # the median of the three
    monkeypatch.setattr(harness, "link_for", real)
    r = CliRunner().invoke(main, [*args[:2], "unix", *args[3:], "--json", str(out)])
    assert r.exit_code == 0, r.output  # the control: the same command without the fault
