"""The README's example runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _example(section: str, tmp_path: Path, tail: str = "", timeout: float = 60) -> str:
    """Run the first python block after the README heading ``section``; its stdout."""
    text = README.read_text()
    start = text.index(section)
    code = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert code is not None
    script = tmp_path / "example.py"
    script.write_text(code.group(1) + tail)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_two_process_example(tmp_path: Path) -> None:
    out = _example("## Example: two processes", tmp_path)
    assert out.splitlines() == ["b'HELLO'", "b'ZERO COPIES'", "unix 2"]


def test_testing_your_own_transport_runs(tmp_path: Path) -> None:
    """The conformance suites as the README shows them (both checks pass on unix)."""
    text = README.read_text()
    section = text[text.index("## Testing your own transport") :]
    assert "check_transport(" in section and "check_reconfigure(" in section
    out = _example("## Testing your own transport", tmp_path, "print('passed')\n", timeout=300)
    assert out.strip() == "passed"


def test_security_model_example(tmp_path: Path) -> None:
    """The security model's example: mixed trust on one connection, and the refusal."""
    lines = _example("## Security model", tmp_path).splitlines()
    assert lines[:2] == ["False True", "b'to the careful side'"], lines
    assert lines[2] == (
        "refused: the peer refused to switch to shmem-pipe: this side does not trust its peer "
        "(trusted=False): no unsafe (zero-copy) reads"
    ), lines
