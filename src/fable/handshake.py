"""Offers and answers: how the two sides of a connection agree on a transport, the first time
(epoch 0, the ``hello``) and at every reconfiguration (epoch n, ``reconfig``), checked in one
place for both.

    offering side                                  answering side
    --------------------------------------------   ---------------------------------------------
    info.create(options) -> (ours, theirs)
    open ours (role 0, epoch e, its own form)
    OFFER {op, epoch, transport, safe, yours,  ──► read_offer: a known transport, well-formed
           params, reason} + the fds of theirs        fields (else ProtocolError)
                                                    answer_form: this side's form, from its own
                                                      state (its trust, the transport it expects,
                                                      its fileno()); ``yours`` is a wish
                                                    open theirs (role 1, epoch e, that form)
    epoch 0: nothing if it opened; else REFUSE(0, why, kind) and the channel closes
    epoch n: ACCEPT(e) or REFUSE(e, why, kind) on the setup channel (fable/epochs.py)

Each side reads in its own form (DESIGN.md §2: trust is per reading side): ``safe`` in an offer
is the offering side's own form (for the record), ``yours`` the form it asks of the other side
(None: the answering side picks the most zero-copy form its trust allows). The answering side
never reads unsafe unless it trusts (``PermissionDenied`` otherwise: ``kind: "permission"``);
every other refusal is a ``ProtocolError`` (``kind: "protocol"``). vmsplice-coop has only the
unsafe form, so it needs both sides' trust: the offering side offers it only when it trusts.

Between hosts (``ch.across`` set: a TCP setup channel) only ``cross_host`` transports are
offered or taken, and an offer carries parameters, never fds (``TransportInfo.create_across``).

The offering side keeps nothing of the answering side's share: its fds are closed once sent.
The answering side owns the fds that came with an offer from ``read_offer`` on, and closes them
on every path that does not open them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fable._wire import close_fds
from fable.errors import FableError, PermissionDenied, ProtocolError
from fable.transports import REGISTRY, DataPath, EndSpec, TransportInfo, channel
from fable.transports.channel import SetupChannel

__all__ = [
    "HELLO",
    "PROPOSE",
    "REFUSE",
    "Offer",
    "Stance",
    "answer",
    "answer_form",
    "choose_form",
    "first_offer",
    "make_offer",
    "open_offer",
    "own_form",
    "read_offer",
    "refusal_error",
    "refused",
]

HELLO = "hello"  # the first offer (epoch 0)
PROPOSE = "reconfig"  # a later one (epoch n)
REFUSE = channel.REFUSE  # an offer refused: {epoch, why, kind: "permission" | "protocol"}
refusal_error = channel.refusal_error  # the error a REFUSE stands for on the offering side


@dataclass(frozen=True)
class Offer:
    """An offer as read from the setup channel, its fields checked."""

    op: str
    epoch: int
    info: TransportInfo
    safe: bool  # the offering side's own form
    yours: bool | None  # the form it asks of this side (None: this side's choice)
    params: dict[str, Any]
    reason: str = ""


@dataclass(frozen=True)
class Stance:
    """What this side accepts in an offer, from its own state, never from the peer's word.

    ``trusted``: this side may read in place (unsafe, zero-copy); None: it has not said and
    takes the form the first offer asks for (``open_pair``'s other end: the pair's creator chose
    for both). ``transport``: the only transport this side takes (a listener's: the one the
    daemon chose; None: any). ``no_spin``: its ``fileno()`` is out, so no spinning transport."""

    trusted: bool | None = None
    transport: str | None = None
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


def own_form(info: TransportInfo, trusted: bool, safe: bool | None) -> bool:
    """The form a side with trust ``trusted`` reads ``info`` in: ``safe`` when given, else the
    most zero-copy one its trust allows. ``PermissionDenied`` for unsafe reads without trust,
    ``ValueError`` for a form the transport does not have."""
    if safe is None:
        safe = not (trusted and False in info.caps.forms)
        if safe and True not in info.caps.forms:
            safe = False  # the transport has only the unsafe form: refused below
    if not safe and not trusted:
        raise PermissionDenied(
            "this side does not trust its peer (trusted=False): no unsafe (zero-copy) reads"
            + (f", and {info.name} has no other form" if True not in info.caps.forms else "")
        )
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
    yours: bool | None = None,
) -> DataPath:
    """Create transport ``info``, open this side's end (role 0, form ``safe``) and send the
    peer its share in an offer asking it for form ``yours``; returns this side's path. Nothing
    is left behind if it raises. Between hosts: ValueError for a transport that cannot cross."""
    if ch.across is None:
        ours, theirs = info.create(dict(options or {}))
    elif info.create_across is None or not info.caps.cross_host:
        raise ValueError(f"{info.name} cannot connect two hosts; between hosts: {_crossing()}")
    else:
        ours, theirs = info.create_across(ch.across, dict(options or {}))
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
        "yours": yours,
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


def _crossing() -> str:
    return ", ".join(n for n, i in REGISTRY.items() if i.caps.cross_host)


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
        safe, yours, params = record.get("safe"), record.get("yours"), record.get("params")
        if (
            not isinstance(safe, bool)
            or not isinstance(yours, (bool, type(None)))
            or not isinstance(params, dict)
        ):
            raise ProtocolError(f"malformed {op} on the setup channel")
        for form in (safe, yours):
            why = None if form is None else info.no_form(form)
            if why is not None:
                raise ProtocolError(f"the peer's offer: {why}")
        reason = record.get("reason", "")
        return Offer(op, epoch, info, safe, yours, params, str(reason)[:500])
    except BaseException:
        close_fds(fds)
        raise


def answer_form(offer: Offer, stance: Stance) -> bool:
    """This side's form for ``offer``, from its own ``stance`` alone: what the offer asks
    (``yours``) if this side's trust allows it, else the most zero-copy form it allows.
    ``PermissionDenied`` when the offer needs unsafe reads this side does not trust the peer
    with; ``ProtocolError`` for a transport this side does not take."""
    name = offer.info.name
    if stance.transport is not None and name != stance.transport:
        raise ProtocolError(f"the peer offered {name}; this side expects {stance.transport}")
    if stance.no_spin and offer.info.caps.spins:
        raise ProtocolError(f"fileno() was handed out on this side: {name} spins")
    if stance.trusted is None:  # open_pair's other end: the creator chose for both
        return offer.safe if offer.yours is None else offer.yours
    try:
        return own_form(offer.info, stance.trusted, offer.yours)
    except ValueError as e:
        raise ProtocolError(str(e)) from None


def refused(exc: BaseException, epoch: int) -> dict[str, Any]:
    """The REFUSE record that tells the offering side why (``kind`` picks its error class)."""
    kind = "permission" if isinstance(exc, PermissionDenied) else "protocol"
    return {"op": REFUSE, "epoch": epoch, "why": str(exc)[:500], "kind": kind}


def open_offer(ch: SetupChannel, offer: Offer, fds: list[int], safe: bool) -> DataPath:
    """Open this side's end of an accepted offer (role 1, form ``safe``); the fds are the
    path's (or closed). Resources that do not check out are the peer's fault:
    ``ProtocolError``, whatever the system call that found out (a mapping refused, a pipe
    that is not one)."""
    try:
        return offer.info.open(EndSpec(fds, offer.params), 1, safe, ch, offer.epoch)
    except (OSError, ValueError, OverflowError, MemoryError) as e:
        if isinstance(e, FableError):  # Timeout, WouldBlock... are OSErrors too
            raise
        raise ProtocolError(
            f"the peer's {offer.info.name} resources: {type(e).__name__}: {e}"
        ) from e


def first_offer(ch: SetupChannel, stance: Stance, timeout: float | None) -> tuple[DataPath, Offer]:
    """The answering side at epoch 0: wait for the hello (``timeout``: for all of it), check
    it, open this side's end. A refused hello is answered with REFUSE (the offering side's
    connection fails with the reason) and raised here."""
    record, fds = ch.next(timeout)
    return answer(ch, record, fds, HELLO, 0, stance)


def answer(
    ch: SetupChannel,
    record: dict[str, Any],
    fds: list[int],
    op: str,
    epoch: int,
    stance: Stance,
    busy: str | None = None,
) -> tuple[DataPath, Offer]:
    """Answer an offer (``op`` for ``epoch``, its ``fds`` now this side's): check it against
    this side's ``stance`` and open this side's end in its own form; or refuse it (``busy``:
    refuse whatever it offers, for that reason): REFUSE(epoch, why, kind) goes to the offering
    side, then the error is raised here. The refusal is sent before the offered fds close:
    their end is what the offering side notices first, and the reason must be there already."""
    held = fds  # this side's to close until open_offer takes them
    try:
        if busy is not None:
            raise ProtocolError(busy)
        offer = read_offer(record, [], op)
        if ch.across is not None and not offer.info.caps.cross_host:
            raise ProtocolError(f"the peer offered {offer.info.name} between hosts")
        if offer.epoch != epoch:
            raise ProtocolError(f"the offer is for epoch {offer.epoch}, not {epoch}")
        form = answer_form(offer, stance)
        held = []
        path = open_offer(ch, offer, fds, form)  # the path's fds (closed if it raises)
    except BaseException as e:
        if isinstance(e, FableError):
            try:
                ch.send(refused(e, epoch))
            except (OSError, FableError):
                pass  # the offering side is gone: nobody to tell
        close_fds(held)
        raise
    return path, offer
