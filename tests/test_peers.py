"""Every bench peer runs through the same harness, verified, and cleans up after itself.

The peers are installed by `make test` (the dev extra includes `fable-ipc[peers]`): a peer
that cannot be imported here fails, it is not skipped."""

from __future__ import annotations

import os

import pytest

from fable.bench.harness import run_point
from fable.bench.links import Point
from fable.bench.peers import PEERS, PeerMissing, missing, peer_link


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_peer_point_is_verified(name: str, mode: str) -> None:
    assert missing(name) is None, f"peer {name} should be installed by make test"
    before = _shm()
    r = run_point(
        Point(f"peer:{name}", True, mode, 4096, (0, 0)),
        placement="same-core",
        repeats=1,
        target_s=0.01,
        verify="full",
        timeout_s=30,
    )
    assert r["verified"] is True, r.get("error")
    assert r["transport"] == f"peer:{name}"
    left = {n for n in _shm() - before if "zenoh" in n or n.startswith("iox2_")}
    left = {n for n in left if not n.endswith("global_mgmt")}  # iceoryx2's one shared file
    assert not left, f"{name} left {left} in /dev/shm"


def test_unknown_and_missing_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        peer_link("nope")
    monkeypatch.setattr("fable.bench.peers.find_spec", lambda name: None)
    assert "pyzmq is not installed" in (missing("pyzmq-ipc") or "")
    with pytest.raises(PeerMissing, match="peer:iceoryx2"):
        peer_link("iceoryx2")
