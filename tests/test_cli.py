"""The `fable` command line: doctor, bench (schema of its JSON), argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fable.bench.harness import run_point
from fable.bench.links import Point
from fable.cli import main


def test_doctor_text_and_json() -> None:
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    for word in (
        "ring_size",
        "FABLE_RING_SIZE",
        "memfd",
        "sealing",
        "futex",
        "eventfd",
        "vmsplice",
    ):
        assert word in r.output
    r = CliRunner().invoke(main, ["doctor", "--json"])
    doc = json.loads(r.output)
    assert doc["kernel"]["memfd"]["ok"] is True
    assert doc["settings"]["ring_size"]["env"] == "FABLE_RING_SIZE"


REQUIRED = {
    "transport",
    "safe",
    "mode",
    "size",
    "cpus",
    "placement",
    "repeats",
    "verify",
    "verified",
}


def test_bench_json_schema(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    args = [
        "bench",
        "--transports",
        "unix,pipe",
        "--sizes",
        "64,4K",
        "--pairs",
        "0:0",
        "--repeats",
        "1",
        "--target",
        "0.01",
        "--verify",
        "full",
        "--json",
        str(out),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["machine"]["cpus"] >= 1
    assert len(doc["records"]) == 2 * 2 * 2
    for rec in doc["records"]:
        assert rec.keys() >= REQUIRED
        assert rec["verified"] is True and rec["verify"] == "full" and rec["cpus"] == [0, 0]
        assert rec["placement"] == "same-core"
        if rec["mode"] == "latency":
            assert 0 < rec["min_ns"] <= rec["p50_ns"] <= rec["p99_ns"] <= rec["max_ns"]
        else:
            assert rec["msgs_per_s"] > 0 and rec["bytes_per_s"] == rec["msgs_per_s"] * rec["size"]
    assert "unix" in r.output and "pipe" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--transports", "nope"], "unknown transport"),
        (["--sizes", "big"], "not a size"),
        (["--pairs", "0-1"], "not a CPU pair"),
        (["--pairs", "0:999"], "not online"),
        (["--safety", "risky"], "--safety"),
        (["--modes", "fast"], "--modes"),
        (["--transports", "peer:nope"], "unknown peer"),
        (["--grid", "--pairs", "0:0"], "exclude each other"),
    ],
)
def test_bench_bad_arguments(args: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["bench", *args])
    assert r.exit_code == 2 and message in r.output


def test_stuck_point_is_a_failed_record() -> None:
    # a point that cannot finish in its timeout becomes a record, not a hang
    rec = run_point(
        Point("unix", True, "throughput", 65536, (0, 0)),
        placement="same-core",
        target_s=30.0,
        timeout_s=1.0,
    )
    assert rec["verified"] is False and "timed out" in rec["error"]


def test_cli_starts_fast() -> None:
    # `fable --help` must not import the heavy modules (scripts call the CLI in loops)
    code = (
        "import sys, fable.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'rich'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bench_floor_row_notes_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor row, a missing peer reported as skipped (never measured), --plot's files."""
    from importlib.util import find_spec as real

    def find_spec(name: str) -> object:
        return None if name == "zenoh" else real(name)

    monkeypatch.setattr("fable.bench.peers.find_spec", find_spec)
    out, plots = tmp_path / "run.json", tmp_path / "plots"
    args = [
        "bench",
        "--transports",
        "floor,pipe,peer:zenoh",
        "--sizes",
        "64",
        "--pairs",
        "0:0",
        "--repeats",
        "1",
        "--target",
        "0.01",
        "--json",
        str(out),
        "--plot",
        str(plots),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    kinds = sorted((rec["transport"], rec["mode"]) for rec in doc["records"])
    assert kinds == [("floor", "latency"), ("pipe", "latency"), ("pipe", "throughput")]
    assert doc["notes"] == [
        "peer:zenoh skipped: eclipse-zenoh is not installed (pip install 'fable-ipc[peers]')"
    ]
    assert (plots / "report.md").exists() and (plots / "throughput.png").exists()
    assert "peer:zenoh skipped" in (plots / "report.md").read_text()


def test_bench_quick_preset_keeps_what_the_command_line_says() -> None:
    from fable.bench.plan import QUICK

    assert QUICK == {"target_s": 0.03, "timeout_s": 20.0}
    r = CliRunner().invoke(main, ["bench", "--help"])
    assert "--quick" in r.output and "--grid" in r.output and "--peers" in r.output
    assert "Xen" in r.output  # the help says why the floor is not the paper's IPI


def test_bench_compare(tmp_path: Path) -> None:
    def run(path: Path, p50: int) -> None:
        rec = {
            "transport": "pipe",
            "safe": True,
            "mode": "latency",
            "size": 64,
            "cpus": [0, 1],
            "placement": "shared-cache",
            "repeats": 1,
            "verify": "seq",
            "verified": True,
            "p50_ns": p50,
            "p99_ns": p50,
            "min_ns": p50,
            "max_ns": p50,
        }
        path.write_text(json.dumps({"schema_version": 1, "machine": {}, "records": [rec]}))

    run(tmp_path / "a.json", 10_000)
    run(tmp_path / "b.json", 5_000)
    r = CliRunner().invoke(
        main, ["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    )
    assert r.exit_code == 0, r.output
    assert "2.00x" in r.output and "pipe safe" in r.output
    assert "1 points: median ratio 2.000, lowest 2.000 (pipe safe latency 64 B 0:1)" in r.output
    (tmp_path / "c.json").write_text("{}")
    r = CliRunner().invoke(
        main, ["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")]
    )
    assert r.exit_code == 2 and "not a fable bench JSON file" in r.output


def test_bench_grid_measures_every_ordered_pair(tmp_path: Path) -> None:
    import os

    out = tmp_path / "grid.json"
    args = [
        "bench",
        "--grid",
        "--transports",
        "floor",
        "--modes",
        "latency",
        "--repeats",
        "1",
        "--target",
        "0.01",
        "--json",
        str(out),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    cpus = sorted(os.sched_getaffinity(0))
    got = sorted(tuple(rec["cpus"]) for rec in json.loads(out.read_text())["records"])
    assert got == [(a, b) for a in cpus for b in cpus]
