"""Reconfiguration triggers: when the daemon moves a flow to another transport on its own.

Pure decisions, no I/O: the daemon (``daemon/server.py``) feeds each flow's reports in and
sends the switch a decision names to one end of the flow (the switch itself is
``reconfig.py``'s). Rules, checked in this order each time a flow's facts change:

1. **placement** (urgent, no dwell): the policy now excludes the flow's transport for where
   its ends may run, e.g. a spinning transport whose two ends' CPU affinities came to overlap
   (``taskset``), so that one spinning end can starve the other of the only core they share.
   The flow moves to the policy's best choice for the new placement.
2. **rate**: a flow on a spinning transport whose smoothed message rate fell below
   ``QUIET_RATE`` moves to the best transport that does not spin (it stops burning a core).
3. **back**: a flow a trigger moved away from its transport (its *home*) goes back once the
   reason is gone: the policy allows home again (placement), or the rate rose above
   ``BUSY_RATE`` (rate). ``QUIET_RATE < BUSY_RATE`` is the hysteresis band.
4. **numa**: on a machine with several NUMA nodes, a shared-memory flow whose two ends both
   moved to another node is switched to the same transport again: the new epoch's ring is
   allocated afresh, and first touched from the new node.

Stability: every rule but the first waits until the flow has kept its transport for
``DWELL_S`` seconds; a flow the operator switched (``fable reconfigure``) is *held*: no trigger
touches it until the operator hands it back (``fable reconfigure FLOW --auto``); the setting
``FABLE_TRIGGERS=0`` turns them all off. A request that got no new epoch within
``PENDING_S`` (refused, or the flow is busy) may be asked again.

The rate filter is a one-dimensional Kalman filter on x = ln(1 + msgs/s), which makes the
noise relative (a burst of 10x is the same step at 10 or 10^5 msgs/s):

    model:        x_k = x_(k-1) + w_k,   w_k ~ N(0, Q * dt)      (a random walk in log-rate)
    measurement:  z_k = ln(1 + dmsgs/dt) = x_k + v_k,   v_k ~ N(0, R)
    predict:      P <- P + Q * dt
    update:       K = P / (P + R);  x <- x + K (z - x);  P <- (1 - K) P

``Q = 0.5`` per second (the true rate may move by a factor e^0.7 within a second) and
``R = 0.25`` (one report's rate is off by about e^0.5 from the true one: report timing jitter,
bursts). With reports every second the gain settles at K ~ 0.75: a flow that stops is seen as
quiet after about three reports, one that starts again as busy after one or two.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from fable.transports import REGISTRY

__all__ = [
    "BUSY_RATE",
    "DWELL_S",
    "QUIET_RATE",
    "Decision",
    "FlowFacts",
    "FlowState",
    "RateFilter",
    "decide",
    "note_asked",
]

Q = 0.5  # process noise of the log-rate, per second
R = 0.25  # measurement noise of one report's log-rate
QUIET_RATE = 20.0  # msgs/s (both directions) under which a spinning flow is quiet
BUSY_RATE = 200.0  # msgs/s over which a flow moved for quiet is busy again
DWELL_S = 3.0  # seconds a flow keeps a transport before a non-urgent trigger moves it
PENDING_S = 2.0  # seconds before a request that brought no new epoch may be repeated


@dataclass
class RateFilter:
    """A Kalman filter on the log of a rate (module docstring)."""

    q: float = Q
    r: float = R
    x: float | None = None
    p: float = 0.0
    samples: int = 0

    def update(self, rate: float, dt: float) -> float:
        """Add one measured rate over ``dt`` seconds; returns the smoothed rate."""
        z = math.log1p(max(rate, 0.0))
        self.samples += 1
        if self.x is None:
            self.x, self.p = z, self.r
            return self.rate
        p = self.p + self.q * max(dt, 0.0)
        k = p / (p + self.r)
        self.x += k * (z - self.x)
        self.p = (1.0 - k) * p
        return self.rate

    @property
    def rate(self) -> float:
        return math.expm1(self.x) if self.x is not None else 0.0


@dataclass
class FlowState:
    """What the triggers remember of one flow."""

    msgs: RateFilter = field(default_factory=RateFilter)
    bytes: RateFilter = field(default_factory=RateFilter)
    client_rates: dict[int, tuple[float, float]] = field(default_factory=dict)  # msgs/s, B/s
    last_filter_t: float = 0.0
    epoch: int = 0
    since: float = field(default_factory=time.monotonic)  # on this transport since
    home: tuple[str, tuple[bool, bool]] | None = None  # where a trigger moved the flow away from
    moved_by: str | None = None  # "placement" or "rate"
    hold: bool = False  # the operator's choice: no trigger touches the flow
    node: int = -1  # the NUMA node the ends were on when this epoch began
    asked: tuple[int, float] | None = None  # (epoch, when) of our last request
    would: str | None = None  # what the triggers want now, even held or off (fable flows)

    def counted(
        self, client: int, before: tuple[float, int, int] | None, after: tuple[float, int, int]
    ) -> None:
        """One end's report: its counters ``(when, msgs, bytes)`` before and now (the
        registry's ``Flow.counters``); updates the flow's rate filters."""
        if before is None:
            return
        now, msgs, nbytes = after
        dt = now - before[0]
        if dt <= 0.05:
            return
        self.client_rates[client] = (
            max(msgs - before[1], 0) / dt,
            max(nbytes - before[2], 0) / dt,
        )
        total_m = sum(m for m, _ in self.client_rates.values())
        total_b = sum(b for _, b in self.client_rates.values())
        step = now - self.last_filter_t if self.last_filter_t else dt
        self.last_filter_t = now
        self.msgs.update(total_m, step)
        self.bytes.update(total_b, step)

    def public(self) -> dict[str, Any]:
        """What ``fable flows`` shows of the triggers' view of a flow."""
        return {
            "msg_rate": round(self.msgs.rate, 1),
            "byte_rate": round(self.bytes.rate, 1),
            "hold": self.hold,
            "home": self.home[0] if self.home else None,
            "would": self.would,
        }

    def switched(self, epoch: int, reason: str, now: float) -> None:
        """The flow reached ``epoch``: a switch happened (ours or someone else's)."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.since = now
        self.asked = None
        self.node = -1  # the new ring is first touched wherever the ends run now
        if not reason.startswith(("placement:", "rate:", "back:", "numa:")):
            self.home, self.moved_by = None, None  # not ours: forget where we came from


@dataclass(frozen=True)
class FlowFacts:
    """A flow as the daemon sees it now."""

    transport: str
    safe: tuple[bool, bool]  # each end's reads now, in the order of the flow's ends
    epoch: int
    nodes: tuple[int, int]  # each end's current NUMA node (-1 unknown)
    numa_nodes: int  # NUMA nodes on this machine
    ranking: list[Any]  # policy.Choice list for where the ends may run now, best first


@dataclass(frozen=True)
class Decision:
    transport: str
    safe: tuple[bool, bool]  # each end's form, in the order of the flow's ends
    trigger: str  # "placement", "rate", "back", "numa"
    reason: str


def _best(ranking: list[Any], *, spinning: bool | None = None) -> Any | None:
    for c in ranking:
        if c.excluded:
            continue
        if spinning is not None and REGISTRY[c.transport].caps.spins != spinning:
            continue
        return c
    return None


def decide(
    st: FlowState, f: FlowFacts, now: float, *, enabled: bool = True, dwell: float = DWELL_S
) -> Decision | None:
    """The switch the triggers want for this flow now, or None (module docstring)."""
    if not enabled or st.hold or f.transport not in REGISTRY:
        return None
    if st.asked is not None and st.asked[0] == f.epoch and now - st.asked[1] < PENDING_S:
        return None  # our request is on its way
    caps = REGISTRY[f.transport].caps
    mine = next((c for c in f.ranking if c.transport == f.transport), None)
    top = _best(f.ranking)
    settled = now - st.since >= dwell
    rate = st.msgs.rate
    known = st.msgs.samples >= 2

    # 1. placement: the policy excludes the transport where the ends may run now
    if mine is not None and mine.excluded and top is not None:
        why = mine.reason.split("excluded: ", 1)[-1]
        return _move(st, f, top, "placement", f"placement: {f.transport}: {why}")
    # 2. rate: a quiet flow stops spinning
    if caps.spins and known and rate < QUIET_RATE and settled:
        calm = _best(f.ranking, spinning=False)
        if calm is not None:
            return _move(
                st,
                f,
                calm,
                "rate",
                f"rate: {rate:.1f} msgs/s smoothed (< {QUIET_RATE:g}): {f.transport} spins "
                "for nothing",
            )
    # 3. back home, once the reason is gone
    if st.home is not None and settled and st.home[0] != f.transport:
        home = next((c for c in f.ranking if c.transport == st.home[0] and not c.excluded), None)
        if home is not None:
            if st.moved_by == "placement":
                return _move(
                    st, f, home, "back", f"back: {home.transport} fits where the ends run again"
                )
            if st.moved_by == "rate" and known and rate > BUSY_RATE:
                return _move(
                    st,
                    f,
                    home,
                    "back",
                    f"back: {rate:.0f} msgs/s smoothed (> {BUSY_RATE:g}): {home.transport} again",
                )
    # 4. numa: both ends moved to another node: a fresh ring there
    a, b = f.nodes
    shared_memory = caps.copies_unsafe == 0
    if f.numa_nodes > 1 and shared_memory and a >= 0 and a == b:
        if st.node < 0:
            st.node = a  # where this epoch's ring was first touched
        elif a != st.node and settled and mine is not None and not mine.excluded:
            return Decision(
                f.transport,
                f.safe,
                "numa",
                f"numa: both ends moved from node {st.node} to node {a}: the ring is "
                "allocated again there",
            )
    return None


def _move(st: FlowState, f: FlowFacts, to: Any, trigger: str, reason: str) -> Decision | None:
    if to.transport == f.transport:
        return None
    if trigger in ("placement", "rate") and st.home is None:
        st.home, st.moved_by = (f.transport, f.safe), trigger
    elif trigger == "back":
        st.home, st.moved_by = None, None
    return Decision(to.transport, to.safe, trigger, reason)


def note_asked(st: FlowState, epoch: int, now: float) -> None:
    """Note that a decision was sent for a flow at ``epoch`` (not repeated for PENDING_S)."""
    st.asked = (epoch, now)
