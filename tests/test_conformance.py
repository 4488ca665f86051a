"""The conformance suite (fable.testing) over every transport in REGISTRY."""

from __future__ import annotations

import functools

import pytest

import fable
from fable.testing import CHECKS, run_check


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("transport", list(fable.REGISTRY))
def test_conformance(transport: str, check: str) -> None:
    for safe in fable.REGISTRY[transport].caps.forms:
        run_check(check, functools.partial(fable.open_pair, transport, safe=safe))
