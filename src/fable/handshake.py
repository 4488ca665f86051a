"""Offers and answers: how the two sides of a connection agree on a transport, the first time
(epoch 0, the ``hello``) and at every reconfiguration (epoch n, ``reconfig``), checked in one
place for both.

    offering side                                  answering side
    --------------------------------------------   ---------------------------------------------
    info.create(options) -> (ours, theirs)
    open ours (role 0, epoch e)
    OFFER {op, epoch, transport, safe, params, ──► read_offer: a known transport, a form it has,
           reason} + the fds of theirs                well-formed fields (else ProtocolError)
                                                    refusal: what this side accepts, from its
                                                      own state (its trust, its fileno())
                                                    open theirs (role 1, epoch e)
    epoch 0: no answer; the data path carries the rest (a refused hello closes the channel)
    epoch n: ACCEPT(e) or REFUSE(e, why) on the setup channel (fable/epochs.py)

The offering side keeps nothing of the answering side's share: its fds are closed once sent.
The answering side owns the fds that came with an offer from ``read_offer`` on, and closes them
on every path that does not open them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fable._wire import close_fds
from fable.errors import FableError, ProtocolError
from fable.transports import REGISTRY, DataPath, EndSpec, TransportInfo
from fable.transports.channel import SetupChannel

__all__ = [
    "HELLO",
    "PROPOSE",
    "Offer",
    "Stance",
    "choose_form",
    "first_offer",
    "make_offer",
    "open_offer",
    "read_offer",
    "refusal",
]

HELLO = "hello"  # the first offer (epoch 0)
PROPOSE = "reconfig"  # a later one (epoch n)


@dataclass(frozen=True)
class Offer:
    """An offer as read from the setup channel, its fields checked."""

    op: str
    epoch: int
    info: TransportInfo
    safe: bool
    params: dict[str, Any]
    reason: str = ""


@dataclass(frozen=True)
class Stance:
    """What this side accepts in an offer, from its own state, never from the peer's word.

    ``trusted``: this side may read in place (unsafe, zero-copy); None: it has not said and
    takes the form the first offer names (``open_pair``'s other end: the pair's creator chose
    for both). ``no_spin``: its ``fileno()`` is out, so no spinning transport."""

    trusted: bool | None = None
    no_spin: bool = False


def transport_info(name: str) -> TransportInfo:
    """The REGISTRY row of ``name``; ValueError naming the known ones otherwise."""
    info = REGISTRY.get(name)
    if info is None:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(REGISTRY)}")
    return info


def choose_form(info: TransportInfo, safe: bool | None) -> bool:
    """``safe``, or the transport's first form when None; ValueError if it has no such form."""
    if safe is None:
        safe = info.caps.forms[0]
    why = info.no_form(safe)
    if why is not None:
        raise ValueError(why)
    return safe


def make_offer(
    ch: SetupChannel,
    info: TransportInfo,
    *,
    safe: bool,
    epoch: int,
    op: str,
    options: dict[str, Any] | None = None,
    reason: str = "",
) -> DataPath:
    """Create transport ``info``, open this side's end (role 0) and send the peer its share in
    an offer; returns this side's path. Nothing is left behind if it raises."""
    ours, theirs = info.create(dict(options or {}))
    try:
        path = info.open(ours, 0, safe, ch, epoch)
    except BaseException:
        close_fds(theirs.fds)
        raise
    record: dict[str, Any] = {
        "op": op,
        "epoch": epoch,
        "transport": info.name,
        "safe": safe,
        "params": theirs.params,
    }
    if reason:
        record["reason"] = reason[:500]
    try:
        ch.send(record, theirs.fds)
    except BaseException:
        path.teardown()
        raise
    finally:
        close_fds(theirs.fds)
    return path


def read_offer(record: dict[str, Any], fds: list[int], op: str) -> Offer:
    """The checked fields of an offer record; ``ProtocolError`` (``fds`` closed) if it is not
    a well-formed ``op`` offer for a known transport in a form that transport has."""
    try:
        if record.get("op") != op:
            raise ProtocolError(f"expected a {op} on the setup channel, got {record.get('op')!r}")
        epoch = record.get("epoch", 0 if op == HELLO else None)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ProtocolError(f"{op} without a valid epoch: {record!r:.200}")
        name = record.get("transport")
        info = REGISTRY.get(name) if isinstance(name, str) else None
        if info is None:
            raise ProtocolError(f"the peer asked for an unknown transport {name!r}")
        safe, params = record.get("safe"), record.get("params")
        if not isinstance(safe, bool) or not isinstance(params, dict):
            raise ProtocolError(f"malformed {op} on the setup channel")
        why = info.no_form(safe)
        if why is not None:
            raise ProtocolError(why)
        return Offer(op, epoch, info, safe, params, str(record.get("reason", ""))[:500])
    except BaseException:
        close_fds(fds)
        raise


def refusal(offer: Offer, stance: Stance) -> str | None:
    """Why this side refuses ``offer`` given its own ``stance``, or None (it accepts)."""
    if not offer.safe and stance.trusted is False:
        return "this side does not trust its peer: no unsafe (zero-copy) reads"
    if stance.no_spin and offer.info.caps.spins:
        return (
            f"fileno() was handed out on this side: {offer.info.name} spins and has no readiness fd"
        )
    return None


def open_offer(ch: SetupChannel, offer: Offer, fds: list[int]) -> DataPath:
    """Open this side's end of an accepted offer (role 1); the fds are the path's (or closed).
    Resources that do not check out are the peer's fault: ``ProtocolError``, whatever the
    system call that found out (a mapping refused, a pipe that is not one)."""
    try:
        return offer.info.open(EndSpec(fds, offer.params), 1, offer.safe, ch, offer.epoch)
    except FableError:
        raise
    except (OSError, ValueError, OverflowError, MemoryError) as e:
        raise ProtocolError(
            f"the peer's {offer.info.name} resources: {type(e).__name__}: {e}"
        ) from e


def first_offer(ch: SetupChannel, stance: Stance, timeout: float | None) -> tuple[DataPath, Offer]:
    """The answering side at epoch 0: wait for the hello, check it, open this side's end."""
    record, fds = ch.next(timeout)
    offer = read_offer(record, fds, HELLO)
    if offer.epoch != 0:
        close_fds(fds)
        raise ProtocolError(f"the first offer is for epoch {offer.epoch}, not 0")
    why = refusal(offer, stance)
    if why is not None:
        close_fds(fds)
        raise ProtocolError(f"refused the peer's offer: {why}")
    return open_offer(ch, offer, fds), offer
