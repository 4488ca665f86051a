"""Shared fixtures: every test gets a clean fable settings object and its fds checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

import fable.config


def pytest_sessionstart(session: pytest.Session) -> None:
    # The suite tests the C core: it must have been built and loaded.
    import fable._core  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in [f.metadata["env"] for f in dataclasses.fields(fable.config.Settings)]:
        monkeypatch.delenv(var, raising=False)
    fable.config.reload()
    yield
    fable.config._current = None  # read afresh (after monkeypatch undoes the test's variables)
