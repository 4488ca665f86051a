"""Public conformance checks: what every transport promises, runnable against any of them.

By contract:
- ``fable.testing.transport``: the data path (``check_transport(make_pair)``: ordering,
  fragments, buffers, back-pressure, readiness, close, dead peers, fork, stats);
- ``fable.testing.reconfigure``: live reconfiguration (``check_reconfigure(make_pair)``: every
  switch from this transport and back under traffic, held buffers, methods looked up before a
  switch, a quiet side, the stable fileno, refusals, a peer dying mid-switch);
- ``fable.testing.hostile``: a malicious peer for the shared-memory transports;
- ``fable.testing.harness``: what the checks are made of (a forked peer, message patterns, fd
  and mapping counts);
- ``fable.testing.cluster``: test hosts, network namespaces on a bridge with a daemon each
  (root only; imported on its own, not here).

Every check works across two processes and fails on a leaked fd or mapping.
"""

from __future__ import annotations

from fable.testing.harness import (
    Child,
    MakePair,
    fable_mappings,
    fill,
    no_leaks,
    open_fds,
    pattern,
    verify,
    wait_readable,
)
from fable.testing.reconfigure import RECONFIGURE_CHECKS, check_reconfigure, run_reconfigure_check
from fable.testing.transport import CHECKS, check_transport, run_check

__all__ = [
    "CHECKS",
    "RECONFIGURE_CHECKS",
    "Child",
    "MakePair",
    "check_reconfigure",
    "check_transport",
    "fable_mappings",
    "fill",
    "no_leaks",
    "open_fds",
    "pattern",
    "run_check",
    "run_reconfigure_check",
    "verify",
    "wait_readable",
]
