"""Settings come from FABLE_* variables, are validated, and are shown by `fable doctor`."""

from __future__ import annotations

import pytest

import fable
from fable import config, errors


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = config.reload()
    assert s.ring_size == 4 << 20 and s.triggers is True
    monkeypatch.setenv("FABLE_RING_SIZE", "0x10000")
    monkeypatch.setenv("FABLE_TRIGGERS", "off")
    monkeypatch.setenv("FABLE_STATE_DIR", "/tmp/somewhere")
    s = config.reload()
    assert s.ring_size == 65536 and s.triggers is False and str(s.state_dir) == "/tmp/somewhere"
    sources = {name: src for name, _, _, src in s.describe()}
    assert sources["ring_size"] == "environment" and sources["read_buffers"] == "default"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FABLE_RING_SIZE", "1000"),
        ("FABLE_RING_SIZE", "lots"),
        ("FABLE_READ_BUFFERS", "0"),
        ("FABLE_TRIGGERS", "maybe"),
        ("FABLE_BACKEND", "rust"),
        ("FABLE_LOG_LEVEL", "LOUD"),
        ("FABLE_GRACE_PERIOD", "-1"),
        ("FABLE_HOST_ID", "../etc"),
        ("FABLE_HOST_ID", "h" * 65),
    ],
)
def test_bad_values_are_clear_errors(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        config.reload()


def test_small_ring_limits_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABLE_RING_SIZE", "65536")
    config.reload()
    conn, pending = fable.open_pair("unix")
    other = pending.open()
    with conn, other:
        assert conn.max_write == 32768
        with pytest.raises(ValueError, match="more=True"):
            conn.getwritebuf(40000)
        big = bytes(range(256)) * 1000  # larger than the whole ring: sent in parts
        import threading

        t = threading.Thread(target=conn.send, args=(big,))
        t.start()
        assert other.recv(timeout=10) == big
        t.join()


def test_error_hierarchy() -> None:
    assert issubclass(errors.PeerDied, errors.ConnectionClosed)
    assert issubclass(errors.ConnectionClosed, ConnectionError)
    assert issubclass(errors.WouldBlock, BlockingIOError)
    assert issubclass(errors.Timeout, TimeoutError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.FableError)
        assert getattr(fable, name) is getattr(errors, name)
