"""The reconfiguration triggers (fable/daemon/triggers.py) with fixture inputs: the Kalman filter,
the placement, rate and NUMA rules, hysteresis and dwell, the operator's hold, the off switch."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest

from fable.daemon.triggers import (
    BUSY_RATE,
    PENDING_S,
    QUIET_RATE,
    FlowFacts,
    FlowState,
    RateFilter,
    decide,
    note_asked,
)
from fable.policy import Facts, rank
from fable.topology import Topology
from test_policy import A0, A1, BOTH, TWO, _table

pytestmark = pytest.mark.timeout(60)

TABLE = _table()
# two NUMA nodes of one CPU each (the placement classes of the policy are the same as TWO's)
NUMA = Topology(TWO.cpus, TWO.siblings, TWO.caches, {0: 0, 1: 1}, {0: 0, 1: 1})


def _ranking(a: frozenset[int], b: frozenset[int], topo: Topology = TWO, **hints: Any) -> Any:
    return rank(Facts(affinity_a=a, affinity_b=b, **hints), TABLE, topo)


def _facts(
    transport: str,
    a: frozenset[int] = A0,
    b: frozenset[int] = A1,
    *,
    epoch: int = 0,
    nodes: tuple[int, int] = (0, 0),
    numa_nodes: int = 1,
    **hints: Any,
) -> FlowFacts:
    topo = NUMA if numa_nodes > 1 else TWO
    return FlowFacts(
        transport, (True, True), epoch, nodes, numa_nodes, _ranking(a, b, topo, **hints)
    )


def _settled(st: FlowState, now: float = 1000.0, rate: float | None = None) -> FlowState:
    """A flow on its transport since long before ``now``, with a steady ``rate``."""
    st.since = now - 100
    if rate is not None:
        for _ in range(10):
            st.msgs.update(rate, 1.0)
    return st


# ---------------------------------------------------------------------------- the filter
def test_the_filter_follows_a_steady_rate_and_smooths_noise() -> None:
    f = RateFilter()
    rng = random.Random(1)
    raw, smooth = [], []
    for _ in range(200):
        z = 1000 * math.exp(rng.gauss(0, 0.5))  # noise of the size R assumes
        raw.append(math.log1p(z))
        smooth.append(math.log1p(f.update(z, 1.0)))
    assert 600 < f.rate < 1600

    def spread(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    assert spread(smooth[20:]) < 0.8 * spread(raw[20:])  # smoother than what it was fed


def test_the_filter_sees_a_flow_stop_and_start_within_a_few_reports() -> None:
    f = RateFilter()
    for _ in range(20):
        f.update(50_000, 1.0)
    steps = 0
    while f.rate >= QUIET_RATE:
        f.update(0, 1.0)
        steps += 1
    assert steps <= 4, f"quiet only after {steps} reports"
    steps = 0
    while f.rate <= BUSY_RATE:
        f.update(50_000, 1.0)
        steps += 1
    assert steps <= 2, f"busy again only after {steps} reports"


def test_a_longer_gap_between_reports_trusts_the_new_one_more() -> None:
    short, long = RateFilter(), RateFilter()
    for f in (short, long):
        f.update(1000, 1.0)
        f.update(1000, 1.0)
    short.update(0, 0.1)
    long.update(0, 10.0)
    assert long.rate < short.rate


def test_counters_from_both_ends_add_up() -> None:
    st = FlowState()
    last: dict[int, tuple[float, int, int]] = {}

    def report(client: int, now: float, msgs: int, nbytes: int) -> None:
        st.counted(client, last.get(client), (now, msgs, nbytes))
        last[client] = (now, msgs, nbytes)

    for k in range(6):
        report(1, float(k), 1000 * k, 64_000 * k)  # end 1: 1000 msgs/s
        report(2, k + 0.5, 500 * k, 1_000 * k)  # end 2: 500 msgs/s
    assert 1200 < st.msgs.rate < 1800
    assert st.bytes.rate > 40_000


# ---------------------------------------------------------------------------- placement
def test_pinning_both_ends_to_one_cpu_moves_a_spinning_flow_at_once() -> None:
    st = FlowState()  # just switched: no dwell for this one
    st.since = 1000.0
    assert decide(st, _facts("mempipe-spin"), 1000.0) is None  # apart: fine
    d = decide(st, _facts("mempipe-spin", A0, A0, mode="latency", msg_size=64), 1000.0)
    assert d is not None and d.trigger == "placement"
    assert d.transport == "pipe"  # the best round trip on one core in the fixture table
    assert "spins" in d.reason and "share a core" in d.reason
    assert st.home == ("mempipe-spin", (True, True)) and st.moved_by == "placement"


def test_the_flow_goes_back_once_the_ends_are_apart_and_the_dwell_is_over() -> None:
    st = FlowState()
    st.since = 1000.0
    d = decide(st, _facts("mempipe-spin", A0, A0), 1000.0)
    assert d is not None
    note_asked(st, 0, 1000.0)
    st.switched(1, d.reason, 1000.1)
    here = _facts(d.transport, A0, A1, epoch=1)
    assert decide(st, here, 1000.2, dwell=3.0) is None  # apart again, but within the dwell
    back = decide(st, here, 1003.2, dwell=3.0)
    assert back is not None and back.transport == "mempipe-spin" and back.trigger == "back"
    assert st.home is None
    # still sharing a core: no way back
    st2 = FlowState(home=("mempipe-spin", (True, True)), moved_by="placement", epoch=1)
    assert decide(_settled(st2), _facts(d.transport, A0, BOTH, epoch=1), 1000.0) is None


def test_a_request_on_its_way_is_not_repeated_until_it_is_overdue() -> None:
    st = FlowState()
    f = _facts("mempipe-spin", A0, A0)
    assert decide(st, f, 1000.0) is not None
    note_asked(st, 0, 1000.0)
    st.home = None  # as if the request were refused
    assert decide(st, f, 1000.5) is None
    assert decide(st, f, 1000.0 + PENDING_S + 0.1) is not None


# ---------------------------------------------------------------------------- rate
def test_a_quiet_spinning_flow_stops_spinning_and_comes_back_when_busy() -> None:
    st = _settled(FlowState(), rate=1.0)
    d = decide(st, _facts("mempipe-spin"), 1000.0)
    assert d is not None and d.trigger == "rate" and "msgs/s" in d.reason
    assert not _spins(d.transport)
    note_asked(st, 0, 1000.0)
    st.switched(1, d.reason, 1000.0)
    on = _facts(d.transport, epoch=1)
    for _ in range(10):  # traffic returns
        st.msgs.update(50_000, 1.0)
    assert decide(st, on, 1001.0, dwell=3.0) is None  # the dwell first
    back = decide(st, on, 1003.5, dwell=3.0)
    assert back is not None and back.transport == "mempipe-spin" and back.trigger == "back"


def test_rates_between_the_thresholds_change_nothing_hysteresis() -> None:
    middle = math.sqrt(QUIET_RATE * BUSY_RATE)
    busy_spinner = _settled(FlowState(), rate=middle)
    assert decide(busy_spinner, _facts("mempipe-spin"), 1000.0) is None
    moved = _settled(FlowState(home=("mempipe-spin", (True, True)), moved_by="rate"), rate=middle)
    assert decide(moved, _facts("mempipe-futex"), 1000.0) is None


def test_the_rate_trigger_waits_for_the_dwell_and_for_two_reports() -> None:
    st = FlowState()
    st.since = 1000.0
    for _ in range(5):
        st.msgs.update(0.0, 1.0)
    assert decide(st, _facts("mempipe-spin"), 1001.0, dwell=3.0) is None
    fresh = FlowState()
    fresh.since = 0.0
    fresh.msgs.update(0.0, 1.0)  # one report says little
    assert decide(fresh, _facts("mempipe-spin"), 1000.0) is None


def test_a_blocking_flow_is_left_alone_whatever_its_rate() -> None:
    for rate in (0.0, 1e6):
        assert decide(_settled(FlowState(), rate=rate), _facts("unix"), 1000.0) is None


# ---------------------------------------------------------------------------- numa
def test_both_ends_moving_to_another_node_reallocates_the_ring() -> None:
    st = _settled(FlowState(), rate=50_000)
    f0 = _facts("mempipe-futex", BOTH, BOTH, nodes=(0, 0), numa_nodes=2)
    assert decide(st, f0, 1000.0) is None  # remembers node 0
    assert st.node == 0
    split = _facts("mempipe-futex", BOTH, BOTH, nodes=(1, 0), numa_nodes=2)
    assert decide(st, split, 1000.0) is None  # one end moved: the ring stays
    moved = _facts("mempipe-futex", BOTH, BOTH, nodes=(1, 1), numa_nodes=2)
    d = decide(st, moved, 1000.0)
    assert d is not None and d.trigger == "numa" and d.transport == "mempipe-futex"
    assert "node 0 to node 1" in d.reason
    note_asked(st, 0, 1000.0)
    st.switched(1, d.reason, 1000.1)
    assert st.node == -1  # the next look notes where the new ring was touched
    assert (
        decide(st, _facts("mempipe-futex", BOTH, BOTH, epoch=1, nodes=(1, 1), numa_nodes=2), 1004.0)
        is None
    )
    assert st.node == 1


def test_no_numa_move_on_one_node_or_for_a_socket() -> None:
    st = _settled(FlowState(node=0), rate=50_000)
    assert decide(st, _facts("mempipe-futex", BOTH, BOTH, nodes=(1, 1)), 1000.0) is None
    st = _settled(FlowState(node=0), rate=50_000)
    assert decide(st, _facts("unix", BOTH, BOTH, nodes=(1, 1), numa_nodes=2), 1000.0) is None


# ---------------------------------------------------------------------------- stability
def test_the_operators_choice_holds_and_the_setting_turns_triggers_off() -> None:
    f = _facts("mempipe-spin", A0, A0)
    assert decide(FlowState(hold=True), f, 1000.0) is None
    assert decide(FlowState(), f, 1000.0, enabled=False) is None
    assert decide(FlowState(), f, 1000.0) is not None


def test_someone_elses_switch_forgets_the_way_home() -> None:
    st = FlowState(home=("mempipe-spin", (True, True)), moved_by="rate")
    st.switched(1, "asked for by the operator (uid 0, pid 1)", 1000.0)
    assert st.home is None and st.moved_by is None
    st = FlowState(home=("mempipe-spin", (True, True)), moved_by="rate")
    st.switched(1, "rate: 0.1 msgs/s smoothed", 1000.0)
    assert st.home == ("mempipe-spin", (True, True))


def _spins(name: str) -> bool:
    from fable.transports import REGISTRY

    return REGISTRY[name].caps.spins


# ---------------------------------------------------------------------------- with a daemon
class Pair:
    """Two processes pinned apart (A on CPU 0, B on CPU 1) with a flow between them over
    ``transport``; A ping-pongs sequence-numbered messages with B (pausing ``pause`` s between
    round trips) while told to be busy (b"b"), stays silent while told to be quiet (b"q"),
    switches the connection to mempipe-spin itself at b"m" (``conn.reconfigure``), and stops
    at b"s" (its result: round trips done, every one verified)."""

    def __init__(self, path: Any, transport: str, pause: float = 0.001) -> None:
        import os

        from helpers import Child

        self.path = path
        tag = f"trig/{os.getpid()}"
        ready_r, ready_w = os.pipe()
        self.ctl_r, self.ctl_w = os.pipe()

        def echo() -> int:
            import fable

            os.sched_setaffinity(0, {1})
            lst = fable.register(f"{tag}/b").listen()
            os.write(ready_w, b"r")
            conn = lst.accept(timeout=30)
            n = 0
            try:
                while True:
                    conn.send(conn.recv())
                    n += 1
            except fable.ConnectionClosed:
                return n

        def pinger() -> int:
            import select

            import fable

            os.sched_setaffinity(0, {0})
            conn = fable.register(f"{tag}/a").connect(f"{tag}/b", transport=transport)
            busy, seq = True, 0
            while True:
                told = select.poll()  # not select.select: fds above 1024 work
                told.register(self.ctl_r, select.POLLIN)
                if told.poll(0 if busy else 1000):
                    cmd = os.read(self.ctl_r, 1)
                    if cmd == b"s":
                        conn.close()
                        return seq
                    if cmd == b"m":  # the application's own switch
                        assert isinstance(conn, fable.Connection)
                        conn.reconfigure("mempipe-spin", timeout=10)
                        continue
                    busy = cmd == b"b"
                if busy:
                    m = b"%d" % seq
                    conn.send(m)
                    got = conn.recv(timeout=30)
                    if got != m:
                        raise AssertionError(f"round trip {seq}: {got!r}")
                    seq += 1
                    time.sleep(pause)

        self.b = Child(echo)
        assert os.read(ready_r, 1) == b"r"
        os.close(ready_r)
        os.close(ready_w)
        self.a = Child(pinger)
        from helpers import wait_for

        wait_for(lambda: len(self.flows()) == 1, 10)
        self.id = self.flows()[0]["id"]

    def flows(self) -> list[dict[str, Any]]:
        from helpers import ask

        return list(ask("flows", self.path)["flows"])

    def flow(self) -> dict[str, Any]:
        return next(f for f in self.flows() if f["id"] == self.id)

    def tell(self, cmd: bytes) -> None:
        import os

        os.write(self.ctl_w, cmd)

    def pin(self, a: int, b: int) -> None:
        from fable.bench.scenario import pin_process

        pin_process(self.a.pid, {a})
        pin_process(self.b.pid, {b})

    def stop(self) -> int:
        self.tell(b"s")
        done = int(self.a.result(30))
        assert int(self.b.result(30)) == done
        return done


@pytest.fixture
def trig_daemon(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A daemon (on the test's socket) with a short dwell; FABLE_TRIGGERS from the test."""
    import os
    from pathlib import Path

    from helpers import start_daemon, stop

    monkeypatch.setenv("FABLE_TRIGGER_DWELL", "0.5")
    path = Path(os.environ["FABLE_SOCKET"])
    p = start_daemon(path)
    yield path
    stop(p)


def _wait_transport(pair: Pair, pred: Any, timeout: float) -> dict[str, Any]:
    from helpers import wait_for

    wait_for(lambda: pred(pair.flow()["transport"]), timeout)
    return pair.flow()


def _wait_would(pair: Pair, reason: str, timeout: float = 10.0) -> dict[str, Any]:
    """The flow once the triggers want a switch for ``reason`` (``would``: they decided it
    after a report, whether or not they may act on it)."""
    from helpers import wait_for

    wait_for(lambda: f" {reason}" in (pair.flow()["would"] or ""), timeout)
    return pair.flow()


@pytest.mark.timeout(120)
def test_placement_trigger_end_to_end(trig_daemon: Any) -> None:
    pair = Pair(trig_daemon, "mempipe-spin")
    try:
        time.sleep(0.3)
        pair.pin(0, 0)  # an operator's taskset: both ends on CPU 0
        f = _wait_transport(pair, lambda t: not _spins(t), 3.0)
        assert f["last_switch"]["reason"].startswith("placement: mempipe-spin")
        assert f["home"] == "mempipe-spin"
        _check_top(pair, f)
        pair.pin(0, 1)  # apart again: back, after the dwell
        f = _wait_transport(pair, lambda t: t == "mempipe-spin", 5.0)
        assert f["last_switch"]["reason"].startswith("back:") and f["epoch"] == 2
    finally:
        done = pair.stop()
    assert done > 100


def _check_top(pair: Pair, f: dict[str, Any]) -> None:
    """`fable top --once` shows the flow: ends, transport, epoch, rates, waits, last switch."""
    from click.testing import CliRunner

    from fable.cli import main

    r = CliRunner().invoke(main, ["top", "--once"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    out = r.output
    for text in (str(pair.id), f["transport"], "msgs/s", "bytes/s", "waits", "placement:"):
        assert text in out, (text, out)
    row = next(line for line in out.splitlines() if str(pair.id) in line)
    assert "mempipe-spin -> " + f["transport"] in row
    assert row.count("@cpu0 pinned 0") == 2  # both ends, where the operator put them
    from fable.transports import REGISTRY

    assert REGISTRY[f["transport"]].caps.wait in row


@pytest.mark.timeout(120)
def test_the_operators_choice_holds_until_auto(trig_daemon: Any) -> None:
    from click.testing import CliRunner

    from fable.cli import main

    pair = Pair(trig_daemon, "unix")
    try:
        r = CliRunner().invoke(main, ["reconfigure", str(pair.id), "mempipe-spin"])
        assert r.exit_code == 0, r.output
        held = pair.flow()
        assert held["hold"] and held["transport"] == "mempipe-spin"
        pair.pin(0, 0)
        # the placement trigger wants to move it (so it could have), and does not
        f = _wait_would(pair, "placement:")
        assert f["transport"] == "mempipe-spin" and f["epoch"] == held["epoch"]
        r = CliRunner().invoke(main, ["reconfigure", str(pair.id), "--auto"])
        assert r.exit_code == 0, r.output
        f = _wait_transport(pair, lambda t: not _spins(t), 3.0)
        assert not f["hold"] and f["last_switch"]["reason"].startswith("placement:")
        r = CliRunner().invoke(main, ["reconfigure", str(pair.id)])
        assert r.exit_code == 2 and "TRANSPORT" in r.output, r.output  # a usage error
    finally:
        pair.stop()


@pytest.mark.timeout(120)
def test_the_applications_own_choices_are_not_holds(trig_daemon: Any) -> None:
    """A transport named at connect (transport=) and the application's own
    conn.reconfigure set where the flow is; the triggers may still move it."""
    pair = Pair(trig_daemon, "unix")  # named at connect
    try:
        assert not pair.flow()["hold"]
        pair.tell(b"m")
        f = _wait_transport(pair, lambda t: t == "mempipe-spin", 10.0)
        assert not f["hold"] and "application" in f["last_switch"]["reason"]
        pair.pin(0, 0)
        f = _wait_transport(pair, lambda t: not _spins(t), 5.0)
        assert f["last_switch"]["reason"].startswith("placement: mempipe-spin")
    finally:
        pair.stop()


@pytest.mark.timeout(120)
def test_triggers_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    from pathlib import Path

    from helpers import start_daemon, stop

    monkeypatch.setenv("FABLE_TRIGGERS", "0")  # read by the daemon started below
    path = Path(os.environ["FABLE_SOCKET"])
    daemon = start_daemon(path)
    pair = Pair(path, "mempipe-spin")
    try:
        pair.pin(0, 0)
        f = _wait_would(pair, "placement:")  # the trigger would act, were triggers on
        assert f["transport"] == "mempipe-spin" and f["epoch"] == 0
    finally:
        pair.stop()
        stop(daemon)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rate_trigger_end_to_end(trig_daemon: Any) -> None:
    pair = Pair(trig_daemon, "mempipe-spin")
    try:
        time.sleep(2.5)  # busy for a few reports
        assert pair.flow()["transport"] == "mempipe-spin"
        assert pair.flow()["msg_rate"] > BUSY_RATE
        pair.tell(b"q")
        f = _wait_transport(pair, lambda t: not _spins(t), 15.0)
        assert f["last_switch"]["reason"].startswith("rate:")
        pair.tell(b"b")
        f = _wait_transport(pair, lambda t: t == "mempipe-spin", 15.0)
        assert f["last_switch"]["reason"].startswith("back:")
    finally:
        pair.stop()
