"""docs/architecture.md names every module of src/fable (a new module cannot go unexplained)."""

from __future__ import annotations

from pathlib import Path

import fable

SRC = Path(fable.__file__).parent
DOC = Path(__file__).parent.parent / "docs" / "architecture.md"


def test_every_module_is_named_in_the_architecture() -> None:
    text = DOC.read_text()
    files = [
        p.relative_to(SRC).as_posix()
        for p in sorted(SRC.rglob("*"))
        if p.suffix in (".py", ".c", ".h", ".pyi", ".json") and "__pycache__" not in p.parts
    ]
    assert len(files) > 50  # the walk found the tree
    missing = [f for f in files if f"`{f}`" not in text]
    assert not missing, "modules docs/architecture.md does not name: " + ", ".join(missing)
