"""The README's example runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_two_process_example(tmp_path: Path) -> None:
    text = README.read_text()
    start = text.index("## Example: two processes")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert code is not None
    script = tmp_path / "upper.py"
    script.write_text(code.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["b'HELLO'", "b'ZERO COPIES'", "unix 2"]


def test_testing_your_own_transport_runs(tmp_path: Path) -> None:
    """The conformance suites as the README shows them (both checks pass on unix)."""
    text = README.read_text()
    start = text.index("## Testing your own transport")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert code is not None
    assert "check_transport(" in code.group(1) and "check_reconfigure(" in code.group(1)
    script = tmp_path / "conformance.py"
    script.write_text(code.group(1) + "print('passed')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "passed"


def test_security_model_example(tmp_path: Path) -> None:
    """The security model's example: mixed trust on one connection, and the refusal."""
    text = README.read_text()
    start = text.index("## Security model")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert code is not None
    script = tmp_path / "trust.py"
    script.write_text(code.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["False True", "b'to the careful side'"], lines
    assert lines[2] == (
        "refused: the peer refused to switch to shmem-pipe: this side does not trust its peer "
        "(trusted=False): no unsafe (zero-copy) reads"
    ), lines
